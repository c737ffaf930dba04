"""One log format for every service; the job being handled is stamped on every line."""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator

LOG_FORMAT = "%(asctime)s | %(levelname)-8s | %(name)s:%(lineno)d | %(message)s"

# Set by the consumer loop around each message; asyncio.to_thread copies it into worker threads.
current_job: contextvars.ContextVar[int | None] = contextvars.ContextVar("current_job", default=None)


@contextlib.contextmanager
def job_logged(job_id: int | None) -> Iterator[None]:
    """Stamp `job=<id>` on the lines logged inside (outside a consumer, which stamps its own)."""
    token = current_job.set(job_id)
    try:
        yield
    finally:
        current_job.reset(token)


class _JobIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        job_id = current_job.get()
        if job_id is not None and not getattr(record, "_job_stamped", False):
            record.msg = f"job={job_id} {record.msg}"
            record._job_stamped = True
        return True


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(_JobIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiormq", "aio_pika", "urllib3", "httpx", "faster_whisper", "numba"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
