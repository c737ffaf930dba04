"""A query on a connection the network dropped without a reset (the database failed over, a NAT or
load balancer forgot the flow) got no answer and waited until the kernel gave up, 15 minutes or
more, with the persister holding its message and ingest's requests hanging. With
DATABASE_COMMAND_TIMEOUT_S it raises an error the services wait out as an outage, and the pool
makes a new connection. Against the tests' real PostgreSQL, reached through a proxy that can stop
forwarding without closing anything (a half-open flow)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest

from common import db
from common.settings import Settings
from devstack import pg_admin_url, scratch_database_async

TIMEOUT_S = 1.0
# A query the fix lets through waits the timeout, then as long again for asyncpg's cancel request
# to go unanswered before the connection is dropped and the error reaches the caller.
ANSWERED_WITHIN_S = 2 * TIMEOUT_S + 2.0
# Without the fix the query is still waiting after this long (it would for ever: the proxy keeps
# both sockets open, and the kernel has nothing to give up on).
HANGS_S = 10 * TIMEOUT_S

Opener = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


def _upstream(url: str) -> Opener:
    """Opens a connection to the PostgreSQL of `url` (TCP, or a local server's Unix socket)."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qs(parts.query)
    host = parts.hostname or (query.get("host") or [""])[0] or "127.0.0.1"
    port = parts.port or int((query.get("port") or ["5432"])[0])
    if host.startswith("/"):
        return lambda: asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
    return lambda: asyncio.open_connection(host, port)


class FreezableProxy:
    """Forwards TCP connections to PostgreSQL byte for byte. freeze() stops every flow open at
    the time, both ways, closing neither socket: what a dropped flow looks like to both ends.
    Connections made later are forwarded (the database is reachable again, as after a failover)."""

    def __init__(self, upstream: Opener):
        self.upstream = upstream
        self.flows: list[asyncio.Event] = []  # set while the flow forwards
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Task] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> FreezableProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.server.close()
        for task in self.tasks:
            task.cancel()
        for writer in self.writers:
            writer.close()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def freeze(self) -> None:
        for flowing in self.flows:
            flowing.clear()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await self.upstream()
        flowing = asyncio.Event()
        flowing.set()
        self.flows.append(flowing)
        self.writers += [client_writer, server_writer]
        for reader, writer in ((client_reader, server_writer), (server_reader, client_writer)):
            task = asyncio.create_task(self._pump(reader, writer, flowing))
            self.tasks.add(task)

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flowing: asyncio.Event) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                await flowing.wait()  # frozen: what comes is kept, not passed on
                writer.write(data)
                await writer.drain()
            if flowing.is_set():  # a frozen flow passes no end on either
                writer.close()


def _through(proxy: FreezableProxy, url: str) -> str:
    """`url`'s database, user and password, reached through `proxy`."""
    parts = urllib.parse.urlsplit(url)
    auth = f"{urllib.parse.quote(parts.username or 'postgres')}"
    auth += f":{urllib.parse.quote(parts.password)}" if parts.password else ""
    database = parts.path.lstrip("/") or "postgres"
    return f"postgresql://{auth}@127.0.0.1:{proxy.port}/{database}?sslmode=disable"


async def _outcome(query: Awaitable[object]) -> tuple[object, float]:
    """What the query returned or raised, and how long it took."""
    started = time.monotonic()
    try:
        result: object = await query
    except Exception as exc:  # noqa: BLE001 (what it raised is the point)
        result = exc
    return result, time.monotonic() - started


async def _within(seconds: float, query: Awaitable[object]) -> tuple[object, float] | None:
    """_outcome, or None when the query has not ended after `seconds`. Not asyncio.wait_for: a
    cancelled query on a connection without an answer waits for ever to hand the connection back
    (until the pool is terminated), and wait_for would wait for it."""
    task = asyncio.ensure_future(_outcome(query))
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if done:
        return task.result()
    task.cancel()  # ends once the test's finally terminates the pool
    return None


async def test_a_query_on_a_half_open_connection_fails_as_an_outage_and_the_pool_connects_again():
    """The query waited for ever: no answer came, and no reset either. Now it raises within about
    twice DATABASE_COMMAND_TIMEOUT_S an error in DATABASE_UNAVAILABLE (held, no retry spent), and
    the same pool (of one connection) answers the next query on a new connection, the frozen one
    dropped rather than handed out again."""
    admin = pg_admin_url()
    async with FreezableProxy(_upstream(admin)) as proxy:
        settings = Settings(database_url=_through(proxy, admin), database_command_timeout_s=TIMEOUT_S)
        pool = await db.create_pool(settings, min_size=1, max_size=1)
        try:
            assert await pool.fetchval("SELECT 1") == 1
            proxy.freeze()
            outcome = await _within(HANGS_S, pool.fetchval("SELECT 2"))
            if outcome is None:
                pytest.fail(f"a query on a half-open connection still waited after {HANGS_S:g} s"
                            f" (DATABASE_COMMAND_TIMEOUT_S={TIMEOUT_S:g})")
            failed, took = outcome
            assert isinstance(failed, BaseException), failed
            assert isinstance(failed, db.DATABASE_UNAVAILABLE), repr(failed)
            assert TIMEOUT_S * 0.9 <= took <= ANSWERED_WITHIN_S, took

            answer, took = await _within(HANGS_S, pool.fetchval("SELECT 3")) or (None, HANGS_S)
            assert answer == 3, repr(answer)
            assert took < TIMEOUT_S, took
        finally:
            pool.terminate()


@pytest.fixture
async def scratch_url() -> AsyncIterator[str]:
    async with scratch_database_async("stt_timeouts") as url:
        yield url


async def test_migrations_are_not_cut_short_by_the_command_timeout(scratch_url):
    """A migration (an index over a big table), or the wait for another service applying them,
    may rightly take longer than DATABASE_COMMAND_TIMEOUT_S: cut short, the start would fail, and
    an index build begin again at every start. Here another process holds the migrations' lock for
    a few times the timeout."""
    settings = Settings(database_url=scratch_url, database_command_timeout_s=TIMEOUT_S)
    other = await asyncpg.connect(scratch_url)
    pool = await db.create_pool(settings, min_size=1, max_size=2)
    try:
        await other.execute("SELECT pg_advisory_lock($1)", db.LockKey.MIGRATIONS)
        applying = asyncio.create_task(db.apply_migrations(pool))
        await asyncio.sleep(3 * TIMEOUT_S)
        assert not applying.done(), applying
        await other.execute("SELECT pg_advisory_unlock($1)", db.LockKey.MIGRATIONS)
        assert await asyncio.wait_for(applying, 300)
        assert await pool.fetchval("SELECT count(*) FROM schema_migrations") > 0
    finally:
        await other.close()
        await pool.close()
