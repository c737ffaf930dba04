"""Uploads left without a job. A recording is stored before the transaction that makes its job
(services.ingest.jobs.create_job), so an ingest killed in between (SIGKILL, out of memory, past
its shutdown grace) leaves the object with no row, and nothing else would ever remove it. Every
ingest replica looks once an hour (an advisory lock lets one look at a time) and removes uploads
older than ORPHAN_AGE_S whose job does not exist: a job's id is reserved before its upload is
stored, so no row can appear for them any more."""

from __future__ import annotations

import asyncio
import itertools
import logging
from datetime import UTC, datetime, timedelta

import asyncpg
from minio import Minio

from common import jobstore
from common.db import LockKey, every
from common.storage import remove_objects
from services.ingest.jobs import UPLOAD_PREFIX

log = logging.getLogger(__name__)

ORPHAN_AGE_S = 3600.0
SWEEP_INTERVAL_S = 3600.0
PAGE = 1000


def _job_id(key: str) -> int | None:
    name = key.removeprefix(UPLOAD_PREFIX)
    return int(name) if name.isdigit() else None


async def remove_orphan_uploads(pool: asyncpg.Pool, s3: Minio, bucket: str, age_s: float = ORPHAN_AGE_S) -> int:
    """One look through the uploads, a page at a time; returns how many were removed."""
    before = datetime.now(UTC) - timedelta(seconds=age_s)
    listing = iter(s3.list_objects(bucket, prefix=UPLOAD_PREFIX, recursive=True))
    removed = 0
    while page := await asyncio.to_thread(lambda: list(itertools.islice(listing, PAGE))):
        old = {job_id: item.object_name for item in page
               if (job_id := _job_id(item.object_name)) is not None and item.last_modified < before}
        if not old:
            continue
        existing = await jobstore.existing_job_ids(pool, list(old))
        orphans = [(bucket, key) for job_id, key in old.items() if job_id not in existing]
        if orphans:
            await asyncio.to_thread(remove_objects, s3, orphans)
            log.warning("removed %d uploads without a job (an ingest stopped between storing them and"
                        " making their jobs): %s", len(orphans), ", ".join(key for _, key in orphans[:10]))
            removed += len(orphans)
    return removed


async def run_orphan_sweep(pool: asyncpg.Pool, s3: Minio, bucket: str) -> None:
    await every(SWEEP_INTERVAL_S, pool, LockKey.ORPHANS, lambda: remove_orphan_uploads(pool, s3, bucket),
                "looking for uploads without a job")
