"""Creating jobs and reading their state: the ingest side of the `transcripts` table."""

from __future__ import annotations

import asyncio
import logging
from typing import BinaryIO

import asyncpg
from minio import Minio

from common.broker import Bus
from common.db import NO_SPEECH_COLUMN
from common.messages import STAGE_OF_SERVICE, STAGES, JobOptions, JobSubmitted
from common.storage import upload_stream

log = logging.getLogger(__name__)


def upload_key(job_id: int) -> str:
    """Server-chosen object key: client text never becomes part of a path."""
    return f"uploads/{job_id}"


MAX_FILENAME_CHARS = 255


def clean_filename(name: str | None) -> str:
    """The original name, kept as data (never a path): control characters dropped, at most
    MAX_FILENAME_CHARS characters with the extension kept."""
    name = "".join(c for c in (name or "") if c.isprintable()).strip() or "audio"
    if len(name) > MAX_FILENAME_CHARS:
        stem, dot, extension = name.rpartition(".")
        extension = extension[:16] if dot and stem else ""
        name = name[: MAX_FILENAME_CHARS - len(extension) - 2] + "…" + (f".{extension}" if extension else "")
    return name


async def create_upload_job(pool: asyncpg.Pool, bus: Bus, s3: Minio, audio_bucket: str,
                            filename: str, options: JobOptions, stream: BinaryIO,
                            owner: str | None = None) -> int:
    """Row, then audio, then job.submitted. If the upload or the publish fails, the row and
    object are removed again and the error propagates: no job exists that will never run."""
    job_id = await pool.fetchval(
        "INSERT INTO transcripts (filename, source, options, owner) VALUES ($1, 'upload', $2, $3)"
        " RETURNING id",
        filename, options.model_dump(exclude_none=True), owner,
    )
    key = upload_key(job_id)
    try:
        await asyncio.to_thread(upload_stream, s3, audio_bucket, key, stream)
        await pool.execute("UPDATE transcripts SET audio_key = $2 WHERE id = $1", job_id, key)
        await bus.publish(JobSubmitted(job_id=job_id, audio_bucket=audio_bucket, audio_key=key,
                                       filename=filename, options=options))
    except BaseException:
        await _discard(pool, s3, audio_bucket, job_id, key)
        raise
    await pool.execute("UPDATE transcripts SET published = true WHERE id = $1", job_id)
    return job_id


async def _discard(pool: asyncpg.Pool, s3: Minio, bucket: str, job_id: int, key: str) -> None:
    try:
        await asyncio.to_thread(s3.remove_object, bucket, key)
    except Exception:
        log.warning("job %d: could not remove %s after a failed submission", job_id, key)
    try:
        await pool.execute("DELETE FROM transcripts WHERE id = $1", job_id)
    except Exception:
        log.warning("job %d: could not remove its row after a failed submission", job_id)


def percent_done(status: str, progress: float) -> int:
    """Chunks stored / chunks, 0-100; 100 only once the job is done."""
    if status == "done":
        return 100
    return min(99, max(0, round(progress * 100)))


def public_stage(stage: str) -> str:
    """One of STAGES. Rows failed before failures kept their pipeline stage name a service."""
    return stage if stage in STAGES else STAGE_OF_SERVICE.get(stage, "submitted")


async def status_document(pool: asyncpg.Pool | asyncpg.Connection, job_id: int,
                          owner: str | None = None) -> dict | None:
    """What GET /status/{id} returns (and the result file of a bucket drop). With `owner`
    (API keys on), another key's job is None, as if it did not exist."""
    job = await pool.fetchrow(
        f"SELECT status, stage, progress, error, owner, {NO_SPEECH_COLUMN} FROM transcripts WHERE id = $1",
        job_id,
    )
    if job is None or (owner is not None and job["owner"] != owner):
        return None
    rows = await pool.fetch(
        "SELECT speaker, start_ts, end_ts, text, overlap FROM segments WHERE transcript_id = $1 "
        "ORDER BY start_ts, chunk_index, index",
        job_id,
    )
    document: dict = {
        "status": job["status"],
        "stage": public_stage(job["stage"]),
        "percent": percent_done(job["status"], job["progress"]),
        "segments": [
            {"speaker": r["speaker"], "start_ts": round(r["start_ts"], 3),
             "end_ts": round(r["end_ts"], 3), "text": r["text"], "overlap": r["overlap"]}
            for r in rows
        ],
    }
    # Done with nobody talking: a silent recording is a result (as hosted APIs report it).
    document["no_speech"] = job["no_speech"]
    if job["status"] == "error":
        document["error"] = job["error"]
    return document
