"""GET/DELETE /transcripts: a job's transcript as JSON, SRT, WebVTT or plain text; the list of
jobs; deleting a job with its audio. The formatters are plain functions of the segments."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Literal
from urllib.parse import quote

import asyncpg
from litestar import Request, delete, get, patch
from litestar.datastructures import State
from litestar.exceptions import HTTPException, NotFoundException
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, Operation, Schema
from litestar.params import PathParameter, QueryParameter
from litestar.response import Response
from minio import Minio
from pydantic import BaseModel, Field

from common import jobstore, speakerstore
from common.logs import job_logged
from common.messages import REFERENCE_MAX_CHARS, JobOptions, SpeakerName, SpeakerTurn, Stage
from common.settings import Settings
from common.storage import call_in_transaction, pcm_key, remove_objects
from common.turns import speech_regions
from services.ingest.admission import SMALL_BODY_BYTES
from services.ingest.auth import request_owner
from services.ingest.captions import LINE_COUNT, LINE_WIDTH, caption_cues
from services.ingest.errors import MAX_ID, error_responses
from services.ingest.jobs import percent_done, public_stage, result_keys, upload_key
from services.ingest.segments import TranscriptSegment, is_label, transcript_segment
from services.ingest.speakers import clean_name

log = logging.getLogger(__name__)

JobState = Literal["processing", "done", "error"]
TextFormat = Literal["json", "srt", "vtt", "txt", "rttm"]
MEDIA_TYPES = {"srt": "application/x-subrip", "vtt": "text/vtt", "txt": "text/plain", "rttm": "text/plain"}


# ---- response models ------------------------------------------------------------------------


class TranscriptSummary(BaseModel):
    """A job as listed; fields without a value yet (language, duration, completed_at) are left out."""

    id: int
    filename: str
    status: JobState
    stage: Stage
    percent: int = Field(ge=0, le=100)
    language: str | None = None
    duration: float | None = None
    created_at: datetime
    completed_at: datetime | None = None
    # The submitter's own name for the job (`reference` at submission), when it has one.
    reference: str | None = None


class TranscriptDocument(TranscriptSummary):
    error: str | None = None
    # What the job was submitted with (form fields or a drop's metadata), defaults filled in.
    options: JobOptions
    # Done, and nobody talks in the recording.
    no_speech: bool = False
    segments: list[TranscriptSegment]


class TranscriptPage(BaseModel):
    items: list[TranscriptSummary]
    # Pass as ?cursor= for the next page; absent on the last page.
    next_cursor: int | None = None


# ---- formatters -----------------------------------------------------------------------------


def _clock(seconds: float, fraction_separator: str | None) -> str:
    """HH:MM:SS plus milliseconds after `fraction_separator`; hours grow past 99 if needed.
    Rounded to the millisecond first, so 59.9996 s reads 00:01:00.000, never 00:00:60.000."""
    total_ms = max(0, round(seconds * 1000))
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole_seconds, ms = divmod(rest, 1000)
    clock = f"{hours:02d}:{minutes:02d}:{whole_seconds:02d}"
    return clock if fraction_separator is None else f"{clock}{fraction_separator}{ms:03d}"


def srt_timestamp(seconds: float) -> str:
    return _clock(seconds, ",")


def vtt_timestamp(seconds: float) -> str:
    return _clock(seconds, ".")


def txt_timestamp(seconds: float) -> str:
    return _clock(seconds, None)


def _one_line(text: str) -> str:
    """Text on one line: in a cue, a blank line would end it."""
    return " ".join(text.split())


def _srt_line(text: str) -> str:
    """SRT has no escaping: `-->` in a cue's text would read as timing. (WebVTT's &gt; covers it.)"""
    return re.sub(r"-{2,}>", "->", _one_line(text))


def to_srt(segments: Sequence[TranscriptSegment], line_width: int = LINE_WIDTH,
           line_count: int = LINE_COUNT) -> str:
    """Numbered cues of at most `line_count` lines, each starting with the speaker."""
    cues = [
        f"{number}\n{srt_timestamp(cue.start)} --> {srt_timestamp(cue.end)}\n"
        + "\n".join(_srt_line(line) for line in [f"{cue.speaker}: {cue.lines[0]}", *cue.lines[1:]]) + "\n"
        for number, cue in enumerate(caption_cues(segments, line_width, line_count), start=1)
    ]
    return "\n".join(cues)


def _vtt_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_vtt(segments: Sequence[TranscriptSegment], line_width: int = LINE_WIDTH,
           line_count: int = LINE_COUNT) -> str:
    """Cues with the speaker as a voice tag; players show it as they choose, so it takes no
    room in the lines."""
    cues = [
        f"{vtt_timestamp(cue.start)} --> {vtt_timestamp(cue.end)}\n<v {_vtt_escape(_one_line(cue.speaker))}>"
        + "\n".join(_vtt_escape(_one_line(line)) for line in cue.lines) + "\n"
        for cue in caption_cues(segments, line_width, line_count, speaker_takes_room=False)
    ]
    return "\n".join(["WEBVTT\n", *cues])


def to_txt(segments: Sequence[TranscriptSegment]) -> str:
    return "".join(f"[{txt_timestamp(s.start_ts)}] {_one_line(s.speaker_name or s.speaker)}: {_one_line(s.text)}\n"
                   for s in segments)


SUBTITLE_FORMATTERS = {"srt": to_srt, "vtt": to_vtt}


def rttm_uri(filename: str) -> str:
    """RTTM's file field: the name without its extension, one token (fields are split at
    whitespace; any other character, in any script, is kept, so a reference's file id matches)."""
    stem = download_name(filename, "")[:-1]
    return rttm_token(re.sub(r"\s", "_", stem) or "audio")


# pandas' default NA strings (pandas._libs.parsers.STR_NA_VALUES): pyannote.database's load_rttm
# reads with them, so a file id or speaker that is one of them exactly would lose its turns or be
# merged with another.
PANDAS_NA_STRINGS = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
    "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})


def rttm_token(token: str) -> str:
    """A file id or speaker as RTTM readers built on pandas read it back: `"` becomes `'` (pandas
    reads a field that starts with one as quoted: `"Bob"` as Bob, and a lone `"` swallows the rest
    of the file), and an NA string gets a `_`."""
    token = token.replace('"', "'")
    return f"{token}_" if token in PANDAS_NA_STRINGS else token


def to_rttm(uri: str, turns: Sequence[SpeakerTurn], names: dict[str, str] | None = None) -> str:
    """NIST RTTM, one SPEAKER line per turn (overlapping turns included; a turn's pieces that touch,
    cut between chunks, joined), as pyannote.metrics,
    dscore and md-eval read it; a named speaker appears under its name (blanks as _, a pandas NA
    string such as `None` with a _ appended)."""
    names = {label: rttm_token(re.sub(r"\s+", "_", name.strip())) for label, name in (names or {}).items()}
    # A turn cut where talk longer than a chunk was split comes back as one.
    joined: list[SpeakerTurn] = []
    open_turn: dict[str, int] = {}  # speaker -> index in `joined` of their latest turn
    for turn in sorted(turns, key=lambda t: (t.start, t.end)):
        latest = open_turn.get(turn.speaker)
        if latest is not None and joined[latest].end == turn.start:
            joined[latest] = joined[latest].model_copy(update={"end": turn.end})
            continue
        open_turn[turn.speaker] = len(joined)
        joined.append(turn)
    # A turn shorter than the format's millisecond would be written as lasting 0, which scorers refuse.
    return "".join(f"SPEAKER {uri} 1 {t.start:.3f} {t.end - t.start:.3f} <NA> <NA> {names.get(t.speaker, t.speaker)}"
                   " <NA> <NA>\n" for t in joined if round(t.end - t.start, 3) > 0)


# What follows a name's last dot when that is an extension (mp3, m4a, webm): not "25 standup" of
# "2025.11.25 standup", nor " Smith interview" of "Dr. Smith interview"; nothing after a final dot.
_EXTENSION = re.compile(r"(?=[0-9]*[A-Za-z])[A-Za-z0-9]{1,5}|")


def download_name(filename: str, extension: str) -> str:
    """meeting.mp3 -> meeting.srt (the original name with the format's extension in place of its
    own, where it has one)."""
    stem, dot, own = filename.rpartition(".")
    return f"{stem if dot and stem and _EXTENSION.fullmatch(own) else filename}.{extension}"


def stored_filename(filename: str, redacted: bool) -> str:
    """The name of what is stored for a job: a redacted recording is a WAV whatever was uploaded."""
    return download_name(filename, "wav") if redacted else filename


def content_disposition(filename: str) -> str:
    """An ASCII fallback name plus the exact name in RFC 5987 form (names may be any language)."""
    fallback = re.sub(r'[^\x20-\x7e]|["\\]', "_", filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


# ---- database -------------------------------------------------------------------------------

def _summary_fields(row: asyncpg.Record) -> dict:
    return {
        "id": row["id"], "filename": row["filename"], "status": row["status"],
        "stage": public_stage(row["stage"]), "percent": percent_done(row["status"], row["progress"]),
        "language": row["language"], "duration": row["duration"],
        "created_at": row["created_at"], "completed_at": row["completed_at"], "reference": row["reference"],
    }


def visible(row: asyncpg.Record | None, owner: str | None) -> bool:
    """With API keys on (`owner` set), another key's job is as if it did not exist."""
    return row is not None and (owner is None or row["owner"] == owner)


async def fetch_transcript(pool: asyncpg.Pool | asyncpg.Connection, job_id: int, owner: str | None,
                           with_words: bool) -> TranscriptDocument | None:
    job = await jobstore.job(pool, job_id)
    if not visible(job, owner):
        return None
    segments = [transcript_segment(r, with_words) for r in await jobstore.job_segments(pool, job_id)]
    error = job["error"] if job["status"] == "error" else None
    return TranscriptDocument(**_summary_fields(job), error=error, no_speech=job["no_speech"],
                              options=JobOptions.model_validate(job["options"] or {}), segments=segments)


@dataclass
class ListFilters:
    status: JobState | None = None
    filename: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    reference: str | None = None


async def list_transcripts(pool: asyncpg.Pool, owner: str | None, filters: ListFilters,
                           limit: int, cursor: int | None) -> TranscriptPage:
    """Newest first. The cursor is the last id of the previous page, so pages stay stable
    while new jobs arrive."""
    if any(text is not None and "\x00" in text for text in (filters.filename, filters.reference)):
        return TranscriptPage(items=[])  # stored names never hold NUL (and PostgreSQL refuses it)
    rows = await jobstore.list_jobs(pool, owner=owner, status=filters.status, filename=filters.filename,
                                    since=filters.since, until=filters.until, before_id=cursor, limit=limit + 1,
                                    reference=filters.reference)
    items = [TranscriptSummary(**_summary_fields(r)) for r in rows[:limit]]
    return TranscriptPage(items=items, next_cursor=items[-1].id if len(rows) > limit else None)


class StillProcessing(Exception):
    pass


class JobBusy(Exception):
    """Another request holds the job or its rows (deleting it, writing its result files, a reindex
    storing its vectors) for longer than JOB_LOCK_WAIT_S."""


JOB_LOCK_WAIT_S = 5.0


async def lock_job_briefly(conn: asyncpg.Connection, job_id: int) -> asyncpg.Record | None:
    """jobstore.lock_job, waiting at most JOB_LOCK_WAIT_S for it, and for every other lock this
    transaction takes after it (the job's segments); raises JobBusy past that. A request sent again
    while the first waits on a transaction that does not end would hold one more pooled connection
    each time."""
    await conn.execute(f"SET LOCAL lock_timeout = '{int(JOB_LOCK_WAIT_S * 1000)}ms'")
    try:
        return await jobstore.lock_job(conn, job_id)
    except asyncpg.exceptions.LockNotAvailableError as exc:
        raise JobBusy from exc


class ObjectStoreUnavailable(Exception):
    pass


async def delete_transcript(pool: asyncpg.Pool, s3: Minio, settings: Settings, job_id: int,
                            owner: str | None) -> bool:
    """Remove an ended job: its rows (chunks and segments cascade), then, before they are
    committed, its audio objects (the upload and the decoded PCM) and a bucket drop's result
    files. Raises JobBusy, with nothing removed, while another transaction holds the job or its
    rows for longer than JOB_LOCK_WAIT_S. A bucket drop's inbox object is the user's and stays;
    its identity is remembered so the inbox scan does not run it again. Returns False for an
    unknown job; raises StillProcessing while the job runs, because its workers would write the
    objects and rows again. Its transcript.deleted is committed with the deletion
    (jobstore.delete_job), for the outbox to publish."""
    async with pool.acquire() as conn, conn.transaction():
        # Another key's job is unknown at once, without waiting on its lock (a 503 "being
        # changed" would tell that it exists). Its owner never changes.
        if not visible(await jobstore.job(conn, job_id), owner):
            return False
        # The locks also wait out the inbox writing this job's result file, and a reindex storing
        # its segments' vectors, but not for long.
        job = await lock_job_briefly(conn, job_id)
        if job is None:  # deleted meanwhile
            return False
        if job["status"] == "processing":
            raise StillProcessing
        objects = [(settings.audio_bucket, job["audio_key"] or upload_key(job_id)),
                   (settings.audio_bucket, pcm_key(job_id))]
        if job["source"] == "bucket":
            # Imported here, not above: inbox imports this module.
            from services.ingest.inbox import result_key_too_long

            # Its result files, unless the object was dropped again since: they are that job's. A
            # key too long for them has none, and the store refuses even to delete such a key.
            if (not result_key_too_long(settings.results_prefix, job["source_key"])
                    and not await jobstore.newer_drop_of_the_same_key(conn, job_id)):
                results = result_keys(settings.results_prefix, job["source_key"])
                objects += [(job["source_bucket"], key) for key in results.values()]
            await jobstore.remember_deleted_drop(conn, job["source_bucket"], job["source_key"], job["source_etag"])
        # The rows before the objects, in this transaction: their delete waits on every row of the
        # job another transaction holds (a reindex storing its vectors), and a recording removed
        # before that wait gave up would leave the job without it. The store failing rolls the
        # rows back, so the delete can be repeated.
        try:
            await jobstore.delete_job(conn, job_id)
        except asyncpg.exceptions.LockNotAvailableError as exc:
            raise JobBusy from exc
        try:
            await call_in_transaction(remove_objects, s3, objects)
        except Exception as exc:
            with job_logged(job_id):
                log.warning("could not remove its objects (%s)", type(exc).__name__)
            raise ObjectStoreUnavailable from exc
    with job_logged(job_id):
        log.info("deleted (%s)", ", ".join(f"{b}/{k}" for b, k in objects))
    return True


# ---- routes ---------------------------------------------------------------------------------

JobId = Annotated[int, PathParameter(ge=1, le=MAX_ID, description="The job id /recognize returned")]
FormatQuery = Annotated[TextFormat, QueryParameter(
    description="json (default), srt, vtt, txt, or rttm: the diarization itself (every turn, overlaps included)")]
WordsQuery = Annotated[bool, QueryParameter(description="json only: each segment's words with their times")]
LineWidthQuery = Annotated[int, QueryParameter(
    ge=12, le=200, description="srt and vtt: the most columns on a subtitle line (a wide character takes two)")]
LineCountQuery = Annotated[int, QueryParameter(ge=1, le=10, description="srt and vtt: the most lines in a cue")]
LimitQuery = Annotated[int, QueryParameter(ge=1, le=500, description="Items per page")]
CursorQuery = Annotated[int | None, QueryParameter(ge=1, le=MAX_ID, description="next_cursor of the previous page")]
StatusQuery = Annotated[JobState | None, QueryParameter(description="Only jobs in this state")]
ReferenceQuery = Annotated[str | None, QueryParameter(
    max_length=REFERENCE_MAX_CHARS, description="Only jobs submitted with this `reference` (exactly;"
                                                " the spaces around it do not count, nor does a blank one)")]
FilenameQuery = Annotated[str | None, QueryParameter(max_length=255, description="Substring of the filename, any case")]
# Strings parsed here rather than datetimes parsed by the framework, which takes only full RFC 3339
# times: `since=2026-12-01` is what people type.
SinceQuery = Annotated[str | None, QueryParameter(
    description="Created at or after: an ISO 8601 date or date and time (UTC if no offset)", max_length=64)]
UntilQuery = Annotated[str | None, QueryParameter(
    description="Created before: an ISO 8601 date or date and time (UTC if no offset)", max_length=64)]
# A '+' of an offset left unescaped in a query string arrives as a blank.
_BLANKED_OFFSET = re.compile(r"(\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?) (\d{2}:?\d{2})$")


def utf8(media_type: str) -> str:
    """The media type saying UTF-8; Litestar adds the charset to text/* types itself, and a second
    one is a repeated parameter that strict parsers (Go's mime package) refuse."""
    return media_type if media_type.startswith("text/") else f"{media_type}; charset=utf-8"


@dataclass
class _TextFormatsOperation(Operation):
    """The 200 answer is JSON by default and text in the subtitle and text formats."""

    def __post_init__(self) -> None:
        answer = (self.responses or {}).get("200")
        if answer is not None and not isinstance(answer, dict) and hasattr(answer, "content"):
            answer.content = {**(answer.content or {}), **{
                media_type: OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING))
                for media_type in MEDIA_TYPES.values()
            }}


@get("/transcripts/{job_id:int}", summary="A job's transcript: JSON, SRT, WebVTT, text or RTTM",
      operation_class=_TextFormatsOperation,
      responses=error_responses(400, 401, 403, 404, 409, 503,
                                e409="srt, vtt, txt and rttm exist only once the job is done"))
async def get_transcript(
    job_id: JobId, state: State, request: Request,
    format: FormatQuery = "json", words: WordsQuery = False,
    max_line_width: LineWidthQuery = LINE_WIDTH, max_line_count: LineCountQuery = LINE_COUNT,
) -> Response[TranscriptDocument]:
    subtitles = format in SUBTITLE_FORMATTERS  # cut into cues by the words' times
    document = await fetch_transcript(state.pool, job_id, request_owner(request), with_words=words or subtitles)
    if document is None:
        raise NotFoundException(detail=f"no job with id {job_id}")
    if format == "json":
        return Response(document)
    if document.status != "done":
        reason = (f"the job failed ({document.error})" if document.status == "error"
                  else f"the job is still processing ({document.stage}, {document.percent}%)")
        raise HTTPException(status_code=409, detail=f"{reason}: {format} is available once it is done;"
                                                    " format=json shows what exists so far")
    if format == "rttm":
        body = to_rttm(rttm_uri(document.filename), await jobstore.job_turns(state.pool, job_id),
                       {label: n.name for label, n in (await jobstore.speaker_names(state.pool, job_id)).items()
                        if n.name})
    elif subtitles:
        # Off the event loop: cutting a long transcript into cues takes a while, and every other
        # request (liveness checks too) would wait for it.
        body = await asyncio.to_thread(SUBTITLE_FORMATTERS[format], document.segments, max_line_width, max_line_count)
    else:
        body = to_txt(document.segments)
    return Response(
        body,
        media_type=utf8(MEDIA_TYPES[format]),
        headers={"Content-Disposition": content_disposition(download_name(document.filename, format))},
    )


@get("/transcripts", summary="Jobs, newest first, a page at a time",
     responses=error_responses(400, 401, 403, 503))
async def get_transcripts(
    state: State, request: Request,
    limit: LimitQuery = 50, cursor: CursorQuery = None, status: StatusQuery = None,
    filename: FilenameQuery = None, since: SinceQuery = None, until: UntilQuery = None,
    reference: ReferenceQuery = None,
) -> TranscriptPage:
    # As submission reads it: the spaces around it are not kept, and a blank one is none.
    filters = ListFilters(status=status, filename=filename, since=as_utc(since, "since"),
                          until=as_utc(until, "until"), reference=(reference or "").strip() or None)
    return await list_transcripts(state.pool, request_owner(request), filters, limit, cursor)


def as_utc(value: str | None, name: str) -> datetime | None:
    """An ISO 8601 date (its midnight) or date and time, in UTC when it has no offset."""
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(_BLANKED_OFFSET.sub(r"\1+\2", value.strip()))
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except ValueError as exc:
        raise HTTPException(status_code=400, detail=f"{name} is not an ISO 8601 date or date and time"
                                                    " (2026-12-01, 2026-12-01T09:30:00Z)") from exc
    except OverflowError as exc:
        raise HTTPException(status_code=400, detail=f"{name} is out of range") from exc


@delete("/transcripts/{job_id:int}", status_code=204, summary="Delete a job, its transcript and its audio",
        responses=error_responses(400, 401, 403, 404, 409, 503,
                                  e409="The job is still processing; cancel it first, or delete it after it ends"))
async def remove_transcript(job_id: JobId, state: State, request: Request) -> None:
    try:
        deleted = await delete_transcript(state.pool, state.s3_quick, state.settings, job_id, request_owner(request))
    except StillProcessing as exc:
        raise HTTPException(status_code=409, detail=f"job {job_id} is still processing; delete it after it ends"
                                                    f" (done or error), or cancel it first: POST"
                                                    f" /transcripts/{job_id}/cancel") from exc
    except ObjectStoreUnavailable as exc:
        raise HTTPException(status_code=503, detail="the object store is unavailable; the job is still there"
                                                    " (some of its files may be gone already), try again",
                            headers={"Retry-After": "5"}) from exc
    except JobBusy as exc:
        raise HTTPException(status_code=503, detail=f"job {job_id} is being changed by another request (a delete,"
                                                    " its result files being written, or a reindex); nothing was"
                                                    " deleted, try again", headers={"Retry-After": "5"}) from exc
    if not deleted:
        raise NotFoundException(detail=f"no job with id {job_id}")
    state.outbox_wake.set()  # its transcript.deleted


class SpeakerNames(BaseModel):
    """Every speaker of the job, with its name or null."""

    speakers: dict[str, str | None]


class TranscriptSpeaker(SpeakerName):
    # Seconds this speaker talks in the diarization (overlapping talk counted for each speaker).
    speech_s: float = 0.0
    # Its share of all the speakers' talk (0-1; the shares add up to 1).
    share: float = 0.0
    # Words of the transcript said by this speaker.
    words: int = 0


class TranscriptSpeakers(BaseModel):
    """Every speaker of the job: its name (and how it was given) and how long it talks."""

    speakers: dict[str, TranscriptSpeaker]


def speaking_time(turns: Sequence[SpeakerTurn]) -> dict[str, float]:
    """Seconds each speaker talks: the union of its turns (turns of one speaker may overlap)."""
    by_speaker: dict[str, list[SpeakerTurn]] = {}
    for turn in turns:
        by_speaker.setdefault(turn.speaker, []).append(turn)
    return {speaker: round(sum(r.end - r.start for r in speech_regions(own)), 3) for speaker, own in by_speaker.items()}


@get("/transcripts/{job_id:int}/speakers", summary="A job's speakers: names and speaking time",
     responses=error_responses(400, 401, 403, 404, 503))
async def list_job_speakers(job_id: JobId, state: State, request: Request) -> TranscriptSpeakers:
    """While the job runs, the speakers the stored chunks have so far."""
    job = await jobstore.job(state.pool, job_id)
    if not visible(job, request_owner(request)):
        raise NotFoundException(detail=f"no job with id {job_id}")
    labels = await jobstore.job_speaker_labels(state.pool, job_id)
    names = await jobstore.speaker_names(state.pool, job_id)
    seconds = speaking_time(await jobstore.job_turns(state.pool, job_id))
    words = await jobstore.speaker_word_counts(state.pool, job_id)
    total_s = sum(seconds.values())
    return TranscriptSpeakers(speakers={
        label: TranscriptSpeaker(**(names[label].model_dump() if label in names else {}),
                                 speech_s=seconds.get(label, 0.0), words=words.get(label, 0),
                                 share=round(seconds.get(label, 0.0) / total_s, 3) if total_s else 0.0)
        for label in in_speaker_order(labels | set(names))})


@patch("/transcripts/{job_id:int}/speakers", summary="Name a job's speakers", request_max_body_size=SMALL_BODY_BYTES,
       responses=error_responses(400, 401, 403, 404, 413, 503, e413="The JSON body is over 1 MiB"))
async def name_speakers(job_id: JobId, state: State, request: Request,
                        data: dict[str, str | None]) -> SpeakerNames:
    """`{"spk_0": "Anna", "spk_1": null}`: names (null removes one) shown in /status, every
    transcript format, search hits, and the segment.created events stored from then on."""
    async with state.pool.acquire() as conn, conn.transaction():
        # Another key's job is unknown at once, not after waiting on its lock.
        if not visible(await jobstore.job(conn, job_id), request_owner(request)):
            raise NotFoundException(detail=f"no job with id {job_id}")
        job = await jobstore.lock_job(conn, job_id)
        if job is None:  # deleted meanwhile
            raise NotFoundException(detail=f"no job with id {job_id}")
        before = await jobstore.speaker_names(conn, job_id)
        # A label whose lines were all moved to another keeps its name, listed, until unnamed.
        labels = await jobstore.job_speaker_labels(conn, job_id) | set(before)
        # While the job runs, a speaker may be named before the diarizer has reached it.
        unknown = sorted(label for label in data if label not in labels
                         and not (job["status"] == "processing" and is_label(label)))
        if not data or unknown:
            raise HTTPException(status_code=400, detail=f"no such speaker in job {job_id}: {', '.join(unknown)}"
                                if unknown else "name at least one speaker: {\"spk_0\": \"Anna\"}")
        names = {}
        for label, name in data.items():
            names[label] = None if name is None else clean_name(name, f" (null removes it): {label}")
        await jobstore.set_speaker_names(conn, job_id, names)
        # A speaker unnamed by hand is open to recognition again.
        await speakerstore.name_recording_speakers(conn, job_id, job["owner"], state.settings.speaker_match_threshold,
                                                   state.settings.speaker_min_speech_s)
        current = await jobstore.speaker_names(conn, job_id)
        # Names sent again (a client's retry) announce nothing a second time.
        if current != before:
            await speakerstore.announce_speaker_names(conn, job_id)
    state.outbox_wake.set()
    return SpeakerNames(speakers={label: current[label].name if label in current else None
                                  for label in in_speaker_order(labels | set(names))})



def in_speaker_order(labels: set[str]) -> list[str]:
    """spk_2 before spk_10, as the diarizer numbers them (names given by hand to other labels
    sorted likewise, shorter first)."""
    return sorted(labels, key=lambda label: (len(label), label))


TRANSCRIPT_ROUTES = [get_transcript, get_transcripts, remove_transcript, list_job_speakers, name_speakers]
