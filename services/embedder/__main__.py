"""python -m services.embedder: chunk.transcribed -> chunk.embedded."""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from common.broker import Bus, Route, connect, consume
from common.logs import setup_logging
from common.messages import ChunkEmbedded, ChunkTranscribed
from common.metrics import serve_metrics
from common.runner import run_worker
from common.settings import get_settings
from services.embedder.backends import make_embedder

log = logging.getLogger("services.embedder")


async def main() -> None:
    settings = get_settings()
    setup_logging(settings.log_level)
    serve_metrics(settings, "embedder")
    async with aiohttp.ClientSession() as session:
        embed, model_name = await asyncio.to_thread(make_embedder, settings, session)
        log.info("embedding with %s (%s backend)", model_name, settings.embedding_backend)

        async def handle(message: ChunkTranscribed, bus: Bus) -> None:
            texts = [segment.text for segment in message.segments]
            log.info("embedding chunk %d/%d (%d texts)", message.chunk_index + 1, message.chunk_count, len(texts))
            vectors = await embed(texts) if texts else []
            segments = [s.model_copy(update={"embedding": v}) for s, v in zip(message.segments, vectors)]
            await bus.publish(ChunkEmbedded(
                message_id=f"chunk.embedded:{message.job_id}:{message.chunk_index}",
                job_id=message.job_id, chunk_index=message.chunk_index,
                chunk_count=message.chunk_count, language=message.language,
                duration=message.duration, embedding_model=model_name, segments=segments,
                turns=message.turns, speakers=message.speakers,
            ))
            log.info("chunk %d/%d embedded: %d segments", message.chunk_index + 1,
                     message.chunk_count, len(segments))

        connection = await connect(settings, "embedder")
        log.info("embedder ready")
        await consume(connection, settings, "embedder", {"chunk.transcribed": Route(ChunkTranscribed, handle)})


if __name__ == "__main__":
    run_worker(main)
