"""python -m services.persister: stores chunks and job state, publishes stt.events."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import asyncpg

from common.broker import JOB_ROUTING_KEYS, PERSISTER_DEAD_QUEUE, Bus, Route, connect, consume, open_bus
from common.db import DATABASE_UNAVAILABLE, apply_migrations, create_pool
from common.logs import setup_logging
from common.messages import ChunkEmbedded, ChunkTranscribed, JobFailed, JobProgress
from common.metrics import serve_metrics
from common.outbox import run_outbox_flusher
from common.runner import RESTART_S, keep_running, run_worker
from common.settings import Settings, get_settings
from services.persister import handler

log = logging.getLogger("services.persister")

# Messages of stt.persister handled at once, whatever PREFETCH_COUNT says: each is a short
# transaction, and one job's chunks come in bursts.
HANDLED_AT_ONCE = 16
# Pooled connections beyond the handlers': the stall reaper, the outbox flusher and a search index
# build. Without them, handlers holding every connection (waiting on a locked job row) kept the
# reaper's heartbeat waiting, and the gaps it recorded stopped stall detection for every job.
OTHER_CONNECTIONS = 3


async def flush_outbox_until_stopped(pool: asyncpg.Pool, bus: Bus, wake: asyncio.Event, settings: Settings,
                                     restart_s: float = RESTART_S) -> None:
    """The outbox flusher, started again whenever it stops, as ingest runs its own: aiormq fails a
    publish confirm pending on a connection it gives up on (no heartbeat) with CancelledError,
    which run_outbox_flusher does not catch, and its end would end main() and the process."""
    await keep_running("the outbox flusher", lambda: run_outbox_flusher(pool, bus, wake, settings.event_refused_for_s),
                       restart_s)


# A lock held past handler.LOCK_WAIT_S (an operator's open psql session on a job's row) is waited
# out like an outage: the message is held, tried again, and handed back every OUTAGE_HOLD_S while
# the lock lasts; no retry is spent and the job is not failed, which is not its fault.
WAITED_OUT = (*DATABASE_UNAVAILABLE, asyncpg.exceptions.LockNotAvailableError)


async def main() -> None:
    settings = get_settings()
    setup_logging(settings.log_level)
    serve_metrics(settings, "persister")
    # This process's start is no gap of itself: the other replicas may have stored everything
    # meanwhile. Time no persister was running is one by the shared heartbeat's age
    # (jobstore.stall_reaper_round); time the reaper could not reach the database, by `missed`.
    missed = handler.DatabaseMissed()
    prefetch = max(settings.prefetch_count, HANDLED_AT_ONCE)
    # Every message in hand, of stt.persister and of the dead-letter queue, may hold a connection.
    pool = await create_pool(settings, max_size=prefetch + settings.prefetch_count + OTHER_CONNECTIONS)
    await apply_migrations(pool)
    connection = await connect(settings, "persister")
    # Its outbox publishes on a connection of its own: one that published through a memory alarm
    # would also stop taking the acks of the messages it stores, and the queue filling the memory
    # would never drain (common.broker).
    bus = await open_bus(await connect(settings, "persister.publish"), settings)
    wake = asyncio.Event()

    def then_flush(handle: Callable[..., Awaitable[bool]]):
        """Run the handler (one transaction); when it says it enqueued events (True), wake the
        outbox flusher for them at once rather than at its next poll. A database the handler could
        not reach is not noted for the stall reaper: one replica's error (a dropped connection, too
        many connections) is no outage while the others store, and noted it made a gap each time,
        joined to the one before, that kept every stuck job from ever counting as stalled. A
        database that is really away does not answer any replica's heartbeat either."""
        async def run(message) -> None:
            enqueued = await handle(pool, message)
            if enqueued:
                wake.set()
        return run

    routes = [Route(ChunkTranscribed, then_flush(handler.on_transcribed)),
              Route(ChunkEmbedded, then_flush(handler.on_embedded)),
              Route(JobProgress, then_flush(handler.on_progress)),
              Route(JobFailed, then_flush(handler.on_failed))]
    # Only the job stages' messages: a webhook delivery the notifier crashed on is no job's failure
    # (its copy waits in stt.dead-letters).
    dead_letters = [Route(handler.DeadLetter, then_flush(handler.on_dead_letter), routing_keys=JOB_ROUTING_KEYS)]
    log.info("persister ready")
    await asyncio.gather(
        flush_outbox_until_stopped(pool, bus, wake, settings),
        handler.run_stall_reaper(pool, settings.job_stall_timeout_s, wake, missed),
        consume(connection, settings, "persister", routes, bus=bus, prefetch=prefetch, wait_on=WAITED_OUT),
        consume(connection, settings, "persister", dead_letters, bus=bus, queue_name=PERSISTER_DEAD_QUEUE,
                wait_on=WAITED_OUT),
    )


if __name__ == "__main__":
    run_worker(main)
