"""Job state in PostgreSQL: every statement over `transcripts`, `chunks`, `segments`,
`speaker_turns`, `transcript_speakers`, `deleted_drops` and `job_usage`, for ingest and the
persister alike (the tables are described in docs/design.md), but the search's (common.searchstore).
Plain async functions over an asyncpg connection or pool; the callers own the transactions, and the
functions that lock a row say so."""

from __future__ import annotations

import logging
import re
from datetime import datetime, timedelta

import asyncpg

from common.messages import (
    REDACTABLE,
    STAGE_OF_SERVICE,
    STAGES,
    Segment,
    SpeakerEmbedding,
    SpeakerName,
    SpeakerTurn,
    TranscriptCompleted,
    TranscriptDeleted,
    TranscriptFailed,
    redacted_label,
)
from common.outbox import add_to_outbox

log = logging.getLogger(__name__)
# A word redaction replaced ([EMAIL], [CARD]...), as a PostgreSQL regular expression.
_REDACTED_WORD = "|".join(re.escape(redacted_label(kind)) for kind in REDACTABLE)

Db = asyncpg.Connection | asyncpg.Pool

# A `transcripts` column: the job is done and nobody talks in it (the diarizer found no turns, so
# there are no segments). One definition for /status, /transcripts and transcript.completed.
NO_SPEECH_COLUMN = ("(transcripts.status = 'done'"
                    " AND NOT EXISTS (SELECT 1 FROM speaker_turns t WHERE t.transcript_id = transcripts.id)"
                    " AND NOT EXISTS (SELECT 1 FROM segments s WHERE s.transcript_id = transcripts.id)) AS no_speech")
# A job's reference (JobOptions.reference), as migration 019 indexes it: the list filter must use
# this very expression for the index to serve it.
_REFERENCE = "options->>'reference'"
SUMMARY_COLUMNS = ("id, filename, status, stage, progress, language, duration, created_at, completed_at,"
                   f" {_REFERENCE} AS reference")


# ---- creating jobs (ingest) -------------------------------------------------------------------

async def existing_job_ids(db: Db, job_ids: list[int]) -> set[int]:
    """Those of `job_ids` that are jobs."""
    return {r["id"] for r in await db.fetch("SELECT id FROM transcripts WHERE id = ANY($1::bigint[])", job_ids)}


# Of a `transcripts` row: the job asked for redaction (JobOptions.redact); never NULL.
_REDACTION_ASKED = ("COALESCE(CASE WHEN jsonb_typeof(transcripts.options->'redact') = 'array'"
                    " THEN jsonb_array_length(transcripts.options->'redact') > 0 END, false)")
# Of a `transcripts` row: its stored recording is the upload, to be redacted by ingest's job-end
# step (audio_redaction_due, set by mark_done; cleared once the redacted copy is written or that is
# given up), and neither redacted nor removed since.
_RECORDING_TO_REDACT = ("(transcripts.audio_redaction_due AND transcripts.audio_redacted_at IS NULL"
                        " AND transcripts.audio_removed_at IS NULL)")
# Of a `transcripts` row, as a job is marked done: its recording is to be redacted (the job asked
# for it, or the transcriber's REDACT replaced words of it); $2 is _REDACTED_WORD. Read once then
# (mark_done), never per request: a label typed by hand in a correction later is no redaction.
_REDACTION_DUE_AT_END = (
    "(transcripts.audio_redacted_at IS NULL AND transcripts.audio_removed_at IS NULL"
    f" AND ({_REDACTION_ASKED} OR EXISTS (SELECT 1 FROM segments s, jsonb_array_elements(s.words) w"
    " WHERE s.transcript_id = transcripts.id AND w->>'word' ~ $2)))")


async def jobs_using_pcm(db: Db, job_ids: list[int], kept_after_end_s: float) -> set[int]:
    """Those of `job_ids` whose decoded audio may still be read: jobs still processing, ended
    within `kept_after_end_s`, or done with a redaction of the recording still to do (a failed
    one is retried from the PCM, however late: it is the only way to a recording without them)."""
    rows = await db.fetch(
        "SELECT id FROM transcripts WHERE id = ANY($1::bigint[]) AND (status = 'processing'"
        " OR completed_at IS NULL OR completed_at > now() - make_interval(secs => $2)"
        f" OR (status = 'done' AND {_RECORDING_TO_REDACT}))",
        job_ids, kept_after_end_s)
    return {r["id"] for r in rows}


async def redaction_pending(db: Db, job_id: int, processing_too: bool = False) -> bool:
    """The job is done and its stored recording is still the unredacted upload, to be redacted
    (jobs_using_pcm's "redaction of the recording still to do"); with `processing_too`, also a
    job still processing that asked for redaction. A column read: no word is looked at."""
    return bool(await db.fetchval(
        f"SELECT CASE WHEN status = 'done' THEN {_RECORDING_TO_REDACT}"
        f" WHEN status = 'processing' THEN $2 AND {_REDACTION_ASKED} AND audio_redacted_at IS NULL"
        " AND audio_removed_at IS NULL ELSE false END FROM transcripts WHERE id = $1",
        job_id, processing_too))


async def reserve_job_id(db: Db) -> int:
    return await db.fetchval("SELECT nextval(pg_get_serial_sequence('transcripts', 'id'))")


async def insert_job(conn: asyncpg.Connection, job_id: int, *, filename: str, audio_key: str, options: dict,
                     owner: str | None, drop: tuple[str, str, str] | None,
                     idempotency: tuple[str, str] | None = None) -> int | None:
    """The job's row; None when `drop` (bucket, key, ETag) already is a job or its owner deleted
    it, or when the owner's `idempotency` key (with the request's hash) already made one."""
    bucket, key, etag = drop or (None, None, None)
    idempotency_key, request_hash = idempotency or (None, None)
    return await conn.fetchval(
        "INSERT INTO transcripts (id, filename, source, source_bucket, source_key, source_etag,"
        " audio_key, options, owner, idempotency_key, request_hash)"
        " SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11"
        " WHERE NOT EXISTS (SELECT 1 FROM deleted_drops"
        " WHERE source_bucket = $4 AND source_key = $5 AND source_etag = $6)"
        " ON CONFLICT DO NOTHING RETURNING id",
        job_id, filename, "bucket" if drop else "upload", bucket, key, etag, audio_key, options, owner,
        idempotency_key, request_hash,
    )


async def job_by_idempotency_key(db: Db, owner: str | None, idempotency_key: str) -> asyncpg.Record | None:
    """id, filename, request_hash and callback_secret (of its callback_url) of the owner's job
    made with this Idempotency-Key."""
    return await db.fetchrow(
        "SELECT t.id, t.filename, t.request_hash, w.secret AS callback_secret FROM transcripts t"
        " LEFT JOIN webhooks w ON w.job_id = t.id"
        " WHERE coalesce(t.owner, '') = coalesce($1, '') AND t.idempotency_key = $2", owner, idempotency_key)


async def recent_job_asked_so(db: Db, owner: str | None, request_hash: str, done_within: timedelta,
                              failed_within: timedelta) -> asyncpg.Record | None:
    """The owner's newest job that a request with this hash made (its id), still processing, done
    within `done_within`, or failed (or cancelled) within `failed_within`."""
    return await db.fetchrow(
        "SELECT id FROM transcripts WHERE request_hash = $2 AND coalesce(owner, '') = coalesce($1, '')"
        " AND (status = 'processing' OR completed_at > now() - CASE WHEN status = 'done' THEN $3::interval"
        " ELSE $4::interval END)"
        " ORDER BY id DESC LIMIT 1", owner, request_hash, done_within, failed_within)


async def drop_is_known(db: Db, bucket: str, key: str, etag: str) -> bool:
    """The bucket object already is a job, or was one that its owner deleted."""
    return not await unknown_drops(db, bucket, [(key, etag)])


async def unknown_drops(db: Db, bucket: str, drops: list[tuple[str, str]]) -> set[tuple[str, str]]:
    """The (key, ETag) pairs of `drops` that are not a job yet and were not deleted by their owner."""
    rows = await db.fetch(
        "SELECT d.key, d.etag FROM unnest($2::text[], $3::text[]) AS d(key, etag)"
        " WHERE NOT EXISTS (SELECT 1 FROM transcripts WHERE source_bucket = $1 AND source_key = d.key"
        " AND source_etag = d.etag) AND NOT EXISTS (SELECT 1 FROM deleted_drops WHERE source_bucket = $1"
        " AND source_key = d.key AND source_etag = d.etag)",
        bucket, [key for key, _ in drops], [etag for _, etag in drops])
    return {(r["key"], r["etag"]) for r in rows}


# ---- reading jobs (ingest) --------------------------------------------------------------------

async def job(db: Db, job_id: int) -> asyncpg.Record | None:
    """The job's summary columns with its status detail: error, owner, no_speech, options."""
    return await db.fetchrow(
        f"SELECT {SUMMARY_COLUMNS}, error, owner, {NO_SPEECH_COLUMN}, options FROM transcripts WHERE id = $1", job_id)


SPEAKER_NAME_JOIN = ("LEFT JOIN transcript_speakers n ON n.transcript_id = s.transcript_id AND n.speaker = s.speaker")


_SEGMENT_COLUMNS = ("s.chunk_index, s.index, s.speaker, n.name AS speaker_name, n.confidence AS speaker_confidence,"
                    " s.start_ts, s.end_ts, s.text, s.overlap, s.language, s.edited_at IS NOT NULL AS edited")
_SEGMENT = f"SELECT {_SEGMENT_COLUMNS}, s.words FROM segments s {SPEAKER_NAME_JOIN} WHERE s.transcript_id = $1"


async def job_segments(db: Db, job_id: int) -> list[asyncpg.Record]:
    """chunk_index, index, speaker, speaker_name, speaker_confidence, start_ts, end_ts, text,
    words, overlap, language (where the recording switches language) and edited (corrected by
    hand) of every segment, in time order."""
    return await db.fetch(f"{_SEGMENT} ORDER BY s.start_ts, s.chunk_index, s.index", job_id)


# The language a segment's text is written, and indexed for search, in: English for a translated
# job's (the transcriber writes English), else the segment's own or its transcript's (as
# store_segments indexes it). In SQL over segments s JOIN transcripts t.
SEGMENT_TEXT_LANGUAGE = ("(CASE WHEN t.options->>'task' = 'translate' THEN 'en'"
                          " ELSE COALESCE(s.language, t.language) END)")


async def job_segment(db: Db, job_id: int, chunk_index: int, index: int) -> asyncpg.Record | None:
    """One segment, with the fields of job_segments."""
    return await db.fetchrow(f"{_SEGMENT} AND s.chunk_index = $2 AND s.index = $3", job_id, chunk_index, index)


async def lock_segment(conn: asyncpg.Connection, job_id: int, chunk_index: int, index: int) -> asyncpg.Record | None:
    """One segment (with the language its text is indexed in), locked until the transaction ends."""
    return await conn.fetchrow(
        "SELECT s.speaker, s.start_ts, s.end_ts, s.text, s.words, s.embedding_model,"
        f" {SEGMENT_TEXT_LANGUAGE} AS text_language FROM segments s"
        " JOIN transcripts t ON t.id = s.transcript_id"
        " WHERE s.transcript_id = $1 AND s.chunk_index = $2 AND s.index = $3 FOR UPDATE OF s",
        job_id, chunk_index, index)


async def correct_segment(conn: asyncpg.Connection, job_id: int, chunk_index: int, index: int, *, speaker: str,
                          text: str | None = None, words: list[dict] | None = None, text_language: str | None = None,
                          embedding: list[float] | None = None, embedding_model: str | None = None) -> None:
    """A segment's speaker as corrected by hand; with `text`, also its text with its words
    retimed, indexed again for search, and `embedding` in place of its vector (None: left for
    ingest to embed within a minute, reindex.embed_corrections)."""
    if text is None:
        await conn.execute("UPDATE segments SET speaker = $4, edited_at = now()"
                           " WHERE transcript_id = $1 AND chunk_index = $2 AND index = $3",
                           job_id, chunk_index, index, speaker)
        return
    await conn.execute(
        "UPDATE segments SET speaker = $4, text = $5, words = $6, search_text = to_tsvector(stt_text_config($7), $5),"
        " embedding = $8::real[]::vector, embedding_model = $9, edited_at = now()"
        " WHERE transcript_id = $1 AND chunk_index = $2 AND index = $3",
        job_id, chunk_index, index, speaker, text, words, text_language, embedding,
        embedding_model if embedding is not None else None)


async def speaker_word_counts(db: Db, job_id: int) -> dict[str, int]:
    """Words each speaker's segments hold so far: their timed words (Chinese, Japanese and Thai,
    written without spaces, are a word a character), else the text's whitespace-separated ones."""
    rows = await db.fetch(
        "SELECT speaker, sum(CASE WHEN jsonb_array_length(words) > 0"
        " THEN (SELECT count(*) FROM jsonb_array_elements(words) w WHERE btrim(w->>'word') <> '')"
        " ELSE cardinality(regexp_split_to_array(btrim(text), '\\s+')) END) AS words FROM segments"
        " WHERE transcript_id = $1 AND btrim(text) <> '' GROUP BY speaker", job_id)
    return {r["speaker"]: r["words"] for r in rows}


async def job_speaker_labels(db: Db, job_id: int) -> set[str]:
    """Every speaker label the job has so far (in its turns or segments)."""
    rows = await db.fetch("SELECT speaker FROM speaker_turns WHERE transcript_id = $1"
                          " UNION SELECT speaker FROM segments WHERE transcript_id = $1", job_id)
    return {r["speaker"] for r in rows}


async def speaker_names(db: Db, job_id: int) -> dict[str, SpeakerName]:
    """label -> name (with how it was given) of the job's named speakers, and of those whose
    recognised name was taken back by hand (name None, source "manual")."""
    rows = await db.fetch("SELECT speaker, name, name_source, confidence FROM transcript_speakers"
                          " WHERE transcript_id = $1 AND (name IS NOT NULL OR name_source = 'manual')", job_id)
    return {r["speaker"]: SpeakerName(name=r["name"], source=r["name_source"], confidence=r["confidence"])
            for r in rows}


async def speaker_voice(db: Db, job_id: int, label: str) -> SpeakerEmbedding | None:
    """The voice embedding the diarizer kept for one speaker of the job."""
    row = await db.fetchrow("SELECT embedding::real[] AS embedding, embedding_model, speech_s FROM transcript_speakers"
                            " WHERE transcript_id = $1 AND speaker = $2 AND embedding IS NOT NULL", job_id, label)
    if row is None:
        return None
    return SpeakerEmbedding(speaker=label, embedding=list(row["embedding"]), model=row["embedding_model"],
                            speech_s=row["speech_s"])


async def set_speaker_names(conn: asyncpg.Connection, job_id: int, names: dict[str, str | None]) -> None:
    """Name by hand speakers of a job; a speaker's voice embedding is kept. None unnames: a name
    given by hand goes (recognition may name the speaker again), while a recognised name is taken
    back by hand: the speaker stays unnamed by hand (name None, source "manual"), as a recognition
    that got the voice wrong would give the same name straight back. Sent again (a retry), None
    leaves it so; a name given by hand, then removed, returns it to recognition."""
    refused = {r["speaker"] for r in await conn.fetch(
        "SELECT speaker FROM transcript_speakers WHERE transcript_id = $1 AND speaker = ANY($2::text[])"
        " AND (name_source = 'auto' OR (name_source = 'manual' AND name IS NULL))", job_id, list(names))}
    await conn.executemany(
        "INSERT INTO transcript_speakers (transcript_id, speaker, name, name_source) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (transcript_id, speaker) DO UPDATE SET name = EXCLUDED.name,"
        " name_source = EXCLUDED.name_source, matched_speaker_id = NULL, confidence = NULL",
        [(job_id, label, name, "manual" if name or label in refused else None) for label, name in names.items()])


async def job_audio(db: Db, job_id: int) -> asyncpg.Record | None:
    """filename, audio_key, owner, audio_removed_at and audio_redacted_at of a job (the uploaded
    recording), with its status, error, options, duration, audio_redaction_due and
    redaction_pending (that of redaction_pending())."""
    return await db.fetchrow("SELECT filename, audio_key, owner, audio_removed_at, audio_redacted_at, status, error,"
                             " options, duration, audio_redaction_due,"
                             f" (status = 'done' AND {_RECORDING_TO_REDACT}) AS redaction_pending"
                             " FROM transcripts WHERE id = $1", job_id)


async def redacted_word_times(db: Db, job_id: int) -> list[tuple[float, float]]:
    """(start, end) of every word of the job that redaction replaced ([EMAIL], [CARD]...)."""
    rows = await db.fetch(
        "SELECT (w->>'start')::float8 AS start, (w->>'end')::float8 AS end FROM segments s,"
        " jsonb_array_elements(s.words) w WHERE s.transcript_id = $1"
        " AND w->>'word' ~ $2 ORDER BY 1", job_id, _REDACTED_WORD)
    return [(r["start"], r["end"]) for r in rows]


async def mark_audio_redacted(db: Db, job_id: int) -> None:
    """The job's stored recording is its redacted copy now."""
    await db.execute("UPDATE transcripts SET audio_redacted_at = now(), audio_redaction_due = false WHERE id = $1",
                     job_id)


async def clear_redaction_due(db: Db, job_id: int) -> bool:
    """The job's recording is no longer held back as still to be redacted: no redacted copy will
    be made (none is needed, or what it would be made from is gone), it stays as uploaded. False
    when the job is gone or its recording was redacted meanwhile (another ingest)."""
    return bool(await db.fetchval("UPDATE transcripts SET audio_redaction_due = false"
                                  " WHERE id = $1 AND audio_redacted_at IS NULL RETURNING true", job_id))


async def stored_chunk_prefix(db: Db, job_id: int) -> int:
    """The highest chunk index k such that chunks 0..k are all stored (-1: none yet)."""
    stored = await db.fetch("SELECT chunk_index FROM chunks WHERE transcript_id = $1 ORDER BY chunk_index", job_id)
    complete = -1
    for row in stored:
        if row["chunk_index"] != complete + 1:
            break
        complete += 1
    return complete


async def segments_after(db: Db, job_id: int, after: tuple[int, int], up_to_chunk: int | None) -> list[asyncpg.Record]:
    """The fields of job_segments but words, of the segments after (chunk, index) `after` in chunks
    up to `up_to_chunk` (None: all), in that order."""
    return await db.fetch(
        f"SELECT {_SEGMENT_COLUMNS} FROM segments s {SPEAKER_NAME_JOIN}"
        " WHERE s.transcript_id = $1 AND (s.chunk_index, s.index) > ($2, $3)"
        " AND ($4::int IS NULL OR s.chunk_index <= $4)"
        " ORDER BY s.chunk_index, s.index", job_id, after[0], after[1], up_to_chunk)


async def recent_jobs(db: Db, owner: str | None, limit: int = 100) -> list[asyncpg.Record]:
    """id, filename, status, stage, progress of the owner's jobs (None: everyone's, as without
    API keys) that are processing or ended in the last hour, newest first."""
    # By completed_at, not updated_at (the same for an ended job): both sides of the OR have an
    # index, where updated_at's would read every job, once a second for each open page.
    return await db.fetch(
        "SELECT id, filename, status, stage, progress FROM transcripts WHERE ($1::text IS NULL OR owner = $1)"
        " AND (status = 'processing' OR completed_at > now() - interval '1 hour') ORDER BY id DESC LIMIT $2",
        owner, limit)


async def jobs_progress(db: Db, job_ids: list[int]) -> list[asyncpg.Record]:
    """recent_jobs' fields of these jobs (those that still exist), oldest first."""
    return await db.fetch("SELECT id, filename, status, stage, progress FROM transcripts WHERE id = ANY($1)"
                          " ORDER BY id", job_ids)


async def job_turns(db: Db, job_id: int) -> list[SpeakerTurn]:
    """The diarizer's turns of a job, in time order."""
    rows = await db.fetch(
        "SELECT speaker, start_ts, end_ts FROM speaker_turns WHERE transcript_id = $1"
        " ORDER BY start_ts, end_ts, speaker", job_id)
    return [SpeakerTurn(speaker=r["speaker"], start=r["start_ts"], end=r["end_ts"]) for r in rows]


def _like_pattern(text: str) -> str:
    """A substring match for ILIKE, with the user's % and _ taken literally."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def conditions_set(args: list, conditions: dict[str, object]) -> list[str]:
    """The conditions whose value is set, each value appended to `args` as the `{}` parameter."""
    out = []
    for sql, value in conditions.items():
        if value is not None:
            args.append(value)
            out.append(sql.format(f"${len(args)}"))
    return out


async def list_jobs(db: Db, *, owner: str | None, status: str | None, filename: str | None,
                    since: datetime | None, until: datetime | None, before_id: int | None,
                    limit: int, reference: str | None = None) -> list[asyncpg.Record]:
    """Summary rows, newest first, at most `limit`, with ids below `before_id` (a page cursor)."""
    args: list = []
    conditions = conditions_set(args, {
        "owner = {}": owner, "id < {}": before_id, "status = {}": status,
        "filename ILIKE {} ESCAPE '\\'": _like_pattern(filename) if filename else None,
        "created_at >= {}": since, "created_at < {}": until, f"{_REFERENCE} = {{}}": reference})
    args.append(limit)
    return await db.fetch(
        f"SELECT {SUMMARY_COLUMNS} FROM transcripts"
        f" {'WHERE ' + ' AND '.join(conditions) if conditions else ''}"
        f" ORDER BY id DESC LIMIT ${len(args)}", *args)


# ---- deleting jobs (ingest) -------------------------------------------------------------------

async def lock_job(conn: asyncpg.Connection, job_id: int) -> asyncpg.Record | None:
    """The job's row (status, owner, source, audio keys), locked until the transaction ends (this
    also waits out the inbox writing its result file)."""
    return await conn.fetchrow(
        "SELECT id, status, owner, source, source_bucket, source_key, source_etag, audio_key, audio_removed_at"
        " FROM transcripts WHERE id = $1 FOR UPDATE", job_id)


async def remember_deleted_drop(conn: asyncpg.Connection, bucket: str, key: str, etag: str) -> None:
    await conn.execute(
        "INSERT INTO deleted_drops (source_bucket, source_key, source_etag) VALUES ($1, $2, $3)"
        " ON CONFLICT DO NOTHING", bucket, key, etag)


async def delete_job(conn: asyncpg.Connection, job_id: int) -> None:
    """The row; chunks, segments, turns and speakers cascade; its webhook deliveries as below. Its
    transcript.deleted is queued in the caller's transaction."""
    await conn.execute("DELETE FROM transcripts WHERE id = $1", job_id)
    await forget_deleted_jobs_deliveries(conn, job_id)
    await add_to_outbox(conn, deletion(job_id))


def deletion(job_id: int) -> TranscriptDeleted:
    return TranscriptDeleted(message_id=f"transcript.deleted:{job_id}", job_id=job_id, transcript_id=job_id)


# A deleted job's callback webhook that never got a delivery is removed once its job ended this
# long ago (forget_deleted_jobs_deliveries): its end was fanned out long since, if a notifier was
# there to take it (none was: the callback would never get one).
UNANNOUNCED_CALLBACK_KEPT_S = 86400.0


async def forget_deleted_jobs_deliveries(conn: asyncpg.Connection, job_id: int, *, end_fanned_out: bool = False
                                         ) -> None:
    """A deleted job's settled webhook deliveries (they carry its text), and its callback webhook
    once one of its deliveries is settled and none pending (its events are the job's last:
    transcript.completed or transcript.failed). A pending delivery stays until the notifier has
    settled it and comes here again, so a job deleted as soon as it ends is still announced.
    A callback without any delivery (its job's end never reached a notifier: none was there, or
    its event was lost) goes too once that end cannot come any more: `end_fanned_out` (the
    notifier fanning out the job's transcript.deleted, which comes after its end), or the job
    ended over UNANNOUNCED_CALLBACK_KEPT_S ago. Removed at once, the callback of a job deleted
    before the notifier fanned out its end was gone when it did, and its end never sent; kept,
    it stayed for ever, listed by GET /webhooks (with its secret in the database) for a job long gone.
    A webhook's last one given up stays while one of the job's is pending after it: the notifier
    gives those one attempt each because of it (a dead endpoint's backlog of a deleted job would
    otherwise keep its text for the whole retry schedule of each); it goes with the last of them.
    Its transcript.deleted stays too (ids only, no text; pruned with the delivery log): the
    deletion announced again (a stage still working on the job) finds it and is not sent again."""
    await conn.execute(
        "DELETE FROM webhooks w WHERE w.job_id = $1"
        " AND NOT EXISTS (SELECT 1 FROM transcripts WHERE id = $1)"
        " AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.webhook_id = w.id AND d.status = 'pending')"
        " AND (EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.webhook_id = w.id AND d.status <> 'pending')"
        " OR $2 OR EXISTS (SELECT 1 FROM job_usage u WHERE u.job_id = $1"
        " AND u.ended_at < now() - make_interval(secs => $3)))",
        job_id, end_fanned_out, UNANNOUNCED_CALLBACK_KEPT_S)
    await conn.execute(
        "DELETE FROM webhook_deliveries d WHERE d.job_id = $1 AND d.status <> 'pending'"
        f" AND d.event_type <> '{TranscriptDeleted.ROUTING_KEY}'"
        " AND NOT (d.status = 'failed'"
        " AND NOT EXISTS (SELECT 1 FROM webhook_deliveries s WHERE s.webhook_id = d.webhook_id AND s.job_id = $1"
        " AND s.status <> 'pending' AND s.id > d.id)"
        " AND EXISTS (SELECT 1 FROM webhook_deliveries p WHERE p.webhook_id = d.webhook_id AND p.job_id = $1"
        " AND p.status = 'pending' AND p.id > d.id))", job_id)


# ---- bucket drops' result files (ingest) ------------------------------------------------------

async def ended_drops_without_result(db: Db) -> list[int]:
    rows = await db.fetch(
        "SELECT id FROM transcripts WHERE source = 'bucket' AND status <> 'processing' AND NOT result_written")
    return [r["id"] for r in rows]


async def lock_drop(conn: asyncpg.Connection, job_id: int) -> asyncpg.Record | None:
    """A bucket drop's source_bucket and source_key, locked until the transaction ends (so a
    DELETE cannot run between writing its result file and marking it written)."""
    return await conn.fetchrow(
        "SELECT source_bucket, source_key FROM transcripts WHERE id = $1 AND source = 'bucket' FOR UPDATE",
        job_id)


async def other_chunks_stored(db: Db, job_id: int, chunk_index: int) -> bool:
    """Whether a chunk of the job other than `chunk_index` is stored already."""
    return await db.fetchval("SELECT EXISTS (SELECT 1 FROM chunks WHERE transcript_id = $1 AND chunk_index <> $2)",
                             job_id, chunk_index)


async def newer_drop_of_the_same_key(db: Db, job_id: int, etag_there: str | None = None) -> bool:
    """Whether a later job was made from the same bucket key (the object was dropped again), or,
    given the ETag of the object at the key now, whether that is other content than the job's:
    dropped again, and its job deleted since or not made yet."""
    return await db.fetchval(
        "SELECT EXISTS (SELECT 1 FROM transcripts o JOIN transcripts n ON n.source = 'bucket'"
        " AND n.source_bucket = o.source_bucket AND n.source_key = o.source_key AND n.id > o.id"
        " WHERE o.id = $1 AND o.source = 'bucket')"
        " OR EXISTS (SELECT 1 FROM transcripts WHERE id = $1 AND source = 'bucket' AND source_etag <> $2)",
        job_id, etag_there)


async def newest_drop_wrote_its_results(db: Db, bucket: str, key: str) -> bool:
    """Whether the key's newest job (its latest drop) has written its result files: until then
    the files there are an older drop's. True for a key with no job."""
    return await db.fetchval(
        "SELECT coalesce((SELECT result_written FROM transcripts WHERE source = 'bucket' AND source_bucket = $1"
        " AND source_key = $2 ORDER BY id DESC LIMIT 1), true)", bucket, key)


async def keys_whose_newest_drop_is_processing(db: Db, bucket: str, keys: list[str]) -> set[str]:
    """The keys of `keys` whose newest job (their latest drop) is still processing: result files
    of such a key are an older drop's."""
    rows = await db.fetch(
        "SELECT k.key FROM unnest($2::text[]) AS k(key) WHERE (SELECT status FROM transcripts"
        " WHERE source = 'bucket' AND source_bucket = $1 AND source_key = k.key ORDER BY id DESC LIMIT 1)"
        " = 'processing'", bucket, keys)
    return {r["key"] for r in rows}


async def mark_result_written(conn: asyncpg.Connection, job_id: int) -> None:
    await conn.execute("UPDATE transcripts SET result_written = true WHERE id = $1", job_id)


# ---- progress (persister) ---------------------------------------------------------------------

async def lock_processing_job(conn: asyncpg.Connection, job_id: int) -> asyncpg.Record | None:
    """The job's row (id, status, filename, chunk_count, owner), locked until the transaction ends."""
    return await conn.fetchrow(
        "SELECT id, status, filename, chunk_count, owner FROM transcripts WHERE id = $1 FOR UPDATE", job_id)


async def advance(db: Db, job_id: int, stage: str, *, language: str | None = None,
                  duration: float | None = None, chunk_count: int | None = None,
                  first_chunk: bool = False) -> None:
    """Move a processing job's stage forward only, and fill in facts learned along the way. The
    job's language is its first chunk's (in a recording that switches language, chunks differ,
    and they are stored in no set order); another chunk's stands in until that one is stored."""
    await db.execute(
        """
        UPDATE transcripts SET
            stage = CASE WHEN array_position($2::text[], stage) < array_position($2::text[], $3)
                         THEN $3 ELSE stage END,
            language = CASE WHEN $7 THEN COALESCE($4, language) ELSE COALESCE(language, $4) END,
            duration = COALESCE($5, duration),
            chunk_count = COALESCE($6, chunk_count),
            updated_at = now()
        WHERE id = $1 AND status = 'processing'
        """,
        job_id, list(STAGES), stage, language, duration, chunk_count, first_chunk,
    )


async def stored_chunk(conn: asyncpg.Connection, job_id: int, chunk_index: int) -> asyncpg.Record | None:
    """The chunk as an earlier delivery stored it (`embedded`: text and embeddings, and its
    segments' `texts` in order), None when none did."""
    return await conn.fetchrow(
        "SELECT embedded_at IS NOT NULL AS embedded, ARRAY(SELECT text FROM segments s WHERE s.transcript_id = $1"
        " AND s.chunk_index = $2 ORDER BY s.index) AS texts FROM chunks WHERE transcript_id = $1 AND chunk_index = $2",
        job_id, chunk_index)


async def record_chunk(conn: asyncpg.Connection, job_id: int, chunk_index: int, segment_count: int,
                       embedded: bool) -> None:
    await conn.execute(
        """
        INSERT INTO chunks (transcript_id, chunk_index, segment_count, transcribed_at, embedded_at)
        VALUES ($1, $2, $3, now(), CASE WHEN $4 THEN now() END)
        ON CONFLICT (transcript_id, chunk_index) DO UPDATE SET
            segment_count = EXCLUDED.segment_count,
            transcribed_at = COALESCE(chunks.transcribed_at, now()),
            embedded_at = COALESCE(EXCLUDED.embedded_at, chunks.embedded_at)
        """,
        job_id, chunk_index, segment_count, embedded,
    )


async def stage_after_chunk(conn: asyncpg.Connection, job_id: int, chunk_count: int) -> str:
    """A job is `transcribing` until every chunk has its text, then `embedding` until done."""
    transcribed = await conn.fetchval(
        "SELECT count(*) FROM chunks WHERE transcript_id = $1 AND transcribed_at IS NOT NULL", job_id)
    return "embedding" if transcribed >= chunk_count else "transcribing"


async def embedded_chunks(conn: asyncpg.Connection, job_id: int) -> int:
    return await conn.fetchval(
        "SELECT count(*) FROM chunks WHERE transcript_id = $1 AND embedded_at IS NOT NULL", job_id)


async def store_segments(conn: asyncpg.Connection, job_id: int, chunk_index: int, segments: list[Segment],
                         language: str | None, embedding_model: str | None = None,
                         text_language: str | None = None) -> None:
    """The chunk's segments (with their embeddings when `embedding_model` is given, and their
    text indexed for search in the language it is written in: `text_language` when translated,
    else the segment's own, else `language`), replacing what an earlier delivery stored; an
    embedding already stored is kept."""
    with_embeddings = embedding_model is not None
    rows = [
        (job_id, chunk_index, s.index, s.speaker, s.start_ts, s.end_ts, s.text,
         [w.model_dump() for w in s.words], s.embedding if with_embeddings else None,
         embedding_model, s.overlap, text_language or s.language or language, s.language)
        for s in segments
    ]
    await conn.executemany(
        """
        INSERT INTO segments (transcript_id, chunk_index, index, speaker, start_ts, end_ts, text,
                              words, embedding, embedding_model, overlap, search_text, language)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::real[]::vector, $10, $11,
                to_tsvector(stt_text_config($12), $7), $13)
        ON CONFLICT (transcript_id, chunk_index, index) DO UPDATE SET
            speaker = EXCLUDED.speaker, start_ts = EXCLUDED.start_ts, end_ts = EXCLUDED.end_ts,
            text = EXCLUDED.text, words = EXCLUDED.words, overlap = EXCLUDED.overlap,
            search_text = EXCLUDED.search_text, language = EXCLUDED.language,
            embedding = COALESCE(EXCLUDED.embedding, segments.embedding),
            embedding_model = COALESCE(EXCLUDED.embedding_model, segments.embedding_model)
        """,
        rows,
    )
    # A redelivered chunk re-segmented differently must not leave stale tail segments.
    await conn.execute(
        "DELETE FROM segments WHERE transcript_id = $1 AND chunk_index = $2 AND index >= $3",
        job_id, chunk_index, len(segments),
    )


async def store_diarization(conn: asyncpg.Connection, job_id: int, chunk_index: int,
                            turns: list[SpeakerTurn], speakers: list[SpeakerEmbedding]) -> None:
    """The chunk's speaker turns (replacing any from an earlier delivery) and the job's speaker
    embeddings (the same in every chunk: the first stored wins)."""
    await conn.execute("DELETE FROM speaker_turns WHERE transcript_id = $1 AND chunk_index = $2",
                       job_id, chunk_index)
    await conn.executemany(
        "INSERT INTO speaker_turns (transcript_id, chunk_index, index, speaker, start_ts, end_ts)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        [(job_id, chunk_index, i, t.speaker, t.start, t.end) for i, t in enumerate(turns)],
    )
    await conn.executemany(
        """
        INSERT INTO transcript_speakers (transcript_id, speaker, embedding, embedding_model, speech_s)
        VALUES ($1, $2, $3::real[]::vector, $4, $5) ON CONFLICT (transcript_id, speaker) DO UPDATE SET
            embedding = EXCLUDED.embedding, embedding_model = EXCLUDED.embedding_model, speech_s = EXCLUDED.speech_s
        WHERE transcript_speakers.embedding IS NULL
        """,
        [(job_id, s.speaker, s.embedding, s.model, s.speech_s) for s in speakers],
    )


async def set_progress(conn: asyncpg.Connection, job_id: int, fraction: float) -> None:
    await conn.execute("UPDATE transcripts SET progress = $2, updated_at = now() WHERE id = $1",
                       job_id, fraction)


# What a transcript.completed tells of job $1 (completion()), in a query over its row.
_COMPLETION_COLUMNS = (f"filename, language, duration, {_REFERENCE} AS reference,"
                       " (SELECT count(*) FROM segments WHERE transcript_id = $1) AS segment_count,"
                       f" {NO_SPEECH_COLUMN}")


async def mark_done(conn: asyncpg.Connection, job_id: int) -> asyncpg.Record:
    """The job done, and counted in the usage ledger; returns its filename, language, duration,
    segment_count, no_speech and reference. A job with redaction (asked, or words the transcriber
    replaced) is marked with its recording still to be redacted (audio_redaction_due)."""
    done = await conn.fetchrow(
        f"""
        UPDATE transcripts SET status = 'done', stage = 'done', progress = 1,
            completed_at = now(), updated_at = now(), audio_redaction_due = {_REDACTION_DUE_AT_END}
        WHERE id = $1
        RETURNING {_COMPLETION_COLUMNS}
        """,
        job_id, _REDACTED_WORD,
    )
    await record_usage(conn, job_id)
    return done


async def mark_failed(conn: asyncpg.Connection, job_id: int, reason: str, service: str,
                      still_for_s: float | None = None) -> asyncpg.Record | None:
    """A processing job failed (the first reason wins): returns its filename and reference, or
    None when it was not processing (or, with `still_for_s`, has moved within that many seconds).
    The job keeps the pipeline stage `service` works in.

    With `still_for_s` (the stall reaper) a row another transaction holds is not waited for, and
    None returned: a handler storing the job's progress, or an operator's open psql session that
    may last for hours. Waited for, it held the reaper's round for DATABASE_COMMAND_TIMEOUT_S,
    each round, and the late heartbeats made gaps in which no job anywhere counted as stalled."""
    still = "" if still_for_s is None else (
        " AND updated_at < now() - make_interval(secs => $4::float8)"
        " AND id = (SELECT id FROM transcripts WHERE id = $1 FOR UPDATE SKIP LOCKED)")
    return await conn.fetchrow(
        f"""
        UPDATE transcripts SET status = 'error', error = $2,
            stage = COALESCE($3, stage), completed_at = now(), updated_at = now()
        WHERE id = $1 AND status = 'processing'{still}
        RETURNING filename, {_REFERENCE} AS reference
        """,
        job_id, reason, STAGE_OF_SERVICE.get(service), *([] if still_for_s is None else [still_for_s]),
    )


async def fail(conn: asyncpg.Connection, job_id: int, reason: str, service: str,
               still_for_s: float | None = None) -> bool:
    """Mark a processing job failed (the first reason wins) and queue its transcript.failed in
    the caller's transaction, which also tells every pipeline worker to stop working on it.
    False when the job was not processing (or, with `still_for_s`, moved within that many
    seconds, or its row is held by another transaction: mark_failed)."""
    failed = await mark_failed(conn, job_id, reason, service, still_for_s)
    if failed is None:
        return False
    await record_usage(conn, job_id)
    await add_to_outbox(conn, _failure(job_id, failed["filename"], reason, failed["reference"]))
    return True


async def announce_end_again(conn: asyncpg.Connection, job_id: int) -> bool:
    """Queue an ended job's transcript.completed or transcript.failed once more, under the same
    message id as the first time (subscribers see the same event again, as at-least-once delivery
    allows). False for a job still processing, or gone. The row is read locked (FOR SHARE): read
    plainly while a DELETE /transcripts/{id} was committing, the job was found and its end queued
    after its transcript.deleted; now the read waits for that transaction, finds nothing, and the
    caller announces the deletion again (announce_deletion_again)."""
    ended = await conn.fetchrow(
        f"SELECT status, error, {_COMPLETION_COLUMNS} FROM transcripts WHERE id = $1 AND status <> 'processing'"
        " FOR SHARE", job_id)
    if ended is None:
        return False
    await add_to_outbox(conn, completion(job_id, ended) if ended["status"] == "done"
                        else _failure(job_id, ended["filename"], ended["error"], ended["reference"]))
    return True


async def announce_deletion_again(conn: asyncpg.Connection, job_id: int) -> bool:
    """Queue a deleted job's transcript.deleted once more, under the same message id. A job is
    known to have been deleted by its line in the usage ledger, which outlives it; False for a
    job that exists, or that never did."""
    deleted = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM job_usage WHERE job_id = $1)"
        " AND NOT EXISTS (SELECT 1 FROM transcripts WHERE id = $1)", job_id)
    if not deleted:
        return False
    await add_to_outbox(conn, deletion(job_id))
    return True


def completion(job_id: int, done: asyncpg.Record) -> TranscriptCompleted:
    """A done job's transcript.completed, from what mark_done returns."""
    return TranscriptCompleted(
        message_id=f"transcript.completed:{job_id}", job_id=job_id, transcript_id=job_id, filename=done["filename"],
        language=done["language"], duration=done["duration"], segment_count=done["segment_count"],
        no_speech=done["no_speech"], reference=done["reference"])


def _failure(job_id: int, filename: str, reason: str, reference: str | None) -> TranscriptFailed:
    return TranscriptFailed(message_id=f"transcript.failed:{job_id}", job_id=job_id, transcript_id=job_id,
                            filename=filename, reason=reason, reference=reference)


async def ended_before(db: Db, age_s: float, limit: int, leaving_out: list[int] = ()) -> list[int]:
    """Jobs that ended (done or error) more than `age_s` seconds ago, oldest first, but those
    `leaving_out`."""
    rows = await db.fetch(
        "SELECT id FROM transcripts WHERE status <> 'processing' AND id <> ALL($3::bigint[])"
        " AND completed_at < now() - make_interval(secs => $1) ORDER BY completed_at LIMIT $2",
        age_s, limit, list(leaving_out))
    return [r["id"] for r in rows]


async def recordings_ended_before(db: Db, age_s: float, limit: int,
                                  leaving_out: list[int] = ()) -> list[asyncpg.Record]:
    """id and audio_key of the jobs that ended more than `age_s` seconds ago and whose recording
    may still be stored (not removed, or marked removed by a sweep that did not finish), oldest
    first, but those `leaving_out`."""
    return await db.fetch(
        "SELECT id, COALESCE(audio_key, 'uploads/' || id) AS audio_key FROM transcripts"
        " WHERE status <> 'processing' AND audio_objects_removed_at IS NULL AND id <> ALL($3::bigint[])"
        " AND completed_at < now() - make_interval(secs => $1) ORDER BY completed_at LIMIT $2",
        age_s, limit, list(leaving_out))


async def mark_audio_removed(db: Db, job_id: int) -> bool:
    """The recording counts as removed from now on (playback answers 410, a rerun 409); False when
    an earlier sweep had marked it already."""
    return await db.execute("UPDATE transcripts SET audio_removed_at = now()"
                            " WHERE id = $1 AND audio_removed_at IS NULL", job_id) == "UPDATE 1"


async def mark_audio_objects_removed(db: Db, job_id: int) -> None:
    """The recording's objects are gone: the sweep need not look at the job again."""
    await db.execute("UPDATE transcripts SET audio_objects_removed_at = now() WHERE id = $1", job_id)


async def record_usage(db: Db, job_id: int) -> None:
    """The ended job's line in the usage ledger (once; it outlives the job), written in the
    transaction that ends the job, so that deleting the job right after cannot lose it."""
    await db.execute(
        "INSERT INTO job_usage (job_id, owner, ended_at, status, audio_s)"
        " SELECT id, owner, COALESCE(completed_at, now()), status, COALESCE(duration, 0) FROM transcripts"
        " WHERE id = $1 AND status <> 'processing' ON CONFLICT (job_id) DO NOTHING", job_id)


async def usage_by_day(db: Db, owner: str | None, since: datetime, until: datetime,
                       everyone: bool = False) -> list[asyncpg.Record]:
    """owner, day (UTC), jobs, done, failed and audio_s (of done jobs) of the jobs that ended in
    [since, until): one owner's (None: jobs made without a key), or with `everyone` all owners'."""
    # A condition of its own for each case, each served by an index: `$1 OR owner IS NOT DISTINCT
    # FROM $2` is served by none, and every call read the whole ledger (a row per job ever, never
    # pruned). One owner's and the jobs without a key (`owner IS NULL`): job_usage_owner_ended;
    # everyone's: job_usage_ended_idx. (speakerstore._owned_by says the same of `owner`.)
    args: list = [since, until]
    if everyone:
        whose = ""
    elif owner is None:
        whose = " AND owner IS NULL"
    else:
        args.append(owner)
        whose = " AND owner = $3"
    return await db.fetch(
        "SELECT owner, (date_trunc('day', ended_at AT TIME ZONE 'UTC'))::date AS day, count(*) AS jobs,"
        " count(*) FILTER (WHERE status = 'done') AS done, count(*) FILTER (WHERE status <> 'done') AS failed,"
        " COALESCE(sum(audio_s) FILTER (WHERE status = 'done'), 0) AS audio_s FROM job_usage"
        f" WHERE ended_at >= $1 AND ended_at < $2{whose}"
        " GROUP BY 1, 2 ORDER BY 1, 2", *args)


async def stall_reaper_round(conn: asyncpg.Connection, absent_after_s: float, missed: bool, grace_s: float) -> None:
    """The stall reaper's heartbeat, shared by every persister. Time since the last one longer than
    `absent_after_s`, or `missed` (this persister could not reach the database since its last),
    was a gap: no persister stored anything, the jobs' messages waited. It is kept, joined to the
    gap before it when it began within `grace_s` of that one's end (one outage, come back)."""
    async with conn.transaction():
        last = await conn.fetchrow("SELECT at, at < now() - make_interval(secs => $1) AS absent"
                                   " FROM stall_reaper_heartbeat FOR UPDATE", absent_after_s)
        await conn.execute("UPDATE stall_reaper_heartbeat SET at = GREATEST(at, now())")
        if not (missed or last["absent"]):
            return
        joined = await conn.fetchval(
            "UPDATE stall_reaper_gaps SET until = GREATEST(until, now())"
            " WHERE since = (SELECT max(since) FROM stall_reaper_gaps)"
            " AND until + make_interval(secs => $2) >= $1 RETURNING since", last["at"], grace_s)
        if joined is None:
            await conn.execute("INSERT INTO stall_reaper_gaps (since, until) VALUES ($1, now())"
                               " ON CONFLICT (since) DO UPDATE SET until = GREATEST(stall_reaper_gaps.until, now())",
                               last["at"])
        # Those that ended, with their grace, before every processing job's last move count for none.
        await conn.execute(
            "DELETE FROM stall_reaper_gaps WHERE until + make_interval(secs => $1) < COALESCE("
            " (SELECT min(updated_at) FROM transcripts WHERE status = 'processing'), now())", grace_s)


async def stalled_job_ids(db: Db, timeout_s: float, grace_s: float) -> list[int]:
    """Processing jobs that have not moved for `timeout_s`, not counting the time within the gaps
    of stall_reaper_round, nor `grace_s` after each (the messages held through it land)."""
    rows = await db.fetch(
        "SELECT id FROM transcripts t WHERE status = 'processing'"
        " AND updated_at < now() - make_interval(secs => $1)"
        " AND updated_at + make_interval(secs => $1) + (SELECT COALESCE(sum(GREATEST("
        "     LEAST(g.until + make_interval(secs => $2), now()) - GREATEST(g.since, t.updated_at),"
        "     interval '0')), interval '0') FROM stall_reaper_gaps g) < now()"
        " ORDER BY id", timeout_s, grace_s)
    return [r["id"] for r in rows]
