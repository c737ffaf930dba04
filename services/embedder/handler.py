"""The embedder's handler: chunk.transcribed -> chunk.embedded (each segment with its vector)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from common.logs import job_logged
from common.messages import ChunkEmbedded, ChunkTranscribed, Contract
from services.embedder.backends import PROBE_TEXT, one_text_may_cause

log = logging.getLogger(__name__)

# Texts tried alone that fail in a row: the service fails them all, not one text.
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
        if not one_text_may_cause(exc):
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
    """Each segment's text alone, after the chunk's batch `failed` (embed_one_by_one): a text the
    service cannot embed is left without a vector (stored, found by its words but not by meaning)
    rather than failing the job, and every rerun of it, while the service is up. Raises `failed`
    when the service looks down rather than refusing texts."""
    try:
        vectors, refused, _ = await embed_one_by_one(deps.embed, [s.text for s in message.segments], failed, None,
                                                     one_text_may_cause)
    except EmbeddingServiceFailing:
        raise failed from None  # as the batch failed: the consumer tells an outage from an error by it
    with job_logged(message.job_id):
        for position, why in refused:
            log.warning("segment %d of chunk %d/%d is refused by the embedding service (%s: %s); stored without"
                        " a vector", message.segments[position].index, message.chunk_index + 1, message.chunk_count,
                        type(why).__name__, str(why)[:200])
    return vectors


class EmbeddingServiceFailing(RuntimeError):
    """A batch's texts failed alone too, and the service failed again a text it had embedded (or
    the probe text, when it had embedded none): it fails every text, not one it refuses."""


async def embed_one_by_one(embed: Callable[[list[str]], Awaitable[list[list[float]]]], texts: list[str],
                           failed: Exception, embedded_text: str | None,
                           one_text_may_be_why: Callable[[BaseException], bool],
                           ) -> tuple[list[list[float] | None], list[tuple[int, Exception]], str | None]:
    """Each text alone after their batch `failed` (the embedder's chunks, ingest's reindex): a
    text counts as refused (None, and its position and why in the second list) only once the
    service has embedded another after it, or embeds now one it embedded before (`embedded_text`)
    or, having embedded none, PROBE_TEXT: a crashed model runner answers 500 as a refused text
    does, and a text stored as refused is not tried again with this model. Otherwise raises
    EmbeddingServiceFailing. Errors `one_text_may_be_why` does not allow for are raised as they
    are. Also returns a text the service embedded, for the next batch."""
    vectors: list[list[float] | None] = []
    refused: list[tuple[int, Exception]] = []
    failing: list[tuple[int, Exception]] = []

    async def still_up() -> bool:
        """Whether the service embeds now a text it embedded before, or the probe text."""
        try:
            only_vector(await embed([embedded_text or PROBE_TEXT]))
        except Exception as exc:
            if not one_text_may_be_why(exc):
                raise
            return False
        return True

    def service_failing() -> EmbeddingServiceFailing:
        return EmbeddingServiceFailing(f"the texts failed one by one too, and no text is shown to embed now (the batch:"
                                       f" {type(failed).__name__}: {str(failed)[:200]})")

    async def embed_alone(text: str) -> list[list[float]]:
        if len(texts) == 1:
            # The batch was this text alone: sent again, it would only wait out its retries again.
            raise failed
        return await embed([text])

    for position, text in enumerate(texts):
        try:
            alone = await embed_alone(text)
        except Exception as exc:
            if not one_text_may_be_why(exc):
                raise
            failing.append((position, exc))
            vectors.append(None)
            if len(failing) >= GIVE_UP_AFTER:
                # Several alike texts in a row (lines of "♪") may all be refused: told apart from
                # a service gone down by one it embedded before (or the probe text), and the texts
                # after them still tried.
                if not await still_up():
                    raise service_failing() from failed
                refused += failing
                failing = []
            continue
        vectors.append(only_vector(alone))
        refused += failing
        failing, embedded_text = [], text
    if failing:
        # Nothing after them to prove the service up: a text it embedded before (or the probe
        # text) is asked again.
        if not await still_up():
            raise service_failing() from failed
        refused += failing
    return vectors, refused, embedded_text


def only_vector(vectors: list[list[float]]) -> list[float]:
    if len(vectors) != 1:
        raise EmbeddingCountMismatch(f"the embedding backend returned {len(vectors)} vectors for 1 segment")
    return vectors[0]
