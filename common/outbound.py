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
import threading
from urllib.parse import urlsplit

import aiohttp

from common.messages import has_control_characters

log = logging.getLogger(__name__)

MAX_URL_CHARS = 2000
# Lookups of the names users give run on threads of their own: one given up at its limit goes on
# in its thread for as long as the system resolver takes (minutes), and in the loop's default
# executor enough of them held every thread that the object store's calls wait for too.
# As many as the notifier delivers at once (DELIVERY_PREFETCH).
_LOOKUPS = concurrent.futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="lookup")
# One lookup at a time per name (single flight): a lookup still running for a name, its callers
# given up or not, is waited on by the next caller instead of another thread. Each delivery to a
# name whose name server does not answer started one more, while the one before it still held its
# thread, until the 32 were all held and every other name "did not resolve" either.
_lookups_in_flight: dict[str, _Lookup] = {}
# Reentrant: cancelling a lookup still queued (under it, so that no caller joins it meanwhile)
# calls _forget_lookup, which takes it too, there and then.
_lookups_lock = threading.RLock()


class _Lookup:
    """A name's lookup on a _LOOKUPS thread, and how many callers wait for it now."""

    def __init__(self, host: str) -> None:
        self.waiting = 0
        self.future = _LOOKUPS.submit(socket.getaddrinfo, host, None, 0, socket.SOCK_STREAM)


def _forget_lookup(host: str, lookup: _Lookup) -> None:
    with _lookups_lock:
        if _lookups_in_flight.get(host) is lookup:
            del _lookups_in_flight[host]


async def _resolve(host: str, timeout_s: float) -> list:
    """getaddrinfo(host) within `timeout_s` (TimeoutError past it), one lookup at a time per name."""
    with _lookups_lock:
        lookup = _lookups_in_flight.get(host)
        started = lookup is None
        if started:
            lookup = _lookups_in_flight[host] = _Lookup(host)
        lookup.waiting += 1
    if started:
        # Gone once it ends (or is cancelled): the next caller looks the name up afresh. (Outside
        # the lock: a lookup already ended calls it here and now.)
        lookup.future.add_done_callback(lambda _: _forget_lookup(host, lookup))
    answer = asyncio.wrap_future(lookup.future)
    # Its outcome is taken even when no one waits for it any more (else asyncio logs it as lost).
    answer.add_done_callback(lambda done: done.cancelled() or done.exception())
    try:
        # Shielded: a caller giving up must not cancel the lookup others may be waiting for.
        return await asyncio.wait_for(asyncio.shield(answer), timeout_s)
    finally:
        with _lookups_lock:
            lookup.waiting -= 1
            if not lookup.waiting:
                lookup.future.cancel()  # only one still queued for a thread: a running one goes on


def url_problem(url: str, what: str = "a webhook URL",
                credentials: str = "the signature authenticates deliveries") -> str | None:
    """Why `url` cannot be used by its form alone, or None."""
    if has_control_characters(url):
        return f"{what} cannot hold control characters"
    try:
        url.encode()
    except UnicodeEncodeError:  # a lone surrogate: no request can carry it, nor the database store it
        return f"{what} is not UTF-8 text"
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


# NAT64's well-known prefix (RFC 6052): DNS64 answers an IPv4-only name with its IPv4 address in
# the last 32 bits, so on an IPv6-only cluster every such host is reached there. ipaddress counts it
# reserved (inside ::/8). The local-use 64:ff9b:1::/48 (RFC 8215) embeds as each network chooses:
# it stays refused.
NAT64_WELL_KNOWN_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, 6to4, NAT64's well-known prefix), or None."""
    if ip in NAT64_WELL_KNOWN_PREFIX:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.ipv4_mapped or ip.sixtofour


# IANA's special-purpose ranges that are not globally reachable, refused whatever the interpreter's
# ipaddress says: before CVE-2024-4032's fix (3.11.10, 3.12.4) it counts most of 192.0.0.0/24
# (192.0.0.192: a cloud's older metadata address) as global. All of 192.0.0.0/24 is refused, its
# anycast 192.0.0.9 and .10 too: no webhook or recording is served there. 2001::/23 is left to
# ipaddress, which refuses all of it on older releases and all but its global parts on newer ones.
NOT_GLOBALLY_REACHABLE_IPV4 = tuple(ipaddress.IPv4Network(network) for network in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
    "203.0.113.0/24", "240.0.0.0/4", "255.255.255.255/32"))
# ::ffff:0:0/96 and 64:ff9b::/96 are not here: the IPv4 address inside them is judged instead.
NOT_GLOBALLY_REACHABLE_IPV6 = tuple(ipaddress.IPv6Network(network) for network in (
    "::1/128", "::/128", "64:ff9b:1::/48", "100::/64", "2001:db8::/32", "3fff::/20", "fc00::/7", "fe80::/10"))


def is_private_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        ip = embedded_ipv4(ip) or ip
    # Site-local (fec0::/10, deprecated but still routed inside some networks) is neither private
    # nor non-global to ipaddress.
    site_local = isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local
    # `not is_global` also takes what is neither private nor public: carrier-grade NAT
    # (100.64.0.0/10), where some clouds answer their metadata requests.
    denied = NOT_GLOBALLY_REACHABLE_IPV4 if ip.version == 4 else NOT_GLOBALLY_REACHABLE_IPV6
    return (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
            or ip.is_unspecified or not ip.is_global or site_local or any(ip in network for network in denied))


class TemporaryProblem(str):
    """A target_problem that may pass by itself: the name servers did not answer in time, or
    answered that they could not for now. Told as a name that does not resolve is (a 400), a valid
    URL checked during a name server's blip was refused for good: clients do not send a 400 again."""


def name_servers_failing(exc: BaseException | None) -> bool:
    """Whether a name lookup's error says the name servers fail for the moment (EAI_AGAIN)."""
    return isinstance(exc, socket.gaierror) and exc.errno == socket.EAI_AGAIN


def unresolved_for_now(host: str | None) -> TemporaryProblem:
    return TemporaryProblem(f"{host} could not be resolved for now (temporary failure in name resolution)")


async def target_problem(url: str, allow_private: bool, allowed_by: str = "WEBHOOK_ALLOW_PRIVATE",
                         resolve_timeout_s: float = 10.0, **form) -> str | None:
    """Why nothing may be requested from `url` now, or None: a bad form (`form`: url_problem's
    wording), a host that does not resolve (within `resolve_timeout_s`, or for now: a
    TemporaryProblem), or (unless `allow_private`, the setting `allowed_by`) one that resolves to
    a loopback, link-local or private address."""
    problem = url_problem(url, **form)
    if problem or allow_private:
        return problem
    parts = urlsplit(url)
    host = parts.hostname
    try:
        # The system resolver's own limit (its timeout times its tries times the search domains)
        # can be minutes: a name server that does not answer is not waited on past this.
        found = await _resolve(host, resolve_timeout_s)
    except TimeoutError:
        return TemporaryProblem(f"{host} did not resolve within {resolve_timeout_s:g} s")
    except OSError as exc:
        if name_servers_failing(exc):
            return unresolved_for_now(host)
        # Told as a private address is: two answers would tell whoever asks which names the private
        # network has (a cluster's service names). The log says which it was.
        log.info("%s does not resolve (%s): refused", host, exc.strerror or exc)
        return not_public(host, allowed_by)
    except UnicodeError:  # an empty label or one over 63 characters, refused by the IDNA codec
        return f"{host} is not a valid host name"
    private = sorted({info[4][0] for info in found if is_private_address(info[4][0])})
    if private:
        # The address stays in the log: told to whoever asks, the answers map the private network's
        # names (a cluster's service names) to their addresses.
        log.info("%s resolves to %s: refused", host, private[0])
        return not_public(host, allowed_by)
    return None


def not_public(host: str, allowed_by: str | None = None) -> str:
    """The one refusal of a name that does not resolve and of one that resolves to a private
    address: different answers for the two would map the private network's names."""
    told = f"{host} does not resolve to a public address"
    return told if allowed_by is None else f"{told} (set {allowed_by}=true to allow private ones)"


class PrivateAddressRefused(OSError):
    """A name that resolved to a private address as its connection was made. Its message is its
    `strerror` too, the part of it that aiohttp keeps when it wraps it (ClientConnectorError);
    like target_problem's, it does not tell the address."""

    def __init__(self, host: str) -> None:
        message = not_public(host)
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
