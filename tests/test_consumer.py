"""How a consumer settles what it holds when it stops or when its own error path fails, on the
real broker. A worker asked to stop (SIGTERM on scale-down) hands back what it holds without
spending a delivery attempt: RabbitMQ drops (or dead-letters) a message given back more times
than the queue's delivery limit, so on a queue whose limit is 1 a nack or a closed channel spends
one of its two deliveries; handing it back keeps it whole and unredelivered."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
from urllib.parse import unquote, urlsplit

import aio_pika

from common import metrics, runner
from common.broker import (
    DEAD_LETTERS_QUEUE,
    ROUTING_KEY_HEADER,
    EndedJobs,
    PermanentError,
    Route,
    connect,
    consume,
    open_bus,
    retry_queue,
    stage_queue,
)
from common.messages import JobProgress, JobSubmitted, TranscriptDeleted
from tests.conftest import Stack, amqp_url, private_vhost

QUEUE = "test.shutdown"


async def queue_holding_one(channel, name: str, message: JobProgress):
    """A fresh quorum queue whose delivery limit is 1 (a second nack or lost channel would drop what
    it holds), holding `message`."""
    await channel.queue_delete(name)
    queue = await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum", "x-delivery-limit": 1})
    await channel.default_exchange.publish(
        aio_pika.Message(message.model_dump_json().encode(), type=message.ROUTING_KEY), routing_key=name)
    return queue


async def delete_queues(connection, name: str, settings) -> None:
    """A test queue and the delay queues consume() made for it; then the connection is closed."""
    channel = await connection.channel()
    for queue in (name, *(retry_queue(name, delay) for delay in settings.retry_delays)):
        await channel.queue_delete(queue)
    await connection.close()


async def test_a_stopping_consumer_hands_back_its_message_without_spending_a_delivery(stack: Stack, fresh_runner):
    settings = stack.settings(shutdown_grace_s=0.5)
    connection = await connect(settings, "test-shutdown")
    try:
        channel = await connection.channel()
        sent = JobProgress(job_id=424242, stage="transcribing")
        queue = await queue_holding_one(channel, QUEUE, sent)
        holding = asyncio.Event()

        async def never_finishes(message: JobProgress) -> None:
            holding.set()
            await asyncio.sleep(3600)

        consumer = asyncio.create_task(consume(connection, settings, "test",
                                               [Route(JobProgress, never_finishes, any_routing_key=True)],
                                               queue_name=QUEUE))
        await asyncio.wait_for(holding.wait(), 20)
        runner.stopping().set()
        await asyncio.wait_for(consumer, 10)  # it stops within the grace period
        assert all(f.done() for f in runner._drained)

        message = await queue.get(timeout=5)
        await message.ack()
        assert JobProgress.model_validate_json(message.body) == sent
        assert not message.redelivered
        assert (message.headers or {}).get("x-delivery-count", 0) == 0
        assert (message.headers or {}).get("x-retry-count", 0) == 0  # not a retry either
    finally:
        await delete_queues(connection, QUEUE, settings)


async def test_a_message_held_through_a_long_outage_goes_back_to_its_queue_unspent(stack: Stack, fresh_runner):
    """A worker holds a message while its database is down, trying again. Held past the broker's
    consumer timeout (30 min by default), the broker takes it back and counts a delivery: an
    outage of DELIVERY_LIMIT + 1 times that (3 hours) dead-lettered the message and failed its job.
    After OUTAGE_HOLD_S the worker hands it back as a new copy instead (a fresh delivery count),
    and handles it once the database is back."""
    settings = stack.settings(outage_hold_s=1.0, shutdown_grace_s=0.5)
    queue_name = "test.outage"
    connection = await connect(settings, "test-outage")
    try:
        channel = await connection.channel()
        sent = JobProgress(job_id=454545, stage="transcribing")
        queue = await queue_holding_one(channel, queue_name, sent)
        outage_ends = asyncio.get_running_loop().time() + 4
        tries, handled = [], asyncio.Event()

        async def store(message: JobProgress) -> None:
            tries.append(message)
            if asyncio.get_running_loop().time() < outage_ends:
                raise ConnectionRefusedError("the database is down")
            handled.set()

        handed_back = metrics.MESSAGES.labels("test", queue_name, "handed_back")
        before = handed_back._value.get()
        consumer = asyncio.create_task(consume(connection, settings, "test",
                                               [Route(JobProgress, store, any_routing_key=True)],
                                               queue_name=queue_name, wait_on=(ConnectionRefusedError,)))
        await asyncio.wait_for(handled.wait(), 60)
        runner.stopping().set()
        await asyncio.wait_for(consumer, 10)
        assert tries[-1] == sent and handed_back._value.get() - before >= 2  # after 1 s, 2 s, ... of outage
        assert await queue.get(fail=False) is None  # handled once, not also left behind
    finally:
        await delete_queues(connection, queue_name, settings)


async def consumers(connection, queue_name: str) -> int:
    channel = await connection.channel()
    try:
        return (await channel.declare_queue(queue_name, passive=True)).declaration_result.consumer_count
    finally:
        await channel.close()


async def test_the_diarizer_queue_bounds_a_delivery_and_a_queue_of_an_earlier_version_still_works(stack: Stack):
    with private_vhost() as fresh, private_vhost() as upgraded:
        settings = stack.settings(amqp_url=amqp_url(fresh), max_audio_hours=4)
        connection = await connect(settings, "test-topology")
        await open_bus(connection, settings)
        await connection.close()
        listed = subprocess.run(["rabbitmqctl", "list_queues", "-q", "-p", fresh, "name", "arguments"],
                                capture_output=True, text=True, check=True, timeout=60).stdout
        [diarizer] = [line for line in listed.splitlines() if line.startswith("stt.diarizer\t")]
        assert "x-consumer-timeout" in diarizer and str(4 * 3600 * 1000) in diarizer

        # The stage queue as an earlier version declared it (no x-consumer-timeout), and the
        # dead letters' queue as a DELIVERY_LIMIT since changed made it: the broker refuses a
        # declaration with other arguments; the service still starts and routes to them.
        settings = stack.settings(amqp_url=amqp_url(upgraded))
        connection = await connect(settings, "test-topology")
        try:
            channel = await connection.channel()
            await channel.declare_queue(stage_queue("diarizer"), durable=True, arguments={
                "x-queue-type": "quorum", "x-delivery-limit": settings.delivery_limit,
                "x-dead-letter-exchange": "stt.dead"})
            await channel.declare_queue(DEAD_LETTERS_QUEUE, durable=True, arguments={
                "x-queue-type": "quorum", "x-delivery-limit": settings.delivery_limit + 5})
            bus = await open_bus(connection, settings)
            await bus.publish(JobSubmitted(job_id=1, audio_bucket="audio", audio_key="uploads/1", filename="a.wav"))
            queue = await channel.declare_queue(stage_queue("diarizer"), passive=True)
            message = await queue.get(timeout=5)
            await message.ack()
            assert JobSubmitted.model_validate_json(message.body).job_id == 1
        finally:
            await connection.close()


async def test_when_failing_the_job_cannot_be_published_the_message_goes_back_to_the_queue(stack: Stack):
    with private_vhost() as vhost:
        # Its persister queue will no longer take job.failed: publishing that is refused.
        settings = stack.settings(amqp_url=amqp_url(vhost))
        connection = await connect(settings, "test-errpath")
        try:
            channel = await connection.channel()
            await channel.declare_queue(QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
            deliveries = []

            async def bad_input(message: JobProgress) -> None:
                deliveries.append(message)
                raise PermanentError("not audio")

            # As a stage of the transcript, whose failures fail the job.
            consumer = asyncio.create_task(consume(connection, settings, "transcriber",
                                                   [Route(JobProgress, bad_input, any_routing_key=True)],
                                                   queue_name=QUEUE))
            started = asyncio.get_running_loop().time()
            while await consumers(connection, QUEUE) == 0:  # it declared the topology (bindings included)
                assert asyncio.get_running_loop().time() - started < 30, "the consumer never started consuming"
                await asyncio.sleep(0.1)
            bus = await open_bus(connection, settings)
            persister = await bus.channel.get_queue(stage_queue("persister"))
            await persister.unbind(bus.work, "job.failed")
            sent = JobProgress(job_id=7, stage="transcribing")
            await channel.default_exchange.publish(aio_pika.Message(sent.model_dump_json().encode()), routing_key=QUEUE)
            deadline = asyncio.get_running_loop().time() + 15
            while len(deliveries) < 2 and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.1)
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer
            # Not left unacked on a live channel (that would hold it until the process dies): back in
            # the queue, delivered again.
            assert len(deliveries) >= 2
        finally:
            await connection.close()



async def produced_while_its_job_ends(stack: Stack, job_ends: bool) -> tuple[list[JobProgress], str, str]:
    """A stage whose handler, working on a message of job 31337 (a chunk being transcribed), yields
    its one result only once released; the job ends meanwhile (`job_ends`: added to the consumer's
    EndedJobs, as its transcript.failed would) or not. Returns what reached the persister's queue
    within 2 s of the release, the input queue's `messages_ready messages_unacknowledged` once the
    consumer counted the message, and the outcome it was counted as."""
    queue_name = "test.ended"
    with private_vhost() as vhost:
        settings = stack.settings(amqp_url=amqp_url(vhost), shutdown_grace_s=0.5)
        connection = await connect(settings, "test-ended")
        try:
            channel = await connection.channel()
            sent = JobProgress(job_id=31337, stage="transcribing")
            await queue_holding_one(channel, queue_name, sent)
            working, release, ended = asyncio.Event(), asyncio.Event(), EndedJobs()

            async def transcribe(message: JobProgress):
                working.set()
                await release.wait()
                yield JobProgress(job_id=message.job_id, stage="embedding")

            counted = {outcome: metrics.MESSAGES.labels("test", queue_name, outcome) for outcome in metrics.OUTCOMES}
            before = {outcome: counter._value.get() for outcome, counter in counted.items()}
            consumer = asyncio.create_task(consume(connection, settings, "test",
                                                   [Route(JobProgress, transcribe, any_routing_key=True)],
                                                   queue_name=queue_name, ended=ended))
            await asyncio.wait_for(working.wait(), 20)
            if job_ends:
                ended.add(sent.job_id)
            release.set()
            deadline = asyncio.get_running_loop().time() + 10
            while not (outcomes := [o for o, c in counted.items() if c._value.get() > before[o]]):
                assert asyncio.get_running_loop().time() < deadline, "the message was never settled"
                await asyncio.sleep(0.1)
            deadline = asyncio.get_running_loop().time() + 10
            while True:  # (the ack is not confirmed: the broker may take it in a moment after it was sent)
                listed = await asyncio.to_thread(
                    subprocess.run, ["rabbitmqctl", "list_queues", "-q", "-p", vhost, "name", "messages_ready",
                                     "messages_unacknowledged"], check=True, capture_output=True, text=True, timeout=60)
                [left] = [" ".join(row[1:]) for row in map(str.split, listed.stdout.splitlines())
                          if row[:1] == [queue_name]]
                if left == "0 0" or asyncio.get_running_loop().time() > deadline:
                    break
                await asyncio.sleep(0.5)
            persister = await channel.declare_queue(stage_queue("persister"), passive=True)
            published, deadline = [], asyncio.get_running_loop().time() + 2
            while asyncio.get_running_loop().time() < deadline:
                if (message := await persister.get(fail=False)) is not None:
                    await message.ack()
                    published.append(JobProgress.model_validate_json(message.body))
                await asyncio.sleep(0.1)
            runner.stopping().set()
            await asyncio.wait_for(consumer, 10)
            return published, left, " ".join(outcomes)
        finally:
            await connection.close()


async def test_what_a_stage_produces_for_a_job_that_ended_meanwhile_is_not_published(stack: Stack, fresh_runner):
    """A chunk a transcriber finishes after its job was cancelled is thrown away there, not sent on:
    the persister would announce the failure again for it (a chunk handed in a minute or more
    after the end) and every subscriber would get transcript.failed twice. Its message is acked."""
    published, left, outcome = await produced_while_its_job_ends(stack, job_ends=True)
    assert published == []
    assert left == "0 0"  # acked: neither back in the queue nor held unacked
    assert outcome == "skipped"


async def test_what_a_stage_produces_for_a_job_still_running_is_published(stack: Stack, fresh_runner):
    published, left, outcome = await produced_while_its_job_ends(stack, job_ends=False)
    assert [(m.job_id, m.stage) for m in published] == [(31337, "embedding")]
    assert left == "0 0"
    assert outcome == "handled"


def test_retry_queues_are_declared_to_dead_letter_at_least_once(stack: Stack):
    """A retry waits in a delay queue until its delay is over, then the broker moves it back to
    its stage's queue. A classic queue does that at most once: where the stage's queue cannot
    take it at that moment (a cluster node down), the retry, and with it the job, is gone. A
    quorum queue with at-least-once dead-lettering keeps it until the stage's queue confirmed it.
    (What the delay queues are declared with: the broker's failure it guards against is not made here.)"""
    vhost = unquote(urlsplit(stack.amqp_url).path[1:])
    listing = subprocess.run(["rabbitmqctl", "list_queues", "-q", "-p", vhost, "name", "type", "arguments",
                              "--formatter", "json"], check=True, capture_output=True, text=True, timeout=60)
    queues = {q["name"]: q for q in json.loads(listing.stdout)}
    delays = {retry_queue("stt.transcriber", delay) for delay in stack.settings().retry_delays}
    assert delays <= queues.keys()
    for name in delays:
        arguments = {key: value for key, _type, value in queues[name]["arguments"]}
        assert queues[name]["type"] == "quorum", name
        assert arguments["x-dead-letter-strategy"] == "at-least-once", name
        assert arguments["x-overflow"] == "reject-publish", name  # at-least-once needs it
        assert arguments["x-dead-letter-routing-key"] == "stt.transcriber", name


NOBODYS_JOB = 987_654_321  # an event of it is recorded for no webhook


async def taken_beside(amqp: str, queue_name: str, events: int = 4, timeout: float = 60) -> int:
    """Two more consumers (prefetch 1, never acking) on `queue_name` beside the one already there,
    then `events` events for nobody's job put in it: how many the two received by the time the
    queue holds none ready and every delivery in its vhost not theirs was acked."""
    vhost = unquote(urlsplit(amqp).path[1:])
    connection = await aio_pika.connect(amqp)
    try:
        received: list = []

        async def receive(message) -> None:
            received.append(message)

        for _ in range(2):
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=1)
            await (await channel.declare_queue(queue_name, passive=True)).consume(receive)
        channel = await connection.channel()
        for _ in range(events):
            event = TranscriptDeleted(job_id=NOBODYS_JOB, transcript_id=NOBODYS_JOB)
            await channel.default_exchange.publish(
                aio_pika.Message(event.model_dump_json().encode(), content_type="application/json",
                                 headers={ROUTING_KEY_HEADER: event.ROUTING_KEY}), routing_key=queue_name)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            ready = (await channel.declare_queue(queue_name, passive=True)).declaration_result.message_count
            listed = await asyncio.to_thread(
                subprocess.run, ["rabbitmqctl", "list_channels", "-q", "vhost", "messages_unacknowledged"],
                check=True, capture_output=True, text=True, timeout=60)
            unacked = sum(int(row[1]) for row in map(str.split, listed.stdout.splitlines())
                          if len(row) == 2 and row[0] == vhost)
            if ready == 0 and unacked == len(received):  # (unacked counts what reached the two, heard or not)
                return len(received)
            assert asyncio.get_running_loop().time() < deadline, (ready, unacked, len(received))
            await asyncio.sleep(0.2)
    finally:
        await connection.close()  # what the two hold goes back to the queue


async def test_one_notifier_at_a_time_records_events(stack: Stack):
    """Two notifiers recording events at once could record a job's later event before its
    earlier one: a notifier that starts beside the stack's gets none of the events while the
    first is there."""
    assert await taken_beside(stack.amqp_url, "stt.notifier.events") == 0
