"""python -m services.embedder: chunk.transcribed -> chunk.embedded."""

from __future__ import annotations

import asyncio
import functools
import logging

import aiohttp

from common.broker import EndedJobs, Route, connect, consume
from common.logs import setup_logging
from common.messages import ChunkTranscribed
from common.metrics import serve_metrics
from common.runner import run_worker
from common.settings import get_settings
from services.embedder import handler
from services.embedder.backends import make_embedder

log = logging.getLogger("services.embedder")


async def main() -> None:
    settings = get_settings()
    setup_logging(settings.log_level)
    serve_metrics(settings, "embedder")
    async with aiohttp.ClientSession() as session:
        embed, model_name = await asyncio.to_thread(make_embedder, settings, session)
        log.info("embedding with %s (%s backend)", model_name, settings.embedding_backend)
        deps = handler.Deps(embed=embed, model_name=model_name)
        connection = await connect(settings, "embedder")
        log.info("embedder ready")
        await consume(connection, settings, "embedder",
                      [Route(ChunkTranscribed, functools.partial(handler.handle, deps=deps))], ended=EndedJobs())


if __name__ == "__main__":
    run_worker(main)
