"""A bound on uploads in progress (MAX_CONCURRENT_UPLOADS): each one spools to disk while it
streams in, so without a bound a burst of large uploads could fill the disk. Past the bound a
request is answered 503 with Retry-After before its body is read. And the size check every
uploaded file gets once it is in."""

from __future__ import annotations

import json
from typing import BinaryIO

from litestar.exceptions import HTTPException
from litestar.types import ASGIApp, Receive, Scope, Send

# Recordings (the OpenAI-compatible ones too: their spooled file lasts until they answer), and
# speakers' enrolment samples.
UPLOAD_PATHS = ("/recognize", "/v1/audio/transcriptions", "/v1/audio/translations", "/speakers")
RETRY_AFTER_S = 5


def upload_limit_middleware(limit: int):
    in_progress = 0

    def wrap(app: ASGIApp) -> ASGIApp:
        async def admit(scope: Scope, receive: Receive, send: Send) -> None:
            nonlocal in_progress
            if scope["type"] != "http" or scope["path"] not in UPLOAD_PATHS or scope["method"] != "POST":
                await app(scope, receive, send)
                return
            if in_progress >= limit:
                body = json.dumps({"status_code": 503, "detail": f"{in_progress} uploads are in progress, the most "
                                   f"this server takes at once; try again in {RETRY_AFTER_S} s"}).encode()
                await send({"type": "http.response.start", "status": 503, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"retry-after", str(RETRY_AFTER_S).encode()), (b"connection", b"close")]})
                await send({"type": "http.response.body", "body": body})
                return
            in_progress += 1
            try:
                await app(scope, receive, send)
            finally:
                in_progress -= 1

        return admit

    return wrap


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
