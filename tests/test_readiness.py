"""GET /readyz against an object store that accepts connections and never answers."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

from common.settings import Settings
from common.storage import make_client
from services.ingest.readiness import CHECK_TIMEOUT_S, ObjectStoreProbe, run_checks


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
    probe = ObjectStoreProbe(make_client(Settings(minio_endpoint=f"127.0.0.1:{port}"), timeout_s=1.0), "audio")
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
    assert all(elapsed < CHECK_TIMEOUT_S + 0.5 for _, elapsed in answers), answers
    assert threading.active_count() - threads_before <= 1  # the probe's own thread, at most
    assert len(accepted) <= 8  # one connection per check, no retries piling up
