"""Requests to addresses users give (webhook targets, recordings fetched by URL): what such an
address may be. None of them may reach into the network this service runs in, unless a setting
allows private addresses: the check is made before each request and again as its connection is
made, so a name that changes its address in between (DNS rebinding) is caught too."""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import socket
from urllib.parse import urlsplit

import aiohttp

from common.messages import has_control_characters

log = logging.getLogger(__name__)

MAX_URL_CHARS = 2000
# Lookups of the names users give run on threads of their own: one given up at its limit goes on
# in its thread for as long as the system resolver takes (minutes), and in the loop's default
# executor enough of them held every thread that the object store's calls wait for too.
# As many as the notifier delivers at once (DELIVERY_PREFETCH): one endpoint whose name server
# does not answer holds at most WEBHOOK_CONCURRENCY of them, not every other endpoint's lookup.
_LOOKUPS = concurrent.futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="lookup")


def url_problem(url: str, what: str = "a webhook URL",
                credentials: str = "the signature authenticates deliveries") -> str | None:
    """Why `url` cannot be used by its form alone, or None."""
    if has_control_characters(url):
        return f"{what} cannot hold control characters"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (a port that is not a number, or out of range, raises here)
    except ValueError as exc:
        return f"{what} is not a valid URL ({exc})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{what} is http:// or https:// with a host"
    if parts.username or parts.password:
        return f"{what} carries no credentials ({credentials})"
    return None


def is_private_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and (ip.ipv4_mapped or ip.sixtofour):
        ip = ip.ipv4_mapped or ip.sixtofour
    # `not is_global` also takes what is neither private nor public: carrier-grade NAT
    # (100.64.0.0/10), where some clouds answer their metadata requests.
    return (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
            or ip.is_unspecified or not ip.is_global)


async def target_problem(url: str, allow_private: bool, allowed_by: str = "WEBHOOK_ALLOW_PRIVATE",
                         resolve_timeout_s: float = 10.0, **form) -> str | None:
    """Why nothing may be requested from `url` now, or None: a bad form (`form`: url_problem's
    wording), a host that does not resolve (within `resolve_timeout_s`), or (unless
    `allow_private`, the setting `allowed_by`) one that resolves to a loopback, link-local or
    private address."""
    problem = url_problem(url, **form)
    if problem or allow_private:
        return problem
    parts = urlsplit(url)
    try:
        # The system resolver's own limit (its timeout times its tries times the search domains)
        # can be minutes: a name server that does not answer is not waited on past this.
        found = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(
            _LOOKUPS, socket.getaddrinfo, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80),
            0, socket.SOCK_STREAM), resolve_timeout_s)
    except TimeoutError:
        return f"{parts.hostname} did not resolve within {resolve_timeout_s:g} s"
    except OSError as exc:
        return f"{parts.hostname} does not resolve ({exc.strerror or exc})"
    except UnicodeError:  # an empty label or one over 63 characters, refused by the IDNA codec
        return f"{parts.hostname} is not a valid host name"
    private = sorted({info[4][0] for info in found if is_private_address(info[4][0])})
    if private:
        # The address stays in the log: told to whoever asks, the answers map the private network's
        # names (a cluster's service names) to their addresses.
        log.info("%s resolves to %s: refused", parts.hostname, private[0])
        return (f"{parts.hostname} resolves to a private, loopback or link-local address;"
                f" set {allowed_by}=true to allow that")
    return None


class PrivateAddressRefused(OSError):
    """A name that resolved to a private address as its connection was made. Its message is its
    `strerror` too, the part of it that aiohttp keeps when it wraps it (ClientConnectorError);
    like target_problem's, it does not tell the address."""

    def __init__(self, host: str) -> None:
        message = f"{host} resolves to a private, loopback or link-local address"
        super().__init__(message)
        self.host, self.strerror = host, message


class PublicOnlyResolver(aiohttp.ThreadedResolver):
    """Resolves only to public addresses: a name that resolves to a private one between the check
    before a request and its connection is refused here too (PrivateAddressRefused)."""

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list:
        found = await super().resolve(host, port, family)
        private = [r["host"] for r in found if is_private_address(r["host"])]
        if private:
            log.info("%s resolves to %s as it is connected to: refused", host, private[0])
            raise PrivateAddressRefused(host)
        return found


def http_session(allow_private: bool, **session) -> aiohttp.ClientSession:
    """A session that connects only to public addresses unless `allow_private`."""
    resolver = None if allow_private else PublicOnlyResolver()
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=resolver), **session)
