"""The embedder's handler: chunk.transcribed -> chunk.embedded (each segment with its vector)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from common.messages import ChunkEmbedded, ChunkTranscribed, Contract

log = logging.getLogger(__name__)


class EmbeddingCountMismatch(RuntimeError):
    """The backend gave another number of vectors than it was given texts."""


@dataclass
class Deps:
    embed: Callable[[list[str]], Awaitable[list[list[float]]]]
    model_name: str


async def handle(message: ChunkTranscribed, deps: Deps) -> AsyncIterator[Contract]:
    texts = [segment.text for segment in message.segments]
    log.info("embedding chunk %d/%d (%d texts)", message.chunk_index + 1, message.chunk_count, len(texts))
    vectors = await deps.embed(texts) if texts else []
    if len(vectors) != len(texts):
        # Paired short, the segments without a vector would be left out of chunk.embedded, and the
        # persister, which stores a chunk from that message alone, would delete their text.
        raise EmbeddingCountMismatch(f"the embedding backend returned {len(vectors)} vectors for {len(texts)} segments")
    segments = [s.model_copy(update={"embedding": v}) for s, v in zip(message.segments, vectors, strict=True)]
    yield ChunkEmbedded(
        message_id=f"chunk.embedded:{message.job_id}:{message.chunk_index}",
        job_id=message.job_id, chunk_index=message.chunk_index,
        chunk_count=message.chunk_count, language=message.language, text_language=message.text_language,
        duration=message.duration, embedding_model=deps.model_name, segments=segments,
        turns=message.turns, speakers=message.speakers,
    )
    log.info("chunk %d/%d embedded: %d segments", message.chunk_index + 1, message.chunk_count, len(segments))
