"""How a stage worker process runs: `run_worker(main)` in every `__main__`.

On SIGTERM (Kubernetes scaling a replica down, `docker compose stop`) or SIGINT the worker stops
taking messages and lets the ones it holds finish for up to SHUTDOWN_GRACE_S. A message still
unfinished then is handed back to its queue as a fresh copy (the original acked), so it spends no
delivery attempt of the broker's delivery limit and no retry; another replica takes it. Then the
process exits 0, without waiting for a model call it can no longer use."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import weakref
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

# One per event loop: a process runs one, but the tests run the app on several loops in turn, and
# an asyncio.Event waited on in one loop cannot be waited on in another.
_stopping: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Event] | None = None
_drained: list[asyncio.Future] = []


def stopping() -> asyncio.Event:
    """Set once the process was asked to stop."""
    global _stopping
    if _stopping is None:
        _stopping = weakref.WeakKeyDictionary()
    loop = asyncio.get_running_loop()
    if loop not in _stopping:
        _stopping[loop] = asyncio.Event()
    return _stopping[loop]


def draining() -> asyncio.Future:
    """A consumer's promise to resolve once it has stopped and settled what it held."""
    future = asyncio.get_running_loop().create_future()
    _drained.append(future)
    return future


async def _supervise(main: Callable[[], Awaitable[None]], grace_s: float) -> int:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping().set)
    work = asyncio.create_task(main())
    asked = asyncio.create_task(stopping().wait())
    await asyncio.wait({work, asked}, return_when=asyncio.FIRST_COMPLETED)
    if work.done():
        asked.cancel()
        work.result()  # a crash is a crash: raise it
        return 0
    log.info("stopping: no new messages; up to %.0f s for the ones in hand", grace_s)
    if _drained:
        # Each consumer hands back what is unfinished at the end of the grace period itself.
        await asyncio.wait(_drained, timeout=grace_s + 5)
    log.info("stopped")
    return 0


def run_worker(main: Callable[[], Awaitable[None]]) -> None:
    from common.settings import get_settings

    # Not asyncio.run: at its end it waits for the default executor's threads, and one still
    # inside a model call (whose message is already back in its queue) would hold the exit until
    # the call returns, past the orchestrator's kill. For the same reason the interpreter is left
    # with os._exit, crash or not.
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        code = loop.run_until_complete(_supervise(main, get_settings().shutdown_grace_s))
    except BaseException:
        log.exception("the worker stopped on an error")
        code = 1
    logging.shutdown()
    os._exit(code)


# How long a background task that stopped waits before it starts again.
RESTART_S = 5.0


async def keep_running(what: str, work: Callable[[], Awaitable[object]], restart_s: float = RESTART_S) -> None:
    """Run `work`, which runs until cancelled, again whenever it stops: a server's background task
    (a consumer, a watcher) that fails to declare its queue while the broker restarts is logged
    and started again, instead of ending without a word while the server goes on without it (also
    when it ends with a CancelledError that is not this task's own cancellation)."""
    while True:
        try:
            await work()
            log.error("%s stopped; starting it again in %g s", what, restart_s)
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise  # this task is being cancelled: the server is stopping
            # Not a cancellation of this task: aiormq fails the calls pending on a connection it
            # drops (no heartbeat from the broker) with CancelledError.
            log.exception("%s was cancelled from inside (a broker connection dropped under it); starting it"
                          " again in %g s", what, restart_s)
        except Exception:
            log.exception("%s failed; starting it again in %g s", what, restart_s)
        await asyncio.sleep(restart_s)
