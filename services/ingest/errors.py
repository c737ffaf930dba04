"""The error body every 4xx/5xx answer has, its OpenAPI description per status code, the 400
for a request model that does not validate, and the bound on ids that makes an out-of-range id a
400."""

from __future__ import annotations

from typing import Any

from litestar.exceptions import HTTPException
from litestar.openapi import ResponseSpec
from pydantic import BaseModel, ValidationError

# Ids stay far below 2^53, the largest integer every JSON client reads exactly; declaring it on
# every id parameter keeps an out-of-range id a documented 400 instead of a database error.
MAX_ID = 2**53 - 1


class ErrorBody(BaseModel):
    status_code: int
    detail: str
    extra: dict[str, Any] | list[Any] | None = None


# The OpenAI-compatible endpoint (services/ingest/openai_api.py) answers errors in OpenAI's shape,
# which its SDKs read the reason from.
OPENAI_PREFIX = "/v1/"


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    error: OpenAIError


def error_body(path: str, status_code: int, detail: str, extra: Any = None, code: str | None = None) -> dict[str, Any]:
    """An error answer's body: this API's, or OpenAI's shape under OPENAI_PREFIX (with `code`)."""
    if path.startswith(OPENAI_PREFIX):
        kind = "invalid_request_error" if status_code < 500 else "server_error"
        return {"error": {"message": detail, "type": kind, "param": None, "code": code}}
    return {"status_code": status_code, "detail": detail, **({"extra": extra} if extra else {})}


MEANINGS = {
    400: "Bad request: the message says what is wrong",
    401: "An API key is required",
    403: "The API key is not valid",
    404: "No such job (for this key)",
    408: "The body stopped coming for 2 minutes, or came too slowly while every upload place was taken: send it again",
    409: "The job is in a state that does not allow this yet: the message says which",
    410: "Removed on purpose (a retention setting): the message says when",
    411: "A body that is not multipart/form-data must say its Content-Length",
    413: "The upload exceeds MAX_UPLOAD_MB",
    415: "Not audio this service can decode",
    416: "The Range asked for is not within the file",
    422: "The request cannot be carried out as sent: the message says why",
    501: "Not installed on this server",
    503: "A backing service is unavailable; try again",
}


def error_responses(*codes: int, **meanings: str) -> dict[int, ResponseSpec]:
    """OpenAPI responses for `codes`; a keyword `e409="..."` overrides one code's meaning."""
    return {code: ResponseSpec(data_container=ErrorBody,
                               description=meanings.get(f"e{code}", MEANINGS[code]))
            for code in codes}


def plain_message(message: object) -> str:
    """A validation message without the "Value error, " pydantic puts before our own checks' words."""
    return str(message).removeprefix("Value error, ")


def invalid(exc: ValidationError, whole: str) -> HTTPException:
    """A 400 naming each field of a request model at fault (`whole` for a check across fields),
    once (a check's own words may name it already)."""
    def problem(error) -> str:
        field, said = ".".join(map(str, error["loc"])) or whole, plain_message(error["msg"])
        return said if said.startswith(f"{field}:") else f"{field}: {said}"

    return HTTPException(status_code=400, detail="; ".join(problem(e) for e in exc.errors()))
