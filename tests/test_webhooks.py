"""Webhooks on the real stack (ingest, the notifier, RabbitMQ, PostgreSQL) against a real local HTTP
receiver: signed deliveries in order, retries through the delay queues, giving up with a delivery
log that says why, per-job callback URLs, the private-address refusal, and a notifier killed in
the middle of a delivery."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import asyncpg
import httpx
import pytest

from common.broker import DEAD_LETTERS_QUEUE, connect, declare_delay_queues, open_bus, retry_queue
from common.db import LockKey
from common.messages import SegmentCreated, WebhookDue
from common.outbound import PublicOnlyResolver, http_session, target_problem
from common.webhooks import endpoint, new_secret, signature
from services.notifier import handler
from services.notifier.__main__ import DELIVERY_PREFETCH
from tests.audio_files import en_dialogue_voices
from tests.conftest import amqp_url, another_ingest, free_port, private_vhost, running_stack

# Short waits so retries and give-ups happen within a test.
TIMEOUT_S = 2
MAX_ATTEMPTS = 3


class Receiver:
    """A local HTTP server that records every POST and answers per path: /ok 200, /flaky (and
    /flaky-anything) 500 twice then 200, /refusing-anything 500 always, /dead (and /dead-anything)
    never (holds the request), /slow (and /slow-anything) 200 after 1 s, /outage-anything 503
    while `outage` is set and 200 after."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.outage = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver.lock:
                    receiver.requests.append({"path": self.path, "headers": dict(self.headers.items()),
                                              "body": body, "at": time.monotonic()})
                    seen = sum(1 for r in receiver.requests if r["path"] == self.path)
                if self.path.startswith("/dead"):
                    time.sleep(TIMEOUT_S * 3)
                    return
                if self.path.startswith("/slow"):
                    time.sleep(1)
                refused = self.path.startswith("/refusing") or (self.path.startswith("/flaky") and seen <= 2)
                unavailable = self.path.startswith("/outage") and receiver.outage.is_set()
                self.send_response(503 if unavailable else 500 if refused else 200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}{path}"

    def got(self, path: str) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["path"] == path]

    def got_under(self, prefix: str) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["path"].startswith(prefix)]

    def events(self, path: str, job_id: int) -> list[dict]:
        return [json.loads(r["body"]) for r in self.got(path) if json.loads(r["body"])["data"]["job_id"] == job_id]


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return result


def verifies(request: dict, secret: str) -> bool:
    """Standard Webhooks verification, written out as a receiver would (not the service's code)."""
    headers = {k.lower(): v for k, v in request["headers"].items()}
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + request["body"]
    key = base64.b64decode(secret.removeprefix("whsec_"))
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(hmac.compare_digest(expected, s.split(",", 1)[1]) for s in headers["webhook-signature"].split())


def test_signatures_secrets_and_private_targets():
    secret = new_secret()
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 24
    body = b'{"type":"transcript.completed"}'
    request = {"headers": {"webhook-id": "msg_1", "webhook-timestamp": "1700000000",
                           "webhook-signature": signature(secret, "msg_1", 1700000000, body)}, "body": body}
    assert verifies(request, secret)
    assert not verifies({**request, "body": body + b" "}, secret)
    assert not verifies(request, new_secret())

    async def problems(allow_private: bool) -> list[str | None]:
        urls = ["http://127.0.0.1:9/x", "http://localhost/", "http://10.1.2.3/", "http://169.254.169.254/latest",
                "http://[::1]/", "http://192.168.0.10/",
                # carrier-grade NAT (some clouds' metadata service), and 169.254.169.254 inside 6to4
                "http://100.100.100.200/latest/meta-data/", "http://[2002:a9fe:a9fe::1]/",
                "http://93.184.216.34/hook", "ftp://93.184.216.34/"]
        return [await target_problem(url, allow_private) for url in urls]

    refused = asyncio.run(problems(False))
    assert all("private" in p for p in refused[:8]), refused
    # A name's private address is not told (it would map the private network's names to addresses).
    assert "127.0.0.1" not in refused[1], refused[1]
    assert refused[8] is None and "http" in refused[9]
    allowed = asyncio.run(problems(True))
    assert allowed[:9] == [None] * 9 and allowed[9] is not None
    # a host name no resolver accepts is a reason, not an error
    assert "valid host name" in asyncio.run(target_problem("https://a..b/", False))

    async def connect_time_resolution() -> None:
        # what the notifier connects with: a name that turned private after the check is refused too
        resolver = PublicOnlyResolver()
        try:
            with pytest.raises(OSError, match="localhost does not resolve to a public address"):
                await resolver.resolve("localhost", 80)
        finally:
            await resolver.close()

    asyncio.run(connect_time_resolution())


@pytest.fixture(scope="module")
def notified(tmp_path_factory, fixtures_dir):
    """A stack whose notifier may reach this machine, retrying every second or two."""
    receiver = Receiver()
    with running_stack(tmp_path_factory, WEBHOOK_ALLOW_PRIVATE="true", WEBHOOK_RETRY_DELAYS_S="1,2",
                       WEBHOOK_MAX_ATTEMPTS=str(MAX_ATTEMPTS), WEBHOOK_TIMEOUT_S=str(TIMEOUT_S)) as stack:
        yield stack, receiver
    receiver.server.shutdown()


def stt(stack, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "STT_API_URL": stack.api, "COLUMNS": "200"}
    return subprocess.run([str(Path(sys.executable).parent / "stt"), *args], env=env, capture_output=True,
                          text=True, timeout=60)


def webhook_attempts(stack) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(stack.metrics_url("notifier"), timeout=10).text
    return {s.labels["outcome"]: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "stt_webhook_attempts_total"}


def test_events_arrive_signed_in_order_retried_and_given_up(notified, fixtures_dir):
    stack, receiver = notified
    attempts_before = webhook_attempts(stack)
    added = stt(stack, "webhooks", "add", receiver.url("/ok"))
    assert added.returncode == 0, added.stderr
    ok_secret = added.stdout.split("secret: ")[1].strip()
    api = httpx.Client(base_url=stack.api, timeout=30)
    flaky = api.post("/webhooks", json={"url": receiver.url("/flaky"), "events": ["transcript.completed"]}).json()
    dead = api.post("/webhooks", json={"url": receiver.url("/dead"), "events": ["transcript.completed"],
                                       "secret": "my-own-secret-0123"}).json()
    assert dead["secret"] == "my-own-secret-0123" and flaky["secret"].startswith("whsec_")
    assert "secret" not in api.get(f"/webhooks/{flaky['id']}").json()
    refused = api.post("/webhooks", json={"url": receiver.url("/ok"), "events": ["job.exploded"]})
    assert refused.status_code == 400 and "job.exploded" in refused.json()["detail"]
    # a receiver's library would decode this one leniently and never verify a delivery
    not_base64 = api.post("/webhooks", json={"url": receiver.url("/ok"), "secret": "whsec_abcd-efgh-ijkl"})
    assert not_base64.status_code == 400 and "base64" in not_base64.json()["detail"], not_base64.text
    # A misspelt field subscribed to every event type without a word.
    misspelt = api.post("/webhooks", json={"url": receiver.url("/ok"), "event": ["transcript.completed"]})
    assert misspelt.status_code == 400 and "event" in misspelt.text, misspelt.text

    accepted = stack.submit(fixtures_dir / "en_dialogue.wav", data={"callback_url": receiver.url("/callback")})
    assert accepted.status_code == 202, accepted.text
    job_id, callback_secret = accepted.json()["id"], accepted.json()["callback_secret"]
    assert stack.wait_finished(job_id, 300)["status"] == "done"

    # Every event of the job, in the order it happened, each signed; the completion last.
    ok = wait_for(lambda: (e := receiver.events("/ok", job_id)) and e[-1]["type"] == "transcript.completed" and e,
                  60, "transcript.completed at /ok")
    segments = [e["data"] for e in ok if e["type"] == "segment.created"]
    assert len(segments) == len(stack.status(job_id)["segments"]) >= 2
    assert [s["index"] for s in segments] == sorted(s["index"] for s in segments)
    mine = [r for r in receiver.got("/ok") if json.loads(r["body"])["data"]["job_id"] == job_id]
    assert all(verifies(r, ok_secret) for r in mine)
    assert all(r["headers"]["webhook-id"] == json.loads(r["body"])["data"]["message_id"] for r in mine)

    # The job's own callback: its completion only, signed with the secret /recognize returned.
    callback = wait_for(lambda: receiver.got("/callback"), 30, "the callback")
    assert [json.loads(r["body"])["type"] for r in callback] == ["transcript.completed"]
    assert verifies(callback[0], callback_secret) and not verifies(callback[0], ok_secret)

    # 500, 500, then 200: delivered on the third attempt, the same event id each time.
    wait_for(lambda: len(receiver.got("/flaky")) >= 3, 60, "the third attempt at /flaky")
    assert len({r["headers"]["webhook-id"] for r in receiver.got("/flaky")}) == 1
    log = wait_for(lambda: (d := api.get(f"/webhooks/{flaky['id']}/deliveries").json()["items"])
                   and d[0]["status"] == "delivered" and d, 30, "the delivery log of /flaky")
    assert [a.get("status_code") for a in log[0]["attempts"]] == [500, 500, 200]

    # Never an answer: given up after MAX_ATTEMPTS, and the log says so.
    log = wait_for(lambda: (d := api.get(f"/webhooks/{dead['id']}/deliveries").json()["items"])
                   and d[0]["status"] == "failed" and d, 90, "giving up on /dead")
    assert len(log[0]["attempts"]) == MAX_ATTEMPTS
    assert all(a["error"] == f"no answer within {TIMEOUT_S} s" for a in log[0]["attempts"])
    printed = stt(stack, "webhooks", "deliveries", str(dead["id"]))
    assert f"job {job_id}\ttranscript.completed\tfailed\t{MAX_ATTEMPTS} attempt(s)" in printed.stdout, printed
    # An operator sees the same in the notifier's metrics: the retries, and the one given up.
    attempts = webhook_attempts(stack)
    moved = {outcome: attempts[outcome] - attempts_before.get(outcome, 0) for outcome in attempts}
    assert moved["given_up"] >= 1 and moved["retried"] >= 2 + MAX_ATTEMPTS - 1 and moved["delivered"] >= len(ok), moved

    listed = stt(stack, "webhooks", "list").stdout
    assert receiver.url("/ok") in listed and f"job {job_id}" in listed
    # A page at a time, oldest first: the pages together are the whole list, each webhook once.
    first = api.get("/webhooks", params={"limit": 2}).json()
    rest = api.get("/webhooks", params={"limit": 500, "cursor": first["next_cursor"]}).json()
    assert len(first["items"]) == 2 and "next_cursor" not in rest
    paged = [w["id"] for w in first["items"] + rest["items"]]
    assert paged == sorted(set(paged)) and {flaky["id"], dead["id"]} <= set(paged)
    assert [line.split("\t")[0] for line in listed.splitlines()] == [str(i) for i in paged]
    assert api.delete(f"/webhooks/{flaky['id']}").status_code == 204
    removed = stt(stack, "webhooks", "remove", str(dead["id"]))
    assert removed.returncode == 0 and f"removed webhook {dead['id']}" in removed.stdout, removed
    assert api.get(f"/webhooks/{dead['id']}/deliveries").status_code == 404
    again = stt(stack, "webhooks", "remove", str(dead["id"]))
    assert again.returncode != 0 and "no webhook" in again.stderr, again


def test_once_a_jobs_delivery_is_given_up_its_later_ones_get_one_attempt_each(notified, fixtures_dir):
    """Deliveries of a job go out in order, the oldest first: behind one given up after its whole
    schedule (about a day), the next started it again, and so on for every segment of the job."""
    stack, receiver = notified
    with httpx.Client(base_url=stack.api, timeout=30) as api:
        hook = api.post("/webhooks", json={"url": receiver.url("/dead"),
                                           "events": ["segment.created", "transcript.completed"]}).json()
        try:
            job_id = stack.submit_job(fixtures_dir / "en_dialogue.wav")
            assert stack.wait_finished(job_id, 300)["status"] == "done"

            def settled():
                rows = stack.query("SELECT status, attempts FROM webhook_deliveries WHERE webhook_id = $1"
                                   " AND job_id = $2 ORDER BY id", hook["id"], job_id)
                return rows if rows and all(r["status"] != "pending" for r in rows) else None

            rows = wait_for(settled, 300, "every delivery of the job settled")
            assert len(rows) > 2 and {r["status"] for r in rows} == {"failed"}
            assert [r["attempts"] for r in rows] == [MAX_ATTEMPTS] + [1] * (len(rows) - 1)
        finally:
            api.delete(f"/webhooks/{hook['id']}")


def pending_deliveries(stack, url: str, job_id: int, count: int) -> tuple[int, list[str]]:
    """A webhook at `url` with `count` deliveries of `job_id` waiting; (its id, their event ids).
    A job id with no transcript is a deleted job's to the notifier."""
    webhook_id = stack.value("INSERT INTO webhooks (url, events, secret) VALUES ($1, '{segment.created}',"
                             " 'a-secret-of-16-chars') RETURNING id", url)
    event_ids = [f"evt-{job_id}-{n}" for n in range(count)]
    for event_id in event_ids:
        stack.query("INSERT INTO webhook_deliveries (webhook_id, event_id, event_type, job_id, payload)"
                    " VALUES ($1, $2, 'segment.created', $3, $4)", webhook_id, event_id, job_id,
                    json.dumps({"type": "segment.created", "data": {"job_id": job_id, "message_id": event_id}}))
    return webhook_id, event_ids


def kick(stack, job_id: int, webhook_id: int) -> None:
    """Ask the notifier to send the job's deliveries to the webhook, as fan_out and the sweep do."""
    kick_all(stack, [WebhookDue(job_id=job_id, webhook_id=webhook_id)])


def kick_all(stack, dues: list[WebhookDue]) -> None:
    published(stack, dues)


def published(stack, messages: list, as_events: bool = False) -> None:
    """Publish work messages (or, `as_events`, public events on stt.events) through a bus."""
    async def publish() -> None:
        connection = await connect(stack.settings(), "test-webhook-publish")
        try:
            bus = await open_bus(connection, stack.settings())
            for message in messages:
                await (bus.publish_event(message) if as_events else bus.publish(message))
        finally:
            await connection.close()

    asyncio.run(publish())


@contextlib.contextmanager
def queue_depths(stack, queue_name: str, every_s: float = 0.25) -> Iterator[list[int]]:
    """messages_in(queue_name) every `every_s` while the block runs, in the list it gives."""
    depths: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            depths.append(messages_in(stack, queue_name))
            time.sleep(every_s)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        yield depths
    finally:
        done.set()
        sampler.join()


def messages_in(stack, queue_name: str) -> int:
    """Messages ready in a queue (a delay queue's are all ready: nothing consumes it)."""
    async def count() -> int:
        connection = await connect(stack.settings(), "test-queue-count")
        try:
            queue = await (await connection.channel()).declare_queue(queue_name, passive=True)
            return queue.declaration_result.message_count
        finally:
            await connection.close()

    return asyncio.run(count())


def callbacks_to_one_server(stack, server: Receiver, first_job_id: int, count: int,
                            overdue: bool = False) -> list[WebhookDue]:
    """`count` webhooks, each with one pending delivery of a job of its own, as many jobs'
    callback_urls naming one server (a path each); their kicks. `overdue`: due an hour ago, as
    the sweep sees a chain left without a kick that long."""
    dues = []
    for job_id in range(first_job_id, first_job_id + count):  # no transcripts: deleted jobs
        webhook_id, _ = pending_deliveries(stack, server.url(f"/dead-callback?job={job_id}"), job_id, 1)
        dues.append(WebhookDue(job_id=job_id, webhook_id=webhook_id))
        if overdue:
            stack.query("UPDATE webhook_deliveries SET next_attempt_at = now() - interval '1 hour'"
                        " WHERE webhook_id = $1", webhook_id)
    return dues


def dead_letters(stack) -> int:
    async def count() -> int:
        connection = await connect(stack.settings(), "test-dead-letters")
        try:
            queue = await (await connection.channel()).declare_queue(DEAD_LETTERS_QUEUE, passive=True)
            return queue.declaration_result.message_count
        finally:
            await connection.close()

    return asyncio.run(count())


def test_a_backlog_longer_than_the_delivery_budget_is_handed_on_and_all_delivered(notified):
    """A message sends a job's deliveries for DELIVERY_BUDGET_S, then hands the rest on to a
    message of their own: that kick failing (a publish no queue took) retried the message and
    parked it, and the rest waited for the sweep minutes later."""
    stack, receiver = notified
    # The stack's notifier, but with a budget one delivery to /slow outlasts.
    budget = ("from services.notifier import handler\nhandler.DELIVERY_BUDGET_S = 0.5\n"
              "from common.runner import run_worker\nfrom services.notifier.__main__ import main\nrun_worker(main)")
    env = {**stack.env, "METRICS_PORT": str(stack.metrics_ports["notifier"])}
    stack.stop("notifier")
    log_from = len(stack.log_text("notifier"))
    stack.start("notifier", "-c", budget, env=env)
    webhook_id = None
    try:
        wait_for(lambda: "consuming stt.notifier (" in stack.log_text("notifier")[log_from:], 60, "the notifier")
        parked_before = dead_letters(stack)
        job_id = 969696
        webhook_id, event_ids = pending_deliveries(stack, receiver.url("/slow-budget"), job_id, 6)
        kick(stack, job_id, webhook_id)
        wait_for(lambda: len(receiver.events("/slow-budget", job_id)) >= len(event_ids)
                 and not stack.query("SELECT 1 FROM webhook_deliveries WHERE job_id = $1 AND status = 'pending'",
                                     job_id), 30, "every delivery sent, well before the sweep")
        assert [e["data"]["message_id"] for e in receiver.events("/slow-budget", job_id)] == event_ids
        log = stack.log_text("notifier")[log_from:]
        assert "webhook.due failed" not in log and "parked" not in log, log
        assert dead_letters(stack) == parked_before
    finally:
        if webhook_id is not None:
            stack.query("DELETE FROM webhooks WHERE id = $1", webhook_id)
        stack.stop("notifier")
        stack.start_service("notifier")


def test_a_deleted_jobs_later_deliveries_get_one_attempt_each_once_one_is_given_up(notified):
    """Deleting a job removes its settled deliveries, the one given up included: the rule that the
    later ones get one attempt each then never applied, and each kept the deleted text through the
    whole schedule (about a day each)."""
    stack, receiver = notified
    job_id = 979797  # no transcript: deleted
    webhook_id, event_ids = pending_deliveries(stack, receiver.url("/refusing-deleted"), job_id, 4)
    try:
        kick(stack, job_id, webhook_id)
        wait_for(lambda: not stack.query("SELECT 1 FROM webhook_deliveries WHERE job_id = $1", job_id), 120,
                 "every delivery of the deleted job settled and gone")
        tried = [e["data"]["message_id"] for e in receiver.events("/refusing-deleted", job_id)]
        assert [tried.count(event_id) for event_id in event_ids] == [MAX_ATTEMPTS, 1, 1, 1], tried
        assert tried == sorted(tried, key=event_ids.index)
    finally:
        stack.query("DELETE FROM webhooks WHERE id = $1", webhook_id)


class LateBodyServer:
    """A local HTTP server that answers 200 and then fails to send the body it announced: /stall
    (and /stall-anything) announces a chunked body and sends no chunk for TIMEOUT_S * 2, the
    connection kept open; /cut (and /cut-anything) announces 10 bytes and closes without one. It
    records each request's path."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        with connection, contextlib.suppress(OSError):
            data = b""
            while b"\r\n\r\n" not in data:
                data += connection.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            length = next(int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:"))
            while len(body) < length:
                body += connection.recv(65536)
            path = lines[0].split()[1]
            with self.lock:
                self.paths.append(path)
            if path.startswith("/stall"):
                connection.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                time.sleep(TIMEOUT_S * 2)
                connection.sendall(b"0\r\n\r\n")
            else:
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}{path}"

    def got(self, path: str) -> int:
        with self.lock:
            return self.paths.count(path)


def test_a_200_whose_body_comes_late_or_cut_short_is_delivered_once(notified):
    """The status line decides: an endpoint that answered 200 has the event, whatever then
    becomes of the body. Its body read first, a body late past WEBHOOK_TIMEOUT_S (or cut short)
    made the attempt "no answer within" and the event was sent again, and again."""
    stack, _ = notified
    server = LateBodyServer()
    log_from = len(stack.log_text("notifier"))
    hooks = {}
    try:
        for path, job_id in (("/stall-body", 989801), ("/cut-body", 989802)):  # no transcripts: deleted jobs
            hooks[path] = (job_id, *pending_deliveries(stack, server.url(path), job_id, 1))
            kick(stack, job_id, hooks[path][1])
        tried = [f"webhook {webhook_id}: segment.created " for _, webhook_id, _ in hooks.values()]
        wait_for(lambda: all(line in stack.log_text("notifier")[log_from:] for line in tried), 60,
                 "both deliveries tried")
        time.sleep(1 + TIMEOUT_S + 1)  # past a retry's delay and its timeout: none came
        log = stack.log_text("notifier")[log_from:]
        for path, (job_id, webhook_id, _) in hooks.items():
            told = [line for line in log.splitlines() if f"webhook {webhook_id}: " in line]
            assert len(told) == 1 and re.search(r"segment.created delivered \(HTTP 200, \d+ ms, attempt 1\)",
                                                told[0]), told
            assert server.got(path) == 1, (path, server.paths)
            assert not stack.query("SELECT 1 FROM webhook_deliveries WHERE job_id = $1", job_id)
    finally:
        for _, webhook_id, _ in hooks.values():
            stack.query("DELETE FROM webhooks WHERE id = $1", webhook_id)
        server.listener.close()


def names_told(event: dict) -> set[str]:
    """The speaker names a webhook body tells: a segment's, or each of transcript.speakers_updated."""
    data = event["data"]
    if event["type"] == "transcript.speakers_updated":
        return {told["name"] for told in data["speakers"].values() if told["name"] is not None}
    return {data["speaker_name"]} if data.get("speaker_name") is not None else set()


@pytest.mark.parametrize("taken_back_by_hand", [False, True], ids=["named-at-the-forgetting", "taken-back-before"])
def test_a_forgotten_persons_name_is_not_sent_after_the_forgetting_by_events_waiting_to_go(notified, fixtures_dir,
                                                                                          tmp_path,
                                                                                          taken_back_by_hand):
    """DELETE /speakers/{id} took the person's name out of the transcripts, not out of the events
    waiting to be sent: a webhook whose endpoint was down got the job's segment.created with the
    name once it was back, after the forgetting had answered 204, and only then the
    transcript.speakers_updated without it. The pending deliveries, and the outbox rows not yet
    published (a segment.updated and a transcript.speakers_updated here), are rewritten in the
    forgetting's commit, and still verify: a delivery is signed over its body as it is sent.
    `taken_back_by_hand`: the name was taken back by hand (null) before the forgetting, while
    the events that tell it waited; the speaker no longer had it when she was forgotten, and
    only the speakers that lost it then had their events rewritten."""
    stack, receiver = notified
    voices = en_dialogue_voices(fixtures_dir)
    second_half = tmp_path / "second_half.wav"
    second_half.write_bytes(voices["second_half"])
    # The module's notifier gives a backlog up within seconds (MAX_ATTEMPTS); this one retries
    # the first delivery every 2 s, the others waiting behind it, for as long as the test needs.
    env = {**stack.env, "METRICS_PORT": str(stack.metrics_ports["notifier"]), "WEBHOOK_MAX_ATTEMPTS": "1000"}
    stack.stop("notifier")
    log_from = len(stack.log_text("notifier"))
    stack.start("notifier", "-m", "services.notifier", env=env)
    receiver.outage.set()
    api = httpx.Client(base_url=stack.api, timeout=120)
    hook = speaker_id = job_id = None
    try:
        wait_for(lambda: "consuming stt.notifier (" in stack.log_text("notifier")[log_from:], 60, "the notifier")
        enrolled = api.post("/speakers", data={"name": "Anna"}, files={"file": ("anna.wav", voices["a_alone"])})
        assert enrolled.status_code == 201, enrolled.text
        speaker_id = enrolled.json()["id"]
        hook = api.post("/webhooks", json={"url": receiver.url("/outage-forget"), "events": [
            "segment.created", "segment.updated", "transcript.speakers_updated"]}).json()
        job_id = stack.submit_job(second_half)
        segments = stack.wait_finished(job_id, 300)["segments"]
        [label] = {s["speaker"] for s in segments if s.get("speaker_name") == "Anna"}
        other = next(s for s in segments if s["speaker"] != label)

        def deliveries() -> list:
            return stack.query("SELECT event_type, status, payload FROM webhook_deliveries"
                               " WHERE webhook_id = $1 AND job_id = $2 ORDER BY id", hook["id"], job_id)

        # Every segment.created of the job waits for the endpoint, hers with her name.
        waiting = wait_for(lambda: (d := deliveries()) and sum(r["event_type"] == "segment.created" for r in d)
                           == len(segments) and d, 60, "every segment.created fanned out")
        assert all(r["status"] == "pending" for r in waiting)
        assert any(names_told(json.loads(r["payload"])) == {"Anna"} for r in waiting
                   if r["event_type"] == "segment.created")

        async def forget_with_nothing_in_flight() -> float:
            """Her name given to one more segment by hand, and another speaker named by hand (their
            segment.updated and transcript.speakers_updated left in the outbox), then her forgotten;
            when it answered. No attempt of the job's deliveries is under way meanwhile (the
            notifier's lock of the chain), nor a publication from the outbox (the flusher's lock):
            what goes out after the answer was read after it."""
            locks = await asyncpg.connect(stack.database_url)
            try:
                await locks.execute("SELECT pg_advisory_lock($1::int, $2::int)", hook["id"] % 2**31, job_id % 2**31)
                await locks.execute("SELECT pg_advisory_lock($1)", LockKey.OUTBOX)
                async with httpx.AsyncClient(base_url=stack.api, timeout=120) as client:
                    where = f"{other['chunk_index']}/{other['index']}"
                    moved = await client.patch(f"/transcripts/{job_id}/segments/{where}", json={"speaker": label})
                    assert moved.status_code == 200 and moved.json()["speaker_name"] == "Anna", moved.text
                    named = await client.patch(f"/transcripts/{job_id}/speakers", json={other["speaker"]: "Boris"})
                    assert named.status_code == 200, named.text
                    assert await locks.fetchval("SELECT count(*) FROM outbox WHERE routing_key = 'segment.updated'"
                                                " AND body->>'speaker_name' = 'Anna'") == 1
                    assert await locks.fetchval("SELECT count(*) FROM outbox WHERE body->>'job_id' = $1 AND body"
                                                "->'speakers'->$2::text->>'name' = 'Anna'", str(job_id), label) == 1
                    if taken_back_by_hand:
                        unnamed = await client.patch(f"/transcripts/{job_id}/speakers", json={label: None})
                        assert unnamed.status_code == 200 and unnamed.json()["speakers"][label] is None, unnamed.text
                    forgotten = await client.delete(f"/speakers/{speaker_id}")
                    assert forgotten.status_code == 204, forgotten.text
                    return time.monotonic()
            finally:
                await locks.close()  # and with it its locks

        before = len(deliveries())
        forgotten_at = asyncio.run(forget_with_nothing_in_flight())
        speaker_id = None
        receiver.outage.clear()
        # The retry the held lock turned away: due now.
        stack.query("UPDATE webhook_deliveries SET next_attempt_at = now() WHERE webhook_id = $1"
                    " AND status = 'pending'", hook["id"])
        kick(stack, job_id, hook["id"])
        # Then the segment.updated, the name given by hand, and the forgetting's transcript.speakers_updated.
        wait_for(lambda: (d := deliveries()) and len(d) >= before + 3 and all(r["status"] == "delivered" for r in d),
                 60, "every delivery of the job delivered")
        sent = [r for r in receiver.got("/outage-forget") if r["at"] > forgotten_at]
        # (of every job: the forgetting announces the module's other recordings she was named in too)
        told_her = [e for e in map(json.loads, (r["body"] for r in sent)) if "Anna" in names_told(e)]
        assert not told_her, told_her
        events = [e for e in map(json.loads, (r["body"] for r in sent)) if e["data"]["job_id"] == job_id]
        assert [e["type"] for e in events].count("segment.created") == len(segments), events
        hers = [e["data"] for e in events if e["type"].startswith("segment.") and e["data"]["speaker"] == label]
        assert {e["type"] for e in events} >= {"segment.updated", "transcript.speakers_updated"}, events
        assert hers and all(s["speaker_confidence"] is None for s in hers), hers
        # Each transcript.speakers_updated (the one of the name given by hand, rewritten, and the
        # forgetting's, the last; or, her name taken back by hand first, that one's, as the
        # forgetting took nothing from the transcript) tells the name given by hand, and hers no more.
        told = [e["data"]["speakers"] for e in events if e["type"] == "transcript.speakers_updated"]
        assert len(told) == 2 and events[-1]["type"] == "transcript.speakers_updated", events
        no_name = {"name": None, "source": None, "confidence": None}
        last = {**no_name, "source": "manual"} if taken_back_by_hand else no_name
        assert [speakers[label] for speakers in told] == [no_name, last], told
        assert all(speakers[other["speaker"]]["name"] == "Boris" for speakers in told), told
        assert all(verifies(r, hook["secret"]) for r in sent)
    finally:
        receiver.outage.clear()
        if hook is not None:
            api.delete(f"/webhooks/{hook['id']}")
        if speaker_id is not None:
            api.delete(f"/speakers/{speaker_id}")
        if job_id is not None:
            api.delete(f"/transcripts/{job_id}")
        api.close()
        stack.stop("notifier")
        stack.start_service("notifier")


def test_private_targets_are_refused_when_not_allowed(notified):
    stack, receiver = notified
    with another_ingest(stack, "ingest-strict", WEBHOOK_ALLOW_PRIVATE="false") as strict:
        answer = httpx.post(f"{strict}/webhooks", json={"url": receiver.url("/ok")})
        assert answer.status_code == 400 and "private" in answer.json()["detail"], answer.text
        with (Path(__file__).parent / "audio_files.py").open("rb") as f:
            callback = httpx.post(f"{strict}/recognize", files={"file": ("a.wav", f)},
                                  data={"callback_url": "http://169.254.169.254/"})
        assert callback.status_code == 400 and "private" in callback.json()["detail"], callback.text


def test_a_job_deleted_as_soon_as_it_ends_still_calls_back_and_leaves_no_deliveries(notified, fixtures_dir):
    """Its callback (retried: the receiver fails twice) still gets the completion after the job is
    gone; then no delivery of the job, with its text, is left in the database."""
    stack, receiver = notified
    api = httpx.Client(base_url=stack.api, timeout=30)
    hook = api.post("/webhooks", json={"url": receiver.url("/ok-deleted"), "events": ["transcript.completed"]}).json()
    try:
        accepted = stack.submit(fixtures_dir / "jfk.flac", data={"callback_url": receiver.url("/flaky-callback")})
        job_id = accepted.json()["id"]
        assert stack.wait_finished(job_id, 300)["status"] == "done"
        assert api.delete(f"/transcripts/{job_id}").status_code == 204
        wait_for(lambda: receiver.events("/ok-deleted", job_id), 60, "the owner's webhook")
        wait_for(lambda: len(receiver.events("/flaky-callback", job_id)) == 3, 60, "the callback's third attempt")
        assert {e["type"] for e in receiver.events("/flaky-callback", job_id)} == {"transcript.completed"}
        # Its transcript.deleted (to a webhook of an earlier test that takes every event) stays: ids only.
        wait_for(lambda: not stack.query("SELECT 1 FROM webhook_deliveries WHERE job_id = $1"
                                         " AND event_type <> 'transcript.deleted'", job_id)
                 and not stack.query("SELECT 1 FROM webhooks WHERE job_id = $1", job_id), 30,
                 "the deleted job's deliveries and callback to go")
    finally:
        api.delete(f"/webhooks/{hook['id']}")


def purge(stack, queue_name: str) -> None:
    async def run() -> None:
        connection = await connect(stack.settings(), "test-queue-purge")
        try:
            queue = await (await connection.channel()).declare_queue(queue_name, passive=True)
            await queue.purge()
        finally:
            await connection.close()

    asyncio.run(run())


def test_a_deleted_jobs_callback_that_never_got_its_end_goes_once_the_end_cannot_come(notified, fixtures_dir):
    """A job's callback whose transcript.completed never reached a notifier (none there, the event
    lost) stayed for ever after the job was deleted: listed by GET /webhooks for a deleted job,
    its secret kept. It goes when the notifier fans out the job's transcript.deleted (after its
    end, in order), or with the job when the job ended over UNANNOUNCED_CALLBACK_KEPT_S ago (no
    notifier may ever come). A job deleted before the notifier fanned out its end keeps its
    callback until it has been sent."""
    stack, receiver = notified
    api = httpx.Client(base_url=stack.api, timeout=30)
    jobs: dict[str, int] = {}

    def submitted(name: str) -> int:
        jobs[name] = stack.submit_job(fixtures_dir / "jfk.flac",
                                      data={"callback_url": receiver.url(f"/ok-unannounced-{name}")})
        return jobs[name]

    def callback_of(name: str) -> list:
        return stack.query("SELECT id FROM webhooks WHERE job_id = $1", jobs[name])

    def listed() -> set[int]:
        """The jobs whose callbacks GET /webhooks lists."""
        found, cursor = set(), None
        while True:
            page = api.get("/webhooks", params={"limit": 500, **({"cursor": cursor} if cursor else {})}).json()
            found |= {w.get("transcript_id") for w in page["items"]}  # absent for an endpoint
            if (cursor := page.get("next_cursor")) is None:  # absent on the last page
                return found

    def ends_published() -> bool:
        return not stack.query("SELECT 1 FROM outbox WHERE (body->>'job_id')::bigint = ANY($1::bigint[])",
                               list(jobs.values()))

    stack.stop("notifier")
    try:
        # recent: ended just now; old: ended two days ago. No notifier takes their ends.
        for name in ("recent", "old"):
            assert stack.wait_finished(submitted(name), 300)["status"] == "done"
        wait_for(ends_published, 60, "their ends published")
        purge(stack, "stt.notifier.events")
        stack.query("UPDATE job_usage SET ended_at = now() - interval '2 days' WHERE job_id = $1", jobs["old"])
        # announced: deleted before the notifier (back later) fans out its end.
        assert stack.wait_finished(submitted("announced"), 300)["status"] == "done"
        wait_for(ends_published, 60, "its end published")
        for job_id in jobs.values():
            assert api.delete(f"/transcripts/{job_id}").status_code == 204
        assert not callback_of("old") and jobs["old"] not in listed()
        assert callback_of("recent") and callback_of("announced")
    finally:
        stack.start_service("notifier")
        # Their transcript.deleted fanned out before the tests after this one add webhooks that take it.
        with contextlib.suppress(AssertionError):
            wait_for(lambda: notifier_events_waiting(stack) == 0, 60, "the notifier's events fanned out")
    wait_for(lambda: receiver.events("/ok-unannounced-announced", jobs["announced"]), 60,
             "the completion of the job deleted before the notifier fanned it out")
    wait_for(lambda: not callback_of("recent") and not callback_of("announced"), 60,
             "the callbacks to go once their jobs' deletions were fanned out")
    assert not {jobs["recent"], jobs["announced"]} & listed()
    assert [e["type"] for e in receiver.events("/ok-unannounced-announced", jobs["announced"])] == \
        ["transcript.completed"]
    assert not receiver.got("/ok-unannounced-recent") and not receiver.got("/ok-unannounced-old")


def notifier_events_waiting(stack) -> int:
    """Messages in the notifier's stt.notifier.events, ready or in hand (rabbitmqctl counts both)."""
    import urllib.parse

    vhost = urllib.parse.unquote(urllib.parse.urlsplit(stack.amqp_url).path.lstrip("/"))
    listed = subprocess.run(["rabbitmqctl", "list_queues", "-q", "-p", vhost, "name", "messages"],
                            check=True, capture_output=True, text=True, timeout=60).stdout
    return sum(int(row[1]) for row in map(str.split, listed.splitlines())
               if len(row) == 2 and row[0] == "stt.notifier.events")


def test_deleting_a_job_announces_it_on_stt_events_and_to_webhooks(notified, fixtures_dir):
    """DELETE /transcripts/{id} (and retention's deletes) publishes transcript.deleted, committed
    with the deletion: subscribers and the owner's webhooks that take it remove their copies.
    The deleted job's other deliveries go once settled; its transcript.deleted stays (ids only), so
    the deletion announced again (work of a stage that never heard of it) is not delivered again:
    the webhook got a fresh delivery, with a whole retry schedule, at every announcement."""
    import aio_pika

    from common.messages import JobProgress
    from tests.conftest import events_queue, job_events

    stack, receiver = notified
    api = httpx.Client(base_url=stack.api, timeout=30)
    created = api.post("/webhooks", json={"url": receiver.url("/ok-deletions"), "events": ["transcript.deleted"]})
    assert created.status_code == 201, created.text
    hook = created.json()
    try:
        job_id = stack.submit_job(fixtures_dir / "jfk.flac")
        assert stack.wait_finished(job_id, 300)["status"] == "done"

        async def deleted_event(delete) -> dict:
            connection = await aio_pika.connect(stack.amqp_url)
            async with connection:
                queue = await events_queue(await connection.channel(), "transcript.deleted")
                await delete()
                [event] = await job_events(queue, job_id, lambda bodies: bodies, timeout=30)
                return event

        async def delete_job() -> None:
            async with httpx.AsyncClient(base_url=stack.api, timeout=30) as client:
                assert (await client.delete(f"/transcripts/{job_id}")).status_code == 204

        event = asyncio.run(deleted_event(delete_job))
        assert event == {"v": 1, "message_id": f"transcript.deleted:{job_id}", "job_id": job_id,
                         "transcript_id": job_id}
        [request] = wait_for(lambda: receiver.got("/ok-deletions"), 60, "the webhook's transcript.deleted")
        assert verifies(request, hook["secret"]) and request["headers"]["webhook-id"] == event["message_id"]
        body = json.loads(request["body"])
        assert (body["type"], body["data"]) == ("transcript.deleted", event)
        wait_for(lambda: not stack.query("SELECT 1 FROM webhook_deliveries WHERE job_id = $1"
                                         " AND (status = 'pending' OR event_type <> 'transcript.deleted')", job_id),
                 30, "the deleted job's other deliveries to go")
        kept = stack.query("SELECT id, event_type, status FROM webhook_deliveries WHERE job_id = $1"
                           " AND webhook_id = $2", job_id, hook["id"])

        async def late_progress() -> None:  # a diarizer that never heard of the deletion
            connection = await connect(stack.settings(), "test-late-progress")
            try:
                await (await open_bus(connection, stack.settings())).publish(JobProgress(job_id=job_id,
                                                                                         stage="transcribing"))
            finally:
                await connection.close()

        assert asyncio.run(deleted_event(late_progress)) == event  # announced again
        wait_for(lambda: notifier_events_waiting(stack) == 0, 30, "the notifier to take the announcement")
        time.sleep(1)
        assert len(receiver.got("/ok-deletions")) == 1
        assert [(r["event_type"], r["status"]) for r in kept] == [("transcript.deleted", "delivered")]
        again = stack.query("SELECT id, event_type, status FROM webhook_deliveries WHERE job_id = $1"
                            " AND webhook_id = $2", job_id, hook["id"])
        assert [dict(r) for r in again] == [dict(r) for r in kept]
    finally:
        api.delete(f"/webhooks/{hook['id']}")


def test_killing_the_notifier_mid_delivery_loses_nothing(notified, fixtures_dir):
    stack, receiver = notified
    api = httpx.Client(base_url=stack.api, timeout=30)
    hooks = [api.post("/webhooks", json={"url": receiver.url(path)}).json() for path in ("/slow", "/fast")]
    job_id = stack.submit_job(fixtures_dir / "jfk.flac")
    cut_short = wait_for(lambda: receiver.events("/slow", job_id), 300, "the first delivery to /slow")[-1]
    stack.processes["notifier"].kill()  # in the middle of that delivery (it answers after 1 s)
    stack.processes["notifier"].wait()
    stack.start_service("notifier")
    assert stack.wait_finished(job_id, 300)["status"] == "done"
    wanted = wait_for(lambda: (e := receiver.events("/fast", job_id)) and e[-1]["type"] == "transcript.completed"
                      and {x["data"]["message_id"] for x in e}, 120, "every event at /fast")
    # The delivery the kill cut short was never recorded: only the restarted notifier can have
    # marked it delivered, after sending it again.
    log = wait_for(lambda: (d := api.get(f"/webhooks/{hooks[0]['id']}/deliveries").json()["items"])
                   and {x["event_id"] for x in d if x["status"] == "delivered"} == wanted and d, 120,
                   "every event delivered to /slow after the restart")
    assert len(log) == len(wanted)
    assert {e["data"]["message_id"] for e in receiver.events("/slow", job_id)} == wanted
    # The kill did land mid-delivery: the event it cut short was sent again.
    assert [e["data"]["message_id"] for e in receiver.events("/slow", job_id)].count(
        cut_short["data"]["message_id"]) >= 2
    for hook in hooks:
        assert api.delete(f"/webhooks/{hook['id']}").status_code == 204


def test_a_retry_kicked_twice_spends_one_attempt(notified):
    """A delivery's retry can arrive twice (the delayed retry and a redelivery of it, or kicks
    from two replicas): the second must not try again at once, or the attempts meant to last about
    a day are spent in seconds."""
    stack, _ = notified
    settings = stack.settings(webhook_retry_delays_s="600", webhook_max_attempts=8)
    unreachable = f"http://127.0.0.1:{free_port()}/hook"

    async def kicked_twice() -> int:
        pool = await asyncpg.create_pool(stack.database_url, min_size=1, max_size=2)
        connection = await connect(settings, "test-webhook-kicks")
        http = http_session(True)
        webhook_id = await pool.fetchval(
            "INSERT INTO webhooks (url, events, secret) VALUES ($1, $2, $3) RETURNING id",
            unreachable, ["transcript.completed"], "a-secret-of-16-chars")
        try:
            bus = await open_bus(connection, settings)
            await declare_delay_queues(bus.channel, handler.DELIVERY_QUEUE, settings.webhook_retry_delays)
            delivery_id = await pool.fetchval(
                """INSERT INTO webhook_deliveries (webhook_id, event_id, event_type, job_id, payload)
                   VALUES ($1, 'evt-kicked-twice', 'transcript.completed', 919191, '{}') RETURNING id""", webhook_id)
            due = WebhookDue(job_id=919191, webhook_id=webhook_id)
            await handler.deliver(pool, http, settings, bus, due)  # attempt 1 fails: retry in 600 s
            retry = due.model_copy(update={"retry_of": delivery_id, "after_attempts": 1})
            await handler.deliver(pool, http, settings, bus, retry)  # the retry: attempt 2
            await handler.deliver(pool, http, settings, bus, retry)  # the same retry again
            await handler.deliver(pool, http, settings, bus, due)  # a plain kick (the sweep's)
            return await pool.fetchval("SELECT attempts FROM webhook_deliveries WHERE id = $1", delivery_id)
        finally:
            await pool.execute("DELETE FROM webhooks WHERE id = $1", webhook_id)
            channel = await connection.channel()
            await channel.queue_delete(retry_queue(handler.DELIVERY_QUEUE, 600))
            await http.close()
            await connection.close()
            await pool.close()

    assert asyncio.run(kicked_twice()) == 2


def test_the_sweep_kicks_a_busy_webhooks_overdue_jobs_one_at_a_time(notified):
    """A slow endpoint's backlog is overdue without being stuck: kicking each of its waiting jobs
    every sweep (in every replica) piled up kicks, each sent back every few seconds while the
    endpoint stayed busy. Only the job overdue longest (the one a lost kick leaves behind) is
    kicked while another delivery is in flight; all of them once the webhook is idle."""
    stack, _ = notified

    async def swept() -> tuple[set, set, set]:
        pool = await asyncpg.create_pool(stack.database_url, min_size=1, max_size=3)
        try:
            async with pool.acquire() as conn, pool.acquire() as sender:
                # In a transaction rolled back at the end: the stack's own notifier never sees it.
                writing = conn.transaction()
                await writing.start()
                try:
                    webhook_id = await conn.fetchval(
                        "INSERT INTO webhooks (url, events, secret) VALUES ('http://192.0.2.1/hook', $1, $2)"
                        " RETURNING id", ["transcript.completed"], "a-secret-of-16-chars")
                    for job_id, late in ((929291, timedelta(hours=2)), (929292, timedelta(hours=1))):
                        await conn.execute(
                            """INSERT INTO webhook_deliveries (webhook_id, event_id, event_type, job_id, payload,
                                                               next_attempt_at)
                               VALUES ($1, $2, 'transcript.completed', $3, '{}', now() - $4::interval)""",
                            webhook_id, f"evt-overdue-{job_id}", job_id, late)

                    async def overdue() -> set:
                        chains = await handler.overdue_chains(conn)
                        return {r["job_id"] for r in chains if r["webhook_id"] == webhook_id}

                    idle = await overdue()
                    # Another job's delivery in flight to the same webhook.
                    await sender.execute("SELECT pg_advisory_lock($1::int, $2::int)", webhook_id, 929293)
                    busy = await overdue()
                    await sender.execute("SELECT pg_advisory_unlock($1::int, $2::int)", webhook_id, 929293)
                    return idle, busy, await overdue()
                finally:
                    await writing.rollback()
        finally:
            await pool.close()

    idle, busy, idle_again = asyncio.run(swept())
    assert idle == idle_again == {929291, 929292} and busy == {929291}, (idle, busy, idle_again)


def test_the_delivery_log_keeps_settled_deliveries_for_webhook_log_days(notified):
    stack, _ = notified
    settings = stack.settings(webhook_log_days=30)
    webhook_id = stack.value("INSERT INTO webhooks (url, events, secret) VALUES ('https://example.com/hook',"
                             " '{transcript.completed}', 'a-secret-of-16-chars') RETURNING id")
    try:
        for event, status, age_days in (("old-delivered", "delivered", 40), ("old-failed", "failed", 31),
                                        ("recent", "delivered", 10), ("old-but-pending", "pending", 40)):
            delivery = stack.value(
                "INSERT INTO webhook_deliveries (webhook_id, event_id, event_type, job_id, payload, status,"
                " created_at, finished_at) VALUES ($1, $2, 'transcript.completed', 1, '{}', $3,"
                " now() - make_interval(days => $4), CASE WHEN $3 = 'pending' THEN NULL"
                " ELSE now() - make_interval(days => $4) END) RETURNING id", webhook_id, event, status, age_days)
            stack.query("INSERT INTO webhook_attempts (delivery_id, attempt, latency_ms) VALUES ($1, 1, 5)", delivery)

        async def prune() -> int:
            pool = await asyncpg.create_pool(stack.database_url, min_size=1, max_size=1)
            try:
                return await handler.prune_delivery_log(pool, settings)
            finally:
                await pool.close()

        assert asyncio.run(prune()) == 2
        kept = {row["event_id"] for row in stack.query(
            "SELECT event_id FROM webhook_deliveries WHERE webhook_id = $1", webhook_id)}
        assert kept == {"recent", "old-but-pending"}
        assert stack.value("SELECT count(*) FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id"
                           " WHERE d.webhook_id = $1", webhook_id) == 2
    finally:
        stack.query("DELETE FROM webhooks WHERE id = $1", webhook_id)


def test_an_event_of_a_type_the_notifier_does_not_know_is_kept_for_a_newer_notifier(notified):
    """A newer version publishes an event type this notifier does not know (a rolling upgrade
    that brings the notifier last): it is retried, for a newer notifier taking over the events
    queue meanwhile, then parked in stt.dead-letters to be sent back, not dropped (it was lost to
    every webhook that takes it)."""
    import aio_pika

    stack, _ = notified
    job_id = 989898
    body = {"v": 1, "message_id": f"transcript.summarized:{job_id}", "job_id": job_id, "transcript_id": job_id}

    async def publish_and_find_parked() -> dict | None:
        connection = await aio_pika.connect(stack.amqp_url)
        async with connection:
            channel = await connection.channel()
            events = await channel.get_exchange("stt.events")
            await events.publish(aio_pika.Message(json.dumps(body).encode(), content_type="application/json",
                                                  delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                                  message_id=body["message_id"]),
                                 routing_key="transcript.summarized")
            deadline = time.monotonic() + 30  # the retries wait 1 s and 2 s (RETRY_DELAYS_S)
            while time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                looking = await connection.channel()  # the others go back to the queue with it
                queue = await looking.declare_queue(DEAD_LETTERS_QUEUE, passive=True)
                while (message := await queue.get(fail=False)) is not None:
                    if json.loads(message.body).get("message_id") == body["message_id"]:
                        await message.ack()
                        await looking.close()
                        return {"body": json.loads(message.body), "headers": dict(message.headers)}
                await looking.close()
            return None

    found = asyncio.run(publish_and_find_parked())
    log = stack.log_text("notifier")
    assert found is not None, log[-3000:]
    assert found["body"] == body and found["headers"]["x-original-routing-key"] == "transcript.summarized"
    assert "transcript.summarized failed" in log and "upgrade the notifier" in found["headers"]["x-last-error"]
    assert "no handler for routing key 'transcript.summarized'" not in log


def test_a_dead_server_named_by_many_jobs_callbacks_does_not_hold_back_another_endpoint(notified):
    """WEBHOOK_CONCURRENCY counted deliveries per webhook, and every job's callback_url is a webhook
    of its own: 70 jobs calling back one dead server took all 32 of the notifier's delivery slots
    (each for WEBHOOK_TIMEOUT_S, twice over), and another endpoint's delivery waited behind them.
    They are counted per endpoint (scheme, host and port) now."""
    stack, receiver = notified
    dead = Receiver()  # a server of its own (another port): every /dead path holds requests past the timeout
    webhook_ids = []
    try:
        dues = callbacks_to_one_server(stack, dead, 989000, 70)
        webhook_ids = [due.webhook_id for due in dues]
        healthy_id, _ = pending_deliveries(stack, receiver.url("/ok-beside-a-dead-server"), 989099, 1)
        webhook_ids.append(healthy_id)

        async def kick_the_dead_then_the_healthy() -> float:
            """When the healthy endpoint's kick was published: once the notifier has taken every
            dead kick it will take, so that the time to its delivery is not the time to publish
            and sort out the dead kicks on a loaded machine."""
            connection = await connect(stack.settings(), "test-webhook-kick")
            try:
                bus = await open_bus(connection, stack.settings())
                # All at once: counted per webhook, every slot is held by the dead server
                # (WEBHOOK_TIMEOUT_S) before the healthy kick is published behind those still queued.
                await asyncio.gather(*(bus.publish(due) for due in dues))
                counting = await connection.channel()
                deadline = time.monotonic() + 30
                while True:
                    queue = await counting.declare_queue(handler.DELIVERY_QUEUE, passive=True, robust=False)
                    # Counted per endpoint, the notifier takes them all (those past the dead
                    # server's share sent back to wait); per webhook, only as many as its slots.
                    taken = (queue.declaration_result.message_count == 0
                             or len(dead.got_under("/dead")) >= DELIVERY_PREFETCH)
                    if taken and dead.got_under("/dead"):
                        break
                    assert time.monotonic() < deadline, "timed out waiting for the dead kicks taken"
                    await asyncio.sleep(0.1)
                published = time.monotonic()
                await bus.publish(WebhookDue(job_id=989099, webhook_id=healthy_id))
                return published
            finally:
                await connection.close()

        published = asyncio.run(kick_the_dead_then_the_healthy())
        first = min(r["at"] for r in dead.got_under("/dead"))
        delivered = wait_for(lambda: receiver.got("/ok-beside-a-dead-server"), 30, "the other endpoint's delivery")
        # Not held behind the dead server: counted per webhook, it waited for the slots the dead
        # server's requests held to be freed, a round of WEBHOOK_TIMEOUT_S or two.
        assert delivered[0]["at"] - published < TIMEOUT_S, delivered[0]["at"] - published
        time.sleep(max(0.0, first + TIMEOUT_S - 0.3 - time.monotonic()))
        # Before the first attempt there timed out (freeing a slot): those in flight at once.
        at_once = [r for r in dead.got_under("/dead") if r["at"] < first + TIMEOUT_S - 0.3]
        assert len(at_once) <= stack.settings().webhook_concurrency, len(at_once)
    finally:
        for webhook_id in webhook_ids:
            stack.query("DELETE FROM webhooks WHERE id = $1", webhook_id)
        dead.server.shutdown()


def wait_until_no_kick_goes_round(stack) -> None:
    """A test before may leave kicks going round for a webhook it removed (each stops on its next
    turn): until none waits for a slot for longer than a turn, not only at one instant (a kick is
    out of that queue while the notifier handles it)."""
    busy_queue = retry_queue(handler.DELIVERY_QUEUE, handler.BUSY_ENDPOINT_DELAY_S)
    quiet_since = time.monotonic()

    def no_kick_going_round() -> bool:
        nonlocal quiet_since
        if messages_in(stack, busy_queue):
            quiet_since = time.monotonic()
        return time.monotonic() - quiet_since > handler.BUSY_ENDPOINT_DELAY_S + 1

    wait_for(no_kick_going_round, 60, "no kick waiting for a slot")


def test_the_sweep_does_not_kick_again_chains_waiting_for_their_endpoints_slot(notified):
    """A job's chain waiting for its endpoint's slot is sent back every BUSY_ENDPOINT_DELAY_S by
    its own kick. Counted per endpoint, such a chain held no lock the sweep could see, so the
    sweep took it for stuck and kicked it again every round, in every replica, and the kicks
    piled up (each sent back every few seconds for as long as the endpoint stayed busy). Rounds
    of the sweep add no kick to it now: the kicks waiting for the slot stay one per chain."""
    stack, _ = notified
    busy_queue = retry_queue(handler.DELIVERY_QUEUE, handler.BUSY_ENDPOINT_DELAY_S)
    wait_until_no_kick_goes_round(stack)
    dead = Receiver()
    chains = 24
    log_from = len(stack.log_text("notifier"))
    webhook_ids = []
    try:
        dues = callbacks_to_one_server(stack, dead, 988000, chains, overdue=True)
        webhook_ids = [due.webhook_id for due in dues]
        kick_all(stack, dues)
        wait_for(lambda: dead.got_under("/dead") and messages_in(stack, handler.DELIVERY_QUEUE) == 0, 30,
                 "every kick taken by the notifier")
        time.sleep(1)  # the last of them sent back

        async def sweep_for_a_while() -> list:
            pool = await asyncpg.create_pool(stack.database_url, min_size=1, max_size=2)
            connection = await connect(stack.settings(), "test-webhook-sweep")
            try:
                bus = await open_bus(connection, stack.settings())
                sweeping = asyncio.create_task(handler.sweep_stuck(pool, bus, every_s=0.5))  # ten rounds
                await asyncio.sleep(5)
                sweeping.cancel()
                await asyncio.gather(sweeping, return_exceptions=True)
                return [r for r in await handler.overdue_chains(pool) if r["webhook_id"] in webhook_ids]
            finally:
                await connection.close()
                await pool.close()

        with queue_depths(stack, busy_queue) as waiting:
            taken_for_stuck = asyncio.run(sweep_for_a_while())
            time.sleep(handler.BUSY_ENDPOINT_DELAY_S)  # the last round's kicks, had there been any, sent back
        assert waiting and max(waiting) <= chains, waiting
        assert not taken_for_stuck, taken_for_stuck
        log = stack.log_text("notifier")[log_from:]
        assert "webhook.due failed" not in log, log[-3000:]
    finally:
        for webhook_id in webhook_ids:
            stack.query("DELETE FROM webhooks WHERE id = $1", webhook_id)
        dead.server.shutdown()


def test_chains_waiting_for_a_busy_endpoint_ask_the_database_once_a_minute_not_at_every_turn(notified, monkeypatch):
    """Each kick sent back to wait for its endpoint's slot (every BUSY_ENDPOINT_DELAY_S per waiting
    chain) looked its webhook's URL up and ran the sweep's mark, which writes only once a
    WAITING_MARKED_EVERY_S: thousands of chains waiting for a dead server made hundreds of queries
    a second, none of them a delivery. A chain's first turn looks up and marks; the turns after
    ask nothing until the mark is due again, and then it is written. A removed webhook's kick
    still stops, and its endpoint, remembered, sends nothing."""
    stack, _ = notified
    marked_every_s = 8
    monkeypatch.setattr(handler, "WAITING_MARKED_EVERY_S", marked_every_s)  # a minute, made short
    # The kicks sent back stay in their delay queue, to be counted.
    monkeypatch.setattr(handler, "BUSY_ENDPOINT_DELAY_S", 600)
    server = Receiver()  # answers 200 to anything sent here
    chains = 20
    first_job_id = 987000

    async def turns() -> dict:
        statements: list[str] = []

        async def counting(conn: asyncpg.Connection) -> None:
            conn.add_query_logger(lambda record: statements.append(record.query))

        async def webhook_statements() -> int:
            await asyncio.sleep(0.1)  # loggers are called soon after, not during
            return sum("webhook" in statement for statement in statements)

        pool = await asyncpg.create_pool(stack.database_url, min_size=1, max_size=2, init=counting)
        looking = await asyncpg.create_pool(stack.database_url, min_size=1, max_size=1)
        http = http_session(True)
        busy = endpoint(server.url("/"))
        seen: dict = {}
        with private_vhost() as vhost:  # the kicks sent back go there, away from the stack's notifier
            settings = stack.settings(amqp_url=amqp_url(vhost))
            connection = await connect(settings, "test-webhook-turns")
            webhook_ids = []
            try:
                bus = await open_bus(connection, settings)
                await declare_delay_queues(bus.channel, handler.DELIVERY_QUEUE, [handler.BUSY_ENDPOINT_DELAY_S])
                dues = []
                for job_id in range(first_job_id, first_job_id + chains):
                    webhook_id = await looking.fetchval(
                        "INSERT INTO webhooks (url, events, secret) VALUES ($1, '{segment.created}',"
                        " 'a-secret-of-16-chars') RETURNING id", server.url(f"/waiting?job={job_id}"))
                    webhook_ids.append(webhook_id)
                    # Due 100 s ago: past a mark's age, not yet the sweep's STUCK_AFTER_S.
                    await looking.execute(
                        """INSERT INTO webhook_deliveries (webhook_id, event_id, event_type, job_id, payload,
                                                           next_attempt_at)
                           VALUES ($1, $2, 'segment.created', $3, '{}', now() - interval '100 seconds')""",
                        webhook_id, f"evt-waiting-{job_id}", job_id)
                    dues.append(WebhookDue(job_id=job_id, webhook_id=webhook_id))

                async def marked_since(at) -> int:
                    return await looking.fetchval("SELECT count(*) FROM webhook_deliveries WHERE webhook_id = ANY ($1)"
                                                  " AND next_attempt_at >= $2", webhook_ids, at)

                async def sent_back() -> int:
                    """The kicks sent back since the last call (taken out of their delay queue)."""
                    queue = await bus.channel.declare_queue(
                        retry_queue(handler.DELIVERY_QUEUE, handler.BUSY_ENDPOINT_DELAY_S), passive=True)
                    count = 0
                    while await queue.get(no_ack=True, fail=False, timeout=10) is not None:
                        count += 1
                    return count

                # Every slot of the endpoint taken by deliveries in flight in this process.
                handler._in_flight[busy] = settings.webhook_concurrency
                started = await looking.fetchval("SELECT now()")
                for due in dues:
                    await handler.deliver(pool, http, settings, bus, due)
                first_turn_ended = time.monotonic()
                seen["first turn"] = await webhook_statements()
                seen["marked"] = await marked_since(started)
                for _ in range(9):  # nine turns more, each BUSY_ENDPOINT_DELAY_S after the one before in a notifier
                    for due in dues:
                        await handler.deliver(pool, http, settings, bus, due)
                seen["ten turns"] = await webhook_statements()
                seen["sent back"] = await sent_back()
                await asyncio.sleep(max(0.0, first_turn_ended + marked_every_s + 0.5 - time.monotonic()))
                removed, removed_too = dues[0], dues[1]
                await looking.execute("DELETE FROM webhooks WHERE id = ANY ($1)",
                                      [removed.webhook_id, removed_too.webhook_id])
                started = await looking.fetchval("SELECT now()")
                for due in dues:
                    await handler.deliver(pool, http, settings, bus, due)
                seen["eleven turns"] = await webhook_statements()
                seen["marked again"] = await marked_since(started)
                seen["sent back again"] = await sent_back()
                # The endpoint free: a removed webhook's kick sends nothing, a webhook's there goes.
                handler._in_flight.pop(busy)
                await handler.deliver(pool, http, settings, bus, removed_too)
                await handler.deliver(pool, http, settings, bus, dues[2])
                seen["delivered"] = sorted(r["path"] for r in server.got_under("/waiting"))
                return seen
            finally:
                handler._in_flight.pop(busy, None)
                await looking.execute("DELETE FROM webhooks WHERE id = ANY ($1)", webhook_ids)
                await connection.close()
                await http.close()
                await looking.close()
                await pool.close()
                server.server.shutdown()

    seen = asyncio.run(turns())
    # The first turn: each chain's webhook looked up, and its mark written.
    assert seen["first turn"] == 2 * chains and seen["marked"] == chains, seen
    # Nine turns more ask nothing (they asked two statements a chain a turn).
    assert seen["ten turns"] == seen["first turn"], seen
    assert seen["sent back"] == 10 * chains, seen
    # Once the mark is due again, a statement a chain: written again for every chain still there;
    # the kicks of the two removed webhooks are not sent back.
    assert seen["eleven turns"] == seen["ten turns"] + chains, seen
    assert seen["marked again"] == chains - 2 and seen["sent back again"] == chains - 2, seen
    assert seen["delivered"] == [f"/waiting?job={first_job_id + 2}"], seen


def publish_events(stack, events: list) -> None:
    """Publish public events on stt.events, as the persister's outbox does."""
    published(stack, events, as_events=True)


def test_a_busy_endpoint_has_one_request_of_a_job_going_round_however_many_of_its_events_wait(notified):
    """fan_out asks for each event's delivery on its own, and while the endpoint was busy every
    such request went round the delay queue, each BUSY_ENDPOINT_DELAY_S: a slow receiver behind on
    thousands of a job's events had thousands of requests cycling through RabbitMQ and the
    notifier, ahead of other endpoints' in the same queue. One request of the job goes round now
    (the others are dropped), and the receiver still gets every event once, in order."""
    stack, receiver = notified
    busy_queue = retry_queue(handler.DELIVERY_QUEUE, handler.BUSY_ENDPOINT_DELAY_S)
    wait_until_no_kick_goes_round(stack)
    # The stack's notifier, with one delivery at a time to an endpoint: each /slow delivery takes 1 s.
    env = {**stack.env, "METRICS_PORT": str(stack.metrics_ports["notifier"]), "WEBHOOK_CONCURRENCY": "1"}
    stack.stop("notifier")
    log_from = len(stack.log_text("notifier"))
    stack.start("notifier", "-m", "services.notifier", env=env)
    # A key's job: the key-less endpoints other tests leave (they take key-less jobs' events) take
    # none of its events, so the requests going round are all its callback's.
    job_id = stack.value("INSERT INTO transcripts (filename, owner, status, stage, progress, completed_at)"
                         " VALUES ('many-events.wav', 'a-key-of-its-own', 'done', 'done', 1, now()) RETURNING id")
    try:
        wait_for(lambda: "consuming stt.notifier (" in stack.log_text("notifier")[log_from:], 60, "the notifier")
        stack.query("INSERT INTO webhooks (url, events, secret, job_id) VALUES ($1, '{segment.created}',"
                    " 'a-secret-of-16-chars', $2)", receiver.url("/slow-many-events"), job_id)
        events = [SegmentCreated(job_id=job_id, transcript_id=job_id, chunk_index=0, index=n, speaker="spk_0",
                                 start_ts=n, end_ts=n + 1, text=f"segment {n}") for n in range(20)]
        with queue_depths(stack, busy_queue) as waiting:
            publish_events(stack, events)
            # Well before the sweep (STUCK_AFTER_S) would kick a delivery a dropped request left behind.
            wait_for(lambda: len(receiver.events("/slow-many-events", job_id)) >= len(events)
                     and not stack.query("SELECT 1 FROM webhook_deliveries WHERE job_id = $1 AND status = 'pending'",
                                         job_id), 60, "every event delivered")
        delivered = [e["data"]["message_id"] for e in receiver.events("/slow-many-events", job_id)]
        assert delivered == [event.message_id for event in events]
        # One request went round while the job's events waited for the endpoint, not one per event.
        assert max(waiting) == 1, waiting
        wait_until_no_kick_goes_round(stack)  # and it stopped once they were sent
        log = stack.log_text("notifier")[log_from:]
        assert "webhook.due failed" not in log, log[-3000:]
    finally:
        stack.query("DELETE FROM transcripts WHERE id = $1", job_id)  # its webhook and deliveries go with it
        stack.stop("notifier")
        stack.start_service("notifier")


def test_a_jobs_request_going_round_that_does_not_come_back_holds_back_its_new_ones_only_a_while(notified,
                                                                                              monkeypatch):
    """The delay queue is shared: the request going round for a job may come back to another
    replica, or be lost. The job's new requests, dropped while it goes round, go round again once it
    has not come back for GOING_ROUND_LOST_AFTER_S (held back for ever, the job's deliveries waited
    for the sweep); the old one, coming back after all, is dropped in turn. Once the endpoint is
    free, the one going round sends all of the job's deliveries, in order."""
    stack, _ = notified
    lost_after_s = 2
    monkeypatch.setattr(handler, "GOING_ROUND_LOST_AFTER_S", lost_after_s)  # a few turns, made short
    # The requests sent round stay in their delay queue, to be taken out.
    monkeypatch.setattr(handler, "BUSY_ENDPOINT_DELAY_S", 600)
    server = Receiver()  # answers 200 to anything sent here
    job_id = 986000  # no transcript: a deleted job's
    webhook_id, event_ids = pending_deliveries(stack, server.url("/going-round"), job_id, 3)

    async def turns() -> dict:
        pool = await asyncpg.create_pool(stack.database_url, min_size=1, max_size=2)
        http = http_session(True)
        busy = endpoint(server.url("/"))
        seen: dict = {}
        with private_vhost() as vhost:  # away from the stack's notifier
            settings = stack.settings(amqp_url=amqp_url(vhost))
            connection = await connect(settings, "test-webhook-going-round")
            try:
                bus = await open_bus(connection, settings)
                await declare_delay_queues(bus.channel, handler.DELIVERY_QUEUE, [handler.BUSY_ENDPOINT_DELAY_S])
                delay_queue = await bus.channel.declare_queue(
                    retry_queue(handler.DELIVERY_QUEUE, handler.BUSY_ENDPOINT_DELAY_S), passive=True)

                async def taken_out() -> list[str]:
                    """The requests sent round since the last call, taken out of the delay queue as
                    another replica takes them."""
                    taken = []
                    while (message := await delay_queue.get(no_ack=True, fail=False, timeout=10)) is not None:
                        taken.append(WebhookDue.model_validate_json(message.body).message_id)
                    return taken

                def named(*dues: WebhookDue) -> list[str]:
                    return [due.message_id for due in dues]

                async def requested() -> WebhookDue:
                    """A new request of the job, as fan_out makes one for each event."""
                    due = WebhookDue(job_id=job_id, webhook_id=webhook_id)
                    await handler.deliver(pool, http, settings, bus, due)
                    return due

                handler._in_flight[busy] = settings.webhook_concurrency  # every slot of the endpoint taken
                first = await requested()
                second = await requested()
                seen["two requested, one sent round"] = await taken_out() == named(first)
                await requested()
                seen["while the first may come back"] = await taken_out()
                await asyncio.sleep(lost_after_s + 0.5)
                third = await requested()
                seen["once the first did not come back"] = await taken_out() == named(third)
                await handler.deliver(pool, http, settings, bus, first)  # back after all
                await handler.deliver(pool, http, settings, bus, second)  # a copy of a request dropped
                seen["the first back after all"] = await taken_out()
                handler._in_flight.pop(busy)  # the endpoint free: the one going round comes back
                await handler.deliver(pool, http, settings, bus, third)
                seen["delivered"] = [e["data"]["message_id"] for e in server.events("/going-round", job_id)]
                return seen
            finally:
                handler._in_flight.pop(busy, None)
                await connection.close()
                await http.close()
                await pool.close()

    try:
        seen = asyncio.run(turns())
    finally:
        stack.query("DELETE FROM webhooks WHERE id = $1", webhook_id)
        server.server.shutdown()
    assert seen == {"two requested, one sent round": True, "while the first may come back": [],
                    "once the first did not come back": True, "the first back after all": [],
                    "delivered": event_ids}, seen


def test_a_job_given_up_on_once_gets_a_whole_schedule_again_once_the_endpoint_has_delivered_since(notified):
    """Behind a delivery of a job given up, the job's later ones got one attempt each for ever,
    though the endpoint had delivered other jobs' events since: a job given up on one bad day had
    its deletion, a week later, tried once and given up at its first 502. One attempt each only
    while the endpoint has delivered nothing since the one given up, or where the endpoint
    answered the one given up with a refusal (a 4xx: it refuses that job, and each of the job's
    events waiting out a whole schedule held its chain for a year)."""
    stack, receiver = notified
    back_job, still_dead_job, other_job, refused_job = 989898, 989899, 989900, 989901  # no transcripts
    webhook_id = stack.value("INSERT INTO webhooks (url, events, secret) VALUES ($1, '{segment.created}',"
                             " 'a-secret-of-16-chars') RETURNING id", receiver.url("/refusing-since"))

    def delivery(event_id: str, job_id: int, status: str = "pending", settled_days_ago: int | None = None) -> int:
        return stack.value("INSERT INTO webhook_deliveries (webhook_id, event_id, event_type, job_id, payload,"
                           " status, attempts, finished_at) VALUES ($1, $2, 'segment.created', $3, $4, $5, $6,"
                           " now() - make_interval(days => $7)) RETURNING id", webhook_id, event_id, job_id,
                           json.dumps({"type": "segment.created", "data": {"job_id": job_id, "message_id": event_id}}),
                           status, 0 if status == "pending" else MAX_ATTEMPTS, settled_days_ago)

    try:
        refused = delivery("evt-refused-given-up", refused_job, "failed", 7)
        stack.query("INSERT INTO webhook_attempts (delivery_id, attempt, status_code, latency_ms)"
                    " VALUES ($1, $2, 404, 5)", refused, MAX_ATTEMPTS)
        delivery("evt-back-given-up", back_job, "failed", 7)
        delivery("evt-other-delivered", other_job, "delivered", 6)
        delivery("evt-still-dead-given-up", still_dead_job, "failed", 5)
        delivery("evt-back-later", back_job)
        delivery("evt-still-dead-later", still_dead_job)
        delivery("evt-refused-later", refused_job)
        kick_all(stack, [WebhookDue(job_id=back_job, webhook_id=webhook_id),
                         WebhookDue(job_id=still_dead_job, webhook_id=webhook_id),
                         WebhookDue(job_id=refused_job, webhook_id=webhook_id)])
        wait_for(lambda: not stack.query("SELECT 1 FROM webhook_deliveries WHERE webhook_id = $1"
                                         " AND status = 'pending'", webhook_id), 120, "both later deliveries settled")
        # Given up before the endpoint delivered again: its whole schedule.
        assert len(receiver.events("/refusing-since", back_job)) == MAX_ATTEMPTS
        # Given up after the endpoint last delivered: one attempt, as before.
        assert len(receiver.events("/refusing-since", still_dead_job)) == 1
        # Refused by an endpoint that delivers other jobs: one attempt.
        assert len(receiver.events("/refusing-since", refused_job)) == 1
    finally:
        stack.query("DELETE FROM webhooks WHERE id = $1", webhook_id)


def test_a_name_server_blip_is_answered_503_with_retry_after_not_a_final_400(notified, monkeypatch):
    """A public URL checked while the name servers failed for the moment (EAI_AGAIN) was refused
    as a name that does not resolve, 400, for POST /webhooks, a /recognize callback_url and url: a
    client takes a 400 as final, and the URL was refused for good. Now a 503 with Retry-After; a
    name that does not exist is still refused in the words a private address is."""
    import socket

    from litestar.testing import TestClient

    from services.ingest.app import create_app

    stack, _ = notified
    real_lookup = socket.getaddrinfo

    def lookup(host, *args, **kwargs):
        if host == "blip.example":
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        if host == "nothing.example":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real_lookup(host, *args, **kwargs)

    with TestClient(create_app(stack.settings(webhook_allow_private=False, audio_url_allow_private=False)),
                    timeout=60) as client:
        monkeypatch.setattr(socket, "getaddrinfo", lookup)  # once the app is up: its own connections resolve as ever
        registered = client.post("/webhooks", json={"url": "https://blip.example/hook"})
        with (Path(__file__).parent / "audio_files.py").open("rb") as f:
            submitted = client.post("/recognize", files={"file": ("a.wav", f)},
                                    data={"callback_url": "https://blip.example/hook"})
        fetched = client.post("/recognize", files={"url": (None, "https://blip.example/a.wav")})
        missing = client.post("/webhooks", json={"url": "https://nothing.example/hook"})
    # Not checked first where private addresses are allowed: the blip meets the fetch's own lookup.
    monkeypatch.undo()
    with TestClient(create_app(stack.settings(audio_url_allow_private=True)), timeout=60) as client:
        monkeypatch.setattr(socket, "getaddrinfo", lookup)
        fetched_unchecked = client.post("/recognize", files={"url": (None, "http://blip.example/a.wav")})
    for answer in (registered, submitted, fetched, fetched_unchecked):
        assert answer.status_code == 503 and int(answer.headers["retry-after"]) > 0, answer.text
        assert "blip.example could not be resolved for now" in answer.json()["detail"], answer.text
    assert missing.status_code == 400, missing.text
    assert missing.json()["detail"] == ("webhook URL refused: nothing.example does not resolve to a public address"
                                        " (set WEBHOOK_ALLOW_PRIVATE=true to allow private ones)")
    assert not stack.query("SELECT 1 FROM webhooks WHERE url = 'https://blip.example/hook'")


def test_owner_less_webhooks_take_no_events_while_api_keys_are_set(notified):
    """A webhook registered while API_KEYS was unset has no owner: once keys are set, no key can
    list or remove it, yet it got every owner-less job's events (a bucket drop's without
    INBOX_API_KEY), segment text included. While keys are set it takes none, and the notifier
    says at start how many there are and how to remove them; a key's webhook, and an owner-less
    job's own callback_url (only that job's ending, asked for by its submitter), still take theirs.
    Without keys the owner-less webhook takes them as before."""
    from common.messages import SegmentCreated, TranscriptCompleted

    stack, receiver = notified
    ownerless_job, keyed_job = (stack.value(
        "INSERT INTO transcripts (filename, status, stage, progress, owner) VALUES ($1, 'done', 'done', 1, $2)"
        " RETURNING id", filename, owner) for filename, owner in (("ownerless.wav", None), ("keyed.wav", "a-key-hash")))
    everything = ["segment.created", "transcript.completed"]
    ownerless_hook = stack.value("INSERT INTO webhooks (url, events, secret) VALUES ($1, $2, 'a-secret-of-16-chars')"
                                 " RETURNING id", receiver.url("/ok-ownerless"), everything)
    keyed_hook = stack.value("INSERT INTO webhooks (owner, url, events, secret) VALUES ('a-key-hash', $1, $2,"
                             " 'a-secret-of-16-chars') RETURNING id", receiver.url("/ok-keyed"), everything)
    stack.query("INSERT INTO webhooks (url, events, secret, job_id) VALUES ($1, '{transcript.completed}',"
                " 'a-secret-of-16-chars', $2)", receiver.url("/ok-ownerless-callback"), ownerless_job)
    ownerless_hooks = stack.value("SELECT count(*) FROM webhooks WHERE owner IS NULL AND job_id IS NULL")
    # A delivery the owner-less webhook still had pending when keys were set (its endpoint was down).
    queued = stack.value("INSERT INTO webhook_deliveries (webhook_id, event_id, event_type, job_id, payload,"
                         " next_attempt_at) VALUES ($1, 'queued-before-keys', 'segment.created', $2, '{}',"
                         " now() + interval '1 hour') RETURNING id", ownerless_hook, ownerless_job)

    def publish_events(*events) -> None:
        async def publish() -> None:
            connection = await connect(stack.settings(), "test-ownerless-events")
            try:
                bus = await open_bus(connection, stack.settings())
                for event in events:
                    await bus.publish_event(event)
            finally:
                await connection.close()

        asyncio.run(publish())

    def segment_of(job_id: int) -> SegmentCreated:
        return SegmentCreated(job_id=job_id, transcript_id=job_id, chunk_index=0, index=0, speaker="spk_0",
                              start_ts=0.0, end_ts=1.0, text="the account number is 4711")

    env = {**stack.env, "METRICS_PORT": str(stack.metrics_ports["notifier"]), "API_KEYS": "key-a,key-b"}
    stack.stop("notifier")
    log_from = len(stack.log_text("notifier"))
    stack.start("notifier", "-m", "services.notifier", env=env)
    try:
        wait_for(lambda: "consuming stt.notifier (" in stack.log_text("notifier")[log_from:], 60, "the notifier")
        log = stack.log_text("notifier")[log_from:]
        warned = re.findall(r"\| WARNING +\| [\w.:]+ \| (\d+) webhooks registered while API_KEYS was unset .*"
                            r"\((\d+) deliveries they had pending given up\).*"
                            r"DELETE FROM webhooks WHERE owner IS NULL AND job_id IS NULL", log)
        assert len(warned) == 1 and warned[0][0] == str(ownerless_hooks) and int(warned[0][1]) >= 1, log
        assert stack.value("SELECT status FROM webhook_deliveries WHERE id = $1", queued) == "failed"
        publish_events(segment_of(ownerless_job), segment_of(keyed_job),
                       TranscriptCompleted(job_id=ownerless_job, transcript_id=ownerless_job,
                                           filename="ownerless.wav", segment_count=1))
        # Events are fanned out in the order they came: by the callback's, the segments' were too.
        wait_for(lambda: receiver.events("/ok-ownerless-callback", ownerless_job), 60, "the owner-less job's callback")
        wait_for(lambda: receiver.events("/ok-keyed", keyed_job), 60, "the key's webhook")
        assert not stack.query("SELECT 1 FROM webhook_deliveries WHERE webhook_id = $1 AND id <> $2", ownerless_hook,
                               queued)
        assert not receiver.got("/ok-ownerless")

        stack.stop("notifier")
        stack.start_service("notifier")  # without keys, as before
        publish_events(segment_of(ownerless_job))
        [sent] = wait_for(lambda: receiver.events("/ok-ownerless", ownerless_job), 60, "the owner-less webhook")
        assert sent["data"]["text"] == "the account number is 4711"
    finally:
        stack.query("DELETE FROM webhooks WHERE id = ANY ($1::bigint[])", [ownerless_hook, keyed_hook])
        stack.query("DELETE FROM transcripts WHERE id = ANY ($1::bigint[])", [ownerless_job, keyed_job])
        stack.stop("notifier")
        stack.start_service("notifier")
