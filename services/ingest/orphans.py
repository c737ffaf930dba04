"""Uploads left without a job. A recording is stored before the transaction that makes its job
(services.ingest.jobs.create_job), so an ingest killed in between (SIGKILL, out of memory, past
its shutdown grace) leaves the object with no row, and nothing else would ever remove it. Every
ingest replica looks once an hour (an advisory lock lets one look at a time) and removes uploads
older than ORPHAN_AGE_S whose job does not exist: a job's id is reserved before its upload is
stored, so no row can appear for them any more.

Decoded audio (`pcm/`) is removed when its job ends; a run that stored it after that (a second
delivery of the job) and then stopped leaves it behind. The same look removes decoded audio of
a job that does not exist or ended more than a day ago, but not of a done job whose redaction of
the recording is still to do (its message, parked in stt.dead-letters after its retries, needs
it when an operator sends it back)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import asyncpg
from minio import Minio

from common import jobstore
from common.db import LockKey, every
from common.storage import PCM_PREFIX, PCM_SUFFIX, remove_objects
from services.ingest.jobs import UPLOAD_PREFIX

log = logging.getLogger(__name__)

ORPHAN_AGE_S = 3600.0
SWEEP_INTERVAL_S = 3600.0
PAGE = 1000


# A job's decoded audio is removed when the job ends (after redaction reads it); one still there a
# day after the end was left by a run that stored it after that removal and then stopped.
PCM_KEPT_AFTER_END_S = 86_400.0


def _job_id(name: str) -> int | None:
    """The job id an object is named by, or None for a name ingest does not give (an object put
    there by hand). ASCII digits only, and few enough for a bigint: str.isdigit() also takes '²',
    which int() refuses, and other scripts' digits, which it reads as some job's id; a longer
    number overflows the id column. One such object stopped every sweep after it. Nor a leading
    zero, which no id is written with: "007" is not job 7's, and removed as its orphan."""
    return int(name) if re.fullmatch(r"0|[1-9][0-9]{0,17}", name) else None


def _upload_job_id(key: str) -> int | None:
    return _job_id(key.removeprefix(UPLOAD_PREFIX))


def _pcm_job_id(key: str) -> int | None:
    if not (key.startswith(PCM_PREFIX) and key.endswith(PCM_SUFFIX)):
        return None
    return _job_id(key.removeprefix(PCM_PREFIX).removesuffix(PCM_SUFFIX))


async def _remove_unneeded(s3: Minio, bucket: str, prefix: str, job_id_of: Callable[[str], int | None],
                           needed: Callable[[list[int]], Awaitable[set[int]]], age_s: float) -> list[str]:
    """One look through `prefix`, a page at a time: removes the objects older than `age_s` whose
    job `needed` leaves out; their keys."""
    before = datetime.now(UTC) - timedelta(seconds=age_s)
    listing = iter(s3.list_objects(bucket, prefix=prefix, recursive=True))
    removed: list[str] = []
    while page := await asyncio.to_thread(lambda: list(itertools.islice(listing, PAGE))):
        old = {job_id: item.object_name for item in page
               if (job_id := job_id_of(item.object_name)) is not None and item.last_modified < before}
        if not old:
            continue
        kept = await needed(list(old))
        unneeded = [(bucket, key) for job_id, key in old.items() if job_id not in kept]
        if unneeded:
            await asyncio.to_thread(remove_objects, s3, unneeded)
            removed += [key for _, key in unneeded]
    return removed


async def remove_orphan_uploads(pool: asyncpg.Pool, s3: Minio, bucket: str, age_s: float = ORPHAN_AGE_S) -> int:
    """Uploads older than `age_s` whose job does not exist; returns how many were removed."""
    removed = await _remove_unneeded(s3, bucket, UPLOAD_PREFIX, _upload_job_id,
                                     lambda ids: jobstore.existing_job_ids(pool, ids), age_s)
    if removed:
        log.warning("removed %d uploads without a job (an ingest stopped between storing them and making their"
                    " jobs): %s", len(removed), ", ".join(removed[:10]))
    return len(removed)


async def remove_leftover_pcm(pool: asyncpg.Pool, s3: Minio, bucket: str, age_s: float = ORPHAN_AGE_S,
                              kept_after_end_s: float = PCM_KEPT_AFTER_END_S) -> int:
    """Decoded audio older than `age_s` of a job that does not exist or ended more than
    `kept_after_end_s` ago (with no redaction of its recording still to do); returns how many
    were removed."""
    removed = await _remove_unneeded(s3, bucket, PCM_PREFIX, _pcm_job_id,
                                     lambda ids: jobstore.jobs_using_pcm(pool, ids, kept_after_end_s), age_s)
    if removed:
        log.warning("removed %d decoded audio files left after their jobs ended (a run stored one after the"
                    " job's end, then stopped): %s", len(removed), ", ".join(removed[:10]))
    return len(removed)


async def run_orphan_sweep(pool: asyncpg.Pool, s3: Minio, bucket: str) -> None:
    async def sweep() -> None:
        await remove_orphan_uploads(pool, s3, bucket)
        await remove_leftover_pcm(pool, s3, bucket)

    await every(SWEEP_INTERVAL_S, pool, LockKey.ORPHANS, sweep, "looking for uploads and decoded audio without a job")
