"""python -m services.transcriber: job.diarized chunk -> chunk.transcribed."""

from __future__ import annotations

import asyncio
import functools
import logging

from common.broker import EndedJobs, Route, connect, consume, open_bus
from common.logs import setup_logging
from common.messages import JobDiarized
from common.metrics import serve_metrics
from common.runner import run_worker
from common.settings import get_settings
from common.storage import worker_client
from services.transcriber import handler
from services.transcriber.whisper import load_model

log = logging.getLogger("services.transcriber")


async def main() -> None:
    settings = get_settings()
    setup_logging(settings.log_level)
    serve_metrics(settings, "transcriber")
    model, _ = await asyncio.to_thread(load_model, settings)
    deps = handler.Deps(model=model, read_pcm=handler.pcm_reader(worker_client(settings)),
                        beam_size=settings.whisper_beam_size, batch_size=settings.whisper_batch_size,
                        redact=settings.redact_kinds)
    connection = await connect(settings, "transcriber")
    bus = await open_bus(await connect(settings, "transcriber.publish"), settings)
    log.info("transcriber ready")
    await consume(connection, settings, "transcriber",
                  [Route(JobDiarized, functools.partial(handler.handle, deps=deps))], bus=bus, ended=EndedJobs())


if __name__ == "__main__":
    run_worker(main)
