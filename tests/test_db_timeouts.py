"""A query on a connection the network dropped without a reset (the database failed over, a NAT or
load balancer forgot the flow) got no answer and waited until the kernel gave up, 15 minutes or
more, with the persister holding its message and ingest's requests hanging. With
DATABASE_COMMAND_TIMEOUT_S it raises an error the services wait out as an outage, and the pool
makes a new connection. Against the tests' real PostgreSQL, reached through a proxy that can stop
forwarding without closing anything (a half-open flow)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import subprocess
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from common import db
from common.settings import Settings
from devstack import pg_admin_url, scratch_database_async
from tests.conftest import database_of_this_machines_postgres

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



async def publish_chunks(bus, job_id: int, chunks: int) -> None:
    """Every chunk of a job of `chunks`, one segment a chunk, as the transcriber hands them in."""
    from common.messages import ChunkTranscribed, Segment

    for chunk_index in range(chunks):
        await bus.publish(ChunkTranscribed(
            job_id=job_id, chunk_index=chunk_index, chunk_count=chunks, duration=float(chunks),
            segments=[Segment(index=0, speaker="spk_0", start_ts=chunk_index, end_ts=chunk_index + 1.0,
                              text="held")]))


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


async def test_a_chunk_waiting_on_a_row_lock_is_handed_back_and_other_stalled_jobs_still_fail(scratch_url,
                                                                                                monkeypatch):
    """A statement that waits on a row another transaction holds (an operator's open psql session)
    fails with TimeoutError after DATABASE_COMMAND_TIMEOUT_S, each try, and is held as an outage.
    Every try ran longer than OUTAGE_OVER_AFTER_S, so each started the outage's clock again: the
    message was never handed back after OUTAGE_HOLD_S, held until the broker's consumer timeout
    took it back and counted a delivery. And each try noted a gap for the stall reaper, as did the
    reaper's own try to fail the locked job when it looked stalled: while the lock lasted, no
    stalled job anywhere was failed. Nor, once the reaper waited on the locked row only for the
    command timeout, was a job that stalled after the lock was taken: every round waited that
    long, the next heartbeat came late, and the gaps it recorded covered the whole time since.
    Nor, with many of the locked job's chunks in hand at once (the persister handles up to 16), while
    they waited on the row for the command timeout: they held every pooled connection, the reaper's
    heartbeat waited behind them, and came late. Now a lock is waited for LOCK_WAIT_S at most, and
    the pool has connections beyond the handlers'. The persister, on the real RabbitMQ and
    PostgreSQL, with the times scaled down."""
    from common import broker, metrics
    from common.broker import connect, declare_topology, open_bus, stage_queue
    from services.persister import __main__ as persister_main
    from services.persister import handler
    from tests.conftest import amqp_url, private_vhost

    stall_timeout_s, grace_s, hold_s = 3.0, 5.0, 2.0
    # Each try waits the command timeout on the lock: longer than OUTAGE_OVER_AFTER_S, as the
    # default 300 s timeout is not shorter than the default 300 s.
    monkeypatch.setattr(broker, "OUTAGE_OVER_AFTER_S", TIMEOUT_S)
    # Shorter than the command timeout, as the default 5 s is than the default 300 s.
    monkeypatch.setattr(handler, "LOCK_WAIT_S", TIMEOUT_S / 2)
    real_reap = handler.reap_stalled_jobs
    monkeypatch.setattr(handler, "reap_stalled_jobs",
                        lambda pool, timeout_s, missed: real_reap(pool, timeout_s, missed, grace_s))
    monkeypatch.setattr(persister_main, "setup_logging", lambda level: None)  # pytest's handlers stay
    # What the persister opens, closed after it (cancelled, main() leaves them open).
    opened: list = []

    async def opening(open_it, *args, **kwargs):
        opened.append(await open_it(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(persister_main, "create_pool", lambda *a, **kw: opening(db.create_pool, *a, **kw))
    monkeypatch.setattr(persister_main, "connect", lambda *a, **kw: opening(connect, *a, **kw))
    handed_back = metrics.MESSAGES.labels("persister", stage_queue("persister"), "handed_back")
    conn = await asyncpg.connect(scratch_url)
    holder = await asyncpg.connect(scratch_url)
    with private_vhost() as vhost:
        settings = Settings(_env_file=None, amqp_url=amqp_url(vhost), database_url=scratch_url,
                            database_command_timeout_s=2 * TIMEOUT_S, outage_hold_s=hold_s,
                            job_stall_timeout_s=stall_timeout_s, metrics_port=0, retry_delays_s="1,2")
        monkeypatch.setattr(persister_main, "get_settings", lambda: settings)
        connection = await connect(settings, "test-row-lock")
        persister = None
        try:
            pool = await db.create_pool(settings, max_size=1)
            await db.apply_migrations(pool)
            await pool.close()
            await declare_topology(connection, settings)
            # Both had not moved for a little less than the stall timeout when the persister started.
            await conn.execute("UPDATE stall_reaper_heartbeat SET at = now()")
            locked, stalled = [await conn.fetchval(
                "INSERT INTO transcripts (filename, updated_at) VALUES ($1, now() - make_interval(secs => $2))"
                " RETURNING id", name, stall_timeout_s - 0.5) for name in ("locked.wav", "stalled.wav")]
            holding = holder.transaction()
            await holding.start()
            await holder.execute("SELECT 1 FROM transcripts WHERE id = $1 FOR UPDATE", locked)

            before = handed_back._value.get()
            started = time.monotonic()
            persister = asyncio.create_task(persister_main.main())
            bus = await open_bus(connection, settings)
            # More of the locked job's chunks than the pool held connections before the fix.
            chunks = 12
            await publish_chunks(bus, locked, chunks)

            # Two tries of 2 s and the wait between them; without the fix never.
            handed_back_within_s = 20.0
            while handed_back._value.get() == before:
                assert not persister.done(), persister
                if time.monotonic() - started > handed_back_within_s:
                    pytest.fail(f"the chunk waiting on a locked row was not handed back within"
                                f" {handed_back_within_s:g} s (OUTAGE_HOLD_S={hold_s:g})")
                await asyncio.sleep(0.2)

            # The stall timeout and a round or two (the reaper skips the locked job); without the
            # fix, never while the lock lasts.
            failed_within_s = 30.0
            while await conn.fetchval("SELECT status FROM transcripts WHERE id = $1", stalled) != "error":
                assert not persister.done(), persister
                if time.monotonic() - started > failed_within_s:
                    pytest.fail(f"a stalled job was not failed within {failed_within_s:g} s while another"
                                " job's row was locked")
                await asyncio.sleep(0.2)

            # A job that moves now, with the lock held for a while already, and then no more.
            later = await conn.fetchval("INSERT INTO transcripts (filename) VALUES ('later.wav') RETURNING id")
            moved = time.monotonic()
            # The stall timeout and a round or two; without the fix never while the lock lasts (the
            # reaper's round waited on the locked row for the command timeout, longer than
            # ROUNDS_MISSED_FOR_A_GAP rounds, and each late heartbeat recorded a gap).
            later_failed_within_s = stall_timeout_s + 20.0
            while await conn.fetchval("SELECT status FROM transcripts WHERE id = $1", later) != "error":
                assert not persister.done(), persister
                if time.monotonic() - moved > later_failed_within_s:
                    pytest.fail(f"a job that stalled after another job's row was locked was not failed within"
                                f" {later_failed_within_s:g} s while the lock lasted")
                await asyncio.sleep(0.2)
            assert await conn.fetchval("SELECT status FROM transcripts WHERE id = $1", locked) == "processing"
        finally:
            if persister is not None:
                persister.cancel()
                await asyncio.gather(persister, return_exceptions=True)
            for resource in opened:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(resource.close(), 10)
            await holder.close()
            await conn.close()
            await connection.close()


async def test_one_replicas_database_errors_and_restarts_do_not_keep_a_stuck_job_from_failing(scratch_url,
                                                                                                monkeypatch):
    """One persister replica whose handlers keep losing their connection (here terminated while
    they wait on a locked row; in production a dropped pooled connection, too many connections),
    and that restarts every few seconds, while another replica's stall reaper beats all along: the
    database is up, and the other replica stores. Each handler's error, and each start, made the
    next reaper round record a gap, joined to the one before within the grace after it: one gap
    that never ended, and a stuck job was never failed. The persister, on the real RabbitMQ and
    PostgreSQL, with the times scaled down."""
    from common.broker import connect, declare_topology, open_bus
    from services.persister import __main__ as persister_main
    from services.persister import handler
    from tests.conftest import amqp_url, private_vhost

    stall_timeout_s, grace_s, restart_every_s = 3.0, 3.0, 2.5
    real_reap = handler.reap_stalled_jobs
    monkeypatch.setattr(handler, "reap_stalled_jobs",
                        lambda pool, timeout_s, missed: real_reap(pool, timeout_s, missed, grace_s))
    monkeypatch.setattr(persister_main, "setup_logging", lambda level: None)  # pytest's handlers stay
    opened: list = []  # what the running persister opened, closed as it is stopped

    async def opening(open_it, *args, **kwargs):
        opened.append(await open_it(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(persister_main, "create_pool", lambda *a, **kw: opening(db.create_pool, *a, **kw))
    monkeypatch.setattr(persister_main, "connect", lambda *a, **kw: opening(connect, *a, **kw))
    conn = await asyncpg.connect(scratch_url)
    holder = await asyncpg.connect(scratch_url)
    dropper = await asyncpg.connect(scratch_url)
    with private_vhost() as vhost:
        settings = Settings(_env_file=None, amqp_url=amqp_url(vhost), database_url=scratch_url,
                            outage_hold_s=1.0, job_stall_timeout_s=stall_timeout_s, metrics_port=0)
        monkeypatch.setattr(persister_main, "get_settings", lambda: settings)
        connection = await connect(settings, "test-one-replica")
        other_replica = await db.create_pool(settings, max_size=2)
        persister = None
        background: list[asyncio.Task] = []

        async def stop_persister() -> None:
            persister.cancel()
            await asyncio.gather(persister, return_exceptions=True)
            for resource in opened:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(resource.close(), 10)
            opened.clear()

        async def other_replica_beats() -> None:
            missed = handler.DatabaseMissed()
            while True:
                await real_reap(other_replica, stall_timeout_s, missed, grace_s)
                await asyncio.sleep(handler.reaper_round_s(stall_timeout_s))

        terminated = 0

        async def connections_dropped() -> None:
            # Those of the handlers waiting on the locked row, and no other.
            nonlocal terminated
            while True:
                terminated += await dropper.fetchval(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND $1 = ANY(pg_blocking_pids(pid))", holder.get_server_pid())
                await asyncio.sleep(0.2)

        try:
            await db.apply_migrations(other_replica)
            await declare_topology(connection, settings)
            await conn.execute("UPDATE stall_reaper_heartbeat SET at = now()")
            background.append(asyncio.create_task(other_replica_beats()))
            locked = await conn.fetchval("INSERT INTO transcripts (filename) VALUES ('locked.wav') RETURNING id")
            holding = holder.transaction()
            await holding.start()
            await holder.execute("SELECT 1 FROM transcripts WHERE id = $1 FOR UPDATE", locked)
            bus = await open_bus(connection, settings)
            chunks = 4
            await publish_chunks(bus, locked, chunks)
            background.append(asyncio.create_task(connections_dropped()))

            started = time.monotonic()
            persister = asyncio.create_task(persister_main.main())
            restarted = started
            # Its last progress as the errors and the restarts begin.
            stuck = await conn.fetchval("INSERT INTO transcripts (filename) VALUES ('stuck.wav') RETURNING id")
            # The stall timeout and a round or two; without the fix never, while the errors and the
            # restarts go on.
            failed_within_s = stall_timeout_s + 12.0
            while await conn.fetchval("SELECT status FROM transcripts WHERE id = $1", stuck) != "error":
                assert not persister.done(), persister
                if time.monotonic() - started > failed_within_s:
                    pytest.fail(f"a stuck job was not failed within {failed_within_s:g} s while one replica"
                                f" had database errors ({terminated} connections dropped) and restarted")
                if time.monotonic() - restarted > restart_every_s:
                    await stop_persister()
                    persister = asyncio.create_task(persister_main.main())
                    restarted = time.monotonic()
                await asyncio.sleep(0.2)
            assert terminated > 0, "no handler lost its connection: the errors were not made"
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            if persister is not None:
                await stop_persister()
            await other_replica.close()
            await dropper.close()
            await holder.close()
            await conn.close()
            await connection.close()


async def _session_settings(conn: asyncpg.Connection) -> dict[str, tuple[str, str]]:
    """The keepalive settings a session started with (reset_val, which SHOW gives too over TCP; a
    Unix socket's session shows 0), and where each came from."""
    return {r["name"]: (r["reset_val"], r["source"]) for r in await conn.fetch(
        "SELECT name, reset_val, source FROM pg_settings WHERE name = ANY($1::text[])",
        list(db.server_keepalive_settings()))}


async def test_every_connection_asks_the_server_to_notice_a_client_that_vanished(scratch_url):
    """A service's session holding an advisory lock (the outbox flusher's, while it publishes)
    on a host that vanished kept it until the server's OS gave up on the peer: 2 h 11 min by
    default, no job.submitted leaving the outbox meanwhile. Every connection of the services now
    starts with keepalive settings of about a minute: the pool's, still after the pool's reset
    (RESET ALL) as one goes back, and connection_outside's (`every`'s turns, a reindex run)."""
    wanted = {name: (value, "client") for name, value in db.server_keepalive_settings().items()}
    assert wanted["tcp_keepalives_idle"][0] == str(db.SERVER_TCP_KEEPALIVES_IDLE_S)
    pool = await db.create_pool(Settings(_env_file=None, database_url=scratch_url), min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            assert await _session_settings(conn) == wanted
            await conn.execute("SET tcp_keepalives_idle = 7200")
        async with pool.acquire() as conn:  # the same connection, reset
            assert await _session_settings(conn) == wanted
        outside = await db.connection_outside(pool)
        try:
            assert await _session_settings(outside) == wanted
        finally:
            await outside.close()
    finally:
        await pool.close()


def _tcp(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or (urllib.parse.parse_qs(parts.query).get("host") or [""])[0]
    return bool(host) and not host.startswith("/")


TCP_REPAIR = 19  # linux/tcp.h: a socket closed in repair mode goes without a FIN or a reset


@contextlib.asynccontextmanager
async def database_over_tcp(scratch_url: str) -> AsyncIterator[str]:
    """A scratch database reached over TCP: the tests' own when it is, else one of a PostgreSQL on
    127.0.0.1:5432 (this machine's, and CI's), dropped afterwards."""
    if _tcp(scratch_url):
        yield scratch_url
        return
    async with database_of_this_machines_postgres("stt_keepalive") as (_, url):
        yield url


async def test_an_advisory_lock_of_a_client_that_vanished_is_freed_within_the_keepalive(scratch_url, monkeypatch):
    """The outbox flusher's lock, held by a pooled connection whose client then vanishes without a
    word (here its socket closed in TCP repair mode, as by a host that rebooted: nothing is sent,
    and the server hears of it only when it probes). Without the keepalive settings the server
    probes after the OS's 2 hours: the lock stayed taken, and no other flusher could publish. With
    them (scaled down here), it is free within a few seconds. Needs a PostgreSQL over TCP and
    CAP_NET_ADMIN (root); skipped otherwise."""
    async with database_over_tcp(scratch_url) as url:
        await _vanished_clients_lock_is_freed(url, monkeypatch)


async def _vanished_clients_lock_is_freed(scratch_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    idle_s, interval_s, count = 1, 1, 2
    monkeypatch.setattr(db, "SERVER_TCP_KEEPALIVES_IDLE_S", idle_s)
    monkeypatch.setattr(db, "SERVER_TCP_KEEPALIVES_INTERVAL_S", interval_s)
    monkeypatch.setattr(db, "SERVER_TCP_KEEPALIVES_COUNT", count)
    monkeypatch.setattr(db, "SERVER_TCP_USER_TIMEOUT_MS", (idle_s + interval_s * count) * 1000)
    freed_within_s = idle_s + interval_s * count + 5.0
    observer = await asyncpg.connect(scratch_url)
    pool = await db.create_pool(Settings(_env_file=None, database_url=scratch_url), min_size=1, max_size=1)
    try:
        conn = await pool.acquire()
        assert await conn.fetchval("SELECT pg_try_advisory_lock($1)", db.LockKey.OUTBOX)
        # Until the client has acknowledged every answer (a delayed ACK): what the server still
        # had in flight would be sent again to the socket gone, and reset at once.
        await asyncio.sleep(1.0)
        sock = conn._transport.get_extra_info("socket")  # asyncpg's own (there is no public way)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
        except PermissionError:
            pytest.skip("TCP repair mode needs CAP_NET_ADMIN")
        conn._transport.abort()  # closes the socket, in repair mode silently (terminate() says goodbye first)
        started = time.monotonic()
        while not await observer.fetchval("SELECT pg_try_advisory_lock($1)", db.LockKey.OUTBOX):
            if time.monotonic() - started > freed_within_s:
                pytest.fail(f"the advisory lock of a vanished client was still held after {freed_within_s:g} s")
            await asyncio.sleep(0.2)
    finally:
        pool.terminate()
        await observer.close()


class RefusingPooler(FreezableProxy):
    """A connection pooler in front of PostgreSQL that refuses a startup parameter it does not
    know, as PgBouncer does unless its ignore_startup_parameters names it (its very answer: an
    ErrorResponse, SQLSTATE 08P01, and the connection closed); others it forwards."""

    REFUSED = "tcp_keepalives_idle"

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        length = int.from_bytes(await client_reader.readexactly(4), "big")
        startup = await client_reader.readexactly(length - 4)
        if f"\0{self.REFUSED}\0".encode() in b"\0" + startup[4:]:
            fields = b"".join(kind + text.encode() + b"\0" for kind, text in (
                (b"S", "FATAL"), (b"V", "FATAL"), (b"C", "08P01"),
                (b"M", f"unsupported startup parameter: {self.REFUSED}"))) + b"\0"
            client_writer.write(b"E" + (len(fields) + 4).to_bytes(4, "big") + fields)
            await client_writer.drain()
            client_writer.close()
            return
        server_reader, server_writer = await self.upstream()
        server_writer.write(length.to_bytes(4, "big") + startup)
        flowing = asyncio.Event()
        flowing.set()
        self.writers += [client_writer, server_writer]
        for reader, writer in ((client_reader, server_writer), (server_reader, client_writer)):
            self.tasks.add(asyncio.create_task(self._pump(reader, writer, flowing)))


async def test_a_pooler_that_refuses_the_keepalive_settings_is_connected_to_without_them(caplog):
    """PgBouncer, which the README offers in front of PostgreSQL, refuses startup parameters it
    does not know: with the keepalive settings, every connection was refused, and each service
    waited at start-up for ever. Where they are refused, the pool is made without them (the
    pooler's own keepalive settings stand in), with a warning saying so."""
    admin = pg_admin_url()
    async with RefusingPooler(_upstream(admin)) as pooler:
        settings = Settings(_env_file=None, database_url=_through(pooler, admin))
        outcome = await _within(HANGS_S, db.create_pool(settings, min_size=1, max_size=1))
        if outcome is None:
            pytest.fail(f"no pool through a pooler that refuses the keepalive settings after {HANGS_S:g} s")
        pool, _ = outcome
        assert isinstance(pool, asyncpg.Pool), repr(pool)
        try:
            assert await pool.fetchval("SELECT 1") == 1
            assert "refuses the keepalive settings" in caplog.text
        finally:
            await pool.close()


async def _refused_at_start(url: str) -> BaseException:
    """What create_pool, as each service calls it at start, raises for `url`, within a few seconds
    (waiting it out as an outage would not end: it fails the test)."""
    started = time.monotonic()
    try:
        await asyncio.wait_for(db.create_pool(Settings(_env_file=None, database_url=url), min_size=1, max_size=1),
                               10)
    except TimeoutError:
        pytest.fail(f"create_pool still waited for {db.describe_database_url(url)} after 10 s, as for an outage")
    except Exception as exc:  # noqa: BLE001 (which one is asserted by the caller)
        assert time.monotonic() - started < 8
        return exc
    pytest.fail("create_pool connected")


async def test_a_role_without_connect_or_a_tls_the_server_lacks_stops_the_start_with_the_reason():
    """A role the database refuses CONNECT to (42501, "permission denied for database"), and
    sslmode=require against a server with ssl off (asyncpg: a ConnectionError, "rejected SSL
    upgrade"), were waited for as an outage: a warning every 15 s and a process that looked alive,
    for ever. Against this machine's PostgreSQL on 127.0.0.1:5432 (trust authentication)."""
    async with database_of_this_machines_postgres("stt_noconnect") as (admin, url):
        database = urllib.parse.urlsplit(url).path.lstrip("/")
        role = f"{database}_role"
        await admin.execute(f"CREATE ROLE {role} LOGIN")
        try:
            await admin.execute(f"REVOKE CONNECT ON DATABASE {database} FROM PUBLIC")
            refused = await _refused_at_start(url.replace("//postgres@", f"//{role}@"))
            assert isinstance(refused, db.DatabaseMisconfigured), repr(refused)
            assert "42501" in str(refused) and database in str(refused), str(refused)
        finally:
            await admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
            await admin.execute(f"DROP ROLE IF EXISTS {role}")
        if await admin.fetchval("SHOW ssl") == "on":
            pytest.skip("this PostgreSQL has ssl on: sslmode=require is not refused")
        refused = await _refused_at_start(url.replace(database, "postgres") + "?sslmode=require")
        assert isinstance(refused, db.DatabaseMisconfigured), repr(refused)
        assert "SSL" in str(refused) and "DATABASE_URL" in str(refused), str(refused)


class TlsPooler(FreezableProxy):
    """A connection pooler in front of PostgreSQL that ends the clients' TLS itself (as PgBouncer
    with client_tls_sslmode does), with `certificate`, and forwards the session in the clear. While
    `cut` is AFTER_THE_S or MID_HANDSHAKE, it goes away as a server restarting does instead: it
    closes the client's socket right after answering the SSL request with S, or once it has sent
    half of its answer to the client's hello (`cut_off` counts those connections)."""

    SSL_REQUEST = (8).to_bytes(4, "big") + (80877103).to_bytes(4, "big")
    AFTER_THE_S = "right after its S"
    MID_HANDSHAKE = "partway into the TLS handshake"

    def __init__(self, upstream: Opener, certificate: Path, key: Path):
        super().__init__(upstream)
        self.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.tls.load_cert_chain(certificate, key)
        self.cut: str | None = None
        self.cut_off = 0

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.writers.append(client_writer)
        with contextlib.suppress(ConnectionError, OSError, asyncio.IncompleteReadError):
            if await client_reader.readexactly(8) != self.SSL_REQUEST:
                client_writer.close()
                return
            client_writer.write(b"S")
            await client_writer.drain()
            if self.cut is not None:
                await self._go_away(client_reader, client_writer, self.cut)
                return
            await client_writer.start_tls(self.tls)
            await super()._serve(client_reader, client_writer)

    async def _go_away(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter,
                       where: str) -> None:
        if where == self.MID_HANDSHAKE:
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            handshake = self.tls.wrap_bio(incoming, outgoing, server_side=True)
            while not outgoing.pending and (hello := await client_reader.read(65536)):
                incoming.write(hello)
                with contextlib.suppress(ssl.SSLWantReadError):
                    handshake.do_handshake()
            answer = outgoing.read()  # ServerHello, the certificate...: half of it, then gone
            assert answer, "the client sent no TLS hello"
            client_writer.write(answer[: len(answer) // 2])
            await client_writer.drain()
        client_writer.close()
        self.cut_off += 1


def _self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA) and its key."""
    certificate, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(certificate)],
                   check=True, capture_output=True)
    return certificate, key


# How long the pooler cuts every handshake off: create_pool's first try and the one after its first
# backoff (1 s) are cut off; the next (2 s later) finds the pooler behaving.
CUT_OFF_FOR_S = 2.5


async def _lost_handshakes_are_waited_for(pooler: TlsPooler, url: str, where: str) -> None:
    """create_pool for `url` while `pooler` cuts every handshake off at `where`: still waiting
    (not raising DatabaseMisconfigured) after CUT_OFF_FOR_S, having tried again; and connected soon
    after the pooler behaves again."""
    pooler.cut, before = where, pooler.cut_off
    starting = asyncio.ensure_future(db.create_pool(Settings(_env_file=None, database_url=url), min_size=1,
                                                    max_size=1))
    try:
        done, _ = await asyncio.wait({starting}, timeout=CUT_OFF_FOR_S)
        if done:
            ended = starting.exception() or starting.result()
            if isinstance(ended, asyncpg.Pool):
                await ended.close()
            pytest.fail(f"with the TLS handshake cut off {where}, create_pool did not wait it out as an"
                        f" outage: it ended within {CUT_OFF_FOR_S:g} s with {ended!r}")
        assert pooler.cut_off - before >= 2, (where, pooler.cut_off - before)  # a try, and another after it
        pooler.cut = None
        pool = await asyncio.wait_for(starting, 10)
    finally:
        pooler.cut = None
        if not starting.done():
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
    try:
        assert await pool.fetchval("SELECT 1") == 1
    finally:
        await pool.close()


async def test_a_certificate_that_does_not_verify_stops_the_start_and_a_lost_handshake_is_waited_for(tmp_path):
    """sslmode=verify-full with a CA that did not sign the server's certificate fails the handshake
    with ssl.SSLCertVerificationError, an OSError that create_pool waited out as an outage, for
    ever. Through a pooler ending TLS in front of the tests' real PostgreSQL (which has none of its
    own to try): with the CA that signed its certificate the pool connects; with another, the
    start stops with the reason. A handshake the server cuts off by going away (the pooler closing
    the socket right after its S, or halfway through its answer to the client's hello), as in a
    restart, stays an outage: create_pool keeps trying, and connects once the server is back."""
    server_certificate, server_key = _self_signed(tmp_path, "pooler")
    other_ca, _ = _self_signed(tmp_path, "another-ca")
    admin = pg_admin_url()
    async with TlsPooler(_upstream(admin), server_certificate, server_key) as pooler:
        plain = _through(pooler, admin).removesuffix("?sslmode=disable")
        verified = f"{plain}?sslmode=verify-full&sslrootcert={server_certificate}"
        pool = await asyncio.wait_for(db.create_pool(Settings(_env_file=None, database_url=verified),
                                                     min_size=1, max_size=1), 10)
        try:
            assert await pool.fetchval("SELECT 1") == 1
        finally:
            await pool.close()
        for where in (TlsPooler.AFTER_THE_S, TlsPooler.MID_HANDSHAKE):
            await _lost_handshakes_are_waited_for(pooler, verified, where)
        refused = await _refused_at_start(f"{plain}?sslmode=verify-full&sslrootcert={other_ca}")
        assert isinstance(refused, db.DatabaseMisconfigured), repr(refused)
        assert "certificate verify failed" in str(refused) and "DATABASE_URL" in str(refused), str(refused)
    assert not isinstance(ConnectionRefusedError(111, "Connection refused"), db.DATABASE_MISCONFIGURED)
