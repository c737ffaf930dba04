"""Webhooks: /webhooks (register, list, show, remove, delivery log). A webhook is a URL, the event
types it takes and the secret that signs its deliveries, owned by the API key like jobs; the
notifier (services/notifier) delivers. A job's own callback_url (POST /recognize) is a webhook
bound to that job."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated

import asyncpg
from litestar import Request, delete, get, post
from litestar.datastructures import State
from litestar.exceptions import HTTPException, NotFoundException
from litestar.params import Parameter
from pydantic import BaseModel, ConfigDict

from common.messages import EVENTS, TranscriptCompleted, TranscriptFailed
from common.outbound import MAX_URL_CHARS, TemporaryProblem, target_problem
from common.settings import Settings
from common.webhooks import SECRET_PREFIX, decoded_secret, new_secret
from services.ingest.admission import RETRY_AFTER_S, SMALL_BODY_BYTES
from services.ingest.auth import request_owner
from services.ingest.errors import MAX_ID, error_responses
from services.ingest.transcripts import CursorQuery, LimitQuery

log = logging.getLogger(__name__)

SECRET_CHARS = (16, 200)
CALLBACK_EVENTS = [TranscriptCompleted.ROUTING_KEY, TranscriptFailed.ROUTING_KEY]

WebhookId = Annotated[int, Parameter(ge=1, le=MAX_ID, description="A webhook's id")]


class NewWebhook(BaseModel):
    # A misspelt field ("event") would otherwise subscribe to every event type.
    model_config = ConfigDict(extra="forbid")

    url: str
    # Default: every event type.
    events: list[str] | None = None
    # Default: a new `whsec_` secret, returned once in the answer.
    secret: str | None = None


class Webhook(BaseModel):
    id: int
    url: str
    events: list[str]
    # Set for a job's callback_url: the job it belongs to.
    transcript_id: int | None = None
    created_at: datetime


class CreatedWebhook(Webhook):
    # Shown this once: verify each delivery's webhook-signature with it.
    secret: str


class WebhookList(BaseModel):
    items: list[Webhook]
    # Pass as ?cursor= for the next page; absent on the last page.
    next_cursor: int | None = None


class Attempt(BaseModel):
    attempt: int
    at: datetime
    status_code: int | None = None
    latency_ms: int
    error: str | None = None


class Delivery(BaseModel):
    id: int
    event_id: str
    event_type: str
    transcript_id: int
    # pending (being tried, or waiting for its next attempt) | delivered | failed (gave up)
    status: str
    attempts: list[Attempt]
    created_at: datetime
    finished_at: datetime | None = None


class DeliveryList(BaseModel):
    items: list[Delivery]


async def checked_target(url: str, settings: Settings) -> str:
    url = url.strip()
    problem = "the URL is too long" if len(url) > MAX_URL_CHARS else await target_problem(
        url, settings.webhook_allow_private)
    if isinstance(problem, TemporaryProblem):
        raise HTTPException(status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)},
                            detail=f"webhook URL not checked: {problem}; try again shortly")
    if problem:
        raise HTTPException(status_code=400, detail=f"webhook URL refused: {problem}")
    return url


async def add_callback(conn: asyncpg.Connection, job_id: int, owner: str | None, url: str, secret: str) -> None:
    """A job's callback_url as a webhook bound to it (in the job's own transaction)."""
    await conn.execute("INSERT INTO webhooks (owner, url, events, secret, job_id) VALUES ($1, $2, $3, $4, $5)",
                       owner, url, CALLBACK_EVENTS, secret, job_id)


def _webhook(row: asyncpg.Record) -> Webhook:
    return Webhook(id=row["id"], url=row["url"], events=row["events"], transcript_id=row["job_id"],
                   created_at=row["created_at"])


async def _owned(pool: asyncpg.Pool, owner: str | None, webhook_id: int) -> asyncpg.Record:
    row = await pool.fetchrow("SELECT * FROM webhooks WHERE id = $1 AND owner IS NOT DISTINCT FROM $2",
                              webhook_id, owner)
    if row is None:
        raise NotFoundException(detail=f"no webhook with id {webhook_id}")
    return row


@post("/webhooks", status_code=201, summary="Register a webhook", request_max_body_size=SMALL_BODY_BYTES,
      responses=error_responses(400, 401, 403, 413, 503, e413="The JSON body is over 1 MiB"))
async def register(data: NewWebhook, request: Request, state: State) -> CreatedWebhook:
    """Events go to `url` as signed POSTs (Standard Webhooks: `webhook-id`, `webhook-timestamp`,
    `webhook-signature`). URLs that resolve to private, loopback or link-local addresses are
    refused unless WEBHOOK_ALLOW_PRIVATE=true."""
    url = await checked_target(data.url, state.settings)
    events = data.events if data.events is not None else list(EVENTS)
    unknown = sorted(set(events) - set(EVENTS))
    if unknown or not events:
        raise HTTPException(status_code=400, detail=f"events are some of {', '.join(EVENTS)}"
                                                    + (f"; unknown: {', '.join(unknown)}" if unknown else ""))
    secret = data.secret if data.secret is not None else new_secret()
    if not SECRET_CHARS[0] <= len(secret) <= SECRET_CHARS[1] or not secret.isprintable():
        raise HTTPException(status_code=400, detail=f"a secret is {SECRET_CHARS[0]}-{SECRET_CHARS[1]} printable"
                                                    " characters")
    if secret.startswith(SECRET_PREFIX) and decoded_secret(secret) is None:
        raise HTTPException(status_code=400, detail=f"a secret that starts with {SECRET_PREFIX} signs with the bytes"
                                                    " the base64 after it stands for, and this is not base64;"
                                                    f" choose one without the {SECRET_PREFIX} prefix to sign with"
                                                    " its own characters")
    row = await state.pool.fetchrow(
        "INSERT INTO webhooks (owner, url, events, secret) VALUES ($1, $2, $3, $4) RETURNING *",
        request_owner(request), url, list(dict.fromkeys(events)), secret)
    log.info("webhook %d registered for %s", row["id"], ", ".join(row["events"]))
    return CreatedWebhook(**_webhook(row).model_dump(), secret=secret)


@get("/webhooks", summary="The registered webhooks (and jobs' callback URLs), oldest first",
     responses=error_responses(400, 401, 403, 503))
async def list_webhooks(request: Request, state: State, limit: LimitQuery = 100,
                        cursor: CursorQuery = None) -> WebhookList:
    """A page at a time: every job submitted with a callback_url adds one."""
    # The owner as webhooks_owner_idx reads it (coalesce(owner, '')): `IS NOT DISTINCT FROM` could not
    # use it, and a key with a few endpoints walked every row of the table (a row per job that gave a
    # callback_url). That index does not give the rows in id order: a key's page is sorted from its rows.
    rows = await state.pool.fetch(
        "SELECT * FROM webhooks WHERE coalesce(owner, '') = coalesce($1::text, '') AND id > $2 ORDER BY id LIMIT $3",
        request_owner(request), cursor or 0, limit + 1)
    items = [_webhook(r) for r in rows[:limit]]
    return WebhookList(items=items, next_cursor=items[-1].id if len(rows) > limit else None)


@get("/webhooks/{webhook_id:int}", summary="A webhook",
     responses=error_responses(400, 401, 403, 404, 503, e404="No such webhook (for this key)"))
async def show_webhook(webhook_id: WebhookId, request: Request, state: State) -> Webhook:
    return _webhook(await _owned(state.pool, request_owner(request), webhook_id))


@delete("/webhooks/{webhook_id:int}", status_code=204, summary="Remove a webhook and its delivery log",
        responses=error_responses(400, 401, 403, 404, 503, e404="No such webhook (for this key)"))
async def remove_webhook(webhook_id: WebhookId, request: Request, state: State) -> None:
    await _owned(state.pool, request_owner(request), webhook_id)
    await state.pool.execute("DELETE FROM webhooks WHERE id = $1", webhook_id)
    log.info("webhook %d removed", webhook_id)


@get("/webhooks/{webhook_id:int}/deliveries", summary="A webhook's deliveries and their attempts, newest first",
     responses=error_responses(400, 401, 403, 404, 503, e404="No such webhook (for this key)"))
async def deliveries(webhook_id: WebhookId, request: Request, state: State,
                     limit: Annotated[int, Parameter(ge=1, le=500)] = 100) -> DeliveryList:
    await _owned(state.pool, request_owner(request), webhook_id)
    rows = await state.pool.fetch(
        """SELECT d.*, coalesce(array_agg(a ORDER BY a.attempt) FILTER (WHERE a.attempt IS NOT NULL), '{}') AS tries
             FROM webhook_deliveries d LEFT JOIN webhook_attempts a ON a.delivery_id = d.id
            WHERE d.webhook_id = $1 GROUP BY d.id ORDER BY d.id DESC LIMIT $2""", webhook_id, limit)
    return DeliveryList(items=[
        Delivery(id=r["id"], event_id=r["event_id"], event_type=r["event_type"], transcript_id=r["job_id"],
                 status=r["status"], created_at=r["created_at"], finished_at=r["finished_at"],
                 attempts=[Attempt(attempt=a["attempt"], at=a["at"], status_code=a["status_code"],
                                   latency_ms=a["latency_ms"], error=a["error"]) for a in r["tries"]])
        for r in rows])


WEBHOOK_ROUTES = [register, list_webhooks, show_webhook, remove_webhook, deliveries]
