"""RabbitMQ transport: the one way every service publishes, consumes and retries.

Topology (declared in full by every service at start-up, so a message published before its
consumer first starts waits in that consumer's queue instead of being dropped):

- exchange `stt` (topic): work messages; one durable quorum queue per stage, `stt.<service>`.
- exchange `stt.events` (topic): public events for subscribers (see README).
- exchange `stt.dead` (topic): where a stage queue dead-letters a message that was rejected or
  delivered more than DELIVERY_LIMIT times (a worker that crashes on it every time). Queue
  `stt.dead-letters` keeps them for operators; queue `stt.persister.dead` lets the persister fail
  the job with the reason.
- `<queue>.delay.<N>s`: one quorum queue per retry delay whose messages expire after it and are
  dead-lettered back into the queue they came from (delayed retry without a broker plugin),
  at-least-once: the broker lets go of an expired message only once its queue confirmed it.
- A message whose retries are used up is failed with its reason and parked in
  `stt.dead-letters` by the consumer itself (not rejected, so the reason stays the real one).
- `stt.<service>.ended.<id>`: each pipeline worker's own exclusive queue of `transcript.failed`,
  `transcript.completed` and `transcript.deleted` events, so a job that ended (failed, was
  cancelled, done) or was deleted is not worked on further by any replica.

Connections: each service consumes on one (named `<service>` in RabbitMQ) and publishes on
another (`<service>.publish`, its Bus). During a resource alarm (memory, disk) RabbitMQ blocks
every connection that publishes and stops reading it, the acks of its consumers included: a
service publishing where it consumes would stop draining its queues, the persister those whose
messages filled the memory, and the pipeline would stand still until an operator stepped in.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from pydantic import BaseModel, ValidationError

from common import metrics, runner
from common.backoff import backoff
from common.failures import failure_category
from common.logs import current_job
from common.messages import (
    EVENTS,
    SCHEMA_VERSION,
    WORK_MESSAGES,
    ChunkEmbedded,
    ChunkTranscribed,
    Contract,
    JobDiarized,
    JobFailed,
    JobProgress,
    JobSubmitted,
    TranscriptCompleted,
    TranscriptDeleted,
    TranscriptFailed,
    WebhookDue,
)
from common.recent import Recent
from common.settings import Settings

log = logging.getLogger(__name__)

EXCHANGE = "stt"
EVENTS_EXCHANGE = "stt.events"
DEAD_EXCHANGE = "stt.dead"
DEAD_LETTERS_QUEUE = "stt.dead-letters"
PERSISTER_DEAD_QUEUE = "stt.persister.dead"

# What each stage's queue takes, as message models (the contract of docs/design.md); the queue
# is bound to their routing keys.
STAGE_INPUTS: dict[str, list[type[Contract]]] = {
    "diarizer": [JobSubmitted],
    "transcriber": [JobDiarized],
    "embedder": [ChunkTranscribed],
    "persister": [ChunkTranscribed, ChunkEmbedded, JobProgress, JobFailed],
    "notifier": [WebhookDue],
}
STAGE_BINDINGS: dict[str, list[str]] = {
    service: [model.ROUTING_KEY for model in models] for service, models in STAGE_INPUTS.items()
}
# The services whose work is the job: a message of theirs that cannot be handled fails the job.
# The others (the notifier, ingest) act on jobs' events: what they cannot handle is parked for an
# operator, and the transcription goes on.
JOB_STAGES = frozenset(STAGE_INPUTS) - {"notifier"}
# What the job stages take: a message of these the broker dead-letters fails its job.
JOB_ROUTING_KEYS = tuple(key for stage in sorted(JOB_STAGES) for key in STAGE_BINDINGS[stage])

# The broker is restarting or unreachable: a handler's publish failing for these reasons says
# nothing about the job, so the message is held and the handler tried again, not failed.
BROKER_UNAVAILABLE: tuple[type[BaseException], ...] = (
    aio_pika.exceptions.AMQPConnectionError,
    aio_pika.exceptions.ChannelInvalidStateError,
    aio_pika.exceptions.ChannelClosed,
    aio_pika.exceptions.DeliveryError,  # a nack while queues recover; PublishError is excluded below
)


def cancelled_from_inside(exc: BaseException) -> bool:
    """A CancelledError that is not this task's own cancellation: aiormq fails the calls pending on
    a connection it drops (no heartbeat from the broker), a publish confirm included, with one. A
    broker outage, as BROKER_UNAVAILABLE; a task being cancelled (stopping) is not."""
    task = asyncio.current_task()
    return isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling() == 0


ROUTING_KEY_HEADER = "x-original-routing-key"
ENDED_JOBS_KEPT = 10_000
RETRY_COUNT_HEADER = "x-retry-count"
# A parked message's retry count, kept for operators under a name the consumer does not read: one
# sent back from stt.dead-letters gets its retries again.
RETRIES_SPENT_HEADER = "x-retries-spent"
# How often a consumer checks that the broker still delivers to it (consume).
CONSUMER_CHECK_S = 5.0
# A worker's /healthz fails once a consumer has not checked for this many times CONSUMER_CHECK_S.
HEALTHY_WITHIN_CHECKS = 6


class PermanentError(Exception):
    """Bad input: the job fails at once with this message as its reason, and is not retried."""


def stage_queue(service: str) -> str:
    return f"stt.{service}"


def retry_queue(queue_name: str, delay_s: int) -> str:
    # Not `.retry.`: versions before 2026-12-05 made classic queues there (at-most-once
    # dead-lettering), and a queue cannot be declared again with other arguments.
    return f"{queue_name}.delay.{delay_s}s"


def watched_queues(*extra: str) -> list[str]:
    """The queues whose depth ingest reports: those declare_topology makes, and `extra`.
    (Not the retry queues: they exist only once their worker ran, and a passive declare of a
    missing queue closes the channel. Retries are counted by stt_messages_total instead.)"""
    return [*(stage_queue(s) for s in STAGE_BINDINGS), PERSISTER_DEAD_QUEUE, DEAD_LETTERS_QUEUE, *extra]


class BrokerMisconfigured(RuntimeError):
    """AMQP_URL names a login or a vhost RabbitMQ refuses (refused_for_good), still refused after
    REFUSED_FOR_GOOD_AFTER_S."""


# A refusal may pass: RabbitMQ answers 403 ACCESS_REFUSED while its LDAP or HTTP authentication
# backend is down, and "not found" or "refused for user" until an operator (an init Job) makes the
# vhost, user or permission a service was started with. For this long it is tried again, logged
# as an error each time; then the service exits with the reason, instead of looking alive.
REFUSED_FOR_GOOD_AFTER_S = 60.0


def refused_for_good(exc: BaseException) -> str | None:
    """What RabbitMQ answered when it refuses this service's connection: a wrong user or password,
    a vhost that does not exist or that the user may not use. None for anything else, a vhost
    that is down or a connection limit reached included (those pass)."""
    if isinstance(exc, aio_pika.exceptions.ProbableAuthenticationError):  # the broker's 403 ACCESS_REFUSED
        return str(exc)
    if isinstance(exc, aio_pika.exceptions.AuthenticationError):
        return f"no authentication mechanism in common (the broker offers {exc.args[0]})"
    # 530 NOT_ALLOWED: raised as ConnectionNotAllowed(text), or (aiormq 6.9, the broker's answer to
    # Connection.Open) as pamqp's AMQPInternalError(expected, the Connection.Close frame).
    close = exc.args[1] if len(exc.args) > 1 else None
    if getattr(close, "reply_code", None) == 530:
        text = str(close.reply_text)
    elif type(exc).__name__ == "ConnectionNotAllowed":
        text = str(exc)
    else:
        return None
    if "not found" in text or ("refused for user" in text and "limit" not in text):
        return text
    return None


def describe_amqp_url(url: str) -> str:
    """user@host:port (vhost ...) of an AMQP_URL, without its password."""
    try:
        parts = urllib.parse.urlsplit(url)
        vhost = urllib.parse.unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        user = urllib.parse.unquote(parts.username or "guest")
        return f"{user}@{parts.hostname}:{parts.port or 5672} (vhost {vhost})"
    except ValueError:
        return "AMQP_URL (unparsable)"


async def connect(settings: Settings, name: str) -> AbstractRobustConnection:
    """A connection that reconnects by itself, named `name` in RabbitMQ (its management UI,
    rabbitmqctl list_connections); waits for the broker at start-up. A broker that
    still refuses this service's login or vhost after REFUSED_FOR_GOOD_AFTER_S is not waited for
    (BrokerMisconfigured): the process would look alive (its /metrics and /healthz answer) and
    never work."""
    url = settings.amqp_url.get_secret_value()
    where = describe_amqp_url(url)
    first_refused_at: list[float] = []

    def worth_waiting(exc: BaseException) -> bool:
        if (refusal := refused_for_good(exc)) is None:
            return isinstance(exc, (ConnectionError, OSError, aio_pika.exceptions.AMQPError))
        if not first_refused_at:
            first_refused_at.append(time.monotonic())
        left_s = REFUSED_FOR_GOOD_AFTER_S - (time.monotonic() - first_refused_at[0])
        if left_s <= 0:
            return False
        log.error("RabbitMQ at %s refuses this service (%s); trying again for up to %.0f s more (an authentication"
                  " backend down, a vhost, user or permission still to be made), then exiting: check AMQP_URL",
                  where, refusal, left_s)
        return True

    try:
        async for attempt in backoff("RabbitMQ not reachable", worth_waiting):
            with attempt:
                connection = await aio_pika.connect_robust(named_amqp_url(url, name))
                _log_connection_changes(connection, name)
                return connection
    except Exception as exc:
        refusal = refused_for_good(exc)
        if refusal is None:
            raise
        log.error("RabbitMQ at %s refuses this service (%s): fix AMQP_URL; not waiting for it", where, refusal)
        raise BrokerMisconfigured(f"RabbitMQ at {where} refuses this service: {refusal}; fix AMQP_URL") from None
    raise AssertionError("unreachable")


def named_amqp_url(url: str, name: str) -> str:
    """AMQP_URL with `name=` (aiormq's connection_name) in its query, in place of one it had.
    Not client_properties: aio-pika ignores them when given a URL. The query's other
    parameters (heartbeat, TLS files) are kept as written."""
    parts = urllib.parse.urlsplit(url)
    query = [part for part in parts.query.split("&") if part and not part.startswith("name=")]
    return urllib.parse.urlunsplit(parts._replace(query="&".join([*query, f"name={urllib.parse.quote(name)}"])))


def _log_connection_changes(connection: AbstractRobustConnection, name: str) -> None:
    """A lost connection and its return, at WARNING (aio-pika says it at INFO, below the
    libraries' level; common.logs): what a service did meanwhile (held messages, an outbox that
    could not publish) is explained by these lines."""
    lost_at: list[float] = []

    def closed(_sender: Any, exc: BaseException | None = None) -> None:
        if connection.close_called or connection.is_closed:
            return  # closed by this process (shutting down)
        if not lost_at:
            lost_at.append(time.monotonic())
        log.warning("RabbitMQ connection %s lost (%s); reconnecting", name,
                    f"{type(exc).__name__}: {exc}" if exc else "closed")

    def reconnected(_sender: Any) -> None:
        down_s = time.monotonic() - lost_at.pop() if lost_at else 0.0
        log.warning("RabbitMQ connection %s reconnected after %.1f s", name, down_s)

    connection.close_callbacks.add(closed)
    connection.reconnect_callbacks.add(reconnected)


def diarizer_consumer_timeout_ms(settings: Settings) -> int:
    """The diarizer holds one delivery for a whole file (its clustering needs all of it), up to
    MAX_AUDIO_HOURS. It may take as long as the audio lasts before the broker takes it back: far
    above any real run (0.06-0.14 of real time on 2 CPU cores), far below "forever"."""
    return int(max(1800.0, settings.max_audio_hours * 3600) * 1000)


def stage_queue_arguments(service: str, settings: Settings) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "x-queue-type": "quorum",
        "x-delivery-limit": settings.delivery_limit,
        "x-dead-letter-exchange": DEAD_EXCHANGE,
    }
    if service == "diarizer":
        # Honoured by RabbitMQ 3.12 and later; older brokers apply their global consumer_timeout.
        arguments["x-consumer-timeout"] = diarizer_consumer_timeout_ms(settings)
    return arguments


# stt.dead-letters is read by people (the management UI's "Get messages" with requeue, rabbitmqadmin
# get), each look a delivery given back: a limit would delete the only copy of a parked message at
# its (limit + 1)-th look. Not none: RabbitMQ 4 gives a quorum queue declared without one a limit
# of 20 (a queue declared so on RabbitMQ 3 keeps no limit only until the broker is upgraded), and
# RabbitMQ 3 drops a message at its first return where the limit is negative. A limit no one looks
# up to holds on both.
DEAD_LETTERS_QUEUE_ARGUMENTS: dict[str, Any] = {"x-queue-type": "quorum", "x-delivery-limit": 1_000_000}


async def declare_queue(connection: AbstractRobustConnection, name: str, arguments: dict[str, Any]) -> None:
    """Declare a durable queue on a channel of its own. One made by an earlier version with other
    arguments is used as it is, with a warning (a queue's arguments cannot change in place; the
    broker closes the channel that asks, hence one of its own)."""
    channel = await plain_channel(connection)
    try:
        await channel.declare_queue(name, durable=True, arguments=arguments)
    except aio_pika.exceptions.ChannelPreconditionFailed:
        log.warning("queue %s exists with other arguments than this version declares (%s); using it"
                    " as it is. Delete it while it is empty to apply them.", name, arguments)
        channel = await plain_channel(connection)
        await channel.declare_queue(name, passive=True)
    finally:
        if not channel.is_closed:
            await channel.close()


async def plain_channel(connection: AbstractRobustConnection) -> AbstractChannel:
    """A channel that stays closed once closed. A robust one the broker closes (a refused
    declaration) is opened again at once by aio-pika, and left open: one leaked channel per start
    while a queue of an earlier version exists. Even one closed here is opened again at the next
    reconnect while it is not yet garbage, its refused declaration with it, which fails the
    whole reconnection."""
    await connection.ready()
    return await aio_pika.Channel(connection)


async def declare_topology(connection: AbstractRobustConnection, settings: Settings,
                           channel: AbstractRobustChannel | None = None) -> AbstractChannel:
    """Declare everything; returns an open channel for publishing (`channel`, or a new one).
    Its queue handles and bindings are not robust: aio-pika would declare each queue again
    (passively) after a reconnect, and one queue deleted meanwhile would fail every reconnection
    of the process for good. The bindings are durable; a consumer whose queue went declares all
    this again (consume)."""
    if channel is None:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    work = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    await channel.declare_exchange(EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    dead = await channel.declare_exchange(DEAD_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    for service, keys in STAGE_BINDINGS.items():
        await declare_queue(connection, stage_queue(service), stage_queue_arguments(service, settings))
        queue = await channel.declare_queue(stage_queue(service), passive=True, robust=False)
        for key in keys:
            await queue.bind(work, key, robust=False)
    for name, arguments in ((DEAD_LETTERS_QUEUE, DEAD_LETTERS_QUEUE_ARGUMENTS),
                            (PERSISTER_DEAD_QUEUE, {"x-queue-type": "quorum",
                                                    "x-delivery-limit": settings.delivery_limit})):
        await declare_queue(connection, name, arguments)
        queue = await channel.declare_queue(name, passive=True, robust=False)
        await queue.bind(dead, "#", robust=False)
    return channel


@dataclass
class Bus:
    """Publishing side of a service: every publish is persistent and confirmed by the broker
    before the call returns, and a work message that no queue would take raises."""

    channel: AbstractChannel
    work: AbstractExchange
    events: AbstractExchange

    async def publish(self, message: Contract, headers: dict[str, Any] | None = None) -> None:
        await self.work.publish(_encode(message, headers), routing_key=message.ROUTING_KEY, mandatory=True)

    async def publish_event(self, message: Contract) -> None:
        # Events with no subscriber yet are fine to drop (aio-pika defaults to mandatory).
        await self.events.publish(_encode(message), routing_key=message.ROUTING_KEY, mandatory=False)

    async def publish_stored(self, routing_key: str, body: dict[str, Any]) -> None:
        """A message as it was stored (the outbox): `body` published as it is, not as this
        version's model would have it (a field added by a newer version stays), to the exchange
        and with the properties that publish() or publish_event() give a message of
        `routing_key`, which must be one of WORK_MESSAGES or EVENTS (KeyError otherwise)."""
        if routing_key not in WORK_MESSAGES and routing_key not in EVENTS:
            raise KeyError(routing_key)
        message = _envelope(json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode(),
                            routing_key, str(body["message_id"]), body.get("v", SCHEMA_VERSION))
        if routing_key in WORK_MESSAGES:
            await self.work.publish(message, routing_key=routing_key, mandatory=True)
        else:
            await self.events.publish(message, routing_key=routing_key, mandatory=False)


def _encode(message: Contract, headers: dict[str, Any] | None = None) -> aio_pika.Message:
    return _envelope(message.model_dump_json().encode(), message.ROUTING_KEY, message.message_id, message.v,
                     headers)


def _envelope(body: bytes, routing_key: str, message_id: str, v: Any,
              headers: dict[str, Any] | None = None) -> aio_pika.Message:
    return aio_pika.Message(
        body=body,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message_id,
        type=routing_key,
        headers={"v": v, **(headers or {})},
    )


async def open_bus(connection: AbstractRobustConnection, settings: Settings) -> Bus:
    channel = await declare_topology(connection, settings)
    work = await channel.get_exchange(EXCHANGE)
    events = await channel.get_exchange(EVENTS_EXCHANGE)
    return Bus(channel=channel, work=work, events=events)


async def declare_delay_queues(channel: AbstractChannel, queue_name: str, delays: list[int]) -> None:
    """One queue per delay that hands what it holds back to `queue_name` when it expires.
    Quorum with at-least-once dead-lettering (RabbitMQ 3.10+, which needs reject-publish
    overflow): a classic queue drops an expired message even when `queue_name` could not take it."""
    for delay in sorted(set(delays)):
        await channel.declare_queue(
            retry_queue(queue_name, delay),
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-message-ttl": delay * 1000,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": queue_name,
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            },
        )


async def publish_later(bus: Bus, message: Contract, queue_name: str, delay_s: int) -> None:
    """`message` into `queue_name` after `delay_s` (a queue declare_delay_queues made for it)."""
    await bus.channel.default_exchange.publish(
        _encode(message, {ROUTING_KEY_HEADER: message.ROUTING_KEY}), routing_key=retry_queue(queue_name, delay_s),
        mandatory=True)


# A stage's handler yields the messages it produces (each is published and confirmed before the
# handler goes on; the delivery is acked after the last). A handler that only stores (the
# persister, ingest's consumers) is a coroutine instead.
Handler = Callable[[Any], AsyncIterator[Contract] | Awaitable[Any]]


class EndedJobs:
    """The jobs that ended (done, failed, or cancelled by their owner) or were deleted, as
    announced on stt.events while this process ran: the newest ENDED_JOBS_KEPT of them. A
    pipeline stage skips their messages (a job's work delivered again after it was done, or left
    over after it failed); what a replica started after the announcement still does is dropped by
    the persister, which stores nothing for a job that is not processing, and announces the end
    (or the deletion) again for the stages to hear: a failed or deleted job's at a diarizer's
    progress report or a chunk, a done job's at a diarizer's progress report only (a chunk of a
    done job is a copy delivered again: every chunk was stored, and no stage has work of it left)."""

    def __init__(self) -> None:
        self._ids: Recent[int, None] = Recent(ENDED_JOBS_KEPT)

    def add(self, job_id: int) -> None:
        # An end announced again keeps the place of its first announcement (put would make it newest).
        if job_id not in self._ids:
            self._ids.put(job_id, None)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._ids


async def watch_job_events(connection: AbstractRobustConnection, queue_prefix: str, routing_keys: list[str],
                           on_job: Callable[[int | None], None]) -> AbstractChannel:
    """Call `on_job` with the job id (None where there is none) of every stt.events message with
    one of `routing_keys`, from a queue of this process's own: exclusive, gone with the process,
    and named (not server-named) so that the robust connection can declare it again after a
    reconnect. Nothing is acknowledged: a wake-up missed while the process is away is not owed.
    Returns the channel it consumes on: closing it stops the watch."""
    channel = await connection.channel()
    try:
        events = await channel.declare_exchange(EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(f"{queue_prefix}.{uuid.uuid4().hex[:12]}", exclusive=True,
                                            auto_delete=True)
        for key in routing_keys:
            await queue.bind(events, key)

        async def on_event(message: AbstractIncomingMessage) -> None:
            on_job(_job_id_of(message.body))

        await queue.consume(on_event, no_ack=True)
    except BaseException:
        with contextlib.suppress(Exception):
            await channel.close()
        raise
    return channel


async def watch_ended_jobs(connection: AbstractRobustConnection, service: str, ended: EndedJobs) -> None:
    """Fill `ended` from stt.events' transcript.failed, transcript.completed and transcript.deleted."""
    def add(job_id: int | None) -> None:
        if job_id is not None:
            ended.add(job_id)

    await watch_job_events(connection, f"stt.{service}.ended",
                           [TranscriptFailed.ROUTING_KEY, TranscriptCompleted.ROUTING_KEY,
                            TranscriptDeleted.ROUTING_KEY], add)


@dataclass
class Route:
    """Messages of `model` (matched by its ROUTING_KEY, or any key on a queue that takes one
    kind of message) go to `handler`."""

    model: type[BaseModel]
    handler: Handler
    any_routing_key: bool = False
    # Instead of the model's own: messages of these routing keys (dead letters of several kinds).
    routing_keys: tuple[str, ...] = ()

    @property
    def routing_key(self) -> str:
        return "*" if self.any_routing_key else self.model.ROUTING_KEY

    @property
    def keys(self) -> tuple[str, ...]:
        return self.routing_keys or (self.routing_key,)


async def consume(
    connection: AbstractRobustConnection,
    settings: Settings,
    service: str,
    routes: list[Route],
    *,
    bus: Bus | None = None,
    queue_name: str | None = None,
    prefetch: int | None = None,
    wait_on: tuple[type[BaseException], ...] = (),
    ended: EndedJobs | None = None,
) -> None:
    """Consume `queue_name` (default: this stage's queue) until the process is asked to stop
    (common.runner) or the task is cancelled.

    Per message: validate against the route's model, run the handler, publish each message it
    yields (confirmed by the broker), ack once it is done. PermanentError fails the job at once and acks.
    An error in `wait_on` (always including BROKER_UNAVAILABLE, and a CancelledError that is not
    the task's own: cancelled_from_inside) means a dependency is down:
    the message is held and the handler tried again with backoff until it is back, spending
    no retry, so an outage of RabbitMQ (or the database, for the persister) fails no job.
    Any other error retries after the next delay of RETRY_DELAYS_S; when they are used up the
    job fails with the error and the message is parked in stt.dead-letters.
    With `ended`, filled here from stt.events, a message of a job that has already failed or
    been cancelled is acked without being handled, and a message its handler yields for a job
    that ended meanwhile is not published.
    A consumer the broker cancelled (its queue deleted; on RabbitMQ 4.3 and later, a delivery
    held past consumer_timeout), or one whose channel was opened again, declares the topology
    again and consumes again; where that fails, this raises (the worker exits non-zero).
    `bus`: where it publishes (what handlers yield, retries, parked and handed-back copies), the
    service's Bus on its publishing connection (see the module's docstring); its topology
    declared (open_bus). Without one, it opens one on `connection`, where a publish during an
    alarm stops its acks too.
    """
    by_key = {key: route for route in routes for key in route.keys}
    own_bus = bus is None
    if bus is None:
        bus = await open_bus(connection, settings)
    channel = await connection.channel()
    try:
        await channel.set_qos(prefetch_count=prefetch or settings.prefetch_count)
        queue_name = queue_name or stage_queue(service)
        delays = settings.retry_delays
        await declare_delay_queues(channel, queue_name, delays)
        if ended is not None:
            await watch_ended_jobs(connection, service, ended)

        # By the message itself, not its delivery tag: tags start again at 1 on a channel opened
        # again, and a message still running from before would take a new one's place.
        in_hand: dict[int, InHand] = {}

        async def on_message(message: AbstractIncomingMessage) -> None:
            # Counted and timed here, once for every service (common/metrics.py).
            started = time.perf_counter()
            work, work_token = metrics.begin_message(service)
            outcome: str | None = None
            delivery = InHand(message)
            in_hand[id(message)] = delivery
            job_token = None
            try:
                # Every line about this message names its job, the error paths' included.
                job_token = current_job.set(_job_id_of(message.body))
                outcome = await settle(delivery, work)
            except (Exception, asyncio.CancelledError) as exc:
                if not isinstance(exc, Exception) and not cancelled_from_inside(exc):
                    raise  # this task is being cancelled (its channel closed): the broker takes the message back
                # The error path itself failed (publishing job.failed or the parked copy while the
                # broker went away): the message goes back to the queue, never left unacked.
                log.exception("could not settle a %s message; returning it to the queue", queue_name)
                if not message.processed and _delivery_open(message):
                    # A reject, not a nack: from RabbitMQ 4.3 a nack's requeue counts toward no
                    # delivery limit, and a message whose error path always fails would loop for ever.
                    await message.reject(requeue=True)
                outcome = "requeued"
            finally:
                if job_token is not None:
                    current_job.reset(job_token)
                in_hand.pop(id(message), None)
                delivery.settled.set()
                metrics.end_message(work, work_token, queue_name, outcome, started)

        async def settle(delivery: InHand, work: metrics.Work) -> str:
            """Handle one message; returns what became of it (metrics.OUTCOMES)."""
            message = delivery.message
            headers = dict(message.headers or {})
            routing_key = _routing_key_of(message, headers)
            route = by_key.get(routing_key) or by_key.get("*")
            if route is None:
                log.error("no handler for routing key %r on %s; dead-lettering", routing_key, queue_name)
                await message.reject(requeue=False)
                return "dead_lettered"
            try:
                parsed = route.model.model_validate_json(message.body)
            except ValidationError as exc:
                job_id = _job_id_of(message.body)
                log.error("invalid %s message: %s", routing_key, exc.errors()[:3])
                if job_id is not None and service in JOB_STAGES:
                    reason = f"invalid {routing_key} message: {_first_error(exc)}"
                    await bus.publish(JobFailed(job_id=job_id, stage=service, reason=reason))
                await _park(bus, message, headers, routing_key, "invalid message")
                await message.ack()
                return "dead_lettered"

            if ended is not None and getattr(parsed, "job_id", None) in ended:
                log.info("the job has ended (done, failed or cancelled); %s skipped", routing_key)
                await message.ack()
                return "skipped"
            try:
                await _handling(delivery, _run_waiting_out_outages(
                    route.handler, parsed, bus, (*BROKER_UNAVAILABLE, *wait_on), work, settings.outage_hold_s,
                    lambda: _delivery_open(message), ended=ended))
            except HandedBackMeanwhile:
                log.info("a %s message finished while it was handed back; its copy will find the work done",
                         routing_key)
                return "handed_back"
            except HeldThroughOutage as exc:
                if not _delivery_open(message):
                    log.warning("%s: the broker took the message back with its channel (%s); it is delivered again",
                                routing_key, exc.__cause__)
                    return "requeued"
                log.warning("%s: still unavailable after %.0f s (%s); handing the message back to %s",
                            routing_key, settings.outage_hold_s, exc.__cause__, queue_name)
                if await _hand_back(bus, message, queue_name):
                    return "handed_back"
                if _delivery_open(message):
                    await message.reject(requeue=True)  # counts toward the delivery limit (on_message)
                return "requeued"
            except PermanentError as exc:
                log.warning("%s failed permanently: %s", routing_key, exc)
                await _fail_job(bus, parsed, service, str(exc), permanent=True)
                await message.ack()
                return "failed"
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                attempt = int(headers.get(RETRY_COUNT_HEADER, 0))
                reason = f"{type(exc).__name__}: {exc}"
                try:
                    if attempt < len(delays):
                        delay = delays[attempt]
                        log.warning("%s failed (%s); retry %d/%d in %d s",
                                    routing_key, reason, attempt + 1, len(delays), delay)
                        await _send_copy(bus, message, retry_queue(queue_name, delay),
                                         {**headers, ROUTING_KEY_HEADER: routing_key,
                                          RETRY_COUNT_HEADER: attempt + 1, "x-last-error": reason[:500]})
                        await message.ack()
                        return "retried"
                    else:
                        log.exception("%s failed after %d attempts; %s", routing_key, attempt + 1,
                                      "failing the job" if service in JOB_STAGES else "parked in stt.dead-letters")
                        await _fail_job(bus, parsed, service,
                                        f"{service} failed after {attempt + 1} attempts: "
                                        f"{failure_category(exc)}, retries exhausted", permanent=False)
                        await _park(bus, message, headers, routing_key, reason)
                        await message.ack()
                        return "dead_lettered"
                except Exception:
                    log.exception("could not schedule a retry; the broker will redeliver")
                    if _delivery_open(message):
                        await message.reject(requeue=True)  # counts toward the delivery limit (on_message)
                    return "requeued"
            else:
                await message.ack()
                return "handled"

        async def subscribe() -> tuple[AbstractQueue, str, Any]:
            # Not robust: after a reconnect aio-pika would declare the queue again (passively)
            # and fail the whole reconnection for good were it deleted; the watch below
            # consumes again instead. Returns the queue, the consumer tag and the channel under.
            queue = await channel.declare_queue(queue_name, passive=True, robust=False)
            consumer_tag = await queue.consume(on_message, robust=False)
            return queue, consumer_tag, await channel.get_underlay_channel()

        async def consume_again() -> tuple[AbstractQueue, str, Any]:
            # On the consuming connection: an alarm may block the bus's.
            await declare_topology(connection, settings, channel)
            return await subscribe()

        queue, consumer_tag, consuming_on = await subscribe()
        metrics.consuming(service, queue_name)
        drained = runner.draining()
        log.info("consuming %s (prefetch %d)", queue_name, prefetch or settings.prefetch_count)
        try:
            stop = runner.stopping()
            while not stop.is_set():
                _checked_in(queue_name)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), CONSUMER_CHECK_S)
                    break
                # aiormq drops a consumer the broker cancels without a word, and aio-pika never
                # consumes again: the worker would look healthy and take nothing.
                lost = await _checking_in_meanwhile(queue_name, _consumer_lost(channel, consuming_on, consumer_tag))
                if lost is None:
                    continue
                log.warning("%s on %s; declaring the queues again and consuming again", lost, queue_name)
                try:
                    queue, consumer_tag, consuming_on = await _checking_in_meanwhile(queue_name, consume_again())
                except Exception as exc:
                    if isinstance(exc, BROKER_UNAVAILABLE) and not isinstance(
                            exc, (aio_pika.exceptions.ChannelNotFoundEntity,
                                  aio_pika.exceptions.ChannelPreconditionFailed)):
                        # The broker went away meanwhile: tried again at the next check, once it is back.
                        log.warning("could not consume %s again yet (%s: %s)", queue_name, type(exc).__name__, exc)
                        continue
                    raise RuntimeError(f"could not consume {queue_name} again after {lost}; exiting"
                                       " so that the process is started again") from exc
                log.warning("consuming %s again", queue_name)
            metrics.consumer_checks_ended(queue_name)  # stopping is not being stuck
            await queue.cancel(consumer_tag)
            deadline = time.monotonic() + settings.shutdown_grace_s
            while in_hand and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            for delivery in list(in_hand.values()):
                if delivery.handler_running:
                    delivery.handed_back = True  # before any await: its handler's outcome is not settled now
                    if not await _hand_back(bus, delivery.message, queue_name):
                        # Not handed back (the copy failed): a handler still running settles it after all.
                        delivery.handed_back = False
                else:
                    # Its own task is acking, rejecting or copying it; a copy blocked by the broker
                    # (an alarm) is not waited for longer: the broker takes it back with the channel.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(delivery.settled.wait(), settings.shutdown_grace_s)
        finally:
            metrics.consumer_checks_ended(queue_name)
            if not drained.done():
                drained.set_result(None)
    finally:
        # Cancelled (a server's background task started again) or failed while setting up: its
        # consumer and channels go with it, or a second copy would consume beside the first.
        for opened in (channel, bus.channel) if own_bus else (channel,):
            with contextlib.suppress(Exception):
                await opened.close()


def _checked_in(queue_name: str) -> None:
    """The consumer's watchdog checked: the worker's /healthz (common.metrics) fails once it is
    HEALTHY_WITHIN_CHECKS checks late."""
    metrics.consumer_checked(queue_name, HEALTHY_WITHIN_CHECKS * CONSUMER_CHECK_S)


async def _checking_in_meanwhile(queue_name: str, work: Awaitable[Any]) -> Any:
    """Await `work`, checking in meanwhile: what the watchdog awaits may wait for the broker to
    come back (a robust channel waits for its reconnection), and a broker away is no reason for
    the liveness probe to restart the worker."""
    waiting = asyncio.ensure_future(work)
    try:
        while not waiting.done():
            _checked_in(queue_name)
            await asyncio.wait({waiting}, timeout=CONSUMER_CHECK_S)
        return waiting.result()
    finally:
        waiting.cancel()


def _routing_key_of(message: AbstractIncomingMessage, headers: dict[str, Any]) -> str:
    """The routing key to handle a message by: the one it was first published with. A copy this
    module sent straight to a queue (a retry, a parked or handed-back message) carries it in
    ROUTING_KEY_HEADER. One the broker dead-lettered (its worker crashed on it every time) has it
    in its latest x-death entry: moved back to its queue by a shovel or the management UI's "Move
    messages", its own routing key is that queue's name."""
    if headers.get(ROUTING_KEY_HEADER):
        return str(headers[ROUTING_KEY_HEADER])
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        routing_keys = deaths[0].get("routing-keys")
        if isinstance(routing_keys, list) and routing_keys:
            return str(routing_keys[0])
    return str(message.routing_key)


@dataclass
class InHand:
    """A delivery a consumer holds, settled (acked, rejected, copied) by one of two, never both: its
    own task, or, while its handler runs, a stopping consumer's hand-back. Both acked it when its
    handler finished as it was handed back (aio-pika marks a message acked only once its ack is
    written): the broker closes a channel that acks a delivery tag twice, and every other delivery
    in hand on it went back to its queue as a failed delivery, after its copy had been sent."""

    message: AbstractIncomingMessage
    handler_running: bool = False
    handed_back: bool = False
    settled: asyncio.Event = field(default_factory=asyncio.Event)


class HandedBackMeanwhile(Exception):
    """The message was handed back while its handler ran: the hand-back settled it."""


async def _handling(delivery: InHand, handler_run: Awaitable[None]) -> None:
    """Await `handler_run`, the only time a stopping consumer may hand the delivery back;
    HandedBackMeanwhile once it has, instead of what the handler ended with."""
    delivery.handler_running = True
    try:
        await handler_run
    except (Exception, asyncio.CancelledError) as exc:
        if delivery.handed_back and (isinstance(exc, Exception) or cancelled_from_inside(exc)):
            raise HandedBackMeanwhile from exc
        raise
    finally:
        delivery.handler_running = False
    if delivery.handed_back:
        raise HandedBackMeanwhile


async def _hand_back(bus: Bus, message: AbstractIncomingMessage, queue_name: str) -> bool:
    """Return an unfinished message to its queue as a new copy, then ack the original: unlike a
    reject or a closed channel, this spends none of the broker's delivery limit (a replica that
    stops, or a database that is away, is not a crash) and no retry. Only its settler may call
    this (InHand). False: it was not (taken back by the broker, which redelivers it; or the copy
    failed)."""
    token = current_job.set(_job_id_of(message.body))
    headers = dict(message.headers or {})
    routing_key = _routing_key_of(message, headers)
    if message.processed or not _delivery_open(message):
        # Settled already, or taken back by the broker with its channel: a copy would make it twice.
        current_job.reset(token)
        return False
    try:
        await _send_copy(bus, message, queue_name, {**headers, ROUTING_KEY_HEADER: routing_key})
        await message.ack()
        log.info("an unfinished %s message handed back to %s", routing_key, queue_name)
        return True
    except (Exception, asyncio.CancelledError) as exc:
        if not isinstance(exc, Exception) and not cancelled_from_inside(exc):
            raise
        log.exception("could not hand back a %s message; the broker will redeliver it", routing_key)
        return False
    finally:
        current_job.reset(token)


async def _consumer_lost(channel: AbstractRobustChannel, consuming_on: Any, consumer_tag: str) -> str | None:
    """Why the broker no longer delivers to this consumer, or None while it does (or while the
    connection is down: checked again once it is back). `consuming_on`: the channel under
    `channel` that the consumer was started on."""
    if channel.is_closed:
        return None
    underlay = await channel.get_underlay_channel()
    if underlay is not consuming_on:
        return "the consumer's channel was closed and opened again"
    if consumer_tag not in underlay.consumers:
        return ("the broker cancelled the consumer (its queue was deleted, or a delivery was held past"
                " consumer_timeout)")
    return None


def _delivery_open(message: AbstractIncomingMessage) -> bool:
    """False once the delivery's channel is closed: the broker has taken the message back and
    gives it to a consumer again."""
    try:
        message.channel  # noqa: B018 (raises once the delivery's channel is closed)
    except aio_pika.exceptions.ChannelInvalidStateError:
        return False
    return True


class HeldThroughOutage(Exception):
    """A dependency stayed unavailable for OUTAGE_HOLD_S while a message was held (its cause)."""


# An attempt that ran this long before a dependency failed it met a new outage, not the old one
# (the longest wait between attempts is 30 s; a connection attempt times out within a minute).
# Not one that a timeout ended within TIMED_OUT_ATTEMPT_S: that attempt spent its time waiting
# for the dependency's answer (a statement waits DATABASE_COMMAND_TIMEOUT_S, 300 s by default, on a
# row another transaction holds, up to about twice that on a connection the network dropped), and
# an outage of such attempts never ended. One that worked longer than that before its timeout (a
# long chunk embedded, then a fresh connect timeout) met a new outage as any other.
OUTAGE_OVER_AFTER_S = 300.0
TIMED_OUT_ATTEMPT_S = 3 * OUTAGE_OVER_AFTER_S


def _ended_by_timeout(exc: BaseException) -> bool:
    """A TimeoutError, or an error raised from one (a client library's own timeout type)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, TimeoutError):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


async def _run_waiting_out_outages(handler: Handler, parsed: BaseModel, bus: Bus,
                                   wait_on: tuple[type[BaseException], ...], work: metrics.Work,
                                   hold_s: float, still_held: Callable[[], bool] = lambda: True, *,
                                   ended: EndedJobs | None = None) -> None:
    """Run the handler, trying again while a dependency is down; HeldThroughOutage once it has
    been down for `hold_s`: counted from the outage's first error, not from the handler's start
    (a long diarization that meets one error at its end is not an outage of that length), and
    counted again after an attempt that ran for OUTAGE_OVER_AFTER_S before failing (the
    dependency was back meanwhile: this is another outage), unless a timeout failed it within
    TIMED_OUT_ATTEMPT_S (it was waiting on the same outage all along). HeldThroughOutage at once when the
    message is no longer `still_held` (a broker failure closed its channel): the broker gives it
    to a consumer again, so running the handler again here would do the work twice at once.
    A message the handler yields whose publish meets the outage is published again, under the
    same hold, while the handler waits at its yield: only an outage the handler itself raised
    runs it again. A message for a job in `ended` when it would be published is not published."""
    outage_since: float | None = None
    attempt_started = time.monotonic()

    def outage(exc: BaseException) -> bool:
        # A message returned as unroutable is a configuration error, not an outage.
        return (isinstance(exc, wait_on) and not isinstance(exc, aio_pika.exceptions.PublishError)
                or cancelled_from_inside(exc))

    def wait_more(exc: BaseException) -> bool:
        nonlocal outage_since
        if not outage(exc) or not still_held():
            return False
        now = time.monotonic()
        ran_s = now - attempt_started
        if outage_since is None or (ran_s > OUTAGE_OVER_AFTER_S
                                    and not (ran_s <= TIMED_OUT_ATTEMPT_S and _ended_by_timeout(exc))):
            outage_since = now
        if now - outage_since < hold_s:
            metrics.DEPENDENCY_WAITS.labels(work.stage).inc()
            return True
        return False

    async def publish_holding(produced: Contract) -> None:
        # Only this publish is tried again while the broker is away, the handler suspended at its
        # yield: run again, it would redo its work (a diarization: minutes) and publish again what
        # it had published. The same hold applies: past it, or once the delivery was taken back,
        # the handler is given up (HeldThroughOutage), not run again.
        nonlocal attempt_started
        first = True
        held = False
        publishing_since = time.perf_counter()
        try:
            async for attempt in backoff("RabbitMQ unavailable; holding a produced message", wait_more,
                                         max_delay_s=30.0):
                with attempt:
                    job_id = getattr(produced, "job_id", None)
                    if ended is not None and job_id in ended:
                        # The job ended while the handler worked (a chunk transcribed as it was
                        # cancelled) or while this publish was held: nobody wants it, and the persister
                        # would announce the end again for it.
                        log.info("job %s has ended (done, failed or cancelled); the %s it produced is not published",
                                 job_id, produced.ROUTING_KEY)
                        work.nothing_to_do = True
                        return
                    if not first:
                        # A try after a wait: how long the first ran since the handler started
                        # (or since the last wait) tells a new outage from the one before.
                        attempt_started = time.monotonic()
                        held = True
                    first = False
                    await bus.publish(produced)
        except (Exception, asyncio.CancelledError) as exc:
            if outage(exc):
                raise HeldThroughOutage from exc
            raise
        finally:
            if held:  # waiting for the broker is not the handler's work (its real-time factor)
                work.held_s += time.perf_counter() - publishing_since

    try:
        async for attempt in backoff("dependency unavailable; holding the message", wait_more, max_delay_s=30.0):
            with attempt:
                attempt_started = time.monotonic()
                work.new_attempt()
                result = handler(parsed)
                if inspect.isasyncgen(result):
                    async with contextlib.aclosing(result) as produced_messages:
                        async for produced in produced_messages:
                            await publish_holding(produced)
                else:
                    await result
    except (Exception, asyncio.CancelledError) as exc:
        if outage(exc):
            raise HeldThroughOutage from exc
        raise


async def _fail_job(bus: Bus, parsed: BaseModel, stage: str, reason: str, *, permanent: bool) -> None:
    job_id = getattr(parsed, "job_id", None)
    if job_id is not None and stage in JOB_STAGES and not isinstance(parsed, JobFailed):
        await bus.publish(JobFailed(job_id=job_id, stage=stage, reason=reason, permanent=permanent))


async def _park(bus: Bus, message: AbstractIncomingMessage, headers: dict[str, Any],
                routing_key: str, reason: str) -> None:
    """Keep a copy for operators in stt.dead-letters (inspect, fix, shovel back). Its retry count
    is kept as RETRIES_SPENT_HEADER: one sent back gets its retries again."""
    kept = {key: value for key, value in headers.items() if key != RETRY_COUNT_HEADER}
    if RETRY_COUNT_HEADER in headers:
        kept[RETRIES_SPENT_HEADER] = headers[RETRY_COUNT_HEADER]
    await _send_copy(bus, message, DEAD_LETTERS_QUEUE,
                     {**kept, ROUTING_KEY_HEADER: routing_key, "x-last-error": reason[:500]})


async def _send_copy(bus: Bus, message: AbstractIncomingMessage, queue_name: str,
                     headers: dict[str, Any]) -> None:
    """A persistent copy of a delivery, with these headers, straight into a queue (confirmed)."""
    await bus.channel.default_exchange.publish(
        aio_pika.Message(body=message.body, content_type=message.content_type,
                         delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=message.message_id,
                         type=message.type, headers=headers),
        routing_key=queue_name, mandatory=True)


def _job_id_of(body: bytes) -> int | None:
    try:
        job_id = json.loads(body).get("job_id")
    except Exception:  # not JSON, not an object, nested past the recursion limit...
        return None
    return job_id if isinstance(job_id, int) else None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ()))
    return f"{where}: {err.get('msg')}" if where else str(err.get("msg"))
