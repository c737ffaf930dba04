"""The ingest HTTP API (Litestar): POST /recognize, GET /status/{id}, health, OpenAPI."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any

import aiohttp
from litestar import Litestar, Request, get, post
from litestar.config.cors import CORSConfig
from litestar.datastructures import State, UploadFile
from litestar.enums import RequestEncodingType
from litestar.exceptions import HTTPException, NotFoundException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.params import Body, FromPath, HeaderParameter, Parameter
from litestar.plugins.pydantic import PydanticPlugin
from litestar.response import Response
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from minio.commonconfig import CopySource
from minio.error import S3Error
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ConfigDict, ValidationError

from common import jobstore, runner
from common.backoff import backoff, of_type
from common.broker import BrokerMisconfigured, connect, open_bus, watched_queues
from common.db import apply_migrations, create_pool
from common.logs import job_logged
from common.messages import REFERENCE_MAX_CHARS, VOCABULARY_MAX_CHARS, JobOptions
from common.metrics import http_metrics_middleware, watch_queue_depths
from common.outbox import run_outbox_flusher
from common.runner import RESTART_S, keep_running
from common.settings import Settings, get_settings
from common.storage import QUICK_CLIENT_TIMEOUT_S, ensure_buckets, is_missing, make_client
from common.webhooks import new_secret
from services.embedder.backends import make_embedder
from services.ingest.admission import (
    SMALL_BODY_BYTES,
    UPLOAD_FORM_PARTS,
    event_stream_limit_middleware,
    small_body_middleware,
    upload_limit_middleware,
)
from services.ingest.auth import api_key_middleware, request_owner
from services.ingest.corrections import CORRECTION_ROUTES
from services.ingest.error_handlers import EXCEPTION_HANDLERS, log_unexpected
from services.ingest.errors import error_responses as _errors
from services.ingest.errors import invalid
from services.ingest.fetch import fetch_recording
from services.ingest.inbox import INBOX_EVENTS_QUEUE, RESULTS_QUEUE, Inbox
from services.ingest.jobs import (
    JobMaybeCreated,
    JobStatus,
    clean_filename,
    create_job,
    earlier_job,
    idempotency,
    rerun_options,
    status_document,
    upload_key,
)
from services.ingest.live import LIVE_ROUTES, Wakeups
from services.ingest.openai_api import OPENAI_ROUTES
from services.ingest.orphans import run_orphan_sweep
from services.ingest.page import PAGE_ROUTES
from services.ingest.playback import PLAYBACK_ROUTES, redaction_asked
from services.ingest.readiness import CHECK_TIMEOUT_S, DatabaseProbe, ObjectStoreProbe, run_checks
from services.ingest.redacted_audio import PROCESSING_RETRY_AFTER_S, REDACTION_RETRY_AFTER_S
from services.ingest.reindex import REINDEX_ROUTES, Reindexer, run_corrections_embedder
from services.ingest.retention import run_retention
from services.ingest.search import SEARCH_ROUTES
from services.ingest.speakers import SPEAKER_ROUTES, require_enrolled, run_matching_sweep
from services.ingest.submission import (
    Accepted,
    Unavailable,
    accepted,
    maybe_created,
    replayed,
    submit_recording,
)
from services.ingest.transcripts import TRANSCRIPT_ROUTES, JobId, stored_filename, visible
from services.ingest.usage import USAGE_ROUTES
from services.ingest.webhooks import WEBHOOK_ROUTES, checked_target

log = logging.getLogger("services.ingest")


# The counts are read as text so that a blank field (an HTML form's empty input) means "not
# given", as it does for language; JobOptions checks what they say.
SpeakerCount = Annotated[str | None, Parameter(description="A whole number from 1 to 32; blank or left out: not given")]


@dataclass
class RecognizeForm:
    file: Annotated[UploadFile | None, Parameter(description="The recording (or give `url`)")] = None
    url: Annotated[str | None, Parameter(
        description="Instead of `file`: an http(s) address of the recording, fetched by the service "
                    "(public addresses only, within MAX_UPLOAD_MB and AUDIO_URL_TIMEOUT_S)")] = None
    language: Annotated[str | None, Parameter(
        description="A Whisper language code (en, ru...); blank, left out or `auto`: detected once; several "
                    "codes (`en,de`) or `multi`: the recording switches language, each speaker's passage is "
                    "transcribed in its own")] = None
    num_speakers: SpeakerCount = None
    min_speakers: SpeakerCount = None
    max_speakers: SpeakerCount = None
    expected_speakers: Annotated[str | None, Parameter(
        description="Enrolled speakers who may talk in it, comma-separated names (`Anna, Boris`): recognition "
                    "names the recording's speakers after these only")] = None
    multichannel: Annotated[str | None, Parameter(
        description="true: each channel is its own party (a call recorded one side per channel), diarized and "
        "transcribed apart; no speaker counts with it")] = None
    vocabulary: Annotated[str | None, Parameter(
        description="Names and terms the recording uses, comma-separated (people, products, jargon), so that "
        f"Whisper spells them so; at most {VOCABULARY_MAX_CHARS} characters")] = None
    task: Annotated[str | None, Parameter(
        description="`transcribe` (blank or left out) or `translate`: the text in English, whatever the "
        "language spoken")] = None
    spelling: Annotated[str | None, Parameter(
        description="Custom spelling: heard=written pairs, comma-separated (`confu i=ComfyUI`); what Whisper "
        "writes (whole words, any case) is replaced by the written form")] = None
    redact: Annotated[str | None, Parameter(
        description="What to replace in the text before it is stored, comma-separated: email, card, phone, "
        "number (every number written in digits)")] = None
    reference: Annotated[str | None, Parameter(
        description="Your own name for the job (a call id, a ticket), one line of at most "
        f"{REFERENCE_MAX_CHARS} characters: returned with the transcript and in its transcript.completed or "
        "transcript.failed, and GET /transcripts?reference= finds the job by it")] = None
    callback_url: Annotated[str | None, Parameter(
        description="This job's transcript.completed or transcript.failed is POSTed here, signed")] = None


RECOGNIZE_FIELDS = frozenset(field.name for field in dataclasses.fields(RecognizeForm))

MAX_BIGINT = 2**63 - 1


# The `error` of a job its owner cancelled (POST /transcripts/{id}/cancel).
CANCELLED = "cancelled"


# ---- routes ---------------------------------------------------------------------------------


IdempotencyKey = Annotated[str | None, HeaderParameter(
    name="Idempotency-Key", description="Any unique string (a UUID): the same request sent again with it (after a "
    "timeout or a dropped connection) makes no second job and gets the first answer again")]


@post("/recognize", status_code=202, summary="Submit a recording for transcription",
      responses=_errors(400, 401, 403, 408, 411, 413, 415, 422, 503,
                        e422="The Idempotency-Key was already used for another request"))
async def recognize(
    data: Annotated[RecognizeForm, Body(media_type=RequestEncodingType.MULTI_PART,
                                        multipart_form_part_limit=UPLOAD_FORM_PARTS)], state: State,
    request: Request, idempotency_key: IdempotencyKey = None,
) -> Response[Accepted]:
    if (data.file is None) == (not data.url or not data.url.strip()):
        raise HTTPException(status_code=400, detail="send the recording as `file` (a multipart upload) or its "
                                                    "address as `url`: one of the two")
    # A misspelt option (`num_speaker`, `speakers`) would otherwise be dropped without a word and
    # the job run without it.
    if unknown := sorted(set((await request.form()).keys()) - RECOGNIZE_FIELDS):
        raise HTTPException(status_code=400, detail=f"unknown form field {', '.join(map(repr, unknown))[:300]}; the"
                                                    f" fields are {', '.join(sorted(RECOGNIZE_FIELDS))}")
    try:
        options = JobOptions(language=data.language, num_speakers=data.num_speakers,
                             min_speakers=data.min_speakers, max_speakers=data.max_speakers,
                             expected_speakers=data.expected_speakers, multichannel=data.multichannel,
                             vocabulary=data.vocabulary, task=data.task, spelling=data.spelling,
                             redact=data.redact, reference=data.reference)
    except ValidationError as exc:
        raise invalid(exc, whole="form") from exc
    asked = idempotency(idempotency_key, "recognize", data.file.filename if data.file else None, data.url,
                        options.model_dump(exclude_none=True), data.callback_url)
    if (earlier := await earlier_job(state.pool, request_owner(request), asked)) is not None:
        return replayed(earlier)
    # After the replay: a person the first request expected may have been renamed since, and its
    # job is still the answer. (create_job checks the names again as it stores the job.)
    await require_enrolled(state.pool, request_owner(request), options.expected_speakers)
    callback_url = (data.callback_url or "").strip() or None  # blank is left out, as every other field
    callback_url = await checked_target(callback_url, state.settings) if callback_url else None
    callback_secret = new_secret() if callback_url else None
    if data.file is not None:
        filename, stream = clean_filename(data.file.filename), data.file.file
    else:
        stream, name = await fetch_recording(data.url, state.settings)
        filename = clean_filename(name)
    with contextlib.closing(stream):
        return await submit_recording(state, request, stream, filename, options, callback_url, callback_secret, asked)


class RerunOptions(JobOptions):
    """The options to change; a field not among JobOptions' (a misspelt one) is refused, not ignored."""

    model_config = ConfigDict(extra="forbid")


@post("/transcripts/{job_id:int}/rerun", status_code=202, summary="Run a recording again with other options",
      request_max_body_size=SMALL_BODY_BYTES,
      responses=_errors(400, 401, 403, 404, 409, 413, 422, 503, e413="The JSON body is over 1 MiB",
                        e409="The recording is no longer stored, or is still to be redacted (Retry-After), or"
                             " its job asked for redaction and ended in error unredacted and the rerun would"
                             " not redact every kind it asked for",
                        e422="The Idempotency-Key was already used for another request"))
async def rerun(job_id: JobId, state: State, request: Request, data: RerunOptions | None = None,
                idempotency_key: IdempotencyKey = None) -> Response[Accepted]:
    """A new job on the stored audio of job `job_id` (which stays as it is), with its options
    except those given: `{"num_speakers": 4}` when the speakers were miscounted."""
    original = await jobstore.job_audio(state.pool, job_id)
    if not visible(original, request_owner(request)):
        raise NotFoundException(detail=f"no job with id {job_id}")
    try:
        options = rerun_options(original["options"] or {}, data or JobOptions())
    except ValidationError as exc:
        raise invalid(exc, whole="options") from exc
    # What this request asked for, as sent: not the options merged with the original's, which a
    # rename of a person the original expects rewrites (its resend would be another request).
    asked = idempotency(idempotency_key, "rerun", job_id,
                        data.model_dump(include=data.model_fields_set) if data is not None else {})
    if (earlier := await earlier_job(state.pool, request_owner(request), asked)) is not None:
        return replayed(earlier)
    # Only names the request gives: one of the original's forgotten since names nobody, as it
    # does in the original (the page's "Run again" could not otherwise rerun such a job).
    names_given = data is not None and "expected_speakers" in data.model_fields_set
    if names_given:
        await require_enrolled(state.pool, request_owner(request), options.expected_speakers)
    if original["audio_removed_at"] is not None:  # retention's removal may not have reached the store yet
        raise HTTPException(status_code=409, detail=f"job {job_id}'s recording is no longer stored: it was removed"
                                                    f" after AUDIO_RETENTION_DAYS")
    if await jobstore.redaction_pending(state.pool, job_id, processing_too=True):
        # What is stored is still the upload, with what redaction hides audible: a copy of it
        # now would keep it for good (and a rerun without `redact` would serve it).
        still = original["status"] == "processing"
        raise HTTPException(status_code=409, headers={"Retry-After": str(PROCESSING_RETRY_AFTER_S if still
                                                                         else REDACTION_RETRY_AFTER_S)},
                            detail=f"job {job_id} asked for redaction and its recording is not redacted yet"
                                   f" ({'the job is still processing' if still else 'it is being redacted'});"
                                   " rerun it once that is done")
    # Given, `redact` must keep every kind the job asked for: `["email"]` for a job of `["card"]`
    # would copy the upload, redact emails only, and play the card number.
    stored = original["options"] if isinstance(original["options"], dict) else {}
    asked_kinds = set(stored.get("redact") or [])
    dropped = asked_kinds - set(options.redact)
    weakened = data is not None and "redact" in data.model_fields_set and (not options.redact or bool(dropped))
    if (weakened and original["status"] == "error" and original["audio_redacted_at"] is None
            and await redaction_asked(state, job_id, original)):
        # Stopped or failed before its recording was redacted: what is stored is the upload, never
        # played (GET .../audio answers 409). A copy of it in a job told not to redact it, or to
        # redact fewer kinds, would be. A rerun leaving `redact` out keeps the job's (or, where only
        # the transcriber's REDACT redacted it, is redacted by REDACT again).
        kept = f" of every kind it asked for ({', '.join(sorted(asked_kinds))})" if asked_kinds else ""
        raise HTTPException(status_code=409, detail=f"job {job_id} asked for redaction and ended in error (stopped or"
                                                    " failed) before its recording was redacted: a rerun of it must"
                                                    f" keep redaction{kept}, as the recording asked for it; leave out"
                                                    " `redact` to keep the job's, or give the kinds to redact"
                                                    f"{' including those' if asked_kinds else ''}")
    bucket = state.settings.audio_bucket

    def copy(key: str) -> None:
        state.s3.copy_object(bucket, key, CopySource(bucket, upload_key(job_id)))

    # A redacted recording was stored as a WAV: the rerun's name says so, for its playback's type.
    filename = stored_filename(original["filename"], redacted=original["audio_redacted_at"] is not None)
    try:
        # The original's names are kept as they are, a forgotten one too (as above); those the
        # request gives are refused if nobody has them at the insert (forgotten meanwhile).
        new_id = await create_job(state.pool, state.s3, bucket, copy, filename=filename, options=options,
                                  owner=request_owner(request), outbox_wake=state.outbox_wake, idempotency=asked,
                                  keep_unknown_speakers=not names_given, tell_maybe_created=True)
    except HTTPException:
        raise
    except JobMaybeCreated as exc:
        raise maybe_created(exc) from exc
    except S3Error as exc:
        if not is_missing(exc):
            with job_logged(job_id):
                log.warning("could not copy the recording for a rerun: %s", exc.code)
            raise Unavailable(detail=f"the job could not be queued ({exc.code}); try again later") from exc
        raise HTTPException(status_code=409, detail=f"job {job_id}'s recording is no longer stored") from exc
    except Exception as exc:
        with job_logged(job_id):
            log.exception("could not rerun this job")
        raise Unavailable(detail=f"the job could not be queued ({type(exc).__name__}); try again later") from exc
    if new_id is None:  # the same request, sent twice at once, made its job first
        return replayed(await earlier_job(state.pool, request_owner(request), asked))
    with job_logged(new_id):
        log.info("rerun of job %d", job_id)
    return accepted(new_id, filename)


@post("/transcripts/{job_id:int}/cancel", status_code=200, summary="Stop a job that is still processing",
      responses=_errors(400, 401, 403, 404, 409, 503, e409="The job has already ended (done or error)"))
async def cancel(job_id: JobId, state: State, request: Request) -> JobStatus:
    """The job ends at once with `"status": "error"` and `"error": "cancelled"`, keeping the
    segments stored so far; transcript.failed announces it, and every stage stops working on it
    (a chunk already being transcribed is finished and thrown away). Then it can be deleted."""
    async with state.pool.acquire() as conn, conn.transaction():
        # Another key's job is unknown at once, not after waiting on its lock.
        if not visible(await jobstore.job(conn, job_id), request_owner(request)):
            raise NotFoundException(detail=f"no job with id {job_id}")
        job = await jobstore.lock_job(conn, job_id)
        if job is None:  # deleted meanwhile
            raise NotFoundException(detail=f"no job with id {job_id}")
        if not await jobstore.fail(conn, job_id, CANCELLED, "ingest"):
            raise HTTPException(status_code=409, detail=f"job {job_id} has already ended ({job['status']})")
        # Read before the commit: a delete right after it would leave nothing to answer with
        # (a 200 of `null`), and a database gone after it would answer 503 for a cancel that was made.
        document = await status_document(conn, job_id)
    state.outbox_wake.set()
    with job_logged(job_id):
        log.info("cancelled at its owner's request")
    return document


@get("/status/{job_id:int}", summary="State and segments of a job", responses=_errors(400, 401, 403, 404, 503))
async def job_status(job_id: FromPath[int], state: State, request: Request,
                     segments: Annotated[bool, Parameter(description="false: status, stage and percent only, for a "
                                                                     "client following a job")] = True) -> JobStatus:
    if not 1 <= job_id <= MAX_BIGINT:  # no such row can exist; PostgreSQL would refuse the number
        raise NotFoundException(detail=f"no job with id {job_id}")
    document = await status_document(state.pool, job_id, owner=request_owner(request), with_segments=segments)
    if document is None:
        raise NotFoundException(detail=f"no job with id {job_id}")
    return document


@get("/metrics", include_in_schema=False, media_type=CONTENT_TYPE_LATEST)
async def metrics() -> bytes:
    """Prometheus exposition (README: Metrics); open like /healthz."""
    return generate_latest()


@get("/healthz", summary="Liveness", include_in_schema=True)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


READINESS_CHECKS = ("postgres", "rabbitmq", "object_store")


@get("/readyz", summary="Readiness: PostgreSQL, RabbitMQ and the object store answer")
async def readyz(state: State, need: Annotated[str | None, Parameter(
        max_length=100, description="The checks that must pass, comma-separated (default: all); a load balancer "
        "needs only postgres: ingest takes jobs through a RabbitMQ outage and answers /status through an "
        "object-store one")] = None) -> Response[dict[str, Any]]:
    needed = set(READINESS_CHECKS) if need is None else {name.strip() for name in need.split(",")}
    if unknown := needed - set(READINESS_CHECKS):
        raise HTTPException(status_code=400, detail=f"unknown check {', '.join(sorted(unknown))}; the checks are"
                                                    f" {', '.join(READINESS_CHECKS)}")

    async def broker() -> None:
        if state.bus is None:
            raise ConnectionError("not connected yet")
        if state.connection.is_closed or state.bus.channel.is_closed:
            raise ConnectionError("closed")

    async def object_store() -> None:
        await state.s3_probe()
        if not state.buckets_made.is_set():
            raise LookupError("the buckets are not made yet")

    checks = await run_checks({"postgres": state.database_probe, "rabbitmq": broker, "object_store": object_store})
    ready = all(checks[name] == "ok" for name in needed)
    return Response({"status": "ready" if ready else "unavailable", "checks": checks},
                    status_code=200 if ready else 503)


# RabbitMQ and the object store may be down while ingest starts: the server answers meanwhile
# (as through their outages later), and these reach them in the background. What runs on the
# broker waits for it; no request needs it (jobs go out through the outbox, in PostgreSQL). The
# start waits this long for them, so that where they answer at once the server starts ready.
DEPENDENCIES_AWAITED_S = 5.0


async def make_buckets(state: State, settings: Settings) -> None:
    """The buckets made (where missing), however long the store takes to answer; until then
    /readyz reports the object store unavailable."""
    async for attempt in backoff("the object store's buckets not made yet", of_type(Exception)):
        with attempt:
            await asyncio.to_thread(ensure_buckets, state.s3_quick, settings.audio_bucket, settings.inbox_bucket)
    state.buckets_made.set()


def worth_waiting_for_the_broker(exc: BaseException) -> bool:
    return isinstance(exc, Exception) and not isinstance(exc, BrokerMisconfigured)


async def open_broker(state: State, settings: Settings) -> None:
    """The connections to RabbitMQ and the topology declared, however long the broker takes; a
    broker that refuses AMQP_URL's login or vhost for good raises BrokerMisconfigured. The outbox
    publishes on a connection of its own (state.bus): RabbitMQ stops reading a connection that
    publishes during a memory or disk alarm, and would take no acks of the consumers, nor answer
    the queue depth watcher, on it."""
    async for attempt in backoff("RabbitMQ not usable yet", worth_waiting_for_the_broker):
        with attempt:
            if state.connection is None:
                state.connection = await connect(settings, "ingest")
            if state.publishing_connection is None:
                state.publishing_connection = await connect(settings, "ingest.publish")
            state.bus = await open_bus(state.publishing_connection, settings)
    state.broker_open.set()


def stop_on_a_refused_broker(state: State, opening: asyncio.Task) -> None:
    """Ingest exits once RabbitMQ refuses AMQP_URL for good (common.broker.connect), as every
    service does: running on, it would look live and ready and take uploads that never go out.
    Served by __main__, it stops the server (state.stop_serving), which then exits non-zero."""
    if opening.cancelled() or not isinstance(refused := opening.exception(), BrokerMisconfigured):
        return
    log.error("ingest stops: %s", refused)
    state.broker_refused = refused
    if (stop_serving := state.get("stop_serving")) is not None:
        stop_serving()


async def once_broker_open(state: State, work: Callable[[], Awaitable[object]]) -> object:
    await state.broker_open.wait()
    return await work()


async def consume_until_stopping(state: State, inbox: Inbox) -> None:
    """Ingest's consumers, started again whenever they stop (as keep_running does) until the
    process is stopping (common.runner.stopping): they then hand back what they hold as a worker's
    do, spending no delivery attempt, and this returns."""
    stopping = runner.stopping()
    await state.broker_open.wait()
    while True:
        try:
            await inbox.run_consumers(state.connection, state.bus)
            if stopping.is_set():
                return
            log.error("the inbox's and job ends' consumers stopped; starting them again in %g s", RESTART_S)
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise  # this task is being cancelled: ingest is stopping
            # As in common.runner.keep_running: aiormq fails the calls pending on a connection it
            # drops (no heartbeat from the broker) with CancelledError.
            log.exception("the inbox's and job ends' consumers were cancelled from inside (a broker connection"
                          " dropped under them); starting them again in %g s", RESTART_S)
        except Exception:
            log.exception("the inbox's and job ends' consumers failed; starting them again in %g s", RESTART_S)
        await asyncio.sleep(RESTART_S)
        if stopping.is_set():
            return


def no_store_middleware(app: ASGIApp) -> ASGIApp:
    """`Cache-Control: no-store` on every answer that does not say its own (the recording, the
    page and its files, event streams do): a shared cache keeps a 200 that says nothing for a
    while when the request has no Authorization or Cookie header, so it would serve one key's
    transcript, sent with X-API-Key, to anyone, and the same /status over and over. A middleware,
    not the app's cache_control: that one adds a second Cache-Control to a route's own, and
    leaves out error answers."""

    async def add_header(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.get("headers") or []
                if not any(name.lower() == b"cache-control" for name, _ in headers):
                    message = {**message, "headers": [*headers, (b"cache-control", b"no-store")]}
            await send(message)

        await app(scope, receive, send_with_header)

    return add_header


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        # Each upload holds a worker thread for its whole transfer to the object store. asyncio's
        # default pool (CPUs + 4 threads) would let a few slow uploads hold up everything else that
        # runs in a thread: playback, DNS checks of webhook URLs, the inbox scan.
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(
            max_workers=settings.max_concurrent_uploads + min(32, (os.cpu_count() or 1) + 4),
            thread_name_prefix="ingest"))
        state = app.state
        state.settings = settings
        state.s3 = make_client(settings)
        # For store calls made inside a database transaction (common.storage.call_in_transaction).
        state.s3_quick = make_client(settings, timeout_s=QUICK_CLIENT_TIMEOUT_S, connections=8)
        state.s3_probe = ObjectStoreProbe(make_client(settings, timeout_s=CHECK_TIMEOUT_S), settings.audio_bucket)
        state.pool = await create_pool(settings)
        # /readyz asks PostgreSQL on a connection of its own: the requests' pool, all busy (slow
        # searches, waits on a row lock), is not the database being down.
        state.database_probe = DatabaseProbe(settings.database_url.get_secret_value())
        await apply_migrations(state.pool)
        state.buckets_made, state.broker_open = asyncio.Event(), asyncio.Event()
        state.connection = state.publishing_connection = state.bus = None
        # One process may run the app more than once (the tests do): this run is not stopping.
        runner.stopping().clear()
        state.outbox_wake = asyncio.Event()
        # GET /search embeds queries with the embedder's model, whose vectors it searches.
        http = aiohttp.ClientSession()
        state.query_embedder = await asyncio.to_thread(make_embedder, settings, http)
        state.reindexer = Reindexer(state.pool, *state.query_embedder)
        state.wakeups = Wakeups()
        inbox = Inbox(settings, state.pool, state.s3, state.outbox_wake, s3_quick=state.s3_quick)
        queues = watched_queues(INBOX_EVENTS_QUEUE, RESULTS_QUEUE)
        consumers = asyncio.create_task(consume_until_stopping(state, inbox))
        state.broker_refused = None
        opening = asyncio.create_task(open_broker(state, settings))
        reaching = {asyncio.create_task(make_buckets(state, settings)), opening}
        await asyncio.wait(reaching, timeout=DEPENDENCIES_AWAITED_S)
        tasks = [consumers, *reaching,
                 asyncio.create_task(keep_running("the outbox flusher", lambda: once_broker_open(
                     state, lambda: run_outbox_flusher(state.pool, state.bus, state.outbox_wake,
                                                         settings.event_refused_for_s)))),
                 asyncio.create_task(keep_running("the inbox scanner", inbox.run_scanner)),
                 asyncio.create_task(keep_running("the queue depth watcher", lambda: once_broker_open(
                     state, lambda: watch_queue_depths(state.connection, queues)))),
                 asyncio.create_task(keep_running("the event streams' wake-ups", lambda: once_broker_open(
                     state, lambda: state.wakeups.run(state.connection)))),
                 asyncio.create_task(run_retention(state.pool, state.s3, settings, state.s3_quick)),
                 asyncio.create_task(run_orphan_sweep(state.pool, state.s3, settings.audio_bucket)),
                 # What a change of enrolled speakers left to match when its request was cut off.
                 asyncio.create_task(run_matching_sweep(state)),
                 asyncio.create_task(run_corrections_embedder(state.pool, *state.query_embedder, state.outbox_wake))]
        waiting = "" if all(task.done() for task in reaching) else " (RabbitMQ or the object store not reached yet)"
        try:
            if opening.done() and isinstance(refused := opening.exception(), BrokerMisconfigured):
                raise refused  # the start fails with the reason
            opening.add_done_callback(lambda task: stop_on_a_refused_broker(state, task))
            log.info("ingest serving on %s:%d%s", settings.api_host, settings.api_port, waiting)
            yield
        finally:
            # As a worker stops (common.runner): its consumers take no more messages, let those in
            # hand finish for up to SHUTDOWN_GRACE_S, and hand the rest back as fresh copies.
            runner.stopping().set()
            if state.broker_open.is_set():
                await asyncio.wait({consumers}, timeout=settings.shutdown_grace_s + 5)
            if state.reindexer.task is not None:
                tasks.append(state.reindexer.task)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for connection in (state.connection, state.publishing_connection):
                if connection is not None:
                    await connection.close()
            await state.pool.close()
            state.database_probe.close()
            await http.close()
            state.s3_probe.close()

    return Litestar(
        route_handlers=[recognize, rerun, cancel, job_status, healthz, readyz, metrics, *TRANSCRIPT_ROUTES,
                        *CORRECTION_ROUTES, *SEARCH_ROUTES, *REINDEX_ROUTES, *USAGE_ROUTES, *OPENAI_ROUTES,
                        *SPEAKER_ROUTES, *WEBHOOK_ROUTES, *LIVE_ROUTES, *PLAYBACK_ROUTES, *PAGE_ROUTES],
        lifespan=[lifespan],
        middleware=[http_metrics_middleware, no_store_middleware,  # metrics first: 401s count
                    api_key_middleware(settings),
                    upload_limit_middleware(settings.max_concurrent_uploads), small_body_middleware,
                    event_stream_limit_middleware(settings.max_event_streams)],
        # Outside every route's middleware: a browser's preflight (OPTIONS, no API key) is
        # answered before the key check, and a 401 carries the headers the page needs to read it.
        cors_config=CORSConfig(allow_origins=settings.cors_origin_list, expose_headers=["Retry-After"])
        if settings.cors_origin_list else None,
        exception_handlers=EXCEPTION_HANDLERS,
        after_exception=[log_unexpected],
        logging_config=None,  # keep the project's log format (common.logs)
        multipart_form_part_limit=UPLOAD_FORM_PARTS,  # /speakers' form too (each part is held until read)
        # `error` appears in a status document only when the job failed.
        plugins=[PydanticPlugin(exclude_none=True)],
        # The limit is enforced while the body streams in, not after it was stored. Routes whose
        # bodies are read into memory whole set their own, far lower.
        request_max_body_size=settings.max_upload_bytes + 1024 * 1024,
        openapi_config=OpenAPIConfig(
            title="stt-pipeline",
            version="0.1.0",
            description="Upload a recording; get back who spoke when, what they said, and embeddings.",
            path="/docs",
            render_plugins=[SwaggerRenderPlugin(path="/")],
        ),
    )
