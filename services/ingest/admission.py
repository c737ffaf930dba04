"""A bound on uploads in progress (MAX_CONCURRENT_UPLOADS): each one spools to disk while it
streams in, so without a bound a burst of large uploads could fill the disk. Past the bound a
request is answered 503 with Retry-After before its body is read. And the size check every
uploaded file gets once it is in."""

from __future__ import annotations

import json
from typing import BinaryIO

from litestar.exceptions import HTTPException
from litestar.types import ASGIApp, Receive, Scope, Send

from services.ingest.errors import error_body

# Recordings (the OpenAI-compatible ones too), and speakers' enrolment samples.
UPLOAD_PATHS = ("/recognize", "/v1/audio/transcriptions", "/v1/audio/translations", "/speakers")
RETRY_AFTER_S = 5
# The scope key of a function a handler may call once its upload is stored and its spooled file
# closed, to give up its place before it answers (the OpenAI-compatible endpoints wait minutes).
RELEASE_UPLOAD = "stt.release_upload"


def upload_limit_middleware(limit: int):
    in_progress = 0

    def wrap(app: ASGIApp) -> ASGIApp:
        async def admit(scope: Scope, receive: Receive, send: Send) -> None:
            nonlocal in_progress
            if scope["type"] != "http" or scope["path"] not in UPLOAD_PATHS or scope["method"] != "POST":
                await app(scope, receive, send)
                return
            if in_progress >= limit:
                body = json.dumps(error_body(scope["path"], 503, f"{in_progress} uploads are in progress, the most "
                                             f"this server takes at once; try again in {RETRY_AFTER_S} s")).encode()
                await send({"type": "http.response.start", "status": 503, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"retry-after", str(RETRY_AFTER_S).encode()), (b"connection", b"close")]})
                await send({"type": "http.response.body", "body": body})
                return
            in_progress += 1
            released = False

            def release() -> None:
                nonlocal in_progress, released
                if not released:
                    released, in_progress = True, in_progress - 1

            scope[RELEASE_UPLOAD] = release
            try:
                await app(scope, receive, send)
            finally:
                release()

        return admit

    return wrap


def release_upload(scope: Scope) -> None:
    """Give up the request's place among MAX_CONCURRENT_UPLOADS (its upload is in the store)."""
    scope.get(RELEASE_UPLOAD, lambda: None)()


def checked_size(stream: BinaryIO, max_bytes: int, *, empty: str, too_big: str) -> int:
    """The uploaded file's size, the stream rewound: 400 with `empty`, or 413 with `too_big`."""
    stream.seek(0, 2)
    size = stream.tell()
    stream.seek(0)
    if size == 0:
        raise HTTPException(status_code=400, detail=empty)
    if size > max_bytes:
        raise HTTPException(status_code=413, detail=too_big)
    return size
