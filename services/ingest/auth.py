"""Optional API keys (API_KEYS): every endpoint but health and /metrics needs one, and a job
belongs to the key that created it (its hash is stored, never the key)."""

from __future__ import annotations

import hashlib
import hmac
import json

from litestar import Request
from litestar.exceptions import HTTPException
from litestar.types import ASGIApp, Receive, Scope, Send

from common.settings import Settings
from services.ingest.errors import OPENAI_PREFIX, error_body

# The page's own files are open (the key is typed into the page); everything it reads is not.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/"})
OPEN_PREFIXES = ("/ui/",)


def owner_of(api_key: str) -> str:
    """What a job row stores for its key: a hash, so the database never holds the key."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:32]


def api_key_middleware(settings: Settings):
    owners = [owner_of(k) for k in settings.api_key_list]

    def wrap(app: ASGIApp) -> ASGIApp:
        async def check(scope: Scope, receive: Receive, send: Send) -> None:
            if (scope["type"] != "http" or not owners or scope["path"] in OPEN_PATHS
                    or scope["path"].startswith(OPEN_PREFIXES)):
                await app(scope, receive, send)
                return
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            presented = headers.get("x-api-key") or ""
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if not presented and scheme.lower() == "bearer":
                presented = token.strip()
            if not presented:
                await _deny(scope, send, 401,
                            "an API key is required: 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
                return
            owner = owner_of(presented)
            if not any(hmac.compare_digest(owner, known) for known in owners):
                await _deny(scope, send, 403, "this API key is not valid")
                return
            scope.setdefault("state", {})["owner"] = owner
            await app(scope, receive, send)

        return check

    return wrap


async def _deny(scope: Scope, send: Send, status: int, detail: str) -> None:
    if scope["path"].startswith(OPENAI_PREFIX):
        # OpenAI answers a wrong key 401 too; its SDKs raise AuthenticationError for it.
        status, code = 401, "invalid_api_key"
    else:
        code = None
    body = json.dumps(error_body(scope["path"], status, detail, code=code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="stt"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def request_owner(request: Request) -> str | None:
    return request.scope.get("state", {}).get("owner")


def admin_only(settings: Settings, request: Request, what: str) -> None:
    """403 unless the caller holds ADMIN_API_KEY (anyone may, without API keys)."""
    if not settings.api_key_list:
        return
    admin = settings.admin_api_key.get_secret_value() if settings.admin_api_key else None
    if admin is None or not hmac.compare_digest(request_owner(request) or "", owner_of(admin)):
        raise HTTPException(status_code=403, detail=f"only ADMIN_API_KEY may {what}")
