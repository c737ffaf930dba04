"""python -m services.embedder: chunk.transcribed -> chunk.embedded."""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import urllib.parse

import aiohttp

from common.broker import EndedJobs, Route, connect, consume, open_bus
from common.logs import setup_logging
from common.messages import ChunkTranscribed
from common.metrics import serve_metrics
from common.runner import run_worker
from common.settings import get_settings
from services.embedder import handler
from services.embedder.backends import OLLAMA_UNAVAILABLE, PROBE_TEXT, OllamaTLSError, make_embedder

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
        bus = await open_bus(await connect(settings, "embedder.publish"), settings)
        log.info("embedder ready")
        # Ollama not reachable, or a proxy answering 502-504 for it, is an outage: chunks wait for it
        # without spending retries (a restart), as the persister waits for the database.
        await consume(connection, settings, "embedder",
                      [Route(ChunkTranscribed, functools.partial(handler.handle, deps=deps))], bus=bus,
                      ended=EndedJobs(), wait_on=OLLAMA_UNAVAILABLE if ollama else ())
        if checking is not None:
            checking.cancel()


async def check_ollama(embed, settings) -> None:
    """Say at start, not at the first job, when Ollama cannot embed with the configured model."""
    host = urllib.parse.urlsplit(settings.ollama_url).hostname
    if host:
        # A name that does not resolve is held like Ollama being down (a DNS blip passes), so a
        # mistyped one would hold every chunk without a word but the retries' warnings.
        try:
            await asyncio.get_running_loop().getaddrinfo(host, None)
        except socket.gaierror as exc:
            log.error("OLLAMA_URL's host %r cannot be resolved (%s): chunks wait at embedding until it can;"
                      " check the host name in OLLAMA_URL", host, exc)
            return
    try:
        [vector] = await embed([PROBE_TEXT])
        log.info("Ollama at %s embeds with %s (%d dimensions)", settings.ollama_url, settings.model_name_embedded,
                 len(vector))
    except OllamaTLSError as exc:
        log.error("Ollama at %s: %s. Jobs fail at embedding, after their retries, until this is fixed",
                  settings.ollama_url, exc)
    except OLLAMA_UNAVAILABLE as exc:
        log.error("Ollama at %s cannot be reached yet (%s: %s): chunks wait at embedding until it can",
                  settings.ollama_url, type(exc).__name__, exc)
    except Exception as exc:
        log.error("Ollama at %s cannot embed with %s yet (%s: %s): jobs fail at embedding with this reason"
                  " while it answers with an error (pull the model: `ollama pull %s`)", settings.ollama_url,
                  settings.model_name_embedded, type(exc).__name__, exc, settings.model_name_embedded)


if __name__ == "__main__":
    run_worker(main)
