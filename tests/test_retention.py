"""Retention (README "Retention") on the shared stack: a second ingest with retention on sweeps
once at start-up. Its days are real days, so only the jobs made here, their ends moved back in
time, are due: one ended 10 days ago loses its recording and keeps its transcript; one ended 40
days ago (a bucket drop) is deleted with its result files, and the drop is not run again; one
ended 50 days ago whose result files the store refuses to remove is passed over, not a stop; a
recording an earlier sweep marked removed but left stored is removed."""

from __future__ import annotations

import time

import httpx

from common.storage import ensure_buckets, make_client
from tests.conftest import another_ingest


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.3)


def stored(s3, bucket: str, key: str) -> bool:
    try:
        s3.stat_object(bucket, key)
    except Exception:
        return False
    return True


def test_the_recording_goes_first_then_the_whole_job(stack, fixtures_dir, made_job):
    settings = stack.settings()
    s3 = make_client(settings)
    ensure_buckets(s3, settings.inbox_bucket)
    key = f"retention/weekly-{time.monotonic_ns()}.flac"
    s3.fput_object(settings.inbox_bucket, key, str(fixtures_dir / "jfk.flac"))
    job_id = stack.submit_job(fixtures_dir / "jfk.flac")
    assert stack.wait_finished(job_id)["status"] == "done"
    wait_for(lambda: stack.query("SELECT id FROM transcripts WHERE source_key = $1", key), 60, "no drop job")
    [drop] = stack.query("SELECT id FROM transcripts WHERE source_key = $1", key)
    assert stack.wait_finished(drop["id"])["status"] == "done"
    wait_for(lambda: stored(s3, settings.inbox_bucket, f"results/{key}.json"), 60, "no drop result")
    stack.query("UPDATE transcripts SET completed_at = now() - make_interval(days => $2) WHERE id = $1", job_id, 10)
    stack.query("UPDATE transcripts SET completed_at = now() - make_interval(days => $2) WHERE id = $1",
                drop["id"], 40)
    # A drop whose results cannot be removed (its bucket's name is not one S3 accepts): the oldest
    # due, so the sweep meets it first.
    stuck = stack.submit_job(fixtures_dir / "jfk.flac")
    assert stack.wait_finished(stuck)["status"] == "done"
    stack.query("UPDATE transcripts SET source = 'bucket', source_bucket = 'Not A Bucket', source_key = 'x.flac',"
                " source_etag = 'e', completed_at = now() - make_interval(days => 50) WHERE id = $1", stuck)
    # A job whose recording an earlier sweep marked removed, and stopped (killed, or the store
    # refused) before removing it.
    halfway = stack.submit_job(fixtures_dir / "jfk.flac")
    assert stack.wait_finished(halfway)["status"] == "done"
    stack.query("UPDATE transcripts SET completed_at = now() - make_interval(days => 9),"
                " audio_removed_at = now() - make_interval(days => 1) WHERE id = $1", halfway)
    # One not due yet (ended 6 days ago): kept whole, so "nothing else was due" is never about no job.
    not_due = made_job("recent.flac", (fixtures_dir / "jfk.flac").read_bytes())
    stack.query("UPDATE transcripts SET completed_at = now() - make_interval(days => 6) WHERE id = $1", not_due)
    try:
        # Every other job of the stack, and whether its recording is stored (of the ended ones: a
        # job still running may yet store or remove its own).
        others = {r["id"]: r["status"] != "processing" and stored(s3, settings.audio_bucket, f"uploads/{r['id']}")
                  for r in stack.query("SELECT id, status FROM transcripts WHERE id <> ALL($1::bigint[])",
                                       [job_id, drop["id"], stuck, halfway])}
        assert others[not_due] is True
        # (Other tests leave jobs whose recording was marked removed before.)
        removed_before = [r["id"] for r in stack.query("SELECT id FROM transcripts WHERE audio_removed_at IS NOT NULL")]

        with another_ingest(stack, "ingest-retention", AUDIO_RETENTION_DAYS="7", TRANSCRIPT_RETENTION_DAYS="30") as api:
            # One byte is enough to tell, and a whole download could race the removal.
            wait_for(lambda: httpx.get(f"{api}/transcripts/{job_id}/audio", headers={"Range": "bytes=0-0"},
                                       timeout=30).status_code == 410, 30, "the recording was never removed")
            wait_for(lambda: httpx.get(f"{api}/status/{drop['id']}", timeout=30).status_code == 404, 30,
                     "the old job was never deleted")
            wait_for(lambda: not stored(s3, settings.audio_bucket, f"uploads/{halfway}"), 30,
                     "a recording marked removed by a sweep that stopped halfway stays stored")

        # The recording is gone, its transcript stays.
        gone = httpx.get(f"{stack.api}/transcripts/{job_id}/audio", timeout=30)
        assert gone.status_code == 410 and "AUDIO_RETENTION_DAYS" in gone.json()["detail"]
        assert not stored(s3, settings.audio_bucket, f"uploads/{job_id}")
        document = httpx.get(f"{stack.api}/transcripts/{job_id}", timeout=30).json()
        assert "ask not what your country" in " ".join(s["text"] for s in document["segments"]).lower()
        assert httpx.post(f"{stack.api}/transcripts/{job_id}/rerun", json={}, timeout=30).status_code == 409

        # The job ended 40 days ago is deleted, its results with it; the user's own object stays.
        assert not stored(s3, settings.inbox_bucket, f"results/{key}.json")
        assert stored(s3, settings.inbox_bucket, key)
        time.sleep(3 * float(settings.inbox_scan_interval_s) + 1)
        assert stack.query("SELECT id FROM transcripts WHERE source_key = $1", key) == []  # not run again
        # Nothing else was due: every other job of the stack keeps its transcript and its recording.
        kept = {r["id"] for r in stack.query("SELECT id FROM transcripts WHERE id = ANY($1::bigint[])", list(others))}
        assert kept == set(others), sorted(set(others) - kept)
        removed = [i for i, had in others.items() if had and not stored(s3, settings.audio_bucket, f"uploads/{i}")]
        assert removed == [], removed
        assert stack.value("SELECT count(*) FROM transcripts WHERE audio_removed_at IS NOT NULL"
                           " AND id NOT IN ($1, $2, $3) AND id <> ALL($4::bigint[])",
                           job_id, stuck, halfway, removed_before) == 0
        # The job that could not be deleted was passed over, and the recordings' retention still ran for it.
        assert stack.value("SELECT audio_removed_at IS NOT NULL FROM transcripts WHERE id = $1", stuck) is True
    finally:
        stack.query("UPDATE transcripts SET source = 'upload', source_bucket = NULL, source_key = NULL,"
                    " source_etag = NULL WHERE id = $1", stuck)
        assert httpx.delete(f"{stack.api}/transcripts/{stuck}", timeout=30).status_code == 204
        assert httpx.delete(f"{stack.api}/transcripts/{halfway}", timeout=30).status_code == 204
