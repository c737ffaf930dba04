"""What a client is told when a stage gives up on a job: a category it can act on. The exception
itself (hosts, URLs, object keys, stack text) stays in the service's log with the job id."""

from __future__ import annotations


def failure_category(exc: BaseException) -> str:
    """A short, stable description of why retries did not help, from the exception's type."""
    module = type(exc).__module__.split(".")[0]
    name = type(exc).__name__
    code = getattr(exc, "code", None)
    if module == "minio" and code in ("NoSuchKey", "NoSuchBucket"):
        return "the stored audio is missing"
    if module in ("minio", "urllib3"):
        return "storage unavailable"
    if module == "asyncpg":
        return "database unavailable"
    if module == "aiohttp" or name == "OllamaError":
        return "embedding service unavailable"
    if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
        return "a service it depends on was unreachable"
    return "internal error"
