"""Prometheus metrics: every service's /metrics moves when a job goes through the stack."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import ClassVar

import aio_pika
import httpx
import pytest
from litestar.testing import TestClient
from prometheus_client.parser import text_string_to_metric_families

from common import metrics, runner
from common.audio import decode_audio
from common.broker import Route, connect, consume
from common.messages import Contract, JobDiarized, JobProgress, SpeakerTurn, TimeSpan
from common.settings import Settings
from services.ingest.app import create_app
from tests.conftest import SERVICES, Stack, amqp_url, private_vhost, rabbitmqctl

WORKERS = ("diarizer", "transcriber", "embedder", "persister")
Samples = list[tuple[str, dict[str, str], float]]


def parse(text: str) -> Samples:
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def scrape(stack: Stack, service: str) -> Samples:
    response = httpx.get(stack.metrics_url(service), timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    return sum(v for n, lab, v in samples if n == name and labels.items() <= lab.items())


@pytest.fixture(scope="module")
def scrapes(stack: Stack, fixtures_dir) -> dict:
    """Every service scraped before and after one job (jfk.flac) went all the way through."""
    before = {s: scrape(stack, s) for s in SERVICES}
    response = stack.submit(fixtures_dir / "jfk.flac")
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    document = stack.wait_finished(job_id)
    assert document["status"] == "done", document
    not_found = httpx.get(f"{stack.api}/status/987654321", timeout=10)
    assert not_found.status_code == 404
    time.sleep(0.5)  # the last acks are counted just after the work they settle
    after = {s: scrape(stack, s) for s in SERVICES}
    with (fixtures_dir / "jfk.flac").open("rb") as f:
        duration = decode_audio(f).size / 16_000
    return {"before": before, "after": after, "job_id": job_id, "duration": duration}


def moved(scrapes: dict, service: str, name: str, **labels: str) -> float:
    return total(scrapes["after"][service], name, **labels) - total(scrapes["before"][service], name, **labels)


def test_every_stage_counts_the_messages_it_handled(scrapes):
    for stage in WORKERS:
        assert moved(scrapes, stage, "stt_messages_total", stage=stage, outcome="handled") >= 1, stage
        assert moved(scrapes, stage, "stt_message_duration_seconds_count", stage=stage) >= 1, stage
        # Every outcome has its series from the start, so alerts on them need no absent().
        for outcome in ("failed", "retried", "dead_lettered", "requeued"):
            assert any(n == "stt_messages_total" and lab["stage"] == stage and lab["outcome"] == outcome
                       for n, lab, _ in scrapes["after"][stage]), (stage, outcome)
    # each message is labelled with the queue it came from
    assert moved(scrapes, "transcriber", "stt_messages_total", queue="stt.transcriber", outcome="handled") >= 1


def test_diarizer_and_transcriber_count_audio_seconds_and_real_time_factor(scrapes):
    duration = scrapes["duration"]
    diarized = moved(scrapes, "diarizer", "stt_audio_seconds_total", stage="diarizer")
    assert diarized >= duration - 0.01, (diarized, duration)  # the whole file (other jobs may add)
    transcribed = moved(scrapes, "transcriber", "stt_audio_seconds_total", stage="transcriber")
    assert 0.5 * duration <= transcribed, (transcribed, duration)  # the chunks' spans: its speech
    for stage in ("diarizer", "transcriber"):
        # Observed once a job at least, as a positive factor (how fast is the benchmarks' to measure).
        count = moved(scrapes, stage, "stt_real_time_factor_count", stage=stage)
        assert count >= 1, (stage, count)
        rtf = moved(scrapes, stage, "stt_real_time_factor_sum", stage=stage) / count
        assert rtf > 0, (stage, count, rtf)
    assert total(scrapes["after"]["embedder"], "stt_audio_seconds_total") == 0  # only stages that know it


def test_ingest_counts_requests_by_route_template(scrapes):
    assert moved(scrapes, "ingest", "stt_http_requests_total", method="POST", route="/recognize", status="202") >= 1
    assert moved(scrapes, "ingest", "stt_http_requests_total", method="GET", route="/status/{job_id}",
                 status="200") >= 1
    assert moved(scrapes, "ingest", "stt_http_requests_total", method="GET", route="/status/{job_id}",
                 status="404") >= 1
    assert moved(scrapes, "ingest", "stt_http_request_duration_seconds_count", method="POST",
                 route="/recognize") >= 1
    routes = {lab["route"] for n, lab, _ in scrapes["after"]["ingest"] if n == "stt_http_requests_total"}
    # Templates, never raw ids (a path part that is a number; /v1/... is a route of its own).
    assert not [r for r in routes if any(part.isdigit() for part in r.split("/"))], routes


def test_ingest_reports_queue_depths_and_consumers(stack: Stack, scrapes):
    deadline = time.monotonic() + 15
    while True:
        samples = scrape(stack, "ingest")
        depths = {lab["queue"]: v for n, lab, v in samples if n == "stt_queue_messages"}
        consumers = {lab["queue"]: v for n, lab, v in samples if n == "stt_queue_consumers"}
        if all(f"stt.{s}" in depths for s in WORKERS) or time.monotonic() > deadline:
            break
        time.sleep(1)
    for stage in WORKERS:
        assert depths.get(f"stt.{stage}", -1) >= 0, depths
        assert consumers.get(f"stt.{stage}", 0) >= 1, consumers  # the running worker
    assert depths.get("stt.dead-letters", -1) >= 0 and depths.get("stt.ingest.results", -1) >= 0, depths


def test_workers_also_export_process_figures(scrapes):
    for stage in WORKERS:
        assert total(scrapes["after"][stage], "process_resident_memory_bytes") > 0, stage


def test_metrics_is_open_and_undocumented_when_api_keys_are_set(stack: Stack):
    with TestClient(create_app(stack.settings(api_keys="key-metrics-1")), timeout=60) as client:
        assert client.get("/status/1").status_code == 401
        response = client.get("/metrics")
        assert response.status_code == 200
        samples = parse(response.text)
        # the refused request is counted too, under its route
        assert total(samples, "stt_http_requests_total", route="/status/{job_id}", status="401") >= 1
        spec = client.get("/docs/openapi.json", headers={"X-API-Key": "key-metrics-1"}).json()
        assert "/metrics" not in spec["paths"] and "/recognize" in spec["paths"]


def wait_for(check, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)
    return result


def test_a_failing_chunk_counts_as_retried_then_dead_lettered(stack: Stack):
    """A chunk whose audio's bucket is missing from the store (a missing object fails at once):
    retried (RETRY_DELAYS_S=1,2), then the job fails and the message is parked; the dead-letter
    queue depth shows it."""
    before = scrape(stack, "transcriber")
    job_id = stack.value("INSERT INTO transcripts (filename) VALUES ('lost.wav') RETURNING id")
    message = JobDiarized(job_id=job_id, chunk_index=0, chunk_count=1, pcm_bucket="no-such-bucket",
                          pcm_key=f"pcm/{job_id}-missing.s16le", duration=5.0, span=TimeSpan(start=0, end=5),
                          turns=[SpeakerTurn(speaker="spk_0", start=0.5, end=4.5)])

    async def publish() -> int:
        """Publishes the chunk; the dead-letter queue's depth before it, as the broker counts."""
        connection = await aio_pika.connect(stack.amqp_url)
        async with connection:
            channel = await connection.channel()
            parked = (await channel.declare_queue("stt.dead-letters", passive=True)).declaration_result.message_count
            exchange = await channel.get_exchange("stt")
            await exchange.publish(aio_pika.Message(message.model_dump_json().encode(),
                                                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                                   routing_key=message.ROUTING_KEY, mandatory=True)
            return parked

    parked_before = asyncio.run(publish())
    wait_for(lambda: stack.value("SELECT status FROM transcripts WHERE id = $1", job_id) == "error", 60)
    time.sleep(0.5)
    after = scrape(stack, "transcriber")

    def change(outcome: str) -> float:
        labels = {"stage": "transcriber", "outcome": outcome}
        return total(after, "stt_messages_total", **labels) - total(before, "stt_messages_total", **labels)

    assert change("retried") >= 2 and change("dead_lettered") >= 1, (change("retried"), change("dead_lettered"))
    # ingest sees the parked message within its refresh interval (5 s)
    wait_for(lambda: total(scrape(stack, "ingest"), "stt_queue_messages", queue="stt.dead-letters")
             >= parked_before + 1, 20)


def test_a_worker_without_metrics_says_that_its_healthz_is_off_too(caplog):
    """METRICS_PORT=0 turns /healthz off with /metrics: the probes and HEALTHCHECK asking it then
    restart the worker over and over, and its log only said "metrics disabled"."""
    with caplog.at_level(logging.INFO, logger="common.metrics"):
        metrics.serve_metrics(Settings(_env_file=None, metrics_port=0), "test")
    [record] = caplog.records
    assert record.levelno == logging.WARNING and "/healthz" in record.getMessage()


def test_a_message_that_takes_hours_falls_in_a_bucket_of_its_own():
    """The top finite bucket was 1 h, while the diarizer may work on one recording for hours
    (MAX_AUDIO_HOURS is 6): a 2-hour and a 5-hour message were both just "over an hour"."""
    from common import metrics

    metrics.MESSAGE_SECONDS.labels("bucket-test", "q").observe(5 * 3600)
    [family] = [f for f in metrics.MESSAGE_SECONDS.collect()]
    counts = {s.labels["le"]: s.value for s in family.samples
              if s.name.endswith("_bucket") and s.labels["stage"] == "bucket-test"}
    assert (counts["3600.0"], counts["7200.0"], counts["14400.0"], counts["21600.0"]) == (0, 0, 0, 1)


async def test_the_search_index_build_does_not_log_as_the_message_that_started_it():
    """The background build of a model's vector index copied the log context of the chunk that
    started it: its lines (a build runs for minutes, for every job) named that chunk's job."""
    from common import searchstore
    from common.logs import current_job

    seen: list[int | None] = []

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(current_job.get())

    handler = Seen()
    logging.getLogger("common.searchstore").addHandler(handler)
    token = current_job.set(4242)
    try:
        # More dimensions than pgvector indexes: the build only says so, with no database to ask.
        model = f"wide-model-{time.monotonic_ns()}"
        searchstore.build_vector_index_soon(None, model, 5000)
        await searchstore._index_builds[(model, 5000)]
    finally:
        current_job.reset(token)
        logging.getLogger("common.searchstore").removeHandler(handler)
    assert seen == [None]


async def test_queue_gauges_are_left_out_while_the_queues_cannot_be_read():
    """While the queues could not be read (a broker outage) the gauges kept their last values:
    stt_queue_consumers said a worker served the queue, so an alert on 0 consumers (or on the
    series being absent) could not fire. They are left out until the queues are readable again."""
    from common import metrics

    name = f"stt.gauge-test-{time.monotonic_ns()}"

    async def ignored(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        pass

    def consumers() -> float | None:
        [family] = metrics.QUEUE_CONSUMERS.collect()
        return next((s.value for s in family.samples if s.labels["queue"] == name), None)

    async def until(check) -> None:
        deadline = time.monotonic() + 20
        while not check():
            assert time.monotonic() < deadline, consumers()
            await asyncio.sleep(0.1)

    with private_vhost() as vhost:
        connection = await aio_pika.connect_robust(amqp_url(vhost))  # as ingest's
        watching = asyncio.create_task(metrics.watch_queue_depths(connection, [name], interval_s=0.2))
        try:
            channel = await connection.channel()
            queue = await channel.declare_queue(name)
            await queue.consume(ignored)
            await until(lambda: consumers() == 1)
            await queue.delete(if_unused=False)  # its reads fail
            await until(lambda: consumers() is None)
            await channel.declare_queue(name)
            await until(lambda: consumers() == 0)
            await connection.close()  # as in an outage
            await until(lambda: consumers() is None)
        finally:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
            await connection.close()


class Transcribed(Contract):
    ROUTING_KEY: ClassVar[str] = "test.rtf-transcribed"


def real_time_factors(stage: str) -> tuple[float, float]:
    """The count and sum of the stage's observed real-time factors."""
    [family] = metrics.REAL_TIME_FACTOR.collect()
    figures = {s.name: s.value for s in family.samples if s.labels.get("stage") == stage}
    return figures.get("stt_real_time_factor_count", 0.0), figures.get("stt_real_time_factor_sum", 0.0)


async def test_a_publish_held_through_an_outage_is_not_counted_in_the_real_time_factor(fresh_runner):
    """A transcriber that handled a 30 s chunk at once, then waited for the broker to take its
    text, observed the wait as work: an RTF of the whole hold (up to OUTAGE_HOLD_S, 600 s) over
    30 s. The broker refuses the publish for some seconds here (a nack, as while its queues
    recover), and the factor observed is that of the work alone."""
    stage, queue_name, audio_s = "test-rtf-hold", "test.rtf-hold", 30.0
    with private_vhost() as vhost:
        settings = Settings(_env_file=None, amqp_url=amqp_url(vhost), retry_delays_s="1,2", outage_hold_s=120.0)
        connection = await connect(settings, "test-rtf-hold")
        try:
            channel = await connection.channel()
            work = await channel.declare_exchange("stt", aio_pika.ExchangeType.TOPIC, durable=True)
            out = await channel.declare_queue("test.rtf-out", durable=True)
            await out.bind(work, Transcribed.ROUTING_KEY)
            await asyncio.to_thread(rabbitmqctl, "set_policy", "-p", vhost, "--apply-to", "queues", "refuse",
                                    r"^test\.rtf-out$", json.dumps({"max-length": 0, "overflow": "reject-publish"}))
            await channel.declare_queue(queue_name, durable=True, arguments={"x-queue-type": "quorum"})
            await channel.default_exchange.publish(
                aio_pika.Message(JobProgress(job_id=4711, stage="transcribing").model_dump_json().encode()),
                routing_key=queue_name)

            async def handler(message: JobProgress):
                metrics.add_audio_seconds(audio_s)  # the work: done at once
                yield Transcribed(job_id=message.job_id)

            waits = metrics.DEPENDENCY_WAITS.labels(stage)
            waits_before = waits._value.get()
            count_before, sum_before = real_time_factors(stage)
            consumer = asyncio.create_task(consume(connection, settings, stage,
                                                   [Route(JobProgress, handler, any_routing_key=True)],
                                                   queue_name=queue_name))
            deadline = time.monotonic() + 30
            while waits._value.get() == waits_before:  # the publish was refused: the hold began
                assert not consumer.done() and time.monotonic() < deadline, "the publish was never refused"
                await asyncio.sleep(0.05)
            held_from = time.monotonic()
            await asyncio.sleep(1.0)
            await asyncio.to_thread(rabbitmqctl, "clear_policy", "-p", vhost, "refuse")
            arrived = None
            while arrived is None:
                assert not consumer.done() and time.monotonic() < deadline + 30, "the text never arrived"
                arrived = await out.get(fail=False)
                await asyncio.sleep(0.05)
            held_s = time.monotonic() - held_from
            runner.stopping().set()
            await asyncio.wait_for(consumer, 40)
        finally:
            await connection.close()
    count, total_rtf = real_time_factors(stage)
    assert count == count_before + 1
    worked_s = (total_rtf - sum_before) * audio_s
    assert held_s >= 1.0 and worked_s < 0.5, (held_s, worked_s)
