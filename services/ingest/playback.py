"""GET /transcripts/{id}/audio: the uploaded recording as it was sent, with HTTP Range support, so
a browser's audio element can seek to any segment without downloading the whole file."""

from __future__ import annotations

import asyncio
import mimetypes
import re
from collections.abc import AsyncIterator

from litestar import Request, get
from litestar.datastructures import State
from litestar.exceptions import HTTPException, NotFoundException
from litestar.response import Stream
from minio.error import S3Error

from common import jobstore
from common.storage import is_missing, read_range
from services.ingest.auth import request_owner
from services.ingest.errors import error_responses
from services.ingest.transcripts import JobId, content_disposition, stored_filename, visible

PIECE_BYTES = 1024 * 1024
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
    if match is None or match[1] == match[2] == "" or (match[1] and match[2] and int(match[2]) < int(match[1])):
        return None
    if match[1] == "":
        first, last = max(0, size - int(match[2])), size - 1
    else:
        first = int(match[1])
        last = min(int(match[2]), size - 1) if match[2] else size - 1
    if first >= size or last < first:
        raise RangeNotSatisfiable(detail=f"the recording has {size} bytes",
                                  headers={"Content-Range": f"bytes */{size}"})
    return first, last


def _read(state: State, key: str, offset: int, last: int) -> bytes:
    return read_range(state.s3, state.settings.audio_bucket, key, offset, min(PIECE_BYTES, last - offset + 1))


async def _pieces(state: State, key: str, opening: bytes, first: int, last: int) -> AsyncIterator[bytes]:
    yield opening
    offset = first + len(opening)
    while offset <= last:
        piece = await asyncio.to_thread(_read, state, key, offset, last)
        yield piece
        offset += len(piece)


@get("/transcripts/{job_id:int}/audio", summary="The job's recording as uploaded (supports Range)",
     responses=error_responses(400, 401, 403, 404, 410, 416, 503,
                               e404="No such job (for this key), or its audio is gone",
                               e410="The recording was removed (AUDIO_RETENTION_DAYS); the transcript is kept"))
async def job_audio(job_id: JobId, state: State, request: Request) -> Stream:
    job = await jobstore.job_audio(state.pool, job_id)
    if not visible(job, request_owner(request)) or not job["audio_key"]:
        raise NotFoundException(detail=f"no job with id {job_id}")
    if job["audio_removed_at"] is not None:
        raise HTTPException(status_code=410, detail=f"the recording of job {job_id} was removed on"
                            f" {job['audio_removed_at']:%Y-%m-%d} (AUDIO_RETENTION_DAYS); its transcript is kept")
    try:
        stat = await asyncio.to_thread(state.s3.stat_object, state.settings.audio_bucket, job["audio_key"])
        size = stat.size or 0
        span = byte_range(request.headers.get("range"), size)
        first, last = span or (0, size - 1)
        # Read before answering: a recording removed meanwhile (DELETE, retention) is then a 404,
        # not a 200 whose body breaks off.
        opening = await asyncio.to_thread(_read, state, job["audio_key"], first, last) if size else b""
    except S3Error as exc:
        if is_missing(exc):
            raise NotFoundException(detail=f"the audio of job {job_id} is no longer stored") from exc
        # The store answered with an error of its own (SlowDown, ServiceUnavailable, a server
        # still starting): a passing state, as an outage of it is.
        raise HTTPException(status_code=503, headers={"Retry-After": "5"}, detail="the object store could not serve"
                            f" the recording ({exc.code}); try again later") from exc
    filename = stored_filename(job["filename"], redacted=job["audio_redacted_at"] is not None)
    headers = {"Accept-Ranges": "bytes", "Content-Length": str(max(0, last - first + 1)),
               "Content-Disposition": content_disposition(filename).replace("attachment", "inline", 1)}
    if span:
        headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    suffix = ("." + filename.rsplit(".", 1)[-1].lower()) if "." in filename else ""
    media_type = AUDIO_TYPES.get(suffix) or mimetypes.guess_type(filename)[0] or "application/octet-stream"
    return Stream(_pieces(state, job["audio_key"], opening, first, last), status_code=206 if span else 200,
                  media_type=media_type, headers=headers)


PLAYBACK_ROUTES = [job_audio]
