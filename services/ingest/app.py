"""The ingest HTTP API (Litestar): POST /recognize, GET /status/{id}, health, OpenAPI."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from litestar import Litestar, get, post
from litestar.datastructures import State, UploadFile
from litestar.enums import RequestEncodingType
from litestar.exceptions import HTTPException, NotFoundException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.params import Body
from litestar.plugins.pydantic import PydanticPlugin
from litestar.response import Response
from pydantic import BaseModel, ValidationError

from common.audio import UndecodableAudio, probe_audio
from common.broker import connect, open_bus
from common.db import apply_migrations, create_pool
from common.logs import current_job
from common.messages import JobOptions
from common.settings import Settings, get_settings
from common.storage import ensure_buckets, make_client
from services.ingest.inbox import Inbox
from services.ingest.jobs import create_upload_job, status_document

log = logging.getLogger("services.ingest")


@dataclass
class RecognizeForm:
    file: UploadFile
    language: str | None = None
    num_speakers: int | None = None
    min_speakers: int | None = None
    max_speakers: int | None = None


class Accepted(BaseModel):
    status: str = "processing"
    id: int
    filename: str


class StatusSegment(BaseModel):
    speaker: str
    start_ts: float
    end_ts: float
    text: str


class JobStatus(BaseModel):
    status: str
    segments: list[StatusSegment]
    error: str | None = None


class Unavailable(HTTPException):
    status_code = 503


@post("/recognize", status_code=202, summary="Submit a recording for transcription")
async def recognize(
    data: Annotated[RecognizeForm, Body(media_type=RequestEncodingType.MULTI_PART)], state: State
) -> Accepted:
    upload = data.file
    filename = upload.filename or "audio"
    stream = upload.file
    stream.seek(0, 2)
    size = stream.tell()
    stream.seek(0)
    if size == 0:
        raise HTTPException(status_code=400, detail="the uploaded file is empty")
    if size > state.settings.max_upload_bytes:
        limit = state.settings.max_upload_mb
        raise HTTPException(status_code=413, detail=f"the file exceeds MAX_UPLOAD_MB ({limit} MB)")
    try:
        options = JobOptions(language=data.language or None, num_speakers=data.num_speakers,
                             min_speakers=data.min_speakers, max_speakers=data.max_speakers)
    except ValidationError as exc:
        raise HTTPException(status_code=400, detail="; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'form'}: {e['msg']}" for e in exc.errors())) from exc
    try:
        await asyncio.to_thread(probe_audio, stream)
    except UndecodableAudio as exc:
        detail = f"{filename!r} is not audio this service can decode: {exc}"
        raise HTTPException(status_code=415, detail=detail) from exc
    stream.seek(0)
    try:
        job_id = await create_upload_job(state.pool, state.bus, state.s3, state.settings.audio_bucket,
                                         filename, options, stream)
    except Exception as exc:
        log.exception("could not submit %r", filename)
        raise Unavailable(detail=f"the job could not be queued ({type(exc).__name__}); try again later") from exc
    token = current_job.set(job_id)
    log.info("accepted %r (%d bytes)", filename, size)
    current_job.reset(token)
    return Accepted(id=job_id, filename=filename)


@get("/status/{job_id:int}", summary="State and segments of a job")
async def job_status(job_id: int, state: State) -> JobStatus:
    document = await status_document(state.pool, job_id)
    if document is None:
        raise NotFoundException(detail=f"no job with id {job_id}")
    return JobStatus(**document)


@get("/healthz", summary="Liveness", include_in_schema=True)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz", summary="Readiness: PostgreSQL, RabbitMQ and the object store answer")
async def readyz(state: State) -> Response[dict[str, Any]]:
    checks: dict[str, str] = {}

    async def check(name: str, probe) -> None:
        try:
            await asyncio.wait_for(probe(), timeout=3)
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"unavailable ({type(exc).__name__})"

    async def database() -> None:
        await state.pool.fetchval("SELECT 1")

    async def broker() -> None:
        if state.connection.is_closed or state.bus.channel.is_closed:
            raise ConnectionError("closed")

    async def object_store() -> None:
        if not await asyncio.to_thread(state.s3.bucket_exists, state.settings.audio_bucket):
            raise LookupError("bucket missing")

    await asyncio.gather(check("postgres", database), check("rabbitmq", broker), check("object_store", object_store))
    ready = all(v == "ok" for v in checks.values())
    return Response({"status": "ready" if ready else "unavailable", "checks": checks},
                    status_code=200 if ready else 503)


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        state = app.state
        state.settings = settings
        state.s3 = make_client(settings)
        await asyncio.to_thread(ensure_buckets, state.s3, settings.audio_bucket, settings.inbox_bucket)
        state.pool = await create_pool(settings)
        await apply_migrations(state.pool)
        state.connection = await connect(settings, "ingest")
        state.bus = await open_bus(state.connection, settings)
        inbox = Inbox(settings, state.pool, state.bus, state.s3)
        tasks = [asyncio.create_task(inbox.run_scanner()),
                 asyncio.create_task(inbox.run_consumers(state.connection))]
        log.info("ingest ready on %s:%d", settings.api_host, settings.api_port)
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await state.connection.close()
            await state.pool.close()

    return Litestar(
        route_handlers=[recognize, job_status, healthz, readyz],
        lifespan=[lifespan],
        logging_config=None,  # keep the project's log format (common.logs)
        # `error` appears in a status document only when the job failed.
        plugins=[PydanticPlugin(exclude_none=True)],
        # The limit is enforced while the body streams in, not after it was stored.
        request_max_body_size=settings.max_upload_bytes + 1024 * 1024,
        openapi_config=OpenAPIConfig(
            title="stt-pipeline",
            version="0.1.0",
            description="Upload a recording; get back who spoke when, what they said, and embeddings.",
            path="/docs",
            render_plugins=[SwaggerRenderPlugin(path="/")],
        ),
    )
