"""The embedder's handler: chunk.transcribed -> chunk.embedded (each segment with its vector)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from common.logs import job_logged
from common.messages import ChunkEmbedded, ChunkTranscribed, Contract, Segment
from services.embedder.backends import one_text_may_cause

log = logging.getLogger(__name__)

# Texts tried alone that fail before one is embedded: the service fails them all, not one text.
GIVE_UP_AFTER = 3


class EmbeddingCountMismatch(RuntimeError):
    """The backend gave another number of vectors than it was given texts."""


@dataclass
class Deps:
    embed: Callable[[list[str]], Awaitable[list[list[float]]]]
    model_name: str


async def handle(message: ChunkTranscribed, deps: Deps) -> AsyncIterator[Contract]:
    texts = [segment.text for segment in message.segments]
    log.info("embedding chunk %d/%d (%d texts)", message.chunk_index + 1, message.chunk_count, len(texts))
    try:
        vectors: list[list[float] | None] = await deps.embed(texts) if texts else []
    except Exception as exc:
        if len(texts) < 2 or not one_text_may_cause(exc):
            raise
        log.warning("embedding chunk %d/%d failed (%s: %s); embedding its %d texts one by one",
                    message.chunk_index + 1, message.chunk_count, type(exc).__name__, str(exc)[:200], len(texts))
        vectors = await embed_each(message, deps, exc)
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


async def embed_each(message: ChunkTranscribed, deps: Deps, failed: Exception) -> list[list[float] | None]:
    """Each segment's text alone, after the chunk's batch `failed`: a text the service cannot embed
    is left without a vector (stored, found by its words but not by meaning) rather than failing
    the job, and every rerun of it, while the service is up. Raises `failed` when none is embedded."""
    vectors: list[list[float] | None] = []
    refused: list[tuple[Segment, Exception]] = []
    for segment in message.segments:
        try:
            [vector] = await deps.embed([segment.text])
        except Exception as exc:
            if not one_text_may_cause(exc):
                raise
            refused.append((segment, exc))
            vectors.append(None)
            if len(refused) == len(vectors) and len(refused) in (GIVE_UP_AFTER, len(message.segments)):
                raise failed from None
            continue
        vectors.append(vector)
    with job_logged(message.job_id):
        for segment, why in refused:
            log.warning("segment %d of chunk %d/%d is refused by the embedding service (%s: %s); stored without"
                        " a vector", segment.index, message.chunk_index + 1, message.chunk_count,
                        type(why).__name__, str(why)[:200])
    return vectors
