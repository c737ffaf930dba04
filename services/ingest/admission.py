"""Bounds on requests in progress: uploads (MAX_CONCURRENT_UPLOADS; each one spools to disk while
it streams in, so without a bound a burst of large uploads could fill the disk) and event streams
(MAX_EVENT_STREAMS). Past a bound a request is answered 503 with Retry-After before its body is
read. The bound on bodies read into memory (SMALL_BODY_BYTES), on a multipart body's text fields,
files and parts, on how slowly a body may come, and the size check every uploaded file gets once
it is in."""

from __future__ import annotations

import asyncio
import contextvars
import json
import math
import time
from collections.abc import Awaitable, Callable
from typing import BinaryIO

from litestar._multipart import parse_content_header
from litestar.exceptions import ClientException, HTTPException
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from multipart import MultipartError, MultipartSegment, PushMultipartParser

from common.metrics import COUNTED_AS
from services.ingest.errors import error_body

# Recordings (the OpenAI-compatible ones too), and speakers' enrolment samples.
UPLOAD_PATHS = ("/recognize", "/v1/audio/transcriptions", "/v1/audio/translations", "/speakers")
RETRY_AFTER_S = 5
# The most a request body without a recording (JSON, a URL-encoded form) may hold: such bodies are
# read into memory whole.
SMALL_BODY_BYTES = 1024 * 1024
SMALL_BODY_TOO_BIG = (f"a body that is not multipart/form-data holds no recording: at most {SMALL_BODY_BYTES // 1024}"
                      f" KiB; send the recording itself as a multipart upload")
# How long an upload's body may stop coming before the request is given up.
UPLOAD_IDLE_S = 120.0
# The slowest an upload's body may come on average, counted from the start of the request once
# UPLOAD_RATE_GRACE_S have passed (64 kbit/s: a poor mobile uplink still passes), while every place
# among MAX_CONCURRENT_UPLOADS is taken. A body trickled in a byte at a time, each within
# UPLOAD_IDLE_S, would otherwise hold its place for as long as the client likes while other uploads
# are refused; while a place is free, a slow upload (a phone on a poor uplink) keeps no one out and
# takes as long as it takes.
UPLOAD_MIN_RATE = 8 * 1024
UPLOAD_RATE_GRACE_S = 60.0
# How often an upload waiting for more of its body looks whether every upload place is now taken.
UPLOAD_RATE_CHECK_S = 1.0
# The most parts a recording's form may have (Litestar's own default is 1000). The OpenAI SDK sends
# each list item and object key as a part of its own: 100 spelling pairs, ~100 languages, 75
# one-letter keywords (150 characters), 32 speaker names and the other fields come to ~330. Text
# fields hold at most SMALL_BODY_BYTES together whatever their number.
UPLOAD_FORM_PARTS = 512
# The scope key of a function a handler may call once its upload is stored and its spooled file
# closed, to give up its place before it answers (the OpenAI-compatible endpoints wait minutes).
RELEASE_UPLOAD = "stt.release_upload"
# The scope key of a function that says whether every place among MAX_CONCURRENT_UPLOADS is taken
# (the next upload would be refused), given to each upload that holds one.
UPLOADS_FULL = "stt.uploads_full"
# The same function for the code that handles such a request (a recording fetched by URL holds its
# place as it downloads, and is held to the same rate: services/ingest/fetch.py).
_uploads_full: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar("uploads_full",
                                                                                         default=None)
# The scope key of a function an OpenAI-compatible request calls when it turns into an event stream
# (stream=true, once its upload is stored): True when it got a place among MAX_EVENT_STREAMS.
CLAIM_EVENT_STREAM = "stt.claim_event_stream"
OPENAI_PATHS = ("/v1/audio/transcriptions", "/v1/audio/translations")
# OpenAI's diarizing model takes a 2-10 s reference clip with each known speaker's name. Here a
# voice is enrolled once, with consent, not sent with each request; and four clips, as data URLs,
# are megabytes of text field: refused as their part begins, not as text fields over their bound.
KNOWN_SPEAKER_REFERENCES = ("known_speaker_references", "known_speaker_references[]")
KNOWN_SPEAKER_REFERENCES_REFUSED = (
    "known_speaker_references: reference clips are not taken here; enrol each voice once (POST /speakers, or `stt"
    " speakers enroll NAME sample.wav`) and give its name in known_speaker_names")
# The charsets a form's text field may name (its part's Content-Type): UTF-8, and what clients
# send unasked (US-ASCII; ISO-8859-1, the default of Java's Apache HttpClient). The form parser
# decodes a field in any codec Python has, some of them no text encoding (rot13, base64: a fault
# as it decodes) or making text nothing else takes (unicode_escape: `\ud800` written out is a lone
# surrogate the database refuses, inside the job's transaction).
FIELD_CHARSETS = frozenset({"utf-8", "utf8", "us-ascii", "ascii", "iso-8859-1", "iso8859-1", "latin-1", "latin1"})


def slow_after(started: float, received: int) -> float:
    """When `received` bytes, coming since `started` (monotonic), must have come by: past it, their
    average is under UPLOAD_MIN_RATE, and UPLOAD_RATE_GRACE_S have passed."""
    return started + max(UPLOAD_RATE_GRACE_S, received / UPLOAD_MIN_RATE)


def _is_upload(scope: Scope) -> bool:
    return scope["path"] in UPLOAD_PATHS and scope["method"] == "POST"


def _is_streamed_upload(scope: Scope) -> bool:
    """An upload that streams a file in. An enrolment from a transcript's speaker (JSON) holds
    none, and would hold a place among MAX_CONCURRENT_UPLOADS through its re-matching of every past
    recording of its key."""
    if not _is_upload(scope):
        return False
    return scope["path"] != "/speakers" or dict(scope["headers"]).get(b"content-type", b"").lower().startswith(
        b"multipart/")


def _is_event_stream(scope: Scope) -> bool:
    path = scope["path"]
    return scope["method"] == "GET" and (path == "/events" or (path.startswith("/transcripts/")
                                                              and path.endswith("/events")))


async def _refuse(send: Send, scope: Scope, status: int, detail: str, *, retry_after: bool = False) -> None:
    """Answer the request with an error before its body is read."""
    body = json.dumps(error_body(scope["path"], status, detail)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    if retry_after:
        headers.append((b"retry-after", str(RETRY_AFTER_S).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _is_openai_upload(scope: Scope) -> bool:
    return scope["path"] in OPENAI_PATHS and scope["method"] == "POST"


async def _refuse_busy(send: Send, scope: Scope, detail: str) -> None:
    await _refuse(send, scope, 503, detail, retry_after=True)


def _asks_for_event_stream(scope: Scope) -> bool:
    """An `EventSource` (it sends `Accept: text/event-stream`; the page reads with fetch and does not)."""
    return any(name == b"accept" and b"text/event-stream" in value.lower() for name, value in scope["headers"])


async def _refuse_event_stream(send: Send, scope: Scope, detail: str) -> None:
    """Past MAX_EVENT_STREAMS. An EventSource given a 503 stops for good, so it is given a stream
    that ends at once, saying why, whose `retry` has it come back after Retry-After's wait; any
    other client gets the 503 with Retry-After. Either is counted in the metrics as a 503."""
    if not _asks_for_event_stream(scope):
        await _refuse_busy(send, scope, detail)
        return
    scope[COUNTED_AS] = 503
    body = f": {detail}\nretry: {RETRY_AFTER_S * 1000}\n\n".encode()
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"text/event-stream; charset=utf-8"), (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-cache"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def _limit_middleware(limit: int, applies: Callable[[Scope], bool], what: str, scope_key: str,
                      may_claim: Callable[[Scope], bool] = lambda scope: False, full_key: str | None = None,
                      refuse: Callable[[Send, Scope, str], Awaitable[None]] = _refuse_busy):
    """At most `limit` requests that `applies` to in progress at once in this process, each
    counted until its response has ended; past it, `refuse` answers (503 with Retry-After). A request that
    `may_claim` one is given `scope[scope_key]`, a function that takes a place (False when there
    is none), held from then until its response has ended. With `full_key`, a request holding a
    place is given `scope[full_key]`, a function that says whether every place is taken."""
    in_progress = 0

    def wrap(app: ASGIApp) -> ASGIApp:
        async def admit(scope: Scope, receive: Receive, send: Send) -> None:
            nonlocal in_progress
            if scope["type"] != "http" or not (applies(scope) or may_claim(scope)):
                await app(scope, receive, send)
                return
            holding = False

            def release() -> None:
                nonlocal in_progress, holding
                if holding:
                    holding, in_progress = False, in_progress - 1

            def claim() -> bool:
                nonlocal in_progress, holding
                if not holding and in_progress < limit:
                    holding, in_progress = True, in_progress + 1
                return holding

            told = None
            if not applies(scope):
                scope[scope_key] = claim
            elif claim():
                scope[scope_key] = release
                if full_key is not None:
                    scope[full_key] = lambda: in_progress >= limit
                    told = _uploads_full.set(scope[full_key])
            else:
                await refuse(send, scope, f"{in_progress} {what} are in progress, the most this server takes"
                                          f" at once; try again in {RETRY_AFTER_S} s")
                return
            try:
                await app(scope, receive, send)
            finally:
                release()
                if told is not None:
                    _uploads_full.reset(told)

        return admit

    return wrap


def upload_limit_middleware(limit: int):
    """MAX_CONCURRENT_UPLOADS."""
    return _limit_middleware(limit, _is_streamed_upload, "uploads", RELEASE_UPLOAD, full_key=UPLOADS_FULL)


def event_stream_limit_middleware(limit: int):
    """MAX_EVENT_STREAMS: each open stream reads PostgreSQL every second, so without a bound
    enough idle browser tabs would hold the database pool that every request needs. An
    OpenAI-compatible request with stream=true claims its place once its upload is stored."""
    return _limit_middleware(limit, _is_event_stream, "event streams", CLAIM_EVENT_STREAM, _is_openai_upload,
                             refuse=_refuse_event_stream)


def _idle_bounded(receive: Receive, full: Callable[[], bool] = lambda: False) -> Receive:
    """`receive` that gives up (408) when the body stops coming for UPLOAD_IDLE_S, or, while
    `full` (every upload place is taken), comes at under UPLOAD_MIN_RATE on average once
    UPLOAD_RATE_GRACE_S have passed: a client gone quiet in the middle of an upload (a laptop
    asleep, a connection a NAT dropped), or one that trickles its body in, otherwise keeps its
    place among MAX_CONCURRENT_UPLOADS for good, since nothing ends a connection that is only read
    from. While a place is free, a slow body keeps no one out: it may take its time. Once the body
    is in, it waits as long as it is asked to (a streamed answer waits for the client to leave)."""
    body_in = False
    started = time.monotonic()
    received = 0

    async def bounded() -> Message:
        nonlocal body_in, received
        if body_in:
            return await receive()
        asked = time.monotonic()
        rate_deadline = slow_after(started, received)
        coming = asyncio.ensure_future(receive())
        try:
            while True:
                now = time.monotonic()
                if full() and now >= rate_deadline:
                    raise ClientException(status_code=408, detail=(
                        f"the body came at under {UPLOAD_MIN_RATE // 1024} KiB/s on average ({received} bytes in"
                        f" {now - started:.0f} s), too slowly to keep its place among the uploads this server"
                        f" takes at once, every one of them taken; send it again over a faster connection"))
                if now - asked >= UPLOAD_IDLE_S:
                    raise ClientException(status_code=408, detail=f"nothing more of the body came for"
                                                                  f" {UPLOAD_IDLE_S:g} s; send it again")
                # Until the next message, the idle limit, or the rate's deadline (while every
                # place is taken); looking again every UPLOAD_RATE_CHECK_S whether they all are.
                until = min(asked + UPLOAD_IDLE_S, rate_deadline if full() else math.inf, now + UPLOAD_RATE_CHECK_S)
                done, _ = await asyncio.wait({coming}, timeout=max(until - now, 0))
                if done:
                    break
            message = coming.result()
        finally:
            if not coming.done():
                coming.cancel()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
        body_in = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    return bounded


class _BadContentType(ValueError):
    """An upload's Content-Type that the form parser could read otherwise than this module."""


def _boundary(headers: list[tuple[bytes, bytes]]) -> tuple[bool, str]:
    """Whether the body is multipart/form-data, and its boundary, read as the form parser reads
    them (litestar's parse_content_header, which takes any whitespace after `;`). _BadContentType
    for more than one Content-Type header (the form parser reads the first), a multipart one
    without a boundary, or a boundary on another type (multipart/mixed, text/plain): the form
    parser reads any body with a boundary as a form, and a field's bytes that are not UTF-8 there
    were a fault (only a form's are the client's)."""
    content_types = [value for name, value in headers if name.lower() == b"content-type"]
    if len(content_types) > 1:
        raise _BadContentType("the request has more than one Content-Type header; send one")
    media_type, options = parse_content_header(content_types[0].decode("latin-1") if content_types else "")
    if media_type != "multipart/form-data" and (media_type.startswith("multipart/") or "boundary" in options):
        told = media_type[:100] or "one without a media type"
        raise _BadContentType(f"send a multipart/form-data body (curl -F), not {told}")
    if media_type != "multipart/form-data":
        return False, ""
    boundary = options.get("boundary", "")
    try:
        PushMultipartParser(boundary.encode())
    except ValueError:  # MultipartError is one: an empty boundary
        raise _BadContentType(f"the multipart body's boundary cannot be read from its Content-Type"
                              f" ({content_types[0].decode('latin-1')[:200]!r}); send multipart/form-data;"
                              f" boundary=... (curl -F)") from None
    return True, boundary


def _charset_refused(charset: str | None) -> bool:
    """Whether a text field's charset is not one of FIELD_CHARSETS (none given is UTF-8)."""
    return charset is not None and charset.lower().replace("_", "-") not in FIELD_CHARSETS


def _fields_bounded(receive: Receive, boundary: str, openai: bool = False) -> Receive:
    """`receive` for a multipart body whose parts without a filename (form fields, which the form
    parser holds in memory whole) hold at most SMALL_BODY_BYTES together: past that, 413; each
    in UTF-8 (or FIELD_CHARSETS' others): 400. A part with a filename (the recording) is spooled
    by the parser (in memory up to 1 MiB), so only one is taken: a second is 400. With `openai`
    (an OpenAI-compatible request), a known_speaker_references part is 400 as it begins."""
    parser: PushMultipartParser | None = PushMultipartParser(boundary.encode())
    field: str | None = None  # the text field being read, if one is
    fields_bytes = 0
    files = 0

    async def watched() -> Message:
        nonlocal parser, field, fields_bytes, files
        message = await receive()
        if parser is None or message["type"] != "http.request" or not message.get("body"):
            return message
        try:
            for part in parser.parse(message["body"]):
                if isinstance(part, MultipartSegment):
                    if openai and part.name in KNOWN_SPEAKER_REFERENCES:
                        raise ClientException(status_code=400, detail=KNOWN_SPEAKER_REFERENCES_REFUSED)
                    field = None if part.filename else part.name
                    files += bool(part.filename)
                    if files > 1:
                        raise ClientException(status_code=400, detail=(
                            f"one file per request: the form's part {part.name!r} is a second file (a part with a"
                            f" filename); send each recording in a request of its own"))
                    if not part.filename and _charset_refused(part.charset):
                        raise ClientException(status_code=400, detail=(
                            f"the form's field {part.name[:100]!r} is in charset {part.charset[:100]!r}: send text"
                            f" fields as UTF-8 (a part's charset may also be US-ASCII or ISO-8859-1)"))
                elif part and field is not None:
                    fields_bytes += len(part)
                    if fields_bytes > SMALL_BODY_BYTES:
                        raise ClientException(status_code=413, detail=(
                            f"the form's text fields hold over {SMALL_BODY_BYTES // 1024} KiB (at {field!r}):"
                            f" a field is text; send a file as a part with a filename (curl -F"
                            f" file=@meeting.mp3, not file=<meeting.mp3)"))
                elif part is None:
                    field = None
        except MultipartError:
            parser = None  # a malformed body, or a header over the limit: the form parser says so
        return message

    return watched


def _small_body_bounded(receive: Receive) -> Receive:
    """`receive` for a body read into memory whole that gives up (413) once more than
    SMALL_BODY_BYTES of it have come, whatever its headers said."""
    received = 0

    async def bounded() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > SMALL_BODY_BYTES:
                raise ClientException(status_code=413, detail=SMALL_BODY_TOO_BIG)
        return message

    return bounded


def small_body_middleware(app: ASGIApp) -> ASGIApp:
    """The upload routes take bodies up to MAX_UPLOAD_MB, streamed to disk when they are multipart;
    a JSON or URL-encoded body (an address to fetch, a speaker from a transcript) is read into
    memory whole, so it must say its length, not come chunked (411), and stay within
    SMALL_BODY_BYTES (413), as its headers say and as it comes. So are a multipart body's text
    fields together (413); it holds one file (400), and its boundary and Content-Type must be
    unambiguous (400). A body that stops coming, or comes too slowly while every upload place is
    taken, is given up (408)."""

    async def check(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _is_upload(scope):
            headers = dict(scope["headers"])
            try:
                multipart, boundary = _boundary(scope["headers"])
            except _BadContentType as exc:
                await _refuse(send, scope, 400, str(exc))
                return
            receive = _idle_bounded(receive, lambda: scope.get(UPLOADS_FULL, lambda: False)())
            if multipart:
                receive = _fields_bounded(receive, boundary, openai=_is_openai_upload(scope))
            else:
                receive = _small_body_bounded(receive)
            length = headers.get(b"content-length")
            # With Transfer-Encoding beside a Content-Length, the server reads the body by the
            # former, of any length: its Content-Length bounds nothing.
            if not multipart and b"transfer-encoding" in headers:
                await _refuse(send, scope, 411, "a body that is not multipart/form-data must be sent with its"
                                                " Content-Length, not chunked (Transfer-Encoding); send a recording"
                                                " itself as a multipart upload")
                return
            if not multipart and length is not None and not (length.isdigit() and int(length) <= SMALL_BODY_BYTES):
                await _refuse(send, scope, 413, SMALL_BODY_TOO_BIG)
                return
        await app(scope, receive, send)

    return check


def uploads_full() -> bool:
    """Whether every place among MAX_CONCURRENT_UPLOADS is taken, for the upload being handled
    (False outside one)."""
    full = _uploads_full.get()
    return full is not None and full()


def release_upload(scope: Scope) -> None:
    """Give up the request's place among MAX_CONCURRENT_UPLOADS (its upload is in the store)."""
    scope.get(RELEASE_UPLOAD, lambda: None)()


def claim_event_stream(scope: Scope) -> bool:
    """Take a place among MAX_EVENT_STREAMS for the rest of this request; False when none is free."""
    return scope.get(CLAIM_EVENT_STREAM, lambda: True)()


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
