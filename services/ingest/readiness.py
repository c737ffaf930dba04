"""GET /readyz's checks. Each has its own short deadline, and the object-store check runs on its
own client (short socket timeouts, no retries) in its own single thread: a hung S3 endpoint
answers "unavailable" within seconds and never piles up blocked threads that uploads need. The
database check runs on a connection of its own, dropped as soon as a check on it fails."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future, ThreadPoolExecutor

import asyncpg
from minio import Minio

from common.db import with_keepalive_settings

CHECK_TIMEOUT_S = 3.0


class ObjectStoreProbe:
    """At most one bucket check in flight. Callers that come while it is young wait for its
    answer (several load-balancer checkers probing at once share one check); once it is older
    than CHECK_TIMEOUT_S it is stuck, and the store is reported unavailable at once."""

    def __init__(self, client: Minio, bucket: str) -> None:
        self.client, self.bucket = client, bucket
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="readyz-s3")
        self.running: Future | None = None
        self.started_at = 0.0
        self.stuck = False  # a caller's deadline passed while it waited for `running`

    async def __call__(self) -> None:
        if self.running is None or self.running.done():
            self.running = self.executor.submit(self.client.bucket_exists, self.bucket)
            self.started_at, self.stuck = time.monotonic(), False
        elif self.stuck or time.monotonic() - self.started_at >= CHECK_TIMEOUT_S:
            raise TimeoutError("the previous check has not answered yet")
        running = self.running
        try:
            # Shielded: a caller's deadline (run_checks bounds each wait) ends its own wait, not
            # the check that the others wait on.
            exists = await asyncio.shield(asyncio.wrap_future(running))
        except asyncio.CancelledError:
            if self.running is running and not running.done():
                self.stuck = True
            raise
        if not exists:
            raise LookupError("bucket missing")

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


class DatabaseProbe:
    """SELECT 1 on a connection of its own, one check at a time. A check that fails or is cut off
    terminates the connection, and the next one connects afresh: on a flow the network dropped
    without a reset (a failover, a NAT forgetting it), a cancelled query's answer never comes, and
    close() or a pool's release would wait for it for as long as the kernel keeps the flow (15
    minutes or more), every later check waiting behind it. Its session carries the TCP keepalive
    settings every session of the services does (common.db.with_keepalive_settings: without them
    where a pooler refuses them)."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.connection: asyncpg.Connection | None = None
        self.one_at_a_time = asyncio.Lock()  # a connection runs one query at once

    async def __call__(self) -> None:
        async with self.one_at_a_time:
            if self.connection is None or self.connection.is_closed():
                self.connection = await with_keepalive_settings(self.database_url, self._connect)
            connection = self.connection
            try:
                await connection.fetchval("SELECT 1", timeout=CHECK_TIMEOUT_S)
            except BaseException:  # run_checks' deadline cancels it, too
                self.connection = None
                connection.terminate()
                raise

    async def _connect(self, server_settings: dict[str, str]) -> asyncpg.Connection:
        return await asyncpg.connect(self.database_url, timeout=CHECK_TIMEOUT_S, server_settings=server_settings)

    def close(self) -> None:
        # Not close(): it waits for a check in flight, which on a dead flow never answers.
        if self.connection is not None:
            self.connection.terminate()
            self.connection = None


async def run_checks(checks: dict[str, object]) -> dict[str, str]:
    """Run the named async checks at once, each under CHECK_TIMEOUT_S: "ok" or why not."""
    results: dict[str, str] = {}

    async def one(name: str, probe) -> None:
        try:
            await asyncio.wait_for(probe(), timeout=CHECK_TIMEOUT_S)
            results[name] = "ok"
        except Exception as exc:
            results[name] = f"unavailable ({type(exc).__name__})"

    await asyncio.gather(*(one(name, probe) for name, probe in checks.items()))
    return {name: results[name] for name in checks}
