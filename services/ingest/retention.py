"""Retention: recordings and transcripts are removed once they have been kept as long as the
operator allows. AUDIO_RETENTION_DAYS removes a job's uploaded recording (and its decoded PCM)
that long after the job ended, keeping the transcript; TRANSCRIPT_RETENTION_DAYS deletes the
whole job as DELETE /transcripts/{id} does. 0 keeps them forever (the default). Jobs still
processing are never touched. Every ingest replica runs the sweep; an advisory lock lets one
sweep at a time."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
from minio import Minio

from common import jobstore
from common.db import every
from common.logs import job_logged
from common.settings import Settings
from common.storage import pcm_key, remove_objects
from services.ingest.transcripts import delete_transcript

log = logging.getLogger(__name__)

RETENTION_LOCK_KEY = 7_406_501_139
BATCH = 100
DAY_S = 86_400.0


def sweep_interval_s(settings: Settings) -> float | None:
    """How often to look: a tenth of the shortest retention, between 1 s and an hour; None when
    everything is kept."""
    kept_s = [days * DAY_S for days in (settings.audio_retention_days, settings.transcript_retention_days) if days]
    return min(3600.0, max(1.0, min(kept_s) / 10)) if kept_s else None


async def sweep(pool: asyncpg.Pool, s3: Minio, settings: Settings) -> tuple[int, int]:
    """One pass over at most BATCH jobs of each kind; returns (recordings removed, jobs deleted)."""
    deleted = removed = 0
    if settings.transcript_retention_days:
        for job_id in await jobstore.ended_before(pool, settings.transcript_retention_days * DAY_S, BATCH):
            with job_logged(job_id):
                if await delete_transcript(pool, s3, settings, job_id, owner=None):
                    deleted += 1
                    log.info("deleted: ended more than TRANSCRIPT_RETENTION_DAYS (%g) ago",
                             settings.transcript_retention_days)
    if settings.audio_retention_days:
        for job in await jobstore.recordings_ended_before(pool, settings.audio_retention_days * DAY_S, BATCH):
            with job_logged(job["id"]):
                await asyncio.to_thread(remove_objects, s3, [(settings.audio_bucket, job["audio_key"]),
                                                             (settings.audio_bucket, pcm_key(job["id"]))])
                if await jobstore.mark_audio_removed(pool, job["id"]):
                    removed += 1
                    log.info("recording removed: the job ended more than AUDIO_RETENTION_DAYS (%g) ago",
                             settings.audio_retention_days)
    return removed, deleted


async def run_retention(pool: asyncpg.Pool, s3: Minio, settings: Settings) -> None:
    interval = sweep_interval_s(settings)
    if interval is None:
        return

    async def sweep_all() -> None:
        while max(await sweep(pool, s3, settings)) >= BATCH:
            pass  # a backlog (retention just switched on): on until it is cleared

    await every(interval, pool, RETENTION_LOCK_KEY, sweep_all, "the retention sweep")
