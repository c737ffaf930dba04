"""PostgreSQL access (ingest, the persister and the notifier): pools, versioned migrations,
advisory lock keys and work done by one process at a time."""

from __future__ import annotations

import asyncio
import enum
import itertools
import json
import logging
import re
import socket
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TypeVar

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
# that does not exist (a mistyped DATABASE_URL), a role without CONNECT on the database (42501); or
# the connection's TLS cannot be set up as DATABASE_URL asks (sslmode=require against a server
# without SSL, verify-full with a CA that did not sign the server's certificate, a root certificate
# file that is not there). Waiting for it at start-up would leave a process that looks alive (its
# /metrics is served) and never works.
#
# Test with `isinstance(exc, DATABASE_MISCONFIGURED)`, not in an `except` clause: the refused SSL
# upgrade is a plain ConnectionError told apart by what it says (DatabaseMisconfiguredByContent).
_MISCONFIGURED_TYPES: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.InvalidPasswordError,
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,
    asyncpg.exceptions.InvalidCatalogNameError,
    asyncpg.exceptions.InsufficientPrivilegeError,  # "permission denied for database" (no CONNECT)
    asyncpg.exceptions.ClientConfigurationError,  # sslmode=verify-*: no root certificate file
)
# TLS errors of a connection lost mid-handshake (a server restarting), as opposed to one refused.
_SSL_CONNECTION_LOST = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError, ssl.SSLWantReadError,
                        ssl.SSLWantWriteError)


class DatabaseMisconfiguredByContent(Exception, metaclass=_MatchedByContent):
    """TLS refusals: asyncpg's ConnectionError when the server answers the SSL request with no
    (sslmode=require, verify-ca or verify-full against a server with ssl off); and a TLS handshake
    that failed, not for the connection being lost (a certificate that does not verify: an
    ssl.SSLCertVerificationError, which is an OSError; a protocol neither side accepts)."""

    @staticmethod
    def matches(exc: object) -> bool:
        if isinstance(exc, ssl.SSLError):
            return not isinstance(exc, _SSL_CONNECTION_LOST)
        return isinstance(exc, ConnectionError) and "rejected SSL upgrade" in str(exc)


DATABASE_MISCONFIGURED: tuple[type[BaseException], ...] = (*_MISCONFIGURED_TYPES, DatabaseMisconfiguredByContent)


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


# What the server's end of every connection is told, so that it notices a client gone without a
# word (its node lost, the network cut) in about a minute: keepalive probes after 30 s of silence,
# 10 s apart, the third unanswered ending the session; and data it sent unacknowledged for 60 s
# ending it too. Left to the OS (2 h 11 min by default), such a session's advisory locks outlived
# their holder all that while: the outbox flusher's (held while it publishes), taken by no other
# replica, left every job.submitted and event in the outbox (uploads answered 202 and never
# started); `every`'s turns and a reindex run were skipped likewise. Sent as startup parameters,
# not SET: the pool's reset (RESET ALL) as a connection goes back puts a session's values back to
# those it started with. (Over a Unix socket the server has nothing to probe, and ignores them.)
SERVER_TCP_KEEPALIVES_IDLE_S = 30
SERVER_TCP_KEEPALIVES_INTERVAL_S = 10
SERVER_TCP_KEEPALIVES_COUNT = 3
SERVER_TCP_USER_TIMEOUT_MS = 60_000


def server_keepalive_settings() -> dict[str, str]:
    """The startup parameters of SERVER_TCP_KEEPALIVES_IDLE_S and the three after it."""
    return {"tcp_keepalives_idle": str(SERVER_TCP_KEEPALIVES_IDLE_S),
            "tcp_keepalives_interval": str(SERVER_TCP_KEEPALIVES_INTERVAL_S),
            "tcp_keepalives_count": str(SERVER_TCP_KEEPALIVES_COUNT),
            "tcp_user_timeout": str(SERVER_TCP_USER_TIMEOUT_MS)}


def _refuses_keepalive_settings(exc: BaseException, sent: dict[str, str]) -> bool:
    """Whether a connection was refused for one of the startup parameters `sent`: PgBouncer (which
    the README offers in front of PostgreSQL) refuses those it does not know ("unsupported startup
    parameter: tcp_keepalives_idle", SQLSTATE 08P01) unless its ignore_startup_parameters names
    them."""
    return isinstance(exc, asyncpg.PostgresError) and any(name in str(exc) for name in sent)


_Connected = TypeVar("_Connected")


async def with_keepalive_settings(url: str, connect: Callable[[dict[str, str]], Awaitable[_Connected]]) -> _Connected:
    """`connect(server_settings)` (a pool, a connection to `url`) with server_keepalive_settings();
    where they are refused (a PgBouncer in front), again without them, with a warning. Every session
    the services open is made through here: create_pool's (and so connection_outside's), and
    /readyz's (services.ingest.readiness.DatabaseProbe)."""
    keepalive = server_keepalive_settings()
    try:
        return await connect(keepalive)
    except asyncpg.PostgresError as exc:
        if not _refuses_keepalive_settings(exc, keepalive):
            raise
        log.warning("PostgreSQL at %s (or a connection pooler in front of it) refuses the keepalive"
                    " settings (%s); connecting without them. A client that vanishes then keeps its"
                    " session, and its advisory locks, until the OS gives up on it (hours by default):"
                    " have the pooler probe its clients (PgBouncer: tcp_keepidle, tcp_keepintvl,"
                    " tcp_keepcnt, tcp_user_timeout)", describe_database_url(url), exc)
        return await connect({})


async def create_pool(settings: Settings, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    """Waits for the database at start-up instead of crashing; raises DatabaseMisconfigured at
    once when the database answers that this service may not use it (wrong password or user, no
    such database, no CONNECT on it) or the TLS DATABASE_URL asks for cannot be had
    (DATABASE_MISCONFIGURED), which waiting would not change.

    A statement without an answer for DATABASE_COMMAND_TIMEOUT_S raises TimeoutError (in
    DATABASE_UNAVAILABLE), instead of waiting on a connection the network dropped without a reset
    until the kernel gives up (15 minutes or more). asyncpg then sends a cancel request and, with
    no answer to it either within as long again, drops the connection: the caller sees the error
    once the connection is back in the pool (within about twice the timeout), and the pool makes a
    new connection for the next query. The pool's max_inactive_connection_lifetime (300 s) is no
    help there: it closes only connections left idle that long, and never the min_size ones.

    Every connection, the pool's and connection_outside's, carries server_keepalive_settings();
    where they are refused (a PgBouncer in front), the pool is made without them, with a warning."""
    url = settings.database_url.get_secret_value()

    async def pool(server_settings: dict[str, str]) -> asyncpg.Pool:
        return await asyncpg.create_pool(url, min_size=min_size, max_size=max_size, init=_init_connection,
                                         command_timeout=settings.database_command_timeout_s,
                                         server_settings=server_settings)

    def worth_waiting(exc: BaseException) -> bool:
        return isinstance(exc, (TimeoutError, OSError, asyncpg.PostgresError)) and not isinstance(
            exc, DATABASE_MISCONFIGURED)

    try:
        async for attempt in backoff("PostgreSQL not reachable", worth_waiting):
            with attempt:
                return await with_keepalive_settings(url, pool)
    except Exception as exc:
        if not isinstance(exc, DATABASE_MISCONFIGURED):  # not an `except` clause: some go by content
            raise
        where = describe_database_url(url)
        sqlstate = getattr(exc, "sqlstate", None)
        why = f"SQLSTATE {sqlstate}" if sqlstate else "refused before any SQL: its TLS or connection options"
        log.error("PostgreSQL at %s refuses this service (%s: %s, %s): fix DATABASE_URL;"
                  " not waiting for it", where, type(exc).__name__, exc, why)
        raise DatabaseMisconfigured(f"PostgreSQL at {where} refuses this service: {exc}"
                                    f" ({why}); fix DATABASE_URL") from None
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
# How often a start-up looks again whether another process still applies the migrations.
MIGRATION_LOCK_POLL_S = 1.0
# The first line of a migration that runs outside a transaction, one statement at a time, so that
# it can build an index with CREATE INDEX CONCURRENTLY: a plain CREATE INDEX blocks every write to
# the table for the whole build (minutes, hours on a large one), and the replicas of the version
# before, still serving in a rolling upgrade, would wait all that while. See
# _apply_migration_outside_transaction for what such a migration's statements must bear.
NO_TRANSACTION_MARK = "-- migrate: no-transaction"


INSTALL_PGVECTOR = (
    f"Install pgvector {'.'.join(map(str, PGVECTOR_AT_LEAST))} or later on the database server (Debian/Ubuntu: apt"
    " install postgresql-<version>-pgvector; Docker: the pgvector/pgvector image), or leave DATABASE_URL unset for"
    " `make run`'s embedded PostgreSQL.")
# What a start-up runs where the database's pgvector is older than the server's (see
# _update_outdated_pgvector), and what to run by hand where it may not.
UPDATE_PGVECTOR = "ALTER EXTENSION vector UPDATE"


class MissingPgvector(RuntimeError):
    """The database has no pgvector extension to install, or too old a one."""

    def __init__(self, detail: str, remedy: str = INSTALL_PGVECTOR):
        super().__init__(f"PostgreSQL lacks a usable pgvector extension ({detail}). {remedy}")


# PostgreSQL 14.0 to 14.3: CREATE INDEX CONCURRENTLY (and REINDEX CONCURRENTLY) could miss rows
# updated while the index was built, leaving a corrupt index without a word; fixed in 14.4. The
# migrations marked NO_TRANSACTION_MARK and searchstore.ensure_vector_index build indexes so.
CONCURRENT_INDEX_BUILD_BROKEN = range(140000, 140004)  # server_version_num


class UnsupportedPostgres(RuntimeError):
    """The database server is a PostgreSQL version this service may not use."""


def postgres_version_refused(server_version_num: int) -> str | None:
    """Why the PostgreSQL of `server_version_num` (140003 for 14.3) is refused, None where it is
    not (CONCURRENT_INDEX_BUILD_BROKEN)."""
    if server_version_num in CONCURRENT_INDEX_BUILD_BROKEN:
        major, minor = divmod(server_version_num, 10000)
        return (f"PostgreSQL {major}.{minor} may build a corrupt index with CREATE INDEX CONCURRENTLY (rows updated"
                " during the build can be left out of it), which the migrations and the search indexes use;"
                " fixed in PostgreSQL 14.4: upgrade the server to 14.4 or later (any later minor release of 14,"
                " or a later major version)")
    return None


async def _refuse_unsupported_postgres(conn: asyncpg.Connection) -> None:
    """Raises UnsupportedPostgres where postgres_version_refused refuses the server."""
    refused = postgres_version_refused(int(await conn.fetchval("SELECT current_setting('server_version_num')")))
    if refused is not None:
        unsupported = UnsupportedPostgres(refused)
        log.critical("%s", unsupported)
        raise unsupported


def pgvector_too_old(version: str) -> bool:
    """Whether an installed pgvector version ("0.7.4") is older than PGVECTOR_AT_LEAST."""
    numbers = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    return numbers < PGVECTOR_AT_LEAST


async def apply_migrations(pool: asyncpg.Pool) -> list[str]:
    """Apply every migration not yet applied, each in its own transaction (but those marked
    NO_TRANSACTION_MARK, which run statement by statement). Safe when several services start at
    once: an advisory lock lets one apply while the others wait. Raises UnsupportedPostgres, before
    any, on a server postgres_version_refused refuses, and MissingPgvector without a usable
    pgvector."""
    applied_now = []
    async with pool.acquire() as conn:
        await _refuse_unsupported_postgres(conn)
        await _take_migrations_lock(conn)
        try:
            await _update_outdated_pgvector(conn)
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
                        if _outside_transaction(sql):
                            await _apply_migration_outside_transaction(conn, version, name, sql)
                        else:
                            await _apply_migration(conn, version, name, sql)
                        break
                    except asyncpg.exceptions.LockNotAvailableError:
                        log.warning("migration %s waited %g s for a table another transaction holds (try %d);"
                                    " trying again, so that queries of the running services do not queue behind"
                                    " it meanwhile", name, MIGRATION_LOCK_TIMEOUT_S, attempt)
                        await asyncio.sleep(min(30.0, attempt * MIGRATION_LOCK_TIMEOUT_S))
                log.info("applied migration %s", name)
                applied_now.append(name)
            await _refuse_unusable_pgvector(conn)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", LockKey.MIGRATIONS)
    return applied_now


async def _installed_pgvector(conn: asyncpg.Connection) -> str | None:
    """The version of pgvector installed in this database, None where there is none."""
    return await conn.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'vector'")


async def _available_pgvector(conn: asyncpg.Connection) -> str | None:
    """The server's version of pgvector (what CREATE EXTENSION and ALTER EXTENSION ... UPDATE
    install), None where it has none. (pg_available_extensions reads every extension's control
    file: looked at only where the installed version is too old.)"""
    return await conn.fetchval("SELECT default_version FROM pg_available_extensions WHERE name = 'vector'")


async def _update_outdated_pgvector(conn: asyncpg.Connection) -> None:
    """Bring this database's pgvector up to the server's version where it is older than
    PGVECTOR_AT_LEAST and the server's is recent enough: upgrading the server's pgvector leaves each
    database's extension (its SQL objects, and the version apply_migrations checks) as it was until
    ALTER EXTENSION vector UPDATE runs there. Before the migrations, so that they find it up to date.
    Raises MissingPgvector, naming that statement, where this service may not run it (only the
    extension's owner or a superuser may)."""
    installed = await _installed_pgvector(conn)
    if installed is None or not pgvector_too_old(installed):
        return
    available = await _available_pgvector(conn)
    if available is None or pgvector_too_old(available):
        return  # nothing recent enough to update to: _refuse_unusable_pgvector says what to install
    log.info("pgvector in this database is %s, the server has %s: updating it (%s)", installed, available,
             UPDATE_PGVECTOR)
    try:
        await conn.execute(UPDATE_PGVECTOR)
    except asyncpg.PostgresError as exc:
        if isinstance(exc, DATABASE_UNAVAILABLE):
            raise
        outdated = MissingPgvector(
            f"version {installed} is installed in this database, though the server has {available}, and"
            f" {UPDATE_PGVECTOR} failed: {exc}",
            f"Have the extension's owner or a superuser run `{UPDATE_PGVECTOR}` in this database.")
        log.critical("%s", outdated)
        raise outdated from exc
    log.info("pgvector in this database updated from %s to %s", installed, await _installed_pgvector(conn))


async def _refuse_unusable_pgvector(conn: asyncpg.Connection) -> None:
    """Raises MissingPgvector where this database has no pgvector, or too old a one (where the
    server's is recent enough, _update_outdated_pgvector has updated it already)."""
    installed = await _installed_pgvector(conn)
    if installed is None:
        missing = MissingPgvector("not installed")
    elif pgvector_too_old(installed):
        available = await _available_pgvector(conn)
        missing = MissingPgvector(
            f"version {installed} is installed, and the server has {available or 'none'}",
            f"{INSTALL_PGVECTOR} The next start then updates this database's extension ({UPDATE_PGVECTOR}).")
    else:
        return
    log.critical("%s", missing)
    raise missing


async def _take_migrations_lock(conn: asyncpg.Connection) -> None:
    """The migrations' advisory lock. Another process may be applying them (an index build): wait
    as long as it takes, trying again every MIGRATION_LOCK_POLL_S rather than waiting inside
    pg_advisory_lock. A session waiting in that statement holds a snapshot all the while, and
    CREATE INDEX CONCURRENTLY waits, before it ends, for every snapshot older than its own: the
    build waits for the start-up, which waits for the builder's lock, and PostgreSQL breaks the
    deadlock by failing one of them (the start-up, or the build, left INVALID)."""
    waiting = False
    while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", LockKey.MIGRATIONS):
        if not waiting:
            log.info("another process is applying migrations: waiting for it")
            waiting = True
        await asyncio.sleep(MIGRATION_LOCK_POLL_S)


async def _apply_migration(conn: asyncpg.Connection, version: int, name: str, sql: str) -> None:
    async with conn.transaction():
        # While a migration waits for a table's lock (behind a long transaction of a running
        # replica, in a rolling upgrade), every query of that table queues behind it: it gives up
        # after a while and tries again, letting them through in between.
        await conn.execute(f"SET LOCAL lock_timeout = '{int(MIGRATION_LOCK_TIMEOUT_S * 1000)}ms'")
        # A role's or database's statement_timeout (common on managed PostgreSQL) would cut a long
        # migration short (a table rewritten, an index built over a large table), failing every
        # start; as the pool's command timeout would (LONG_STATEMENT_TIMEOUT_S).
        await conn.execute("SET LOCAL statement_timeout = 0")
        await _execute_migration_sql(conn, sql)
        await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)


async def _execute_migration_sql(conn: asyncpg.Connection, sql: str) -> None:
    try:
        await conn.execute(sql, timeout=LONG_STATEMENT_TIMEOUT_S)  # an index over a big table: minutes, hours
    except asyncpg.exceptions.FeatureNotSupportedError as exc:
        if "vector" not in str(exc):
            raise
        missing = MissingPgvector(str(exc))
        log.critical("%s", missing)
        raise missing from exc


def _outside_transaction(sql: str) -> bool:
    """Whether a migration's first line is NO_TRANSACTION_MARK."""
    first = sql.lstrip().partition("\n")[0]
    return " ".join(first.lower().split()) == NO_TRANSACTION_MARK


_CONCURRENTLY = re.compile(r"\bCONCURRENTLY\b", re.IGNORECASE)
_IDENTIFIER = r'(?:"(?:[^"]|"")+"|[A-Za-z_][\w$]*)'
_INDEX_BUILT = re.compile(rf"^\s*CREATE\s+(?:UNIQUE\s+)?INDEX\s+CONCURRENTLY\s+(?:IF\s+NOT\s+EXISTS\s+)?"
                          rf"({_IDENTIFIER}(?:\.{_IDENTIFIER})?)\s+ON\b", re.IGNORECASE)
_DOLLAR_QUOTE = re.compile(r"\$(?:[A-Za-z_][\w]*)?\$")


def _statements(sql: str) -> list[str]:
    """A migration's statements, without their comments: split at the semicolons outside quoted
    strings and names, dollar quotes and comments. (E'...' strings with a backslash before a quote
    are not told apart: a migration run outside a transaction has none.)"""
    statements: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(sql):
        if sql.startswith("--", i):
            end = sql.find("\n", i)
            i = len(sql) if end < 0 else end
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            i = len(sql) if end < 0 else end + 2
            current.append(" ")
        elif sql[i] in "'\"":
            quote, end = sql[i], i + 1
            while (end := sql.find(quote, end)) >= 0 and sql.startswith(quote * 2, end):
                end += 2  # a doubled quote stands for itself
            end = len(sql) if end < 0 else end + 1
            current.append(sql[i:end])
            i = end
        elif (tag := _DOLLAR_QUOTE.match(sql, i)) is not None:
            end = sql.find(tag.group(), tag.end())
            end = len(sql) if end < 0 else end + len(tag.group())
            current.append(sql[i:end])
            i = end
        elif sql[i] == ";":
            statements.append("".join(current).strip())
            current = []
            i += 1
        else:
            current.append(sql[i])
            i += 1
    statements.append("".join(current).strip())
    return [statement for statement in statements if statement]


async def _index_valid(conn: asyncpg.Connection, name: str) -> bool | None:
    """Whether the index `name` is usable, None when there is none."""
    return await conn.fetchval("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)", name)


async def _apply_migration_outside_transaction(conn: asyncpg.Connection, version: int, name: str, sql: str) -> None:
    """A migration marked NO_TRANSACTION_MARK: each statement on its own, committed as it ends;
    the schema_migrations row once every one has succeeded. A migration interrupted (a pod killed,
    the database gone, a lock_timeout) runs again from its first statement at the next start: each
    must bear running again (CREATE INDEX CONCURRENTLY IF NOT EXISTS, DROP ... IF EXISTS).

    A CONCURRENTLY build cut short or failed leaves its index INVALID (unused by queries, yet kept
    up to date by every write), which IF NOT EXISTS would keep: an index of a name that a statement
    builds CONCURRENTLY is dropped first when it is invalid, and must be valid after it."""
    # A role's statement_timeout would cut a build short too, as the pool's command timeout would
    # (LONG_STATEMENT_TIMEOUT_S below). Both settings are put back after; the pool resets them when
    # the connection goes back after a failure.
    await conn.execute("SET statement_timeout = 0")
    for statement in _statements(sql):
        # lock_timeout as in a transaction's migration (a statement queued for a table's lock
        # makes every query of it queue behind), but not for a CONCURRENTLY one: its lock lets
        # reads and writes through, and the lock_timeout would also cut its wait for every older
        # transaction, failing the build after it read the whole table.
        lock_timeout_ms = 0 if _CONCURRENTLY.search(statement) else int(MIGRATION_LOCK_TIMEOUT_S * 1000)
        await conn.execute(f"SET lock_timeout = {lock_timeout_ms}")
        built = _INDEX_BUILT.match(statement)
        index = built.group(1) if built else None
        if index is not None and await _index_valid(conn, index) is False:
            log.warning("migration %s: index %s was left half built (INVALID): building it again", name, index)
            await conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {index}", timeout=LONG_STATEMENT_TIMEOUT_S)
        await _execute_migration_sql(conn, statement)
        if index is not None and not await _index_valid(conn, index):
            raise RuntimeError(f"migration {name}: index {index} is not valid after it was built")
    await conn.execute("RESET lock_timeout")
    await conn.execute("RESET statement_timeout")
    await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)


async def connection_outside(pool: asyncpg.Pool) -> asyncpg.Connection:
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
            conn = await connection_outside(pool)
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
