"""Webhook signing (the Standard Webhooks convention, standardwebhooks.com), shared by ingest
(registration) and the notifier (every delivery). What a target URL may be: common/outbound.py."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from datetime import datetime
from urllib.parse import urlsplit

from pydantic import BaseModel, SerializeAsAny

from common.messages import Contract

SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def decoded_secret(secret: str) -> bytes | None:
    """The bytes a `whsec_` secret stands for; None for a secret without the prefix or whose
    rest is not base64 (refused at registration: receivers' libraries would decode it otherwise)."""
    if secret.startswith(SECRET_PREFIX):
        try:
            return base64.b64decode(secret[len(SECRET_PREFIX):], validate=True) or None
        except ValueError:
            pass
    return None


def _key(secret: str) -> bytes:
    """A `whsec_` secret signs with its base64-decoded bytes; any other string with its UTF-8."""
    return decoded_secret(secret) or secret.encode()


def signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header: `v1,` + base64 HMAC-SHA256 of `id.timestamp.body`."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(_key(secret), signed, hashlib.sha256).digest()).decode()


def endpoint(url: str) -> str:
    """The server a webhook URL is delivered to: its scheme, host and port. WEBHOOK_CONCURRENCY
    bounds the deliveries in flight to each: counted per webhook, every job's callback_url (a
    webhook of its own) counted apart, and 40 jobs calling back one dead server took every
    delivery slot of a notifier. Not per path: a dead server holds every path on it alike."""
    try:
        parts = urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
    except ValueError:  # refused before any request: as good as an endpoint of its own
        return url
    return f"{parts.scheme.lower()}://{parts.hostname}:{port}"


class WebhookPayload(BaseModel):
    """The body of every delivery: the event's type, when it was fanned out, and the event itself,
    exactly as on stt.events."""

    type: str
    timestamp: datetime
    data: SerializeAsAny[Contract]
