"""GET /readyz's checks. Each has its own short deadline, and the object-store check runs on its
own client (short socket timeouts, no retries) in its own single thread: a hung S3 endpoint
answers "unavailable" within seconds and never piles up blocked threads that uploads need."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future, ThreadPoolExecutor

from minio import Minio

CHECK_TIMEOUT_S = 3.0


class ObjectStoreProbe:
    """At most one bucket check in flight; while one is stuck, the store is reported unavailable."""

    def __init__(self, client: Minio, bucket: str) -> None:
        self.client, self.bucket = client, bucket
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="readyz-s3")
        self.running: Future | None = None

    async def __call__(self) -> None:
        if self.running is not None and not self.running.done():
            raise TimeoutError("the previous check has not answered yet")
        self.running = self.executor.submit(self.client.bucket_exists, self.bucket)
        if not await asyncio.wrap_future(self.running):  # run_checks bounds the wait
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
