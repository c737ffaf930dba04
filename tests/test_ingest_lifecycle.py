"""Ingest's own start and stop: it starts and serves while RabbitMQ or the object store is down
(and uses them once they come, without a restart), and on SIGTERM it neither waits for ever on
an upload nor spends a delivery attempt of a message its consumers hold; its queues park what
the broker takes back too often in stt.dead-letters instead of dropping it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator

import aio_pika
import httpx
import pytest

from common.broker import DEAD_LETTERS_QUEUE, declare_topology
from common.messages import TranscriptCompleted
from devstack import scratch_database
from services.ingest.inbox import (
    INBOX_EVENTS_QUEUE,
    RESULTS_QUEUE,
    declare_inbox_events_queue,
    declare_results_queue,
)
from tests.conftest import ROOT, Stack, amqp_url, free_port, private_vhost


class Forwarder:
    """A TCP forwarder from 127.0.0.1:`port` to 127.0.0.1:`target_port`, on a thread of its own: a
    dependency that appears (start) or goes away (stop, its connections cut) at the address a
    service was given."""

    def __init__(self, target_port: int) -> None:
        self.port, self.target_port = free_port(), target_port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: asyncio.Server | None = None
        self.transports: set[asyncio.Transport] = set()

    def _run(self, coroutine) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        pair = {writer.transport, target_writer.transport}
        self.transports |= pair
        await asyncio.gather(self._pipe(reader, target_writer), self._pipe(target_reader, writer))
        self.transports -= pair

    def start(self) -> None:
        async def listen() -> None:
            self.server = await asyncio.start_server(self._connection, "127.0.0.1", self.port)
        self._run(listen())

    def stop(self) -> None:
        async def close() -> None:
            if self.server is not None:
                self.server.close()
                self.server = None
            for transport in list(self.transports):
                transport.abort()
        self._run(close())

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@contextlib.contextmanager
def forwarder(target_port: int) -> Iterator[Forwarder]:
    forwarding = Forwarder(target_port)
    try:
        yield forwarding
    finally:
        forwarding.close()


def own_database() -> contextlib.AbstractContextManager[str]:
    return scratch_database("stt_lifecycle")


def port_of(address: str) -> int:
    return urllib.parse.urlsplit(f"//{address}").port


def at_port(url: str, port: int) -> str:
    parts = urllib.parse.urlsplit(url)
    return parts._replace(netloc=parts.netloc.rsplit(":", 1)[0] + f":{port}").geturl()


def get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return None


def wait_for(what: str, check, timeout: float, stack: Stack, name: str):
    """check()'s first true answer; AssertionError (with the process's log) after `timeout` s or
    once the process has exited."""
    deadline = time.monotonic() + timeout
    while not (answer := check()):
        process = stack.processes[name]
        assert process.poll() is None, f"ingest exited ({process.returncode}) before {what}:\n{stack.log_tail(name)}"
        assert time.monotonic() < deadline, f"{what}: not after {timeout:g} s\n{stack.log_tail(name)}"
        time.sleep(0.2)
    return answer


def checks(api: str) -> dict[str, str]:
    return httpx.get(f"{api}/readyz", timeout=10).json()["checks"]


def test_ingest_starts_while_rabbitmq_and_the_object_store_are_down_and_uses_them_once_they_come(
        stack: Stack, made_job, fixtures_dir):
    """As the README's outage table says for a running ingest, for one started during the outages:
    /healthz answers, /readyz?need=postgres (the readiness probe) is 200, /status answers; an upload
    is refused 503 while the store is away and accepted 202 while only the broker is; once each
    comes (at the address it was given all along) it is used without a restart."""
    job_before = made_job("before.wav", b"RIFF")
    inbox_bucket = f"inbox-{uuid.uuid4().hex[:8]}"  # made by this ingest once the store answers
    name, port = "ingest-lifecycle", free_port()
    api = f"http://127.0.0.1:{port}"
    with forwarder(port_of(stack.env["MINIO_ENDPOINT"])) as store, \
            forwarder(urllib.parse.urlsplit(stack.amqp_url).port) as broker:
        stack.start(name, "-m", "services.ingest", env={
            **stack.env, "API_PORT": str(port), "INBOX_BUCKET": inbox_bucket,
            "MINIO_ENDPOINT": f"127.0.0.1:{store.port}", "AMQP_URL": at_port(stack.amqp_url, broker.port)})
        try:
            wait_for("/healthz answered", lambda: (r := get(f"{api}/healthz")) and r.status_code == 200, 60,
                     stack, name)
            probe = httpx.get(f"{api}/readyz?need=postgres", timeout=10)
            assert probe.status_code == 200, probe.text
            assert probe.json()["checks"]["rabbitmq"].startswith("unavailable"), probe.text
            assert probe.json()["checks"]["object_store"].startswith("unavailable"), probe.text
            assert httpx.get(f"{api}/readyz", timeout=10).status_code == 503
            assert httpx.get(f"{api}/status/{job_before}", timeout=10).status_code == 200
            with (fixtures_dir / "jfk.flac").open("rb") as f:
                refused = httpx.post(f"{api}/recognize", files={"file": ("jfk.flac", f)}, timeout=60)
            assert refused.status_code == 503 and refused.headers["retry-after"], refused.text

            store.start()
            wait_for("the object store used", lambda: checks(api)["object_store"] == "ok", 30, stack, name)
            assert stack.s3().bucket_exists(inbox_bucket)
            assert checks(api)["rabbitmq"].startswith("unavailable")
            with (fixtures_dir / "jfk.flac").open("rb") as f:
                taken = httpx.post(f"{api}/recognize", files={"file": ("jfk.flac", f)}, timeout=60)
            assert taken.status_code == 202, taken.text

            broker.start()
            wait_for("ready", lambda: (r := get(f"{api}/readyz")) and r.status_code == 200, 30, stack, name)
            wait_for("consuming its queues", lambda: "consuming stt.ingest.results" in stack.log_text(name), 10,
                     stack, name)
            assert stack.wait_finished(taken.json()["id"], timeout=120)["status"] == "done"
        finally:
            stack.stop(name)
            with contextlib.suppress(Exception):
                stack.s3().remove_bucket(inbox_bucket)


def stalled_upload(api_port: int) -> socket.socket:
    """A POST /recognize whose body stops coming after its first bytes (a client gone quiet)."""
    client = socket.create_connection(("127.0.0.1", api_port))
    client.sendall(b"POST /recognize HTTP/1.1\r\nHost: ingest\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                   b"Content-Length: 1000000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"file\";"
                   b" filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF")
    return client


async def publish_event(url: str, event: TranscriptCompleted) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        exchange = await channel.get_exchange("stt.events")
        await exchange.publish(aio_pika.Message(event.model_dump_json().encode(), message_id=event.message_id,
                                                delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                               routing_key=event.ROUTING_KEY)
    finally:
        await connection.close()


async def take_one(url: str, queue_name: str) -> aio_pika.abc.AbstractIncomingMessage | None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        message = await queue.get(fail=False)
        if message is not None:
            await message.ack()
        return message
    finally:
        await connection.close()


def test_sigterm_ends_a_stalled_upload_and_hands_back_the_message_ingest_holds(stack: Stack):
    """On SIGTERM, an upload still coming after SHUTDOWN_GRACE_S is cancelled, so that the
    process stops before the orchestrator's kill and its shutdown runs; and a job end that
    ingest holds through an object-store outage goes back to stt.ingest.results as a fresh copy,
    as a worker's message does: the broker counts no delivery of it (none of DELIVERY_LIMIT)."""
    name, port = "ingest-stopping", free_port()
    api = f"http://127.0.0.1:{port}"
    buckets = uuid.uuid4().hex[:8]  # its own, for its orphan sweep and retention to keep to
    with private_vhost() as vhost, own_database() as database_url, \
            forwarder(port_of(stack.env["MINIO_ENDPOINT"])) as store:
        store.start()
        process = stack.start(name, "-m", "services.ingest", env={
            **stack.env, "API_PORT": str(port), "AMQP_URL": amqp_url(vhost), "DATABASE_URL": database_url,
            "MINIO_ENDPOINT": f"127.0.0.1:{store.port}", "AUDIO_BUCKET": f"audio-{buckets}",
            "INBOX_BUCKET": f"inbox-{buckets}", "SHUTDOWN_GRACE_S": "2"})
        upload = None
        try:
            wait_for("ready", lambda: (r := get(f"{api}/readyz")) and r.status_code == 200, 90, stack, name)
            wait_for("consuming its queues", lambda: "consuming stt.ingest.results" in stack.log_text(name), 10,
                     stack, name)
            store.stop()
            # Its decoded audio cannot be removed while the store is away: held, not failed.
            asyncio.run(publish_event(amqp_url(vhost), TranscriptCompleted(
                job_id=987654, transcript_id=987654, filename="held.wav", segment_count=0)))
            wait_for("the job end held", lambda: "holding the message" in stack.log_text(name), 60, stack, name)
            upload = stalled_upload(port)
            time.sleep(1)
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            try:
                code = process.wait(timeout=40)
            except Exception:
                raise AssertionError(f"ingest still running 40 s after SIGTERM\n{stack.log_tail(name)}") from None
            stopped_s = time.monotonic() - started
        finally:
            if upload is not None:
                upload.close()
            stack.stop(name)
        log = stack.log_text(name)
        assert code in (0, -signal.SIGTERM), log[-3000:]  # uvicorn raises the signal again once it has stopped
        # SHUTDOWN_GRACE_S for the upload, as long for the held message, and time to close.
        assert stopped_s < 20, stopped_s
        assert "handed back to stt.ingest.results" in log, log[-3000:]
        message = asyncio.run(take_one(amqp_url(vhost), RESULTS_QUEUE))
        assert message is not None, "the held job end is no longer in stt.ingest.results"
        assert json.loads(message.body)["transcript_id"] == 987654
        assert not message.redelivered and (message.headers or {}).get("x-delivery-count", 0) == 0, message.headers


async def test_a_job_end_the_broker_takes_back_past_the_delivery_limit_is_parked_not_dropped(stack: Stack):
    """A job-end message whose consumer fails it every time (ingest crashing on it, or its error
    path failing) is parked in stt.dead-letters with the reason once DELIVERY_LIMIT is spent: a
    queue with no dead-letter exchange drops it (RabbitMQ 4, at its default limit of 20), and with
    it the job's redaction and the removal of its decoded audio. A queue an earlier version made
    without these arguments does not keep ingest from consuming."""
    with private_vhost() as vhost:
        settings = stack.settings(amqp_url=amqp_url(vhost), delivery_limit=2)
        connection = await aio_pika.connect_robust(amqp_url(vhost))
        try:
            channel = await connection.channel()
            await declare_topology(connection, settings)
            await channel.declare_queue(INBOX_EVENTS_QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
            await declare_results_queue(connection, channel, settings)
            await declare_inbox_events_queue(connection, settings)

            ended = TranscriptCompleted(job_id=4242, transcript_id=4242, filename="a.wav", segment_count=0)
            events = await channel.get_exchange("stt.events")
            await events.publish(aio_pika.Message(ended.model_dump_json().encode(), message_id=ended.message_id,
                                                  delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                                 routing_key=ended.ROUTING_KEY)
            results = await channel.declare_queue(RESULTS_QUEUE, passive=True)
            for _ in range(settings.delivery_limit + 1):
                message = await results.get(timeout=5)
                await message.nack(requeue=True)
            parked_queue = await channel.declare_queue(DEAD_LETTERS_QUEUE, passive=True)
            parked = None
            for _ in range(50):
                if (parked := await parked_queue.get(fail=False)) is not None:
                    break
                await asyncio.sleep(0.1)
            assert parked is not None, "the message was not parked in stt.dead-letters"
            await parked.ack()
            assert json.loads(parked.body)["transcript_id"] == 4242
            [death] = parked.headers["x-death"]
            assert death["reason"] == "delivery_limit" and death["queue"] == RESULTS_QUEUE, death
            assert await results.get(fail=False) is None
        finally:
            await connection.close()


def refused_for_good_after(seconds: float, module: str) -> list[str]:
    """The command line of `python -m module` whose refused AMQP login is given up after `seconds`
    (common.broker.REFUSED_FOR_GOOD_AFTER_S), not a minute."""
    return [sys.executable, "-c", "import runpy, sys, common.broker; common.broker.REFUSED_FOR_GOOD_AFTER_S ="
            " float(sys.argv[1]); runpy.run_module(sys.argv[2], run_name='__main__', alter_sys=True)",
            str(seconds), module]


# While serving: given up 15 s after the first refusal, 10 s after the start's wait for its
# dependencies (DEPENDENCIES_AWAITED_S, 5 s) ends, time enough for the test to see it serve.
@pytest.mark.parametrize("refused_for_s", [0, 15], ids=["at-start", "while-serving"])
def test_ingest_whose_broker_login_is_refused_exits_with_the_reason(refused_for_s, tmp_path):
    """Ingest retried a refused AMQP login for ever, as an outage: live and ready, it took uploads
    whose job.submitted never went out. Refused within its start's wait for its dependencies, or
    once it serves (REFUSED_FOR_GOOD_AFTER_S is over that wait), it exits non-zero with the reason,
    as the workers do."""
    port = free_port()
    log_path = tmp_path / "ingest.log"
    with private_vhost() as vhost, own_database() as database_url, log_path.open("w") as log_file:
        env = {**os.environ, "API_PORT": str(port), "AMQP_URL": f"amqp://guest:never-logged@127.0.0.1:5672/{vhost}",
               "DATABASE_URL": database_url, "MINIO_ENDPOINT": f"127.0.0.1:{free_port()}",
               "EMBEDDING_BACKEND": "ollama", "OLLAMA_URL": "http://127.0.0.1:9", "MODEL_NAME_EMBEDDED": "all-minilm"}
        process = subprocess.Popen(refused_for_good_after(refused_for_s, "services.ingest"), env=env, cwd=ROOT,
                                   stdout=log_file, stderr=subprocess.STDOUT)
        try:
            if refused_for_s:
                deadline = time.monotonic() + 60
                while not ((answer := get(f"http://127.0.0.1:{port}/healthz")) and answer.status_code == 200):
                    assert process.poll() is None, f"exited before serving:\n{log_path.read_text()[-3000:]}"
                    assert time.monotonic() < deadline, log_path.read_text()[-3000:]
                    time.sleep(0.2)
            try:
                code = process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"ingest still running\n{log_path.read_text()[-3000:]}") from None
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    log = log_path.read_text()
    assert code != 0, log[-3000:]
    assert "refuses this service" in log and "Login was refused" in log and "fix AMQP_URL" in log, log[-3000:]
    assert "never-logged" not in log

