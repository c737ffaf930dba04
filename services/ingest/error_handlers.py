"""How ingest answers the errors its routes do not answer themselves: Litestar's own 4xx with a
detail that says what is at fault, undecodable form fields, backing services that are down
(503 with Retry-After), a client gone before its body was in (499, logged), and anything else (a
500, logged with its job)."""

from __future__ import annotations

import contextlib
import logging

from litestar import Request, Response
from litestar.exceptions import ClientException, HTTPException, InternalServerException, ValidationException

from common.db import DATABASE_UNAVAILABLE
from common.logs import job_logged
from common.storage import STORAGE_UNAVAILABLE
from services.ingest.admission import OPENAI_PATHS, SMALL_BODY_BYTES, UPLOAD_FORM_PARTS, UPLOAD_PATHS
from services.ingest.errors import error_body, plain_message
from services.ingest.speakers import SAMPLE_MAX_MB

log = logging.getLogger(__name__)

# The routes whose form takes at most UPLOAD_FORM_PARTS parts (Body(multipart_form_part_limit=...)).
FORM_PART_LIMITED_PATHS = ("/recognize", *OPENAI_PATHS)
# Litestar's words (an InternalServerException, a 500) for a request whose client closed the
# connection before the whole of its body came (Request.stream, on http.disconnect).
CLIENT_GONE = "client disconnected prematurely"
# nginx's "client closed request": the answer reaches no one, but stt_http_requests_total and the
# log tell a client that gave up (an upload cancelled, a laptop closed) from a fault here (a 500).
CLIENT_CLOSED_REQUEST = 499


def _unparsable_form(cause: BaseException | None, boundary: str) -> str:
    """Why the form parser could not read a multipart body (`cause`: its ParserError): a part's
    headers that are not UTF-8 (a filename in another encoding), a body that ends before its closing
    boundary (cut short, or not written with the boundary its Content-Type names, which the parser
    then never finds), or another fault of its form, in the parser's words."""
    said = str(cause.args[0]) if cause is not None and cause.args else "unknown"
    if cause is not None and any(isinstance(arg, UnicodeDecodeError) for arg in cause.args):
        return "the multipart body could not be parsed: headers must be UTF-8 (a filename in another encoding?)"
    if said.startswith("Unexpected end of multipart stream"):
        return (f"the multipart body could not be parsed: it ends before its closing boundary (--{boundary[:100]}--):"
                f" it was cut short, or its parts are not separated by the boundary its Content-Type names")
    return (f"the multipart body could not be parsed ({said[:200]}): is it cut short, or is its boundary not the"
            f" one its Content-Type names (--{boundary[:100]})?")


def clearer_client_error(request: Request, exc: ClientException) -> Response:
    """Litestar's own 4xx answers, with a detail that says which field or limit is at fault."""
    detail = exc.detail
    if isinstance(exc, ValidationException) and isinstance(exc.extra, list):
        field = "form field" if request.content_type[0].startswith("multipart/") else "field"
        where = {"query": "query parameter", "path": "path parameter"}
        # A check across fields (min_speakers > max_speakers) has no key, and a check's own words
        # may name its field already ("expected_speakers: at most 32 names"): the message says it all.
        problems = [said if not e.get("key") or said.startswith(f"{e['key']}:")
                    else f"invalid {where.get(e.get('source'), field)} {e['key']}: {said}"
                    for e in exc.extra if isinstance(e, dict) and e.get("message")
                    for said in (plain_message(e["message"]),)]
        if problems:
            detail = "; ".join(problems)
    elif exc.status_code == 400 and detail == "Request Entity Too Large":
        # The form parser's limits, which it words alike.
        parts = (UPLOAD_FORM_PARTS if request.url.path in FORM_PART_LIMITED_PATHS
                 else request.app.multipart_form_part_limit)
        detail = (f"the multipart body is over a limit of the form parser: more than {parts} parts, more than 8"
                  f" headers in a part, or a part header over 4 KB (is the filename that long? names are kept to"
                  f" 255 characters)")
    elif exc.status_code == 413 and detail == "Request Entity Too Large":
        # Litestar's own: the body passed the route's limit, an upload's or a body read whole.
        most_mb = request.app.state.settings.max_upload_mb
        if request.url.path == "/speakers" and request.content_type[0].startswith("multipart/"):
            detail = f"a sample is at most {min(most_mb, SAMPLE_MAX_MB)} MB"
        elif request.url.path in UPLOAD_PATHS and request.content_type[0].startswith("multipart/"):
            detail = f"the file exceeds MAX_UPLOAD_MB ({most_mb} MB)"
        else:
            detail = f"the body exceeds {SMALL_BODY_BYTES // 1024} KiB; send a recording itself as a multipart upload"
    elif exc.status_code == 400 and detail == "Invalid multipart/form-data":
        detail = (_unparsable_form(exc.__cause__, request.content_type[1].get("boundary", ""))
                  if request.content_type[0] == "multipart/form-data" else
                  f"send a multipart/form-data body (curl -F), not {request.content_type[0] or 'no content type'}")
    return Response(error_body(request.url.path, exc.status_code, detail, exc.extra), status_code=exc.status_code,
                    headers=exc.headers)


def undecodable_form_field(request: Request, exc: UnicodeDecodeError) -> Response:
    """Litestar reads a multipart part without a filename as UTF-8 text and fails on other bytes:
    the client sent a file's bytes as a plain field (no filename). Anything else is a fault here."""
    if request.content_type[0] != "multipart/form-data":
        log.exception("%s %s failed", request.method, request.url.path)
        return Response(error_body(request.url.path, 500, "Internal Server Error"), status_code=500)
    return Response(error_body(request.url.path, 400, "a form field is not UTF-8 text: send a file as a part with a "
                               "filename (curl -F file=@meeting.mp3)"), status_code=400)


def _unknown_charset(exc: BaseException) -> bool:
    """Python's answer to decoding a multipart field in a charset it does not know (`charset=bogus`);
    not a KeyError or an IndexError, which are LookupErrors too."""
    return type(exc) is LookupError and str(exc).startswith("unknown encoding")


def _for_the_routes_job(scope) -> contextlib.AbstractContextManager:
    """Lines logged inside carry the job of the route's `job_id`, when it has one: its path's, or
    the one a route without one in its path records in the request's state once it knows it
    (POST /v1/audio/transcriptions, waiting for the job it made)."""
    job_id = (scope.get("path_params") or {}).get("job_id")
    if not isinstance(job_id, int):
        job_id = (scope.get("state") or {}).get("job_id")
    return job_logged(job_id) if isinstance(job_id, int) else contextlib.nullcontext()


def unknown_charset_or_fault(request: Request, exc: LookupError) -> Response:
    """A multipart field whose charset Python does not know is the client's; any other
    LookupError is a fault here."""
    if _unknown_charset(exc):
        return Response(error_body(request.url.path, 400, f"a form field's charset is not one this server knows"
                                   f" ({exc}): send text fields as UTF-8"), status_code=400)
    return Response(error_body(request.url.path, 500, "Internal Server Error"), status_code=500)


async def log_unexpected(exception: Exception, scope) -> None:
    """A request that failed with an error nothing answers for (a 500) is logged with its
    traceback, and its job id when the route has one: Litestar logs nothing itself when its own
    logging is off, as here (the project's format is kept)."""
    if isinstance(exception, (HTTPException, UnicodeDecodeError, *DATABASE_UNAVAILABLE, *STORAGE_UNAVAILABLE)):
        return  # answered with a 4xx, or a 503 logged where it is made
    if _unknown_charset(exception):
        return
    with _for_the_routes_job(scope):
        log.error("%s %s failed", scope.get("method"), scope.get("path"), exc_info=exception)


def internal_error(request: Request, exc: Exception) -> Response:
    """A 500 in the route's error shape: OpenAI's under /v1/, which its SDKs read, where
    Litestar's own body would be this API's. Logged once, with its traceback, by log_unexpected.
    A database outage told apart by what it says (a closed connection), which no handler by type
    catches, is a 503 like the others."""
    if isinstance(exc, (*DATABASE_UNAVAILABLE, *STORAGE_UNAVAILABLE)):
        return service_unavailable(request, exc)
    if isinstance(exc, InternalServerException) and exc.detail == CLIENT_GONE:
        return client_gone(request)
    detail = exc.detail if isinstance(exc, HTTPException) else "Internal Server Error"
    return Response(error_body(request.url.path, 500, detail), status_code=500)


def client_gone(request: Request) -> Response:
    """A client that closed its connection before its body was all in: CLIENT_CLOSED_REQUEST, logged
    with the reason (Litestar's own answer was a 500 logged nowhere)."""
    announced = request.headers.get("content-length")
    length = f"{announced[:20]} bytes announced" if announced else "sent in chunks"
    with _for_the_routes_job(request.scope):
        log.info("%s %s: the client closed the connection before the whole body came (%s); answered %d",
                 request.method, request.url.path, length, CLIENT_CLOSED_REQUEST)
    return Response(error_body(request.url.path, CLIENT_CLOSED_REQUEST, "the client closed the connection before"
                               " the whole body came"), status_code=CLIENT_CLOSED_REQUEST)


def service_unavailable(request: Request, exc: Exception) -> Response:
    with _for_the_routes_job(request.scope):
        log.warning("%s %s: backing service unavailable (%s)", request.method, request.url.path, type(exc).__name__)
    return Response(error_body(request.url.path, 503, "a backing service is unavailable; try again shortly"),
                    status_code=503, headers={"Retry-After": "5"})


EXCEPTION_HANDLERS = {ClientException: clearer_client_error, UnicodeDecodeError: undecodable_form_field,
                      LookupError: unknown_charset_or_fault, 500: internal_error,
                      **{cls: service_unavailable for cls in (*DATABASE_UNAVAILABLE, *STORAGE_UNAVAILABLE)}}
