"""The contracts between services: every message on the `stt` exchange and every event on
`stt.events` is one of these models. Change a field only together with every producer,
consumer and test that uses it (see docs/design.md)."""

from __future__ import annotations

import unicodedata
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from common.languages import WHISPER_LANGUAGES

SCHEMA_VERSION = 1


def new_message_id() -> str:
    return uuid.uuid4().hex


class Contract(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=False)

    ROUTING_KEY: ClassVar[str] = ""

    v: int = SCHEMA_VERSION
    message_id: str = Field(default_factory=new_message_id)
    job_id: int


# Whisper is told the vocabulary as if it were the text before each window. A long list makes it
# go on writing list items after the last words of a recording, and decode slower; about ten
# names and terms did neither on the fixtures (bench/vocabulary.py, README "Names and terms").
VOCABULARY_MAX_CHARS = 150


SPELLING_MAX_PAIRS = 100


# A recording that may switch language: each speaker's passage is transcribed in its own.
ANY_LANGUAGE = "multi"

# What a job may ask to have redacted from its text; the order is the order they are looked for
# in, so a card number is a card and not a phone number (services/transcriber/redaction.py).
Redactable = Literal["email", "card", "phone", "number"]
REDACTABLE: tuple[str, ...] = get_args(Redactable)


def redacted_label(kind: str) -> str:
    """What stands in the text for a redacted `kind`: [EMAIL], [CARD]..."""
    return f"[{kind.upper()}]"


def language_choices(language: str | None) -> list[str] | None:
    """The languages a passage's is chosen among when a job's recording switches language
    (`language` "en,de", or "multi" for any Whisper knows); None for one language or one detected."""
    if language == ANY_LANGUAGE:
        return sorted(WHISPER_LANGUAGES)
    return language.split(",") if language and "," in language else None


def _listed(value: object, clean: Callable[[str], str]) -> object:
    """A list sent as one text (items separated by commas or lines) or as a list: each item
    cleaned, blanks and repeats dropped; None is empty. Anything else is left for the type check."""
    if value is None:
        return []
    if isinstance(value, str):
        value = value.replace("\n", ",").split(",")
    if isinstance(value, list):
        items = [clean(item) if isinstance(item, str) else item for item in value]
        return list(dict.fromkeys(item for item in items if item != ""))
    return value


def vocabulary_chars(text: str) -> int:
    """How long `text` is as a job's vocabulary (its terms as the validator keeps them, joined),
    the length VOCABULARY_MAX_CHARS bounds."""
    return len(",".join(_listed(text, printable_words)))


REFERENCE_MAX_CHARS = 200
SPEAKER_NAME_MAX_CHARS = 100
EXPECTED_SPEAKERS_MAX = 32


def has_control_characters(text: str) -> bool:
    """Line breaks, tabs, NUL and the like: text that must stay one line (PostgreSQL's jsonb and
    text cannot hold a NUL at all)."""
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def printable_words(text: str) -> str:
    """`text` with unprintable characters (control characters, NUL) blanked and blanks collapsed."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def person_name(text: str) -> str:
    """A speaker's name as it is kept: in NFC, so that "José" typed with a combining accent (as
    macOS writes file names) and with a precomposed "é" is one person, not two."""
    return unicodedata.normalize("NFC", printable_words(text))


# A yes-or-no field's words (in any case, blanks around them ignored): as the README lists them,
# not the t/f, y/n pydantic's lax bool takes too.
BOOLEAN_WORDS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False,
                 "off": False}
BOOLEAN_WORDS_SAID = "true or false (1/0, yes/no, on/off; blank or left out: false)"


class JobOptions(BaseModel):
    """What the user asked for at submission."""

    # A Whisper code; None: detected once; several codes ("en,de") or "multi": per passage.
    language: str | None = None
    num_speakers: int | None = Field(default=None, ge=1, le=32)
    min_speakers: int | None = Field(default=None, ge=1, le=32)
    max_speakers: int | None = Field(default=None, ge=1, le=32)
    # Enrolled speakers (their names) who may talk in the recording: recognition names its
    # speakers after these only, not after every speaker of the owner's. Sent as one
    # comma-separated text.
    expected_speakers: list[str] = Field(default_factory=list)
    # Each channel of the recording is its own party (a call recorded one leg per channel):
    # channels are diarized and transcribed apart, and their speakers never mixed.
    multichannel: bool = False
    # Names and terms the recording uses (people, products, jargon), which Whisper is told in
    # every 30 s window it decodes so that it spells them so. Sent as one comma-separated text.
    vocabulary: list[str] = Field(default_factory=list)
    # translate: the text comes out in English whatever was spoken (Whisper's own translation);
    # the job's language stays the one spoken.
    task: Literal["transcribe", "translate"] = "transcribe"
    # Replaced in the text by [EMAIL], [CARD], [PHONE], [NUMBER] before it is stored anywhere.
    redact: list[Redactable] = Field(default_factory=list)
    # Custom spelling: what Whisper writes (any case, whole words) -> how it is to be written.
    # Sent as one text, "heard=written" pairs separated by commas or lines.
    spelling: dict[str, str] = Field(default_factory=dict)
    # The submitter's own name for the job (a call id, a ticket): never read by the pipeline;
    # returned with the transcript and its transcript.completed / transcript.failed, and listed by.
    reference: str | None = Field(default=None, max_length=REFERENCE_MAX_CHARS)

    # A blank field (an HTML form's empty input) asks for nothing, as a field left out does.
    @field_validator("language", "num_speakers", "min_speakers", "max_speakers", "reference", mode="before")
    @classmethod
    def _blank_is_absent(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("reference", mode="after")
    @classmethod
    def _one_line(cls, value: str | None) -> str | None:
        # Shown on one line in lists and logs; PostgreSQL's jsonb cannot hold a NUL.
        if value is not None and has_control_characters(value):
            raise ValueError("reference: one line of text, without control characters")
        return value.strip() if value is not None else None

    @field_validator("multichannel", mode="before")
    @classmethod
    def _yes_or_no(cls, value: object) -> object:
        # The words BOOLEAN_WORDS lists, not the t/f, y/n pydantic's lax bool takes too; a blank
        # field asks for nothing (false). JSON's true/false and 1/0 as they are.
        if value is None or isinstance(value, bool) or (type(value) is int and value in (0, 1)):
            return bool(value)
        if isinstance(value, str) and (word := value.strip().lower()) in {"", *BOOLEAN_WORDS}:
            return BOOLEAN_WORDS.get(word, False)
        raise ValueError(f"multichannel: {BOOLEAN_WORDS_SAID}")

    @field_validator("task", mode="before")
    @classmethod
    def _blank_is_transcribe(cls, value: object) -> object:
        if value is None or (isinstance(value, str) and not value.strip()):
            return "transcribe"
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("vocabulary", mode="before")
    @classmethod
    def _terms(cls, value: object) -> object:
        return _listed(value, printable_words)

    @field_validator("expected_speakers", mode="before")
    @classmethod
    def _names(cls, value: object) -> object:
        names = _listed(value, person_name)
        if isinstance(names, list):  # one person written twice in two cases is one person
            first: dict[object, object] = {}
            for name in names:
                first.setdefault(name.lower() if isinstance(name, str) else name, name)
            names = list(first.values())
        return names

    @field_validator("expected_speakers")
    @classmethod
    def _names_are_sensible(cls, names: list[str]) -> list[str]:
        if len(names) > EXPECTED_SPEAKERS_MAX:
            raise ValueError(f"expected_speakers: at most {EXPECTED_SPEAKERS_MAX} names")
        if any(len(name) > SPEAKER_NAME_MAX_CHARS for name in names):
            raise ValueError(f"expected_speakers: a name is at most {SPEAKER_NAME_MAX_CHARS} characters")
        return names

    @field_validator("redact", mode="before")
    @classmethod
    def _kinds(cls, value: object) -> object:
        return _listed(value, lambda kind: kind.strip().lower())

    @field_validator("spelling", mode="before")
    @classmethod
    def _pairs(cls, value: object) -> object:
        if value is None:
            return {}
        if isinstance(value, str):
            pairs = [pair for pair in value.replace("\n", ",").split(",") if pair.strip()]
            if any("=" not in pair for pair in pairs):
                raise ValueError("spelling: write each pair as heard=written, separated by commas")
            items = [pair.split("=", 1) for pair in pairs]
            typed = True
        elif isinstance(value, dict):
            # A mapping is also how options are stored and read back: refusing one heard side
            # given twice there would make a stored job unreadable, so the last is kept.
            items, typed = list(value.items()), False
        else:
            return value
        kept: dict[str, str] = {}
        for heard, written in items:
            # str() made a JSON null "None", written into transcripts.
            if not isinstance(heard, str) or not isinstance(written, str):
                raise ValueError(f"spelling: {str(heard)[:40]!r}={str(written)[:40]!r}: both sides are text")
            # str.lower() writes Turkish "İ" as "i" and a combining dot: "İstanbul" and "istanbul" are
            # one heard side, matched the same way. Both sides in NFC, as Whisper writes: "nguyễn"
            # typed with combining accents and precomposed is one heard side, not two.
            key = unicodedata.normalize("NFC", printable_words(heard)).replace("İ", "i").lower()
            written = unicodedata.normalize("NFC", printable_words(written))
            # Whisper's words are matched in any case: two spellings of one heard side kept one of
            # them silently.
            if typed and kept.get(key, written) != written:
                raise ValueError(f"spelling: {key[:40]!r} is given twice, as {kept[key][:40]!r} and "
                                 f"{written[:40]!r} (the heard side's case does not count)")
            kept[key] = written
        return kept

    @field_validator("spelling")
    @classmethod
    def _spelling_is_sensible(cls, pairs: dict[str, str]) -> dict[str, str]:
        if len(pairs) > SPELLING_MAX_PAIRS:
            raise ValueError(f"spelling: at most {SPELLING_MAX_PAIRS} pairs")
        for heard, written in pairs.items():
            if not heard or not written or len(heard) > 100 or len(written) > 100:
                raise ValueError(f"spelling: {heard[:40]!r}={written[:40]!r} needs both sides, each up to 100 "
                                 "characters")
        return pairs

    @field_validator("vocabulary")
    @classmethod
    def _vocabulary_is_short(cls, terms: list[str]) -> list[str]:
        # Counted as the page's field counts what it takes, `a,b,c` (spaces around terms and
        # repeats left out): 150 characters the field allowed were refused counted as "a, b, c".
        if vocabulary_chars(",".join(terms)) > VOCABULARY_MAX_CHARS:
            raise ValueError(f"vocabulary is longer than {VOCABULARY_MAX_CHARS} characters (its terms with a comma"
                             " between each): keep the names and terms Whisper would otherwise get wrong")
        return terms

    @field_validator("language")
    @classmethod
    def _whisper_knows_the_language(cls, language: str | None) -> str | None:
        language = language.strip().lower() if language else None
        if language == "auto":  # what whisper.cpp and many front ends send for "detect it"
            return None
        if language is None or language == ANY_LANGUAGE:
            return language
        codes = list(dict.fromkeys(code.strip() for code in language.split(",") if code.strip()))
        unknown = [code for code in codes if code not in WHISPER_LANGUAGES] or ([] if codes else [language])
        if unknown:
            raise ValueError(f"unsupported language {unknown[0][:20]!r}: use a Whisper code such as en, de, ru, "
                             "several separated by commas, or multi")
        return ",".join(codes)

    @model_validator(mode="after")
    def _speaker_bounds_are_consistent(self) -> JobOptions:
        if self.min_speakers and self.max_speakers and self.min_speakers > self.max_speakers:
            raise ValueError("min_speakers must not exceed max_speakers")
        if self.num_speakers and not (self.min_speakers or 1) <= self.num_speakers <= (self.max_speakers or
                                                                                        self.num_speakers):
            raise ValueError("num_speakers must lie within min_speakers and max_speakers (or give only num_speakers)")
        if self.multichannel and (self.num_speakers or self.min_speakers or self.max_speakers):
            raise ValueError("speaker counts do not go with multichannel: each channel's speakers are found "
                             "on their own")
        return self


class _Interval(BaseModel):
    start: float = Field(ge=0)
    end: float = Field(ge=0)

    @model_validator(mode="after")
    def _ends_after_it_starts(self):
        if self.end < self.start:
            raise ValueError("end must not be before start")
        return self


class SpeakerTurn(_Interval):
    """A stretch of audio where one speaker talks (seconds from the start of the file)."""

    speaker: str


class SpeakerEmbedding(BaseModel):
    """One speaker of a recording as the diarizer heard it: a unit-length voice embedding (of up
    to a minute of the speech where that speaker talks alone) and the speaker model that made it."""

    speaker: str
    embedding: list[float]
    model: str
    speech_s: float = Field(default=0.0, ge=0)


class Word(BaseModel):
    word: str
    start: float
    end: float
    probability: float | None = None


# Chunks a job may have. Counts and indexes go to integer (int4) columns: a larger number in a
# message would reach asyncpg, which cannot send it, and fail there instead of at parse.
MAX_CHUNKS = 100_000
INT4_MAX = 2**31 - 1


class Segment(BaseModel):
    """One speaker-labelled piece of transcript; keyed by (job, chunk_index, index)."""

    index: int = Field(ge=0, le=INT4_MAX)
    speaker: str
    start_ts: float
    end_ts: float
    text: str
    words: list[Word] = Field(default_factory=list)
    # True when another speaker talks during some of these words (the diarizer's turns overlap).
    overlap: bool = False
    embedding: list[float] | None = None
    # The language spoken in these words, where the job's recording switches language (its
    # language "en,de" or "multi"); else None: the chunk's.
    language: str | None = None


class TimeSpan(_Interval):
    pass


class _ChunkMessage(BaseModel):
    chunk_index: int = Field(ge=0)
    chunk_count: int = Field(ge=1, le=MAX_CHUNKS)

    @model_validator(mode="after")
    def _index_within_count(self):
        if self.chunk_index >= self.chunk_count:
            raise ValueError("chunk_index must be below chunk_count")
        return self


# ---- work messages (exchange "stt") -------------------------------------------------------


class JobSubmitted(Contract):
    ROUTING_KEY: ClassVar[str] = "job.submitted"

    audio_bucket: str
    audio_key: str
    filename: str
    options: JobOptions = Field(default_factory=JobOptions)


class JobDiarized(_ChunkMessage, Contract):
    """One chunk of a job: a run of speaker turns, transcribed and embedded as a unit."""

    ROUTING_KEY: ClassVar[str] = "job.diarized"

    # 16 kHz mono signed 16-bit little-endian PCM of the whole job, written once by the diarizer.
    pcm_bucket: str
    pcm_key: str
    # Where this chunk's audio starts in that PCM: 0, or with multichannel, its channel's place
    # (channels are laid end to end, each `duration` long). Turns and spans are recording times.
    pcm_offset_s: float = Field(default=0.0, ge=0)
    duration: float
    span: TimeSpan
    turns: list[SpeakerTurn]
    # With multichannel: the other channels' turns within the span. They mark segments talked
    # over (`overlap`) and never take words.
    other_channels: list[SpeakerTurn] = Field(default_factory=list)
    # The job's first stretch of speech, the same in every chunk, so each transcriber replica
    # detects the same language without coordination.
    language_probe: list[TimeSpan] = Field(default_factory=list)
    options: JobOptions = Field(default_factory=JobOptions)
    # The job's speakers as the diarizer heard them, the same in every chunk.
    speakers: list[SpeakerEmbedding] = Field(default_factory=list)


class _DiarizationOfChunk(BaseModel):
    """The diarizer's own output for a chunk, passed along unchanged so the persister stores
    who spoke when (turns may overlap) and the speakers' voice embeddings with the text."""

    turns: list[SpeakerTurn] = Field(default_factory=list)
    speakers: list[SpeakerEmbedding] = Field(default_factory=list)


class ChunkTranscribed(_DiarizationOfChunk, _ChunkMessage, Contract):
    ROUTING_KEY: ClassVar[str] = "chunk.transcribed"

    language: str | None = None
    # The language of the segments' text when it is not the one spoken (en, for task=translate).
    text_language: str | None = None
    duration: float
    segments: list[Segment]


class ChunkEmbedded(_DiarizationOfChunk, _ChunkMessage, Contract):
    """The chunk's segments again, now with embeddings: the persister can store a chunk from
    this message alone, so its arrival order relative to chunk.transcribed does not matter."""

    ROUTING_KEY: ClassVar[str] = "chunk.embedded"

    language: str | None = None
    text_language: str | None = None
    duration: float
    embedding_model: str
    segments: list[Segment]


Stage = Literal["submitted", "diarizing", "transcribing", "embedding", "done"]
STAGES: tuple[str, ...] = get_args(Stage)
# JobFailed.stage names the service that gave up; the job's stage is the step that service runs.
STAGE_OF_SERVICE: dict[str, str] = {"diarizer": "diarizing", "transcriber": "transcribing",
                                    "embedder": "embedding"}


class JobProgress(Contract):
    ROUTING_KEY: ClassVar[str] = "job.progress"

    stage: Stage
    duration: float | None = None
    chunk_count: int | None = Field(default=None, ge=1, le=MAX_CHUNKS)
    # When the diarizer run reporting began (on its first report, `diarizing`): the persister tells a
    # run that began after the job ended (it announces the end again) from a late copy of a report
    # of the run that did the job. None from a diarizer of an earlier version.
    run_started_at: datetime | None = None


class JobFailed(Contract):
    ROUTING_KEY: ClassVar[str] = "job.failed"

    stage: str
    reason: str
    # True for bad input (never retried); False when retries were exhausted.
    permanent: bool = True


class WebhookDue(Contract):
    """The notifier's work: send this job's pending deliveries to this webhook, oldest first."""

    ROUTING_KEY: ClassVar[str] = "webhook.due"

    webhook_id: int
    # Set when this is the delayed retry of that delivery after its `after_attempts`-th attempt:
    # it is due now, whatever the clocks say, unless that delivery was tried again meanwhile.
    retry_of: int | None = None
    after_attempts: int | None = None


WORK_MESSAGES: dict[str, type[Contract]] = {
    m.ROUTING_KEY: m
    for m in (JobSubmitted, JobDiarized, ChunkTranscribed, ChunkEmbedded, JobProgress, JobFailed, WebhookDue)
}


# ---- public events (exchange "stt.events") --------------------------------------------------


class StoredSegment(BaseModel):
    """A stored segment as its readers see it: in segment.created / segment.updated and in every
    output of the API (services/ingest/segments.py)."""

    speaker: str
    # The speaker's name, when one was given (PATCH /transcripts/{id}/speakers) or the voice was
    # recognised as an enrolled speaker's (README "Speakers").
    speaker_name: str | None = None
    # For a recognised voice: its cosine similarity to the enrolled speaker's closest voiceprint.
    speaker_confidence: float | None = None
    start_ts: float
    end_ts: float
    text: str
    # Another speaker talks during some of these words.
    overlap: bool = False
    # The language spoken, where the recording switches language (language "en,de" or "multi").
    language: str | None = None


class SegmentCreated(StoredSegment, Contract):
    ROUTING_KEY: ClassVar[str] = "segment.created"

    transcript_id: int
    chunk_index: int
    index: int
    embedding: list[float] | None = None
    embedding_model: str | None = None


class SegmentUpdated(SegmentCreated):
    """A stored segment corrected by hand (its text, its speaker): the whole segment as it is now."""

    ROUTING_KEY: ClassVar[str] = "segment.updated"


class TranscriptCompleted(Contract):
    ROUTING_KEY: ClassVar[str] = "transcript.completed"

    transcript_id: int
    filename: str
    language: str | None = None
    duration: float | None = None
    segment_count: int
    # Nobody talks in the recording: done with no segments (a result, not a failure).
    no_speech: bool = False
    # The job's `reference`, when it was submitted with one.
    reference: str | None = None


class TranscriptFailed(Contract):
    ROUTING_KEY: ClassVar[str] = "transcript.failed"

    transcript_id: int
    filename: str
    reason: str
    # The job's `reference`, when it was submitted with one.
    reference: str | None = None


class SpeakerName(BaseModel):
    name: str | None = None
    # "manual" (PATCH /transcripts/{id}/speakers) or "auto" (a recognised enrolled voice)
    source: Literal["manual", "auto"] | None = None
    confidence: float | None = None


class TranscriptSpeakersUpdated(Contract):
    """A transcript's speaker names changed, finished or still processing: named by hand, or
    voices recognised (or no longer recognised) after an enrolment, a rename or a forgotten
    speaker, or recognised in a later chunk than the transcript's first segments."""

    ROUTING_KEY: ClassVar[str] = "transcript.speakers_updated"

    transcript_id: int
    # every speaker label of the transcript -> its name now (null: unnamed)
    speakers: dict[str, SpeakerName]


class TranscriptDeleted(Contract):
    """A job was deleted with its transcript and audio (DELETE /transcripts/{id}, or retention):
    subscribers remove their copies, and the pipeline's workers stop working on it. Sent again,
    under the same message id, when a stage reports on the job after that (a redelivered job run
    by a replica that never heard). Only ids: the job's row, with its filename, is gone by then."""

    ROUTING_KEY: ClassVar[str] = "transcript.deleted"

    transcript_id: int


EVENTS: dict[str, type[Contract]] = {
    m.ROUTING_KEY: m for m in (SegmentCreated, SegmentUpdated, TranscriptCompleted, TranscriptFailed,
                               TranscriptSpeakersUpdated, TranscriptDeleted)
}


def events_json_schema() -> dict:
    """JSON Schema of every event on `stt.events`, keyed by routing key (docs/events.schema.json)."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "stt.events",
        "description": "Bodies published to the topic exchange stt.events; the AMQP routing key "
                       "names the event. Delivery is at-least-once: deduplicate on message_id.",
        "routing_keys": {key: model.model_json_schema() for key, model in EVENTS.items()},
    }


if __name__ == "__main__":
    import json

    print(json.dumps(events_json_schema(), indent=2, ensure_ascii=False))
