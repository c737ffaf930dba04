"""Bounds on requests in progress: uploads (MAX_CONCURRENT_UPLOADS; each one spools to disk while
it streams in, so without a bound a burst of large uploads could fill the disk) and event streams
(MAX_EVENT_STREAMS). Past a bound a request is answered 503 with Retry-After before its body is
read. The bound on bodies read into memory (SMALL_BODY_BYTES), and the size check every uploaded
file gets once it is in."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import BinaryIO

from litestar.exceptions import ClientException, HTTPException
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from multipart import MultipartError, MultipartSegment, PushMultipartParser, parse_options_header

from services.ingest.errors import error_body

# Recordings (the OpenAI-compatible ones too), and speakers' enrolment samples.
UPLOAD_PATHS = ("/recognize", "/v1/audio/transcriptions", "/v1/audio/translations", "/speakers")
RETRY_AFTER_S = 5
# The most a request body without a recording (JSON, a URL-encoded form) may hold: such bodies are
# read into memory whole.
SMALL_BODY_BYTES = 1024 * 1024
# How long an upload's body may stop coming before the request is given up.
UPLOAD_IDLE_S = 120.0
# The scope key of a function a handler may call once its upload is stored and its spooled file
# closed, to give up its place before it answers (the OpenAI-compatible endpoints wait minutes).
RELEASE_UPLOAD = "stt.release_upload"
# The scope key of a function an OpenAI-compatible request calls when it turns into an event stream
# (stream=true, once its upload is stored): True when it got a place among MAX_EVENT_STREAMS.
CLAIM_EVENT_STREAM = "stt.claim_event_stream"
OPENAI_PATHS = ("/v1/audio/transcriptions", "/v1/audio/translations")


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


def _limit_middleware(limit: int, applies: Callable[[Scope], bool], what: str, scope_key: str,
                      may_claim: Callable[[Scope], bool] = lambda scope: False):
    """At most `limit` requests that `applies` to in progress at once in this process, each
    counted until its response has ended; past it, 503 with Retry-After. A request that
    `may_claim` one is given `scope[scope_key]`, a function that takes a place (False when there
    is none), held from then until its response has ended."""
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

            if not applies(scope):
                scope[scope_key] = claim
            elif claim():
                scope[scope_key] = release
            else:
                await _refuse(send, scope, 503, f"{in_progress} {what} are in progress, the most this server takes"
                                                f" at once; try again in {RETRY_AFTER_S} s", retry_after=True)
                return
            try:
                await app(scope, receive, send)
            finally:
                release()

        return admit

    return wrap


def upload_limit_middleware(limit: int):
    """MAX_CONCURRENT_UPLOADS."""
    return _limit_middleware(limit, _is_streamed_upload, "uploads", RELEASE_UPLOAD)


def event_stream_limit_middleware(limit: int):
    """MAX_EVENT_STREAMS: each open stream reads PostgreSQL every second, so without a bound
    enough idle browser tabs would hold the database pool that every request needs. An
    OpenAI-compatible request with stream=true claims its place once its upload is stored."""
    return _limit_middleware(limit, _is_event_stream, "event streams", CLAIM_EVENT_STREAM, _is_openai_upload)


def _idle_bounded(receive: Receive) -> Receive:
    """`receive` that gives up (408) when the body stops coming for UPLOAD_IDLE_S: a client gone
    quiet in the middle of an upload (a laptop asleep, a connection a NAT dropped) otherwise keeps
    its place among MAX_CONCURRENT_UPLOADS for good, since nothing ends a connection that is only
    read from. Once the body is in, it waits as long as it is asked to (a streamed answer waits
    for the client to leave)."""
    body_in = False

    async def bounded() -> Message:
        nonlocal body_in
        if body_in:
            return await receive()
        try:
            message = await asyncio.wait_for(receive(), UPLOAD_IDLE_S)
        except TimeoutError:
            raise ClientException(status_code=408, detail=f"nothing more of the body came for {UPLOAD_IDLE_S:g} s;"
                                                          f" send it again") from None
        body_in = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    return bounded


def _fields_bounded(receive: Receive, content_type: bytes) -> Receive:
    """`receive` for a multipart body whose parts without a filename (form fields, which the form
    parser holds in memory whole) hold at most SMALL_BODY_BYTES together: past that, 413. Parts
    with a filename (the recording) are spooled to disk by the parser and not counted here."""
    _, options = parse_options_header(content_type.decode("latin-1"))
    try:
        parser = PushMultipartParser(options.get("boundary", ""))
    except ValueError:  # MultipartError is one
        return receive  # no usable boundary: the form parser refuses the body itself
    field: str | None = None  # the text field being read, if one is
    fields_bytes = 0

    async def watched() -> Message:
        nonlocal parser, field, fields_bytes
        message = await receive()
        if parser is None or message["type"] != "http.request" or not message.get("body"):
            return message
        try:
            for part in parser.parse(message["body"]):
                if isinstance(part, MultipartSegment):
                    field = None if part.filename else part.name
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


def small_body_middleware(app: ASGIApp) -> ASGIApp:
    """The upload routes take bodies up to MAX_UPLOAD_MB, streamed to disk when they are multipart;
    a JSON or URL-encoded body (an address to fetch, a speaker from a transcript) is read into
    memory whole, so it must say its length (411) and stay within SMALL_BODY_BYTES (413). So
    are a multipart body's text fields together (413). A body that stops coming is given up (408)."""

    async def check(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _is_upload(scope):
            headers = dict(scope["headers"])
            multipart = headers.get(b"content-type", b"").lower().startswith(b"multipart/")
            receive = _idle_bounded(receive)
            if multipart:
                receive = _fields_bounded(receive, headers[b"content-type"])
            length = headers.get(b"content-length")
            if not multipart and length is None and b"transfer-encoding" in headers:
                await _refuse(send, scope, 411, "a body that is not multipart/form-data must say its Content-Length;"
                                                " send a recording itself as a multipart upload")
                return
            if not multipart and length is not None and not (length.isdigit() and int(length) <= SMALL_BODY_BYTES):
                await _refuse(send, scope, 413, f"a body that is not multipart/form-data holds no recording: at most "
                                                f"{SMALL_BODY_BYTES // 1024} KiB; send the recording itself as a "
                                                f"multipart upload")
                return
        await app(scope, receive, send)

    return check


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
