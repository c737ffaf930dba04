"""The transactional outbox: a message is written to the `outbox` table in the same transaction
as the state it belongs to, and published after commit by whichever service's flusher holds the
lock (docs/design.md, "Guarantees"). Ingest submits jobs this way (`job.submitted` goes out with
its `transcripts` row or not at all) and the persister announces events this way.

Work messages go to the `stt` exchange (a message no queue would take raises and stays in the
outbox); events go to `stt.events`. Rows are published in id order, so a job's messages keep
their order, each body as it was stored (a newer version's message keeps the fields this version
does not know). A row of a routing key this version does not know is left for a newer version's
flusher (a rolling upgrade), and the rows after it still flow, overtaking it (a job's order then
holds among the kinds this version knows); a row that is no message at all is
moved to `outbox_dead` with the reason. An event that a queue has refused for EVENT_REFUSED_FOR_S (a
subscriber's full queue set to reject-publish) is not sent again: the queues that took it have
it, and the rest must not wait. Nor, from then on, is one of its kind that a queue refuses again
within EVENT_REFUSED_FOR_S of the last refusal (a subscriber slower than the events, whose queue
has room now and then)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import asyncpg
from aio_pika.exceptions import DeliveryError
from pydantic import BaseModel, ConfigDict, ValidationError

from common.broker import Bus
from common.db import LockKey
from common.logs import job_logged
from common.messages import EVENTS, WORK_MESSAGES, Contract

log = logging.getLogger(__name__)

BATCH = 500
DELETE_EVERY = 20
# An event a queue refuses (the broker's nack) is sent again for this long (the setting
# EVENT_REFUSED_FOR_S; this is its default, and what flush_outbox goes by unless told): our own
# queues on stt.events (the notifier's, ingest's results) refuse only in a broker failure, which
# passes. Refused longer, it is a subscriber's full queue that refuses new messages: such events
# are then dropped at once, by routing key, while that queue goes on refusing them (each refusal
# within EVENT_REFUSED_FOR_S of the one before), even when one gets through in between: a
# subscriber slower than the events frees a slot now and then, and had each such one started a
# new wait of EVENT_REFUSED_FOR_S, every message behind the refused one (every job's
# job.submitted) would move at that subscriber's pace, and the other queues get the event again
# at each try.
EVENT_REFUSED_FOR_S = 30.0


@dataclass
class _Refusals:
    """The refusals of one kind of event."""

    since: float  # the spell's first: each refusal since came within the limit of the one before
    last: float  # the latest
    dropping: bool  # one was dropped in this spell


_events_refused_since: dict[str, _Refusals] = {}


def refused_too_long(routing_key: str, exc: BaseException, refused_for_s: float = EVENT_REFUSED_FOR_S) -> bool:
    """Whether an event whose publication failed with `exc` is dropped: a queue has refused events
    of its kind for `refused_for_s` (EVENT_REFUSED_FOR_S) while the broker was there, each refusal
    within `refused_for_s` of the one before, or it is dropping them already, and refused one again
    within `refused_for_s` of the last refusal. A refusal `refused_for_s` or more after the last one
    starts a new spell, dropping or not: another process's flusher may have published that kind
    since (this one's record of refusals is its own), and an old refusal must not make a new one
    look long. Any other failure (the broker gone, a channel closed) starts the count again: a
    broker failure often begins with refusals and goes on as a lost connection, and the first
    refusal after it must not be taken for a subscriber's full queue."""
    if not isinstance(exc, DeliveryError):
        _events_refused_since.clear()
        return False
    if routing_key in WORK_MESSAGES:
        return False  # a stage's message is never dropped
    limit = refused_for_s
    now = time.monotonic()
    refusals = _events_refused_since.get(routing_key)
    if refusals is None or now - refusals.last >= limit:
        # The first refusal, or the first after a quiet spell: the queue caught up, or went, or
        # the broker failure passed (another flusher may have published the kind meanwhile).
        refusals = _events_refused_since[routing_key] = _Refusals(since=now, last=now, dropping=False)
    refusals.last = now
    refusals.dropping = refusals.dropping or now - refusals.since >= limit
    return refusals.dropping


def _event_went_through(routing_key: str) -> None:
    """An event of this kind reached every queue bound for it: the refusals of its kind, if any,
    are over, unless it is being dropped (that lasts while the refusals go on)."""
    refusals = _events_refused_since.get(routing_key)
    if refusals is not None and not refusals.dropping:
        del _events_refused_since[routing_key]


async def add_to_outbox(conn: asyncpg.Connection, message: Contract) -> None:
    """Queue `message` for publication when the caller's transaction commits."""
    await conn.execute(
        "INSERT INTO outbox (routing_key, body) VALUES ($1, $2)",
        message.ROUTING_KEY, message.model_dump(mode="json"),
    )


class _Envelope(BaseModel):
    """What every version's message carries, whatever else its body holds: the id subscribers
    deduplicate on."""

    model_config = ConfigDict(extra="allow")

    message_id: str


# Rows of routing keys this version does not know, left for a newer version's flusher (a rolling
# upgrade): the ids last warned about, and when.
_unknown_warned: tuple[frozenset[int], float] = (frozenset(), 0.0)
UNKNOWN_WARN_EVERY_S = 600.0
# The row whose publication failed last (it holds the ones after it): warned about once.
_held_row: int | None = None


async def flush_outbox(pool: asyncpg.Pool, bus: Bus, refused_for_s: float = EVENT_REFUSED_FOR_S) -> int:
    """Publish committed rows in order, then delete them. One flusher at a time across every
    service and replica (advisory lock), so subscribers see a job's messages in order. An event a
    queue refuses is dropped as refused_too_long says, after `refused_for_s` (EVENT_REFUSED_FOR_S).

    Each row's body goes out as it was stored, not as this version's model reads it: a row
    written by a newer version keeps the fields this one does not know. A row whose routing key
    this version does not know stays in the outbox for a newer version's flusher (the rows after
    it still go); only a body that is no message at all (not a JSON object with a message_id)
    is set aside in outbox_dead."""
    global _held_row
    published = 0
    unknown: dict[int, str] = {}
    async with pool.acquire() as conn:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", LockKey.OUTBOX):
            return 0
        try:
            while True:
                # Each batch from the head again, not from after the last one: ids are taken before
                # commit, so a row committed late has a lower id than rows already sent, and a
                # cursor would pass it by (sending a job's later rows first, and holding it back
                # until a read came back empty). Every row read is deleted or left out by id.
                rows = await conn.fetch(
                    "SELECT id, routing_key, body FROM outbox WHERE id <> ALL($1::bigint[])"
                    f" ORDER BY id LIMIT {BATCH}", list(unknown))
                if not rows:
                    _report_unknown(unknown)
                    return published
                done = []
                try:
                    for row in rows:
                        key, body = row["routing_key"], row["body"]
                        try:
                            if not isinstance(body, dict):
                                raise ValueError(f"the body is a JSON {type(body).__name__}, not an object")
                            _Envelope.model_validate(body)
                        except (ValueError, ValidationError) as exc:
                            await _set_aside(conn, row, f"{type(exc).__name__}: {str(exc)[:300]}")
                            continue
                        if key not in WORK_MESSAGES and key not in EVENTS:
                            unknown[row["id"]] = key
                            continue
                        try:
                            await bus.publish_stored(key, body)
                            if key in EVENTS:
                                _event_went_through(key)
                        except Exception as exc:
                            job_id = body.get("job_id")
                            with job_logged(job_id if isinstance(job_id, int) else None):
                                if refused_too_long(key, exc, refused_for_s):
                                    # The broker gave the event to every queue that took it, and a
                                    # queue has refused this kind for EVENT_REFUSED_FOR_S (and goes
                                    # on refusing it): a subscriber's full `sub.*` queue set to
                                    # reject-publish. Sent again it would be refused again, and
                                    # every job's messages would wait behind it.
                                    log.error("event %s (outbox message %d) refused by a queue bound to stt.events"
                                              " (a subscriber's queue that is full and refuses more?), as events"
                                              " of its kind have been for %g s (EVENT_REFUSED_FOR_S) or more; not"
                                              " sent again: the queues that took it have it", key, row["id"],
                                              refused_for_s)
                                else:
                                    # It stays at the head, and those after it wait: say which it
                                    # is, once (the flusher tries again every few seconds).
                                    log.log(logging.WARNING if _held_row != row["id"] else logging.DEBUG,
                                            "outbox message %d (%s) not published (%s: %s); it and the"
                                            " ones after it are tried again", row["id"], key,
                                            type(exc).__name__, exc)
                                    _held_row = row["id"]
                                    raise
                        _held_row = None
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


def _report_unknown(unknown: dict[int, str]) -> None:
    """One line per flush pass about the rows left for a newer version: a warning when they
    change, and every UNKNOWN_WARN_EVERY_S while they stay; otherwise at debug level."""
    global _unknown_warned
    ids = frozenset(unknown)
    warned_ids, warned_at = _unknown_warned
    if not ids:
        _unknown_warned = (frozenset(), 0.0)
        return
    now = time.monotonic()
    warn = ids != warned_ids or now - warned_at >= UNKNOWN_WARN_EVERY_S
    log.log(logging.WARNING if warn else logging.DEBUG,
            "%d outbox message(s) of routing keys this version does not know (%s; first id %d) left in the"
            " outbox for a newer version's flusher; the others were published",
            len(ids), ", ".join(sorted(set(unknown.values()))), min(ids))
    if warn:
        _unknown_warned = (ids, now)


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


async def run_outbox_flusher(pool: asyncpg.Pool, bus: Bus, wake: asyncio.Event, refused_for_s: float,
                             interval_s: float = 2.0) -> None:
    """Flush when woken (after a commit that wrote to the outbox) and every `interval_s`, which
    also publishes what another process committed and could not send (it died, or the broker
    was away). A failure (the broker or the database away) is logged when it starts and when it
    is over, not at every try. `refused_for_s`: the setting EVENT_REFUSED_FOR_S."""
    failing_since: float | None = None
    while True:
        try:
            await asyncio.wait_for(wake.wait(), timeout=interval_s)
        except TimeoutError:
            pass
        wake.clear()
        try:
            await flush_outbox(pool, bus, refused_for_s)
        except Exception as exc:
            if failing_since is None:
                failing_since = time.monotonic()
                log.warning("publishing from the outbox failed (%s: %s); trying again every %g s",
                            type(exc).__name__, str(exc)[:300], interval_s, exc_info=True)
            else:
                log.debug("publishing from the outbox still fails", exc_info=True)
        else:
            if failing_since is not None:
                log.warning("publishing from the outbox works again, after %.0f s of failures",
                            time.monotonic() - failing_since)
                failing_since = None
