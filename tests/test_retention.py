"""Retention on the real stack (README "Retention"): a job's recording is removed
AUDIO_RETENTION_DAYS after it ended and the transcript kept; the whole job goes
TRANSCRIPT_RETENTION_DAYS after, a bucket drop's results with it, and the drop is not run again.
The days are scaled down to seconds here."""

from __future__ import annotations

import time

import httpx
import pytest

from common.storage import ensure_buckets, make_client
from tests.conftest import running_stack

AUDIO_KEPT_S, TRANSCRIPT_KEPT_S = 8, 25


@pytest.fixture(scope="module")
def forgetful(tmp_path_factory, fixtures_dir):
    with running_stack(tmp_path_factory, AUDIO_RETENTION_DAYS=str(AUDIO_KEPT_S / 86400),
                       TRANSCRIPT_RETENTION_DAYS=str(TRANSCRIPT_KEPT_S / 86400)) as stack:
        yield stack


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


def stored(s3, bucket: str, key: str) -> bool:
    try:
        s3.stat_object(bucket, key)
    except Exception:
        return False
    return True


def test_the_recording_goes_first_then_the_whole_job(forgetful, fixtures_dir):
    stack = forgetful
    settings = stack.settings()
    s3 = make_client(settings)
    ensure_buckets(s3, settings.inbox_bucket)
    s3.fput_object(settings.inbox_bucket, "weekly.flac", str(fixtures_dir / "jfk.flac"))
    job_id = stack.submit_job(fixtures_dir / "jfk.flac")
    assert stack.wait_finished(job_id)["status"] == "done"
    assert httpx.get(f"{stack.api}/transcripts/{job_id}/audio", timeout=30).status_code == 200
    wait_for(lambda: stack.query("SELECT id FROM transcripts WHERE source_key = 'weekly.flac'"), 60, "no drop job")
    [drop] = stack.query("SELECT id FROM transcripts WHERE source_key = 'weekly.flac'")
    assert stack.wait_finished(drop["id"])["status"] == "done"
    wait_for(lambda: stored(s3, settings.inbox_bucket, "results/weekly.flac.json"), 60, "no drop result")

    # The recording is removed once it has been kept AUDIO_RETENTION_DAYS; the transcript stays.
    wait_for(lambda: httpx.get(f"{stack.api}/transcripts/{job_id}/audio", timeout=30).status_code == 410,
             AUDIO_KEPT_S + 30, "the recording was never removed")
    [kept] = stack.query("SELECT extract(epoch FROM audio_removed_at - completed_at) AS s FROM transcripts"
                         " WHERE id = $1", job_id)
    assert AUDIO_KEPT_S <= kept["s"] < TRANSCRIPT_KEPT_S
    assert "AUDIO_RETENTION_DAYS" in httpx.get(f"{stack.api}/transcripts/{job_id}/audio", timeout=30).json()["detail"]
    assert not stored(s3, settings.audio_bucket, f"uploads/{job_id}")
    document = httpx.get(f"{stack.api}/transcripts/{job_id}", timeout=30).json()
    assert "ask not what your country" in " ".join(s["text"] for s in document["segments"]).lower()
    assert httpx.post(f"{stack.api}/transcripts/{job_id}/rerun", json={}, timeout=30).status_code == 409

    # Then the whole job, TRANSCRIPT_RETENTION_DAYS after it ended: the drop's results with it.
    wait_for(lambda: httpx.get(f"{stack.api}/status/{job_id}", timeout=30).status_code == 404,
             TRANSCRIPT_KEPT_S + 30, "the job was never deleted")
    wait_for(lambda: httpx.get(f"{stack.api}/status/{drop['id']}", timeout=30).status_code == 404,
             30, "the drop's job was never deleted")
    assert not stored(s3, settings.inbox_bucket, "results/weekly.flac.json")
    assert stored(s3, settings.inbox_bucket, "weekly.flac")  # the user's own object stays
    time.sleep(3 * float(settings.inbox_scan_interval_s) + 1)
    assert stack.query("SELECT id FROM transcripts WHERE source_key = 'weekly.flac'") == []  # not run again
    listed = httpx.get(f"{stack.api}/transcripts", timeout=30).json()["items"]
    assert listed == []
