"""Bucket drops announced by MinIO's AMQP notifications. moto sends no bucket events, so this
drives ingest's event handler with the exact document MinIO publishes, on a bucket the running
ingest does not scan: only the event path can make the job."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator
from types import SimpleNamespace

import aio_pika
import httpx
import numpy as np
import pytest

import common.storage
from common import jobstore
from common.broker import connect, declare_topology, open_bus
from common.db import DATABASE_UNAVAILABLE, create_pool
from common.messages import TranscriptCompleted, TranscriptFailed
from common.settings import Settings
from common.storage import (
    StoreCallTimedOut,
    call_in_transaction,
    ensure_buckets,
    make_client,
    pcm_key,
    stored_size,
    upload_bytes,
)
from services.ingest import inbox as inbox_module
from services.ingest.inbox import INBOX_EVENTS_QUEUE, RESULTS_QUEUE, BucketEvent, Inbox
from tests.conftest import Stack, amqp_url, free_port, private_vhost, wait_for_port


def minio_event(bucket: str, key: str, etag: str, size: int) -> str:
    """The body MinIO publishes for a finished multipart upload (keys arrive URL-encoded)."""
    encoded = urllib.parse.quote_plus(key, safe="/")
    record = {
        "eventVersion": "2.0", "eventSource": "minio:s3", "awsRegion": "",
        "eventTime": "2026-11-25T10:00:00.000Z",
        "eventName": "s3:ObjectCreated:CompleteMultipartUpload",
        "userIdentity": {"principalId": "minioadmin"},
        "s3": {"s3SchemaVersion": "1.0", "configurationId": "Config",
               "bucket": {"name": bucket, "ownerIdentity": {"principalId": "minioadmin"},
                          "arn": f"arn:aws:s3:::{bucket}"},
               "object": {"key": encoded, "size": size, "eTag": etag,
                          "contentType": "audio/wav", "sequencer": "1830A8E1A1B2C3D4"}},
    }
    return json.dumps({"EventName": "s3:ObjectCreated:CompleteMultipartUpload",
                       "Key": f"{bucket}/{encoded}", "Records": [record]})


def minio_removal(bucket: str, key: str) -> str:
    """The body MinIO publishes for a removed object (where delete events are configured): no
    ETag, no size."""
    encoded = urllib.parse.quote_plus(key, safe="/")
    record = {
        "eventVersion": "2.0", "eventSource": "minio:s3", "awsRegion": "",
        "eventTime": "2026-11-25T10:05:00.000Z", "eventName": "s3:ObjectRemoved:Delete",
        "userIdentity": {"principalId": "minioadmin"},
        "s3": {"s3SchemaVersion": "1.0", "configurationId": "Config",
               "bucket": {"name": bucket, "ownerIdentity": {"principalId": "minioadmin"},
                          "arn": f"arn:aws:s3:::{bucket}"},
               "object": {"key": encoded, "sequencer": "1830A8E1A1B2C3D5"}},
    }
    return json.dumps({"EventName": "s3:ObjectRemoved:Delete", "Key": f"{bucket}/{encoded}", "Records": [record]})


async def test_minio_event_makes_exactly_one_job_and_a_result(stack: Stack, fixtures_dir):
    bucket, key = "dropbox", "team call (1).wav"
    settings = stack.settings(inbox_bucket=bucket)
    s3 = make_client(settings)
    ensure_buckets(s3, bucket)
    s3.fput_object(bucket, key, str(fixtures_dir / "en_dialogue.wav"))
    stat = s3.stat_object(bucket, key)
    event = BucketEvent.model_validate_json(minio_event(bucket, key, f'"{stat.etag}"', stat.size))

    pool = await create_pool(settings)
    try:
        # The job's message goes out through the outbox: the running services' flusher sends it.
        inbox = Inbox(settings, pool, s3, asyncio.Event())
        await inbox.on_event(event)
        await inbox.on_event(event)  # MinIO may deliver an event twice
        rows = await pool.fetch("SELECT id, filename, source_key FROM transcripts WHERE source_bucket = $1", bucket)
        assert [(r["filename"], r["source_key"]) for r in rows] == [(key, key)]
    finally:
        await pool.close()

    # The running ingest writes the result next to the object when the job ends.
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            document = json.loads(s3.get_object(bucket, f"results/{key}.json").read())
            break
        except Exception:
            await asyncio.sleep(1)
    else:
        raise AssertionError("no result file for the event-driven job")
    assert document["status"] == "done" and len({s["speaker"] for s in document["segments"]}) == 2


async def test_two_ingests_and_two_persisters_racing_on_the_same_drops_store_each_once(stack: Stack, fixtures_dir):
    """Two ingest processes scan the inbox every second while this process announces the same
    objects as MinIO events (twice each, concurrently), and two persisters share the stored work:
    every object becomes exactly one job, stored once."""
    port = free_port()
    stack.start("ingest-2", "-m", "services.ingest", env={**stack.env, "API_PORT": str(port)})
    stack.start("persister-2", "-m", "services.persister", env={**stack.env})
    settings = stack.settings()
    s3 = make_client(settings)
    pool = await create_pool(settings)
    keys = [f"race/call {i}.wav" for i in range(6)]
    try:
        await asyncio.to_thread(wait_for_port, port)
        events = []
        for i, key in enumerate(keys):
            source = fixtures_dir / ("jfk.flac" if i % 2 else "en_dialogue.wav")
            await asyncio.to_thread(s3.fput_object, settings.inbox_bucket, key, str(source))
            stat = await asyncio.to_thread(s3.stat_object, settings.inbox_bucket, key)
            events.append(BucketEvent.model_validate_json(
                minio_event(settings.inbox_bucket, key, f'"{stat.etag}"', stat.size)))
        inbox = Inbox(settings, pool, s3, asyncio.Event())
        await asyncio.gather(*(inbox.on_event(event) for event in events * 2))

        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            rows = await pool.fetch("SELECT id, source_key, status FROM transcripts WHERE source_key = ANY($1::text[])",
                                    keys)
            if len(rows) >= len(keys) and all(r["status"] != "processing" for r in rows):
                break
            await asyncio.sleep(1)
        assert sorted(r["source_key"] for r in rows) == sorted(keys)  # one job per object
        assert {r["status"] for r in rows} == {"done"}
        ids = [r["id"] for r in rows]
        duplicates = await pool.fetchval(
            "SELECT count(*) - count(DISTINCT (transcript_id, start_ts, text)) FROM segments"
            " WHERE transcript_id = ANY($1::bigint[])", ids)
        assert duplicates == 0
        assert stack.processes["ingest-2"].poll() is None and stack.processes["persister-2"].poll() is None
    finally:
        await pool.close()
        stack.stop("ingest-2")
        stack.stop("persister-2")


async def test_the_scan_makes_each_unannounced_drop_a_job_once_a_page_at_a_time(stack: Stack, fixtures_dir,
                                                                                 monkeypatch):
    """Objects no event announced are found by the scan, listed a page at a time (here pages of
    two), and a second scan makes nothing new; result files are not drops."""
    import services.ingest.inbox as inbox_module

    bucket = f"scanbox-{time.monotonic_ns() % 10**9}"
    settings = stack.settings(inbox_bucket=bucket)
    s3 = make_client(settings)
    ensure_buckets(s3, bucket)
    keys = [f"calls/quiet {i}.flac" for i in range(3)]
    for key in keys:
        await asyncio.to_thread(s3.fput_object, bucket, key, str(fixtures_dir / "jfk.flac"))
    await asyncio.to_thread(s3.fput_object, bucket, f"{settings.results_prefix}calls/old.json",
                            str(fixtures_dir / "en_dialogue.json"))
    monkeypatch.setattr(inbox_module, "SCAN_PAGE", 2)
    pool = await create_pool(settings)
    first = second = []
    try:
        inbox = Inbox(settings, pool, s3, asyncio.Event())
        await inbox.reconcile()
        first = await pool.fetch("SELECT id, source_key FROM transcripts WHERE source_bucket = $1", bucket)
        await inbox.reconcile()
        second = await pool.fetch("SELECT id, source_key FROM transcripts WHERE source_bucket = $1", bucket)
    finally:
        # Not left for the stack's stages to transcribe while the tests after this one run.
        await discard(stack.api, *{r["id"] for r in [*first, *second]})
        await pool.execute("DELETE FROM deleted_drops WHERE source_bucket = $1", bucket)
        await pool.close()
        remove_bucket(s3, bucket)
    assert sorted(r["source_key"] for r in first) == keys
    assert sorted(r["id"] for r in second) == sorted(r["id"] for r in first)


def remove_bucket(s3, bucket: str) -> None:
    for obj in s3.list_objects(bucket, recursive=True):
        s3.remove_object(bucket, obj.object_name)
    s3.remove_bucket(bucket)


async def wait_for_result(s3, bucket: str, key: str, text_in_it: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            document = json.loads(s3.get_object(bucket, f"results/{key}.json").read())
            if text_in_it in " ".join(s["text"] for s in document.get("segments", [])):
                return document
        except Exception:
            pass
        await asyncio.sleep(1)
    raise AssertionError(f"no result file of {key} saying {text_in_it!r}")


async def test_a_key_dropped_again_keeps_the_newer_jobs_results(stack: Stack, fixtures_dir):
    """A drop overwritten with the right recording is a new job. Until its results are written the
    older job's are not there to be read as its own (a weekly drop of one name, read as soon as its
    .json is there, was last week's); the older job's results must not replace the newer one's
    when it ends later, and deleting it must not remove them."""

    bucket, key = f"redrop-{time.monotonic_ns() % 10**9}", "weekly/call.flac"
    settings = stack.settings(inbox_bucket=bucket)
    s3 = make_client(settings)
    ensure_buckets(s3, bucket)
    pool = await create_pool(settings)
    inbox = Inbox(settings, pool, s3, asyncio.Event())

    async def drop(fixture: str) -> int:
        await asyncio.to_thread(s3.fput_object, bucket, key, str(fixtures_dir / fixture))
        stat = s3.stat_object(bucket, key)
        return await inbox.register(key, stat.etag.strip('"'))

    first = second = None
    try:
        first = await drop("jfk.flac")
        await wait_for_result(s3, bucket, key, "country")
        second = await drop("en_dialogue.wav")
        assert stored_size(s3, bucket, f"results/{key}.json") is None  # taken down as the new drop is taken
        assert stored_size(s3, bucket, f"results/{key}.srt") is None
        await wait_for_result(s3, bucket, key, "sales")
        # The first job's ending comes again (or only now): its results are not written over.
        await pool.execute("UPDATE transcripts SET result_written = false WHERE id = $1", first)
        await inbox.write_result(first)
        assert await pool.fetchval("SELECT result_written FROM transcripts WHERE id = $1", first)
        await wait_for_result(s3, bucket, key, "sales", timeout=1)
        assert httpx.delete(f"{stack.api}/transcripts/{first}").status_code == 204
        await wait_for_result(s3, bucket, key, "sales", timeout=1)  # still there
    finally:
        for job_id in (first, second):
            if job_id is not None:
                httpx.delete(f"{stack.api}/transcripts/{job_id}")
        await pool.execute("DELETE FROM deleted_drops WHERE source_bucket = $1", bucket)
        await pool.close()
        remove_bucket(s3, bucket)


async def test_a_drop_whose_bucket_is_gone_is_not_written_again_every_scan(stack: Stack, fixtures_dir):
    """The inbox bucket removed (its drops with it) before a job's results were written: the
    results are given up with a warning once, not tried with a traceback at every scan."""
    bucket, key = f"gonebox-{time.monotonic_ns() % 10**9}", "call.flac"
    settings = stack.settings(inbox_bucket=bucket)
    s3 = make_client(settings)
    ensure_buckets(s3, bucket)
    pool = await create_pool(settings)
    inbox = Inbox(settings, pool, s3, asyncio.Event())
    job = None
    try:
        await asyncio.to_thread(s3.fput_object, bucket, key, str(fixtures_dir / "jfk.flac"))
        job = await inbox.register(key, s3.stat_object(bucket, key).etag.strip('"'))
        await wait_for_result(s3, bucket, key, "country")
        remove_bucket(s3, bucket)
        await pool.execute("UPDATE transcripts SET result_written = false WHERE id = $1", job)
        await inbox.write_result(job)
        assert await pool.fetchval("SELECT result_written FROM transcripts WHERE id = $1", job)
        assert job not in await jobstore.ended_drops_without_result(pool)
    finally:
        if job is not None:
            httpx.delete(f"{stack.api}/transcripts/{job}")
        await pool.execute("DELETE FROM deleted_drops WHERE source_bucket = $1", bucket)
        await pool.close()
        if s3.bucket_exists(bucket):
            remove_bucket(s3, bucket)


async def test_a_refused_drop_keeps_its_reference_and_a_drop_gone_before_it_is_taken_is_no_error(
        stack: Stack, fixtures_dir):

    bucket = f"oddbox-{time.monotonic_ns() % 10**9}"
    settings = stack.settings(inbox_bucket=bucket)
    s3 = make_client(settings)
    ensure_buckets(s3, bucket)
    pool = await create_pool(settings)
    inbox = Inbox(settings, pool, s3, asyncio.Event())
    refused = None
    try:
        await asyncio.to_thread(s3.fput_object, bucket, "call 7.flac", str(fixtures_dir / "jfk.flac"),
                                metadata={"num-speakers": "many", "reference": "CALL-7-REFUSED"})
        refused = await inbox.register("call 7.flac", s3.stat_object(bucket, "call 7.flac").etag.strip('"'))
        listed = httpx.get(f"{stack.api}/transcripts", params={"reference": "CALL-7-REFUSED"}).json()["items"]
        assert [job["id"] for job in listed] == [refused]

        # Announced, then removed before ingest took it: nothing to do, no error (it was retried
        # and parked in stt.dead-letters). (Overwritten meanwhile is alike on MinIO, whose copy
        # refuses the old ETag; moto's copies whatever is there.)
        await asyncio.to_thread(s3.fput_object, bucket, "gone.flac", str(fixtures_dir / "jfk.flac"))
        etag = s3.stat_object(bucket, "gone.flac").etag.strip('"')
        s3.remove_object(bucket, "gone.flac")
        assert await inbox.register("gone.flac", etag) is None
        assert await pool.fetchval("SELECT count(*) FROM transcripts WHERE source_key = 'gone.flac'"
                                   " AND source_bucket = $1", bucket) == 0
    finally:
        if refused is not None:
            httpx.delete(f"{stack.api}/transcripts/{refused}")
        await pool.execute("DELETE FROM deleted_drops WHERE source_bucket = $1", bucket)
        await pool.close()
        remove_bucket(s3, bucket)


async def discard(api: str, *job_ids: int | None) -> None:
    """Cancel (when still running) and delete the jobs, so the stack's stages stop working on them."""
    async with httpx.AsyncClient(base_url=api, timeout=30) as client:
        for job_id in (j for j in job_ids if j is not None):
            await client.post(f"/transcripts/{job_id}/cancel")
            deadline = time.monotonic() + 30
            while (await client.delete(f"/transcripts/{job_id}")).status_code not in (204, 404):
                assert time.monotonic() < deadline, f"job {job_id} could not be deleted"
                await asyncio.sleep(0.5)


async def ended(pool, job_id: int, timeout: float = 120) -> dict:
    """The job's row once it has ended and its result file is written (or given up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = await pool.fetchrow("SELECT status, error, result_written FROM transcripts WHERE id = $1", job_id)
        if row["status"] != "processing" and row["result_written"]:
            return dict(row)
        await asyncio.sleep(0.5)
    raise AssertionError(f"job {job_id} did not end with its results written")


async def test_a_drop_over_max_upload_mb_is_refused_and_not_copied(stack: Stack, fixtures_dir):
    """Uploads are held to MAX_UPLOAD_MB; a drop must be too, or the diarizer reads a recording of
    any size to its /tmp (4Gi in Kubernetes) and is evicted, again at each retry."""
    bucket, key = f"bigbox-{time.monotonic_ns() % 10**9}", "huge call.flac"
    settings = stack.settings(inbox_bucket=bucket, max_upload_mb=1)
    s3 = make_client(settings)
    ensure_buckets(s3, bucket)
    pool = await create_pool(settings)
    job_id = None
    try:
        await asyncio.to_thread(s3.fput_object, bucket, key, str(fixtures_dir / "jfk.flac"))  # 1.1 MB
        inbox = Inbox(settings, pool, s3, asyncio.Event())
        job_id = await inbox.register(key, s3.stat_object(bucket, key).etag.strip('"'))
        assert job_id is not None
        assert stored_size(s3, settings.audio_bucket, f"uploads/{job_id}") is None  # never taken in
        row = await ended(pool, job_id)
        assert row["status"] == "error" and "MAX_UPLOAD_MB (1 MB)" in row["error"]
        document = json.loads(s3.get_object(bucket, f"results/{key}.json").read())
        assert document["status"] == "error" and "MAX_UPLOAD_MB" in document["error"]
    finally:
        await discard(stack.api, job_id)
        await pool.execute("DELETE FROM deleted_drops WHERE source_bucket = $1", bucket)
        await pool.close()
        remove_bucket(s3, bucket)


async def test_a_drop_whose_result_key_would_be_too_long_is_refused_once(stack: Stack, fixtures_dir):
    """S3 keys are at most 1024 bytes: `results/<key>.json` of a key near that could never be
    written, and every scan tried again (with a traceback) for ever."""
    key = "calls/" + "x" * 1010 + ".flac"  # 1021 bytes: a drop S3 takes, its result key 1034
    async with registered_drop(stack, "longbox", key, fixtures_dir / "jfk.flac") as (inbox, job_id):
        row = await ended(inbox.pool, job_id)
        assert row["status"] == "error" and "1034 bytes" in (row["error"] or ""), row
        # Marked written without a try (moto, unlike S3, would take the key).
        await inbox.pool.execute("UPDATE transcripts SET result_written = false WHERE id = $1", job_id)
        await inbox.write_result(job_id)
        assert await inbox.pool.fetchval("SELECT result_written FROM transcripts WHERE id = $1", job_id)
        assert stored_size(inbox.s3, inbox.settings.inbox_bucket, f"results/{key}.json") is None
        # Nor removed with the job: S3 (and MinIO) refuses to delete a key it would not store,
        # so every DELETE (and retention) of the job failed on it with 503.
        answer, removed = await asyncio.to_thread(delete_in_process, inbox.settings, job_id)
        assert answer == 204, answer
        assert removed and not [k for _, k in removed if k.startswith(inbox.settings.results_prefix)], removed


class RemovalsNoted:
    """The store client, noting each (bucket, key) it is asked to remove."""

    def __init__(self, s3):
        self.s3, self.removed = s3, []

    def __getattr__(self, name):
        return getattr(self.s3, name)

    def remove_object(self, bucket: str, key: str, *args, **kwargs):
        self.removed.append((bucket, key))
        return self.s3.remove_object(bucket, key, *args, **kwargs)


def delete_in_process(settings: Settings, job_id: int) -> tuple[int, list[tuple[str, str]]]:
    """DELETE /transcripts/{job_id} on an ingest in this process: its status and the objects it
    asked the store to remove."""
    from litestar.testing import TestClient

    from services.ingest.app import create_app

    with TestClient(create_app(settings), timeout=60) as client:
        store = client.app.state.s3_quick = RemovalsNoted(client.app.state.s3_quick)
        return client.delete(f"/transcripts/{job_id}").status_code, store.removed


@contextlib.asynccontextmanager
async def registered_drop(stack: Stack, bucket_prefix: str, key: str, recording) -> AsyncIterator[tuple[Inbox, int]]:
    """`recording` dropped as `key` into a bucket of its own and taken by an Inbox of this process:
    that inbox and the job id; the job, the bucket and what the drop left removed afterwards."""
    bucket = f"{bucket_prefix}-{time.monotonic_ns() % 10**9}"
    settings = stack.settings(inbox_bucket=bucket)
    s3 = make_client(settings)
    ensure_buckets(s3, bucket)
    pool = await create_pool(settings)
    job_id = None
    try:
        await asyncio.to_thread(s3.fput_object, bucket, key, str(recording))
        inbox = Inbox(settings, pool, s3, asyncio.Event())
        job_id = await inbox.register(key, s3.stat_object(bucket, key).etag.strip('"'))
        yield inbox, job_id
    finally:
        await discard(stack.api, job_id)
        await pool.execute("DELETE FROM deleted_drops WHERE source_bucket = $1", bucket)
        await pool.close()
        remove_bucket(s3, bucket)


class SlowStore:
    """The store client, its writes blocked until `go` is set."""

    def __init__(self, s3, go: threading.Event):
        self.s3, self.go, self.writing, self.written = s3, go, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.s3, name)

    def put_object(self, *args, **kwargs):
        self.writing.set()
        try:
            self.go.wait(20)
            return self.s3.put_object(*args, **kwargs)
        finally:
            self.written.set()

    async def let_go(self) -> None:
        """Let the blocked write finish (before its bucket is removed)."""
        self.go.set()
        if self.writing.is_set():
            await asyncio.to_thread(self.written.wait, 20)


async def refused_drop(s3, inbox: Inbox, pool, bucket: str, key: str, fixture) -> int:
    """A drop refused for its metadata, once the running ingest wrote its result file."""
    await asyncio.to_thread(s3.fput_object, bucket, key, str(fixture), metadata={"num-speakers": "many"})
    job_id = await inbox.register(key, s3.stat_object(bucket, key).etag.strip('"'))
    await ended(pool, job_id)
    return job_id


async def test_a_slow_result_write_is_that_steps_failure_not_a_database_outage(stack: Stack, fixtures_dir,
                                                                                monkeypatch):
    """A store call given up inside a transaction used to raise TimeoutError, which counts as the
    database being away: the ending's handler was held and retried for ever before the steps after
    the result file (redaction, the decoded audio's removal) ran, and a scan gave up whole. Those
    steps run, and the result files are left to the scan: the message is neither held (one always
    too large for the bound would be held for ever) nor retried until dead-lettered."""
    bucket, key = f"slowbox-{time.monotonic_ns() % 10**9}", "slow call.flac"
    settings = stack.settings(inbox_bucket=bucket)
    s3 = make_client(settings)
    ensure_buckets(s3, bucket)
    pool = await create_pool(settings)
    go = threading.Event()
    slow = SlowStore(s3, go)
    job_id = None
    try:
        job_id = await refused_drop(s3, Inbox(settings, pool, s3, asyncio.Event()), pool, bucket, key,
                                    fixtures_dir / "jfk.flac")
        monkeypatch.setattr(common.storage, "IN_TRANSACTION_S", 0.2)
        with pytest.raises(StoreCallTimedOut) as raised:
            await call_in_transaction(go.wait, 20)
        assert not isinstance(raised.value, DATABASE_UNAVAILABLE)

        s3.put_object(settings.audio_bucket, pcm_key(job_id), io.BytesIO(b"\0" * 64), 64)
        inbox = Inbox(settings, pool, s3, asyncio.Event(), s3_quick=slow)
        ending = TranscriptFailed(job_id=job_id, transcript_id=job_id, filename=key, reason="refused")
        await inbox.on_job_ended(ending)
        assert stored_size(s3, settings.audio_bucket, pcm_key(job_id)) is None  # the other steps ran
    finally:
        await slow.let_go()
        await discard(stack.api, job_id)
        await pool.execute("DELETE FROM deleted_drops WHERE source_bucket = $1", bucket)
        await pool.close()
        remove_bucket(s3, bucket)


async def test_an_older_jobs_result_write_cannot_land_after_a_newer_drop_took_the_results_down(
        stack: Stack, fixtures_dir):
    """Job 1 checks for a newer drop of its key, finds none, and uploads its results; meanwhile the
    key is dropped again, and the new drop removes the old results before job 1's upload lands:
    job 1's results then stood beside the new recording as if they were its own."""
    bucket, key = f"racebox-{time.monotonic_ns() % 10**9}", "weekly/call.wav"
    settings = stack.settings(inbox_bucket=bucket)
    s3 = make_client(settings)
    ensure_buckets(s3, bucket)
    pool = await create_pool(settings)
    slow = SlowStore(s3, threading.Event())
    first = second = None
    try:
        inbox = Inbox(settings, pool, s3, asyncio.Event())
        first = await refused_drop(s3, inbox, pool, bucket, key, fixtures_dir / "jfk.flac")
        writing = asyncio.create_task(Inbox(settings, pool, s3, asyncio.Event(), s3_quick=slow).write_result(first))
        await asyncio.to_thread(slow.writing.wait, 20)  # past its check for a newer drop

        await asyncio.to_thread(s3.fput_object, bucket, key, str(fixtures_dir / "empty.wav"))
        registering = asyncio.create_task(inbox.register(key, s3.stat_object(bucket, key).etag.strip('"')))
        deadline = time.monotonic() + 20
        while not (second := await pool.fetchval(
                "SELECT id FROM transcripts WHERE source_bucket = $1 AND id > $2", bucket, first)):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        # Not waiting for the writer's lock (the inbox consumer and the scan would stall): the
        # writer takes its results down once it sees the newer drop.
        assert await asyncio.wait_for(registering, 10) == second
        assert not writing.done()
        slow.go.set()
        await writing
        try:
            left = json.loads(s3.get_object(bucket, f"results/{key}.json").read())
        except Exception:
            left = None  # the newer job's are not written yet
        assert left is None or "impossible" not in (left.get("error") or ""), left
    finally:
        await slow.let_go()
        await discard(stack.api, first, second)
        await pool.execute("DELETE FROM deleted_drops WHERE source_bucket = $1", bucket)
        await pool.close()
        remove_bucket(s3, bucket)


@contextlib.asynccontextmanager
async def inbox_of_its_own(stack: Stack, bucket_prefix: str) -> AsyncIterator[tuple[Inbox, list[int | None]]]:
    """An Inbox of this process on a bucket of its own, and a list for the jobs the test makes:
    they, the bucket and what the drops left are removed afterwards."""
    bucket = f"{bucket_prefix}-{time.monotonic_ns() % 10**9}"
    settings = stack.settings(inbox_bucket=bucket)
    s3 = make_client(settings)
    ensure_buckets(s3, bucket)
    pool = await create_pool(settings)
    jobs: list[int | None] = []
    try:
        yield Inbox(settings, pool, s3, asyncio.Event()), jobs
    finally:
        await discard(stack.api, *jobs)
        await pool.execute("DELETE FROM deleted_drops WHERE source_bucket = $1", bucket)
        await pool.close()
        remove_bucket(s3, bucket)


async def dropped(inbox: Inbox, key: str, recording) -> int:
    """`recording` put at `key` in the inbox's bucket and taken by `inbox`: its job."""
    bucket = inbox.settings.inbox_bucket
    await asyncio.to_thread(inbox.s3.fput_object, bucket, key, str(recording))
    return await inbox.register(key, inbox.s3.stat_object(bucket, key).etag.strip('"'))


async def status_of(pool, job_id: int) -> str:
    return await pool.fetchval("SELECT status FROM transcripts WHERE id = $1", job_id)


async def test_older_results_a_new_drop_did_not_take_down_are_taken_down_by_the_scan(stack: Stack, fixtures_dir):
    """A new drop's take-down of the key's older results was tried once: a store or database
    failure, or ingest stopping between the job's commit and the take-down, left the older
    recording's .json (which says the results are complete) as the new one's while it ran."""
    async with inbox_of_its_own(stack, "retakebox") as (inbox, jobs):
        bucket, key, pool = inbox.settings.inbox_bucket, "weekly/call.wav", inbox.pool
        jobs.append(await refused_drop(inbox.s3, inbox, pool, bucket, key, fixtures_dir / "jfk.flac"))
        async with pool.acquire() as conn, conn.transaction():
            # Held, as by a writer whose own take-down then failed: the new drop's is skipped.
            await inbox_module.lock_results_of(conn, bucket, key)
            jobs.append(newer := await dropped(inbox, key, fixtures_dir / "en_dialogue.wav"))
        assert stored_size(inbox.s3, bucket, f"results/{key}.json") is not None  # the older drop's
        assert await status_of(pool, newer) == "processing"
        await inbox.reconcile()
        assert stored_size(inbox.s3, bucket, f"results/{key}.json") is None


async def test_an_older_jobs_writer_takes_down_a_newer_drops_results_that_are_not_the_newest_ones(
        stack: Stack, fixtures_dir):
    """Dropped three times: the first job's writer (its ending announced again) kept the second
    drop's results because a newer job had written its own, though the newest, third, had not:
    they stood as the third recording's."""
    async with inbox_of_its_own(stack, "thirdbox") as (inbox, jobs):
        bucket, key, pool = inbox.settings.inbox_bucket, "weekly/call.wav", inbox.pool
        jobs.append(first := await refused_drop(inbox.s3, inbox, pool, bucket, key, fixtures_dir / "jfk.flac"))
        jobs.append(await refused_drop(inbox.s3, inbox, pool, bucket, key, fixtures_dir / "empty.wav"))
        async with pool.acquire() as conn, conn.transaction():
            await inbox_module.lock_results_of(conn, bucket, key)  # the third drop's take-down skipped
            jobs.append(third := await dropped(inbox, key, fixtures_dir / "en_dialogue.wav"))
        assert stored_size(inbox.s3, bucket, f"results/{key}.json") is not None  # the second drop's
        await pool.execute("UPDATE transcripts SET result_written = false WHERE id = $1", first)
        await inbox.write_result(first)
        assert await status_of(pool, third) == "processing"
        assert stored_size(inbox.s3, bucket, f"results/{key}.json") is None


class SlowCopy:
    """The store client, whose copies land at once but answer only once `go` is set (a large
    recording's)."""

    def __init__(self, s3, go: threading.Event):
        self.s3, self.go, self.copied = s3, go, threading.Event()

    def __getattr__(self, name):
        return getattr(self.s3, name)

    def copy_object(self, *args, **kwargs):
        copied = self.s3.copy_object(*args, **kwargs)
        self.copied.set()
        self.go.wait(20)
        return copied


async def test_an_older_drop_taken_after_the_newer_one_wrote_its_results_leaves_them(stack: Stack, fixtures_dir):
    """An older drop's job, committed after its copy answered, removed the key's results that the
    newer drop (refused at once) had written meanwhile: for good, since the older job, having a
    newer drop, never writes, and the newer one had."""
    go = threading.Event()
    async with inbox_of_its_own(stack, "latebox") as (inbox, jobs):
        bucket, key, pool = inbox.settings.inbox_bucket, "weekly/call.wav", inbox.pool
        slow = SlowCopy(inbox.s3, go)
        await asyncio.to_thread(inbox.s3.fput_object, bucket, key, str(fixtures_dir / "jfk.flac"))
        older = asyncio.create_task(Inbox(inbox.settings, pool, slow, asyncio.Event()).register(
            key, inbox.s3.stat_object(bucket, key).etag.strip('"')))
        try:
            assert await asyncio.to_thread(slow.copied.wait, 20)
            jobs.append(newer := await refused_drop(inbox.s3, inbox, pool, bucket, key, fixtures_dir / "empty.wav"))
        finally:
            go.set()
            jobs.append(first := await older)
        assert first < newer
        assert stored_size(inbox.s3, bucket, f"results/{key}.json") is not None, "the newer drop's results removed"
        document = json.loads(inbox.s3.get_object(bucket, f"results/{key}.json").read())
        assert "impossible" in document["error"], document


async def test_an_older_job_ending_after_the_newer_drops_job_was_deleted_writes_no_results(
        stack: Stack, fixtures_dir):
    """DELETE /transcripts/{id} of the key's newest job: the key's older job, still running, no
    longer saw a newer drop of the key, and wrote its results beside the newer recording."""
    async with inbox_of_its_own(stack, "deletedbox") as (inbox, jobs):
        bucket, key, pool = inbox.settings.inbox_bucket, "weekly/call.wav", inbox.pool
        jobs.append(older := await dropped(inbox, key, fixtures_dir / "en_dialogue.wav"))
        jobs.append(newer := await refused_drop(inbox.s3, inbox, pool, bucket, key, fixtures_dir / "jfk.flac"))
        assert httpx.delete(f"{stack.api}/transcripts/{newer}").status_code == 204
        assert stored_size(inbox.s3, bucket, f"results/{key}.json") is None
        assert await status_of(pool, older) == "processing"
        await ended(pool, older, timeout=300)
        assert stored_size(inbox.s3, bucket, f"results/{key}.json") is None


async def test_a_job_ending_raises_a_steps_own_failure_before_a_store_that_did_not_answer(monkeypatch):
    """A store that did not answer is waited out, holding the message; a step failing for its own
    reason must still spend the retries, or it would be held for ever."""
    inbox = Inbox(Settings(_env_file=None), None, None, asyncio.Event())

    async def write_result(job_id: int) -> None:
        raise StoreCallTimedOut("the object store did not answer upload_json within 30 s")

    async def redact_recording(*args) -> None:
        raise ValueError("not a recording")

    removed = []
    monkeypatch.setattr(inbox, "write_result", write_result)
    monkeypatch.setattr(inbox_module, "redact_recording", redact_recording)
    monkeypatch.setattr(inbox_module, "remove_objects", lambda *args: removed.append(args))
    ending = TranscriptFailed(job_id=1, transcript_id=1, filename="call.flac", reason="refused")
    with pytest.raises(ValueError, match="not a recording"):
        await inbox.on_job_ended(ending)
    assert removed == []  # kept for the retry's redaction


async def test_a_minio_exchange_rabbitmq_refuses_keeps_no_job_end_from_being_taken(stack: Stack, made_job, caplog,
                                                                                  monkeypatch):
    """MinIO made MINIO_EVENTS_EXCHANGE first, not durable (its default): ingest's declaration of
    it was refused before either consumer started, so the job ends' consumer was down too, started
    again and refused for ever; no recording was redacted nor decoded audio removed, uploads' as
    well. On a fresh vhost, stt.ingest.results was not even bound to stt.events. The job ends are
    taken; the inbox events' consumer alone says why it waits, and consumes once the exchange is
    fixed."""
    from services.ingest import app as ingest_app

    monkeypatch.setattr(inbox_module, "MINIO_EXCHANGE_RETRY_S", 0.5)
    with private_vhost() as vhost:
        settings = stack.settings(amqp_url=amqp_url(vhost))
        admin = await aio_pika.connect_robust(amqp_url(vhost))
        channel = await admin.channel()
        await channel.declare_exchange(settings.minio_events_exchange, aio_pika.ExchangeType.TOPIC, durable=False)
        connection = await connect(settings, "test-refused-minio-exchange")
        await declare_topology(connection, settings)  # as ingest's start does, before its consumers
        state = SimpleNamespace(broker_open=asyncio.Event(), connection=connection, bus=await open_bus(admin, settings))
        state.broker_open.set()
        pool = await create_pool(settings)
        s3 = make_client(settings)
        consuming = asyncio.create_task(ingest_app.consume_until_stopping(
            state, Inbox(settings, pool, s3, asyncio.Event())))
        try:
            deadline = time.monotonic() + 20
            while await consumers(admin, RESULTS_QUEUE) < 1:
                assert time.monotonic() < deadline and not consuming.done(), "the job ends were not consumed"
                await asyncio.sleep(0.2)
            job_id = made_job("call.wav", b"RIFF the upload as sent", options={"redact": ["phone"]}, segment=True,
                              due=True)
            upload_bytes(s3, settings.audio_bucket, pcm_key(job_id), np.full(5 * 16000, 1000, dtype="<i2").tobytes())
            ended = TranscriptCompleted(job_id=job_id, transcript_id=job_id, filename="call.wav", segment_count=1)
            events = await channel.get_exchange("stt.events")
            await events.publish(aio_pika.Message(ended.model_dump_json().encode(), message_id=ended.message_id,
                                                  delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                                 routing_key=ended.ROUTING_KEY)
            deadline = time.monotonic() + 60
            while stored_size(s3, settings.audio_bucket, pcm_key(job_id)) is not None:
                assert time.monotonic() < deadline and not consuming.done(), "the job's end was not taken"
                await asyncio.sleep(0.2)
            assert await pool.fetchval("SELECT audio_redacted_at IS NOT NULL FROM transcripts WHERE id = $1", job_id)
            assert s3.get_object(settings.audio_bucket, f"uploads/{job_id}").read(4) == b"RIFF"
            refusals = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"
                        and f"MINIO_EVENTS_EXCHANGE '{settings.minio_events_exchange}'" in r.getMessage()]
            assert refusals and "inequivalent arg 'durable'" in refusals[0], refusals

            # Made as MinIO should make it: the inbox events are consumed at the next try.
            await channel.exchange_delete(settings.minio_events_exchange)
            deadline = time.monotonic() + 20
            while await consumers(admin, INBOX_EVENTS_QUEUE) < 1:
                assert time.monotonic() < deadline and not consuming.done(), "the inbox events were not consumed"
                await asyncio.sleep(0.2)
            assert await consumers(admin, RESULTS_QUEUE) == 1
        finally:
            consuming.cancel()
            await asyncio.gather(consuming, return_exceptions=True)
            await connection.close()
            await admin.close()
            await pool.close()


async def consumers(connection: aio_pika.abc.AbstractConnection, queue: str) -> int:
    """How many consumers the queue has; 0 while it is not declared."""
    channel = await connection.channel()
    try:
        return (await channel.declare_queue(queue, passive=True)).declaration_result.consumer_count
    except aio_pika.exceptions.ChannelNotFoundEntity:
        return 0
    finally:
        if not channel.is_closed:
            await channel.close()


def test_a_result_files_name_over_255_bytes_is_too_long():
    """MinIO refuses a name between slashes over 255 bytes: a drop named with 251 to 255 bytes
    ran, and its `.json` could never be written (retried, parked, and a traceback every scan)."""
    assert inbox_module.result_key_too_long("results/", "calls/" + "x" * 245 + ".flac") is None  # .json: 255
    for name in ("x" * 246 + ".flac", "x" * 250 + ".flac", "я" * 125 + ".flac"):  # 251, 255, 255 bytes
        reason = inbox_module.result_key_too_long("results/", f"calls/{name}")
        assert reason is not None and f"{len(name.encode()) + 5} bytes, over MinIO's 255" in reason, (name, reason)
    # A prefix without a slash makes the key's first folder longer.
    assert inbox_module.result_key_too_long("results-", "x" * 250 + "/call.flac") is not None
    # A drop named longer than MinIO allows is in a store that takes such names: its results too.
    assert inbox_module.result_key_too_long("results/", "calls/" + "x" * 300 + ".flac") is None
    # The whole key's limit is said as before.
    assert "1034 bytes, over S3's 1024" in inbox_module.result_key_too_long("results/", "calls/" + "x" * 1010 + ".flac")


async def test_a_drop_whose_result_files_name_would_be_too_long_is_refused(stack: Stack, fixtures_dir):
    key = "calls/" + "x" * 250 + ".flac"  # a name MinIO takes; its result file's is 260 bytes
    async with registered_drop(stack, "namebox", key, fixtures_dir / "empty.wav") as (inbox, job_id):
        row = await ended(inbox.pool, job_id)
        assert row["status"] == "error" and "key is too long" in row["error"] and "260 bytes" in row["error"], row
        # Marked written without a try (moto, unlike MinIO, would take the name).
        assert stored_size(inbox.s3, inbox.settings.inbox_bucket, f"results/{key}.json") is None
        # Not copied: such a job cannot be rerun.
        assert stored_size(inbox.s3, inbox.settings.audio_bucket, f"uploads/{job_id}") is None


async def test_only_an_object_created_event_is_a_drop_and_one_without_an_etag_is_the_object_there(
        stack: Stack, fixtures_dir):
    """MinIO's removal events (delete events configured too) carry no ETag: one taken while the key
    was there again made a job with ETag "", and the put event (or the scan) then a second job of
    the same object."""
    bucket, key = f"eventbox-{time.monotonic_ns() % 10**9}", "calls/again.wav"
    settings = stack.settings(inbox_bucket=bucket)
    s3 = make_client(settings)
    ensure_buckets(s3, bucket)
    pool = await create_pool(settings)
    rows = []
    try:
        await asyncio.to_thread(s3.fput_object, bucket, key, str(fixtures_dir / "empty.wav"))
        stat = s3.stat_object(bucket, key)
        inbox = Inbox(settings, pool, s3, asyncio.Event())
        # Removed and dropped again; the removal's event comes after the new object is there.
        await inbox.on_event(BucketEvent.model_validate_json(minio_removal(bucket, key)))
        assert await pool.fetchval("SELECT count(*) FROM transcripts WHERE source_bucket = $1", bucket) == 0

        # A put event without an ETag (another store's) is the object there now: once.
        await inbox.on_event(BucketEvent.model_validate_json(minio_event(bucket, key, "", stat.size)))
        await inbox.on_event(BucketEvent.model_validate_json(minio_event(bucket, key, f'"{stat.etag}"', stat.size)))
        await inbox.reconcile()
        rows = await pool.fetch("SELECT id, source_etag FROM transcripts WHERE source_bucket = $1", bucket)
        assert [r["source_etag"] for r in rows] == [stat.etag.strip('"')]
    finally:
        await discard(stack.api, *(r["id"] for r in rows))
        await pool.execute("DELETE FROM deleted_drops WHERE source_bucket = $1", bucket)
        await pool.close()
        remove_bucket(s3, bucket)


async def test_a_drop_overwritten_before_it_is_taken_is_not_judged_by_the_newer_content(stack: Stack, fixtures_dir):
    """A small file overwritten by one over MAX_UPLOAD_MB: the small one's event was taken with the
    big one's size (not copied, so no ETag precondition ran), and a job refused as too large was
    recorded under the small one's ETag. The newer content's own event makes its job."""
    bucket, key = f"swapbox-{time.monotonic_ns() % 10**9}", "calls/weekly.flac"
    settings = stack.settings(inbox_bucket=bucket, max_upload_mb=1)
    s3 = make_client(settings)
    ensure_buckets(s3, bucket)
    pool = await create_pool(settings)
    job_ids: list[int | None] = []
    try:
        await asyncio.to_thread(s3.fput_object, bucket, key, str(fixtures_dir / "empty.wav"))
        small = s3.stat_object(bucket, key)
        await asyncio.to_thread(s3.fput_object, bucket, key, str(fixtures_dir / "jfk.flac"))  # 1.1 MB
        big = s3.stat_object(bucket, key)
        inbox = Inbox(settings, pool, s3, asyncio.Event())
        job_ids.append(await inbox.register(key, small.etag.strip('"')))
        assert job_ids == [None]
        assert await pool.fetchval("SELECT count(*) FROM transcripts WHERE source_bucket = $1", bucket) == 0

        await inbox.on_event(BucketEvent.model_validate_json(minio_event(bucket, key, f'"{big.etag}"', big.size)))
        rows = await pool.fetch("SELECT id, source_etag FROM transcripts WHERE source_bucket = $1", bucket)
        job_ids.extend(r["id"] for r in rows)
        assert [r["source_etag"] for r in rows] == [big.etag.strip('"')]
        row = await ended(pool, rows[0]["id"])
        assert row["status"] == "error" and "MAX_UPLOAD_MB (1 MB)" in row["error"], row
    finally:
        await discard(stack.api, *job_ids)
        await pool.execute("DELETE FROM deleted_drops WHERE source_bucket = $1", bucket)
        await pool.close()
        remove_bucket(s3, bucket)


async def test_a_key_with_a_line_break_is_logged_on_one_line(stack: Stack, caplog):
    """S3 takes a line break in a key, and an event's key is unquoted: logged as it was, a dropped
    object's key wrote a line of its own, as well formed as any service's (here one claiming
    another job). Keys are logged escaped, on the line they belong to."""
    import logging

    bucket = f"linebox-{time.monotonic_ns() % 10**9}"
    forged = "2026-01-01 00:00:00,000 | INFO     | services.ingest.inbox:339 | job=1 bucket drop x/y became a job"
    key = f"calls/a.wav\n{forged}"
    settings = stack.settings(inbox_bucket=bucket)
    s3 = make_client(settings)
    ensure_buckets(s3, bucket)
    pool = await create_pool(settings)
    try:
        inbox = Inbox(settings, pool, s3, asyncio.Event())
        caplog.set_level(logging.INFO, logger="services.ingest.inbox")
        # Announced, then gone before it was taken; and a removal's event.
        assert await inbox.register(key, "0123456789abcdef0123456789abcdef") is None
        await inbox.on_event(BucketEvent.model_validate_json(minio_removal(bucket, key)))
    finally:
        await pool.close()
        remove_bucket(s3, bucket)
    said = [r.getMessage() for r in caplog.records if r.name == "services.ingest.inbox"]
    assert len(said) == 2 and all("calls/a.wav\\n2026-01-01" in line for line in said), said
    assert not any("\n" in line for line in said), said
