"""GET /transcripts/{id}/audio: the uploaded recording as it was sent, with HTTP Range support, so
a browser's audio element can seek to any segment without downloading the whole file. Every piece
is read from the version of the object the answer began with (its ETag): a recording replaced
meanwhile (by its redacted copy) ends the answer, rather than splicing two files into one."""

from __future__ import annotations

import asyncio
import logging
import mimetypes
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime

from litestar import Request, Response, get, head
from litestar.datastructures import State
from litestar.exceptions import HTTPException, NotFoundException
from litestar.response import Stream
from minio import Minio
from minio.datatypes import Object
from minio.error import S3Error, ServerError

from common import jobstore
from common.logs import job_logged
from common.storage import STORAGE_UNAVAILABLE, is_missing, read_range
from services.ingest.auth import request_owner
from services.ingest.errors import error_responses
from services.ingest.redacted_audio import REDACTION_RETRY_AFTER_S
from services.ingest.transcripts import JobId, content_disposition, stored_filename, visible

log = logging.getLogger(__name__)

PIECE_BYTES = 1024 * 1024
# Only these are served as what the name says: an upload named x.html or x.svg is not a page.
PLAYABLE = ("audio/", "video/")
# Not every system's mime.types knows these; a browser needs the type to play the file.
AUDIO_TYPES = {".flac": "audio/flac", ".wav": "audio/wav", ".mp3": "audio/mpeg", ".m4a": "audio/mp4",
               ".aac": "audio/aac", ".ogg": "audio/ogg", ".oga": "audio/ogg", ".opus": "audio/ogg",
               ".webm": "audio/webm", ".mp4": "video/mp4", ".mkv": "video/x-matroska"}
RANGE = re.compile(r"bytes=[ \t]*(\d*)[ \t]*-[ \t]*(\d*)[ \t]*", re.IGNORECASE)


class RangeNotSatisfiable(HTTPException):
    status_code = 416


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a single `Range: bytes=...` within `size`; None for the whole file,
    also for a header this does not serve (another unit, several ranges, a malformed or inverted
    one), which HTTP lets a server ignore (RFC 9110, 14.2). 416 for a range past the end."""
    match = RANGE.fullmatch(header.strip()) if header else None
    if match is None:
        return None
    try:
        start, end = (int(match[1]) if match[1] else None), (int(match[2]) if match[2] else None)
    except ValueError:  # a number of more digits than int() reads (4300): ignored too, not a 500
        return None
    if (start is None and end is None) or (start is not None and end is not None and end < start):
        return None
    if start is None:
        first, last = max(0, size - end), size - 1
    else:
        first = start
        last = min(end, size - 1) if end is not None else size - 1
    if first >= size or last < first:
        raise RangeNotSatisfiable(detail=f"the recording has {size} bytes",
                                  headers={"Content-Range": f"bytes */{size}"})
    return first, last


class RecordingChanged(RuntimeError):
    """The stored recording is no longer the version the answer began with."""


class AnswerBrokenOff(asyncio.CancelledError):
    """Ends a body already begun, short of its Content-Length. An ordinary exception there would
    reach the server as "Exception in ASGI application" with a traceback (Litestar re-raises it
    once the response has started; an early end of the body fails the same way, at h11's "too
    little data"). A cancellation of the body's task instead ends the task group of Litestar's
    streaming response (anyio cancels the group, no error recorded): the server then closes the
    connection, logging one line ("ASGI callable returned without completing response.")."""


def media_type(filename: str) -> str:
    """The type of the stored recording from its name: audio and video types only, anything else
    application/octet-stream (with nosniff, a browser does not render an upload as a page)."""
    suffix = ("." + filename.rsplit(".", 1)[-1].lower()) if "." in filename else ""
    guessed = AUDIO_TYPES.get(suffix) or mimetypes.guess_type(filename)[0]
    return guessed if guessed and guessed.lower().startswith(PLAYABLE) else "application/octet-stream"


def http_date(moment: datetime) -> str:
    return format_datetime(moment.astimezone(UTC), usegmt=True)


def if_range_holds(header: str | None, etag: str, last_modified: datetime | None) -> bool:
    """Whether `If-Range` lets a Range be served (RFC 9110, 13.1.5): no header, the ETag itself
    (a strong comparison: a weak tag never matches), or the date of Last-Modified exactly."""
    if header is None:
        return True
    value = header.strip()
    if value.startswith(("\"", "W/")):
        return bool(etag) and value == f'"{etag}"'
    try:
        date = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):  # a year past what a datetime holds: not a date
        return False
    return (last_modified is not None and date.tzinfo is not None
            and date == last_modified.astimezone(UTC).replace(microsecond=0))


def none_match(header: str | None, etag: str) -> bool:
    """Whether `If-None-Match` names this version (RFC 9110, 13.1.2: `*`, or one of a list of
    tags compared weakly), so that the browser's own copy is still the recording."""
    if header is None or not etag:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in header.split(",")]
    return "*" in tags or f'"{etag}"' in tags


def _changed(exc: S3Error) -> bool:
    return exc.code == "PreconditionFailed" or getattr(exc.response, "status", None) == 412


def _read(s3: Minio, bucket: str, key: str, etag: str, offset: int, last: int) -> bytes:
    """Bytes `offset`.. of the object (a piece at most, up to `last`), of the version whose ETag is `etag`."""
    try:
        piece = read_range(s3, bucket, key, offset, min(PIECE_BYTES, last - offset + 1), match_etag=etag or None)
    except S3Error as exc:
        if _changed(exc):
            raise RecordingChanged(f"{key} was replaced (its ETag is no longer {etag})") from exc
        raise
    if not piece:
        raise RecordingChanged(f"{key} ended at byte {offset}, before {last + 1}")
    return piece


def _why_broken_off(exc: BaseException) -> str:
    if isinstance(exc, RecordingChanged):
        return "the recording was replaced meanwhile"
    if isinstance(exc, S3Error):
        return ("the recording was removed meanwhile" if is_missing(exc)
                else f"the object store answered {exc.code}")
    if isinstance(exc, ServerError):
        return str(exc)  # what it answered: SlowDown, a proxy's 502...
    return f"the object store could not be reached ({type(exc).__name__})"


async def _pieces(state: State, job_id: int, key: str, etag: str, opening: bytes, first: int,
                  last: int) -> AsyncIterator[bytes]:
    yield opening
    offset = first + len(opening)
    while offset <= last:
        try:
            piece = await asyncio.to_thread(_read, state.s3, state.settings.audio_bucket, key, etag, offset, last)
        except (RecordingChanged, S3Error, *STORAGE_UNAVAILABLE) as exc:
            # Replaced (by its redacted copy) or rewritten since the answer began: what is left of
            # the body would be another file's bytes. Removed (DELETE, retention), or the store
            # gone or answering with an error of its own: there is no more of it. The status went
            # out with the first piece: breaking off the answer (shorter than its Content-Length)
            # tells the player to ask again; this line says why, and no traceback.
            with job_logged(job_id):
                log.info("playback broken off at byte %d: %s", offset, _why_broken_off(exc))
            raise AnswerBrokenOff(str(exc)) from None
        yield piece
        offset += len(piece)


async def _opening(state: State, key: str, range_header: str | None, if_range: str | None,
                   if_none_match: str | None, read: bool = True) -> tuple[Object, tuple[int, int] | None, bytes | None]:
    """The object's stat, the span to serve (None: the whole file) and its first piece, read from
    the version stated (None: the version `If-None-Match` names, nothing to send; b"" when not
    `read`, for HEAD); a recording replaced between the two is stated again (twice at most)."""
    tries = 3
    while True:
        stat = await asyncio.to_thread(state.s3.stat_object, state.settings.audio_bucket, key)
        if none_match(if_none_match, stat.etag or ""):
            return stat, None, None
        size = stat.size or 0
        span = byte_range(range_header if if_range_holds(if_range, stat.etag or "", stat.last_modified) else None,
                          size)
        first, last = span or (0, size - 1)
        try:
            opening = (await asyncio.to_thread(_read, state.s3, state.settings.audio_bucket, key, stat.etag or "",
                                               first, last) if size and read else b"")
        except RecordingChanged:
            tries -= 1
            if not tries:
                raise
            continue
        return stat, span, opening


async def redaction_asked(state: State, job_id: int, job) -> bool:
    """The job asked for redaction (its `redact` option; options that cannot be read count as
    asking), or words of it were redacted (the transcriber's REDACT). What playback refuses a job
    ended in error unredacted for, and what a rerun of such a job must keep (POST .../rerun)."""
    options = job["options"]
    if not isinstance(options, dict):
        return options is not None
    redact = options.get("redact")
    if redact:
        return True
    return bool(await jobstore.redacted_word_times(state.pool, job_id))


def _not_redacted(job_id: int, job) -> str:
    ended = "was stopped" if job["error"] == "cancelled" else "failed"
    return (f"the recording of job {job_id} is not played: the job asked for redaction, and it {ended} before its"
            " recording was redacted (only a job that ends done has it redacted). Its transcript is kept; run it"
            " again to have the recording redacted, or delete it")


@get("/transcripts/{job_id:int}/audio", summary="The job's recording as uploaded (supports Range)",
     responses=error_responses(400, 401, 403, 404, 409, 410, 416, 503,
                               e404="No such job (for this key), or its audio is gone",
                               e409="The job asked for redaction and ended in error (stopped or failed) before"
                                    " its recording was redacted: the upload is never served",
                               e410="The recording was removed (AUDIO_RETENTION_DAYS); the transcript is kept",
                               e503="The object store does not answer, or the recording is still being redacted"
                                    " (Retry-After)"))
async def job_audio(job_id: JobId, state: State, request: Request) -> Response:
    return await _recording(job_id, state, request, headers_only=False)


# HEAD wherever GET works (RFC 9110, 9.1: curl -I, a download tool asking the size first): the
# same checks and headers as GET (Range, If-Range and If-None-Match included), and nothing of the
# recording read. Not listed in the OpenAPI document, as no GET's implied HEAD is.
@head("/transcripts/{job_id:int}/audio", include_in_schema=False, name="job_audio/head")
async def job_audio_head(job_id: JobId, state: State, request: Request) -> Response[None]:
    return await _recording(job_id, state, request, headers_only=True)


async def _recording(job_id: int, state: State, request: Request, headers_only: bool) -> Response:
    job = await jobstore.job_audio(state.pool, job_id)
    if not visible(job, request_owner(request)) or not job["audio_key"]:
        raise NotFoundException(detail=f"no job with id {job_id}")
    if job["audio_removed_at"] is not None:
        raise HTTPException(status_code=410, detail=f"the recording of job {job_id} was removed on"
                            f" {job['audio_removed_at']:%Y-%m-%d} (AUDIO_RETENTION_DAYS); its transcript is kept")
    if job["redaction_pending"]:
        # Until ingest's job-end step has written the redacted copy, what is stored is the upload
        # with what was redacted audible: not served, however soon after transcript.completed.
        raise HTTPException(status_code=503, headers={"Retry-After": str(REDACTION_RETRY_AFTER_S),
                                                      "Cache-Control": "no-store"},
                            detail=f"the recording of job {job_id} is being redacted; try again in a few seconds")
    if job["status"] == "error" and job["audio_redacted_at"] is None and await redaction_asked(state, job_id, job):
        # Only a job that ends done has its recording redacted: one stopped or failed keeps the
        # upload, with what its transcript shows as [CARD] or [PHONE] audible, for good.
        raise HTTPException(status_code=409, headers={"Cache-Control": "no-store"},
                            detail=_not_redacted(job_id, job))
    try:
        # Read before answering: a recording removed meanwhile (DELETE, retention) is then a 404,
        # not a 200 whose body breaks off.
        stat, span, opening = await _opening(state, job["audio_key"], request.headers.get("range"),
                                             request.headers.get("if-range"), request.headers.get("if-none-match"),
                                             read=not headers_only)
    except RecordingChanged as exc:
        raise HTTPException(status_code=503, headers={"Retry-After": "1"},
                            detail="the recording was being replaced; try again") from exc
    except S3Error as exc:
        if is_missing(exc):
            raise NotFoundException(detail=f"the audio of job {job_id} is no longer stored") from exc
        # The store refused the read (a 4xx of its own). One busy or down (SlowDown, a server
        # still starting) is a ServerError, answered 503 by error_handlers as any outage of it.
        raise HTTPException(status_code=503, headers={"Retry-After": "5"}, detail="the object store could not serve"
                            f" the recording ({exc.code}); try again later") from exc
    size = stat.size or 0
    first, last = span or (0, size - 1)
    filename = stored_filename(job["filename"], redacted=job["audio_redacted_at"] is not None)
    # Someone's recording: kept by no shared cache, and checked with the ETag before a browser
    # plays its own copy again (it changes when the recording is redacted).
    headers = {"Cache-Control": "private, no-cache"}
    if stat.etag:
        headers["ETag"] = f'"{stat.etag}"'
    if stat.last_modified is not None:
        headers["Last-Modified"] = http_date(stat.last_modified)
    if opening is None:
        return Response(content=b"", status_code=304, headers=headers)
    headers |= {"Accept-Ranges": "bytes", "Content-Length": str(max(0, last - first + 1)),
                "Content-Disposition": content_disposition(filename).replace("attachment", "inline", 1),
                "X-Content-Type-Options": "nosniff"}
    if span:
        headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    if headers_only:  # the Content-Length set above stays (the server sends no body for HEAD)
        return Response(content=b"", status_code=206 if span else 200, media_type=media_type(filename),
                        headers=headers)
    return Stream(_pieces(state, job_id, job["audio_key"], stat.etag or "", opening, first, last),
                  status_code=206 if span else 200, media_type=media_type(filename), headers=headers)


PLAYBACK_ROUTES = [job_audio, job_audio_head]
