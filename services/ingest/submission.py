"""Taking a recording as a job, the same way whichever endpoint it came through (POST /recognize
with a file or a url, POST /v1/audio/transcriptions): the 202 answer, a replay of it for a
request sent again with its Idempotency-Key."""

from __future__ import annotations

import asyncio
import logging

from litestar import Request
from litestar.datastructures import State
from litestar.exceptions import HTTPException
from litestar.response import Response
from pydantic import BaseModel

from common.audio import AudioTooLong, UndecodableAudio, probe_audio
from common.logs import job_logged
from common.messages import JobOptions
from common.storage import upload_stream
from services.ingest.admission import checked_size
from services.ingest.auth import request_owner
from services.ingest.jobs import Idempotency, JobMaybeCreated, create_job, earlier_job
from services.ingest.webhooks import add_callback

log = logging.getLogger(__name__)


class Accepted(BaseModel):
    status: str = "processing"
    id: int
    filename: str
    # With callback_url: the secret that signs its deliveries (shown this once).
    callback_secret: str | None = None


class Unavailable(HTTPException):
    """The job could not be stored or queued; nothing was created, so the same request may come
    again (the CLI sends it again after Retry-After). maybe_created's alone names a job that may
    have been created."""

    status_code = 503

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, headers={"Retry-After": "5", **(kwargs.pop("headers", None) or {})}, **kwargs)


def maybe_created(exc: JobMaybeCreated) -> Unavailable:
    """The 503 of a job whose COMMIT failed as seen from here, with the database away since: unlike
    any other, something may have been created (and runs)."""
    job_id = exc.job_id
    cause = type(exc.__cause__).__name__ if exc.__cause__ is not None else "the database did not answer"
    return Unavailable(detail=f"the job could not be confirmed ({cause}): job {job_id} may have been created and"
                              f" then runs; check GET /status/{job_id} before sending the request again (sent"
                              f" again with the same Idempotency-Key, it gets that job if it was created)")


def accepted(job_id: int, filename: str, callback_secret: str | None = None) -> Response[Accepted]:
    return Response(Accepted(id=job_id, filename=filename, callback_secret=callback_secret), status_code=202)


def replayed(job) -> Response[Accepted]:
    """The answer the request with the same Idempotency-Key got: its job, made once. None: that
    job was deleted between this request's insert meeting it and reading it (503: send it again)."""
    if job is None:
        raise Unavailable(detail="the same request made a job that was deleted just now; send it again")
    with job_logged(job["id"]):
        log.info("the same request again (Idempotency-Key): no new job")
    answer = accepted(job["id"], job["filename"], job["callback_secret"])
    answer.headers["Idempotent-Replayed"] = "true"
    return answer


async def submit_recording(state: State, request: Request, stream, filename: str, options: JobOptions,
                           callback_url: str | None, callback_secret: str | None,
                           asked: Idempotency | None, speakers_field: str = "expected_speakers") -> Response[Accepted]:
    """Take a recording's stream (an upload or a download) as a job: its size within
    MAX_UPLOAD_MB, audio that decodes, within MAX_AUDIO_HOURS by its header (the diarizer checks
    what decodes), then stored and queued (services.ingest.jobs.create_job). `speakers_field` is
    what the request called the expected speakers, for the 400 of one forgotten meanwhile."""
    size = checked_size(stream, state.settings.max_upload_bytes, empty="the recording is empty",
                        too_big=f"the file exceeds MAX_UPLOAD_MB ({state.settings.max_upload_mb} MB)")

    async def add_callback_url(conn, job_id: int) -> None:
        await add_callback(conn, job_id, request_owner(request), callback_url, callback_secret)

    try:
        await asyncio.to_thread(probe_audio, stream, state.settings.max_audio_hours * 3600,
                                separate_channels=options.multichannel)
    except UndecodableAudio as exc:
        detail = f"{filename!r} is not audio this service can decode: {exc}"
        raise HTTPException(status_code=415, detail=detail) from exc
    except AudioTooLong as exc:
        raise HTTPException(status_code=413, detail=f"{filename!r} is refused: {exc} (MAX_AUDIO_HOURS)") from exc
    stream.seek(0)
    try:
        job_id = await create_job(
            state.pool, state.s3, state.settings.audio_bucket,
            lambda key: upload_stream(state.s3, state.settings.audio_bucket, key, stream),
            filename=filename, options=options, owner=request_owner(request), outbox_wake=state.outbox_wake,
            also=add_callback_url if callback_url else None, idempotency=asked, speakers_field=speakers_field,
            tell_maybe_created=True)
    except HTTPException:
        raise  # create_job's own answer: an expected speaker forgotten while the recording was stored
    except JobMaybeCreated as exc:
        raise maybe_created(exc) from exc
    except Exception as exc:
        log.exception("could not submit %r", filename)
        raise Unavailable(detail=f"the job could not be queued ({type(exc).__name__}); try again later") from exc
    if job_id is None:  # the same request, sent twice at once, made its job first
        return replayed(await earlier_job(state.pool, request_owner(request), asked))
    with job_logged(job_id):
        log.info("accepted %r (%d bytes)", filename, size)
    return accepted(job_id, filename, callback_secret)
