"""The persister's handlers: every state change of a job after submission, and the events that
announce them. Each handler is one transaction, idempotent under redelivery; events go to the
outbox table in that same transaction and are published after commit (common.outbox)."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
from pydantic import BaseModel

from common.db import NO_SPEECH_COLUMN
from common.logs import current_job
from common.messages import (
    STAGE_OF_SERVICE,
    STAGES,
    ChunkEmbedded,
    ChunkTranscribed,
    JobFailed,
    JobProgress,
    Segment,
    SegmentCreated,
    TranscriptCompleted,
    TranscriptFailed,
)
from common.outbox import add_to_outbox

log = logging.getLogger(__name__)

class DeadLetter(BaseModel):
    """Any message the broker dead-lettered; only its job matters here."""

    job_id: int


async def _lock_processing_job(conn: asyncpg.Connection, job_id: int) -> asyncpg.Record | None:
    row = await conn.fetchrow(
        "SELECT id, status, filename, chunk_count FROM transcripts WHERE id = $1 FOR UPDATE", job_id
    )
    if row is None:
        log.warning("message for unknown job; ignored")
        return None
    if row["status"] != "processing":
        log.info("job already %s; late message ignored", row["status"])
        return None
    return row


async def _advance(conn: asyncpg.Connection, job_id: int, stage: str, **fields: object) -> None:
    """Move the stage forward only, and fill in facts learned along the way."""
    await conn.execute(
        """
        UPDATE transcripts SET
            stage = CASE WHEN array_position($2::text[], stage) < array_position($2::text[], $3)
                         THEN $3 ELSE stage END,
            language = COALESCE(language, $4),
            duration = COALESCE($5, duration),
            chunk_count = COALESCE($6, chunk_count),
            updated_at = now()
        WHERE id = $1 AND status = 'processing'
        """,
        job_id, list(STAGES), stage, fields.get("language"), fields.get("duration"),
        fields.get("chunk_count"),
    )


async def _stage_after_chunk(conn: asyncpg.Connection, job_id: int, chunk_count: int) -> str:
    """A job is `transcribing` until every chunk has its text, then `embedding` until done."""
    transcribed = await conn.fetchval(
        "SELECT count(*) FROM chunks WHERE transcript_id = $1 AND transcribed_at IS NOT NULL", job_id
    )
    return "embedding" if transcribed >= chunk_count else "transcribing"


async def _store_diarization(conn: asyncpg.Connection, job_id: int,
                             message: ChunkTranscribed | ChunkEmbedded) -> None:
    """The chunk's speaker turns (replacing any from an earlier delivery) and the job's speaker
    embeddings (the same in every chunk: the first stored wins)."""
    await conn.execute("DELETE FROM speaker_turns WHERE transcript_id = $1 AND chunk_index = $2",
                       job_id, message.chunk_index)
    await conn.executemany(
        "INSERT INTO speaker_turns (transcript_id, chunk_index, index, speaker, start_ts, end_ts)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        [(job_id, message.chunk_index, i, t.speaker, t.start, t.end) for i, t in enumerate(message.turns)],
    )
    await conn.executemany(
        """
        INSERT INTO transcript_speakers (transcript_id, speaker, embedding, embedding_model, speech_s)
        VALUES ($1, $2, $3, $4, $5) ON CONFLICT (transcript_id, speaker) DO NOTHING
        """,
        [(job_id, s.speaker, s.embedding, s.model, s.speech_s) for s in message.speakers],
    )


async def _upsert_segments(conn: asyncpg.Connection, job_id: int, chunk_index: int,
                           segments: list[Segment], with_embeddings: bool,
                           embedding_model: str | None = None) -> None:
    rows = [
        (job_id, chunk_index, s.index, s.speaker, s.start_ts, s.end_ts, s.text,
         [w.model_dump() for w in s.words], s.embedding if with_embeddings else None,
         embedding_model if with_embeddings else None, s.overlap)
        for s in segments
    ]
    await conn.executemany(
        """
        INSERT INTO segments (transcript_id, chunk_index, index, speaker, start_ts, end_ts, text,
                              words, embedding, embedding_model, overlap)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
        ON CONFLICT (transcript_id, chunk_index, index) DO UPDATE SET
            speaker = EXCLUDED.speaker, start_ts = EXCLUDED.start_ts, end_ts = EXCLUDED.end_ts,
            text = EXCLUDED.text, words = EXCLUDED.words, overlap = EXCLUDED.overlap,
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


async def on_progress(pool: asyncpg.Pool, message: JobProgress) -> None:
    async with pool.acquire() as conn:
        await _advance(conn, message.job_id, message.stage,
                       duration=message.duration, chunk_count=message.chunk_count)


async def on_transcribed(pool: asyncpg.Pool, message: ChunkTranscribed) -> None:
    async with pool.acquire() as conn, conn.transaction():
        if await _lock_processing_job(conn, message.job_id) is None:
            return
        chunk = await conn.fetchrow(
            "SELECT embedded_at FROM chunks WHERE transcript_id = $1 AND chunk_index = $2",
            message.job_id, message.chunk_index,
        )
        if chunk is not None and chunk["embedded_at"] is not None:
            return  # chunk.embedded already stored this chunk in full
        await conn.execute(
            """
            INSERT INTO chunks (transcript_id, chunk_index, segment_count, transcribed_at)
            VALUES ($1, $2, $3, now())
            ON CONFLICT (transcript_id, chunk_index) DO UPDATE SET
                segment_count = EXCLUDED.segment_count,
                transcribed_at = COALESCE(chunks.transcribed_at, now())
            """,
            message.job_id, message.chunk_index, len(message.segments),
        )
        await _upsert_segments(conn, message.job_id, message.chunk_index, message.segments,
                               with_embeddings=False)
        await _store_diarization(conn, message.job_id, message)
        stage = await _stage_after_chunk(conn, message.job_id, message.chunk_count)
        await _advance(conn, message.job_id, stage, language=message.language,
                       duration=message.duration, chunk_count=message.chunk_count)
    log.info("stored chunk %d/%d text (%d segments)",
             message.chunk_index + 1, message.chunk_count, len(message.segments))


async def on_embedded(pool: asyncpg.Pool, message: ChunkEmbedded) -> bool:
    """Store the chunk with its embeddings; returns True when events were enqueued."""
    async with pool.acquire() as conn, conn.transaction():
        job = await _lock_processing_job(conn, message.job_id)
        if job is None:
            return False
        previous = await conn.fetchrow(
            "SELECT embedded_at FROM chunks WHERE transcript_id = $1 AND chunk_index = $2",
            message.job_id, message.chunk_index,
        )
        if previous is not None and previous["embedded_at"] is not None:
            log.info("chunk %d already stored; duplicate ignored", message.chunk_index)
            return False
        await conn.execute(
            """
            INSERT INTO chunks (transcript_id, chunk_index, segment_count, transcribed_at, embedded_at)
            VALUES ($1, $2, $3, now(), now())
            ON CONFLICT (transcript_id, chunk_index) DO UPDATE SET
                segment_count = EXCLUDED.segment_count,
                transcribed_at = COALESCE(chunks.transcribed_at, now()),
                embedded_at = now()
            """,
            message.job_id, message.chunk_index, len(message.segments),
        )
        await _upsert_segments(conn, message.job_id, message.chunk_index, message.segments,
                               with_embeddings=True, embedding_model=message.embedding_model)
        await _store_diarization(conn, message.job_id, message)
        stage = await _stage_after_chunk(conn, message.job_id, message.chunk_count)
        await _advance(conn, message.job_id, stage, language=message.language,
                       duration=message.duration, chunk_count=message.chunk_count)
        for segment in message.segments:
            await add_to_outbox(conn, SegmentCreated(
                message_id=f"segment.created:{message.job_id}:{message.chunk_index}:{segment.index}",
                job_id=message.job_id, transcript_id=message.job_id,
                chunk_index=message.chunk_index, index=segment.index, speaker=segment.speaker,
                start_ts=segment.start_ts, end_ts=segment.end_ts, text=segment.text,
                overlap=segment.overlap, embedding=segment.embedding, embedding_model=message.embedding_model,
            ))
        embedded = await conn.fetchval(
            "SELECT count(*) FROM chunks WHERE transcript_id = $1 AND embedded_at IS NOT NULL",
            message.job_id,
        )
        if embedded >= message.chunk_count:
            info = await conn.fetchrow(
                f"""
                UPDATE transcripts SET status = 'done', stage = 'done', progress = 1,
                    completed_at = now(), updated_at = now()
                WHERE id = $1
                RETURNING filename, language, duration,
                    (SELECT count(*) FROM segments WHERE transcript_id = $1) AS segment_count,
                    {NO_SPEECH_COLUMN}
                """,
                message.job_id,
            )
            await add_to_outbox(conn, TranscriptCompleted(
                message_id=f"transcript.completed:{message.job_id}",
                job_id=message.job_id, transcript_id=message.job_id, filename=info["filename"],
                language=info["language"], duration=info["duration"],
                segment_count=info["segment_count"],
                no_speech=info["no_speech"],
            ))
            log.info("job done: %d chunks, %d segments", embedded, info["segment_count"])
        else:
            await conn.execute(
                "UPDATE transcripts SET progress = $2, updated_at = now() WHERE id = $1",
                message.job_id, embedded / message.chunk_count,
            )
            log.info("stored chunk %d/%d (%d of %d embedded)", message.chunk_index + 1,
                     message.chunk_count, embedded, message.chunk_count)
    return True


async def fail_job(pool: asyncpg.Pool, job_id: int, stage: str, reason: str) -> bool:
    """Mark a processing job failed (the first reason wins); returns True if it changed.
    `stage` is the service that gave up; the job keeps the pipeline stage it failed in."""
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            """
            UPDATE transcripts SET status = 'error', error = $2,
                stage = COALESCE($3, stage), completed_at = now(), updated_at = now()
            WHERE id = $1 AND status = 'processing'
            RETURNING filename
            """,
            job_id, reason, STAGE_OF_SERVICE.get(stage),
        )
        if row is None:
            return False
        await add_to_outbox(conn, TranscriptFailed(
            message_id=f"transcript.failed:{job_id}", job_id=job_id, transcript_id=job_id,
            filename=row["filename"], reason=reason,
        ))
    log.warning("job failed in %s: %s", stage, reason)
    return True


async def fail_stalled_jobs(pool: asyncpg.Pool, timeout_s: float) -> list[int]:
    """Fail every processing job that has not moved for `timeout_s` (a message lost to an
    operator's purge, a stage that hangs): it must end, with a reason, and become deletable."""
    rows = await pool.fetch(
        "SELECT id FROM transcripts WHERE status = 'processing'"
        " AND updated_at < now() - make_interval(secs => $1) ORDER BY id", timeout_s)
    failed = []
    for row in rows:
        token = current_job.set(row["id"])
        try:
            reason = f"no progress for {timeout_s:g} s (JOB_STALL_TIMEOUT_S); processing was given up"
            if await fail_job(pool, row["id"], "persister", reason):
                failed.append(row["id"])
        finally:
            current_job.reset(token)
    return failed


async def run_stall_reaper(pool: asyncpg.Pool, timeout_s: float, wake: asyncio.Event) -> None:
    if timeout_s <= 0:
        return
    while True:
        await asyncio.sleep(min(30.0, max(1.0, timeout_s / 4)))
        try:
            if await fail_stalled_jobs(pool, timeout_s):
                wake.set()
        except Exception:
            log.exception("looking for stalled jobs failed; will try again")


async def on_failed(pool: asyncpg.Pool, message: JobFailed) -> bool:
    return await fail_job(pool, message.job_id, message.stage, message.reason)


async def on_dead_letter(pool: asyncpg.Pool, message: DeadLetter) -> bool:
    return await fail_job(
        pool, message.job_id, "dead-letter",
        "processing stopped: a stage crashed on this job repeatedly (message dead-lettered)",
    )
