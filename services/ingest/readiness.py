"""GET /readyz's checks. Each has its own short deadline, and the object-store check runs on its
own client (short socket timeouts, no retries) in its own single thread: a hung S3 endpoint
answers "unavailable" within seconds and never piles up blocked threads that uploads need."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future, ThreadPoolExecutor

from minio import Minio

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
