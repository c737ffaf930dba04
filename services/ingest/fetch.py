"""Recordings fetched by URL (`url` instead of `file` in POST /recognize, as hosted APIs take an
audio URL): ingest downloads it to a temporary file, within MAX_UPLOAD_MB and
AUDIO_URL_TIMEOUT_S, and takes it as an upload. Only public addresses are fetched, redirects
included (each hop is checked), unless AUDIO_URL_ALLOW_PRIVATE."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import PurePosixPath
from typing import BinaryIO
from urllib.parse import unquote, urljoin, urlsplit

import aiohttp
from litestar.exceptions import HTTPException

from common.outbound import (
    MAX_URL_CHARS,
    PrivateAddressRefused,
    TemporaryProblem,
    http_session,
    name_servers_failing,
    not_public,
    target_problem,
    unresolved_for_now,
)
from common.settings import Settings
from services.ingest import admission

MAX_REDIRECTS = 5
CONNECT_TIMEOUT_S = 30.0
# How long the server may send nothing (before its answer's headers, or between pieces of its
# body) before the fetch is given up: a URL submission holds one of the MAX_CONCURRENT_UPLOADS
# places while it downloads, and a server that stalls held it for all of AUDIO_URL_TIMEOUT_S.
READ_IDLE_S = 60.0
REDIRECTS = (301, 302, 303, 307, 308)
BLOCK = 1 << 16


def _refused(detail: str, status_code: int = 400) -> HTTPException:
    return HTTPException(status_code=status_code, detail=detail)


def _not_fetched_for_now(problem: TemporaryProblem) -> HTTPException:
    return HTTPException(status_code=503, headers={"Retry-After": str(admission.RETRY_AFTER_S)},
                         detail=f"audio URL not fetched: {problem}; try again shortly")


def _name_of(response: aiohttp.ClientResponse, url: str) -> str:
    disposition = response.content_disposition
    if disposition is not None and disposition.filename:
        return disposition.filename
    return PurePosixPath(unquote(urlsplit(url).path)).name or urlsplit(url).hostname or "audio"


class _RateFloor:
    """The rate an upload's body is held to (admission.UPLOAD_MIN_RATE on average, counted from the
    start once UPLOAD_RATE_GRACE_S have passed, while every place among MAX_CONCURRENT_UPLOADS is
    taken), for a recording fetched by URL: its request holds a place as it downloads, and a server
    trickling it in (a byte every 50 s, within READ_IDLE_S) held that place for all of
    AUDIO_URL_TIMEOUT_S while every other upload was refused. While a place is free, a slow server
    keeps no one out and takes as long as AUDIO_URL_TIMEOUT_S lets it."""

    def __init__(self) -> None:
        # From the fetch's start, as an upload's body is counted from its request's: the timeouts
        # before the final answer's headers only bound silence (READ_IDLE_S restarts with each
        # byte, CONNECT_TIMEOUT_S is per hop), so a status line sent a byte every 50 s, 102
        # answers sent again and again, or 5 redirects each after 59 s held the place for all of
        # AUDIO_URL_TIMEOUT_S. A slow answer followed by a fast body is kept if its bytes make up
        # the rate by the end of the grace.
        self.started = time.monotonic()
        self.received = 0
        # Set by _fetch once the address has passed its checks: a URL that is not one (`http://[::1`)
        # fails to split, and is refused there with the reason.
        self.host: str | None = None
        self.given_up = False

    def deadline(self) -> float:
        """When what came so far must have come by: its average would fall below the rate after."""
        return admission.slow_after(self.started, self.received)

    async def watch(self, fetching: asyncio.Task) -> None:
        """Cancel `fetching` once it is too slow while every place is taken (this task runs in its
        request's context, where admission.uploads_full tells that)."""
        while not (admission.uploads_full() and time.monotonic() >= self.deadline()):
            await asyncio.sleep(admission.UPLOAD_RATE_CHECK_S)
        self.given_up = True
        fetching.cancel()

    def refusal(self) -> HTTPException:
        # No host yet while the first address is still being checked (a slow name server).
        at = f" at {self.host}" if self.host else ""
        return _refused(
            f"could not fetch the audio URL: the recording{at} arrived slower than"
            f" {admission.UPLOAD_MIN_RATE // 1024} KiB/s on average ({self.received} bytes in"
            f" {time.monotonic() - self.started:.0f} s), too slowly to keep its place among the uploads"
            f" this server takes at once, every one of them taken; send it again later, or from a faster server")


async def _download(response: aiohttp.ClientResponse, max_bytes: int, too_big: str, floor: _RateFloor) -> BinaryIO:
    if response.content_length is not None and response.content_length > max_bytes:
        raise _refused(too_big, 413)
    spool = tempfile.SpooledTemporaryFile(max_size=BLOCK * 16)  # noqa: SIM115 (returned open)
    try:
        size = 0
        async for block in response.content.iter_chunked(BLOCK):
            size += len(block)
            floor.received = size
            if size > max_bytes:
                raise _refused(too_big, 413)
            spool.write(block)
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return spool


async def fetch_recording(url: str, settings: Settings) -> tuple[BinaryIO, str]:
    """The recording at `url` as an open temporary file (the caller closes it), and its name (from
    Content-Disposition, else the URL's path). 400 with the reason when it cannot be fetched (or
    comes too slowly while every upload place is taken: _RateFloor), 413 past MAX_UPLOAD_MB."""
    url = url.strip()
    floor = _RateFloor()
    fetching = asyncio.current_task()
    watching = asyncio.ensure_future(floor.watch(fetching))
    try:
        return await _fetch(url, settings, floor)
    except asyncio.CancelledError:
        if not floor.given_up:
            raise
        fetching.uncancel()
        raise floor.refusal() from None
    finally:
        watching.cancel()


async def _fetch(url: str, settings: Settings, floor: _RateFloor) -> tuple[BinaryIO, str]:
    if len(url) > MAX_URL_CHARS:
        raise _refused(f"audio URL refused: longer than {MAX_URL_CHARS} characters")
    too_big = f"the recording at the URL exceeds MAX_UPLOAD_MB ({settings.max_upload_mb} MB)"
    try:
        # AUDIO_URL_TIMEOUT_S for the whole fetch, redirects and their address checks included (a
        # session's total would be per request).
        async with asyncio.timeout(settings.audio_url_timeout_s), \
                http_session(settings.audio_url_allow_private,
                             timeout=aiohttp.ClientTimeout(sock_connect=CONNECT_TIMEOUT_S,
                                                           sock_read=READ_IDLE_S)) as http:
            for _ in range(MAX_REDIRECTS + 1):
                problem = await target_problem(url, settings.audio_url_allow_private, "AUDIO_URL_ALLOW_PRIVATE",
                                               what="an audio URL", credentials="give a presigned URL instead")
                if isinstance(problem, TemporaryProblem):
                    raise _not_fetched_for_now(problem)
                if problem:
                    raise _refused(f"audio URL refused: {problem}")
                floor.host = urlsplit(url).hostname
                async with http.get(url, allow_redirects=False) as response:
                    if response.status in REDIRECTS and "Location" in response.headers:
                        try:
                            url = urljoin(url, response.headers["Location"])
                        except ValueError as exc:  # `http://[`, a host NFKC makes another: urlsplit's
                            raise _refused(f"could not fetch the audio URL: {floor.host} redirected to an address"
                                           f" that is not a valid URL ({exc})") from exc
                        continue
                    if response.status != 200:
                        raise _refused(f"could not fetch the audio URL: {urlsplit(url).hostname} answered "
                                       f"HTTP {response.status}")
                    return (await _download(response, settings.max_upload_bytes, too_big, floor),
                            _name_of(response, url))
    except aiohttp.SocketTimeoutError as exc:  # a TimeoutError too, as the next two are
        raise _refused(f"could not fetch the audio URL: {urlsplit(url).hostname} sent nothing for"
                       f" {READ_IDLE_S:g} s") from exc
    except aiohttp.ServerTimeoutError as exc:  # the connect's own limit, not the whole fetch's
        raise _refused(f"could not fetch the audio URL: {urlsplit(url).hostname} did not accept a connection"
                       f" within {CONNECT_TIMEOUT_S:g} s") from exc
    except TimeoutError as exc:  # before OSError, of which it is one
        raise _refused(f"could not fetch the audio URL within AUDIO_URL_TIMEOUT_S "
                       f"({settings.audio_url_timeout_s:g} s)") from exc
    except aiohttp.ClientConnectorError as exc:
        # The name resolved to a public address as it was checked and to a private one as it was
        # connected to (DNS rebinding): refused as the check refuses it. aiohttp's own wording of
        # the resolver's error ("Cannot connect to host ... [None]") would not say why.
        if isinstance(exc.os_error, PrivateAddressRefused):
            raise _refused(f"audio URL refused: {not_public(exc.os_error.host, 'AUDIO_URL_ALLOW_PRIVATE')}") from exc
        # The name servers failing for the moment as aiohttp resolves the name again to connect
        # (or, with AUDIO_URL_ALLOW_PRIVATE, first): a blip to wait out, as target_problem tells it.
        if name_servers_failing(exc.os_error):
            raise _not_fetched_for_now(unresolved_for_now(urlsplit(url).hostname)) from exc
        raise _refused(f"could not fetch the audio URL: {exc}") from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise _refused(f"could not fetch the audio URL: {exc or type(exc).__name__}") from exc
    raise _refused(f"could not fetch the audio URL: more than {MAX_REDIRECTS} redirects")
