"""Bucket drops announced by MinIO's AMQP notifications. moto sends no bucket events, so this
drives ingest's event handler with the exact document MinIO publishes, on a bucket the running
ingest does not scan: only the event path can make the job."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse

from common.db import create_pool
from common.storage import ensure_buckets, make_client
from services.ingest.inbox import BucketEvent, Inbox
from tests.conftest import Stack


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
        await inbox.on_event(event, None)
        await inbox.on_event(event, None)  # MinIO may deliver an event twice
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
