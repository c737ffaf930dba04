"""A transcript segment as every output shows it (JSON, /status, subtitles, corrections, bucket-drop
results), built from one row of jobstore.job_segments."""

from __future__ import annotations

import asyncpg
from pydantic import BaseModel

from common.messages import Word


class TranscriptSegment(BaseModel):
    # Where the segment is kept: PATCH /transcripts/{id}/segments/{chunk_index}/{index} corrects it.
    chunk_index: int | None = None
    index: int | None = None
    speaker: str
    # The name given to the speaker (PATCH /transcripts/{id}/speakers) or of the enrolled speaker
    # whose voice it is (README "Speakers"), when there is one.
    speaker_name: str | None = None
    # For a recognised voice: its cosine similarity to that speaker's closest voiceprint.
    speaker_confidence: float | None = None
    start_ts: float
    end_ts: float
    text: str
    # Another speaker talks during some of these words.
    overlap: bool = False
    # The language spoken, where the recording switches language (language "en,de" or "multi").
    language: str | None = None
    # Its text or speaker was corrected by hand.
    edited: bool = False
    # Only with ?words=true.
    words: list[Word] | None = None


def transcript_segment(row: asyncpg.Record, with_words: bool = False) -> TranscriptSegment:
    """A row of jobstore.job_segments as the API shows it."""
    return TranscriptSegment(
        chunk_index=row["chunk_index"], index=row["index"], edited=row["edited"],
        speaker=row["speaker"], speaker_name=row["speaker_name"], speaker_confidence=row["speaker_confidence"],
        start_ts=round(row["start_ts"], 3), end_ts=round(row["end_ts"], 3),
        text=row["text"], overlap=row["overlap"], language=row["language"],
        words=[Word(word=w["word"].strip(), start=w["start"], end=w["end"], probability=w.get("probability"))
               for w in row["words"]] if with_words else None,
    )
