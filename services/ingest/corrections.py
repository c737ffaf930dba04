"""Correcting a transcript by hand: a segment's words as they were really said, or the speaker
who really said them (diarization gives an interjection to the wrong person now and then).
PATCH /transcripts/{id}/segments/{chunk_index}/{index}; README "Corrections"."""

from __future__ import annotations

import logging
from typing import Annotated

from litestar import Request, patch
from litestar.datastructures import State
from litestar.exceptions import HTTPException, NotFoundException
from litestar.params import PathParameter
from pydantic import BaseModel, Field, model_validator

from common import jobstore
from common.logs import job_logged
from common.messages import SegmentUpdated, Word
from common.outbox import add_to_outbox
from services.ingest.admission import SMALL_BODY_BYTES
from services.ingest.auth import request_owner
from services.ingest.errors import error_responses
from services.ingest.search import embed_for_request
from services.ingest.segments import LABEL, TranscriptSegment, transcript_segment
from services.ingest.transcripts import JobId, visible

log = logging.getLogger(__name__)

MAX_SEGMENT_CHARS = 10_000


class SegmentCorrection(BaseModel):
    """What to change; at least one of the two."""

    text: str | None = Field(default=None, max_length=MAX_SEGMENT_CHARS,
                             description="The words as they were said")
    speaker: str | None = Field(default=None, pattern=LABEL.pattern,
                                description="The label of who said them: one of the job's, or a new spk_N")

    @model_validator(mode="after")
    def _something(self) -> SegmentCorrection:
        if self.text is None and self.speaker is None:
            raise ValueError('give the right "text", "speaker" or both')
        if self.text is not None and not self.text.split():
            raise ValueError("text must have words (a segment cannot be corrected to nothing)")
        if self.text is not None and "\x00" in self.text:
            raise ValueError("text cannot hold a NUL character")
        return self


def retimed_words(words: list[dict], text: str, start: float, end: float) -> list[Word]:
    """The corrected text's words with times. A word left as it was keeps its time and
    probability; with as many words as before, each takes its predecessor's time; otherwise the
    words share the time the old ones spanned, by length."""
    new = text.split()
    old = [Word(word=w["word"].strip(), start=w["start"], end=w["end"], probability=w.get("probability"))
           for w in words]
    if len(new) == len(old):
        return [w if w.word == word else Word(word=word, start=w.start, end=w.end) for word, w in zip(new, old)]
    first, last = (old[0].start, old[-1].end) if old else (start, end)
    weights = [len(word) + 1 for word in new]
    out, at = [], first
    for word, weight in zip(new, weights):
        length = (last - first) * weight / sum(weights)
        out.append(Word(word=word, start=round(at, 3), end=round(at + length, 3)))
        at += length
    return out


SegmentChunk = Annotated[int, PathParameter(ge=0, le=1_000_000, description="The segment's chunk_index")]
SegmentIndex = Annotated[int, PathParameter(ge=0, le=1_000_000, description="The segment's index in its chunk")]


@patch("/transcripts/{job_id:int}/segments/{chunk_index:int}/{index:int}", summary="Correct a segment by hand",
       request_max_body_size=SMALL_BODY_BYTES,
       responses=error_responses(400, 401, 403, 404, 409, 413, 503, e413="The JSON body is over 1 MiB",
                                 e409="The job is still processing: correct it once it has ended"))
async def correct_segment(job_id: JobId, chunk_index: SegmentChunk, index: SegmentIndex, state: State,
                          request: Request, data: SegmentCorrection) -> TranscriptSegment:
    """`{"text": "..."}`, `{"speaker": "spk_1"}` or both: every format, search and the speakers'
    listing show the correction from then on, and segment.updated announces it. The job's RTTM
    stays the diarizer's."""
    embed, model = state.query_embedder
    new_text = " ".join(data.text.split()) if data.text is not None else None
    # Search by meaning finds the new words at once when this process embeds with the model the
    # segment's vector is in; otherwise they are embedded within a minute (reindex.embed_corrections)
    # with the model search asks in, once the embedding service answers. They are embedded before
    # the job is locked: a slow embedding service (a minute a try) must not hold the lock, and a
    # pool connection, that every other change of the job waits on.
    new_embedding = None
    if new_text is not None:
        if not visible(await jobstore.job(state.pool, job_id), request_owner(request)):
            raise NotFoundException(detail=f"no job with id {job_id}")
        try:
            new_embedding = await embed_for_request(embed, new_text)
        except Exception as exc:  # the embedding service is away: the text is what matters
            with job_logged(job_id):
                log.warning("segment %d/%d not embedded (%s); it will be once the service answers", chunk_index, index,
                            type(exc).__name__)
    async with state.pool.acquire() as conn, conn.transaction():
        job = await jobstore.lock_job(conn, job_id)
        if not visible(job, request_owner(request)):
            raise NotFoundException(detail=f"no job with id {job_id}")
        if job["status"] == "processing":
            raise HTTPException(status_code=409, detail=f"job {job_id} is still processing; correct it once it has"
                                                        " ended (its chunks may still be written)")
        segment = await jobstore.lock_segment(conn, job_id, chunk_index, index)
        if segment is None:
            raise NotFoundException(detail=f"job {job_id} has no segment {chunk_index}/{index}"
                                           " (see chunk_index and index in its JSON)")
        speaker = data.speaker or segment["speaker"]
        text = new_text if new_text is not None else segment["text"]
        embedding = None
        if text == segment["text"]:
            await jobstore.correct_segment(conn, job_id, chunk_index, index, speaker=speaker)
        else:
            if segment["embedding_model"] == model:
                embedding = new_embedding
            words = retimed_words(segment["words"], text, segment["start_ts"], segment["end_ts"])
            await jobstore.correct_segment(conn, job_id, chunk_index, index, speaker=speaker, text=text,
                                           words=[w.model_dump() for w in words],
                                           text_language=segment["text_language"],
                                           embedding=embedding, embedding_model=model)
        corrected = transcript_segment(await jobstore.job_segment(conn, job_id, chunk_index, index))
        await add_to_outbox(conn, SegmentUpdated(
            job_id=job_id, transcript_id=job_id, **corrected.model_dump(exclude={"words", "edited"}),
            embedding=embedding, embedding_model=model if embedding is not None else None))
    state.outbox_wake.set()
    with job_logged(job_id):
        changed = [what for what, new, old in (("text", text, segment["text"]),
                                               ("speaker", speaker, segment["speaker"])) if new != old]
        log.info("segment %d/%d corrected by hand: %s", chunk_index, index, ", ".join(changed) or "nothing changed")
    return corrected


CORRECTION_ROUTES = [correct_segment]
