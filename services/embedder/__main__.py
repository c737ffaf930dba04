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
from services.embedder.backends import OLLAMA_UNAVAILABLE, make_embedder

log = logging.getLogger("services.embedder")


async def main() -> None:
    settings = get_settings()
    setup_logging(settings.log_level)
    serve_metrics(settings, "embedder")
    async with aiohttp.ClientSession() as session:
        embed, model_name = await asyncio.to_thread(make_embedder, settings, session)
        log.info("embedding with %s (%s backend)", model_name, settings.embedding_backend)
        deps = handler.Deps(embed=embed, model_name=model_name)
        # Told in the log, not waited for: an Ollama that drops connection attempts would hold the
        # start for minutes of retries.
        ollama = settings.embedding_backend == "ollama"
        checking = asyncio.create_task(check_ollama(embed, settings)) if ollama else None
        connection = await connect(settings, "embedder")
        log.info("embedder ready")
        # Ollama not reachable, or a proxy answering 502-504 for it, is an outage: chunks wait for it
        # without spending retries (a restart), as the persister waits for the database.
        await consume(connection, settings, "embedder",
                      [Route(ChunkTranscribed, functools.partial(handler.handle, deps=deps))], ended=EndedJobs(),
                      wait_on=OLLAMA_UNAVAILABLE if ollama else ())
        if checking is not None:
            checking.cancel()


async def check_ollama(embed, settings) -> None:
    """Say at start, not at the first job, when Ollama cannot embed with the configured model."""
    try:
        [vector] = await embed(["warm-up"])
        log.info("Ollama at %s embeds with %s (%d dimensions)", settings.ollama_url, settings.model_name_embedded,
                 len(vector))
    except Exception as exc:
        log.error("Ollama at %s cannot embed with %s yet (%s: %s): jobs wait at embedding while it cannot be"
                  " reached, and fail with this reason while it answers with an error (pull the model:"
                  " `ollama pull %s`)", settings.ollama_url, settings.model_name_embedded, type(exc).__name__,
                  exc, settings.model_name_embedded)


if __name__ == "__main__":
    run_worker(main)
