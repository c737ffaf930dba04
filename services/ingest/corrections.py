"""Correcting a transcript by hand: a segment's words as they were really said, or the speaker
who really said them (diarization gives an interjection to the wrong person now and then).
PATCH /transcripts/{id}/segments/{chunk_index}/{index}; README "Corrections"."""

from __future__ import annotations

import asyncio
import logging
import re
import unicodedata
from bisect import bisect_left
from difflib import SequenceMatcher
from typing import Annotated

from asyncpg import Connection, Record
from asyncpg.exceptions import LockNotAvailableError
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
from services.ingest.captions import written_with_spaces
from services.ingest.errors import error_responses
from services.ingest.redacted_audio import REDACTION_RETRY_AFTER_S
from services.ingest.search import embed_for_request
from services.ingest.segments import LABEL, TranscriptSegment, transcript_segment
from services.ingest.transcripts import JobBusy, JobId, lock_job_briefly, visible

log = logging.getLogger(__name__)

MAX_SEGMENT_CHARS = 10_000
# Above this many old pieces times new ones a corrected text's words are retimed as a wholly new
# text's, not matched to the old: difflib's matching is near quadratic, far worse on repetitive
# text (two texts of 10,000 characters of two kinds took 33 s). At this size it takes 0.2 s at
# most; a real segment (at most 30 s of speech) has a few hundred pieces.
WORD_MATCH_BUDGET = 1_000_000


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


def _written_unspaced(character: str) -> bool:
    """Of a script written without spaces between words (Chinese, Japanese, Thai...), whose
    words Whisper gives a character or a few at a time. Korean is written with spaces, though its
    characters are as wide as Chinese ones."""
    return not written_with_spaces(character) and not unicodedata.name(character, "").startswith("HANGUL")


def _written_on(character: str) -> bool:
    """A mark written on the character before it: a Thai vowel sign, an accent written apart, a joiner."""
    return unicodedata.category(character) in ("Mn", "Mc", "Me", "Cf")


def _word_spans(text: str) -> list[tuple[int, int]]:
    """Where the text's words are, parted as the transcriber's are: at spaces, and around each
    character (with the marks on it) of a script written without spaces."""
    spans = []
    for run in re.finditer(r"\S+", text):
        start, unspaced = run.start(), _written_unspaced(run.group()[0])
        for at in range(run.start() + 1, run.end()):
            if _written_on(text[at]):
                continue
            if unspaced or _written_unspaced(text[at]):
                spans.append((start, at))
                start = at
            unspaced = _written_unspaced(text[at])
        spans.append((start, run.end()))
    return spans


def _in_place_of(new: list[str], replaced: list[Word], between: tuple[float, float]) -> list[Word]:
    """Words written where `replaced` were (between two kept words, where none were): as many as
    they take the time of one each, otherwise they share the time those spanned, by length."""
    if len(new) == len(replaced):
        return [w if w.word == word else Word(word=word, start=w.start, end=w.end) for word, w in zip(new, replaced)]
    first, last = (replaced[0].start, replaced[-1].end) if replaced else between
    last = max(first, last)  # (words that overlap in time: none of the new ends before it starts)
    weights = [len(word) + 1 for word in new]
    total = sum(weights)
    out, at = [], first
    for word, weight in zip(new, weights):
        length = (last - first) * weight / total
        out.append(Word(word=word, start=round(at, 3), end=round(at + length, 3)))
        at += length
    return out


def retimed_words(words: list[dict], text: str, start: float, end: float) -> list[Word]:
    """The corrected text's words with times, parted as the transcriber's are (a character at a
    time in Chinese, Japanese or Thai). A word left as it was keeps its time and probability;
    words written in place of others take their time (see _in_place_of), and words added between
    two kept ones the pause between them. Texts too long to compare (WORD_MATCH_BUDGET) keep none."""
    old = [Word(word=w["word"].strip(), start=w["start"], end=w["end"], probability=w.get("probability"))
           for w in words if w["word"].strip()]  # a blank word (Whisper writes one now and then) times nothing
    # Old and new are compared piece by piece, a piece being what a new word is: one of Whisper's
    # words may hold several Chinese characters, and is kept whole if they all are.
    pieces, first_piece = [], []
    for word in old:
        first_piece.append(len(pieces))
        pieces += [word.word[a:b] for a, b in _word_spans(word.word)]
    first_piece.append(len(pieces))
    spans = _word_spans(text)
    new = [text[a:b] for a, b in spans]
    kept: dict[int, tuple[int, int]] = {}  # where a kept word starts among the new: (its index in old, where it ends)
    matched = (SequenceMatcher(None, pieces, new, autojunk=False).get_matching_blocks()
               if len(pieces) * len(new) <= WORD_MATCH_BUDGET else [])
    for i, j, size in matched:
        k = bisect_left(first_piece, i, 0, len(old))  # the old words wholly in the block
        while k < len(old) and first_piece[k + 1] <= i + size:
            begins, ends = j + first_piece[k] - i, j + first_piece[k + 1] - i
            if text[spans[begins][0]:spans[ends - 1][1]] == old[k].word:  # not parted by a space now
                kept[begins] = (k, ends)
            k += 1
    out: list[Word] = []
    written: list[str] = []
    previous, at = -1, 0  # the last kept word's index in old; the next new word
    while at < len(new):
        if at not in kept:
            written.append(new[at])
            at += 1
            continue
        k, at = kept[at]
        # Two kept words may overlap in time (the earlier ending after the next starts): the
        # words between them then take no time, at the next one's start.
        pause = (min(old[previous].end if previous >= 0 else start, old[k].start), old[k].start)
        out += _in_place_of(written, old[previous + 1:k], pause) + [old[k]]
        written, previous = [], k
    pause_start = old[previous].end if previous >= 0 else start
    return out + _in_place_of(written, old[previous + 1:], (pause_start, max(end, pause_start)))


async def _retimed(segment: Record, text: str) -> list[Word]:
    """retimed_words off the event loop: a long text takes a while (see WORD_MATCH_BUDGET)."""
    return await asyncio.to_thread(retimed_words, segment["words"], text, segment["start_ts"], segment["end_ts"])


def _timing(segment: Record) -> tuple:
    """What a segment's corrected words are retimed from."""
    return segment["words"], segment["start_ts"], segment["end_ts"]


def _refused(job_id: int, job: Record | None, request: Request) -> None:
    """404 for a job the caller cannot see, 409 for one still processing."""
    if not visible(job, request_owner(request)):
        raise NotFoundException(detail=f"no job with id {job_id}")
    if job["status"] == "processing":
        raise HTTPException(status_code=409, detail=f"job {job_id} is still processing; correct it once it has"
                                                    " ended (its chunks may still be written)")


def _no_segment(job_id: int, chunk_index: int, index: int, segment: Record | None) -> None:
    if segment is None:
        raise NotFoundException(detail=f"job {job_id} has no segment {chunk_index}/{index}"
                                       " (see chunk_index and index in its JSON)")


def _being_redacted(job_id: int) -> None:
    raise HTTPException(status_code=409, headers={"Retry-After": str(REDACTION_RETRY_AFTER_S)},
                        detail=f"the recording of job {job_id} is being redacted; correct its words once"
                               " that is done (a speaker can be corrected now)")


async def announce_segment(conn: Connection, job_id: int, chunk_index: int, index: int,
                           embedding: list[float] | None, model: str) -> TranscriptSegment:
    """The segment as it is now, and its segment.updated added to the outbox in the caller's
    transaction (who commits it wakes the flusher): with `embedding`, of `model`, where it has
    one; without, its vector comes in a later segment.updated (reindex.embed_corrections)."""
    segment = transcript_segment(await jobstore.job_segment(conn, job_id, chunk_index, index))
    await add_to_outbox(conn, SegmentUpdated(
        job_id=job_id, transcript_id=job_id, **segment.model_dump(exclude={"words", "edited"}),
        embedding=embedding, embedding_model=model if embedding is not None else None))
    return segment


SegmentChunk = Annotated[int, PathParameter(ge=0, le=1_000_000, description="The segment's chunk_index")]
SegmentIndex = Annotated[int, PathParameter(ge=0, le=1_000_000, description="The segment's index in its chunk")]


@patch("/transcripts/{job_id:int}/segments/{chunk_index:int}/{index:int}", summary="Correct a segment by hand",
       request_max_body_size=SMALL_BODY_BYTES,
       responses=error_responses(400, 401, 403, 404, 409, 413, 503, e413="The JSON body is over 1 MiB",
                                 e409="The job is still processing, or its recording is being redacted"
                                 " (Retry-After): correct it once that has ended"))
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
    # pool connection, that every other change of the job waits on. And only for a correction that
    # will be made: what refuses it is checked first without the locks (and again under them, as
    # it may have changed meanwhile), so that a refused one answers at once, asking nothing of the
    # embedding service. Another key's job is unknown at once too, not after waiting on its lock
    # (which would tell that it exists). The new words are timed before the locks too, and again
    # under them only where the segment's words changed meanwhile.
    _refused(job_id, await jobstore.job(state.pool, job_id), request)
    new_embedding = stored = new_words = None
    if new_text is not None:
        stored = await jobstore.job_segment(state.pool, job_id, chunk_index, index)
        _no_segment(job_id, chunk_index, index, stored)
        if new_text != stored["text"]:  # (the text as it is: a speaker's correction at most, nothing to embed)
            if await jobstore.redaction_pending(state.pool, job_id):
                _being_redacted(job_id)
            new_words = await _retimed(stored, new_text)
            try:
                new_embedding = await embed_for_request(embed, new_text)
            except Exception as exc:  # the embedding service is away: the text is what matters
                with job_logged(job_id):
                    log.warning("segment %d/%d not embedded (%s); it will be once the service answers", chunk_index,
                                index, type(exc).__name__)
    async with state.pool.acquire() as conn, conn.transaction():
        try:
            _refused(job_id, await lock_job_briefly(conn, job_id), request)
            segment = await jobstore.lock_segment(conn, job_id, chunk_index, index)
        except (JobBusy, LockNotAvailableError) as exc:
            raise HTTPException(status_code=503, headers={"Retry-After": "5"},
                                detail=f"job {job_id} is being changed by another request; nothing was"
                                       " corrected, try again") from exc
        _no_segment(job_id, chunk_index, index, segment)
        speaker = data.speaker or segment["speaker"]
        text = new_text if new_text is not None else segment["text"]
        if text == segment["text"] and speaker == segment["speaker"]:
            # Not marked edited, and no segment.updated: its webhooks would tell of a change.
            with job_logged(job_id):
                log.info("segment %d/%d not corrected: nothing changed", chunk_index, index)
            return transcript_segment(await jobstore.job_segment(conn, job_id, chunk_index, index))
        if text != segment["text"] and await jobstore.redaction_pending(conn, job_id):
            # The redacted recording is made from the words' times as they are when it is written:
            # retimed or relabelled words would leave redacted speech audible. (It is marked
            # written under this lock, so a correction waits for it or comes after.)
            _being_redacted(job_id)
        embedding = None
        if text == segment["text"]:
            await jobstore.correct_segment(conn, job_id, chunk_index, index, speaker=speaker)
        else:
            if segment["embedding_model"] == model:
                embedding = new_embedding
            if new_words is None or _timing(stored) != _timing(segment):
                new_words = await _retimed(segment, text)
            await jobstore.correct_segment(conn, job_id, chunk_index, index, speaker=speaker, text=text,
                                           words=[w.model_dump() for w in new_words],
                                           text_language=segment["text_language"],
                                           embedding=embedding, embedding_model=model)
        corrected = await announce_segment(conn, job_id, chunk_index, index, embedding, model)
    state.outbox_wake.set()
    with job_logged(job_id):
        changed = [what for what, new, old in (("text", text, segment["text"]),
                                               ("speaker", speaker, segment["speaker"])) if new != old]
        log.info("segment %d/%d corrected by hand: %s", chunk_index, index, ", ".join(changed))
    return corrected


CORRECTION_ROUTES = [correct_segment]
