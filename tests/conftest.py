"""The real stack for tests (devstack.py: RabbitMQ in a fresh vhost, PostgreSQL in a fresh
database, moto's S3 server, a stand-in Ollama with the real bundled model, and the six services
each as its own process, exactly as `make run` starts them), and what tests share."""

from __future__ import annotations

import os

# Before common.settings is imported (its .env is chosen then): a .env of the checkout is for
# `make run`, not for the Settings() the tests build in this process.
os.environ["STT_ENV_FILE"] = ""

import asyncio
import contextlib
import copy
import json
import re
import subprocess
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import aio_pika
import asyncpg
import httpx
import pytest

from common import runner
from common.storage import pcm_key, upload_bytes
from devstack import (  # noqa: F401 (re-exported for the tests)
    ROOT,
    SECRETS,
    SERVICES,
    TEST_ENV,
    Stack,
    free_port,
    postgres_server,
    rabbitmqctl,
    setting_names,
    wait_for_port,
)
from devstack import running_stack as dev_stack

# Nor are the settings of the developer's shell (API_KEYS left from trying `make run`) the tests':
# the stacks drop them too (devstack.stack_environment).
_SETTINGS = setting_names()
for _name in [name for name in os.environ if name.upper() in _SETTINGS]:
    del os.environ[_name]

FIXTURES = Path(os.environ.get("STT_FIXTURES", ROOT.parent / "shared" / "fixtures"))


@contextlib.contextmanager
def private_vhost() -> Iterator[str]:
    """A RabbitMQ vhost of its own for a test, removed after it."""
    vhost = f"stt_private_{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    try:
        yield vhost
    finally:
        rabbitmqctl("delete_vhost", vhost)


def amqp_url(vhost: str) -> str:
    return f"amqp://guest:guest@127.0.0.1:5672/{vhost}"


@pytest.fixture
def fresh_runner():
    """The process-wide stop signal made anew, before and after: one made by an earlier test
    belongs to that test's event loop (the tests of a file share one)."""
    runner._stopping = None
    runner._drained.clear()
    yield
    runner._stopping = None
    runner._drained.clear()


# Figures the fault and bad-input tests measured, printed at the end of the run.
FIGURES: list[str] = []


def record_figure(line: str) -> None:
    FIGURES.append(line)


def pytest_sessionfinish(session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # a pytest-xdist worker: its figures go to the run that prints them
        workeroutput["figures"] = FIGURES


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    FIGURES.extend(getattr(node, "workeroutput", {}).get("figures", []))


def pytest_terminal_summary(terminalreporter) -> None:
    if FIGURES:
        terminalreporter.section("figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


async def events_queue(channel: aio_pika.abc.AbstractChannel, *routing_keys: str) -> aio_pika.abc.AbstractQueue:
    """An exclusive queue bound to stt.events for these routing keys, as a subscriber makes one."""
    exchange = await channel.declare_exchange("stt.events", aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(exclusive=True)
    for routing_key in routing_keys:
        await queue.bind(exchange, routing_key)
    return queue


async def job_events(queue: aio_pika.abc.AbstractQueue, job_id: int | None, enough, timeout: float) -> list[dict]:
    """The bodies of the job's events (None: every job's) on `queue`, acked as they come, once
    `enough(bodies)` holds (AssertionError after `timeout` seconds)."""
    bodies: list[dict] = []
    deadline = time.monotonic() + timeout
    while not enough(bodies):
        assert time.monotonic() < deadline, f"job {job_id}: the events expected never came ({len(bodies)} came)"
        message = await queue.get(fail=False)
        if message is None:
            await asyncio.sleep(0.2)
            continue
        await message.ack()
        body = json.loads(message.body)
        if job_id is None or body["transcript_id"] == job_id:
            bodies.append(body)
    return bodies


# How the diarizer ends each delivery of a job.submitted (one of these per delivery, job=<id> stamped).
DIARIZER_DELIVERY_ENDED = r"job\.submitted skipped|\d+ turns, \d+ speakers, \d+ chunks|not diarized|diarizing stopped"


def wait_deliveries_handled(stack: Stack, job_id: int, deliveries: int, timeout: float = 300) -> None:
    """Until the diarizer has ended `deliveries` deliveries of the job's job.submitted and what they
    sent on has been handled too (the stage queues and the job's outbox rows empty); AssertionError
    after `timeout` seconds."""
    vhost = urllib.parse.unquote(urllib.parse.urlsplit(stack.amqp_url).path.lstrip("/"))
    stages = {f"stt.{service}" for service in ("diarizer", "transcriber", "embedder", "persister")}
    ended = re.compile(rf"job={job_id} .*(?:{DIARIZER_DELIVERY_ENDED})")
    deadline, waiting, unsent = time.monotonic() + timeout, {}, None
    while True:
        handled = len(ended.findall(stack.log_text("diarizer")))
        if handled >= deliveries:
            listed = subprocess.run(["rabbitmqctl", "list_queues", "-q", "-p", vhost, "name", "messages"],
                                    check=True, capture_output=True, text=True, timeout=60).stdout
            # (messages: ready and unacknowledged; a stage sends on before it acks)
            waiting = {row[0]: int(row[1]) for row in map(str.split, listed.splitlines())
                       if len(row) == 2 and row[0] in stages}
            unsent = stack.value("SELECT count(*) FROM outbox WHERE body->>'transcript_id' = $1::text"
                                 " OR body->>'job_id' = $1::text", str(job_id))
            if waiting.keys() == stages and not any(waiting.values()) and unsent == 0:
                return
        assert time.monotonic() < deadline, (f"job {job_id}: {handled} of {deliveries} deliveries handled by the"
                                             f" diarizer; stage queues {waiting}, {unsent} events unsent")
        time.sleep(0.5)


async def wait_settled(stack: Stack, queues: Sequence[str], job_ids: Sequence[int] = (), timeout: float = 120) -> None:
    """Until whatever was sent so far has been handled: none of `queues` holds a message ready, no
    channel of the stack's vhost holds one unacknowledged (a consumer sends on what it makes before
    it acks), and the jobs' outbox rows are sent; twice in a row, as the counts are read one after
    another. Ready counts asked of the queues themselves: `rabbitmqctl list_queues` reports a
    quorum queue's as they were up to 5 s before."""
    vhost = urllib.parse.unquote(urllib.parse.urlsplit(stack.amqp_url).path.lstrip("/"))
    connection = await aio_pika.connect(stack.amqp_url)
    try:
        channel = await connection.channel()
        deadline, quiet, counts = time.monotonic() + timeout, 0, {}
        while True:
            counts = {name: (await channel.declare_queue(name, passive=True)).declaration_result.message_count
                      for name in queues}
            listed = await asyncio.to_thread(
                subprocess.run, ["rabbitmqctl", "list_channels", "-q", "vhost", "messages_unacknowledged"],
                check=True, capture_output=True, text=True, timeout=60)
            counts["unacknowledged"] = sum(int(row[1]) for row in map(str.split, listed.stdout.splitlines())
                                           if len(row) == 2 and row[0] == vhost)
            if job_ids:
                counts["outbox"] = await asyncio.to_thread(
                    stack.value, "SELECT count(*) FROM outbox WHERE body->>'transcript_id' = ANY($1::text[])"
                    " OR body->>'job_id' = ANY($1::text[])", [str(job_id) for job_id in job_ids])
            quiet = 0 if any(counts.values()) else quiet + 1
            if quiet == 2:
                return
            assert time.monotonic() < deadline, f"jobs {list(job_ids)}: messages still in flight: {counts}"
            await asyncio.sleep(0.2)
    finally:
        await connection.close()


THIS_MACHINES_POSTGRES = "postgresql://postgres@127.0.0.1:5432"


@contextlib.asynccontextmanager
async def database_of_this_machines_postgres(prefix: str) -> AsyncIterator[tuple[asyncpg.Connection, str]]:
    """A new database of the PostgreSQL on 127.0.0.1:5432 (this machine's and CI's, not the tests'
    embedded one: no pgvector, and reached over TCP), with an admin connection to that server;
    dropped afterwards. Skips the test where none answers there."""
    try:
        admin = await asyncpg.connect(f"{THIS_MACHINES_POSTGRES}/postgres", timeout=5)
    except (OSError, asyncpg.PostgresError):
        pytest.skip("no PostgreSQL on 127.0.0.1:5432 to try")
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        yield admin, f"{THIS_MACHINES_POSTGRES}/{name}"
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"audio fixtures not found at {FIXTURES} (set STT_FIXTURES)")
    return FIXTURES


@contextlib.contextmanager
def running_stack(tmp_path_factory, **overrides: str) -> Iterator[Stack]:
    """The six services plus moto and the Ollama stand-in, in a fresh vhost and database."""
    keep_logs = ROOT / "test-logs" if os.environ.get("STT_KEEP_LOGS") else None
    with dev_stack(tmp_path_factory.mktemp("stack"), env=TEST_ENV, ollama=True, keep_logs=keep_logs,
                   **overrides) as stack:
        yield stack


@contextlib.contextmanager
def another_ingest(stack: Stack, name: str, **settings: str) -> Iterator[str]:
    """One more ingest process of `stack`, with settings of its own; yields its API address once
    it is ready."""
    port = free_port()
    process = stack.start(name, "-m", "services.ingest", env={**stack.env, "API_PORT": str(port), **settings})
    api = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _answers(f"{api}/readyz"):
            assert process.poll() is None and time.monotonic() < deadline, stack.log_tail(name)
            time.sleep(0.3)
        yield api
    finally:
        stack.stop(name)


@contextlib.contextmanager
def through_another_ingest(stack: Stack, name: str, **settings: str) -> Iterator[Stack]:
    """`stack` as seen through one more ingest process with settings of its own: those that are
    ingest's alone (API_KEYS, MAX_CONCURRENT_UPLOADS), the workers behind it the stack's. Cheaper
    than a stack of its own."""
    with another_ingest(stack, name, **settings) as api:
        seen = copy.copy(stack)
        seen.api = api
        yield seen


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="session")
def stack(tmp_path_factory, fixtures_dir) -> Iterator[Stack]:
    with running_stack(tmp_path_factory) as running:
        yield running


# A job's words as the transcriber stores them once it redacted a phone number.
SEGMENT_WORDS = [{"word": " call", "start": 0.5, "end": 0.8, "probability": 0.9},
                 {"word": " me", "start": 0.8, "end": 1.0, "probability": 0.9},
                 {"word": " at", "start": 1.0, "end": 1.2, "probability": 0.9},
                 {"word": " [PHONE].", "start": 1.3, "end": 4.8, "probability": None}]


@pytest.fixture
def made_job(stack):
    """make(filename, content, options=..., redacted=..., status=..., segment=..., due=...) -> the
    id of a job made by hand, its recording stored at uploads/{id}; removed after the test. `due`:
    its recording still to be redacted, as the persister marks a job with redaction it ends."""
    made: list[int] = []
    s3, bucket = stack.s3(), stack.settings().audio_bucket

    def make(filename: str, content: bytes, options: dict | None = None, redacted: bool = False,
             status: str = "done", segment: bool = False, due: bool = False) -> int:
        job_id = stack.value(
            "INSERT INTO transcripts (id, filename, audio_key, status, stage, progress, options, duration,"
            " completed_at, audio_redacted_at, audio_redaction_due)"
            " SELECT n, $1, 'uploads/' || n, $2, CASE WHEN $2 = 'done' THEN 'done' ELSE 'transcribing' END,"
            " CASE WHEN $2 = 'done' THEN 1 ELSE 0.5 END, $3::jsonb, 5.0,"
            " CASE WHEN $2 = 'done' THEN now() END, CASE WHEN $4 THEN now() END, $5"
            " FROM nextval(pg_get_serial_sequence('transcripts', 'id')) n RETURNING id",
            filename, status, json.dumps(options or {}), redacted, due)
        made.append(job_id)
        upload_bytes(s3, bucket, f"uploads/{job_id}", content)
        if segment:
            stack.query("INSERT INTO segments (transcript_id, chunk_index, index, speaker, start_ts, end_ts, text,"
                        " words) VALUES ($1, 0, 0, 'spk_0', 0.5, 4.8, 'call me at [PHONE].', $2::jsonb)",
                        job_id, json.dumps(SEGMENT_WORDS))
        return job_id

    yield make
    for job_id in made:
        stack.query("DELETE FROM transcripts WHERE id = $1", job_id)
        for key in (f"uploads/{job_id}", pcm_key(job_id)):
            try:
                s3.remove_object(bucket, key)
            except Exception:
                pass
