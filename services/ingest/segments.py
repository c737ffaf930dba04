"""A transcript segment as every output shows it (JSON, /status, subtitles, corrections, bucket-drop
results), built from one row of jobstore.job_segments."""

from __future__ import annotations

import re

import asyncpg

from common.messages import StoredSegment, Word

# A recording speaker's label, as both diarizer backends write it: spk_0, spk_1... in ASCII digits
# without a leading zero. Also a pydantic pattern, which the Rust regex engine reads: there `$` is
# the end of the text, while Python's re.match lets it match before a final newline (is_label).
LABEL = re.compile(r"^spk_(?:0|[1-9][0-9]{0,3})$")


def is_label(text: str) -> bool:
    return LABEL.fullmatch(text) is not None


class TranscriptSegment(StoredSegment):
    # Where the segment is kept: PATCH /transcripts/{id}/segments/{chunk_index}/{index} corrects it.
    chunk_index: int | None = None
    index: int | None = None
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
