"""Waiting for something that is down, the one way every service does it: exponential backoff
(1, 2, 4... seconds, capped), a warning per wait naming what is awaited, from tenacity."""

from __future__ import annotations

import logging
from collections.abc import Callable

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, stop_never
from tenacity.wait import wait_exponential

log = logging.getLogger(__name__)


def backoff(what: str, should_retry: Callable[[BaseException], bool], *, max_delay_s: float = 15.0,
            attempts: int | None = None, logger: logging.Logger = log) -> AsyncRetrying:
    """`async for attempt in backoff(...): with attempt: ...` retries while `should_retry` says
    so, forever or for `attempts` tries in all; the last error is raised as it was."""

    def warn(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        logger.warning("%s (%s: %s); retrying in %.0f s", what, type(exc).__name__, str(exc)[:200],
                       state.next_action.sleep if state.next_action else 0)

    return AsyncRetrying(retry=retry_if_exception(should_retry),
                         wait=wait_exponential(multiplier=1, min=1, max=max_delay_s),
                         stop=stop_after_attempt(attempts) if attempts else stop_never,
                         before_sleep=warn, reraise=True)


def of_type(*types: type[BaseException]) -> Callable[[BaseException], bool]:
    return lambda exc: isinstance(exc, types)
