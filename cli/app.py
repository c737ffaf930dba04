"""`stt`: submit recordings, follow their jobs, fetch transcripts, watch the event stream.

Talks to the ingest HTTP API (`--api`, `--api-key`) and, for `watch`, to RabbitMQ's
`stt.events` exchange (`--amqp-url`). Progress and messages go to stderr; what a command
produces (job ids, transcripts, documents) goes to stdout, so it can be piped.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import html
import json
import logging
import math
import os
import re
import secrets
import signal
import sys
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn
from urllib.parse import urlsplit

import httpx
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from common.messages import (
    EVENTS,
    SegmentCreated,
    TranscriptCompleted,
    TranscriptDeleted,
    TranscriptFailed,
    TranscriptSpeakersUpdated,
    person_name,
)

if TYPE_CHECKING:
    from aio_pika.abc import AbstractIncomingMessage

DEFAULT_API_URL = "http://localhost:8000"
DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/"
UPLOAD_CHUNK_BYTES = 256 * 1024
POLL_INTERVAL_S = 1.0
FINISHED = ("done", "error")
NOT_FOLLOWED = "not followed"  # follow_jobs' status for a job the API stopped telling about
# Waited out too, for a while (a gateway's rate limit, an error of one request), before the job
# is reported as not followed: the job itself goes on either way.
RETRIED_STATUS_CODES = (429, 500)
FOLLOW_TRIES = 60
# How long following waits out an API that does not answer at all, or answers 502-504, before
# the job is reported as not followed: a restart or an upgrade takes minutes; a port-forward or a
# VPN that is gone never comes back, and a script would wait for ever.
API_AWAY_S = 1800.0
# How long `submit` keeps offering an upload (`rerun` and `speakers enroll` their request) that the
# server answers 503 with Retry-After (it takes no more uploads at once, or its database or broker
# is briefly away; nothing was created, unless the detail says a job may have been created:
# MAYBE_CREATED), or a gateway's rate limit answers 429 with Retry-After.
UPLOAD_BUSY_WAIT_S = 120.0
# In a 503's detail: the database went away as the job was committed, so it may exist and run
# (services/ingest/submission.py maybe_created). Sent again with the same Idempotency-Key, the
# upload or rerun gets that job if it was created; else it is reported as maybe made, not refused.
MAYBE_CREATED = re.compile(r"\bjob (\d+) may have been created\b")
# Sends of one upload whose answer was lost (each with the same Idempotency-Key).
UPLOAD_ATTEMPTS = 3
# Seconds before a request whose answer was lost is sent again (times the attempt).
RESEND_PAUSE_S = 2.0
# A gateway in front of the API (ingress-nginx, a load balancer, Cloudflare's 520-524) giving up on
# it: the API may still be at the request (a URL submission downloads and decodes before it
# answers), or done with it.
GATEWAY_GAVE_UP = (502, 504, 520, 521, 522, 523, 524)
# Answers worth waiting out while following a job: the API or its database is restarting (503, or
# a gateway in front of it giving up).
TRANSIENT_STATUS_CODES = (503, *GATEWAY_GAVE_UP)
REQUEST_TIMEOUT = httpx.Timeout(30, connect=10)
# Enrolling and forgetting a speaker relabel every past recording of the key before answering.
SPEAKER_CHANGE_TIMEOUT = httpx.Timeout(300, connect=10)
WATCHED_ROUTING_KEYS = ("segment.created", "transcript.*")
SPEAKER_COLOURS = ("cyan", "magenta", "green", "yellow", "blue", "red",
                   "bright_cyan", "bright_magenta", "bright_green", "bright_yellow")

# soft_wrap: a transcript line piped to a file stays one line, whatever the terminal width.
stdout = Console(soft_wrap=True, highlight=False)
stderr = Console(stderr=True, soft_wrap=True, highlight=False)

app = typer.Typer(
    name="stt",
    help="Client for the stt-pipeline speech-to-text service.",
    no_args_is_help=True,
    add_completion=False,
    # A traceback with locals would print the API key.
    pretty_exceptions_show_locals=False,
)

ApiUrl = Annotated[str, typer.Option("--api", envvar="STT_API_URL", help="Base URL of the ingest API.")]
ApiKey = Annotated[str | None, typer.Option(
    "--api-key", envvar="STT_API_KEY", show_default=False,
    help="API key, sent as 'Authorization: Bearer <key>' (needed when the server sets API_KEYS).")]
AmqpUrl = Annotated[str, typer.Option(
    "--amqp-url", envvar="AMQP_URL", show_default=False,
    help=f"RabbitMQ URL to read stt.events from [default: {DEFAULT_AMQP_URL}]")]


class TranscriptFormat(StrEnum):
    json = "json"
    srt = "srt"
    vtt = "vtt"
    txt = "txt"
    rttm = "rttm"


# The Content-Type the API gives each text format (services/ingest/transcripts.py MEDIA_TYPES; the
# client is installed without the services): a 200 of another type (a captive portal's page) is
# no transcript.
TEXT_MEDIA_TYPES = {"srt": "application/x-subrip", "vtt": "text/vtt", "txt": "text/plain", "rttm": "text/plain"}


class ApiError(Exception):
    """The API answered with an error; the message carries its status and `detail`.
    `retry_after_s`: how long a 429 or 503 asked to wait (its Retry-After), None otherwise."""

    def __init__(self, status_code: int, detail: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"{status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail
        self.retry_after_s = retry_after_s


class AnswerLost(Exception):
    """A request that changes something was sent and its answer never came (sent again where it
    could be, and lost again): it may have been done. The message says how the answer was lost."""


class FileChanged(Exception):
    """A file being uploaded ended before the size it had when its upload began, or went on past
    it (still being written, or cut): the request cannot carry the Content-Length it declared."""


class UnexpectedAnswer(Exception):
    """The API answered a success whose JSON is not what this client reads: --api names another
    service, or a gateway answered for it."""


@dataclass
class SubmittedJob:
    id: int
    filename: str


def fail(message: str) -> NoReturn:
    stderr.print(Text(f"error: {message}", style="red"))
    raise typer.Exit(1)


# ---- HTTP -----------------------------------------------------------------------------------


def api_client(api: str, api_key: str | None) -> httpx.Client:
    try:
        base_url, headers = api_base(api), auth_headers(api_key)
    except ValueError as exc:
        fail(str(exc))
    refuse_a_key_with_a_user_in_the_address(api, api_key)
    return httpx.Client(base_url=base_url, headers=headers, timeout=REQUEST_TIMEOUT)


def refuse_a_key_with_a_user_in_the_address(api: str, api_key: str | None) -> None:
    """A usage error (2) for an API key given with a user name or password in the address: httpx
    sends the address's as Basic auth, and its Authorization header silently took the place of the
    key's (`Bearer <key>`)."""
    if (api_key or "").strip() and userinfo_of(api) is not None:
        raise typer.BadParameter(
            "the address holds a user name or password (https://user:password@host), which is sent as"
            " 'Authorization: Basic' in place of the API key (--api-key / STT_API_KEY): give one or the other"
            " (a key left in STT_API_KEY for a server without API_KEYS: --api-key '' or unset it)",
            param_hint="'--api' / STT_API_URL")


def api_base(api: str) -> str:
    """ValueError for an address that is no HTTP one, or that httpx cannot read (an unclosed
    IPv6 bracket, a port that is no number): its InvalidURL was a traceback."""
    if not api.lower().startswith(("http://", "https://")):
        raise ValueError(f"--api / STT_API_URL must start with http:// or https:// (it is {shown_url(api)!r})")
    try:
        httpx.URL(api)
    except httpx.InvalidURL as exc:
        # Not the parser's words where the address holds a password: they quote the part they
        # failed on, which may be the password's (a "/" or "#" in it makes the rest read as the port).
        reason = (f"it is {shown_url(api)!r}; a password holding / ? # or @ must be percent-encoded"
                  if shown_url(api) != api else f"{exc}; it is {api!r}")
        raise ValueError(f"--api / STT_API_URL is not a valid URL ({reason})") from None
    return api.rstrip("/")


def shown_url(url: str) -> str:
    """The address with its password (https://user:password@host, sent as Basic auth) as ***, for
    messages; a user name without a password (https://TOKEN@host) is often a token: all ***."""
    return without_password(url, url)


def userinfo_of(url: str) -> str | None:
    """The address's userinfo (`user:password`, or a token as the user name) as written in it;
    None where it holds none. The userinfo is what comes before the last @ of the host part, which
    begins after the scheme's :// and ends at the first / ? or #: in http://host:8080/a@b the @ is
    the path's. An address the parser refuses (a password holding / or # makes it read the rest as
    a port that is no number), or one without a scheme (`user:pw@host:8000`, refused by api_base),
    is read by hand instead: everything up to its last @ is taken for the userinfo, so such a
    password is hidden too."""
    _, separator, rest = url.partition("://")
    authority = rest if separator else url
    if separator:
        with contextlib.suppress(ValueError):
            urlsplit(url).port  # noqa: B018 (a port that is not a number, or out of range, raises here)
            authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    userinfo, at, _ = authority.rpartition("@")
    return userinfo if at and userinfo else None


def hidden_password(userinfo: str) -> str:
    user, colon, _ = userinfo.partition(":")
    return f"{user}:***" if colon else "***"


def auth_headers(api_key: str | None) -> dict[str, str]:
    """The key as a header. A key read from a file often ends in a newline or a carriage return,
    which the server would strip, but httpx refuses to send and names the whole key in its error:
    ValueError (without the key) for one a header cannot carry."""
    key = (api_key or "").strip()
    if not key:
        return {}
    if not (key.isascii() and key.isprintable()):
        raise ValueError("the API key (--api-key / STT_API_KEY) holds characters a header cannot carry")
    return {"Authorization": f"Bearer {key}"}


def listed(client: httpx.Client, path: str, params: dict, limit: int | None = None) -> list[dict]:
    """The items of a paginated listing, page after page (following next_cursor), up to `limit`."""
    items: list[dict] = []
    params = dict(params)
    while limit is None or len(items) < limit:
        size = 500 if limit is None else min(500, limit - len(items))
        page = checked(client.get(path, params={**params, "limit": size})).json()
        items.extend(items_of(page, path))
        if "next_cursor" not in page:
            break
        params["cursor"] = page["next_cursor"]
    return items


def items_of(page: object, path: str) -> list[dict]:
    """A listing's items; UnexpectedAnswer for JSON that is no listing (another service at --api)."""
    if not isinstance(page, dict) or not isinstance(page.get("items"), list):
        raise UnexpectedAnswer(f"GET {path} answered JSON that is not a listing ({one_line(page)})")
    return page["items"]


def one_line(value: object) -> str:
    """JSON on one line, cut to 200 characters: for an answer quoted in a message."""
    line = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return line if len(line) <= 200 else line[:199] + "…"


def checked(response: httpx.Response) -> httpx.Response:
    """The response if it is a success; else ApiError with the service's reason. A redirect (a
    proxy sending http:// on to https://, say) is not followed: a DELETE or POST sent on could
    change meaning, and a followed GET would print the proxy's page as a transcript."""
    if response.is_redirect:
        raise ApiError(response.status_code, f"the API answered with a redirect to {response.headers.get('location')}:"
                                             " give that address as --api")
    if not response.is_success:
        raise ApiError(response.status_code, error_detail(response), _retry_after_s(response))
    return response


def error_detail(response: httpx.Response) -> str:
    """The service's `detail`; for a body that is not the API's JSON (a proxy's error page, say)
    one line of it, never a whole HTML page printed as the reason."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("detail"):
        return str(body["detail"])
    # Another JSON error (a gateway's {"message": ...}, printed over several lines): all of it, on one.
    line = (json.dumps(body, ensure_ascii=False, separators=(",", ":")) if body is not None
            else next((line.strip() for line in response.text.splitlines() if line.strip()), ""))
    if not line or line.startswith("<") or "html" in response.headers.get("content-type", ""):
        return response.reason_phrase or f"HTTP {response.status_code}"
    return line if len(line) <= 200 else line[:199] + "…"


@contextlib.contextmanager
def reporting_api_errors(api: str, unconfirmed: str | None = None) -> Iterator[None]:
    """Errors of the API as one line and exit 1. `unconfirmed`, for a command that changes
    something, is what to tell when its answer was lost ("the webhook may have been registered:
    see stt webhooks list"): running it again blindly could do it twice."""
    try:
        yield
    except AnswerLost as exc:
        fail(without_password(f"{exc}; {unconfirmed or 'it may have been done'}", api))
    except ApiError as exc:
        if unconfirmed and exc.status_code in GATEWAY_GAVE_UP:
            fail(f"{exc} (a gateway that gave up on the API, which may still be at it); {unconfirmed}")
        fail(str(exc))
    except httpx.TransportError as exc:
        if unconfirmed and not isinstance(exc, NOT_SENT):
            fail(without_password(f"{lost_answer(exc)}; {unconfirmed}", api))
        fail(transport_failure(exc, api))
    except (json.JSONDecodeError, UnicodeDecodeError):
        # What Response.json() raises for a success that is no JSON: --api naming a web page.
        fail(f"the API at {shown_url(api)} did not answer JSON; is --api right?")
    except UnexpectedAnswer as exc:
        fail(f"the API at {shown_url(api)}: {exc}; is --api right?")


def transport_failure(exc: httpx.TransportError, api: str) -> str:
    """Why a request that changes nothing failed, without the address's password."""
    if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, NOT_SENT):
        return f"the API at {shown_url(api)} did not answer within {read_timeout_s(exc)}"
    return f"cannot reach the API at {shown_url(api)}: {without_password(str(exc) or type(exc).__name__, api)}"


def lost_answer(exc: httpx.TransportError) -> str:
    """How the answer to a request that reached the API (or may have) was lost."""
    if isinstance(exc, httpx.TimeoutException):
        return f"the API did not answer within {read_timeout_s(exc)}"
    return f"the connection broke before the API answered ({str(exc) or type(exc).__name__})"


def sent_with_key(send: Callable[[dict[str, str]], httpx.Response], *, said_of: str = "", attempts: int = 2,
                  busy_wait_s: float = 0, gateway_gave_up_means: str | None = None) -> httpx.Response:
    """The answer to a request that makes something, sent by `send` with the headers given: an
    Idempotency-Key, so when its answer is lost (the connection broke after it was sent, no answer
    in time, a gateway gave up waiting for the API: 502, 504, 520-524) it is sent again with the
    same key, up to `attempts` times, and the service answers with what the first one made instead
    of making it again. While the service answers 503 with Retry-After (or a gateway's rate limit
    429 with Retry-After), it waits that long and sends it again, for up to `busy_wait_s` from the
    first such answer.
    AnswerLost when the last send fails after an earlier one may have made it, and at once when a
    gateway gave up on a request that must not be sent again (`gateway_gave_up_means` says why).
    `said_of` prefixes what is printed meanwhile."""
    headers = {"Idempotency-Key": str(uuid.uuid4())}
    # From the first busy answer, not the first send: that answer may come after a long upload.
    busy_until: float | None = None
    attempt = 1
    while True:
        try:
            response = send(headers)
        except (FileChanged, OSError) as exc:
            if attempt == 1:
                raise
            # Not sent again, but the first send, whose answer was lost, may have made it.
            raise not_sent_again(exc) from exc
        except httpx.TransportError as exc:
            # Not sent on the first attempt (no connection made): nothing reached the service, say
            # so. On a later one the service may be restarting, and may have made it already.
            if isinstance(exc, NOT_SENT) and attempt == 1:
                raise
            if attempt == attempts:
                raise AnswerLost(("sent again, " if attempt > 1 else "")
                                 + ("the API could not be reached" if isinstance(exc, NOT_SENT)
                                    else lost_answer(exc))) from exc
            stderr.print(f"{said_of}{escape(lost_answer(exc))}, sending it again")
        else:
            if response.status_code in GATEWAY_GAVE_UP:
                gateway_said = f"{response.status_code}: {error_detail(response)}"
                if gateway_gave_up_means is not None:
                    raise AnswerLost(f"no answer: a gateway answered {gateway_said} ({gateway_gave_up_means})")
                if attempt == attempts:
                    break
                stderr.print(f"{said_of}a gateway answered {escape(gateway_said)}, sending it again")
            else:
                wait_s = _retry_after_s(response)
                if wait_s is None:
                    break
                if busy_until is None:
                    busy_until = time.monotonic() + busy_wait_s
                if time.monotonic() + wait_s > busy_until:
                    break
                stderr.print(f"{said_of}the server is busy, trying again in {wait_s:g} s")
                time.sleep(wait_s)
                continue
        time.sleep(RESEND_PAUSE_S * attempt)
        attempt += 1
    if attempt > 1 and (response.status_code >= 500 or response.status_code == 429):
        # Refused now (busy or rate-limited past the wait, restarting), but an earlier send may
        # have made it.
        raise AnswerLost(f"sent again, it was answered {response.status_code}: {error_detail(response)}")
    return response


def not_sent_again(exc: FileChanged | OSError) -> AnswerLost:
    """A file that changed or cannot be read as it was to be sent again, after a send that may have
    made what it asked for."""
    reason = exc if isinstance(exc, FileChanged) else (exc.strerror or exc)
    return AnswerLost(f"not sent again, it changed or cannot be read now ({reason})")


def sent_confirming(send: Callable[[dict[str, str]], httpx.Response], *, said_of: str = "", attempts: int = 2,
                    busy_wait_s: float = 0, gateway_gave_up_means: str | None = None) -> httpx.Response:
    """sent_with_key with these, for a request that makes a job: a 503 naming a job that may
    have been created (MAYBE_CREATED: its COMMIT's answer lost, the database away since) is sent
    again with the same key while the server asks to wait (busy_wait_s), and gets that job if it was
    created. If no send confirms it, AnswerLost naming that job (the request may have been
    accepted as it), not a refusal; so too where the file to send again changed or went meanwhile."""
    maybe_created: list[str] = []

    def sent(headers: dict[str, str]) -> httpx.Response:
        try:
            response = send(headers)
        except (FileChanged, OSError) as exc:
            if not maybe_created:
                raise
            raise not_sent_again(exc) from exc
        if response.status_code == 503 and MAYBE_CREATED.search(error_detail(response)):
            maybe_created.append(f"it was answered 503: {error_detail(response)}")
        return response

    try:
        response = sent_with_key(sent, said_of=said_of, attempts=attempts, busy_wait_s=busy_wait_s,
                                 gateway_gave_up_means=gateway_gave_up_means)
    except (AnswerLost, httpx.TransportError) as exc:
        if maybe_created:
            then = (str(exc) if isinstance(exc, AnswerLost) else "the API could not be reached"
                    if isinstance(exc, NOT_SENT) else lost_answer(exc))
            raise AnswerLost(f"{maybe_created[0]}; then {then}") from exc
        raise
    if maybe_created and not response.is_success:
        later = f"it was answered {response.status_code}: {error_detail(response)}"
        raise AnswerLost(maybe_created[0] if later == maybe_created[0] else f"{maybe_created[0]}; then {later}")
    return response


def read_timeout_s(exc: httpx.TimeoutException) -> str:
    """"30 s": how long the request waited for its answer."""
    try:
        seconds = exc.request.extensions["timeout"]["read"]
    except (RuntimeError, KeyError, TypeError):  # a request not set on the error
        return "the time allowed"
    return f"{seconds:g} s" if seconds is not None else "the time allowed"


def without_password(text: str, api: str) -> str:
    """`text` with the address `api` (wherever it is quoted) showing its password (or a user name
    without one, a token) as ***. Only the address's userinfo@ is replaced, never the password's
    characters elsewhere: a short one ("80", "a") would have turned port numbers and ordinary
    words into ***."""
    userinfo = userinfo_of(api)
    return text if userinfo is None else text.replace(f"{userinfo}@", f"{hidden_password(userinfo)}@")


def multipart_body(path: Path, fields: dict[str, str],
                   on_sent: Callable[[int], None]) -> tuple[dict[str, str], Iterator[bytes]]:
    """Headers and a streamed multipart/form-data body: the file is read in chunks as httpx
    sends them (never whole into memory), and `on_sent` hears of each chunk. The body raises
    FileChanged, before its end is sent, where the file no longer has the size declared (OSError
    where it cannot be read), so the server never takes the request for a complete one."""
    boundary = secrets.token_hex(16)
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields.items()]
    quoted_name = printable_name(path).replace('"', "%22").replace("\r", "").replace("\n", "")
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{quoted_name}"\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n".encode())
    head = b"".join(parts)
    tail = f"\r\n--{boundary}--\r\n".encode()

    size = path.stat().st_size

    def body() -> Iterator[bytes]:
        yield head
        left = size
        with path.open("rb") as file:
            while left:
                chunk = file.read(min(UPLOAD_CHUNK_BYTES, left))
                if not chunk:
                    raise FileChanged(f"it shrank below the {size} bytes it had when its upload began")
                left -= len(chunk)
                yield chunk
                on_sent(len(chunk))
            if file.read(1):
                raise FileChanged(f"it grew past the {size} bytes it had when its upload began")
        yield tail

    # A known length lets the server refuse an over-size upload before it is sent.
    length = len(head) + size + len(tail)
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}", "Content-Length": str(length)}
    return headers, body()


# Errors raised before a request leaves this machine: sending it again cannot help.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.UnsupportedProtocol, httpx.LocalProtocolError,
            httpx.ProxyError)


def upload(client: httpx.Client, source: Path | str, fields: dict[str, str]) -> SubmittedJob:
    """Upload one file, or give the address the service fetches it from, sent with a key
    (sent_confirming): again up to UPLOAD_ATTEMPTS times when its answer is lost, and while the
    server is busy for up to UPLOAD_BUSY_WAIT_S. An address a gateway gave up on is not sent
    again: the service downloads and decodes it before it answers, so it may still be
    downloading, and a second send would start a second download of the same recording."""
    if isinstance(source, Path):
        def send(headers: dict[str, str]) -> httpx.Response:
            return _post_upload(client, source, fields, headers)
        gateway_gave_up_means = None
    else:
        def send(headers: dict[str, str]) -> httpx.Response:
            return _post_url(client, source, fields, headers)
        gateway_gave_up_means = "the service may still be fetching the address"
    # A 503 naming a job that may have been created: the upload may have been accepted as that job.
    response = sent_confirming(send, said_of=f"{escape(source_name(source))}: ", attempts=UPLOAD_ATTEMPTS,
                               busy_wait_s=UPLOAD_BUSY_WAIT_S, gateway_gave_up_means=gateway_gave_up_means)
    accepted = checked(response).json()
    return SubmittedJob(id=int(accepted["id"]), filename=accepted.get("filename", source_name(source)))


def source_name(source: Path | str) -> str:
    return printable_name(source) if isinstance(source, Path) else shown_address(source)


def shown_address(url: str) -> str:
    """A recording's address as printed: scheme, host and path only. A presigned URL's query holds
    its signature (anyone with it may fetch the recording until it expires), userinfo a password."""
    scheme, _, rest = url.partition("://")
    authority, slash, path = re.split(r"[?#]", rest, maxsplit=1)[0].partition("/")
    return f"{scheme}://{authority.rpartition('@')[2]}{slash}{path}"


def printable_name(path: Path) -> str:
    """The file's name as text: a name that is not UTF-8 (Linux allows any bytes) has its odd
    bytes replaced, where sending or printing it as it is would raise UnicodeEncodeError."""
    return os.fsencode(path.name).decode("utf-8", "replace")


def recording_source(argument: str) -> Path | str:
    """An http(s) address as given, else an existing file."""
    if argument.startswith(("http://", "https://")):
        return argument
    path = Path(argument)
    if not path.is_file():
        raise typer.BadParameter(f"{argument}: no such file (or give an http:// or https:// address)")
    try:
        path.open("rb").close()
    except OSError as exc:
        raise typer.BadParameter(f"{argument}: cannot be read ({exc.strerror or exc})") from None
    return path


def _post_url(client: httpx.Client, url: str, fields: dict[str, str], headers: dict[str, str]) -> httpx.Response:
    form = {name: (None, value) for name, value in {"url": url, **fields}.items()}
    # The service downloads the recording and decodes it before it answers.
    return client.post("/recognize", files=form, headers=headers, timeout=httpx.Timeout(900, connect=10))


def _retry_after_s(response: httpx.Response) -> float | None:
    """Seconds a 503 (the service busy) or a 429 (a rate limit) asks to wait (its Retry-After, in
    seconds or an HTTP date, as gateways' rate limits give it: the whole seconds until then), at
    most UPLOAD_BUSY_WAIT_S; None for any other answer."""
    if response.status_code not in (429, 503) or "retry-after" not in response.headers:
        return None
    value = response.headers["retry-after"].strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        # An HTTP date is GMT; one written with -0000 is read without a zone.
        when = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
        seconds = math.ceil((when - datetime.now(UTC)).total_seconds())
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), UPLOAD_BUSY_WAIT_S)


def _post_upload(client: httpx.Client, path: Path, fields: dict[str, str], headers: dict[str, str]) -> httpx.Response:
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    # Off where stderr is not a terminal: a finished upload bar in a log says nothing.
    with Progress(*columns, console=stderr, transient=True, disable=not stderr.is_terminal) as progress:
        task = progress.add_task(f"uploading {escape(printable_name(path))}", total=path.stat().st_size)
        body_headers, body = multipart_body(path, fields, lambda sent: progress.advance(task, sent))
        # The server decodes the whole file before it answers: allow for that after the upload.
        return client.post("/recognize", content=body, headers={**headers, **body_headers},
                           timeout=httpx.Timeout(300, connect=10))


# ---- following jobs -------------------------------------------------------------------------


def job_percent(document: dict) -> float:
    if document["status"] == "done":
        return 100.0
    return float(document.get("percent") or 0)


def stage_label(document: dict) -> str:
    if document["status"] == "error":
        return "[red]error"
    if document["status"] == "done":
        return "[green]done"
    return escape(str(document.get("stage") or document["status"]))


def status_document(response: httpx.Response) -> dict:
    """A /status answer's document; UnexpectedAnswer for JSON that is not one (another service at
    --api), json.JSONDecodeError or UnicodeDecodeError for no JSON at all (a gateway's page)."""
    document = response.json()
    if (not isinstance(document, dict) or not isinstance(document.get("status"), str)
            or not isinstance(document.get("segments", []), list)):
        raise UnexpectedAnswer(f"GET {response.request.url.path} answered JSON that is not a job's status"
                               f" ({one_line(document)})")
    return document


def follow_jobs(client: httpx.Client, jobs: list[SubmittedJob],
                finished: dict[int, dict] | None = None) -> dict[int, dict]:
    """Poll every job until each is done or in error (or the API stops telling: NOT_FOLLOWED),
    drawing a stage and percent per job. A 429 or 503 with Retry-After pauses all the polling for
    that long, waited out as the API away is. Returns each job's final status document, and puts it
    in `finished` as each ends (for a caller stopped by Ctrl-C to tell which did)."""
    finished = {} if finished is None else finished
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
               TextColumn("{task.fields[stage]}"))
    with Progress(*columns, console=stderr) as progress:
        tasks = {job.id: progress.add_task(f"job {job.id} {escape(job.filename)}", total=100, stage="submitted")
                 for job in jobs}
        errors_in_a_row = dict.fromkeys(tasks, 0)
        answered_at = time.monotonic()  # when the API last answered (other than 502-504)
        while True:
            pause_s = POLL_INTERVAL_S
            for job in jobs:
                if job.id in finished:
                    continue
                away_s = time.monotonic() - answered_at
                try:
                    # The segments only once: a long job's would be read again every second.
                    document = status_document(checked(client.get(f"/status/{job.id}",
                                                                   params={"segments": "false"})))
                    if document["status"] in FINISHED:
                        document = status_document(checked(client.get(f"/status/{job.id}")))
                except httpx.TransportError as exc:
                    if away_s < API_AWAY_S:
                        progress.update(tasks[job.id], stage="[yellow]API unreachable, retrying")
                        continue
                    document = {"status": NOT_FOLLOWED, "segments": [],
                                "error": f"the API has not answered for {away_s / 60:.0f} minutes ({exc})"}
                except ApiError as exc:
                    if exc.retry_after_s is not None and away_s < API_AWAY_S:
                        # Asked to slow down: polling the other jobs now would be asked the same.
                        pause_s = max(pause_s, exc.retry_after_s)
                        progress.update(tasks[job.id], stage=f"[yellow]{escape(exc.detail)}, retrying")
                        break
                    if exc.status_code not in TRANSIENT_STATUS_CODES and exc.retry_after_s is None:
                        answered_at = time.monotonic()
                    errors_in_a_row[job.id] += exc.status_code in RETRIED_STATUS_CODES
                    # One asking to wait is waited out as the API away is, within API_AWAY_S only: past
                    # it, FOLLOW_TRIES more polls a job would keep a script waiting on a rate limit.
                    if (exc.status_code in TRANSIENT_STATUS_CODES and away_s < API_AWAY_S) or (
                            exc.status_code in RETRIED_STATUS_CODES and exc.retry_after_s is None
                            and errors_in_a_row[job.id] < FOLLOW_TRIES):
                        progress.update(tasks[job.id], stage=f"[yellow]{escape(exc.detail)}, retrying")
                        continue
                    # Not the job's end: the API would not say how it is (a key refused, the job
                    # deleted, an error of the API's own, an API away for too long).
                    document = {"status": NOT_FOLLOWED, "segments": [], "error": str(exc)}
                except (UnexpectedAnswer, json.JSONDecodeError, UnicodeDecodeError) as exc:
                    # Waited out as a 500 is (a page of a gateway's or a captive portal's answered
                    # 200), then this job is not followed: the others go on being, and each is
                    # listed with how to look at it later.
                    answered_at = time.monotonic()
                    errors_in_a_row[job.id] += 1
                    if errors_in_a_row[job.id] < FOLLOW_TRIES:
                        progress.update(tasks[job.id], stage="[yellow]answer not understood, retrying")
                        continue
                    error = (str(exc) if isinstance(exc, UnexpectedAnswer)
                             else f"GET /status/{job.id} answered something that is not JSON")
                    document = {"status": NOT_FOLLOWED, "segments": [], "error": error}
                else:
                    answered_at = time.monotonic()
                errors_in_a_row[job.id] = 0
                progress.update(tasks[job.id], completed=job_percent(document), stage=stage_label(document))
                if document["status"] in (*FINISHED, NOT_FOLLOWED):
                    finished[job.id] = document
            if len(finished) == len(jobs):
                return finished
            time.sleep(pause_s)


# ---- printing -------------------------------------------------------------------------------


def clock(seconds: float) -> str:
    """00:01.5, or 1:02:03.4 past an hour."""
    minutes, secs = divmod(round(max(seconds, 0.0), 1), 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}:{minutes:02d}:{secs:04.1f}" if hours else f"{minutes:02d}:{secs:04.1f}"


class SpeakerColours:
    """One colour per speaker, in the order speakers first appear."""

    def __init__(self) -> None:
        self.assigned: dict[str, str] = {}

    def __call__(self, speaker: str) -> str:
        if speaker not in self.assigned:
            self.assigned[speaker] = SPEAKER_COLOURS[len(self.assigned) % len(SPEAKER_COLOURS)]
        return self.assigned[speaker]


def segment_line(start_ts: float, speaker: str, text: str, colours: SpeakerColours, prefix: str = "") -> Text:
    line = Text(prefix)
    line.append(f"[{clock(start_ts)}] ", style="dim")
    line.append(f"{speaker}: ", style=f"bold {colours(speaker)}")
    line.append(text.strip())
    return line


def print_transcript(job: SubmittedJob, document: dict) -> None:
    stdout.print(Text(f"job {job.id}: {job.filename}", style="bold"))
    colours = SpeakerColours()
    for segment in document["segments"]:
        speaker = segment.get("speaker_name") or segment["speaker"]
        stdout.print(segment_line(segment["start_ts"], speaker, segment["text"], colours))
    if not document["segments"]:
        stdout.print(Text("(no speech)", style="dim"))


# ---- commands -------------------------------------------------------------------------------


# What a job asks for, the same in submit and rerun.
Language = Annotated[str | None, typer.Option(
    help="Spoken language as a Whisper code (en, ru...); left out: detected (rerun: the first job's); several"
         " (en,de) or multi: the recording switches language, each speaker's passage is transcribed in its own.",
    show_default=False)]
ExactSpeakers = Annotated[int | None, typer.Option(help="Exact number of speakers.", min=1, show_default=False)]
MinSpeakers = Annotated[int | None, typer.Option(help="At least this many speakers.", min=1, show_default=False)]
MaxSpeakers = Annotated[int | None, typer.Option(help="At most this many speakers.", min=1, show_default=False)]
Vocabulary = Annotated[str | None, typer.Option(
    help="Names and terms the recordings use, comma-separated (people, products, jargon), so that they are "
    "spelled so.", show_default=False)]
Spelling = Annotated[str | None, typer.Option(
    help="Custom spelling, heard=written pairs, comma-separated: --spelling \"confu i=ComfyUI\".",
    show_default=False)]
Redact = Annotated[str | None, typer.Option(
    help="Replace these in the text before it is stored, comma-separated: email, card, phone, number "
    "(every number in digits).", show_default=False)]
Expect = Annotated[str | None, typer.Option(
    help="Enrolled speakers who may talk in it, comma-separated names (\"Anna, Boris\"): recognition names "
    "speakers after these only (stt speakers list shows who is enrolled).", show_default=False)]
Reference = Annotated[str | None, typer.Option(
    help="Your own name for the job (a call id, a ticket), returned with it and in its events; "
    "stt list --reference finds it.", show_default=False)]


def speaker_counts(speakers: int | None, min_speakers: int | None, max_speakers: int | None) -> dict:
    if speakers is not None and (min_speakers is not None or max_speakers is not None):
        raise typer.BadParameter("give either --speakers or --min-speakers/--max-speakers, not both")
    return {"num_speakers": speakers, "min_speakers": min_speakers, "max_speakers": max_speakers}


@app.command()
def submit(
    recordings: Annotated[list[str], typer.Argument(
        metavar="FILE|URL", show_default=False,
        help="Audio or video files, or http(s) addresses the service fetches them from.")],
    language: Language = None,
    speakers: ExactSpeakers = None,
    min_speakers: MinSpeakers = None,
    max_speakers: MaxSpeakers = None,
    expect: Expect = None,
    multichannel: Annotated[bool, typer.Option(
        "--multichannel", help="Each channel is its own party (a call recorded one side per channel): "
        "transcribe the channels apart.")] = False,
    vocabulary: Vocabulary = None,
    translate: Annotated[bool, typer.Option(
        "--translate", help="Write the text in English, whatever the language spoken.")] = False,
    spelling: Spelling = None,
    redact: Redact = None,
    reference: Reference = None,
    wait: Annotated[bool, typer.Option(
        help="Follow the jobs and print their transcripts; --no-wait prints the job ids and returns.")] = True,
    api: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
) -> None:
    """Upload recordings for transcription.

    Exits non-zero when an upload is refused or a job ends in error.
    """
    options = {"language": language, **speaker_counts(speakers, min_speakers, max_speakers),
               "expected_speakers": expect, "multichannel": "true" if multichannel else None,
               "vocabulary": vocabulary, "task": "translate" if translate else None,
               "spelling": spelling, "redact": redact, "reference": reference}
    fields = {name: str(value) for name, value in options.items() if value is not None}
    sources = [recording_source(argument) for argument in recordings]
    jobs: list[SubmittedJob] = []
    refused = 0
    with reporting_api_errors(api), api_client(api, api_key) as client:
        for number, source in enumerate(sources):
            name = source_name(source)
            try:
                job = upload(client, source, fields)
            except KeyboardInterrupt:
                stopped_uploading(name, jobs, [source_name(s) for s in sources[number + 1:]])
            except ApiError as exc:
                refused += 1
                stderr.print(Text(f"{name}: refused, {exc}", style="red"))
                continue
            except AnswerLost as exc:
                refused += 1
                stderr.print(Text(f"{name}: {without_password(str(exc), api)}; it may have been accepted:"
                                  f" see stt list before sending it again", style="red"))
                continue
            except httpx.TransportError as exc:
                refused += 1
                stderr.print(Text(f"{name}: upload failed, {transport_failure(exc, api)}", style="red"))
                continue
            except FileChanged as exc:
                refused += 1
                stderr.print(Text(f"{name}: not sent, it changed while it was being sent ({exc}); is it still being"
                                  f" written?", style="red"))
                continue
            except OSError as exc:  # gone, or unreadable, since it was checked
                refused += 1
                stderr.print(Text(f"{name}: not sent, it cannot be read ({exc.strerror or exc})", style="red"))
                continue
            jobs.append(job)
            stderr.print(f"{escape(name)}: accepted as job [bold]{job.id}[/]")
            if not wait:
                stdout.print(job.id)
        if not wait or not jobs:
            raise typer.Exit(1 if refused else 0)
        failed = wait_and_print(client, jobs)
    raise typer.Exit(1 if refused or failed else 0)


def stopped_uploading(name: str, jobs: list[SubmittedJob], not_sent: list[str]) -> NoReturn:
    """Ctrl-C while an upload waited for its answer: the service may have made its job all the
    same, so the user is told to look before sending it again, and how to look at those accepted."""
    stderr.print(Text(f"{name}: stopped before the API answered; it may have been accepted: see stt list before"
                      f" sending it again", style="red"))
    if not_sent:
        stderr.print(f"not sent: {escape(', '.join(not_sent))}")
    if jobs:
        stderr.print("the jobs accepted go on:")
        print_how_to_look(jobs, {})
    raise typer.Exit(130)


def print_how_to_look(jobs: list[SubmittedJob], finished: dict[int, dict]) -> None:
    """One command a job (`stt status` takes one id): its status, or its transcript once done."""
    for job in jobs:
        ended = finished.get(job.id, {}).get("status")
        what = (f"is done: stt get {job.id} --format txt" if ended == "done"
                else f"failed: stt status {job.id}" if ended == "error" else f"stt status {job.id}")
        stderr.print(f"  job {job.id} ({escape(job.filename)}) {what}")


def wait_and_print(client: httpx.Client, jobs: list[SubmittedJob]) -> int:
    """Follow the jobs to their end and print each transcript; returns how many failed."""
    finished: dict[int, dict] = {}
    try:
        documents = follow_jobs(client, jobs, finished)
    except KeyboardInterrupt:
        stderr.print("stopped waiting; the jobs go on:")
        print_how_to_look(jobs, finished)
        raise typer.Exit(130) from None
    failed = 0
    for job in jobs:
        document = documents[job.id]
        if document["status"] == "done":
            print_transcript(job, document)
        elif document["status"] == NOT_FOLLOWED:
            failed += 1  # its outcome is not known: not a success
            stderr.print(Text(f"job {job.id} ({job.filename}): could not follow it ({document['error']}); it may"
                              f" still be running: stt status {job.id}", style="red"))
        else:
            failed += 1
            stderr.print(Text(f"job {job.id} ({job.filename}) failed: {document.get('error') or 'unknown error'}",
                              style="red"))
    return failed


@app.command()
def rerun(
    job_id: Annotated[int, typer.Argument(metavar="ID", help="The job whose recording runs again.",
                                          show_default=False)],
    language: Language = None,
    speakers: ExactSpeakers = None,
    min_speakers: MinSpeakers = None,
    max_speakers: MaxSpeakers = None,
    expect: Expect = None,
    vocabulary: Vocabulary = None,
    translate: Annotated[bool | None, typer.Option(
        "--translate/--transcribe", help="Write the text in English / in the language spoken.",
        show_default=False)] = None,
    spelling: Spelling = None,
    redact: Redact = None,
    reference: Reference = None,
    multichannel: Annotated[bool | None, typer.Option(
        "--multichannel/--mixed", help="Each channel is its own party / mix the channels into one (with"
                                       " --speakers on a job that kept its channels apart).",
        show_default=False)] = None,
    wait: Annotated[bool, typer.Option(
        help="Follow the new job and print its transcript; --no-wait prints its id and returns.")] = True,
    api: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
) -> None:
    """Run a job's recording again as a new job, with its options except those given.

    For a miscounted meeting: stt rerun 12 --speakers 4. The first job stays as it is.
    """
    task = None if translate is None else "translate" if translate else "transcribe"
    changes = {"language": language, **speaker_counts(speakers, min_speakers, max_speakers),
               "expected_speakers": expect, "vocabulary": vocabulary, "task": task, "spelling": spelling,
               "redact": redact, "reference": reference, "multichannel": multichannel}
    unconfirmed = f"a new run of job {job_id} may have been made: see stt list before running it again"
    with api_client(api, api_key) as client, reporting_api_errors(api, unconfirmed):
        try:
            # Waited out as an upload is while the server is busy (its database briefly away), with
            # the same key; a 503 naming a job that may have been created is a run that may exist.
            accepted = checked(sent_confirming(lambda headers: client.post(
                f"/transcripts/{job_id}/rerun", json={k: v for k, v in changes.items() if v is not None},
                headers=headers), busy_wait_s=UPLOAD_BUSY_WAIT_S)).json()
        except KeyboardInterrupt:
            stderr.print(Text(f"stopped before the API answered; {unconfirmed}", style="red"))
            raise typer.Exit(130) from None
        job = SubmittedJob(id=accepted["id"], filename=accepted["filename"])
        stderr.print(f"job {job_id} runs again as job [bold]{job.id}[/]")
        if not wait:
            stdout.print(job.id)
            raise typer.Exit(0)
        raise typer.Exit(1 if wait_and_print(client, [job]) else 0)


def print_json(value: object) -> None:
    """The API's JSON as it came, indented, non-ASCII kept (for --json)."""
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


@app.command()
def status(
    job_id: Annotated[int, typer.Argument(metavar="ID", help="Job id, as printed by submit.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the status document as JSON.")] = False,
    api: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
) -> None:
    """Show a job's state: status, stage, percent, error."""
    with reporting_api_errors(api), api_client(api, api_key) as client:
        document = status_document(checked(client.get(f"/status/{job_id}")))
    if as_json:
        print_json(document)
        return
    table = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
    table.add_column(style="bold")
    table.add_column()
    colour = {"done": "green", "error": "red"}.get(document["status"], "yellow")
    table.add_row("job", str(job_id))
    table.add_row("status", Text(document["status"], style=colour))
    table.add_row("stage", Text(str(document.get("stage", "-"))))
    table.add_row("percent", f"{job_percent(document):.0f}%")
    table.add_row("segments", str(len(document.get("segments", []))))
    if document.get("error"):
        table.add_row("error", Text(document["error"], style="red"))
    stdout.print(table)


class JobState(StrEnum):
    processing = "processing"
    done = "done"
    error = "error"


@app.command(name="list")
def list_jobs(
    state: Annotated[JobState | None, typer.Option("--status", help="Only jobs in this state.",
                                                   show_default=False)] = None,
    filename: Annotated[str | None, typer.Option(help="Only files whose name contains this (any case).",
                                                 show_default=False)] = None,
    since: Annotated[str | None, typer.Option(help="Created at or after this ISO 8601 date or time (UTC if no"
                                                   " offset): 2026-12-01, 2026-12-01T09:30.",
                                              show_default=False)] = None,
    until: Annotated[str | None, typer.Option(help="Created before this date or time.", show_default=False)] = None,
    reference: Annotated[str | None, typer.Option(help="Only jobs submitted with this --reference.",
                                                  show_default=False)] = None,
    limit: Annotated[int, typer.Option(help="Jobs to show.", min=1)] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print the jobs as JSON (the API's items).")] = False,
    api: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
) -> None:
    """Your jobs, newest first: id, status, percent, created (UTC), duration, language, file, reference."""
    filters = {"status": state.value if state else None, "filename": filename, "since": since, "until": until,
               "reference": reference}
    params: dict[str, str | int] = {name: value for name, value in filters.items() if value is not None}
    with reporting_api_errors(api), api_client(api, api_key) as client:
        items = listed(client, "/transcripts", params, limit)
    if as_json:
        print_json(items)
        return
    for item in items:
        created = item["created_at"][:16].replace("T", " ")
        duration = clock(item["duration"]) if item.get("duration") is not None else "-"
        sys.stdout.write(f"{item['id']}\t{item['status']}\t{item['percent']}%\t{created}\t{duration}\t"
                         f"{item.get('language') or '-'}\t{item['filename']}\t{item.get('reference') or '-'}\n")
    if not items:
        stderr.print("no jobs")


@app.command()
def get(
    job_id: Annotated[int, typer.Argument(metavar="ID", help="Job id, as printed by submit.", show_default=False)],
    output_format: Annotated[TranscriptFormat, typer.Option("--format", "-f", help="Document format.")]
    = TranscriptFormat.json,
    output: Annotated[Path | None, typer.Option("--output", "-o", dir_okay=False, show_default=False,
                                                help="Write to this file instead of stdout.")] = None,
    words: Annotated[bool, typer.Option("--words", help="JSON: each segment's words with their times and"
                                                        " probabilities.")] = False,
    max_line_width: Annotated[int | None, typer.Option(
        min=12, max=200, show_default=False,
        help="SRT and WebVTT: the most characters on a subtitle line (default 42).")] = None,
    max_line_count: Annotated[int | None, typer.Option(
        min=1, max=10, show_default=False, help="SRT and WebVTT: the most lines in a cue (default 2).")] = None,
    api: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
) -> None:
    """Fetch a transcript as JSON, SRT or WebVTT subtitles, plain text, or the diarization as RTTM."""
    if words and output_format is not TranscriptFormat.json:
        raise typer.BadParameter("--words goes with --format json")
    cue_limits = {"max_line_width": max_line_width, "max_line_count": max_line_count}
    if any(v is not None for v in cue_limits.values()) and output_format not in (TranscriptFormat.srt,
                                                                                  TranscriptFormat.vtt):
        raise typer.BadParameter("--max-line-width and --max-line-count go with --format srt or vtt")
    params = {"format": output_format.value, **({"words": "true"} if words else {}),
              **{name: value for name, value in cue_limits.items() if value is not None}}
    with reporting_api_errors(api), api_client(api, api_key) as client:
        response = checked(client.get(f"/transcripts/{job_id}", params=params))
        if output_format is TranscriptFormat.json:
            content = (json.dumps(response.json(), indent=2, ensure_ascii=False) + "\n").encode()
        else:
            expected = TEXT_MEDIA_TYPES[output_format.value]
            media_type = response.headers.get("content-type", "").partition(";")[0].strip().lower()
            if media_type != expected:
                raise UnexpectedAnswer(f"GET /transcripts/{job_id} answered {media_type or 'no Content-Type'},"
                                       f" not {expected}")
            content = response.content
    if output is None:
        sys.stdout.buffer.write(content)
        sys.stdout.flush()
    else:
        try:
            write_atomically(output, content)
        except OSError as exc:
            fail(f"cannot write {output}: {exc.strerror or exc}")
        stderr.print(f"wrote {escape(str(output))}")


# /dev/stdout, /dev/fd/3, /proc/self/fd/3: a descriptor of this process, by its number.
OWN_DESCRIPTOR_PATH = re.compile(r"/(?:dev/std(in|out|err)|(?:dev|proc/self|proc/thread-self)/fd/(\d+))")


def write_atomically(path: Path, content: bytes) -> None:
    """`content` written to a temporary file beside `path` (beside the file a link points to),
    then renamed over it: a write that fails (a full disk, Ctrl-C) leaves the old file as it was,
    never half of the new one. Not a device or a pipe (`/dev/null`, `/dev/stdout`): written to as
    it is (write_in_place)."""
    if write_in_place(path, content):
        return
    target = path.resolve()
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        with temporary.open("xb") as file:
            file.write(content)
        with contextlib.suppress(FileNotFoundError):  # a file kept private stays so
            temporary.chmod(target.stat().st_mode & 0o7777)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_in_place(path: Path, content: bytes) -> bool:
    """Writes `content` to `path` as it is, without a rename, and says so, where `path` is no
    regular file (a device, a pipe), is under /proc/, or names a descriptor of this process
    (/dev/stdout, /dev/fd/N), link by link. Decided on the path as given, before resolving it:
    /dev/stdout resolves to the file the shell redirected stdout to, and a file renamed over that
    one wiped what it held (`>> log.txt`). A descriptor is written through, at its offset: a file
    opened for `{ ...; } > both.txt` is neither truncated nor written over."""
    hop = os.path.abspath(path)
    for _ in range(40):  # the kernel's own limit of links followed
        if (own := OWN_DESCRIPTOR_PATH.fullmatch(hop)) and is_open(
                descriptor := ("in", "out", "err").index(own[1]) if own[1] else int(own[2])):
            sys.stdout.flush()
            write_to_descriptor(descriptor, content)
            return True
        if hop.startswith("/proc/") or not os.path.islink(hop):
            break
        hop = os.path.normpath(os.path.join(os.path.dirname(hop), os.readlink(hop)))
    if hop.startswith("/proc/"):
        in_place = True
    elif os.path.exists(path):
        in_place = not os.path.isfile(path)
    else:
        # A mistyped device is not made a file (as root, in /dev): writing it fails. A new file
        # in a folder under /dev (/dev/shm) is made as anywhere else.
        in_place = os.path.dirname(hop) == "/dev"
    if not in_place:
        return False
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        write_to_descriptor(descriptor, content)
    finally:
        os.close(descriptor)
    return True


def is_open(descriptor: int) -> bool:
    try:
        os.fstat(descriptor)
    except OSError:
        return False
    return True


def write_to_descriptor(descriptor: int, content: bytes) -> None:
    view = memoryview(content)
    while view:
        view = view[os.write(descriptor, view):]


class SearchMode(StrEnum):
    hybrid = "hybrid"
    semantic = "semantic"
    text = "text"


def marked(highlighted: str) -> Text:
    """A hit's `highlighted` as text, what the server's <mark>...</mark> enclose shown highlighted.
    The server escapes the text (HTML) and adds only those tags: a `<mark>` said in a transcript
    comes as `&lt;mark&gt;`, and is shown as it was said."""
    line = Text()
    for i, piece in enumerate(re.split(r"</?mark>", highlighted)):
        line.append(html.unescape(piece), style="bold reverse" if i % 2 else "")
    return line


@app.command()
def name(
    job_id: Annotated[int, typer.Argument(metavar="ID", help="Job id.", show_default=False)],
    names: Annotated[list[str] | None, typer.Argument(
        metavar="LABEL=NAME", help="spk_0=Anna spk_1=Boris; LABEL= removes the name. Without any: list the "
        "speakers (label, name, speaking time, how the name was given).", show_default=False)] = None,
    api: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
) -> None:
    """Name a job's speakers by hand (names given here always win over recognition), or list them."""
    if not names:
        with reporting_api_errors(api), api_client(api, api_key) as client:
            speakers = checked(client.get(f"/transcripts/{job_id}/speakers")).json()["speakers"]
        for label, speaker in speakers.items():
            source = speaker.get("source")
            given = "by hand" if source == "manual" else f"recognised ({speaker['confidence']:.2f})" if source else ""
            sys.stdout.write(f"{label}\t{speaker.get('name') or '-'}\t{clock(speaker['speech_s'])}\t{given}\n")
        return
    changes: dict[str, str | None] = {}
    for pair in names:
        label, sep, value = pair.partition("=")
        if not sep or not label.strip():
            raise typer.BadParameter(f"{pair!r} is not LABEL=NAME (spk_0=Anna)", param_hint="LABEL=NAME")
        changes[label.strip()] = value.strip() or None
    with reporting_api_errors(api, f"the names may have been given: see stt name {job_id}"), \
            api_client(api, api_key) as client:
        speakers = checked(client.patch(f"/transcripts/{job_id}/speakers", json=changes)).json()["speakers"]
    for label, given in speakers.items():
        sys.stdout.write(f"{label}\t{given or '-'}\n")


@app.command()
def delete(
    job_ids: Annotated[list[int], typer.Argument(metavar="ID", help="Job ids.", show_default=False)],
    api: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
) -> None:
    """Delete ended jobs: their transcripts, voices and audio. Exits 1 if any could not be deleted."""
    def delete_one(client: httpx.Client, job_id: int) -> str:
        checked(client.delete(f"/transcripts/{job_id}"))
        return f"deleted job {job_id}"

    for_each_job(job_ids, api, api_key, delete_one, "not deleted", "deleted")


@app.command()
def cancel(
    job_ids: Annotated[list[int], typer.Argument(metavar="ID", help="Job ids.", show_default=False)],
    api: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
) -> None:
    """Stop jobs that are still processing (what they stored so far is kept until you delete them).
    Exits 1 if any could not be cancelled."""
    def cancel_one(client: httpx.Client, job_id: int) -> str:
        document = checked(client.post(f"/transcripts/{job_id}/cancel")).json()
        return f"cancelled job {job_id} ({len(document['segments'])} segments kept)"

    for_each_job(job_ids, api, api_key, cancel_one, "not cancelled", "cancelled")


def for_each_job(job_ids: list[int], api: str, api_key: str | None, act: Callable[[httpx.Client, int], str],
                 refusal: str, done_as: str) -> None:
    """`act` on each job, printing what it says; one the API refuses is reported (`job 7: <refusal>,
    <reason>`) and the rest go on, as does one whose answer was lost (`it may have been <done_as>`).
    Exits 1 if any was refused or not answered."""
    refused = 0
    with reporting_api_errors(api), api_client(api, api_key) as client:
        for job_id in job_ids:
            lost = None
            try:
                done = act(client, job_id)
            except ApiError as exc:
                if exc.status_code not in GATEWAY_GAVE_UP:
                    refused += 1
                    stderr.print(Text(f"job {job_id}: {refusal}, {exc}", style="red"))
                    continue
                lost = f"a gateway answered {exc}"
            except httpx.TransportError as exc:
                if isinstance(exc, NOT_SENT):  # nothing reached the API, and nothing will
                    raise
                lost = without_password(lost_answer(exc), api)
            if lost is not None:
                refused += 1
                stderr.print(Text(f"job {job_id}: {lost}; it may have been {done_as}: see stt status {job_id}",
                                  style="red"))
                continue
            sys.stdout.write(done + "\n")
    if refused:
        raise typer.Exit(1)


@app.command()
def search(
    query: Annotated[str, typer.Argument(help="What to look for: words, \"a phrase\", or a question.",
                                         show_default=False)],
    mode: Annotated[SearchMode, typer.Option(help="By words and meaning fused (hybrid), meaning only, or words"
                                                  " only.")] = SearchMode.hybrid,
    job: Annotated[int | None, typer.Option("--job", help="Only this job.", show_default=False)] = None,
    speaker: Annotated[str | None, typer.Option(help="Only this speaker (spk_0...).", show_default=False)] = None,
    language: Annotated[str | None, typer.Option(help="Only what was said in this language (en, ru...).",
                                                 show_default=False)] = None,
    since: Annotated[str | None, typer.Option(help="Only jobs created at or after this ISO 8601 date or time.",
                                              show_default=False)] = None,
    until: Annotated[str | None, typer.Option(help="Only jobs created before this date or time.",
                                              show_default=False)] = None,
    limit: Annotated[int, typer.Option(help="Hits to show.", min=1, max=100)] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print the response as JSON.")] = False,
    api: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
) -> None:
    """Find what was said in your transcripts: `job 12 [03:14.0] spk_1: ...`, best first."""
    params = {"q": query, "mode": mode.value, "limit": limit, "transcript_id": job, "speaker": speaker,
              "language": language, "since": since, "until": until}
    with reporting_api_errors(api), api_client(api, api_key) as client:
        page = checked(client.get("/search", params={k: v for k, v in params.items() if v is not None})).json()
        hits = items_of(page, "/search")
    if as_json:
        print_json(page)
        return
    colours = SpeakerColours()
    for hit in hits:
        line = Text(f"job {hit['transcript_id']} ", style="bold")
        line.append(f"[{clock(hit['start_ts'])}] ", style="dim")
        colour = colours(f"{hit['transcript_id']}:{hit['speaker']}")
        line.append(f"{hit.get('speaker_name') or hit['speaker']}: ", style=f"bold {colour}")
        # Absent from hits only the semantic search found: nothing to mark, and `text` is not escaped.
        line.append_text(marked(hit["highlighted"]) if hit.get("highlighted") else Text(hit["text"]))
        stdout.print(line)
    if not hits:
        stderr.print("nothing found")


@app.command()
def reindex(
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Follow it until every segment is done.")] = True,
    api: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
) -> None:
    """Re-embed stored transcripts with the embedding model the services now use (resumable)."""
    with reporting_api_errors(api), api_client(api, api_key) as client:
        progress: dict | None = None
        try:
            progress = checked(client.post("/admin/reindex")).json()
        except httpx.ReadTimeout as exc:
            # The server may count every segment before it answers (an hour on a big store): the
            # run has likely started. It is followed (or, with --no-wait, asked about) as below.
            stderr.print(f"POST /admin/reindex: {escape(lost_answer(exc))}; the run may have started:"
                         f" {'following it' if wait else 'asking how far it is'}")
        else:
            stderr.print(f"re-embedding with {progress['model']}: {progress['pending_segments']} segments to do")
        answered_at = time.monotonic()
        while progress is None or (wait and progress["running"]):
            time.sleep(1)
            # A run takes hours: one proxy's 502 or a dropped connection is waited out as when
            # following a job, not taken for the run's end (the run goes on on the server).
            try:
                progress = checked(client.get("/admin/reindex")).json()
            except (httpx.TransportError, ApiError) as exc:
                transient = not isinstance(exc, ApiError) or exc.status_code in TRANSIENT_STATUS_CODES
                if not transient or time.monotonic() - answered_at > API_AWAY_S:
                    raise
                continue
            answered_at = time.monotonic()
    if progress.get("error"):
        fail(progress["error"])
    # The counts are of the run's jobs (those there as it began). It ends without an error where
    # the embedder, not switched, embeds new jobs with another model: it leaves those.
    not_switched = not progress["running"] and progress.get("embedder_not_switched", False)
    state = "running" if progress["running"] else "done" if progress["pending_segments"] == 0 and not not_switched \
        else "stopped"
    sys.stdout.write(f"{progress['done_segments']} segments embedded with {progress['model']},"
                     f" {progress['pending_segments']} to do ({state})\n")
    if not_switched:
        fail(f"jobs started during the run were embedded with another model than {progress['model']}: the embedder"
             f" was not switched; switch it (EMBEDDING_BACKEND, MODEL_NAME_EMBEDDED, LOCAL_EMBEDDING_MODEL),"
             f" then run stt reindex again")
    if state == "stopped":
        # Its jobs that ended just as it finished (cancelled before they were embedded).
        fail(f"the run ended with {progress['pending_segments']} segments of its jobs not embedded with"
             f" {progress['model']} (jobs that ended as it finished); run stt reindex again")


@app.command()
def usage(
    since: Annotated[str | None, typer.Option(help="Jobs that ended at or after this ISO 8601 date or time"
                                                   " (default: 30 days before --until).", show_default=False)] = None,
    until: Annotated[str | None, typer.Option(help="Jobs that ended before this date or time (default: now).",
                                              show_default=False)] = None,
    all_keys: Annotated[bool, typer.Option("--all-keys", help="Every API key's (needs ADMIN_API_KEY).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's answer.")] = False,
    api: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
) -> None:
    """What your API key has had transcribed: one line a day (UTC), then the total, tab-separated:
    day, jobs, done, failed, length of the recordings done."""
    params = {name: value for name, value in {"since": since, "until": until}.items() if value is not None}
    with reporting_api_errors(api), api_client(api, api_key) as client:
        answer = checked(client.get("/admin/usage" if all_keys else "/usage", params=params)).json()
    if as_json:
        print_json(answer)
        return

    def line(label: str, counts: dict) -> str:
        return (f"{label}\t{counts['jobs']}\t{counts['done']}\t{counts['failed']}\t"
                f"{clock(counts['audio_s'])}\n")
    if all_keys:
        for key in answer["keys"]:
            sys.stdout.write(line(key["key"], key))
        return
    for day in answer["days"]:
        sys.stdout.write(line(day["day"], day))
    sys.stdout.write(line("total", answer))


speakers_app = typer.Typer(help="Enrolled speakers: voices recognised in every new recording.", no_args_is_help=True)
app.add_typer(speakers_app, name="speakers")


@speakers_app.command("enroll")
def speakers_enroll(
    name: Annotated[str, typer.Argument(help="The person's name.", show_default=False)],
    sample: Annotated[Path | None, typer.Argument(help="5-60 s of that person talking alone.", exists=True,
                                                  dir_okay=False, readable=True, show_default=False)] = None,
    job: Annotated[int | None, typer.Option("--job", help="Instead of a sample: a finished job in which they"
                                                          " speak (with --speaker).", show_default=False)] = None,
    speaker: Annotated[str | None, typer.Option(help="Their label in that job (spk_1).", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Enrol the voice even though it sounds like another"
                                                        " enrolled speaker (refused otherwise).")] = False,
    api: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
) -> None:
    """Enrol NAME from an audio sample, or from a finished job's speaker (--job 12 --speaker spk_1).
    Enrolling a name again adds a voiceprint."""
    if (sample is None) == (job is None) or (job is None) != (speaker is None):
        raise typer.BadParameter("give either a SAMPLE file or --job and --speaker")
    # Enrolling again adds a second voiceprint of the same sample.
    unconfirmed = f"{name!r} may have been enrolled: see stt speakers list before enrolling again"

    def send(_: dict[str, str]) -> httpx.Response:
        if sample is not None:
            fields = {"name": name, **({"force": "true"} if force else {})}
            headers, body = multipart_body(sample, fields, lambda sent: None)
            return client.post("/speakers", content=body, headers=headers, timeout=SPEAKER_CHANGE_TIMEOUT)
        return client.post("/speakers", json={"name": name, "transcript_id": job, "label": speaker,
                                              **({"force": True} if force else {})}, timeout=SPEAKER_CHANGE_TIMEOUT)

    with reporting_api_errors(api, unconfirmed), api_client(api, api_key) as client:
        try:
            # Offered again while the server is busy (503 or 429 with Retry-After: nothing was
            # made), as an upload is; sent once only otherwise: POST /speakers takes no
            # Idempotency-Key, and a second send would add a second voiceprint.
            profile = checked(sent_with_key(send, attempts=1, busy_wait_s=UPLOAD_BUSY_WAIT_S)).json()
        except KeyboardInterrupt:
            stderr.print(Text(f"stopped before the API answered; {unconfirmed}", style="red"))
            raise typer.Exit(130) from None
        except FileChanged as exc:
            fail(f"{sample}: not sent, it changed while it was being sent ({exc}); is it still being written?")
        except OSError as exc:  # gone, or unreadable, since it was checked
            fail(f"{sample}: not sent, it cannot be read ({exc.strerror or exc})")
    relabelled = ", ".join(map(str, profile["relabelled"])) or "none"
    sys.stdout.write(f"speaker {profile['id']} {profile['name']}: {profile['voiceprint_count']} voiceprint(s);"
                     f" transcripts renamed: {relabelled}\n")


@speakers_app.command("list")
def speakers_list(api: ApiUrl = DEFAULT_API_URL, api_key: ApiKey = None) -> None:
    """The enrolled speakers: id, name, voiceprints."""
    with reporting_api_errors(api), api_client(api, api_key) as client:
        items = items_of(checked(client.get("/speakers")).json(), "/speakers")
    for item in items:
        sys.stdout.write(f"{item['id']}\t{item['name']}\t{item['voiceprint_count']} voiceprint(s)\n")
    if not items:
        stderr.print("no speakers enrolled")


@speakers_app.command("forget")
def speakers_forget(
    name: Annotated[str, typer.Argument(help="The enrolled speaker's name (or id).", show_default=False)],
    api: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
) -> None:
    """Delete a speaker's voiceprints and every name recognised from them."""
    with reporting_api_errors(api), api_client(api, api_key) as client:
        items = items_of(checked(client.get("/speakers")).json(), "/speakers")
        wanted = person_name(name)  # as the server keeps names (blanks collapsed, in NFC)
        # The name as it is, else in another case when only one speaker has it so. The server keeps
        # names unique by PostgreSQL's lower(), which maps letter by letter as Python's lower()
        # does, where casefold() makes "Maße" and "Masse" one name (two people to the server).
        named = ([i for i in items if i["name"] == wanted]
                 or [i for i in items if i["name"].lower() == wanted.lower()])
        if len(named) > 1:  # forgetting cannot be undone: never guess
            fail(f"{wanted!r} could be any of {', '.join(repr(i['name']) for i in named)}: give the name exactly"
                 f" as `stt speakers list` shows it, or the id")
        found = {i["id"]: i for i in named + [i for i in items if str(i["id"]) == wanted]}
        if not found:
            fail(f"no enrolled speaker called {name!r}")
        if len(found) > 1:  # forgetting cannot be undone: never guess
            named, numbered = sorted(found.values(), key=lambda i: str(i["id"]) == wanted)
            fail(f"{wanted!r} is both the name of speaker {named['id']} and the id of {numbered['name']!r};"
                 f" forget {numbered['name']!r} by name, or rename speaker {named['id']} first")
        [found] = found.values()
        unconfirmed = f"{found['name']!r} may have been forgotten: see stt speakers list"
        with reporting_api_errors(api, unconfirmed):
            try:
                checked(client.delete(f"/speakers/{found['id']}", timeout=SPEAKER_CHANGE_TIMEOUT))
            except KeyboardInterrupt:
                stderr.print(Text(f"stopped before the API answered; {unconfirmed}", style="red"))
                raise typer.Exit(130) from None
    sys.stdout.write(f"forgot {found['name']}\n")


webhooks_app = typer.Typer(help="Webhooks: events POSTed, signed, to your URL.", no_args_is_help=True)
app.add_typer(webhooks_app, name="webhooks")


@webhooks_app.command("add")
def webhooks_add(
    url: Annotated[str, typer.Argument(help="Where to POST the events.", show_default=False)],
    events: Annotated[str | None, typer.Option(
        help="Comma-separated event types, e.g. transcript.completed,transcript.failed (default: all).",
        show_default=False)] = None,
    secret: Annotated[str | None, typer.Option(envvar="STT_WEBHOOK_SECRET",
                                               help="Sign with this secret instead of a new one.",
                                               show_default=False)] = None,
    api: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
) -> None:
    """Register URL; prints its id and the signing secret the server made (shown this once)."""
    body: dict = {"url": url}
    # An empty --events is sent as an empty list, for the API to refuse, not taken as "all events".
    if events is not None:
        body["events"] = [e.strip() for e in events.split(",") if e.strip()]
    if secret is not None:
        body["secret"] = secret
    unconfirmed = "the webhook may have been registered: see stt webhooks list" + (
        "" if secret is not None else "; if it was, its secret was in the lost answer: remove it and add it again")
    with reporting_api_errors(api, unconfirmed), api_client(api, api_key) as client:
        hook = checked(client.post("/webhooks", json=body)).json()
    sys.stdout.write(f"webhook {hook['id']}: {hook['url']} ({', '.join(hook['events'])})\n")
    # A secret the user gave is theirs already: printed, it would end up in logs and scrollback.
    if secret is None:
        sys.stdout.write(f"secret: {hook['secret']}\n")


@webhooks_app.command("list")
def webhooks_list(api: ApiUrl = DEFAULT_API_URL, api_key: ApiKey = None) -> None:
    """The registered webhooks (and jobs' callback URLs): id, URL, events."""
    with reporting_api_errors(api), api_client(api, api_key) as client:
        items = listed(client, "/webhooks", {})
    for item in items:
        job = f"\tjob {item['transcript_id']}" if item.get("transcript_id") else ""
        sys.stdout.write(f"{item['id']}\t{item['url']}\t{','.join(item['events'])}{job}\n")
    if not items:
        stderr.print("no webhooks registered")


@webhooks_app.command("remove")
def webhooks_remove(
    webhook_id: Annotated[int, typer.Argument(metavar="ID", help="The webhook's id.", show_default=False)],
    api: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
) -> None:
    """Stop sending to a webhook and drop its delivery log."""
    with reporting_api_errors(api, f"webhook {webhook_id} may have been removed: see stt webhooks list"), \
            api_client(api, api_key) as client:
        checked(client.delete(f"/webhooks/{webhook_id}"))
    sys.stdout.write(f"removed webhook {webhook_id}\n")


@webhooks_app.command("deliveries")
def webhooks_deliveries(
    webhook_id: Annotated[int, typer.Argument(metavar="ID", help="The webhook's id.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
    api: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
) -> None:
    """The webhook's deliveries, newest first, with every attempt."""
    with reporting_api_errors(api), api_client(api, api_key) as client:
        page = checked(client.get(f"/webhooks/{webhook_id}/deliveries")).json()
        deliveries = items_of(page, f"/webhooks/{webhook_id}/deliveries")
    if as_json:
        print_json(page)
        return
    for item in deliveries:
        tries = "; ".join(f"{a.get('status_code') or '-'} {a['latency_ms']} ms {a.get('error') or ''}".rstrip()
                          for a in item["attempts"])
        sys.stdout.write(f"{item['id']}\tjob {item['transcript_id']}\t{item['event_type']}\t{item['status']}"
                         f"\t{len(item['attempts'])} attempt(s)\t{tries}\n")
    if not deliveries:
        stderr.print("no deliveries yet")


class EventPrinter:
    """Prints events from stt.events as they arrive; with a job to follow, tells when it ended."""

    def __init__(self, job_id: int | None) -> None:
        self.job_id = job_id
        # Delivery is at-least-once: a redelivered event is shown once.
        self.seen: OrderedDict[str, None] = OrderedDict()
        self.colours: dict[int, SpeakerColours] = {}
        # When an event of the followed job last came (or watching began).
        self.heard_at = time.monotonic()

    def show(self, routing_key: str, body: bytes) -> int | None:
        """Print one event. Returns the exit code once the followed job has ended, else None."""
        event_type = EVENTS.get(routing_key)
        if event_type is None:
            return None
        try:
            event = event_type.model_validate_json(body)
        except ValidationError as exc:
            stderr.print(Text(f"skipped a malformed {routing_key} event: {exc.error_count()} errors", style="yellow"))
            return None
        if self.job_id is not None and event.transcript_id != self.job_id:
            return None
        self.heard_at = time.monotonic()
        if event.message_id in self.seen:
            return None
        self.seen[event.message_id] = None
        if len(self.seen) > 10_000:
            self.seen.popitem(last=False)
        prefix = "" if self.job_id is not None else f"job {event.transcript_id}  "
        ended: int | None = None
        if isinstance(event, SegmentCreated):
            colours = self.colours.setdefault(event.transcript_id, SpeakerColours())
            stdout.print(segment_line(event.start_ts, event.speaker_name or event.speaker, event.text, colours, prefix))
        elif isinstance(event, TranscriptCompleted):
            details = [event.language or "language unknown",
                       f"{event.duration:.1f} s" if event.duration is not None else None,
                       "no speech" if event.no_speech else f"{event.segment_count} segments"]
            stdout.print(Text(f"job {event.transcript_id} done: {event.filename} "
                              f"({', '.join(d for d in details if d)})", style="bold green"))
            ended = 0
        elif isinstance(event, TranscriptSpeakersUpdated):
            names = ", ".join(f"{label} = {n.name or '(unnamed)'}" for label, n in event.speakers.items())
            stdout.print(Text(f"job {event.transcript_id} speakers: {names}", style="bold"))
        elif isinstance(event, TranscriptFailed):
            stdout.print(Text(f"job {event.transcript_id} failed: {event.filename}: {event.reason}", style="bold red"))
            ended = 1
        elif isinstance(event, TranscriptDeleted):
            # Its last event: nothing of a deleted job comes after it, nor does the API know it.
            stdout.print(Text(f"job {event.transcript_id} was deleted", style="bold red"))
            ended = 1
        stdout.file.flush()
        return ended if self.job_id is not None else None


def checked_amqp_url(amqp_url: str) -> str:
    """`amqp_url` if it is one to connect to; else a usage error (2) saying why, without the URL
    (its password). aio-pika's robust connection took a URL without a host (`localhost:5672`, read
    as a scheme and a path) for a failed connection and tried it again for ever without a word; a
    port that is no number was a traceback."""
    from yarl import URL

    def refused(why: str) -> NoReturn:
        raise typer.BadParameter(f"{why}; give amqp://user:password@host:5672/vhost (or amqps://)",
                                 param_hint="'--amqp-url' / AMQP_URL")

    try:
        parts = urlsplit(amqp_url)
        parts.port  # noqa: B018 (a port that is not a number, or out of range, raises here)
        URL(amqp_url)  # what aio-pika reads it with
    except ValueError:
        # Not the parser's words: they quote the part it failed on, which may be the password's
        # (a "/" or "#" in it makes the rest read as the port).
        refused("not a valid URL (a port that is not a number, or a password with / ? # or @ not percent-encoded)")
    if parts.scheme.lower() not in ("amqp", "amqps"):
        refused("not an amqp:// or amqps:// URL")
    if not parts.hostname:
        refused("the URL names no host")
    return amqp_url


def where(amqp_url: str) -> str:
    """host:port/vhost of an AMQP URL: never the password."""
    parts = urlsplit(amqp_url)
    return f"{parts.hostname}:{parts.port or 5672}{parts.path or '/'}"


# How often `watch --job` asks the API whether its job ended: its events may have been missed
# (published while the connection to RabbitMQ was down) and a deleted job has none.
STATUS_POLL_S = 15.0
# How long `watch --job` waits for an event of a job the API hides (another key's) before it gives
# up: with the API silent, a job that ended before watching began, one deleted, or one whose end
# was published while disconnected would be waited for ever. A running job sends a segment event a
# chunk; the longest silence of one is its diarization, which covers the whole recording (about
# 22 minutes for MAX_AUDIO_HOURS' 6 hours at 0.06 of real time, up to 50 on a slow day).
HIDDEN_JOB_SILENCE_S = 3600.0


def how_long(seconds: float) -> str:
    """"60 minutes", "5 s"."""
    return f"{seconds / 60:g} minutes" if seconds >= 60 else f"{seconds:g} s"


class ApiNotAsked(Exception):
    """The API could not be asked how a followed job is (unreachable, the key refused, an error
    of its own, an answer that is not a job's status); the message says why."""


async def job_status(api: str, api_key: str | None, job_id: int) -> dict:
    """A followed job's status document; ApiError for a 404, a job the API does not know;
    ApiNotAsked, with the reason, when the API cannot say (watching goes on and the event will
    tell)."""
    try:
        async with httpx.AsyncClient(base_url=api_base(api), headers=auth_headers(api_key), timeout=10) as client:
            return status_document(checked(await client.get(f"/status/{job_id}", params={"segments": "false"})))
    except ApiError as exc:
        if exc.status_code == 404:
            raise
        raise ApiNotAsked(str(exc)) from None  # 401/403: a subscriber may watch without access to the API
    except httpx.TransportError as exc:
        raise ApiNotAsked(transport_failure(exc, api)) from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiNotAsked(f"the API at {shown_url(api)} did not answer JSON") from None
    except (httpx.HTTPError, ValueError, UnexpectedAnswer) as exc:
        raise ApiNotAsked(without_password(str(exc), api)) from None


async def watch_events(amqp_url: str, job_id: int | None, api: str, api_key: str | None) -> int:
    import aio_pika
    from yarl import URL

    from common.broker import EVENTS_EXCHANGE

    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[int] = loop.create_future()

    def end(code: int) -> None:
        if not outcome.done():
            outcome.set_result(code)

    printer = EventPrinter(job_id)
    polling: asyncio.Task | None = None
    asking_api = True
    known_to_api = False
    not_asked_because: str | None = None  # why the API could not be asked, while it has never answered

    async def ask_api(when: str) -> None:
        """End watching if the API says the job has ended (or, as far as it can tell, does not exist)."""
        nonlocal asking_api, known_to_api, not_asked_because
        try:
            document = await job_status(api, api_key, job_id)
        except ApiNotAsked as exc:
            if not known_to_api and not_asked_because is None:
                stderr.print(Text(f"the API could not be asked about job {job_id} ({exc}); watching its events,"
                                  f" until none has come for {how_long(HIDDEN_JOB_SILENCE_S)}", style="yellow"))
            if not known_to_api:
                not_asked_because = str(exc)
            return
        except ApiError as exc:  # 404
            if known_to_api or not (api_key or "").strip():
                # A mistyped id (or a job deleted) would otherwise be watched for ever.
                stderr.print(Text(f"error: job {job_id}: {exc.detail}", style="red"))
                end(1)
                return
            # With API keys another key's job is answered 404 too, as if it did not exist, while
            # this watcher gets the events of every job: its events alone will tell.
            stderr.print(Text(f"the API does not know job {job_id} for this key (another key's job, or a mistyped"
                              f" id); watching its events anyway, until none has come for"
                              f" {how_long(HIDDEN_JOB_SILENCE_S)}", style="yellow"))
            asking_api = False
            return
        known_to_api = True
        if document["status"] in FINISHED:
            stdout.print(Text(f"job {job_id} {when}: {document['status']}",
                              style="bold green" if document["status"] == "done" else "bold red"))
            end(0 if document["status"] == "done" else 1)

    async def poll_status() -> None:
        while not outcome.done():
            # Until the API has answered for the job, only its events can tell, and they may never
            # come (it ended before watching began, was deleted, or its end was missed).
            silent_s = time.monotonic() - printer.heard_at
            if not known_to_api and silent_s >= HIDDEN_JOB_SILENCE_S:
                if asking_api:
                    why = (f"the API could not be asked about it ({not_asked_because}): stopped watching (stt"
                           f" status {job_id} tells once the API answers)")
                else:
                    why = (f"the API does not know it for this key: stopped watching (it may have ended before"
                           f" watching began, been deleted, or still wait its turn: stt status {job_id} with its"
                           f" own key tells)")
                stderr.print(Text(f"error: no event of job {job_id} for {how_long(HIDDEN_JOB_SILENCE_S)}, and {why}",
                                  style="red"))
                end(1)
                return
            if not asking_api:
                await asyncio.sleep(HIDDEN_JOB_SILENCE_S - silent_s)
                continue
            await asyncio.sleep(STATUS_POLL_S if known_to_api else min(STATUS_POLL_S, HIDDEN_JOB_SILENCE_S - silent_s))
            await ask_api("ended (seen through the API)")

    async def on_message(message: AbstractIncomingMessage) -> None:
        code = printer.show(message.routing_key or "", message.body)
        if code is not None:
            end(code)

    # aio-pika and aiormq log each failed reconnection attempt; the two lines below say it once.
    for library in ("aio_pika", "aiormq"):
        logging.getLogger(library).addHandler(logging.NullHandler())
    # Named, so operators can tell the watcher apart in RabbitMQ's connection list.
    connection = await aio_pika.connect_robust(URL(amqp_url).update_query(name="stt watch"))

    def connection_lost(*_: object) -> None:
        if not outcome.done():
            stderr.print(Text("lost the connection to RabbitMQ; reconnecting...", style="yellow"))

    def reconnected(*_: object) -> None:
        # The exclusive queue went with the old connection: what was published meanwhile is missed.
        stderr.print(Text("reconnected to RabbitMQ; events published while disconnected were missed",
                          style="yellow"))

    connection.close_callbacks.add(connection_lost)
    connection.reconnect_callbacks.add(reconnected)
    try:
        # With --job the exit code is the job's outcome: a stop before it ended is the shell's
        # 128 + signal (130, 143), as submit's, never the 0 of a job done.
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, end, 0 if job_id is None else 128 + signum)
        channel = await connection.channel()
        # A passive look-up: a subscriber needs only read access to the exchange, not configure.
        exchange = await channel.get_exchange(EVENTS_EXCHANGE, ensure=True)
        # Our own queue, gone when we disconnect: watching leaves nothing behind on the broker.
        # Named sub.*: what a subscriber-only RabbitMQ user may create (README: Subscribing).
        queue = await channel.declare_queue(f"sub.watch.{uuid.uuid4().hex}", exclusive=True, auto_delete=True)
        for routing_key in WATCHED_ROUTING_KEYS:
            await queue.bind(exchange, routing_key)
        await queue.consume(on_message, no_ack=True)
        which = f"job {job_id}" if job_id is not None else "all jobs"
        stderr.print(f"watching {EVENTS_EXCHANGE} on {escape(where(amqp_url))} for {which} (Ctrl-C to stop)")
        if job_id is not None:
            # Checked after the queue is bound, so an ending between the two is not missed.
            await ask_api("had already ended")
            if not outcome.done():
                polling = asyncio.create_task(poll_status())
        return await outcome
    finally:
        if polling is not None:
            polling.cancel()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        await connection.close()


@app.command()
def watch(
    job: Annotated[int | None, typer.Option(
        "--job", metavar="ID", show_default=False,
        help="Only this job; exit when it ends (0 done, 1 failed; 130 if interrupted).")] = None,
    amqp_url: AmqpUrl = DEFAULT_AMQP_URL,
    api: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
) -> None:
    """Print segments and completions from the stt.events exchange as they happen."""
    amqp_url = checked_amqp_url(amqp_url)
    if job is not None:  # the API is asked about the job only
        refuse_a_key_with_a_user_in_the_address(api, api_key)
    # Imported here: aio-pika takes most of a second to import, and only watch needs it.
    import aio_pika

    try:
        code = asyncio.run(watch_events(amqp_url, job, api, api_key))
    except KeyboardInterrupt:
        code = 0 if job is None else 128 + signal.SIGINT
    except (aio_pika.exceptions.AMQPError, OSError) as exc:
        reason = str(exc) or type(exc).__name__
        password = urlsplit(amqp_url).password
        if password:
            reason = reason.replace(password, "***")
        fail(f"cannot read events from RabbitMQ at {where(amqp_url)}: {reason}")
    raise typer.Exit(code)


def main() -> None:
    app(prog_name="stt")
