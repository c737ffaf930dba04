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
    except Exception as exc:
        # An error that escapes is logged further out (a sweep over many jobs logs and goes on):
        # it carries the job, so that line names it too.
        if getattr(exc, _ERROR_JOB, None) is None:
            with contextlib.suppress(AttributeError):
                setattr(exc, _ERROR_JOB, job_id)
        raise
    finally:
        current_job.reset(token)


_ERROR_JOB = "_stt_job_id"


class _JobIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        job_id = current_job.get()
        if job_id is None and record.exc_info and record.exc_info[1] is not None:
            job_id = getattr(record.exc_info[1], _ERROR_JOB, None)
        if job_id is not None and not getattr(record, "_job_stamped", False):
            record.msg = f"job={job_id} {record.msg}"
            record._job_stamped = True
        return True


NOISY_LIBRARIES = ("aiormq", "aio_pika", "urllib3", "httpx", "faster_whisper", "numba")


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(_JobIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries' warnings (torch, ONNX Runtime's exporter) in the same format, not bare on stderr.
    logging.captureWarnings(True)
    # Chatty libraries say only warnings and worse, unless LOG_LEVEL=DEBUG asks for everything
    # (a lost broker connection is logged at WARNING by common.broker, not left to aio-pika's INFO).
    for noisy in NOISY_LIBRARIES:
        logging.getLogger(noisy).setLevel(
            logging.NOTSET if root.level <= logging.DEBUG else max(logging.WARNING, root.level))
