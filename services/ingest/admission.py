"""A bound on uploads in progress (MAX_CONCURRENT_UPLOADS): each one spools to disk while it
streams in, so without a bound a burst of large uploads could fill the disk. Past the bound a
request is answered 503 with Retry-After before its body is read."""

from __future__ import annotations

import json

from litestar.types import ASGIApp, Receive, Scope, Send

UPLOAD_PATH = "/recognize"
RETRY_AFTER_S = 5


def upload_limit_middleware(limit: int):
    in_progress = 0

    def wrap(app: ASGIApp) -> ASGIApp:
        async def admit(scope: Scope, receive: Receive, send: Send) -> None:
            nonlocal in_progress
            if scope["type"] != "http" or scope["path"] != UPLOAD_PATH or scope["method"] != "POST":
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
