"""What a client is told when a stage gives up on a job: a category it can act on. The exception
itself (hosts, URLs, object keys, stack text) stays in the service's log with the job id."""

from __future__ import annotations

# What S3 servers answer for an object that is not there: NoSuchKey (to a GET), NotFound (to a
# HEAD, whose answer has no body to name the code), NoSuchObject (some servers).
MISSING_OBJECT = frozenset({"NoSuchKey", "NoSuchObject", "NotFound"})


def failure_category(exc: BaseException) -> str:
    """A short, stable description of why retries did not help, from the exception's type."""
    module = type(exc).__module__.split(".")[0]
    name = type(exc).__name__
    code = getattr(exc, "code", None)
    if module == "minio" and (code in MISSING_OBJECT or code == "NoSuchBucket"):
        return "the stored audio is missing"
    if module in ("minio", "urllib3"):
        return "storage unavailable"
    if module == "asyncpg":
        return _database_category(getattr(exc, "sqlstate", None) or "")
    if name == "OllamaError" and 400 <= (getattr(exc, "status", None) or 0) < 500:
        # Up, but refusing: most often the model is not pulled (the embedder's log has the answer).
        return f"the embedding service refused the request ({exc.status}: is the model pulled?)"
    if module == "aiohttp" or name in ("OllamaError", "OllamaUnavailable"):
        return "embedding service unavailable"
    if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
        return "a service it depends on was unreachable"
    return "internal error"


def _database_category(sqlstate: str) -> str:
    # By SQLSTATE, not common.db.DATABASE_UNAVAILABLE's types: this module is imported by every
    # stage (common.broker), and the diarizer and transcriber do not install asyncpg.
    # No SQLSTATE: the connection itself (asyncpg's interface and connection errors).
    if not sqlstate or sqlstate[:2] in ("08", "53") or sqlstate in ("25006", "57P01", "57P02", "57P03"):
        return "database unavailable"
    if sqlstate == "57014":
        return "database too slow (statement timeout)"
    if sqlstate[:2] == "40":
        return "database conflict (deadlock or serialization)"
    if sqlstate[:2] == "42":  # a table or column this version expects is not there
        return f"database schema error (SQLSTATE {sqlstate})"
    # Data the database refuses (a vector of another length under the same model name, class 22;
    # a constraint, class 23): waiting would not help, and "unavailable" would send people looking
    # at a database that is up.
    return f"the database refused the data (SQLSTATE {sqlstate})"
