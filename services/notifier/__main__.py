"""python -m services.notifier: stt.events -> webhook deliveries (signed POSTs, retried)."""

from __future__ import annotations

import asyncio
import functools
import logging

import asyncpg

from common.broker import (
    EVENTS_EXCHANGE,
    Bus,
    Route,
    connect,
    consume,
    declare_delay_queues,
    declare_queue,
    open_bus,
)
from common.db import DATABASE_UNAVAILABLE, LockKey, apply_migrations, create_pool, every
from common.logs import setup_logging
from common.messages import EVENTS, WebhookDue
from common.metrics import delivering_webhooks, serve_metrics
from common.outbound import http_session
from common.runner import RESTART_S, keep_running, run_worker
from common.settings import get_settings
from services.notifier import handler

log = logging.getLogger("services.notifier")

# The notifier's own subscription to every public event. Declared by the notifier (a deployment
# without one keeps no copy of its events); no dead-letter exchange: nothing here is counted
# against a job. An event of a type this version does not know is retried, then parked in
# stt.dead-letters (handler.leave_to_a_newer_notifier); earlier notifiers dropped it.
EVENTS_QUEUE = "stt.notifier.events"
# Events are fanned out one at a time (prefetch 1) by one replica at a time (single active
# consumer: with two, one replica could record a job's later event before another recorded the
# earlier one), so a job's deliveries are recorded, and sent, in the order its events were
# published. Deliveries in flight per replica (each endpoint gets at most WEBHOOK_CONCURRENCY).
DELIVERY_PREFETCH = 32


async def sweep_until_stopped(pool: asyncpg.Pool, bus: Bus, every_s: float = handler.SWEEP_EVERY_S,
                              restart_s: float = RESTART_S) -> None:
    """The sweep for overdue deliveries, started again whenever it stops, as the persister's
    outbox flusher: aiormq fails a publish confirm pending on a connection it gives up on (no
    heartbeat) with CancelledError, which sweep_stuck does not catch, and its end would end main()
    and the process."""
    await keep_running("the overdue delivery sweep", lambda: handler.sweep_stuck(pool, bus, every_s), restart_s)


async def main() -> None:
    settings = get_settings()
    setup_logging(settings.log_level)
    serve_metrics(settings, "notifier")
    delivering_webhooks()
    pool = await create_pool(settings, max_size=DELIVERY_PREFETCH + 4)
    await apply_migrations(pool)
    await handler.set_ownerless_endpoints_aside(pool, settings)
    connection = await connect(settings, "notifier")
    bus = await open_bus(await connect(settings, "notifier.publish"), settings)
    await declare_queue(connection, EVENTS_QUEUE, {"x-queue-type": "quorum", "x-single-active-consumer": True,
                                                   "x-delivery-limit": settings.delivery_limit})
    # Not robust: restored after a reconnect, a queue deleted meanwhile would fail every
    # reconnection (consume declares its queue again; the binding is durable).
    events = await bus.channel.declare_queue(EVENTS_QUEUE, passive=True, robust=False)
    await events.bind(await bus.channel.get_exchange(EVENTS_EXCHANGE), "#", robust=False)
    await declare_delay_queues(bus.channel, handler.DELIVERY_QUEUE,
                               [*settings.webhook_retry_delays, handler.BUSY_ENDPOINT_DELAY_S])
    async with http_session(settings.webhook_allow_private) as http:
        fan_out = functools.partial(handler.fan_out, pool, keys_configured=bool(settings.api_key_list))
        deliver = functools.partial(handler.deliver, pool, http, settings, bus)
        log.info("notifier ready")
        await asyncio.gather(
            consume(connection, settings, "notifier",
                    [*(Route(model, fan_out) for model in EVENTS.values()),
                     Route(handler.EventOfANewerVersion, handler.leave_to_a_newer_notifier, any_routing_key=True)],
                    bus=bus, queue_name=EVENTS_QUEUE, prefetch=1, wait_on=DATABASE_UNAVAILABLE),
            consume(connection, settings, "notifier", [Route(WebhookDue, deliver)],
                    bus=bus, prefetch=DELIVERY_PREFETCH, wait_on=DATABASE_UNAVAILABLE),
            sweep_until_stopped(pool, bus),
            every(handler.PRUNE_EVERY_S, pool, LockKey.WEBHOOK_PRUNE,
                  functools.partial(handler.prune_delivery_log, pool, settings), "pruning the delivery log"),
        )


if __name__ == "__main__":
    run_worker(main)
