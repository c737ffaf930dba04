"""python -m services.diarizer: job.submitted -> job.diarized (one message per chunk)."""

from __future__ import annotations

import asyncio
import functools
import logging

from common.broker import EndedJobs, Route, connect, consume, open_bus
from common.logs import setup_logging
from common.messages import JobSubmitted
from common.metrics import serve_metrics
from common.runner import run_worker
from common.settings import get_settings
from common.storage import worker_client
from services.diarizer import handler
from services.diarizer.pipeline import make_diarizer

log = logging.getLogger("services.diarizer")


async def main() -> None:
    settings = get_settings()
    setup_logging(settings.log_level)
    serve_metrics(settings, "diarizer")
    diarize, backend = await asyncio.to_thread(make_diarizer, settings)
    log.info("diarization backend: %s", backend)
    ended = EndedJobs()
    deps = handler.Deps(settings=settings, storage=worker_client(settings), diarize=diarize, ended=ended)
    connection = await connect(settings, "diarizer")
    bus = await open_bus(await connect(settings, "diarizer.publish"), settings)
    log.info("diarizer ready")
    await consume(connection, settings, "diarizer", [Route(JobSubmitted, functools.partial(handler.handle, deps=deps))],
                  bus=bus, ended=ended)


if __name__ == "__main__":
    run_worker(main)
