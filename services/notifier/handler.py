"""The notifier's handlers: webhooks for the events on `stt.events`.

`fan_out` takes one public event and records a delivery for every webhook that wants it (the
job owner's endpoints subscribed to its type, and the job's own callback_url), then asks for
them to be sent. `deliver` sends one job's pending deliveries to one endpoint, oldest first,
one at a time (so order per job holds for each endpoint); a failed attempt is retried after the
next of WEBHOOK_RETRY_DELAYS_S through a TTL queue, and the deliveries after it wait for it.
After WEBHOOK_MAX_ATTEMPTS it is recorded as failed and the next one goes. Every attempt is
logged in `webhook_attempts` (GET /webhooks/{id}/deliveries). See docs/design.md, Webhooks."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any, NamedTuple

import aiohttp
import asyncpg
from pydantic import BaseModel, ConfigDict

from common import jobstore
from common.broker import Bus, publish_later, stage_queue
from common.messages import Contract, TranscriptDeleted, WebhookDue
from common.metrics import webhook_attempted
from common.outbound import target_problem
from common.recent import Recent
from common.settings import Settings
from common.webhooks import WebhookPayload, endpoint, signature

log = logging.getLogger(__name__)

DELIVERY_QUEUE = stage_queue("notifier")
# An endpoint whose WEBHOOK_CONCURRENCY deliveries are all in flight gets this one again later,
# instead of it holding a consumer slot another endpoint could use.
BUSY_ENDPOINT_DELAY_S = 5
# A pending delivery this late (its kick lost: a crash between commit and publish) is kicked again.
STUCK_AFTER_S = 120
# A chain sent back to wait for its endpoint's slot marks its oldest delivery due now when it is
# later than this (well within STUCK_AFTER_S, so the sweep never takes it for stuck), and looks
# at it only this often: a query a minute per waiting chain in a replica, not one at every
# BUSY_ENDPOINT_DELAY_S.
WAITING_MARKED_EVERY_S = STUCK_AFTER_S / 2
SWEEP_EVERY_S = 30.0
MAX_ERROR_CHARS = 500
PRUNE_EVERY_S = 3600.0
PRUNE_BATCH = 1000

# Deliveries in flight in this process, per endpoint (common.webhooks.endpoint; an entry goes
# when its count is back to 0).
_in_flight: dict[str, int] = {}
# Each webhook's endpoint, the least recently used going past ENDPOINTS_KEPT: a webhook's URL never
# changes, and looked up for every kick, it was a query every BUSY_ENDPOINT_DELAY_S per chain
# waiting for a slot. A webhook removed since keeps its entry; what that kick does stays right
# (_deliver_in_order finds none of its deliveries; _mark_waiting_for_a_slot finds its chain gone).
ENDPOINTS_KEPT = 10_000
_endpoints: Recent[int, str] = Recent(ENDPOINTS_KEPT)
# When (time.monotonic()) each (webhook, job) chain sent back to wait for a slot next needs its mark
# looked at: the mark is written once a WAITING_MARKED_EVERY_S, so the bounces in between need no
# query. Past MARK_CHECKS_KEPT, the entries whose time has come go (absent and past are alike), and
# if that is not enough, all: a chain without one is only looked at once more.
MARK_CHECKS_KEPT = 100_000
_next_mark_check: dict[tuple[int, int], float] = {}
# The request of each (webhook, job) chain this process sends round the delay queue to wait for
# its busy endpoint. fan_out asks for each event's delivery on its own: sent round too, a job with
# thousands of events behind a slow endpoint had thousands of requests going round, ahead of other
# endpoints' in the same queue. While the chain's request goes round, a new one is dropped: the one
# going round sends every pending delivery once it gets a slot. An entry goes when its request
# comes back; it holds new requests back only for the request's delay, while the request cannot
# have been taken yet: after that another replica may have taken it from the shared queue and
# found the chain settled before a delivery asked for now was committed (or it was lost), so the
# next request goes round instead. Kept as _next_mark_check is.
GOING_ROUND_LOST_AFTER_S = BUSY_ENDPOINT_DELAY_S


class _GoingRound(NamedTuple):
    message_id: str
    since: float  # time.monotonic() it was sent round (or set off to be)
    # A request was dropped while it was on its way into the queue: it goes round even if it
    # found the chain settled (its statement may have come before that request's delivery).
    dropped: bool = False


_going_round: dict[tuple[int, int], _GoingRound] = {}


async def fan_out(pool: asyncpg.Pool, event: Contract, *, keys_configured: bool = False
                  ) -> AsyncIterator[WebhookDue]:
    """A delivery per webhook that takes `event` (idempotent: a redelivered event adds none).
    `keys_configured` (API_KEYS set): endpoints without an owner take nothing (set_ownerless_endpoints_aside)."""
    payload = WebhookPayload(type=event.ROUTING_KEY, timestamp=datetime.now(UTC), data=event).model_dump_json()
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            """INSERT INTO webhook_deliveries (webhook_id, event_id, event_type, job_id, payload)
               SELECT w.id, $1, $2, $3, $4 FROM webhooks w
                WHERE $2 = ANY (w.events)
                  AND (w.job_id = $3 OR (w.job_id IS NULL AND (w.owner IS NOT NULL OR NOT $5)
                      AND coalesce(w.owner, '') = (
                      -- The job's owner; from the usage ledger when the job was deleted since it ended.
                      SELECT coalesce(owner, '') FROM (SELECT owner FROM transcripts WHERE id = $3
                          UNION ALL SELECT owner FROM job_usage WHERE job_id = $3) o LIMIT 1)))
               ON CONFLICT (webhook_id, event_id) DO UPDATE SET event_type = EXCLUDED.event_type
               RETURNING webhook_id, status""",
            event.message_id, event.ROUTING_KEY, event.job_id, payload, keys_configured)
        if isinstance(event, TranscriptDeleted):
            # Events are fanned out one at a time, in the order they were published: the job's end
            # came before, so its callback without a delivery of it never gets one.
            await jobstore.forget_deleted_jobs_deliveries(conn, event.job_id, end_fanned_out=True)
    for row in rows:
        if row["status"] == "pending":
            yield WebhookDue(job_id=event.job_id, webhook_id=row["webhook_id"])


async def set_ownerless_endpoints_aside(pool: asyncpg.Pool, settings: Settings) -> int:
    """With API_KEYS set, the endpoints registered while it was unset (owner NULL) take no events
    (fan_out), and the deliveries they still had pending (an endpoint that was down) are given
    up, not sent: no key can list or remove such an endpoint (GET/DELETE /webhooks are a key's
    own), so it would get every owner-less job's events (bucket drops without INBOX_API_KEY),
    segment text included. Said once, with how to remove them. A job's own callback_url is still
    used: it takes only that job's ending, which its submitter asked for, and goes with the job.
    How many such endpoints there are."""
    if not settings.api_key_list:
        return 0
    async with pool.acquire() as conn, conn.transaction():
        count = await conn.fetchval("SELECT count(*) FROM webhooks WHERE owner IS NULL AND job_id IS NULL")
        given_up = await conn.fetchval(
            """WITH given_up AS (
                   UPDATE webhook_deliveries d SET status = 'failed', finished_at = now()
                     FROM webhooks w
                    WHERE w.id = d.webhook_id AND w.owner IS NULL AND w.job_id IS NULL AND d.status = 'pending'
                   RETURNING 1)
               SELECT count(*) FROM given_up""")
    if count:
        log.warning("%d webhooks registered while API_KEYS was unset belong to no key and are no longer sent"
                    " events while it is set (%d deliveries they had pending given up); remove them with DELETE"
                    " FROM webhooks WHERE owner IS NULL AND job_id IS NULL, or unset API_KEYS to use them again",
                    count, given_up)
    return count


class EventOfANewerVersion(BaseModel):
    """An stt.events message whose type this version does not know: a newer version publishes it."""

    model_config = ConfigDict(extra="allow")


class UnknownEventType(Exception):
    pass


async def leave_to_a_newer_notifier(event: EventOfANewerVersion) -> None:
    """Fails, so the event is retried after each RETRY_DELAYS_S delay and then parked in
    stt.dead-letters: while a rolling upgrade brings the services that publish it, a newer
    notifier takes over the events queue and delivers it; after, an operator can send it back.
    Dropped, as a notifier did before, it was lost to every webhook that takes it."""
    raise UnknownEventType("an event type this notifier does not know (a newer version publishes it);"
                           " upgrade the notifier")


async def deliver(pool: asyncpg.Pool, http: aiohttp.ClientSession, settings: Settings, bus: Bus,
                  due: WebhookDue) -> None:
    slot = await _endpoint_of(pool, due.webhook_id)
    if slot is None:
        return  # removed since: its deliveries went with it
    chain = (due.webhook_id, due.job_id)
    going_round = _going_round.get(chain)
    if going_round is not None and going_round.message_id == due.message_id:
        # Back: a request dropped from now on must not count on it, whatever it finds. Only its
        # statements from here on can find the chain settled, and they see the deliveries of the
        # requests dropped before (each committed before it was asked for).
        del _going_round[chain]
    if _in_flight.get(slot, 0) >= settings.webhook_concurrency:
        await _wait_for_a_slot(pool, bus, due)
        return
    _next_mark_check.pop(chain, None)
    _in_flight[slot] = _in_flight.get(slot, 0) + 1
    try:
        while await _deliver_in_order(pool, http, settings, bus, due):
            due = due.model_copy(update={"retry_of": None, "after_attempts": None})
    finally:
        _in_flight[slot] -= 1
        if not _in_flight[slot]:
            del _in_flight[slot]


def _make_room(entries: dict, expired: Callable[[Any], bool]) -> None:
    """Past MARK_CHECKS_KEPT entries, those whose value has `expired` go, and if that is not
    enough, all (a chain without an entry is only looked at once more)."""
    if len(entries) >= MARK_CHECKS_KEPT:
        for chain, value in list(entries.items()):
            if expired(value):
                del entries[chain]
        if len(entries) >= MARK_CHECKS_KEPT:
            entries.clear()


async def _wait_for_a_slot(pool: asyncpg.Pool, bus: Bus, due: WebhookDue) -> None:
    """Send the request round the delay queue to come back for a slot, unless another request of
    its chain is going round already (_going_round): that one sends this one's delivery too, which
    was committed before this was asked for. A retry is never dropped (its delivery may be due by
    RabbitMQ's clock only: _deliver_in_order's `forced`); it goes round in the other's place."""
    chain = (due.webhook_id, due.job_id)
    now = time.monotonic()
    going_round = _going_round.get(chain)
    if (going_round is not None and due.retry_of is None
            and now - going_round.since < GOING_ROUND_LOST_AFTER_S):
        _going_round[chain] = going_round._replace(dropped=True)
        return
    _make_room(_going_round, lambda other: now - other.since >= GOING_ROUND_LOST_AFTER_S)
    # Taken before the first await, so that a request coming meanwhile is dropped, not sent round too.
    _going_round[chain] = _GoingRound(due.message_id, now)
    settled = not await _mark_waiting_for_a_slot(pool, due)
    going_round = _going_round.get(chain)
    if going_round is not None and going_round.message_id != due.message_id:
        return  # a retry goes round in this one's place
    if settled and not (going_round is not None and going_round.dropped):
        _going_round.pop(chain, None)
        return
    await publish_later(bus, due, DELIVERY_QUEUE, BUSY_ENDPOINT_DELAY_S)
    # Since before it was sent: it cannot come back sooner than its delay after that.
    _going_round[chain] = _GoingRound(due.message_id, now)


async def _endpoint_of(pool: asyncpg.Pool, webhook_id: int) -> str | None:
    """The webhook's endpoint (common.webhooks.endpoint); None when it is not there (removed)."""
    slot = _endpoints.get(webhook_id)
    if slot is not None:
        return slot
    url = await pool.fetchval("SELECT url FROM webhooks WHERE id = $1", webhook_id)
    if url is None:
        return None
    _endpoints[webhook_id] = slot = endpoint(url)
    return slot


async def _mark_waiting_for_a_slot(pool: asyncpg.Pool, due: WebhookDue) -> bool:
    """Tell the sweep that this chain is not stuck: its kick is on its way back for a slot.
    Its oldest delivery, due over WAITING_MARKED_EVERY_S ago, is made due now (no later: the kick
    coming back finds it due). Unmarked, a chain waiting behind a busy endpoint looked stuck to
    the sweep, which kicked it again every SWEEP_EVERY_S in every replica, each kick sent back
    here every BUSY_ENDPOINT_DELAY_S while the endpoint stayed busy: kicks piled up for as long as
    it did. Looked at only once the mark this process last saw is that old (marked since by
    another replica, it is only looked at sooner than needed). False: the chain has no pending
    delivery left (settled, or its webhook removed), so its kick need not come back."""
    chain = (due.webhook_id, due.job_id)
    now = time.monotonic()
    if _next_mark_check.get(chain, now) > now:
        return True
    # Seconds since the oldest delivery was due (0: marked now; below 0: it waits for a retry).
    since_due = await pool.fetchval(
        """WITH head AS (SELECT id, next_attempt_at FROM webhook_deliveries
                          WHERE webhook_id = $1 AND job_id = $2 AND status = 'pending' ORDER BY id LIMIT 1),
                marked AS (UPDATE webhook_deliveries d SET next_attempt_at = now() FROM head
                            WHERE d.id = head.id AND d.status = 'pending'
                              AND d.next_attempt_at < now() - make_interval(secs => $3)
                           RETURNING d.next_attempt_at)
           SELECT extract(epoch FROM now() - coalesce((SELECT next_attempt_at FROM marked), head.next_attempt_at))
             FROM head""",
        due.webhook_id, due.job_id, float(WAITING_MARKED_EVERY_S))
    if since_due is None:
        _next_mark_check.pop(chain, None)
        return False
    _make_room(_next_mark_check, lambda at: at <= now)
    _next_mark_check[chain] = now + WAITING_MARKED_EVERY_S - float(since_due)
    return True


# How long one message sends a job's deliveries to one endpoint; the rest go on in a message of
# their own. A backlog (a dead endpoint's, each one attempt of up to two timeouts once one was given
# up) sent in one would hold the message past RabbitMQ's consumer timeout, and with it the other
# deliveries prefetched on its channel.
DELIVERY_BUDGET_S = 60.0


async def _deliver_in_order(pool: asyncpg.Pool, http: aiohttp.ClientSession, settings: Settings, bus: Bus,
                            due: WebhookDue) -> bool:
    """Send the job's deliveries to the webhook while the oldest pending one is due. One worker
    at a time per (webhook, job), by an advisory lock; a kick that finds it taken is dropped, so
    the holder looks once more after letting go. True: more is due now."""
    key = (due.webhook_id % 2**31, due.job_id % 2**31)
    started, handed_on = time.monotonic(), False
    async with pool.acquire() as conn:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1::int, $2::int)", *key):
            return False
        try:
            retry_of = due.retry_of
            while True:
                if time.monotonic() - started > DELIVERY_BUDGET_S:
                    handed_on = True
                    break
                head = await _oldest_pending(conn, due)
                # A retry that finds its delivery tried again since (a second kick of the same
                # retry) forces nothing: it would spend the next attempt before its delay.
                forced = (head is not None and head["id"] == retry_of
                          and due.after_attempts in (None, head["attempts"]))
                if head is None or not (head["due"] or forced):
                    break  # none left, or the oldest waits for its retry (which will go on from it)
                retry_of = None
                if not await _attempt(conn, http, settings, bus, due, head):
                    break
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1::int, $2::int)", *key)
        head = await _oldest_pending(conn, due)
        more = head is not None and head["due"]
    if more and handed_on:  # kicked after letting go, so the kick does not find the lock taken
        # Through the work queue, as the sweep kicks: a delay queue exists only for the delays
        # that __main__ declares, and a publish no queue takes raises.
        await bus.publish(WebhookDue(job_id=due.job_id, webhook_id=due.webhook_id))
        return False
    return more


async def _oldest_pending(conn: asyncpg.Connection, due: WebhookDue) -> asyncpg.Record | None:
    """The job's oldest pending delivery to the webhook, and whether its time has come."""
    return await conn.fetchrow(
        """SELECT d.id, d.event_id, d.event_type, d.payload, d.attempts, w.url, w.secret,
                  d.next_attempt_at <= now() AS due
             FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id
            WHERE d.webhook_id = $1 AND d.job_id = $2 AND d.status = 'pending'
            ORDER BY d.id LIMIT 1""", due.webhook_id, due.job_id)


async def _attempt(conn: asyncpg.Connection, http: aiohttp.ClientSession, settings: Settings, bus: Bus,
                   due: WebhookDue, head: asyncpg.Record) -> bool:
    """POST one delivery and record the attempt. True when it is settled (delivered, or given up)."""
    attempt = head["attempts"] + 1
    started = time.perf_counter()
    status_code = None
    error = await target_problem(head["url"], settings.webhook_allow_private,
                                 resolve_timeout_s=settings.webhook_timeout_s)
    if error is None:
        status_code, error = await post(http, head["url"], head["secret"], head["event_id"],
                                        head["payload"].encode(), settings.webhook_timeout_s)
    latency_ms = int((time.perf_counter() - started) * 1000)
    delays = settings.webhook_retry_delays
    delay = delays[min(attempt - 1, len(delays) - 1)]
    behind_given_up = error is not None and await _behind_one_given_up(conn, due, head)
    status = ("delivered" if error is None
              else "failed" if attempt >= settings.webhook_max_attempts or behind_given_up
              else "pending")
    async with conn.transaction():
        # FOR KEY SHARE waits for a deletion of the job under way (its FOR UPDATE), and holds off
        # one to come until this commits: one of the two sees the other's outcome. Taken before
        # the delivery's row, in the order a forgetting of a person takes them (it locks the job,
        # then rewrites its pending deliveries: speakerstore.delete_speaker); the other way round,
        # an attempt settled while a forgetting rewrote the job's deliveries deadlocked with it.
        job_gone = status != "pending" and await conn.fetchval(
            "SELECT 1 FROM transcripts WHERE id = $1 FOR KEY SHARE", due.job_id) is None
        updated = await conn.fetchval(
            """UPDATE webhook_deliveries SET attempts = $2, status = $3,
                      next_attempt_at = now() + make_interval(secs => $4),
                      finished_at = CASE WHEN $3 = 'pending' THEN NULL ELSE now() END
                WHERE id = $1 RETURNING id""", head["id"], attempt, status, float(delay))
        if updated is None:
            log.info("webhook %d was removed during a delivery; nothing more to send", due.webhook_id)
            return True
        await conn.execute(
            "INSERT INTO webhook_attempts (delivery_id, attempt, status_code, latency_ms, error)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            head["id"], attempt, status_code, latency_ms, error[:MAX_ERROR_CHARS] if error else None)
        if job_gone:
            # The job was deleted meanwhile: its text stays nowhere once its deliveries are
            # settled (jobstore.forget_deleted_jobs_deliveries).
            await jobstore.forget_deleted_jobs_deliveries(conn, due.job_id)
    webhook_attempted({"pending": "retried", "failed": "given_up"}.get(status, status))
    if status == "pending":
        log.warning("webhook %d: %s %s not delivered (%s); attempt %d/%d again in %d s", due.webhook_id,
                    head["event_type"], head["event_id"], error, attempt, settings.webhook_max_attempts, delay)
        await publish_later(bus, due.model_copy(update={"retry_of": head["id"], "after_attempts": attempt}),
                            DELIVERY_QUEUE, delay)
        return False
    if behind_given_up:
        log.error("webhook %d: %s %s given up after one attempt, behind one given up (%s)", due.webhook_id,
                  head["event_type"], head["event_id"], error)
    elif status == "failed":
        log.error("webhook %d: %s %s given up after %d attempts (%s)", due.webhook_id, head["event_type"],
                  head["event_id"], attempt, error)
    else:
        log.info("webhook %d: %s delivered (HTTP %d, %d ms, attempt %d)", due.webhook_id, head["event_type"],
                 status_code, latency_ms, attempt)
    return True


async def _behind_one_given_up(conn: asyncpg.Connection, due: WebhookDue, head: asyncpg.Record) -> bool:
    """Whether the last settled delivery of the job to the webhook before this one was given up,
    and the webhook has delivered nothing since (of this job or any other). This one then gets one
    attempt: each waiting out the whole schedule behind the one before (about a day each) held a
    dead endpoint's job, 500 segments long, for over a year. One delivered since (the endpoint
    back) gives the next failure its whole schedule again: counted of this job only, a job given
    up on one bad day had each of its events, weeks later, tried once (its deletion never told).
    Unless the one given up was refused (a 4xx answer but 429): an endpoint that delivers other
    jobs and refuses this one's would hold each of its events a whole schedule, for a year."""
    return bool(await conn.fetchval(
        "SELECT d.status = 'failed' AND (NOT EXISTS (SELECT 1 FROM webhook_deliveries s WHERE s.webhook_id = $1"
        " AND s.status = 'delivered' AND s.finished_at >= d.finished_at)"
        " OR coalesce((SELECT a.status_code BETWEEN 400 AND 499 AND a.status_code <> 429 FROM webhook_attempts a"
        " WHERE a.delivery_id = d.id ORDER BY a.attempt DESC LIMIT 1), false))"
        " FROM webhook_deliveries d WHERE d.webhook_id = $1 AND d.job_id = $2 AND d.id < $3"
        " AND d.status <> 'pending' ORDER BY d.id DESC LIMIT 1", due.webhook_id, due.job_id, head["id"]))


# How long an answer's body is read (within the POST's WEBHOOK_TIMEOUT_S) once its status line
# came: only so that a short one leaves the connection fit to be used again.
BODY_READ_S = 1.0


async def post(http: aiohttp.ClientSession, url: str, secret: str, event_id: str, body: bytes,
               timeout_s: float) -> tuple[int | None, str | None]:
    """(status code, error or None) of one signed POST; redirects are not followed (a 3xx is a
    failure: following it could lead anywhere, a private address included). The status line
    decides: a 2xx is delivered whatever becomes of its body (late, cut short). Read first, a body
    that came late or was cut short made an endpoint's 200 a failed attempt, and the event, which
    the endpoint had taken, was sent to it again."""
    timestamp = int(time.time())
    headers = {"content-type": "application/json", "webhook-id": event_id,
               "webhook-timestamp": str(timestamp),
               "webhook-signature": signature(secret, event_id, timestamp, body),
               "user-agent": "stt-pipeline-webhooks"}
    status: int | None = None
    try:
        async with http.post(url, data=body, headers=headers, allow_redirects=False,
                             timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
            status = response.status
            await _read_some_of_the_body(response)
    except TimeoutError:
        if status is None:
            return None, f"no answer within {timeout_s:g} s"
    except aiohttp.ClientError as exc:
        if status is None:
            return None, f"{type(exc).__name__}: {exc}"
    except Exception as exc:
        # Anything else (a URL aiohttp cannot take, an SSL context error) is a failed attempt too:
        # raised, it would leave the attempt unrecorded and be kicked again for ever.
        if status is None:
            log.exception("POST to a webhook failed unexpectedly")
            return None, f"{type(exc).__name__}: {exc}"
    if 200 <= status < 300:
        return status, None
    return status, f"HTTP {status}"


async def _read_some_of_the_body(response: aiohttp.ClientResponse) -> None:
    """Up to 4 KiB of the answer's body, for at most BODY_READ_S; one that comes later, or is cut
    short, is left (the connection is then closed, not used again)."""
    try:
        async with asyncio.timeout(BODY_READ_S):
            await response.content.read(4096)
    except (TimeoutError, aiohttp.ClientError) as exc:
        log.debug("an answer's body not read (%s)", type(exc).__name__)


async def prune_delivery_log(pool: asyncpg.Pool, settings: Settings) -> int:
    """Remove settled deliveries (with their attempts) settled over WEBHOOK_LOG_DAYS ago, a
    batch at a time; how many went."""
    if not settings.webhook_log_days:
        return 0
    removed = 0
    while True:
        batch = await pool.execute(
            # Not a job's callback's: it goes with its job, which its settled delivery tells.
            "DELETE FROM webhook_deliveries WHERE id IN (SELECT id FROM webhook_deliveries"
            " WHERE status <> 'pending' AND finished_at < now() - make_interval(secs => $1)"
            " AND webhook_id IN (SELECT id FROM webhooks WHERE job_id IS NULL) LIMIT $2)",
            settings.webhook_log_days * 86400.0, PRUNE_BATCH)
        count = int(batch.split()[-1])
        removed += count
        if count < PRUNE_BATCH:
            if removed:
                log.info("removed %d webhook deliveries settled over %g days ago", removed, settings.webhook_log_days)
            return removed


async def overdue_chains(db: asyncpg.Pool | asyncpg.Connection) -> list[asyncpg.Record]:
    """(webhook_id, job_id) of each job whose oldest pending delivery is long overdue and which
    no one is sending (its (webhook, job) lock free in every replica: a holder looks again after
    letting go). A chain waiting for its endpoint's slot is not overdue: while its kick is sent
    back, it is marked due now once a WAITING_MARKED_EVERY_S (_mark_waiting_for_a_slot), so a
    chain is overdue only once no kick of its own has come for STUCK_AFTER_S, its kick lost. Of a
    webhook with a delivery in flight, only the one overdue longest: a job whose kick was lost is
    the one overdue longest in time, so it is still kicked."""
    return await db.fetch(
        """WITH held AS (
               SELECT l.classid::bigint AS webhook_key, l.objid::bigint AS job_key FROM pg_locks l
                WHERE l.locktype = 'advisory' AND l.objsubid = 2 AND l.granted
                  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()))
           SELECT webhook_id, job_id FROM (
               SELECT webhook_id, job_id,
                      row_number() OVER (PARTITION BY webhook_id ORDER BY next_attempt_at, id) AS place
                 FROM (SELECT DISTINCT ON (webhook_id, job_id) webhook_id, job_id, id, next_attempt_at
                         FROM webhook_deliveries WHERE status = 'pending'
                        ORDER BY webhook_id, job_id, id) oldest
                WHERE next_attempt_at < now() - make_interval(secs => $1)
                  AND NOT EXISTS (SELECT 1 FROM held WHERE held.webhook_key = oldest.webhook_id % 2147483648
                                                       AND held.job_key = oldest.job_id % 2147483648)) overdue
            WHERE place = 1 OR NOT EXISTS (
                  SELECT 1 FROM held WHERE held.webhook_key = overdue.webhook_id % 2147483648)""",
        float(STUCK_AFTER_S))


async def sweep_stuck(pool: asyncpg.Pool, bus: Bus, every_s: float = SWEEP_EVERY_S) -> None:
    """Kick again, now and then, any (webhook, job) whose oldest pending delivery is long overdue:
    its kick was lost between a commit and a publish (a crash). Extra kicks are harmless: they
    force no attempt, and one that is overdue is due anyway. Only the oldest pending delivery
    counts: the ones after it wait for it, and are not late."""
    while True:
        try:
            for row in await overdue_chains(pool):
                await bus.publish(WebhookDue(job_id=row["job_id"], webhook_id=row["webhook_id"]))
        except Exception as exc:  # the database or the broker is away: the next round tries again
            log.warning("could not look for overdue webhook deliveries (%s: %s); later", type(exc).__name__, exc)
        await asyncio.sleep(every_s)
