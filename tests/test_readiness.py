"""GET /readyz, and what else ingest does in the background, against an object store that
accepts connections and never answers, and a database whose connection the network dropped; and
what the store clients make of a store that answers it is busy or down."""

from __future__ import annotations

import asyncio
import http.server
import io
import socket
import threading
import time

import pytest
from minio.error import S3Error

from common import db, storage
from common.settings import Settings
from common.storage import make_client
from devstack import pg_admin_url
from services.ingest.readiness import CHECK_TIMEOUT_S, DatabaseProbe, ObjectStoreProbe, run_checks
from tests.conftest import database_of_this_machines_postgres
from tests.test_db_timeouts import FreezableProxy, RefusingPooler, _session_settings, _through, _upstream, _within


def silent_server() -> tuple[socket.socket, list[socket.socket]]:
    """A TCP server on 127.0.0.1 that accepts every connection and never sends a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    return server, accepted


def test_a_hung_object_store_is_unavailable_quickly_and_leaks_no_threads():
    server, accepted = silent_server()
    port = server.getsockname()[1]
    # The client waits longer than a check may: the check gives up first, and its call goes on.
    probe = ObjectStoreProbe(make_client(Settings(minio_endpoint=f"127.0.0.1:{port}"),
                                         timeout_s=2 * CHECK_TIMEOUT_S), "audio")
    threads_before = threading.active_count()

    async def probe_repeatedly() -> list[tuple[dict, float]]:
        answers = []
        for _ in range(8):  # a load balancer probing every second for 8 s
            started = time.monotonic()
            answers.append((await run_checks({"object_store": probe}), time.monotonic() - started))
        return answers

    try:
        answers = asyncio.run(probe_repeatedly())
    finally:
        probe.close()
        server.close()
        for connection in accepted:
            connection.close()
    assert all(checks["object_store"].startswith("unavailable") for checks, _ in answers), answers
    # The check's own limit ended the first (the client's, twice as long, would have come later);
    # a bound that is the behaviour, given the whole limit again as room for a loaded machine.
    assert answers[0][1] < 2 * CHECK_TIMEOUT_S, answers
    # While the first call is stuck, the next checks say so without waiting out a check's limit,
    # and start no call of their own (one connection, below).
    assert all(elapsed < CHECK_TIMEOUT_S for _, elapsed in answers[1:]), answers
    assert threading.active_count() - threads_before <= 1  # the probe's own thread, at most
    assert len(accepted) == 1


async def test_a_database_flow_dropped_without_a_reset_is_unavailable_in_time_and_ok_once_reachable_again():
    """A failover, or a NAT forgetting the flow, leaves the check's connection with neither an
    answer nor a reset. The check gives up within its limit, and once the database is reached again
    (new connections are forwarded) the next check is ok. Before, on a pool of one connection, the
    first check never answered, and every later one timed out waiting for that connection until the
    kernel dropped the flow (15 minutes or more): every ingest replica unready at once."""
    admin = pg_admin_url()
    async with FreezableProxy(_upstream(admin)) as proxy:
        probe = DatabaseProbe(_through(proxy, admin))
        try:
            assert await run_checks({"postgres": probe}) == {"postgres": "ok"}
            proxy.freeze()
            # Without the fix the check is still waiting after this long (for ever, here).
            hangs_s = 4 * CHECK_TIMEOUT_S
            outcome = await _within(hangs_s, run_checks({"postgres": probe}))
            assert outcome is not None, f"the check on a dropped flow did not answer within {hangs_s:g} s"
            checks, took = outcome
            assert checks["postgres"].startswith("unavailable"), checks
            # Its limit, and room for a loaded machine: a check that waits out twice its limit is over it.
            assert took < CHECK_TIMEOUT_S + 2, took

            outcome = await _within(hangs_s, run_checks({"postgres": probe}))
            assert outcome is not None, f"the check after the outage did not answer within {hangs_s:g} s"
            checks, _ = outcome
            assert checks == {"postgres": "ok"}, checks  # ok: within CHECK_TIMEOUT_S (run_checks' limit)
        finally:
            probe.close()


async def test_the_database_checks_session_carries_the_keepalive_settings_and_does_without_where_refused(caplog):
    """/readyz's connection was the one session of the services made without the TCP keepalive
    settings: a client that vanished left it on the server for the OS's 2 hours. Over TCP, to this
    machine's PostgreSQL (over a Unix socket the server ignores them); and through a pooler that
    refuses them (PgBouncer), the check still connects, without them."""
    wanted = {name: (value, "client") for name, value in db.server_keepalive_settings().items()}
    async with database_of_this_machines_postgres("stt_readyz") as (_, url):
        probe = DatabaseProbe(url)
        try:
            assert await run_checks({"postgres": probe}) == {"postgres": "ok"}
            assert await _session_settings(probe.connection) == wanted
        finally:
            probe.close()
    admin = pg_admin_url()
    async with RefusingPooler(_upstream(admin)) as pooler:
        probe = DatabaseProbe(_through(pooler, admin))
        try:
            assert await run_checks({"postgres": probe}) == {"postgres": "ok"}
            assert "refuses the keepalive settings" in caplog.text
        finally:
            probe.close()


def test_a_stage_workers_store_client_gives_up_on_a_silent_store_and_says_it_is_unavailable(monkeypatch):
    """minio's own client waits 5 minutes a read and tries 6 times: a worker held its message for
    half an hour, until RabbitMQ's consumer timeout took it back as a crash."""
    from common import storage

    monkeypatch.setattr(storage, "WORKER_CLIENT_TIMEOUT_S", 0.5)
    server, accepted = silent_server()
    client = storage.worker_client(Settings(minio_endpoint=f"127.0.0.1:{server.getsockname()[1]}"))
    started = time.monotonic()
    try:
        client.stat_object("audio", "pcm/1.s16le")
    except storage.STORAGE_UNAVAILABLE:
        pass
    else:
        raise AssertionError("a store that never answers answered")
    finally:
        server.close()
        for connection in accepted:
            connection.close()
    # Each try waits its timeout (and a short pause before the next): about 4 s here, 3 minutes as
    # set. The bound tells the two apart with room for a loaded machine; the tries are counted below.
    assert time.monotonic() - started < 30
    assert len(accepted) == storage.WORKER_CLIENT_RETRIES + 1


async def test_load_balancer_checkers_probing_at_once_all_find_it_ready(stack):
    """Several checkers (a load balancer's, Kubernetes') probe at once: those that come while a
    check of the object store is under way wait for its answer, not take it for a stuck store."""
    import httpx

    async with httpx.AsyncClient(timeout=30) as client:
        for _ in range(5):
            answers = await asyncio.gather(*(client.get(f"{stack.api}/readyz") for _ in range(8)))
            assert [a.status_code for a in answers] == [200] * 8, [a.json()["checks"] for a in answers]


async def test_the_orphan_sweep_held_up_by_the_store_keeps_no_request_connection(stack):
    """The hourly sweep lists the whole audio bucket under an advisory lock (one replica at a
    time): a large or hanging store keeps it going for minutes, and its lock must not hold one of
    the connections API requests are served from all that while."""
    from common.db import LockKey, create_pool
    from services.ingest.orphans import run_orphan_sweep

    server, accepted = silent_server()
    s3 = make_client(Settings(minio_endpoint=f"127.0.0.1:{server.getsockname()[1]}"), timeout_s=60)
    pool = await create_pool(stack.settings())  # the requests' pool, as ingest makes it
    sweep = asyncio.create_task(run_orphan_sweep(pool, s3, "audio"))

    async def sweeping() -> bool:
        return await pool.fetchval("SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
                                   " AND ((classid::bigint << 32) | objid::bigint) = $1"
                                   " AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))",
                                   int(LockKey.ORPHANS))

    try:
        deadline = time.monotonic() + 30
        while not (accepted and await sweeping()):  # under way, its listing unanswered
            assert time.monotonic() < deadline and not sweep.done(), "the sweep never began"
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        assert pool.get_size() - pool.get_idle_size() == 0, "a request connection is held by the sweep"
        assert not sweep.done()
    finally:
        sweep.cancel()
        await asyncio.gather(sweep, return_exceptions=True)
        server.close()
        for connection in accepted:
            connection.close()
    assert not await sweeping()  # its lock went with its connection
    await pool.close()


def answering_server(status: int, content_type: str, body: bytes) -> http.server.ThreadingHTTPServer:
    """An HTTP server on 127.0.0.1 that answers every S3 request with this status and body."""

    class Answer(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def answer(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = answer

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def s3_error(code: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{code} said the'
            f' store</Message><Resource>/audio/x</Resource><RequestId>17</RequestId></Error>').encode()


BUSY_OR_DOWN = {
    "MinIO throttling (503 SlowDown)": (503, "application/xml", s3_error("SlowDown")),
    "MinIO starting (503 XMinioServerNotInitialized)": (503, "application/xml", s3_error("XMinioServerNotInitialized")),
    "S3 ServiceUnavailable (503)": (503, "application/xml", s3_error("ServiceUnavailable")),
    "S3 InternalError (500)": (500, "application/xml", s3_error("InternalError")),
    "too many requests (429)": (429, "application/xml", s3_error("TooManyRequests")),
    "a proxy's 502 page": (502, "text/html", b"<html><body><h1>502 Bad Gateway</h1></body></html>"),
    "a proxy's 504 page": (504, "text/html", b"<html><body><h1>504 Gateway Time-out</h1></body></html>"),
}

# The store calls the services make, each through the client that makes it: the job-end step's
# multipart put of a redacted recording (ingest's default client: its create and complete are
# POSTs, which urllib3 never retries), result files written and objects looked up inside a
# transaction (the quick client: no retries), a stage worker's read (retries, then the last answer).
STORE_CALLS = {
    "a multipart put": lambda settings: storage.upload_stream(
        storage.make_client(settings), "audio", "redacted/1.wav", io.BytesIO(bytes(11 * 1024 * 1024))),
    "a result file written in a transaction": lambda settings: storage.upload_json(
        storage.make_client(settings, timeout_s=storage.QUICK_CLIENT_TIMEOUT_S), "inbox", "a.json", {"text": ""}),
    "a size looked up in a transaction": lambda settings: storage.stored_size(
        storage.make_client(settings, timeout_s=storage.QUICK_CLIENT_TIMEOUT_S), "inbox", "a.json"),
    "a stage worker's read": lambda settings: storage.read_range(
        storage.worker_client(settings), "audio", storage.pcm_key(1), 0, 32000),
}


@pytest.mark.parametrize("call", STORE_CALLS)
@pytest.mark.parametrize("answer", BUSY_OR_DOWN)
def test_a_store_that_answers_it_is_busy_or_down_is_unavailable(answer, call):
    """S3 and MinIO answer SlowDown, ServiceUnavailable or a server still starting with an error
    document, and a proxy in front of them with its own page: the store is unavailable, as when it
    does not answer at all (consumers hold the message until it is back, the API answers 503), not
    a failure of the step (a job-end step retried three times, then parked in stt.dead-letters with
    its recording blocked until an operator stepped in)."""
    status, content_type, body = BUSY_OR_DOWN[answer]
    server = answering_server(status, content_type, body)
    try:
        with pytest.raises(storage.STORAGE_UNAVAILABLE) as raised:
            # With its region set, as a client has it once it has asked (the first request to a
            # bucket asks for its location otherwise): the put's first request is its POST.
            STORE_CALLS[call](Settings(minio_endpoint=f"127.0.0.1:{server.server_address[1]}",
                                       minio_region="us-east-1"))
    finally:
        server.shutdown()
        server.server_close()
    # The log line says what the store answered.
    assert str(status) in str(raised.value), raised.value
    if content_type == "application/xml" and call != "a size looked up in a transaction":  # a HEAD has no body
        assert body.decode().split("<Code>")[1].split("<")[0] in str(raised.value), raised.value


def test_a_store_that_refuses_a_request_is_not_unavailable():
    """A 4xx answer is about the request (no such object, a key without the right), not a store to
    wait for: what is missing is still missing, and a refusal is still the store's own error."""
    missing = answering_server(404, "application/xml", s3_error("NoSuchKey"))
    refusing = answering_server(403, "application/xml", s3_error("AccessDenied"))
    try:
        missing_settings = Settings(minio_endpoint=f"127.0.0.1:{missing.server_address[1]}")
        assert storage.stored_size(storage.make_client(missing_settings, timeout_s=5), "audio", "x") is None
        with pytest.raises(S3Error) as raised:
            storage.read_range(storage.worker_client(Settings(minio_endpoint=f"127.0.0.1:{refusing.server_address[1]}")),
                               "audio", "x", 0, 10)
        assert raised.value.code == "AccessDenied"
        assert not isinstance(raised.value, storage.STORAGE_UNAVAILABLE)
    finally:
        for server in (missing, refusing):
            server.shutdown()
            server.server_close()
