"""Retention: recordings and transcripts are removed once they have been kept as long as the
operator allows. AUDIO_RETENTION_DAYS removes a job's uploaded recording (and its decoded PCM)
that long after the job ended, keeping the transcript; TRANSCRIPT_RETENTION_DAYS deletes the
whole job as DELETE /transcripts/{id} does. 0 keeps them forever (the default). Jobs still
processing are never touched. Every ingest replica runs the sweep; an advisory lock lets one
sweep at a time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

import asyncpg
from minio import Minio

from common import jobstore
from common.db import DATABASE_UNAVAILABLE, LockKey, every
from common.logs import job_logged
from common.settings import Settings
from common.storage import STORAGE_UNAVAILABLE, pcm_key, remove_objects
from services.ingest.transcripts import delete_transcript

log = logging.getLogger(__name__)

BATCH = 100
DAY_S = 86_400.0


def sweep_interval_s(settings: Settings) -> float | None:
    """How often to look: a tenth of the shortest retention, between 1 s and an hour; None when
    everything is kept."""
    kept_s = [days * DAY_S for days in (settings.audio_retention_days, settings.transcript_retention_days) if days]
    return min(3600.0, max(1.0, min(kept_s) / 10)) if kept_s else None


async def sweep(pool: asyncpg.Pool, s3: Minio, settings: Settings, passed_over: set[tuple[str, int]] | None = None,
                s3_quick: Minio | None = None) -> tuple[int, int, bool]:
    """One pass over at most BATCH jobs of each kind; returns (recordings removed, jobs deleted,
    whether a kind had a full batch: more may be due). A job whose objects the store refuses to
    remove is logged and added to `passed_over` (with the kind), which later passes of the same
    sweep leave out: it must not keep every later job, or the other kind, from being swept."""
    passed_over = set() if passed_over is None else passed_over
    deleted = removed = 0
    full = False
    if settings.transcript_retention_days:
        due = await jobstore.ended_before(pool, settings.transcript_retention_days * DAY_S, BATCH,
                                          [job_id for kind, job_id in passed_over if kind == "delete"])
        full |= len(due) == BATCH
        for job_id in due:
            with job_logged(job_id), _passed_over_on_error("could not delete it", ("delete", job_id), passed_over):
                # The quick client: the delete calls the store with the job's row locked.
                if await delete_transcript(pool, s3_quick or s3, settings, job_id, owner=None):
                    deleted += 1
                    log.info("deleted: ended more than TRANSCRIPT_RETENTION_DAYS (%g) ago",
                             settings.transcript_retention_days)
    if settings.audio_retention_days:
        due = await jobstore.recordings_ended_before(pool, settings.audio_retention_days * DAY_S, BATCH,
                                                     [job_id for kind, job_id in passed_over if kind == "audio"])
        full |= len(due) == BATCH
        for job in due:
            with job_logged(job["id"]), _passed_over_on_error("could not remove its recording", ("audio", job["id"]),
                                                              passed_over):
                # Marked first: a redaction rewriting the recording meanwhile either was marked
                # done before (and its copy is removed here) or finds this mark and removes its copy.
                # The objects' removal is confirmed apart: an ingest stopped in between, or a store
                # that refused, leaves the job for the next sweep, never a removed job still stored.
                again = not await jobstore.mark_audio_removed(pool, job["id"])
                await asyncio.to_thread(remove_objects, s3, [(settings.audio_bucket, job["audio_key"]),
                                                             (settings.audio_bucket, pcm_key(job["id"]))])
                await jobstore.mark_audio_objects_removed(pool, job["id"])
                removed += 1
                log.info("%s: the job ended more than AUDIO_RETENTION_DAYS (%g) ago",
                         "recording's removal confirmed (it was marked removed before)" if again
                         else "recording removed", settings.audio_retention_days)
    return removed, deleted, full


@contextlib.contextmanager
def _passed_over_on_error(what: str, job: tuple[str, int], passed_over: set[tuple[str, int]]) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        if isinstance(exc, (*DATABASE_UNAVAILABLE, *STORAGE_UNAVAILABLE)):
            raise  # an outage: the whole sweep waits for its next turn
        if isinstance(exc.__cause__, STORAGE_UNAVAILABLE):
            raise  # the same, as delete_transcript reports it
        log.warning("%s (%s: %s); passed over until the next sweep", what, type(exc).__name__, exc)
        passed_over.add(job)


async def run_retention(pool: asyncpg.Pool, s3: Minio, settings: Settings, s3_quick: Minio | None = None) -> None:
    interval = sweep_interval_s(settings)
    if interval is None:
        return

    async def sweep_all() -> None:
        passed_over: set[tuple[str, int]] = set()
        while (await sweep(pool, s3, settings, passed_over, s3_quick))[2]:
            pass  # a backlog (retention just switched on): on until it is cleared

    await every(interval, pool, LockKey.RETENTION, sweep_all, "the retention sweep")
