"""Break things for real and count: jobs submitted / done / error / lost, duplicate segments.

Runs its own stack (services as processes), SIGKILLs services mid-message, restarts this
machine's RabbitMQ and PostgreSQL, takes the object store away, and feeds poison messages.
Each test records its figures (printed at the end of the run) and asserts them."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import aio_pika
import asyncpg
import httpx
import numpy as np
import pytest

from common.audio import decode_audio
from common.messages import JobDiarized, JobFailed, JobOptions, JobSubmitted, TimeSpan, TranscriptCompleted
from common.storage import object_exists
from tests.audio_files import encode
from tests.conftest import (
    SERVICES,
    Stack,
    events_queue,
    job_events,
    postgres_server,
    record_figure,
    running_stack,
    wait_deliveries_handled,
    wait_for_port,
)


@pytest.fixture(scope="module")
def faulty(tmp_path_factory, fixtures_dir):
    # Workers asked to stop hand back what they hold at once (no grace), so a SIGTERM test
    # catches a message in hand.
    with running_stack(tmp_path_factory, SHUTDOWN_GRACE_S="0") as stack:
        yield stack


async def publish_to(stack: Stack, exchange_name: str, message) -> None:
    connection = await aio_pika.connect(stack.amqp_url)
    try:
        channel = await connection.channel()
        exchange = await channel.get_exchange(exchange_name)
        await exchange.publish(aio_pika.Message(message.model_dump_json().encode(),
                                                delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                               routing_key=message.ROUTING_KEY)
    finally:
        await connection.close()


def publish(stack: Stack, message) -> None:
    """A work message, as a stage publishes it."""
    asyncio.run(publish_to(stack, "stt", message))


def wait_all(stack: Stack, job_ids: list[int], timeout: float = 400) -> dict[int, dict]:
    return {job_id: stack.wait_finished(job_id, timeout=timeout) for job_id in job_ids}


def duplicate_segments(stack: Stack, job_ids: list[int]) -> int:
    [row] = stack.query("SELECT count(*) - count(DISTINCT (transcript_id, start_ts, text)) AS dupes"
                      " FROM segments WHERE transcript_id = ANY($1::bigint[])", job_ids)
    return row["dupes"]


def report(name: str, stack: Stack, job_ids: list[int], documents: dict[int, dict], extra: str = "") -> dict:
    done = sum(d["status"] == "done" for d in documents.values())
    error = sum(d["status"] == "error" for d in documents.values())
    figures = {"submitted": len(job_ids), "done": done, "error": error,
               "lost": len(job_ids) - done - error, "duplicate_segments": duplicate_segments(stack, job_ids)}
    record_figure(f"{name:<34} " + "  ".join(f"{k}={v}" for k, v in figures.items()) + (f"  {extra}" if extra else ""))
    return figures


def reasons(documents: dict[int, dict]) -> dict[int, str]:
    return {job_id: d.get("error") or d["status"] for job_id, d in documents.items() if d["status"] != "done"}


def submit_many(stack: Stack, files: list[Path]) -> list[int]:
    ids = []
    for path in files:
        response = stack.submit(path)
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    return ids


def log_size(stack: Stack, service: str) -> int:
    path = stack.log_dir / f"{service}.log"
    return path.stat().st_size if path.exists() else 0


def wait_for_log(stack: Stack, service: str, pattern: str, offset: int, timeout: float = 60) -> bool:
    path = stack.log_dir / f"{service}.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with path.open("rb") as f:
            f.seek(offset)
            if re.search(pattern, f.read().decode(errors="replace")):
                return True
        time.sleep(0.05)
    return False


def kill_and_restart(stack: Stack, service: str) -> None:
    process = stack.processes.pop(service)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    stack.start_service(service)


def test_sigkill_of_every_stage_mid_message_loses_and_doubles_nothing(faulty, fixtures_dir):
    files = [fixtures_dir / "jfk.flac", fixtures_dir / "en_dialogue.wav"] * 6
    job_ids = submit_many(faulty, files)
    busy = []
    for service, started in [("diarizer", r"decoded "), ("transcriber", r"transcribing chunk"),
                             ("embedder", r"embedding chunk"), ("persister", r"stored chunk")]:
        # A stage's messages come from the one before it, killed and restarted just before: it
        # loads its models again first, slower beside the in-process diarizer tests
        # (scripts/run-tests.sh).
        caught = wait_for_log(faulty, service, started, log_size(faulty, service), timeout=180)
        kill_and_restart(faulty, service)
        busy.append(f"{service}{'' if caught else '(idle)'}")
    documents = wait_all(faulty, job_ids)
    figures = report("SIGKILL each stage mid-message", faulty, job_ids, documents, "killed: " + ",".join(busy))
    assert "(idle)" not in ",".join(busy), busy  # every kill hit a stage with a message in hand
    assert figures == {"submitted": 12, "done": 12, "error": 0, "lost": 0, "duplicate_segments": 0}, reasons(documents)


def test_sigterm_hands_the_message_back_and_exits_cleanly(faulty, fixtures_dir):
    job_ids = submit_many(faulty, [fixtures_dir / "en_dialogue.wav"] * 3)
    offset = log_size(faulty, "transcriber")
    assert wait_for_log(faulty, "transcriber", r"transcribing chunk", offset, timeout=180)
    process = faulty.processes.pop("transcriber")
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=30)
    stopped_s = time.monotonic() - started
    handed_back = wait_for_log(faulty, "transcriber", r"handed back to stt\.transcriber", offset, timeout=1)
    faulty.start_service("transcriber")
    documents = wait_all(faulty, job_ids)
    figures = report("SIGTERM a busy transcriber", faulty, job_ids, documents,
                     f"exit {code} after {stopped_s:.1f} s, message handed back: {handed_back}")
    assert code == 0 and handed_back
    assert figures == {"submitted": 3, "done": 3, "error": 0, "lost": 0, "duplicate_segments": 0}, reasons(documents)


def test_rabbitmq_restart_mid_run(faulty, fixtures_dir):
    job_ids = submit_many(faulty, [fixtures_dir / "en_dialogue.wav"] * 4)
    subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True, timeout=120)
    try:
        during = faulty.submit(fixtures_dir / "jfk.flac")
        status_during = httpx.get(f"{faulty.api}/status/{job_ids[0]}").status_code
        ready_during = [httpx.get(f"{faulty.api}/readyz{query}").status_code for query in ("", "?need=postgres")]
    finally:
        subprocess.run(["rabbitmqctl", "start_app"], check=True, capture_output=True, timeout=120)
    # Not ready for monitoring, ready for traffic (the load balancer keeps sending it uploads).
    assert ready_during == [503, 200]
    # The job and its job.submitted are committed together (outbox): accepted, and it runs once
    # the broker is back.
    assert during.status_code == 202, during.text
    assert status_during == 200  # reading state needs no broker
    faulty.wait_ready(timeout=120)  # every service reconnected by itself
    job_ids += [during.json()["id"]] + submit_many(faulty, [fixtures_dir / "jfk.flac"])
    documents = wait_all(faulty, job_ids)
    figures = report("RabbitMQ stopped and started", faulty, job_ids, documents,
                     f"upload during outage -> {during.status_code}")
    assert figures == {"submitted": 6, "done": 6, "error": 0, "lost": 0, "duplicate_segments": 0}, reasons(documents)


def test_postgresql_restart_mid_run(faulty, fixtures_dir):
    job_ids = submit_many(faulty, [fixtures_dir / "en_dialogue.wav", fixtures_dir / "jfk.flac"] * 2)
    postgres_server("stop")
    try:
        time.sleep(1)
        upload_during = faulty.submit(fixtures_dir / "jfk.flac").status_code
        status_during = httpx.get(f"{faulty.api}/status/{job_ids[0]}").status_code
        ready_during = httpx.get(f"{faulty.api}/readyz?need=postgres").status_code
        time.sleep(5)  # the pipeline keeps working meanwhile; the persister holds its messages
    finally:
        postgres_server("start")
    assert (upload_during, status_during, ready_during) == (503, 503, 503)
    faulty.wait_ready(timeout=60)  # ingest recovers without a restart
    job_ids += submit_many(faulty, [fixtures_dir / "jfk.flac"])
    documents = wait_all(faulty, job_ids)
    figures = report("PostgreSQL restarted", faulty, job_ids, documents,
                     f"during outage: upload {upload_during}, status {status_during}")
    assert figures == {"submitted": 5, "done": 5, "error": 0, "lost": 0, "duplicate_segments": 0}, reasons(documents)


def test_an_ollama_outage_holds_jobs_at_embedding_instead_of_failing_them(faulty, fixtures_dir):
    """Ollama restarting (or still starting) failed every job that reached the embedder, after
    its quick retries and the broker's (under half a minute with the tests' RETRY_DELAYS_S); so
    did a proxy in front of it answering 503 while Ollama is away. Each is watched for 20 s, past
    the few seconds its retries took to fail the job (both answer at once)."""
    port = int(faulty.env["OLLAMA_URL"].rsplit(":", 1)[1])
    faulty.stop("ollama")
    try:
        [job_id] = submit_many(faulty, [fixtures_dir / "jfk.flac"])
        deadline = time.monotonic() + 120
        while faulty.status(job_id)["stage"] != "embedding":
            assert time.monotonic() < deadline, faulty.status(job_id)
            time.sleep(0.5)
        time.sleep(20)
        refused = faulty.status(job_id)
        faulty.start("ollama", "-m", "tests.fake_ollama", "--port", str(port), "--proxy-answering", "503")
        wait_for_port(port, timeout=60)
        time.sleep(20)
        proxied = faulty.status(job_id)
    finally:
        faulty.stop("ollama")
        faulty.start("ollama", "-m", "tests.fake_ollama", "--port", str(port))
        wait_for_port(port, timeout=120)
    assert (refused["status"], refused["stage"]) == ("processing", "embedding"), refused
    assert (proxied["status"], proxied["stage"]) == ("processing", "embedding"), proxied
    assert faulty.wait_finished(job_id, timeout=180)["status"] == "done"


def test_object_store_outage_refuses_uploads_and_fails_stranded_jobs(faulty, fixtures_dir):
    [done_before] = submit_many(faulty, [fixtures_dir / "jfk.flac"])
    faulty.wait_finished(done_before)
    [row] = faulty.query("INSERT INTO transcripts (filename) VALUES ('stranded.wav') RETURNING id")
    stranded = row["id"]
    port = int(faulty.env["MINIO_ENDPOINT"].rsplit(":", 1)[1])
    faulty.stop("s3")
    try:
        upload_during = faulty.submit(fixtures_dir / "jfk.flac")
        ready_during = httpx.get(f"{faulty.api}/readyz").json()["checks"]["object_store"]
        audio_during = httpx.get(f"{faulty.api}/transcripts/{done_before}/audio", timeout=120)
        publish(faulty, JobSubmitted(job_id=stranded, audio_bucket="audio", audio_key=f"uploads/{done_before}",
                                     filename="stranded.wav"))
        document = faulty.wait_finished(stranded, timeout=180)
    finally:
        faulty.start("s3", "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port))
        wait_for_port(port)
    # Nothing was created: the CLI sends it again after Retry-After.
    assert upload_during.status_code == 503 and upload_during.headers["retry-after"] == "5", upload_during.text
    assert ready_during.startswith("unavailable")
    assert audio_during.status_code == 503 and audio_during.headers["retry-after"], audio_during.text
    # A category, never the store's address or the client library's text (those are in the log).
    assert document["error"] == "diarizer failed after 3 attempts: storage unavailable, retries exhausted", document
    # moto forgets everything on restart (MinIO would not): recreate the buckets, then it works.
    for bucket in ("audio", "inbox"):
        faulty.s3().make_bucket(bucket)
    faulty.wait_ready()
    job_ids = submit_many(faulty, [fixtures_dir / "jfk.flac"])
    documents = wait_all(faulty, job_ids)
    report("object store down", faulty, [stranded, *job_ids], {stranded: document, **documents},
           f"upload during outage -> {upload_during.status_code}; stranded job: {document['error'][:60]}...")
    assert documents[job_ids[0]]["status"] == "done"


async def test_a_job_that_ends_while_the_object_store_is_down_is_tidied_once_it_is_back(faulty):
    """When a job ends, ingest writes a bucket drop's result file and removes the decoded audio;
    nothing tries that again later, so through an outage longer than every retry it must wait."""
    [row] = faulty.query("INSERT INTO transcripts (filename, status, stage, completed_at, source, source_bucket,"
                         " source_key) VALUES ('tidy.wav', 'done', 'done', now(), 'bucket', 'inbox', 'tidy.wav')"
                         " RETURNING id")
    job_id = row["id"]
    port = int(faulty.env["MINIO_ENDPOINT"].rsplit(":", 1)[1])
    faulty.stop("s3")
    conn = await asyncpg.connect(faulty.database_url)
    try:
        await publish_to(faulty, "stt.events", TranscriptCompleted(job_id=job_id, transcript_id=job_id,
                                                                   filename="tidy.wav", segment_count=0))
        await asyncio.sleep(25)  # past RETRY_DELAYS_S and the S3 client's own retries, on every attempt
        # moto forgets everything on restart (MinIO would not): the job's row is held while the store
        # comes back with what it held, so the tidying cannot run before then.
        async with conn.transaction():
            await conn.execute("SELECT 1 FROM transcripts WHERE id = $1 FOR UPDATE", job_id)
            faulty.start("s3", "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port))
            wait_for_port(port)
            for bucket in ("audio", "inbox"):
                faulty.s3().make_bucket(bucket)
            faulty.s3().put_object("audio", f"pcm/{job_id}.s16le", io.BytesIO(bytes(3200)), 3200)
    finally:
        await conn.close()
        if "s3" not in faulty.processes or faulty.processes["s3"].poll() is not None:
            faulty.start("s3", "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port))
            wait_for_port(port)
    deadline = time.monotonic() + 90
    while object_exists(faulty.s3(), "audio", f"pcm/{job_id}.s16le") or not object_exists(
            faulty.s3(), "inbox", "results/tidy.wav.json"):
        assert time.monotonic() < deadline, "a job that ended during the outage was never tidied"
        await asyncio.sleep(1)
    faulty.wait_ready()


def test_poison_messages_are_dead_lettered_and_the_queue_keeps_flowing(faulty, fixtures_dir):
    # 1) valid JSON, impossible content: fails its job at once, no retries.
    [row] = faulty.query("INSERT INTO transcripts (filename) VALUES ('poison.wav') RETURNING id")
    impossible = JobDiarized.model_construct(
        v=1, message_id="poison-1", job_id=row["id"], chunk_index=7, chunk_count=2, pcm_bucket="audio",
        pcm_key="pcm/none", duration=5.0, span=TimeSpan(start=0, end=5), turns=[], language_probe=[],
        options=JobOptions(),
    )
    publish(faulty, impossible)
    invalid = faulty.wait_finished(row["id"], timeout=60)
    assert invalid["status"] == "error" and "invalid job.diarized message" in invalid["error"], invalid

    # 2) a message that kills its worker every time: dead-lettered after DELIVERY_LIMIT deliveries.
    [crashing] = submit_many(faulty, [fixtures_dir / "jfk.flac"])
    kills = 0
    for _ in range(8):
        offset = log_size(faulty, "transcriber")
        if not wait_for_log(faulty, "transcriber", rf"job={crashing} transcribing chunk", offset, timeout=60):
            break
        kill_and_restart(faulty, "transcriber")
        kills += 1
    crashed = faulty.wait_finished(crashing, timeout=120)
    assert crashed["status"] == "error" and "dead-lettered" in crashed["error"], crashed
    assert kills <= int(faulty.env["DELIVERY_LIMIT"]) + 1

    # 3) other jobs still flow.
    healthy = submit_many(faulty, [fixtures_dir / "en_dialogue.wav"])
    documents = wait_all(faulty, healthy)
    report("poison messages", faulty, [row["id"], crashing, *healthy],
           {row["id"]: invalid, crashing: crashed, **documents},
           f"crashing message killed its worker {kills}x before dead-lettering")
    assert documents[healthy[0]]["status"] == "done"


async def test_a_job_that_stopped_moving_is_failed_with_a_reason_and_can_be_deleted(faulty):
    # A job whose message is gone (purged by an operator, lost with a broker's disk): nothing
    # will ever move it. Its last progress lies further back than JOB_STALL_TIMEOUT_S (6 h).
    connection = await aio_pika.connect(faulty.amqp_url)
    try:
        # Its subscribers are told, as of any job that fails.
        queue = await events_queue(await connection.channel(), "transcript.failed")
        [row] = faulty.query("INSERT INTO transcripts (filename, stage, updated_at) VALUES"
                             " ('lost.wav', 'transcribing', now() - interval '7 hours') RETURNING id")
        lost = row["id"]
        assert httpx.delete(f"{faulty.api}/transcripts/{lost}").status_code == 409  # still processing
        document = await asyncio.to_thread(faulty.wait_finished, lost, 90)
        [event] = await job_events(queue, lost, lambda bodies: bodies, 60)
    finally:
        await connection.close()
    record_figure(f"{'job with no progress for 7 h':<34} -> {document['status']}: {document.get('error')}")
    assert document["status"] == "error" and "JOB_STALL_TIMEOUT_S" in document["error"]
    assert document["stage"] == "transcribing"  # where it stopped
    assert event["filename"] == "lost.wav" and "JOB_STALL_TIMEOUT_S" in event["reason"], event
    assert httpx.delete(f"{faulty.api}/transcripts/{lost}").status_code == 204
    assert httpx.get(f"{faulty.api}/status/{lost}").status_code == 404


def test_same_submission_delivered_twice_changes_nothing(faulty, fixtures_dir):
    [job_id] = submit_many(faulty, [fixtures_dir / "en_dialogue.wav"])
    publish(faulty, JobSubmitted(job_id=job_id, audio_bucket="audio", audio_key=f"uploads/{job_id}",
                                 filename="en_dialogue.wav"))
    document = faulty.wait_finished(job_id)
    wait_deliveries_handled(faulty, job_id, 2)  # the second delivery's run has ended too
    assert document["status"] == "done" and duplicate_segments(faulty, [job_id]) == 0
    assert len(faulty.query("SELECT 1 FROM segments WHERE transcript_id = $1", job_id)) == len(document["segments"])


def set_consumer_timeout(ms: int, check_every_ms: int = 60_000) -> None:
    """RabbitMQ's delivery-acknowledgement timeout; channels opened afterwards use it. The broker
    checks it on each channel's tick (once a minute by default; every channel re-reads the
    interval when it re-arms), so a short timeout is only enforced promptly with a short tick."""
    for setting, value in (("consumer_timeout", ms), ("channel_tick_interval", check_every_ms)):
        subprocess.run(["rabbitmqctl", "eval", f"application:set_env(rabbit, {setting}, {value})."],
                       check=True, capture_output=True, timeout=60)


def hold_a_delivery(amqp_url: str, result: dict, wait_s: float) -> None:
    """Control: take one message and never ack it; note when the broker closes the channel
    (`closed_at`, epoch seconds: absent when it was not closed within `wait_s`)."""
    async def run():
        connection = await aio_pika.connect(amqp_url)
        try:
            channel = await connection.channel()
            queue = await channel.declare_queue(exclusive=True)
            await channel.default_exchange.publish(aio_pika.Message(b"probe"), routing_key=queue.name)
            holder = await connection.channel()
            closed = asyncio.Event()
            started = time.monotonic()
            holder.close_callbacks.add(lambda *_: (result.update(closed_after=time.monotonic() - started),
                                                   closed.set()))
            await (await holder.get_queue(queue.name)).get(no_ack=False)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(closed.wait(), wait_s)
                result.update(closed_at=time.time())  # by the broker: this side closes only after the wait
        finally:
            await connection.close()
    asyncio.run(run())


@pytest.mark.timeout(900)
def test_job_longer_than_the_ack_timeout_is_not_redelivered_or_duplicated(faulty, fixtures_dir, tmp_path):
    """Designed around, not configured: a job is cut into chunks, each its own message, so a
    job may run far longer than consumer_timeout while every delivery is acked quickly.
    A message held on the side proves the timeout was live. The timeout is scaled down (15 s,
    checked every second) so the job needs a minute, not the half hour of the default."""
    parts = [decode_audio(str(fixtures_dir / n)) for n in
             ("sample.wav", "ami_dev00.wav", "ami_dev01.wav", "ru_dialogue.wav", "en_dialogue.wav")]
    # ~2 minutes, 5 or more chunks: the job outlasts the timeout however fast the machine, as the
    # embedder starts only once the timeout has fired (below), so the recording need not be long.
    long_file = tmp_path / "meeting.opus"
    long_file.write_bytes(encode(np.concatenate(parts), "ogg", "libopus", 48_000, channels=1,
                                    bit_rate=24_000))
    # Every delivery of the chunked stages must be acked within the timeout while the job as a
    # whole runs well past it. The diarizer's one delivery per file is covered by a longer
    # timeout of its own (x-consumer-timeout on its queue, honoured by RabbitMQ 3.12 and later);
    # on this broker the same comes from its channel opening before the timeout is lowered.
    timeout_s = 15
    faulty.env.update(CHUNK_MAX_SPEECH_S="20", MAX_AUDIO_HOURS="1")
    control: dict = {}
    try:
        offset = log_size(faulty, "diarizer")
        faulty.stop("diarizer")
        faulty.start_service("diarizer")
        assert wait_for_log(faulty, "diarizer", r"consuming stt\.diarizer", offset, timeout=120)
        set_consumer_timeout(timeout_s * 1000, check_every_ms=1000)
        for service in ("transcriber", "persister", "ingest"):  # ingest refuses audio too long
            faulty.stop(service)
            faulty.start_service(service)
        # The embedder starts once the timeout has fired on the control: the job, done only when
        # every chunk is embedded, outlasts the timeout on any machine. Its chunks wait in
        # stt.embedder meanwhile, not delivered, so no timeout runs on them.
        faulty.stop("embedder")
        faulty.wait_ready()
        offsets = {s: log_size(faulty, s) for s in SERVICES}
        started = time.monotonic()
        [job_id] = submit_many(faulty, [long_file])
        holder = threading.Thread(target=hold_a_delivery, args=(faulty.amqp_url, control, timeout_s + 60))
        holder.start()
        holder.join()
        faulty.start_service("embedder")
        document = faulty.wait_finished(job_id, timeout=900)
        elapsed = time.monotonic() - started  # (reported only: it depends on the machine)
    finally:
        set_consumer_timeout(1_800_000)
        faulty.env.update(CHUNK_MAX_SPEECH_S="300", MAX_AUDIO_HOURS="0.1")
        for service in ("diarizer", "transcriber", "embedder", "persister", "ingest"):
            faulty.stop(service)
            faulty.start_service(service)
        faulty.wait_ready()
    [job] = faulty.query("SELECT chunk_count, extract(epoch FROM created_at)::float8 AS created,"
                         " extract(epoch FROM completed_at)::float8 AS completed FROM transcripts WHERE id = $1",
                         job_id)
    logs = {s: (faulty.log_dir / f"{s}.log").read_text(errors="replace")[offsets[s]:] for s in SERVICES}
    transcribed = len(re.findall(rf"job={job_id} transcribing chunk", logs["transcriber"]))
    timeouts = [s for s, text in logs.items() if "acknowledgement" in text and "timed out" in text]
    record_figure(f"{'job longer than consumer_timeout':<34} job {elapsed:.0f} s vs timeout {timeout_s} s; "
                  f"{job['chunk_count']} chunks, {transcribed} transcriptions; channel timeouts: "
                  f"{timeouts or 'none'}; held control message closed after {control.get('closed_after', 0):.0f} s")
    # The timeout was live, and fired while the job ran: the job outlasted it.
    assert "closed_at" in control, "the held control message was never closed by the broker's timeout"
    assert job["created"] < control["closed_at"] < job["completed"], (job, control)
    assert document["status"] == "done"
    assert job["chunk_count"] >= 4 and transcribed == job["chunk_count"]  # no chunk worked twice
    assert timeouts == [] and duplicate_segments(faulty, [job_id]) == 0


def rabbitmqctl_output(*args: str) -> str:
    return subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, text=True, timeout=60).stdout.strip()


@contextlib.contextmanager
def memory_alarm():
    """RabbitMQ's memory alarm, raised (a high watermark of 1 byte) until the block ends; the
    watermark is set back to what it was. The alarm is the whole broker's: it blocks every
    connection that publishes."""
    before = rabbitmqctl_output("eval", "vm_memory_monitor:get_vm_memory_high_watermark().")
    absolute = re.fullmatch(r"\{absolute,(\d+)\}", before)  # or a fraction of the memory, as 0.4
    restore = ["absolute", absolute.group(1)] if absolute else [before]
    try:
        rabbitmqctl_output("set_vm_memory_high_watermark", "absolute", "1")
        deadline = time.monotonic() + 30
        while "memory" not in rabbitmqctl_output("eval", "rabbit_alarm:get_alarms()."):
            assert time.monotonic() < deadline, "the memory alarm was never raised"
            time.sleep(0.2)
        yield
    finally:
        rabbitmqctl_output("set_vm_memory_high_watermark", *restore)


def connection_states() -> dict[str, str]:
    """The state (running, blocking, blocked...) of each connection the broker has, by the name
    its client gave it."""
    listed = rabbitmqctl_output("list_connections", "-q", "client_properties", "state")
    return {named.group(1): line.rsplit("\t", 1)[1] for line in listed.splitlines()
            if (named := re.search(r'"connection_name","([^"]*)"', line))}


def persister_queue_depth(stack: Stack) -> int:
    """stt.persister's messages, ready and unacknowledged, as the broker last counted them (a
    quorum queue's figures are refreshed every few seconds)."""
    vhost = stack.amqp_url.rsplit("/", 1)[1]
    listed = rabbitmqctl_output("list_queues", "-q", "-p", vhost, "name", "messages")
    return next(int(row[1]) for row in map(str.split, listed.splitlines()) if row[:1] == ["stt.persister"])


async def test_the_persister_drains_its_queue_through_a_memory_alarm(faulty):
    """A memory alarm blocks each connection that publishes, and RabbitMQ then reads nothing more
    from it, its consumers' acks included. The persister published its outbox on the connection
    it consumed on: its first event blocked it, stt.persister stopped draining (the queue whose
    messages may be what filled the memory), and the pipeline stood still until an operator
    stepped in. It needs no publish to store a message: it drains the queue through the alarm,
    and publishes the events once the alarm has passed."""
    jobs = 48  # three times what the persister takes at once (HANDLED_AT_ONCE), whatever PREFETCH_COUNT
    faulty.stop("persister")
    offset = log_size(faulty, "persister")
    rows = faulty.query("INSERT INTO transcripts (filename) SELECT 'alarm-' || n || '.wav'"
                        " FROM generate_series(1, $1::int) AS n RETURNING id", jobs)
    job_ids = {row["id"] for row in rows}
    connection = await aio_pika.connect(faulty.amqp_url)
    try:
        announced = await events_queue(await connection.channel(), "transcript.failed")
        channel = await connection.channel()
        work = await channel.get_exchange("stt")
        for job_id in sorted(job_ids):
            failed = JobFailed(job_id=job_id, stage="transcriber", reason="unreadable chunk")
            await work.publish(aio_pika.Message(failed.model_dump_json().encode(),
                                                delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                               routing_key=failed.ROUTING_KEY)
        try:
            with memory_alarm():
                faulty.start("persister", "-m", "services.persister", env={
                    **faulty.env, "PREFETCH_COUNT": "1", "METRICS_PORT": str(faulty.metrics_ports["persister"])})
                assert wait_for_log(faulty, "persister", r"consuming stt\.persister ", offset, timeout=60), \
                    faulty.log_tail("persister")
                deadline = time.monotonic() + 30
                while True:
                    [row] = faulty.query("SELECT count(*) FILTER (WHERE status = 'error') AS failed"
                                         " FROM transcripts WHERE id = ANY($1::bigint[])", list(job_ids))
                    ready = (await channel.declare_queue("stt.persister", passive=True)
                             ).declaration_result.message_count
                    # Acked too: none left in the persister's hands.
                    drained = row["failed"] == jobs and ready == 0 and persister_queue_depth(faulty) == 0
                    if drained or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.5)
                connections = connection_states()
            record_figure(f"{'persister through a memory alarm':<34} {row['failed']}/{jobs} jobs failed and"
                          f" {jobs - ready} messages taken while it lasted")
            assert drained, (row["failed"], ready, connections)
            bodies = await job_events(announced, None, lambda bodies: job_ids <= {b["transcript_id"] for b in bodies},
                                      60)
            assert job_ids <= {body["transcript_id"] for body in bodies}
        finally:
            faulty.stop("persister")
            faulty.start_service("persister")
    finally:
        await connection.close()
