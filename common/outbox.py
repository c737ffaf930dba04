"""The transactional outbox: a message is written to the `outbox` table in the same transaction
as the state it belongs to, and published after commit by whichever service's flusher holds the
lock (docs/design.md, "Guarantees"). Ingest submits jobs this way (`job.submitted` goes out with
its `transcripts` row or not at all) and the persister announces events this way.

Work messages go to the `stt` exchange (a message no queue would take raises and stays in the
outbox); events go to `stt.events`. Rows are published in id order, so a job's messages keep
their order. A row that can never be published is moved to `outbox_dead` with the reason, and the
rows after it still flow. An event that a queue has refused for EVENT_REFUSED_FOR_S (a
subscriber's full queue set to reject-publish) is not sent again: the queues that took it have
it, and the rest must not wait."""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg
from aio_pika.exceptions import DeliveryError
from pydantic import ValidationError

from common.broker import Bus
from common.db import LockKey
from common.logs import job_logged
from common.messages import EVENTS, WORK_MESSAGES, Contract

log = logging.getLogger(__name__)

BATCH = 500
DELETE_EVERY = 20
# An event a queue refuses (the broker's nack) is sent again for this long: our own queues on
# stt.events (the notifier's, ingest's results) refuse only in a broker failure, which passes.
# Refused longer, it is a subscriber's full queue that refuses new messages: such events are then
# dropped at once, by routing key, until one of that key goes through again.
EVENT_REFUSED_FOR_S = 30.0
_events_refused_since: dict[str, float] = {}


def refused_too_long(routing_key: str, exc: BaseException) -> bool:
    """Whether an event whose publication failed with `exc` is dropped: a queue has refused events
    of its kind for EVENT_REFUSED_FOR_S while the broker was there. Any other failure (the broker
    gone, a channel closed) starts the count again: a broker failure often begins with refusals
    and goes on as a lost connection, and the first refusal after it must not be taken for a
    subscriber's full queue."""
    if not isinstance(exc, DeliveryError):
        _events_refused_since.clear()
        return False
    if routing_key in WORK_MESSAGES:
        return False  # a stage's message is never dropped
    since = _events_refused_since.setdefault(routing_key, time.monotonic())
    return time.monotonic() - since >= EVENT_REFUSED_FOR_S


async def add_to_outbox(conn: asyncpg.Connection, message: Contract) -> None:
    """Queue `message` for publication when the caller's transaction commits."""
    await conn.execute(
        "INSERT INTO outbox (routing_key, body) VALUES ($1, $2)",
        message.ROUTING_KEY, message.model_dump(mode="json"),
    )


async def flush_outbox(pool: asyncpg.Pool, bus: Bus) -> int:
    """Publish committed rows in order, then delete them. One flusher at a time across every
    service and replica (advisory lock), so subscribers see a job's messages in order."""
    published = 0
    async with pool.acquire() as conn:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", LockKey.OUTBOX):
            return 0
        try:
            while True:
                rows = await conn.fetch(f"SELECT id, routing_key, body FROM outbox ORDER BY id LIMIT {BATCH}")
                if not rows:
                    return published
                done = []
                try:
                    for row in rows:
                        key = row["routing_key"]
                        try:
                            message = (WORK_MESSAGES.get(key) or EVENTS[key]).model_validate(row["body"])
                        except (KeyError, ValidationError) as exc:
                            await _set_aside(conn, row, f"{type(exc).__name__}: {str(exc)[:300]}")
                            continue
                        try:
                            if key in WORK_MESSAGES:
                                await bus.publish(message)
                            else:
                                await bus.publish_event(message)
                                _events_refused_since.pop(key, None)
                        except Exception as exc:
                            with job_logged(getattr(message, "job_id", None)):
                                if refused_too_long(key, exc):
                                    # The broker gave the event to every queue that took it, and a
                                    # queue has refused this kind for EVENT_REFUSED_FOR_S: a
                                    # subscriber's full `sub.*` queue set to reject-publish. Sent
                                    # again it would be refused again, and every job's messages
                                    # would wait behind it.
                                    log.error("event %s (outbox message %d) refused by a queue bound to stt.events"
                                              " (a subscriber's queue that is full and refuses more?) for %g s;"
                                              " not sent again: the queues that took it have it", key, row["id"],
                                              EVENT_REFUSED_FOR_S)
                                else:
                                    # It stays at the head, and those after it wait: say which it is.
                                    log.warning("outbox message %d (%s) not published (%s: %s); it and the"
                                                " ones after it are tried again", row["id"], key,
                                                type(exc).__name__, exc)
                                    raise
                        done.append(row["id"])
                        if len(done) >= DELETE_EVERY:
                            # Not only at the batch's end: a flusher killed mid-batch would send
                            # every row of it again (a job.submitted twice runs the job twice).
                            await conn.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", done)
                            published += len(done)
                            done = []
                finally:
                    # What went out is not sent again (at-least-once holds for the rest).
                    await conn.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", done)
                published += len(done)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", LockKey.OUTBOX)


async def _set_aside(conn: asyncpg.Connection, row: asyncpg.Record, error: str) -> None:
    """Move a row that can never be published out of the way of the ones after it."""
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO outbox_dead (id, routing_key, body, created_at, error)"
            " SELECT id, routing_key, body, created_at, $2 FROM outbox WHERE id = $1"
            " ON CONFLICT (id) DO NOTHING", row["id"], error)
        await conn.execute("DELETE FROM outbox WHERE id = $1", row["id"])
    body = row["body"]
    with job_logged(body.get("job_id") if isinstance(body, dict) else None):
        log.error("outbox message %d (%s) cannot be published and was set aside in outbox_dead: %s",
                  row["id"], row["routing_key"], error)


async def run_outbox_flusher(pool: asyncpg.Pool, bus: Bus, wake: asyncio.Event,
                             interval_s: float = 2.0) -> None:
    """Flush when woken (after a commit that wrote to the outbox) and every `interval_s`, which
    also publishes what another process committed and could not send (it died, or the broker
    was away)."""
    while True:
        try:
            await asyncio.wait_for(wake.wait(), timeout=interval_s)
        except TimeoutError:
            pass
        wake.clear()
        try:
            await flush_outbox(pool, bus)
        except Exception:
            log.exception("publishing from the outbox failed; will try again")
