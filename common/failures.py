"""What a client is told when a stage gives up on a job: a category it can act on. The exception
itself (hosts, URLs, object keys, stack text) stays in the service's log with the job id.

Also the tests, shared with common.db, of what counts as a dependency being away rather than the
job's own error: this module is imported by every stage (common.broker), and the diarizer and
transcriber do not install asyncpg, so they go by SQLSTATE, errno and message, not by asyncpg's types."""

from __future__ import annotations

import errno
import re
import socket

# What S3 servers answer for an object that is not there: NoSuchKey (to a GET), NotFound (to a
# HEAD, whose answer has no body to name the code), NoSuchObject (some servers).
MISSING_OBJECT = frozenset({"NoSuchKey", "NoSuchObject", "NotFound"})

# The database is down, restarting, failing over or out of resources (as opposed to a bad or slow
# query): worth waiting for. By SQLSTATE: class 08 (connection) and 58 (system error: 58030 an I/O
# error of the server's disk); 53000 insufficient resources, 53100 disk full, 53200 out of memory,
# 53300 too many connections (not 53400, a configured limit such as temp_file_limit that this
# query exceeded); 25006 read-only transaction (a replica promoted mid-failover); 57P01-57P03
# shutting down or starting up. Not 57014 (statement timeout, also class 57): a slow statement is
# this job's error.
DATABASE_UNAVAILABLE_CLASSES = ("08", "58")
DATABASE_UNAVAILABLE_SQLSTATES = frozenset({"53000", "53100", "53200", "53300", "25006", "57P01", "57P02", "57P03"})

# asyncpg's InterfaceError about a connection or pool that is closed (the server went away between
# two statements, or the process is stopping): "connection is closed", "cannot perform operation:
# connection is closed", "cannot call Transaction.__aexit__(): the underlying connection is closed",
# "pool is closing", "pool is closed". Its other InterfaceErrors are mistakes of the caller ("the
# server expects 6 arguments for this query, 7 were passed"): this job's errors. (A value it cannot
# send, an int32 out of range, asyncpg raises as PostgreSQL's DataError, SQLSTATE 22000.)
_CLOSED = re.compile(r"connection is closed|pool is clos(?:ing|ed)")

# errno of a network call that found nobody there: refused, reset, aborted, unreachable, timed out.
NETWORK_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE,
                            errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN,
                            errno.ETIMEDOUT, errno.ENOTCONN, errno.ESHUTDOWN})
# errno of this machine's own disk (a full or read-only volume, a failing device, a file or folder
# it may not write): waiting for a dependency does not help, and the person told must look at the
# worker's host, not at a service.
LOCAL_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM,
                               errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EFBIG, errno.ENAMETOOLONG,
                               errno.EMFILE, errno.ENFILE})


def database_unavailable_sqlstate(sqlstate: str | None) -> bool:
    """Whether a PostgreSQL error of this SQLSTATE means the database is away (see above)."""
    return bool(sqlstate) and (sqlstate[:2] in DATABASE_UNAVAILABLE_CLASSES
                               or sqlstate in DATABASE_UNAVAILABLE_SQLSTATES)


def connection_closed(exc: BaseException) -> bool:
    """asyncpg's InterfaceError (not its subclasses: DataError and the like) about a connection or
    pool that is closed."""
    cls = type(exc)
    return (cls.__module__.startswith("asyncpg") and cls.__name__ == "InterfaceError"
            and bool(_CLOSED.search(str(exc))))


def network_error(exc: BaseException) -> bool:
    """A network call that found nobody there (a dependency down or unreachable), as opposed to an
    OSError of this machine's own (its disk). Also: asyncio's "Multiple exceptions: ..." when
    every address of a host refused (an OSError without errno), and a Unix socket that is not there
    (a local PostgreSQL that is stopped: ENOENT naming no file, where opening a file names it)."""
    if isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror, socket.herror)):
        return True
    if not isinstance(exc, OSError):
        return False
    if exc.errno in NETWORK_ERRNOS:
        return True
    if exc.errno is None and str(exc).startswith("Multiple exceptions: "):
        return True
    return exc.errno == errno.ENOENT and exc.filename is None and type(exc) in (OSError, FileNotFoundError)


def local_disk_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and not network_error(exc) and exc.errno in LOCAL_DISK_ERRNOS


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
        return _database_category(exc)
    if name == "OllamaTLSError":
        return "the embedding service's TLS failed (a certificate or SSL error: check OLLAMA_URL)"
    if name == "OllamaError" and 400 <= (getattr(exc, "status", None) or 0) < 500:
        # Up, but refusing: most often the model is not pulled (the embedder's log has the answer).
        return f"the embedding service refused the request ({exc.status}: is the model pulled?)"
    if module == "aiohttp" or name in ("OllamaError", "OllamaUnavailable"):
        return "embedding service unavailable"
    if isinstance(exc, MemoryError):
        return "out of memory"
    if network_error(exc):
        return "a service it depends on was unreachable"
    if local_disk_error(exc):
        return "a local disk error"
    if isinstance(exc, OSError):
        return "a service it depends on was unreachable"
    return "internal error"


def _database_category(exc: BaseException) -> str:
    sqlstate = getattr(exc, "sqlstate", None) or ""
    if not sqlstate:
        # No SQLSTATE: asyncpg's own errors, about the connection or about what it was given.
        if connection_closed(exc) or type(exc).__name__ == "TargetServerAttributeNotMatched":
            return "database unavailable"
        return "internal error (database client)"
    if database_unavailable_sqlstate(sqlstate):
        return "database unavailable"
    if sqlstate == "57014":
        return "database too slow (statement timeout)"
    if sqlstate[:2] == "40":
        return "database conflict (deadlock or serialization)"
    if sqlstate[:2] == "42":  # a table or column this version expects is not there
        return f"database schema error (SQLSTATE {sqlstate})"
    if sqlstate[:2] == "53":  # 53400: a configured limit (temp_file_limit...) this statement exceeded
        return f"database limit exceeded (SQLSTATE {sqlstate})"
    # Data the database refuses (a vector of another length under the same model name, class 22;
    # a constraint, class 23): waiting would not help, and "unavailable" would send people looking
    # at a database that is up.
    return f"the database refused the data (SQLSTATE {sqlstate})"
