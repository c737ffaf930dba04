"""PostgreSQL access (ingest, the persister and the notifier): pools, versioned migrations,
advisory lock keys and work done by one process at a time."""

from __future__ import annotations

import asyncio
import enum
import itertools
import json
import logging
import socket
import urllib.parse
from collections.abc import Awaitable, Callable
from importlib import resources

import asyncpg

from common.backoff import backoff
from common.failures import connection_closed, database_unavailable_sqlstate, network_error
from common.settings import Settings

log = logging.getLogger(__name__)

# The database is down, restarting, failing over or out of resources (as opposed to a bad or slow
# query): worth waiting for, holding the message, spending no retry. By SQLSTATE
# (common.failures.DATABASE_UNAVAILABLE_SQLSTATES, which also names these in a failed job's reason):
# class 08 (connection), class 58 (system error: the server's disk failing, 58030), 53100 disk full,
# 53200 out of memory, 53300 too many connections, 25006 read-only transaction (a replica promoted
# mid-failover), 57P01-57P03 shutting down or starting up; and no server to connect to (refused,
# unreachable, a name that does not resolve, a timeout; and a statement that got no answer for
# DATABASE_COMMAND_TIMEOUT_S, asyncpg's asyncio.TimeoutError, which is TimeoutError: a connection
# the network dropped without a reset). Not 57014 (statement timeout, also class 57): a slow
# statement is this job's error, retried like any other and failed when retries run out. Nor
# asyncpg's InterfaceErrors but those of a closed connection (a statement given the wrong number of
# arguments is a mistake), nor an OSError of this machine's disk: held, those would be handed back
# every OUTAGE_HOLD_S for ever, never failing the job.
#
# Test with `isinstance(exc, DATABASE_UNAVAILABLE)`, not in an `except` clause or a handler map:
# those go by the exception's type alone and miss the errors told apart by what they say
# (DatabaseUnavailableByContent).
_UNAVAILABLE_TYPES: tuple[type[BaseException], ...] = (
    ConnectionError,
    socket.gaierror,
    TimeoutError,
    # (A local PostgreSQL's Unix socket, not there while the server is stopped, is an ENOENT that
    # names no file: told apart from a missing file of this machine by DatabaseUnavailableByContent.)
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.DiskFullError,
    asyncpg.exceptions.OutOfMemoryError,
    asyncpg.exceptions.PostgresSystemError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TargetServerAttributeNotMatched,  # no primary among the hosts, mid-failover
)


class _MatchedByContent(type):
    """The metaclass of an exception class that `isinstance` matches by what an error says, not by
    its type. `except` and exception-handler maps never match such a class (they go by the type's
    MRO); `isinstance`, which the consumers' `wait_on` uses, does."""

    def __instancecheck__(cls, instance: object) -> bool:
        return cls.matches(instance)


class DatabaseUnavailableByContent(Exception, metaclass=_MatchedByContent):
    """Errors of the database being away that no type of their own tells apart: asyncpg's
    InterfaceError about a closed connection or pool (its other InterfaceErrors are the caller's
    mistakes); a PostgreSQL error of an unavailable SQLSTATE without a type listed above (53000); a
    network OSError that is not a ConnectionError (host or network unreachable, asyncio's "Multiple
    exceptions" when every address of a host refused)."""

    @staticmethod
    def matches(exc: object) -> bool:
        if isinstance(exc, asyncpg.PostgresError):
            return database_unavailable_sqlstate(exc.sqlstate)
        if isinstance(exc, asyncpg.InterfaceError):
            return connection_closed(exc)
        return isinstance(exc, OSError) and network_error(exc)


DATABASE_UNAVAILABLE: tuple[type[BaseException], ...] = (*_UNAVAILABLE_TYPES, DatabaseUnavailableByContent)

# The database answered, but refuses this service for good: a wrong password or user, a database
# that does not exist (a mistyped DATABASE_URL). Waiting for it at start-up would leave a process
# that looks alive (its /metrics is served) and never works.
DATABASE_MISCONFIGURED: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.InvalidPasswordError,
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,
    asyncpg.exceptions.InvalidCatalogNameError,
)


class DatabaseMisconfigured(RuntimeError):
    """DATABASE_URL names a database this service may not use (DATABASE_MISCONFIGURED)."""


@enum.unique
class LockKey(enum.IntEnum):
    """PostgreSQL advisory lock keys, one per kind of work that one process at a time does (among
    all services sharing the database), kept together so that no two kinds share one: @unique
    refuses a repeated value."""

    MIGRATIONS = 7_406_501_137  # concurrent start-ups applying migrations
    OUTBOX = 7_406_501_138
    RETENTION = 7_406_501_139
    ORPHANS = 7_406_501_140
    REINDEX = 7_406_501_141
    INBOX_SCAN = 7_406_501_142
    WEBHOOK_PRUNE = 7_406_501_143
    CORRECTIONS = 7_406_501_144
    VECTOR_INDEX = 7_406_501_145  # building an embedding model's search index


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


# What a statement that may rightly run for long on a large database is given instead of
# DATABASE_COMMAND_TIMEOUT_S (asyncpg's `timeout=` of that one call): a migration (an index built
# over a big table), the wait for another process's migrations, a search index built CONCURRENTLY
# (searchstore.ensure_vector_index; it also waits for every older transaction). Cut short, such a
# build is rolled back and begun again at every try, never finishing. A long explicit timeout
# rather than a connection of its own without one: these run on the pool's connections, as the
# rest, and asyncpg has no public "no limit" for one call.
LONG_STATEMENT_TIMEOUT_S = 7 * 86_400.0


async def create_pool(settings: Settings, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    """Waits for the database at start-up instead of crashing; raises DatabaseMisconfigured at
    once when the database answers that this service may not use it (wrong password or user, no
    such database), which waiting would not change.

    A statement without an answer for DATABASE_COMMAND_TIMEOUT_S raises TimeoutError (in
    DATABASE_UNAVAILABLE), instead of waiting on a connection the network dropped without a reset
    until the kernel gives up (15 minutes or more). asyncpg then sends a cancel request and, with
    no answer to it either within as long again, drops the connection: the caller sees the error
    once the connection is back in the pool (within about twice the timeout), and the pool makes a
    new connection for the next query. The pool's max_inactive_connection_lifetime (300 s) is no
    help there: it closes only connections left idle that long, and never the min_size ones."""
    url = settings.database_url.get_secret_value()

    def worth_waiting(exc: BaseException) -> bool:
        return isinstance(exc, (TimeoutError, OSError, asyncpg.PostgresError)) and not isinstance(
            exc, DATABASE_MISCONFIGURED)

    try:
        async for attempt in backoff("PostgreSQL not reachable", worth_waiting):
            with attempt:
                return await asyncpg.create_pool(url, min_size=min_size, max_size=max_size, init=_init_connection,
                                                 command_timeout=settings.database_command_timeout_s)
    except DATABASE_MISCONFIGURED as exc:
        where = describe_database_url(url)
        log.error("PostgreSQL at %s refuses this service (%s: %s, SQLSTATE %s): fix DATABASE_URL;"
                  " not waiting for it", where, type(exc).__name__, exc, exc.sqlstate)
        raise DatabaseMisconfigured(f"PostgreSQL at {where} refuses this service: {exc}"
                                    f" (SQLSTATE {exc.sqlstate}); fix DATABASE_URL") from None
    raise AssertionError("unreachable")


def describe_database_url(url: str) -> str:
    """user@host:port/database of a DATABASE_URL, without its password (a Unix socket's folder
    stands for the host)."""
    try:
        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qs(parts.query)
        host = parts.hostname or (query.get("host") or [""])[0] or "localhost"
        port = parts.port or (query.get("port") or [""])[0] or 5432
        user = urllib.parse.unquote(parts.username or (query.get("user") or [""])[0] or "?")
        database = urllib.parse.unquote(parts.path.lstrip("/")) or (query.get("dbname") or [""])[0] or user
    except ValueError:
        return "DATABASE_URL (unparsable)"
    return f"{user}@{host}:{port}/{database}"


def _migrations() -> list[tuple[int, str, str]]:
    found = []
    for entry in resources.files("common.migrations").iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            found.append((version, entry.name, entry.read_text()))
    return sorted(found)


# Search filters while it walks the HNSW index (hnsw.iterative_scan), which pgvector has from 0.8;
# from 0.6 on, setting it where it does not exist is an error.
PGVECTOR_AT_LEAST = (0, 8)
MIGRATION_LOCK_TIMEOUT_S = 5.0


class MissingPgvector(RuntimeError):
    """The database has no pgvector extension to install, or too old a one."""

    def __init__(self, detail: str):
        super().__init__(
            f"PostgreSQL lacks a usable pgvector extension ({detail}). Install pgvector "
            f"{'.'.join(map(str, PGVECTOR_AT_LEAST))} or later on the "
            "database server (Debian/Ubuntu: apt install postgresql-<version>-pgvector; Docker: the "
            "pgvector/pgvector image), or leave DATABASE_URL unset for `make run`'s embedded PostgreSQL.")


def pgvector_too_old(version: str) -> bool:
    """Whether an installed pgvector version ("0.7.4") is older than PGVECTOR_AT_LEAST."""
    numbers = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    return numbers < PGVECTOR_AT_LEAST


async def apply_migrations(pool: asyncpg.Pool) -> list[str]:
    """Apply every migration not yet applied, each in its own transaction. Safe when several
    services start at once: an advisory lock lets one apply while the others wait."""
    applied_now = []
    async with pool.acquire() as conn:
        # Another service may be applying migrations (an index build): wait as long as it takes.
        await conn.execute("SELECT pg_advisory_lock($1)", LockKey.MIGRATIONS, timeout=LONG_STATEMENT_TIMEOUT_S)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for version, name, sql in _migrations():
                if version in done:
                    continue
                for attempt in itertools.count(1):
                    try:
                        await _apply_migration(conn, version, name, sql)
                        break
                    except asyncpg.exceptions.LockNotAvailableError:
                        log.warning("migration %s waited %g s for a table another transaction holds (try %d);"
                                    " trying again, so that queries of the running services do not queue behind"
                                    " it meanwhile", name, MIGRATION_LOCK_TIMEOUT_S, attempt)
                        await asyncio.sleep(min(30.0, attempt * MIGRATION_LOCK_TIMEOUT_S))
                log.info("applied migration %s", name)
                applied_now.append(name)
            version = await conn.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
            if version is None or pgvector_too_old(version):
                missing = MissingPgvector(f"version {version} is installed" if version else "not installed")
                log.critical("%s", missing)
                raise missing
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", LockKey.MIGRATIONS)
    return applied_now


async def _apply_migration(conn: asyncpg.Connection, version: int, name: str, sql: str) -> None:
    async with conn.transaction():
        # While a migration waits for a table's lock (behind a long transaction of a running
        # replica, in a rolling upgrade), every query of that table queues behind it: it gives up
        # after a while and tries again, letting them through in between.
        await conn.execute(f"SET LOCAL lock_timeout = '{int(MIGRATION_LOCK_TIMEOUT_S * 1000)}ms'")
        try:
            await conn.execute(sql, timeout=LONG_STATEMENT_TIMEOUT_S)  # an index over a big table: minutes, hours
        except asyncpg.exceptions.FeatureNotSupportedError as exc:
            if "vector" not in str(exc):
                raise
            missing = MissingPgvector(str(exc))
            log.critical("%s", missing)
            raise missing from exc
        await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)


async def _connection_outside(pool: asyncpg.Pool) -> asyncpg.Connection:
    """A connection of its own, made as `pool` makes its connections (the same DATABASE_URL and
    options, and create_pool's init), but not one of them."""
    conn = await asyncpg.connect(*pool._connect_args, **pool._connect_kwargs)
    try:
        await _init_connection(conn)
    except BaseException:
        await conn.close()
        raise
    return conn


async def every(interval_s: float, pool: asyncpg.Pool, lock_key: int, work: Callable[[], Awaitable[object]],
                what: str) -> None:
    """Run `work` every `interval_s` seconds, in one process at a time of those sharing the
    database (an advisory lock: a process that finds it taken skips that turn). An error is logged
    and the next turn comes. The lock is held on a connection of its own, closed after the turn,
    not on one of `pool`'s: `work` (listing a whole bucket, a backlog) may take minutes, and the
    requests' pool would be one connection short all that while."""
    while True:
        try:
            conn = await _connection_outside(pool)
            try:
                if await conn.fetchval("SELECT pg_try_advisory_lock($1)", lock_key):
                    await work()  # the lock goes with the connection
            finally:
                try:
                    await conn.close(timeout=10)
                except Exception:
                    conn.terminate()
        except Exception:
            log.exception("%s failed; will try again", what)
        await asyncio.sleep(interval_s)
