"""What a service does when the broker fails under it, on the real RabbitMQ and PostgreSQL (a
vhost and a database of their own, no services): a publish refused mid-handler is tried again
without running the handler again, the outbox publishes what was stored as it was stored (a
newer version's message included), and a lost connection or a failing outbox is logged once,
where it is seen."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from types import SimpleNamespace
from typing import ClassVar

import aio_pika
import asyncpg
import pytest

from common import broker, metrics, runner
from common.broker import (
    DEAD_LETTERS_QUEUE,
    ROUTING_KEY_HEADER,
    Bus,
    Route,
    connect,
    consume,
    declare_queue,
    declare_topology,
    open_bus,
    retry_queue,
    stage_queue,
)
from common.db import apply_migrations, create_pool
from common.logs import setup_logging
from common.messages import Contract, JobProgress, TranscriptCompleted
from common.outbox import EVENT_REFUSED_FOR_S, flush_outbox, run_outbox_flusher
from common.settings import Settings
from devstack import scratch_database
from tests.conftest import ROOT, amqp_url, events_queue, free_port, private_vhost, rabbitmqctl


class Produced(Contract):
    ROUTING_KEY: ClassVar[str] = "test.produced"
    n: int


@pytest.fixture
def vhost():
    with private_vhost() as name:
        yield name


@pytest.fixture
def database_url():
    with scratch_database("stt_outbox") as url:
        yield url


def settings_for(vhost: str, **overrides) -> Settings:
    return Settings(_env_file=None, amqp_url=amqp_url(vhost), retry_delays_s="1,2", **overrides)


def completed(job_id: int) -> dict:
    """A transcript.completed as the outbox stores it."""
    return TranscriptCompleted(job_id=job_id, transcript_id=job_id, filename=f"{job_id}.wav",
                               segment_count=1).model_dump(mode="json")


async def wait_until(check, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.1)


async def test_a_publish_refused_mid_handler_is_tried_again_without_running_the_handler_again(vhost, fresh_runner):
    """The broker refuses (nacks) the first message a handler yields, as while its queues
    recover. Only that publish is tried again, the handler waiting at its yield: run again from
    the start, a diarizer would decode and diarize a whole file again, and a transcriber could
    publish another text under the same message id."""
    settings = settings_for(vhost, outage_hold_s=120.0)
    queue_name = "test.publish-outage"
    connection = await connect(settings, "test-publish-outage")
    try:
        channel = await connection.channel()
        work = await channel.declare_exchange("stt", aio_pika.ExchangeType.TOPIC, durable=True)
        out = await channel.declare_queue("test.out", durable=True)
        await out.bind(work, Produced.ROUTING_KEY)
        # The queue the handler's messages go to refuses them (the broker nacks the publish)...
        await asyncio.to_thread(rabbitmqctl, "set_policy", "-p", vhost, "--apply-to", "queues", "refuse",
                                r"^test\.out$", json.dumps({"max-length": 0, "overflow": "reject-publish"}))
        source = await channel.declare_queue(queue_name, durable=True, arguments={"x-queue-type": "quorum"})
        await channel.default_exchange.publish(
            aio_pika.Message(JobProgress(job_id=31337, stage="transcribing").model_dump_json().encode()),
            routing_key=queue_name)

        started = []

        async def handler(message: JobProgress):
            started.append(message)
            yield Produced(job_id=message.job_id, n=1)
            yield Produced(job_id=message.job_id, n=2)

        waits = metrics.DEPENDENCY_WAITS.labels("test")
        before = waits._value.get()
        consumer = asyncio.create_task(consume(connection, settings, "test",
                                               [Route(JobProgress, handler, any_routing_key=True)],
                                               queue_name=queue_name))

        async def refused() -> bool:
            assert not consumer.done(), consumer
            return waits._value.get() > before

        await wait_until(refused, 30, "the first publish was never refused")
        # ... until the outage is over.
        await asyncio.to_thread(rabbitmqctl, "clear_policy", "-p", vhost, "refuse")

        bodies = []

        async def both_arrived() -> bool:
            message = await out.get(fail=False)
            if message is not None:
                await message.ack()
                bodies.append(json.loads(message.body))
            return len(bodies) >= 2

        await wait_until(both_arrived, 60, f"the produced messages never all arrived: {bodies}")
        runner.stopping().set()
        await asyncio.wait_for(consumer, 40)  # once the handler is done with the delivery
        assert await source.get(fail=False) is None  # acked
        assert len(started) == 1  # the handler ran once
        assert [body["n"] for body in bodies] == [1, 2]
        assert await out.get(fail=False) is None  # nothing published twice
    finally:
        channel = await connection.channel()
        for name in (queue_name, "test.out", *(retry_queue(queue_name, d) for d in settings.retry_delays)):
            await channel.queue_delete(name)
        await connection.close()



async def consumers_of(connection, name: str) -> int | None:
    """How many consume `name`; None where it does not exist (on a connection that is not robust:
    a passive declare of a missing queue closes its channel)."""
    channel = await connection.channel()
    try:
        return (await channel.declare_queue(name, passive=True)).declaration_result.consumer_count
    except aio_pika.exceptions.ChannelNotFoundEntity:
        return None
    finally:
        if not channel.is_closed:
            await channel.close()


async def next_message(queue, timeout: float) -> aio_pika.abc.AbstractIncomingMessage:
    """The next message `queue` holds, acked, waiting for it up to `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (message := await queue.get(fail=False)) is None:
        assert asyncio.get_running_loop().time() < deadline, f"nothing came to {queue.name}"
        await asyncio.sleep(0.1)
    await message.ack()
    return message


async def stop_consumer(consumer: asyncio.Task, *connections) -> None:
    runner.stopping().set()
    try:
        await asyncio.wait_for(consumer, 20)
    finally:
        for connection in connections:
            await connection.close()


async def embedder_consumer(settings: Settings, name: str):
    """A stage consumer of stt.embedder on a connection of its own: (connection, its task, an event
    set once it has handled a message)."""
    connection = await connect(settings, name)
    handled = asyncio.Event()

    async def handle(message: JobProgress) -> None:
        handled.set()

    consumer = asyncio.create_task(consume(connection, settings, "embedder",
                                           [Route(JobProgress, handle, any_routing_key=True)]))
    return connection, consumer, handled


async def consumed_once(admin, consumer: asyncio.Task, queue_name: str) -> bool:
    """`queue_name` has one consumer, the consumer task still running."""
    assert not consumer.done(), consumer
    return await consumers_of(admin, queue_name) == 1


async def send_progress(admin, job_id: int, queue_name: str) -> None:
    await (await admin.channel()).default_exchange.publish(
        aio_pika.Message(JobProgress(job_id=job_id, stage="transcribing").model_dump_json().encode()),
        routing_key=queue_name)


async def test_a_consumer_whose_queue_is_deleted_declares_it_again_and_consumes_again(
        vhost, fresh_runner, monkeypatch, caplog):
    """An operator deletes an empty stage queue to have it declared anew (README). The broker
    cancels its consumers (as RabbitMQ 4.3 does for a delivery held past consumer_timeout), which
    aiormq drops without a word: the worker looked healthy and consumed nothing, for good."""
    monkeypatch.setattr(broker, "CONSUMER_CHECK_S", 0.2, raising=False)
    caplog.set_level(logging.WARNING, logger="common.broker")
    settings = settings_for(vhost)
    queue_name = stage_queue("embedder")
    connection, consumer, handled = await embedder_consumer(settings, "test-cancelled")
    admin = await aio_pika.connect(amqp_url(vhost))
    try:
        def consuming():
            return consumed_once(admin, consumer, queue_name)

        await wait_until(consuming, 30, "the consumer never started")
        await (await admin.channel()).queue_delete(queue_name)
        await wait_until(consuming, 30, "the queue was never declared again with a consumer")
        await send_progress(admin, 77, queue_name)
        await asyncio.wait_for(handled.wait(), 20)
        assert any(r.levelno == logging.WARNING and "broker cancelled the consumer" in r.getMessage()
                   for r in caplog.records if r.name == "common.broker")
    finally:
        await stop_consumer(consumer, admin, connection)


async def test_a_queue_deleted_before_a_reconnect_does_not_keep_the_process_from_reconnecting(
        vhost, fresh_runner, monkeypatch, caplog):
    """aio-pika declares again, passively, every queue a robust channel declared: one deleted
    meanwhile (here a stage queue that no consumer of this process takes, which every service
    binds) fails the restore, which closes the connection and tries again, for ever. The queues
    are declared again, and consumed again, by the consumer instead."""
    monkeypatch.setattr(broker, "CONSUMER_CHECK_S", 0.2, raising=False)
    caplog.set_level(logging.WARNING, logger="common.broker")
    settings = settings_for(vhost)
    queue_name = stage_queue("embedder")
    connection, consumer, handled = await embedder_consumer(settings, "test-restore")
    try:
        admin = await aio_pika.connect(amqp_url(vhost))

        def consuming():  # on the admin connection of the moment (it is opened again below)
            return consumed_once(admin, consumer, queue_name)

        await wait_until(consuming, 30, "the consumer never started")
        await (await admin.channel()).queue_delete(stage_queue("notifier"))
        await admin.close()
        await asyncio.to_thread(subprocess.run, ["rabbitmqctl", "close_all_connections", "--vhost", vhost,
                                                 "test: connection cut"], check=True, capture_output=True,
                                timeout=60)

        async def reconnected() -> bool:
            return any(r.name == "common.broker" and "reconnected" in r.getMessage() for r in caplog.records)

        await wait_until(reconnected, 30, "the connection was never restored")
        admin = await aio_pika.connect(amqp_url(vhost))
        await wait_until(consuming, 30, "the consumer never consumed again")
        assert await consumers_of(admin, stage_queue("notifier")) == 0  # declared again
        await send_progress(admin, 78, queue_name)
        await asyncio.wait_for(handled.wait(), 20)
        await admin.close()
    finally:
        await stop_consumer(consumer, connection)


async def test_a_body_nested_past_the_recursion_limit_is_parked_and_the_consumer_goes_on(vhost, fresh_runner):
    """Reading its job id for the log raised RecursionError outside the consumer's error
    handling: the delivery was never settled, and the replica (prefetch 1) took nothing more."""
    settings = settings_for(vhost)
    queue_name = "test.deep"
    connection = await connect(settings, "test-deep")
    handled = asyncio.Event()

    async def handle(message: JobProgress) -> None:
        handled.set()

    await open_bus(connection, settings)  # stt.dead-letters
    channel = await connection.channel()
    await channel.declare_queue(queue_name, durable=True, arguments={"x-queue-type": "quorum"})
    consumer = asyncio.create_task(consume(connection, settings, "test",
                                           [Route(JobProgress, handle, any_routing_key=True)],
                                           queue_name=queue_name, prefetch=1))
    try:
        deep = b'{"job_id": 79, "stage": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        for body in (deep, JobProgress(job_id=80, stage="transcribing").model_dump_json().encode()):
            await channel.default_exchange.publish(aio_pika.Message(body), routing_key=queue_name)
        await asyncio.wait_for(handled.wait(), 20)
        parked = await next_message(await channel.get_queue(DEAD_LETTERS_QUEUE), 10)
        assert parked.body == deep and parked.headers["x-last-error"] == "invalid message"
        assert not consumer.done()
    finally:
        await stop_consumer(consumer, connection)


async def test_a_parked_message_sent_back_gets_its_retries_again(vhost, fresh_runner):
    """An operator sends a parked message back from stt.dead-letters (README). It kept its retry
    count, all spent: its first failure parked it again at once, with no retry."""
    settings = Settings(_env_file=None, amqp_url=amqp_url(vhost), retry_delays_s="1")
    queue_name = "test.sent-back"
    connection = await connect(settings, "test-sent-back")
    tries = []

    async def failing(message: JobProgress) -> None:
        tries.append(message)
        raise RuntimeError("the model crashed")

    await open_bus(connection, settings)  # stt.dead-letters
    channel = await connection.channel()
    await channel.declare_queue(queue_name, durable=True, arguments={"x-queue-type": "quorum"})
    consumer = asyncio.create_task(consume(connection, settings, "test",
                                           [Route(JobProgress, failing, any_routing_key=True)],
                                           queue_name=queue_name))
    try:
        await channel.default_exchange.publish(
            aio_pika.Message(JobProgress(job_id=81, stage="transcribing").model_dump_json().encode()),
            routing_key=queue_name)
        dead_letters = await channel.get_queue(DEAD_LETTERS_QUEUE)
        parked = await next_message(dead_letters, 20)  # once its one retry failed too
        assert len(tries) == 2
        assert "x-retry-count" not in parked.headers and parked.headers["x-retries-spent"] == 1
        await channel.default_exchange.publish(aio_pika.Message(parked.body, headers=parked.headers),
                                               routing_key=queue_name)
        await next_message(dead_letters, 20)
        assert len(tries) == 4  # a first try and its retry again
    finally:
        await stop_consumer(consumer, connection)


async def taken(queue, timeout: float) -> aio_pika.abc.AbstractIncomingMessage:
    """The next message `queue` holds, unsettled (as basic.get gives it to the management UI),
    waiting for it up to `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (message := await queue.get(fail=False)) is None:
        assert asyncio.get_running_loop().time() < deadline, f"nothing came to {queue.name}"
        await asyncio.sleep(0.1)
    return message


async def test_a_parked_message_stays_however_often_it_is_looked_at(vhost):
    """People read stt.dead-letters: the management UI's "Get messages" with requeue, or
    rabbitmqadmin get, each look a delivery given back. It had the stage queues' delivery limit
    and no dead-letter exchange: the (DELIVERY_LIMIT + 1)-th look deleted the only copy of a
    parked message (a job's end needed to redact it later, an event to send back to a newer
    notifier)."""
    settings = settings_for(vhost, delivery_limit=2)
    connection = await connect(settings, "test-looked-at")
    try:
        await open_bus(connection, settings)  # stt.dead-letters
        channel = await connection.channel()
        parked = await channel.get_queue(DEAD_LETTERS_QUEUE)
        body = JobProgress(job_id=83, stage="transcribing").model_dump_json().encode()
        headers = {ROUTING_KEY_HEADER: JobProgress.ROUTING_KEY}
        await channel.default_exchange.publish(aio_pika.Message(body, headers=headers), routing_key=DEAD_LETTERS_QUEUE)
        for _ in range(settings.delivery_limit + 3):
            await (await taken(parked, 10)).nack(requeue=True)
        message = await taken(parked, 10)
        await message.ack()
        assert message.body == body
    finally:
        await connection.close()


async def test_a_message_the_broker_dead_lettered_moved_back_to_its_queue_is_handled(vhost, fresh_runner):
    """A message its worker crashed on every time is dead-lettered by the broker, without
    ROUTING_KEY_HEADER. Moved back to its queue (a shovel, the management UI's "Move messages":
    the default exchange, the queue's name as routing key, the headers kept), it was rejected as
    having no handler for that name, and parked again. It is handled by the routing key its
    x-death names."""
    settings = settings_for(vhost, delivery_limit=1)
    connection = await connect(settings, "test-moved-back")
    handled: list[JobProgress] = []

    async def handle(message: JobProgress) -> None:
        handled.append(message)

    bus = await open_bus(connection, settings)
    channel = await connection.channel()
    persister = await channel.get_queue(stage_queue("persister"))
    sent = JobProgress(job_id=84, stage="transcribing")
    await bus.publish(sent)
    for _ in range(settings.delivery_limit + 1):  # its worker crashes on it every time
        await (await taken(persister, 10)).reject(requeue=True)
    parked = await next_message(await channel.get_queue(DEAD_LETTERS_QUEUE), 10)
    assert ROUTING_KEY_HEADER not in parked.headers and parked.headers["x-death"][0]["reason"] == "delivery_limit"
    await channel.default_exchange.publish(aio_pika.Message(parked.body, headers=parked.headers),
                                           routing_key=stage_queue("persister"))
    consumer = asyncio.create_task(consume(connection, settings, "persister", [Route(JobProgress, handle)]))
    try:
        async def was_handled() -> bool:
            return bool(handled) or consumer.done()

        await wait_until(was_handled, 20, "the message moved back was never handled")
        assert handled == [sent]
    finally:
        await stop_consumer(consumer, connection)


async def test_a_queue_of_an_earlier_version_leaves_no_channel_open(vhost):
    """The broker closes a channel whose declaration it refuses; aio-pika opened a robust one
    again at once, and it stayed open: one more channel at every start."""
    settings = settings_for(vhost)
    connection = await connect(settings, "test-legacy")
    try:
        channel = await connection.channel()
        await channel.declare_queue("test.legacy", durable=True, arguments={"x-queue-type": "quorum"})
        channels = connection.transport.connection.channels
        before = len(channels)
        for _ in range(3):
            await declare_queue(connection, "test.legacy", {"x-queue-type": "quorum", "x-delivery-limit": 3})
        await asyncio.sleep(1)  # aio-pika reopens a robust channel in the background
        assert len(channels) == before
    finally:
        await connection.close()


@pytest.fixture
async def outbox_bus(vhost, database_url):
    """A migrated database of its own and a Bus on a vhost of its own."""
    settings = settings_for(vhost, database_url=database_url)
    pool = await create_pool(settings, max_size=2)
    connection = await connect(settings, "test-outbox")
    try:
        await apply_migrations(pool)
        yield pool, await open_bus(connection, settings), connection
    finally:
        await connection.close()
        await pool.close()


async def received(queue, count: int) -> list[aio_pika.abc.AbstractIncomingMessage]:
    messages = []
    for _ in range(count):
        message = await queue.get(timeout=10)
        await message.ack()
        messages.append(message)
    assert await queue.get(fail=False) is None
    return messages


def properties(message) -> tuple:
    return message.message_id, message.type, message.headers, message.content_type, message.delivery_mode


async def test_the_outbox_publishes_each_row_as_it_was_stored(outbox_bus):
    """A rolling upgrade: a newer version stored an event and a work message with a field this
    version does not know. They go out with it (not re-serialised by this version's model, which
    drops it), with the properties Bus.publish gives them, to the same exchanges."""
    pool, bus, connection = outbox_bus
    channel = await connection.channel()
    subscriber = await events_queue(channel, "#")
    persister = await channel.declare_queue("stt.persister", passive=True)
    event = {**completed(5), "summary_language": "de"}
    work = {**JobProgress(job_id=5, stage="transcribing").model_dump(mode="json"), "eta_s": 12.5}
    await pool.execute("INSERT INTO outbox (routing_key, body) VALUES ('transcript.completed', $1),"
                       " ('job.progress', $2)", event, work)
    assert await flush_outbox(pool, bus) == 2
    [stored_event] = await received(subscriber, 1)
    [stored_work] = await received(persister, 1)
    assert json.loads(stored_event.body) == event  # with the field this version does not know
    assert json.loads(stored_work.body) == work
    assert stored_event.message_id == event["message_id"] and stored_work.message_id == work["message_id"]

    # The same properties as this version's own publish of them.
    await bus.publish_event(TranscriptCompleted.model_validate(event))
    await bus.publish(JobProgress.model_validate(work))
    [own_event] = await received(subscriber, 1)
    [own_work] = await received(persister, 1)
    assert properties(stored_event) == properties(own_event)
    assert properties(stored_work) == properties(own_work)


async def test_a_row_of_a_kind_this_version_does_not_know_is_left_for_a_newer_version(outbox_bus, caplog):
    """A newer version stored an event of a kind this one does not know: it stays in the outbox
    for a newer flusher (not set aside in outbox_dead for good), the rows after it still go, and
    it is said once, not at every pass. A row that is no message at all is still set aside."""
    pool, bus, connection = outbox_bus
    subscriber = await events_queue(await connection.channel(), "#")
    future = {"v": 2, "message_id": uuid.uuid4().hex, "job_id": 5, "transcript_id": 5}
    later = completed(6)
    ids = [r["id"] for r in await pool.fetch(
        "INSERT INTO outbox (routing_key, body) VALUES ('transcript.summarised', $1),"
        " ('transcript.completed', $2), ('transcript.completed', '[]'::jsonb) RETURNING id", future, later)]
    caplog.set_level(logging.DEBUG, logger="common.outbox")
    assert await flush_outbox(pool, bus) == 1
    assert await flush_outbox(pool, bus) == 0

    [message] = await received(subscriber, 1)
    assert json.loads(message.body) == later
    assert [r["id"] for r in await pool.fetch("SELECT id FROM outbox")] == [ids[0]]
    assert [r["id"] for r in await pool.fetch("SELECT id FROM outbox_dead")] == [ids[2]]
    left = [r for r in caplog.records if "does not know" in r.getMessage()]
    assert [r.levelno for r in left] == [logging.WARNING, logging.DEBUG]  # once, not every pass


class PublishesAfterHook(Bus):
    """A Bus that runs `hook` once, after its first publish: what other transactions commit
    while a flush pass is under way."""

    def __init__(self, bus: Bus, hook):
        super().__init__(bus.channel, bus.work, bus.events)
        self.hook = hook

    async def publish_stored(self, routing_key: str, body: dict) -> None:
        await super().publish_stored(routing_key, body)
        if self.hook is not None:
            hook, self.hook = self.hook, None
            await hook()


async def test_a_row_committed_late_with_a_lower_id_goes_out_before_the_jobs_later_rows(outbox_bus, database_url):
    """Outbox ids are taken before commit. Job 1's first chunk takes its ids, job 2 takes later
    ones and commits first; while the flusher sends job 2's rows, job 1's first chunk commits
    and its next chunk (which waited for it) commits rows with higher ids still. The same pass
    sends job 1's rows in id order, the first chunk's before the next chunk's and its
    transcript.completed, instead of passing the late low ids by until traffic pauses."""
    pool, bus, connection = outbox_bus
    subscriber = await events_queue(await connection.channel(), "#")

    def row(job_id: int, step: str) -> str:
        return json.dumps({"message_id": uuid.uuid4().hex, "job_id": job_id, "step": step})

    insert = "INSERT INTO outbox (routing_key, body) VALUES ($1, $2::text::jsonb)"
    first_chunk, other_job, next_chunk = [await asyncpg.connect(database_url) for _ in range(3)]
    try:
        first_chunk_tx = first_chunk.transaction()
        await first_chunk_tx.start()
        for step in ("chunk 0 segment 0", "chunk 0 segment 1"):
            await first_chunk.execute(insert, "segment.created", row(1, step))
        async with other_job.transaction():
            for step in ("chunk 0 segment 0", "completed"):
                await other_job.execute(insert, "segment.created", row(2, step))

        async def job_1_commits_both_chunks():
            await first_chunk_tx.commit()
            async with next_chunk.transaction():
                await next_chunk.execute(insert, "segment.created", row(1, "chunk 1 segment 0"))
                await next_chunk.execute(insert, "transcript.completed", row(1, "completed"))

        assert await flush_outbox(pool, PublishesAfterHook(bus, job_1_commits_both_chunks)) == 6
    finally:
        for conn in (first_chunk, other_job, next_chunk):
            await conn.close()
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 0  # none held back for a later pass
    bodies = [json.loads(m.body) for m in await received(subscriber, 6)]
    assert [b["step"] for b in bodies if b["job_id"] == 1] == [
        "chunk 0 segment 0", "chunk 0 segment 1", "chunk 1 segment 0", "completed"]


async def test_a_lost_broker_connection_is_logged_as_a_warning(vhost, caplog):
    """aio-pika says it at INFO, which the services' logging keeps from libraries."""
    settings = settings_for(vhost)
    caplog.set_level(logging.WARNING, logger="common.broker")
    connection = await connect(settings, "test-connection-lost")
    try:
        await asyncio.to_thread(subprocess.run, ["rabbitmqctl", "close_all_connections", "--vhost", vhost,
                                                 "test: connection cut"], check=True, capture_output=True,
                                timeout=60)

        async def logged_back() -> bool:
            return any("reconnected" in r.getMessage() for r in caplog.records)

        await wait_until(logged_back, 60, "the reconnection was never logged")
    finally:
        await connection.close()
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "common.broker"]
    assert lines[0][0] == logging.WARNING and "test-connection-lost lost" in lines[0][1], lines
    assert lines[-1][0] == logging.WARNING and "reconnected" in lines[-1][1], lines
    assert len(lines) == 2, lines  # closing it ourselves is no loss


async def test_an_outbox_that_cannot_publish_says_so_once_and_once_more_when_it_can(outbox_bus, caplog):
    """A broker away for minutes: the flusher tries every 2 s; one warning when the failure
    starts and one when it is over, not a warning and a traceback at every try."""
    pool, bus, connection = outbox_bus
    working = Bus(bus.channel, bus.work, bus.events)
    broken = await open_bus(connection, settings_for("unused"))
    await broken.channel.close()  # publishing on it fails, as on a channel the broker closed
    bus.channel, bus.work, bus.events = broken.channel, broken.work, broken.events
    await pool.execute("INSERT INTO outbox (routing_key, body) VALUES ('transcript.completed', $1)", completed(8))
    caplog.set_level(logging.INFO, logger="common.outbox")
    flusher = asyncio.create_task(run_outbox_flusher(pool, bus, asyncio.Event(), EVENT_REFUSED_FOR_S, interval_s=0.05))
    try:
        await asyncio.sleep(1.5)  # many tries
        bus.channel, bus.work, bus.events = working.channel, working.work, working.events

        async def published() -> bool:
            return await pool.fetchval("SELECT count(*) FROM outbox") == 0

        await wait_until(published, 20, "the outbox was never published")
        await asyncio.sleep(0.3)
    finally:
        flusher.cancel()
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "common.outbox"]
    assert [level for level, _ in lines] == [logging.WARNING, logging.WARNING, logging.WARNING], lines
    assert "not published" in lines[0][1] and "failed" in lines[1][1] and "works again" in lines[2][1], lines


def test_log_level_debug_reaches_the_libraries_and_other_levels_keep_them_quiet():
    root = logging.getLogger()
    libraries = ("aiormq", "aio_pika", "urllib3", "httpx", "faster_whisper", "numba")
    saved = root.handlers[:], root.level, {name: logging.getLogger(name).level for name in libraries}
    try:
        setup_logging("INFO")
        assert {logging.getLogger(n).getEffectiveLevel() for n in ("aio_pika", "aiormq", "httpx")} == {logging.WARNING}
        setup_logging("DEBUG")
        assert {logging.getLogger(n).getEffectiveLevel() for n in ("aio_pika", "aiormq", "urllib3", "httpx")} == {
            logging.DEBUG}
        assert logging.getLogger("aio_pika.robust_connection").isEnabledFor(logging.DEBUG)
        setup_logging("ERROR")
        assert logging.getLogger("aio_pika").getEffectiveLevel() == logging.ERROR
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        for name, level in saved[2].items():
            logging.getLogger(name).setLevel(level)


class StallingProxy:
    """A TCP proxy to the broker that can stop passing on what the broker sends, as a network
    path that hangs without closing does: the client hears no heartbeat."""

    def __init__(self) -> None:
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, client_reader, client_writer) -> None:
        broker_reader, broker_writer = await asyncio.open_connection("127.0.0.1", 5672)

        async def pump(reader, writer, gated: bool) -> None:
            try:
                while data := await reader.read(65536):
                    if gated:
                        await self.flowing.wait()
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()

        await asyncio.gather(pump(client_reader, broker_writer, False), pump(broker_reader, client_writer, True))

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def test_a_background_task_whose_connection_stalls_is_started_again(vhost, caplog):
    """aiormq drops a connection that heard no heartbeat and fails the calls pending on it with
    CancelledError, which keep_running did not catch: ingest's outbox flusher (or its consumers,
    or its queue depth watcher) ended for good, without a word, while /readyz said ready. Being
    cancelled itself still stops it."""
    proxy = StallingProxy()
    port = await proxy.start()
    starts: list[int] = []
    declared = asyncio.Event()

    async def declares_a_queue() -> None:
        starts.append(len(starts))
        proxy.flowing.set()
        connection = await aio_pika.connect(f"amqp://guest:guest@127.0.0.1:{port}/{vhost}?heartbeat=1")
        try:
            channel = await connection.channel()
            if len(starts) == 1:
                proxy.flowing.clear()  # the broker's answer (and its heartbeats) never arrive
            await channel.declare_queue("test.stalled", auto_delete=True)
            declared.set()
            await asyncio.Event().wait()  # consuming, until cancelled
        finally:
            with contextlib.suppress(Exception):
                await connection.close()

    caplog.set_level(logging.ERROR, logger="common.runner")
    running = asyncio.create_task(runner.keep_running("the test consumer", declares_a_queue, restart_s=0.05))
    try:
        waiting = asyncio.create_task(declared.wait())
        await asyncio.wait({running, waiting}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        assert not running.done(), "the task ended for good"
        assert declared.is_set() and starts == [0, 1]
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(running, 10)
    finally:
        running.cancel()
        proxy.close()
    [record] = [r for r in caplog.records if r.name == "common.runner"]
    assert "the test consumer was cancelled from inside" in record.getMessage() and record.exc_info


@contextlib.asynccontextmanager
async def bus_through_a_stalling_proxy(vhost: str, database_url: str):
    """(settings, a migrated pool, a Bus on a robust connection with 1 s heartbeats through a
    StallingProxy, an admin connection straight to the broker, the proxy), all closed after."""
    settings = settings_for(vhost, database_url=database_url)
    pool = await create_pool(settings, max_size=2)
    await apply_migrations(pool)
    proxy = StallingProxy()
    port = await proxy.start()
    connection = await aio_pika.connect_robust(f"amqp://guest:guest@127.0.0.1:{port}/{vhost}?heartbeat=1"
                                               "&reconnect_interval=0.5")
    admin = await aio_pika.connect(amqp_url(vhost))
    try:
        yield settings, pool, await open_bus(connection, settings), admin, proxy
    finally:
        with contextlib.suppress(Exception):
            await connection.close()
        proxy.close()
        await admin.close()
        await pool.close()


async def stopped(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_the_persisters_outbox_flusher_whose_connection_stalls_is_started_again(vhost, database_url, caplog):
    """aiormq fails a publish confirm pending on a connection it gives up on (no heartbeat) with
    CancelledError, which run_outbox_flusher does not catch: the persister's flusher ended, and
    with it main()'s gather and the process. It is started again, as ingest's is, and publishes
    the event once the broker answers again."""
    from services.persister.__main__ import flush_outbox_until_stopped

    async with bus_through_a_stalling_proxy(vhost, database_url) as (settings, pool, bus, admin, proxy):
        subscriber = await events_queue(await admin.channel(), "transcript.completed")
        wake = asyncio.Event()
        caplog.set_level(logging.ERROR, logger="common.runner")
        flusher = asyncio.create_task(flush_outbox_until_stopped(pool, bus, wake, settings, restart_s=0.1))
        try:
            proxy.flowing.clear()  # the broker's confirm (and its heartbeats) never arrive
            await pool.execute("INSERT INTO outbox (routing_key, body) VALUES ('transcript.completed', $1)",
                               completed(9))
            wake.set()

            async def dropped() -> bool:
                return flusher.done() or any("cancelled from inside" in r.getMessage() for r in caplog.records)

            await wait_until(dropped, 30, "the connection was never dropped")
            assert not flusher.done(), "the outbox flusher ended for good"
            proxy.flowing.set()
            message = await next_message(subscriber, 30)  # at least once: a copy may follow
            assert json.loads(message.body)["job_id"] == 9

            async def published() -> bool:
                return flusher.done() or await pool.fetchval("SELECT count(*) FROM outbox") == 0

            await wait_until(published, 30, "the outbox was never published")
            assert not flusher.done(), "the outbox flusher ended for good"
        finally:
            await stopped(flusher)


async def test_the_notifiers_sweep_whose_connection_stalls_is_started_again(vhost, database_url, caplog):
    """The notifier ran its sweep for overdue deliveries straight in main()'s gather: a kick whose
    publish confirm aiormq failed with CancelledError (its connection heard no heartbeat) ended
    the sweep, main() and the process. It is started again, as the persister's outbox flusher is,
    and kicks the overdue delivery once the broker answers again."""
    from services.notifier.__main__ import sweep_until_stopped

    async with bus_through_a_stalling_proxy(vhost, database_url) as (settings, pool, bus, admin, proxy):
        webhook_id = await pool.fetchval("INSERT INTO webhooks (url, events, secret) VALUES ('http://127.0.0.1:9/hook',"
                                         " '{transcript.completed}', 'secret') RETURNING id")
        await pool.execute("INSERT INTO webhook_deliveries (webhook_id, event_id, event_type, job_id, payload,"
                           " next_attempt_at) VALUES ($1, 'e1', 'transcript.completed', 11, '{}',"
                           " now() - interval '1 hour')", webhook_id)
        kicks = await (await admin.channel()).declare_queue(stage_queue("notifier"), passive=True)
        caplog.set_level(logging.ERROR, logger="common.runner")
        proxy.flowing.clear()  # the broker's confirm of the kick (and its heartbeats) never arrive
        sweeping = asyncio.create_task(sweep_until_stopped(pool, bus, every_s=0.5, restart_s=0.1))
        try:
            async def dropped() -> bool:
                return sweeping.done() or any("cancelled from inside" in r.getMessage() for r in caplog.records)

            await wait_until(dropped, 30, "the connection was never dropped")
            assert not sweeping.done(), "the sweep ended for good"
            # The kick whose confirm never came reached the queue: only a kick of the sweep started
            # again counts.
            await kicks.purge()
            proxy.flowing.set()
            message = await next_message(kicks, 30)
            assert json.loads(message.body)["webhook_id"] == webhook_id
            assert not sweeping.done(), "the sweep ended for good"
        finally:
            await stopped(sweeping)


async def _proxied_consumer_queues(publishing, consuming, queue_name: str, settings):
    """For a test of a consumer publishing through a StallingProxy: its bus on `publishing`, the
    queue it consumes and test.out, where what it produces goes."""
    bus = await open_bus(publishing, settings)
    channel = await consuming.channel()
    source = await channel.declare_queue(queue_name, durable=True, arguments={"x-queue-type": "quorum"})
    out = await channel.declare_queue("test.out", durable=True)
    await out.bind("stt", Produced.ROUTING_KEY)
    return bus, source, out


async def _tear_down_proxied_consumer(consumer, proxy, publishing, consuming, queue_name: str, settings) -> None:
    """After a test of a consumer publishing through a StallingProxy: stop it, let the proxy flow,
    delete the test's queues, close both connections and the proxy."""
    if consumer is not None:
        await stopped(consumer)
    proxy.flowing.set()
    with contextlib.suppress(Exception):
        channel = await consuming.channel()
        for name in (queue_name, "test.out", *(retry_queue(queue_name, d) for d in settings.retry_delays)):
            await channel.queue_delete(name)
    with contextlib.suppress(Exception):
        await publishing.close()
    await consuming.close()
    proxy.close()


async def test_a_message_whose_publish_confirm_a_dropped_connection_cancelled_is_published_again(
        vhost, fresh_runner, caplog):
    """A stage publishes on a connection of its own. aiormq drops it when it hears no heartbeat and
    fails the publish confirm pending on it with CancelledError, which the consumer took for its
    own cancellation: the delivery was neither acked nor handed back, and the replica (prefetch 1)
    took nothing more until the broker's consumer_timeout, while its /healthz stayed green. It is
    a broker outage like any other: what the handler yielded is published again once the
    connection is back, the delivery acked, and the next message handled."""
    settings = settings_for(vhost, outage_hold_s=120.0)
    queue_name = "test.confirm-cancelled"
    proxy = StallingProxy()
    port = await proxy.start()
    caplog.set_level(logging.WARNING, logger="common.broker")
    through_proxy = f"amqp://guest:guest@127.0.0.1:{port}/{vhost}?heartbeat=1&reconnect_interval=0.5"
    publishing = await connect(Settings(_env_file=None, amqp_url=through_proxy), "test-publishing")
    consuming = await connect(settings, "test-consuming")
    stalled = asyncio.Event()
    handled: list[int] = []

    async def handler(message: JobProgress):
        if not stalled.is_set():
            stalled.set()
            proxy.flowing.clear()  # the broker's confirm (and its heartbeats) never arrive
        yield Produced(job_id=message.job_id, n=1)
        handled.append(message.job_id)

    consumer = None
    try:
        bus, source, out = await _proxied_consumer_queues(publishing, consuming, queue_name, settings)
        consumer = asyncio.create_task(consume(consuming, settings, "test",
                                               [Route(JobProgress, handler, any_routing_key=True)],
                                               bus=bus, queue_name=queue_name, prefetch=1))
        await send_progress(consuming, 91, queue_name)

        async def dropped() -> bool:
            assert not consumer.done(), consumer
            return any("test-publishing lost" in r.getMessage() for r in caplog.records)

        await wait_until(dropped, 30, "the publishing connection was never dropped")
        proxy.flowing.set()
        await send_progress(consuming, 92, queue_name)

        async def both_handled() -> bool:
            assert not consumer.done(), consumer
            return handled == [91, 92]

        await wait_until(both_handled, 30, f"the messages were not both handled: {handled}")
        produced: list[int] = []
        while 92 not in produced:
            produced.append(json.loads((await next_message(out, 10)).body)["job_id"])
        # 91 at least once: the copy whose confirm was lost may be there too.
        assert set(produced) == {91, 92} and await out.get(fail=False) is None, produced
        runner.stopping().set()
        await asyncio.wait_for(consumer, 20)
        assert await source.get(fail=False) is None  # acked, none left for the broker to deliver again
    finally:
        await _tear_down_proxied_consumer(consumer, proxy, publishing, consuming, queue_name, settings)


async def test_a_message_whose_handler_finishes_as_it_is_handed_back_is_acked_once(vhost, fresh_runner):
    """A stopping consumer hands back what its handlers have not finished (a copy, then an ack).
    A handler finishing meanwhile acked the same delivery too: aio-pika marks a message acked only
    once its ack is written, so both acks went out, the broker closed the channel for the unknown
    delivery tag, and every other message in hand was returned to the queue as a failed delivery
    instead of being handed back. Here the publishing connection is slow to confirm, as under
    load, so that the handler's last publish and the hand-back's copy are confirmed together."""
    settings = settings_for(vhost, shutdown_grace_s=0.5)
    queue_name = "test.handed-back"
    proxy = StallingProxy()
    port = await proxy.start()
    publishing = await connect(Settings(_env_file=None, amqp_url=f"amqp://guest:guest@127.0.0.1:{port}/{vhost}"),
                               "test-publishing")
    consuming = await connect(settings, "test-consuming")
    started: list[int] = []
    finish = asyncio.Event()

    async def handler(message: JobProgress):
        started.append(message.job_id)
        if message.job_id == 93:
            await finish.wait()
            yield Produced(job_id=message.job_id, n=1)
        else:
            await asyncio.Event().wait()  # a long job, still running when the consumer stops

    consumer = None
    try:
        bus, source, out = await _proxied_consumer_queues(publishing, consuming, queue_name, settings)
        for job_id in (93, 94):
            await send_progress(consuming, job_id, queue_name)
        consumer = asyncio.create_task(consume(consuming, settings, "test",
                                               [Route(JobProgress, handler, any_routing_key=True)],
                                               bus=bus, queue_name=queue_name, prefetch=2))

        async def both_started() -> bool:
            assert not consumer.done(), consumer
            return sorted(started) == [93, 94]

        await wait_until(both_started, 20, f"the messages were not both taken: {started}")
        proxy.flowing.clear()  # confirms wait from here
        runner.stopping().set()
        await asyncio.sleep(settings.shutdown_grace_s + 1.0)  # 93's copy is sent, its confirm awaited
        finish.set()  # 93's handler yields: its publish is confirmed with the copy
        await asyncio.sleep(0.5)
        proxy.flowing.set()
        await asyncio.wait_for(consumer, 20)

        left = []
        while (message := await source.get(fail=False)) is not None:
            await message.ack()
            left.append((json.loads(message.body)["job_id"], message.redelivered))
        # One copy of each, handed back: none returned by a closed channel (redelivered).
        assert sorted(left) == [(93, False), (94, False)], left
        assert json.loads((await next_message(out, 10)).body)["job_id"] == 93
    finally:
        await _tear_down_proxied_consumer(consumer, proxy, publishing, consuming, queue_name, settings)


async def queue_consumers(admin: aio_pika.abc.AbstractConnection, *names: str) -> list[int]:
    """How many consumers each queue has; [] while one is not declared yet."""
    channel = await admin.channel()
    try:
        return [(await channel.declare_queue(name, passive=True)).declaration_result.consumer_count
                for name in names]
    except aio_pika.exceptions.ChannelNotFoundEntity:
        return []
    finally:
        with contextlib.suppress(Exception):
            await channel.close()


async def test_ingests_consumers_whose_connection_stalls_are_started_again(vhost, fresh_runner, caplog,
                                                                           monkeypatch):
    """As keep_running's tasks: aiormq fails the calls pending on a connection it drops (no
    heartbeat) with CancelledError, which ingest's consumers did not catch: bucket drops and job
    ends were no longer taken by that replica, without a word, while it said it was ready."""
    from services.ingest import app as ingest_app
    from services.ingest.inbox import INBOX_EVENTS_QUEUE, RESULTS_QUEUE, Inbox

    monkeypatch.setattr(ingest_app, "RESTART_S", 0.1)
    settings = settings_for(vhost)
    admin = await aio_pika.connect_robust(amqp_url(vhost))
    await declare_topology(admin, settings)  # stt.events, which ingest's queues are bound to
    proxy = StallingProxy()
    port = await proxy.start()
    connection = await aio_pika.connect_robust(f"amqp://guest:guest@127.0.0.1:{port}/{vhost}?heartbeat=1"
                                               "&reconnect_interval=0.5")
    state = SimpleNamespace(broker_open=asyncio.Event(), connection=connection, bus=await open_bus(admin, settings))
    state.broker_open.set()
    caplog.set_level(logging.ERROR, logger="services.ingest")
    proxy.flowing.clear()  # the broker's answers (and its heartbeats) stop as the consumers start
    consuming = asyncio.create_task(ingest_app.consume_until_stopping(
        state, Inbox(settings, None, None, asyncio.Event())))
    try:
        async def dropped() -> bool:
            return consuming.done() or any("cancelled from inside" in r.getMessage() for r in caplog.records)

        await wait_until(dropped, 30, "the connection was never dropped")
        assert not consuming.done(), "the consumers ended for good"
        proxy.flowing.set()

        async def both_consumed() -> bool:
            return consuming.done() or await queue_consumers(admin, INBOX_EVENTS_QUEUE, RESULTS_QUEUE) == [1, 1]

        await wait_until(both_consumed, 30, "the consumers were not started again")
        assert not consuming.done(), "the consumers ended for good"
    finally:
        consuming.cancel()
        await asyncio.gather(consuming, return_exceptions=True)
        with contextlib.suppress(Exception):
            await connection.close()
        proxy.close()
        await admin.close()


async def test_one_of_ingests_consumers_cancelled_from_inside_starts_both_again(vhost, fresh_runner, monkeypatch):
    """Ingest's two consumers run in a TaskGroup, which takes a child that ends cancelled for one it
    cancelled itself: one consumer whose pending call aiormq failed with CancelledError (its
    connection dropped) ended without a word, and the other ran on alone, so that bucket drops (or
    job ends) were no longer taken. Both are started again."""
    from services.ingest import app as ingest_app
    from services.ingest import inbox as ingest_inbox
    from services.ingest.inbox import INBOX_EVENTS_QUEUE, RESULTS_QUEUE, Inbox

    monkeypatch.setattr(ingest_app, "RESTART_S", 0.1)
    real_consume = ingest_inbox.consume
    started: list[str] = []

    async def cancelled_from_inside_once(*args, queue_name: str, **kwargs) -> None:
        started.append(queue_name)
        if queue_name == INBOX_EVENTS_QUEUE and started.count(queue_name) == 1:
            # What aiormq does to a call pending on a connection it drops.
            pending = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_later(0.5, pending.cancel)
            await pending
        await real_consume(*args, queue_name=queue_name, **kwargs)

    monkeypatch.setattr(ingest_inbox, "consume", cancelled_from_inside_once)
    settings = settings_for(vhost)
    admin = await aio_pika.connect_robust(amqp_url(vhost))
    await declare_topology(admin, settings)
    connection = await aio_pika.connect_robust(amqp_url(vhost))
    state = SimpleNamespace(broker_open=asyncio.Event(), connection=connection, bus=await open_bus(admin, settings))
    state.broker_open.set()
    consuming = asyncio.create_task(ingest_app.consume_until_stopping(
        state, Inbox(settings, None, None, asyncio.Event())))
    try:
        async def both_started_again() -> bool:
            return consuming.done() or (started.count(INBOX_EVENTS_QUEUE) == 2 and await queue_consumers(
                admin, INBOX_EVENTS_QUEUE, RESULTS_QUEUE) == [1, 1])

        await wait_until(both_started_again, 20, "the consumers were not both started again")
        assert not consuming.done(), "the consumers ended for good"
        assert sorted(started) == sorted([INBOX_EVENTS_QUEUE, RESULTS_QUEUE] * 2), started
    finally:
        consuming.cancel()
        await asyncio.gather(consuming, return_exceptions=True)
        await connection.close()
        await admin.close()


@pytest.mark.parametrize("refused", ["password", "vhost", "permission"])
async def test_a_broker_refusing_the_login_or_the_vhost_stops_the_start_with_the_reason(refused, vhost, caplog,
                                                                                       monkeypatch):
    """connect() waited for ever on a wrong AMQP_URL password (retried as an outage), while the
    worker's /metrics, its liveness probe, said it was fine; a missing vhost crashed it with
    `AMQPInternalError("one of ['Connection.OpenOk']", <Connection.Close object>)`. Still refused
    after REFUSED_FOR_GOOD_AFTER_S (tried again meanwhile, an error each time), it says where and
    why, never the password."""
    monkeypatch.setattr(broker, "REFUSED_FOR_GOOD_AFTER_S", 2.0)
    unpermitted = f"stt_unpermitted_{uuid.uuid4().hex[:8]}"
    url = {"password": f"amqp://guest:pw-never-logged@127.0.0.1:5672/{vhost}",
           "vhost": "amqp://guest:pw-never-logged@127.0.0.1:5672/stt_no_such_vhost",
           "permission": f"amqp://guest:guest@127.0.0.1:5672/{unpermitted}"}[refused]
    if refused == "vhost":  # the right password, as guest's is
        url = url.replace("pw-never-logged", "guest")
    caplog.set_level(logging.INFO, logger="common.broker")
    rabbitmqctl("add_vhost", unpermitted)  # no permissions for guest
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(broker.BrokerMisconfigured) as stopped:
            await asyncio.wait_for(connect(Settings(_env_file=None, amqp_url=url), "test-refused"), 20)
        assert asyncio.get_running_loop().time() - started < 10
    finally:
        rabbitmqctl("delete_vhost", unpermitted)
    said = str(stopped.value)
    assert "fix AMQP_URL" in said and "guest@127.0.0.1:5672" in said, said
    assert {"password": "Login was refused", "vhost": "vhost stt_no_such_vhost not found",
            "permission": f"access to vhost '{unpermitted}' refused for user 'guest'"}[refused] in said, said
    errors = [r.getMessage() for r in caplog.records if r.name == "common.broker" and r.levelno == logging.ERROR]
    assert len(errors) >= 2 and all("trying again" in error for error in errors[:-1]), errors
    assert "fix AMQP_URL" in errors[-1], errors
    assert "pw-never-logged" not in " ".join([said, *(r.getMessage() for r in caplog.records)])


@pytest.mark.parametrize("refused", ["user", "permission"])
async def test_a_refusal_that_passes_is_waited_for(refused, vhost, caplog):
    """RabbitMQ refuses a login while its LDAP or HTTP authentication backend is down, and a vhost
    or user an operator (an init Job) makes after the services start: the worker exited at its
    first refusal, into a crash loop. It tries again (an error each time) and connects once the
    refusal passes."""
    user, unpermitted = f"stt_late_{uuid.uuid4().hex[:8]}", f"stt_unpermitted_{uuid.uuid4().hex[:8]}"
    url = {"user": f"amqp://{user}:late-secret@127.0.0.1:5672/{vhost}",
           "permission": f"amqp://guest:guest@127.0.0.1:5672/{unpermitted}"}[refused]
    caplog.set_level(logging.INFO, logger="common.broker")
    rabbitmqctl("add_vhost", unpermitted)  # no permissions for guest
    connecting = asyncio.create_task(connect(Settings(_env_file=None, amqp_url=url), "test-refused-for-now"))
    try:
        def refusals() -> list[str]:
            return [r.getMessage() for r in caplog.records if r.name == "common.broker" and r.levelno == logging.ERROR]

        async def refused_once() -> bool:
            return bool(refusals()) or connecting.done()

        await wait_until(refused_once, 20, "never refused")
        assert not connecting.done(), connecting.exception()
        assert "trying again" in refusals()[0], refusals()
        if refused == "user":
            await asyncio.to_thread(rabbitmqctl, "add_user", user, "late-secret")
            await asyncio.to_thread(rabbitmqctl, "set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        else:
            await asyncio.to_thread(rabbitmqctl, "set_permissions", "-p", unpermitted, "guest", ".*", ".*", ".*")
        connection = await asyncio.wait_for(connecting, 30)
        await connection.close()
    finally:
        connecting.cancel()
        rabbitmqctl("delete_vhost", unpermitted)
        if refused == "user":
            with contextlib.suppress(Exception):
                rabbitmqctl("delete_user", user)
    assert "late-secret" not in " ".join(r.getMessage() for r in caplog.records)


def refused_for_good_after(seconds: float, module: str) -> list[str]:
    """The command line of `python -m module` whose refused AMQP login is given up after `seconds`
    (common.broker.REFUSED_FOR_GOOD_AFTER_S), not a minute."""
    return [sys.executable, "-c", "import runpy, sys, common.broker; common.broker.REFUSED_FOR_GOOD_AFTER_S ="
            " float(sys.argv[1]); runpy.run_module(sys.argv[2], run_name='__main__', alter_sys=True)",
            str(seconds), module]


def test_a_worker_whose_broker_login_is_refused_exits_with_the_reason(vhost):
    """The process, not only the function: it exits non-zero and says why, instead of running
    on with its probes passing."""
    env = {**os.environ, "AMQP_URL": f"amqp://guest:wrong@127.0.0.1:5672/{vhost}", "METRICS_PORT": "0",
           "EMBEDDING_BACKEND": "ollama", "OLLAMA_URL": "http://127.0.0.1:9", "MODEL_NAME_EMBEDDED": "all-minilm"}
    finished = subprocess.run(refused_for_good_after(1, "services.embedder"), env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
    assert finished.returncode == 1, finished.stderr[-2000:]
    assert "refuses this service" in finished.stderr and "fix AMQP_URL" in finished.stderr, finished.stderr[-2000:]


@pytest.fixture
def worker_probes():
    """A worker's metrics server on a port of its own;
    yields get(path) -> its status code, callable from any thread."""
    port = free_port()
    metrics.serve_metrics(Settings(_env_file=None, metrics_port=port), "test")

    def get(path: str) -> int:
        with contextlib.suppress(urllib.error.HTTPError):
            return urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5).status
        return 503

    return get


async def test_a_worker_whose_event_loop_is_stuck_fails_its_liveness_probe(vhost, fresh_runner, monkeypatch,
                                                                          worker_probes):
    """The liveness probes asked /metrics, served by prometheus_client's own thread: a worker whose
    event loop was blocked (or whose consumer watchdog had stopped) passed them for ever. /healthz
    answers 503 once the watchdog is HEALTHY_WITHIN_CHECKS checks late, 200 before consuming starts
    (loading a model) and again once the loop runs."""
    monkeypatch.setattr(broker, "CONSUMER_CHECK_S", 0.2, raising=False)
    assert worker_probes("/healthz") == 200  # starting: nothing consumed yet
    settings = settings_for(vhost)
    connection, consumer, _ = await embedder_consumer(settings, "test-liveness")
    admin = await aio_pika.connect(amqp_url(vhost))
    try:
        await wait_until(lambda: consumed_once(admin, consumer, stage_queue("embedder")), 30, "never consumed")
        await asyncio.sleep(2 * broker.HEALTHY_WITHIN_CHECKS * broker.CONSUMER_CHECK_S)
        assert await asyncio.to_thread(worker_probes, "/healthz") == 200
        answers: list[int] = []
        asking = threading.Timer(2.5, lambda: answers.append(worker_probes("/healthz")))
        asking.start()
        time.sleep(3.5)  # a handler blocking the event loop (the watchdog's interval is 0.2 s)
        asking.join()
        assert answers == [503]
        await asyncio.sleep(0.5)
        assert await asyncio.to_thread(worker_probes, "/healthz") == 200
        assert await asyncio.to_thread(worker_probes, "/metrics") == 200
    finally:
        await stop_consumer(consumer, admin, connection)
    assert await asyncio.to_thread(worker_probes, "/healthz") == 200  # stopped: nothing overdue
