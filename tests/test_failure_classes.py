"""What counts as a dependency being away (held, no retry spent) and what as the job's own error
(retried, then the job fails with a category): against the tests' real PostgreSQL, with errors it
and asyncpg raise for real."""

from __future__ import annotations

import asyncio
import errno
import logging
import time
import types
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from pydantic import ValidationError

from common import broker, db, metrics
from common.failures import failure_category
from common.messages import ChunkEmbedded, ChunkTranscribed, JobFailed, JobProgress, Segment
from common.settings import Settings
from devstack import free_port, migrated_database, pg_admin_url, with_database


@pytest.fixture(scope="module")
async def database() -> AsyncIterator[str]:
    """A database of its own, every migration applied; its URL."""
    async with migrated_database("stt_failures") as url:
        yield url


async def raised(conn: asyncpg.Connection, sql: str, *args) -> BaseException:
    try:
        await conn.execute(sql, *args)
    except Exception as exc:  # noqa: BLE001 (what it raised is the point)
        return exc
    raise AssertionError(f"{sql} raised nothing")


def held(exc: BaseException) -> bool:
    """Whether the persister and the notifier hold a message through this error (their wait_on)."""
    return isinstance(exc, db.DATABASE_UNAVAILABLE)


async def test_a_statement_asyncpg_refuses_to_send_fails_the_job_instead_of_being_held_for_ever(database):
    """A statement given more arguments than it has ($n) made asyncpg raise an InterfaceError, which
    was held as a database outage: handed back every OUTAGE_HOLD_S for ever, the job never failed.
    It is the job's error: raised at once, as any other error. (A value asyncpg cannot send, an
    int32 out of range, it raises as PostgreSQL's DataError, 22000: the job's error already.)"""
    conn = await asyncpg.connect(database)
    try:
        one_too_many = await raised(conn, "UPDATE transcripts SET chunk_count = $1 WHERE id = $2", 1, 2, 3)
        too_big = await raised(conn, "UPDATE transcripts SET chunk_count = $1 WHERE id = 0", 3_000_000_000)
    finally:
        await conn.close()
    assert type(one_too_many) is asyncpg.InterfaceError and "3 were passed" in str(one_too_many), repr(one_too_many)
    assert isinstance(too_big, asyncpg.PostgresError) and too_big.sqlstate == "22000", repr(too_big)
    for exc in (one_too_many, too_big):
        assert not isinstance(exc, db.DATABASE_UNAVAILABLE) and not held(exc), repr(exc)
    assert failure_category(one_too_many) == "internal error (database client)"
    assert failure_category(too_big) == "the database refused the data (SQLSTATE 22000)"

    # In the consumer's loop: raised at once, not held for the outage's length.
    work = types.SimpleNamespace(stage="persister", new_attempt=lambda: None)

    async def store(_message) -> None:
        conn = await asyncpg.connect(database)
        try:
            await conn.execute("UPDATE transcripts SET chunk_count = $1 WHERE id = $2", 1, 2, 3)
        finally:
            await conn.close()

    started = time.monotonic()
    with pytest.raises(asyncpg.InterfaceError):
        await broker._run_waiting_out_outages(store, None, None, (*broker.BROKER_UNAVAILABLE, *db.DATABASE_UNAVAILABLE),
                                              work, hold_s=20.0)
    assert time.monotonic() - started < 5


def test_a_chunk_count_no_column_can_hold_is_refused_as_the_message_is_read():
    """The bad number is told where the message is read (the job fails with an invalid-message
    reason), not by asyncpg halfway through the persister's transaction."""
    with pytest.raises(ValidationError, match="chunk_count"):
        JobProgress.model_validate_json('{"job_id": 1, "stage": "transcribing", "chunk_count": 3000000000}')
    with pytest.raises(ValidationError, match="index"):
        Segment.model_validate({"index": 2**31, "speaker": "spk_0", "start_ts": 0, "end_ts": 1, "text": "hi"})
    assert JobProgress(job_id=1, stage="transcribing", chunk_count=12).chunk_count == 12


async def test_a_database_that_is_not_there_is_waited_out(database, tmp_path):
    """What asyncpg raises while the server is down or going away stays an outage: nothing listens
    on the port (refused), a local server's Unix socket is not there, a connection closed under
    the handler, a pool closing as the process stops."""
    port = free_port()
    refused = await raised_by_connect(host="127.0.0.1", port=port)
    no_socket = await raised_by_connect(host=str(tmp_path), port=port)
    assert isinstance(refused, ConnectionRefusedError) and refused.errno == errno.ECONNREFUSED, repr(refused)
    assert isinstance(no_socket, FileNotFoundError), repr(no_socket)
    for exc in (refused, no_socket):
        assert isinstance(exc, db.DATABASE_UNAVAILABLE) and held(exc), repr(exc)
        assert failure_category(exc) == "a service it depends on was unreachable"

    conn = await asyncpg.connect(database)
    await conn.close()
    closed = await raised(conn, "SELECT 1")
    pool = await asyncpg.create_pool(database, min_size=1, max_size=1)
    await pool.close()
    try:
        await pool.acquire()
    except asyncpg.InterfaceError as exc:
        pool_closed = exc
    assert "connection is closed" in str(closed) and "pool is clos" in str(pool_closed)
    for exc in (closed, pool_closed):
        assert held(exc), repr(exc)
        assert failure_category(exc) == "database unavailable"

    # Without a type of their own: a host that cannot be routed to, and every address of a host
    # refusing (asyncio's combined error, as for "localhost" with both ::1 and 127.0.0.1).
    for exc in (OSError(errno.EHOSTUNREACH, "No route to host"),
                OSError("Multiple exceptions: [Errno 111] Connect call failed ('::1', 5432, 0, 0), "
                        "[Errno 111] Connect call failed ('127.0.0.1', 5432)")):
        assert held(exc), repr(exc)
        assert failure_category(exc) == "a service it depends on was unreachable"


async def raised_by_connect(**where) -> BaseException:
    try:
        await asyncpg.connect(user="postgres", database="postgres", timeout=10, **where)
    except Exception as exc:  # noqa: BLE001
        return exc
    raise AssertionError(f"connected to {where}")


def test_local_disk_errors_are_the_jobs_errors_with_a_category_of_their_own(tmp_path):
    """A full, read-only or forbidden local disk was held as an outage (any OSError was) and, when
    it failed a job, said "a service it depends on was unreachable"."""
    try:
        with open("/dev/full", "wb") as full:  # ENOSPC, for real
            full.write(b"x")
            full.flush()
    except OSError as exc:
        no_space = exc
    else:
        pytest.skip("/dev/full took the write")
    assert no_space.errno == errno.ENOSPC
    for exc in (no_space, OSError(errno.EROFS, "Read-only file system"), PermissionError(errno.EACCES, "denied"),
                OSError(errno.EIO, "Input/output error")):
        assert not isinstance(exc, db.DATABASE_UNAVAILABLE) and not held(exc), repr(exc)
        assert failure_category(exc) == "a local disk error", repr(exc)


async def test_a_database_out_of_disk_or_memory_holds_its_messages(database):
    """PostgreSQL's class 53 (disk full 53100, out of memory 53200, insufficient resources 53000)
    and class 58 (an I/O error of its disk, 58030) failed jobs, though the job's category already
    called class 53 "database unavailable". Raised by the real server here; 53400 (a configured
    limit this statement exceeded, such as temp_file_limit) stays the job's error."""
    conn = await asyncpg.connect(database)
    try:
        errors = {code: await raised(conn, f"DO $$ BEGIN RAISE EXCEPTION 'as if' USING ERRCODE = '{code}'; END $$")
                  for code in ("53100", "53200", "53000", "58030", "53400")}
    finally:
        await conn.close()
    assert {code: exc.sqlstate for code, exc in errors.items()} == {code: code for code in errors}
    for code in ("53100", "53200", "58030"):  # by type too: ingest answers 503
        assert isinstance(errors[code], db.DATABASE_UNAVAILABLE), code
    for code in ("53100", "53200", "53000", "58030"):
        assert held(errors[code]), code
        assert failure_category(errors[code]) == "database unavailable", code
    assert not held(errors["53400"])
    assert failure_category(errors["53400"]) == "database limit exceeded (SQLSTATE 53400)"


async def test_a_database_url_naming_no_database_stops_the_start_with_the_reason(caplog):
    """create_pool waited for ever on a database that does not exist (or a wrong password), while
    the worker's /metrics, its liveness probe, said it was fine. It says where, never the password."""
    name = f"stt_no_such_{uuid.uuid4().hex[:8]}"
    settings = Settings(database_url=with_database(pg_admin_url(), name, password="pw-never-logged"))
    caplog.set_level(logging.INFO, logger="common.db")
    started = time.monotonic()
    with pytest.raises(Exception) as refused:  # noqa: PT011 (which one is asserted below)
        await asyncio.wait_for(db.create_pool(settings, min_size=1, max_size=1), 20)
    assert time.monotonic() - started < 10
    assert type(refused.value).__name__ == "DatabaseMisconfigured", repr(refused.value)
    assert name in str(refused.value) and "DATABASE_URL" in str(refused.value)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.name == "common.db"]
    assert errors and name in errors[0].getMessage(), [r.getMessage() for r in caplog.records]
    said = " ".join([str(refused.value), *(r.getMessage() for r in caplog.records)])
    assert "pw-never-logged" not in said


async def test_messages_for_an_ended_job_or_a_chunk_stored_already_count_as_skipped(database):
    """The persister counted them as handled, though it stored nothing."""
    from services.persister import handler

    def counted(outcome: str) -> float:
        return metrics.MESSAGES.labels("persister", "stt.persister", outcome)._value.get()

    async def run(handle, message) -> None:
        work, token = metrics.begin_message("persister")
        await handle(pool, message)
        metrics.end_message(work, token, "stt.persister", "handled", time.perf_counter())

    pool = await db.create_pool(Settings(database_url=database), min_size=1, max_size=2)
    try:
        ended = await pool.fetchval("INSERT INTO transcripts (filename, status, error) VALUES ('a.wav', 'error',"
                                    " 'cancelled') RETURNING id")
        running = await pool.fetchval("INSERT INTO transcripts (filename) VALUES ('b.wav') RETURNING id")
        segments = [Segment(index=0, speaker="spk_0", start_ts=0.0, end_ts=1.0, text="hello")]
        chunk = {"chunk_index": 0, "chunk_count": 2, "duration": 2.0, "segments": segments}
        before = counted("handled"), counted("skipped")
        await run(handler.on_transcribed, ChunkTranscribed(job_id=ended, **chunk))  # the job has ended
        await run(handler.on_embedded, ChunkEmbedded(job_id=running, embedding_model="m", **chunk))  # stored
        await run(handler.on_embedded, ChunkEmbedded(job_id=running, embedding_model="m", **chunk))  # again
        await run(handler.on_transcribed, ChunkTranscribed(job_id=running, **chunk))  # stored already, in full
        await run(handler.on_failed, JobFailed(job_id=ended, stage="transcriber", reason="late"))  # ended already
        after = counted("handled"), counted("skipped")
        assert (after[0] - before[0], after[1] - before[1]) == (1, 4)
    finally:
        await pool.close()


def test_a_log_level_that_is_not_one_stops_the_start_with_the_reason():
    """LOG_LEVEL=trace crashed every service with a traceback from logging."""
    with pytest.raises(ValidationError, match="'trace' is not a log level"):
        Settings(log_level="trace")
    assert Settings(log_level="debug").log_level == "DEBUG"
    assert Settings(log_level="warn").log_level == "WARNING"
