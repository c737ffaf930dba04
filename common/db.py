"""PostgreSQL access (ingest, the persister and the notifier): pools, versioned migrations,
advisory lock keys and work done by one process at a time."""

from __future__ import annotations

import asyncio
import enum
import itertools
import json
import logging
from collections.abc import Awaitable, Callable
from importlib import resources

import asyncpg

from common.backoff import backoff, of_type
from common.settings import Settings

log = logging.getLogger(__name__)

# The database is down, restarting or failing over (as opposed to a bad or slow query): worth
# waiting for, holding the message, spending no retry. By SQLSTATE: class 08 (connection),
# 53300 too many connections, 25006 read-only transaction (a replica promoted mid-failover),
# 57P01-57P03 shutting down or starting up. Not 57014 (statement timeout, also class 57): a slow
# statement is this job's error, retried like any other and failed when retries run out.
DATABASE_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
)

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


async def create_pool(settings: Settings, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    """Waits for the database at start-up instead of crashing."""
    async for attempt in backoff("PostgreSQL not reachable", of_type(TimeoutError, OSError, asyncpg.PostgresError)):
        with attempt:
            return await asyncpg.create_pool(
                settings.database_url.get_secret_value(),
                min_size=min_size, max_size=max_size, init=_init_connection,
            )
    raise AssertionError("unreachable")


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
        await conn.execute("SELECT pg_advisory_lock($1)", LockKey.MIGRATIONS)
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
            await conn.execute(sql)
        except asyncpg.exceptions.FeatureNotSupportedError as exc:
            if "vector" not in str(exc):
                raise
            missing = MissingPgvector(str(exc))
            log.critical("%s", missing)
            raise missing from exc
        await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)


async def every(interval_s: float, pool: asyncpg.Pool, lock_key: int, work: Callable[[], Awaitable[object]],
                what: str) -> None:
    """Run `work` every `interval_s` seconds, in one process at a time of those sharing the
    database (an advisory lock: a process that finds it taken skips that turn). An error is logged
    and the next turn comes."""
    while True:
        try:
            async with pool.acquire() as conn:
                if await conn.fetchval("SELECT pg_try_advisory_lock($1)", lock_key):
                    try:
                        await work()
                    finally:
                        await conn.execute("SELECT pg_advisory_unlock($1)", lock_key)
        except Exception:
            log.exception("%s failed; will try again", what)
        await asyncio.sleep(interval_s)
