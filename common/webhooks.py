"""Webhook signing (the Standard Webhooks convention, standardwebhooks.com) and the check that a
target URL is not on this side of the network: shared by ingest (registration) and the notifier
(every delivery)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import secrets
import socket
from urllib.parse import urlsplit

SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def _key(secret: str) -> bytes:
    """A `whsec_` secret signs with its base64-decoded bytes; any other string with its UTF-8."""
    if secret.startswith(SECRET_PREFIX):
        try:
            return base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
        except ValueError:
            pass
    return secret.encode()


def signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header: `v1,` + base64 HMAC-SHA256 of `id.timestamp.body`."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(_key(secret), signed, hashlib.sha256).digest()).decode()


def url_problem(url: str) -> str | None:
    """Why `url` cannot be a webhook target by its form alone, or None."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "a webhook URL is http:// or https:// with a host"
    if parts.username or parts.password:
        return "a webhook URL carries no credentials (the signature authenticates deliveries)"
    return None


def is_private_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
            or ip.is_unspecified)


async def target_problem(url: str, allow_private: bool) -> str | None:
    """Why nothing may be sent to `url` now, or None: a bad form, a host that does not resolve,
    or (unless `allow_private`) one that resolves to a loopback, link-local or private address
    (a webhook must not reach into the network this service runs in)."""
    problem = url_problem(url)
    if problem or allow_private:
        return problem
    parts = urlsplit(url)
    try:
        found = await asyncio.get_running_loop().getaddrinfo(
            parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), type=socket.SOCK_STREAM)
    except OSError as exc:
        return f"{parts.hostname} does not resolve ({exc.strerror or exc})"
    private = sorted({info[4][0] for info in found if is_private_address(info[4][0])})
    if private:
        return (f"{parts.hostname} resolves to a private, loopback or link-local address ({private[0]});"
                " set WEBHOOK_ALLOW_PRIVATE=true to allow that")
    return None
