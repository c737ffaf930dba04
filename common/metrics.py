"""Prometheus metrics, defined once for every service (README: Metrics).

Stage workers serve them on METRICS_PORT (`serve_metrics`); ingest serves them on its API port
at /metrics. The consume loop in common/broker.py counts and times every message; a handler
only reports how much audio its message covered (`add_audio_seconds`), from which the loop
derives audio seconds processed and the real-time factor.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from common.settings import Settings

log = logging.getLogger(__name__)

# Seconds per message range from milliseconds (persister) to hours (the diarizer on a recording of
# MAX_AUDIO_HOURS, 6 by default, on few cores).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
                    600, 1200, 1800, 3600, 7200, 14400, 21600)
_RTF_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10)
_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# What became of a message: handled (acked after its work), failed (bad input: the job failed
# at once), retried (sent to a retry queue), dead_lettered (retries used up, invalid or
# unroutable: parked in stt.dead-letters), requeued (a retry could not be scheduled: the broker
# redelivers it), skipped (its job had already failed or been cancelled).
OUTCOMES = ("handled", "failed", "retried", "dead_lettered", "requeued", "handed_back", "skipped")

MESSAGES = Counter(
    "stt_messages", "Messages a stage consumed, by what became of them",
    ["stage", "queue", "outcome"],
)
MESSAGE_SECONDS = Histogram(
    "stt_message_duration_seconds",
    "Seconds from receiving a message to settling it (ack, retry or dead-letter)",
    ["stage", "queue"], buckets=_LATENCY_BUCKETS,
)
DEPENDENCY_WAITS = Counter(
    "stt_dependency_unavailable",
    "Handler tries that found a dependency (RabbitMQ, PostgreSQL) down; the message was held",
    ["stage"],
)
AUDIO_SECONDS = Counter(
    "stt_audio_seconds", "Seconds of audio in the messages a stage handled", ["stage"],
)
REAL_TIME_FACTOR = Histogram(
    "stt_real_time_factor",
    "Processing seconds per second of audio, per handled message (below 1: faster than real time)",
    ["stage"], buckets=_RTF_BUCKETS,
)
QUEUE_MESSAGES = Gauge(
    "stt_queue_messages", "Messages ready in a RabbitMQ queue (as seen by ingest)", ["queue"],
)
QUEUE_CONSUMERS = Gauge(
    "stt_queue_consumers", "Consumers attached to a RabbitMQ queue (as seen by ingest)", ["queue"],
)
WEBHOOK_ATTEMPTS = Counter(
    "stt_webhook_attempts",
    "Webhook delivery attempts (the notifier), by outcome: delivered, retried (it will be tried again),"
    " given_up (the last attempt failed)",
    ["outcome"],
)
WEBHOOK_OUTCOMES = ("delivered", "retried", "given_up")
HTTP_REQUESTS = Counter(
    "stt_http_requests", "HTTP requests answered by ingest", ["method", "route", "status"],
)
HTTP_SECONDS = Histogram(
    "stt_http_request_duration_seconds", "Seconds to answer an HTTP request (ingest)",
    ["method", "route"], buckets=_HTTP_BUCKETS,
)


# ---- stage workers --------------------------------------------------------------------------


def serve_metrics(settings: Settings, service: str) -> None:
    """Serve /metrics on METRICS_PORT (0: off, /healthz too) from a background thread, and the worker's probes:
    /healthz answers 503 while a consumer's watchdog is overdue (consumer_checked: the event loop
    is blocked, or the watchdog stuck), 200 otherwise, before consuming starts included. A port already
    in use is logged, not fatal: the worker's job is its stage, not its figures."""
    if not settings.metrics_port:
        # The images' HEALTHCHECK and the Kubernetes probes ask /healthz on this port: said here,
        # a worker restarted by them over and over is explained in its own log.
        log.warning("METRICS_PORT=0: neither /metrics nor /healthz served; a health check asking "
                    "/healthz fails")
        return
    try:
        server = make_server("0.0.0.0", settings.metrics_port, _with_probes(make_wsgi_app()),
                             ThreadingWSGIServer, handler_class=_QuietHandler)
    except OSError as exc:
        log.error("metrics not served: port %d is unavailable (%s); give each process on this "
                  "host its own METRICS_PORT", settings.metrics_port, exc)
        return
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("%s metrics on :%d/metrics", service, settings.metrics_port)


# When each consumer's watchdog (common.broker.consume) is due to check again, by queue.
_checks_due: dict[str, float] = {}


def consumer_checked(queue: str, next_within_s: float) -> None:
    _checks_due[queue] = time.monotonic() + next_within_s


def consumer_checks_ended(queue: str) -> None:
    """The consumer of `queue` stopped checking (the process is stopping): none is due."""
    _checks_due.pop(queue, None)


def overdue_checks() -> list[str]:
    """The queues whose consumer's watchdog is overdue (read from the metrics server's thread)."""
    now = time.monotonic()
    return [queue for queue, due in list(_checks_due.items()) if now > due]


def _with_probes(metrics_app):
    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            overdue = overdue_checks()
            return _answer(start_response, not overdue, f"the watchdog of {', '.join(overdue)} is overdue"
                           " (the event loop is blocked, or the watchdog stuck)" if overdue else "ok")
        return metrics_app(environ, start_response)  # any other path: the metrics, as before
    return app


def _answer(start_response, ok: bool, text: str) -> list[bytes]:
    start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain; charset=utf-8")])
    return [text.encode() + b"\n"]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        """Probes every few seconds would fill the log."""


@dataclass
class Work:
    """What the consume loop learns about one message while its handler runs."""

    stage: str
    audio_s: float = 0.0
    attempt_started: float = field(default_factory=time.perf_counter)
    # Seconds of this attempt spent holding a produced message while the broker was away.
    held_s: float = 0.0
    nothing_to_do: bool = False

    def new_attempt(self) -> None:
        self.audio_s = 0.0
        self.nothing_to_do = False
        self.attempt_started = time.perf_counter()
        self.held_s = 0.0


_current_work: contextvars.ContextVar[Work | None] = contextvars.ContextVar("stt_work", default=None)


def consuming(stage: str, queue: str) -> None:
    """A consumer started: its series exist from now on, at 0, before the first message."""
    for outcome in OUTCOMES:
        MESSAGES.labels(stage, queue, outcome)
    MESSAGE_SECONDS.labels(stage, queue)
    DEPENDENCY_WAITS.labels(stage)


def begin_message(stage: str) -> tuple[Work, contextvars.Token]:
    work = Work(stage)
    return work, _current_work.set(work)


def end_message(work: Work, token: contextvars.Token, queue: str, outcome: str | None,
                started: float) -> None:
    """Count the message; for a handled one that covered audio, its audio seconds and RTF."""
    _current_work.reset(token)
    if outcome is None:  # cancelled, or the ack itself failed: the broker redelivers
        return
    if outcome == "handled" and work.nothing_to_do:
        outcome, work.audio_s = "skipped", 0.0
    MESSAGES.labels(work.stage, queue, outcome).inc()
    MESSAGE_SECONDS.labels(work.stage, queue).observe(time.perf_counter() - started)
    if outcome == "handled" and work.audio_s > 0:
        AUDIO_SECONDS.labels(work.stage).inc(work.audio_s)
        # The last attempt only, less its publishes held: time spent holding through an outage is not work.
        worked_s = time.perf_counter() - work.attempt_started - work.held_s
        REAL_TIME_FACTOR.labels(work.stage).observe(worked_s / work.audio_s)


def nothing_to_do() -> None:
    """Called by a handler that returns without doing its work (its job ended meanwhile): the
    message counts as skipped, with no audio seconds and no real-time factor."""
    work = _current_work.get()
    if work is not None:
        work.nothing_to_do = True


def delivering_webhooks() -> None:
    """The notifier started: its webhook series exist from now on, at 0."""
    for outcome in WEBHOOK_OUTCOMES:
        WEBHOOK_ATTEMPTS.labels(outcome)


def webhook_attempted(outcome: str) -> None:
    WEBHOOK_ATTEMPTS.labels(outcome).inc()


def add_audio_seconds(seconds: float) -> None:
    """Called by a handler: the message it is handling covers this much audio. Safe from
    worker threads started with asyncio.to_thread (they share the message's Work)."""
    work = _current_work.get()
    if work is not None and seconds > 0:
        work.audio_s += seconds


# ---- ingest ---------------------------------------------------------------------------------


async def watch_queue_depths(connection, queues: Iterable[str], interval_s: float = 5.0) -> None:
    """Refresh the queue gauges every `interval_s` with passive declares (current figures;
    the management API lags). The queues must exist (ingest declares them; the first refresh
    waits one interval so that its consumers have). Runs until cancelled."""
    queues = list(queues)
    channel = None
    failing = False

    async def refresh() -> None:
        nonlocal channel
        if channel is None:
            channel = await connection.channel()
        for name in queues:
            # robust=False: a robust channel answers a repeated passive declare from its cache
            declared = await channel.declare_queue(name, passive=True, robust=False)
            QUEUE_MESSAGES.labels(name).set(declared.declaration_result.message_count)
            QUEUE_CONSUMERS.labels(name).set(declared.declaration_result.consumer_count)

    while True:
        await asyncio.sleep(interval_s)
        try:
            await asyncio.wait_for(refresh(), timeout=max(10.0, 2 * interval_s))
            if failing:
                log.info("queue depths readable again")
                failing = False
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not failing:
                log.warning("queue depths not readable (%s: %s); the queue gauges are left out until they can be read",
                            type(exc).__name__, str(exc)[:200])
                failing = True
            # Last values kept through an outage would say the queues are served (consumers >= 1)
            # while nothing can be known: an alert on absent() fires instead.
            for name in queues:
                for gauge in (QUEUE_MESSAGES, QUEUE_CONSUMERS):
                    with contextlib.suppress(KeyError):
                        gauge.remove(name)
            stale, channel = channel, None  # closed, not dropped: a robust channel would live on
            if stale is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(stale.close(), timeout=5)


# A scope key an inner middleware sets to have the request counted under another status than the
# one answered: an EventSource refused past MAX_EVENT_STREAMS is answered 200 (a 503 would stop it
# for good) and counted as the 503 it is.
COUNTED_AS = "stt.counted_as"


def http_metrics_middleware(app):
    """ASGI middleware (Litestar, per route): counts and times each request under its route
    template (`/status/{job_id}`, not `/status/42`), so label values stay few."""

    async def measure(scope, receive, send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless a response starts: an exception escaped
        answered_s = None

        async def send_and_note(message) -> None:
            nonlocal status, answered_s
            if message["type"] == "http.response.start":
                status = message["status"]
                # Seconds to answer: to the start of the answer, not the end of its body (an event
                # stream stays open for the whole job, a recording takes its download's time).
                answered_s = time.perf_counter() - started
            await send(message)

        try:
            await app(scope, receive, send_and_note)
        finally:
            route = scope.get("path_template") or "unmatched"
            HTTP_REQUESTS.labels(scope["method"], route, str(scope.get(COUNTED_AS, status))).inc()
            HTTP_SECONDS.labels(scope["method"], route).observe(
                answered_s if answered_s is not None else time.perf_counter() - started)

    return measure
