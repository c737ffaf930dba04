"""The recording of a job that asked for redaction is never handed out, copied or retimed before
its redacted copy is written (README "Redaction"), and playback serves one version of a recording
from start to end, as what it is (README "GET /transcripts/{id}/audio"). The jobs here are made
by hand as ingest's job-end step finds them: done, with redaction still to do or done."""

from __future__ import annotations

import asyncio
import io
import json
import time
from email.utils import format_datetime

import httpx
import pytest
from minio import Minio
from minio.error import S3Error

from common.storage import pcm_key, upload_bytes
from tests.conftest import SEGMENT_WORDS


def audio(stack, job_id: int, **headers: str) -> httpx.Response:
    return httpx.get(f"{stack.api}/transcripts/{job_id}/audio", headers=headers, timeout=60)


def test_a_recording_still_to_be_redacted_is_not_served_until_it_is(stack, made_job):
    """Subscribers get transcript.completed when the job ends, before ingest has written the
    redacted copy: the upload, with what was redacted audible, is not theirs to download."""
    job_id = made_job("call.mp3", b"ID3 the upload as sent", options={"redact": ["phone"]}, due=True)
    waiting = audio(stack, job_id)
    assert waiting.status_code == 503, waiting.text
    assert waiting.headers["retry-after"].isdigit() and "being redacted" in waiting.json()["detail"]
    assert b"the upload as sent" not in waiting.content

    # Redacted words are what makes it pending too (the transcriber's REDACT), not only the option:
    # the persister marks either as the job ends (test_a_job_with_redaction_is_marked_as_it_ends).
    by_words = made_job("other.mp3", b"ID3 another upload", segment=True, due=True)
    assert audio(stack, by_words).status_code == 503

    upload_bytes(stack.s3(), stack.settings().audio_bucket, f"uploads/{job_id}", b"RIFF the redacted copy")
    stack.query("UPDATE transcripts SET audio_redacted_at = now() WHERE id = $1", job_id)
    served = audio(stack, job_id)
    assert served.status_code == 200 and served.content == b"RIFF the redacted copy"
    assert served.headers["content-type"] == "audio/wav" and "call.wav" in served.headers["content-disposition"]


def test_a_job_with_redaction_that_is_stopped_or_fails_never_serves_its_upload(stack, made_job):
    """Only a job that ends done has its recording redacted: one stopped (POST .../cancel) or
    failed keeps the upload, with what its transcript shows as [CARD] or [PHONE] audible. It is
    not served, GET nor HEAD, whether the job asked for redaction or the transcriber's REDACT
    replaced words of it; a job of neither plays as uploaded."""
    asked = made_job("call.mp3", b"ID3 the upload as sent", options={"redact": ["card"]}, status="processing")
    by_words = made_job("words.mp3", b"ID3 another upload", status="processing", segment=True)
    failed = made_job("failed.mp3", b"ID3 a third upload", options={"redact": ["phone"]}, status="processing")
    neither = made_job("plain.mp3", b"ID3 nothing to hide", status="processing")
    for job_id in (asked, by_words, neither):
        stopped = httpx.post(f"{stack.api}/transcripts/{job_id}/cancel", timeout=60)
        assert stopped.status_code == 200 and stopped.json()["error"] == "cancelled", stopped.text
    stack.query("UPDATE transcripts SET status = 'error', error = 'the transcriber failed', completed_at = now()"
                " WHERE id = $1", failed)
    for job_id, ended in ((asked, "was stopped"), (by_words, "was stopped"), (failed, "failed")):
        for method in ("GET", "HEAD"):
            refused = httpx.request(method, f"{stack.api}/transcripts/{job_id}/audio", timeout=60)
            assert refused.status_code == 409, (job_id, method, refused.status_code)
            assert b"upload" not in refused.content and "retry-after" not in refused.headers
            assert refused.headers["cache-control"] == "no-store"
        detail = audio(stack, job_id).json()["detail"]
        assert f"asked for redaction, and it {ended} before its recording was redacted" in detail, detail
        assert "being redacted" not in detail  # what the page waits out (a done job's 503)
        # Nor a piece of it.
        assert audio(stack, job_id, Range="bytes=0-3").status_code == 409
    played = audio(stack, neither)
    assert played.status_code == 200 and played.content == b"ID3 nothing to hide", played.text

    # Nor copied into a rerun that would not redact it (its playback would serve it): one with
    # `"redact": []` (or null) is refused, for good; one of `by_words` leaving `redact` out is
    # redacted by the transcriber's REDACT again, as the job was.
    newest = stack.value("SELECT max(id) FROM transcripts")
    for job_id, body in ((asked, {"redact": []}), (failed, {"redact": None}), (by_words, {"redact": []})):
        refused = httpx.post(f"{stack.api}/transcripts/{job_id}/rerun", json=body, timeout=60)
        assert refused.status_code == 409, (job_id, refused.text)
        assert "must keep redaction" in refused.json()["detail"] and "retry-after" not in refused.headers
    # Nor into one that redacts other kinds than the job asked for: it would copy the upload,
    # redact only emails at its end, and play the card number.
    for job_id, body, kinds in ((asked, {"redact": ["email"]}, "(card)"),
                                (failed, {"redact": ["card", "email"]}, "(phone)")):
        refused = httpx.post(f"{stack.api}/transcripts/{job_id}/rerun", json=body, timeout=60)
        assert refused.status_code == 409, (job_id, refused.text)
        detail = refused.json()["detail"]
        assert "must keep redaction" in detail and kinds in detail and "retry-after" not in refused.headers
    assert stack.value("SELECT count(*) FROM transcripts WHERE id > $1", newest) == 0
    # A rerun that keeps the original's `redact` (the default) or gives one with its kinds (and
    # more) goes on, and redacts.
    for job_id, body, kept in ((asked, {}, ["card"]), (failed, {"num_speakers": 2}, ["phone"]),
                               (asked, {"redact": ["card", "email"]}, ["card", "email"]),
                               (failed, {"redact": ["phone"]}, ["phone"]),
                               (by_words, {"redact": ["phone"]}, ["phone"])):
        assert _rerun_then_remove(stack, job_id, body, redact=kept).status_code == 202, job_id
    assert _rerun_then_remove(stack, by_words, {}).status_code == 202
    assert _rerun_then_remove(stack, neither, {"redact": []}).status_code == 202

    # A redacted copy stored (audio_redacted_at) is what plays, and what a rerun without `redact` copies.
    upload_bytes(stack.s3(), stack.settings().audio_bucket, f"uploads/{asked}", b"RIFF the redacted copy")
    stack.query("UPDATE transcripts SET audio_redacted_at = now() WHERE id = $1", asked)
    assert audio(stack, asked).content == b"RIFF the redacted copy"
    assert _rerun_then_remove(stack, asked, {"redact": []}).status_code == 202


def test_words_are_not_corrected_while_the_recording_is_being_redacted(stack, made_job):
    """The redacted copy silences the words' times as they are when it is written: a correction
    before it (retiming "[PHONE]." or dropping the label) would leave the number audible."""
    job_id = made_job("call.mp3", b"ID3 the upload as sent", options={"redact": ["phone"]}, segment=True, due=True)
    url = f"{stack.api}/transcripts/{job_id}/segments/0/0"
    refused = httpx.patch(url, json={"text": "call me at [PHONE], please"}, timeout=60)
    assert refused.status_code == 409, refused.text
    assert refused.headers["retry-after"].isdigit() and "being redacted" in refused.json()["detail"]
    refused = httpx.patch(url, json={"text": "call me at home"}, timeout=60)
    assert refused.status_code == 409, refused.text
    assert json.loads(stack.value("SELECT words::text FROM segments WHERE transcript_id = $1", job_id)) == SEGMENT_WORDS
    # Who said it changes no word's time.
    assert httpx.patch(url, json={"speaker": "spk_1"}, timeout=60).status_code == 200

    stack.query("UPDATE transcripts SET audio_redacted_at = now() WHERE id = $1", job_id)
    corrected = httpx.patch(url, json={"text": "call me at home"}, timeout=60)
    assert corrected.status_code == 200 and corrected.json()["text"] == "call me at home", corrected.text


def test_a_rerun_does_not_copy_a_recording_still_to_be_redacted(stack, made_job):
    """A rerun copies the stored recording: before the redaction, that is the upload, which a rerun
    with `"redact": []` would then keep and serve."""
    done = made_job("call.mp3", b"ID3 the upload as sent", options={"redact": ["phone"]}, due=True)
    running = made_job("call.mp3", b"ID3 the upload as sent", options={"redact": ["phone"]}, status="processing")
    for job_id in (done, running):
        refused = httpx.post(f"{stack.api}/transcripts/{job_id}/rerun", json={"redact": []}, timeout=60)
        assert refused.status_code == 409, refused.text
        assert refused.headers["retry-after"].isdigit() and "not redacted yet" in refused.json()["detail"]
    assert stack.value("SELECT count(*) FROM transcripts WHERE filename = 'call.mp3' AND id > $1", running) == 0


def test_playback_names_its_version_and_honours_if_range(stack, made_job):
    content = bytes(range(256)) * 40
    job_id = made_job("talk.flac", content)
    whole = audio(stack, job_id)
    assert whole.status_code == 200 and whole.content == content
    etag, modified = whole.headers["etag"], whole.headers["last-modified"]
    assert etag.startswith('"') and etag.endswith('"') and len(etag) > 2
    assert whole.headers["cache-control"] == "private, no-cache"
    assert whole.headers["x-content-type-options"] == "nosniff"
    stored = stack.s3().stat_object(stack.settings().audio_bucket, f"uploads/{job_id}")
    assert etag == f'"{stored.etag}"' and modified == format_datetime(stored.last_modified, usegmt=True)

    for validator in (etag, modified):
        part = audio(stack, job_id, Range="bytes=100-199", **{"If-Range": validator})
        assert part.status_code == 206 and part.content == content[100:200], validator
    # Another version's validator: the whole file, not a piece of this one spliced onto that one.
    for validator in ('"0123456789abcdef"', f"W/{etag}", "Thu, 01 Jan 2015 00:00:00 GMT", "not a date"):
        answer = audio(stack, job_id, Range="bytes=100-199", **{"If-Range": validator})
        assert answer.status_code == 200 and answer.content == content, validator
        assert "content-range" not in answer.headers

    # A browser checking its own copy gets "not modified", and no recording, for this version only.
    for validator in (etag, f"W/{etag}", f'"0123456789abcdef", {etag}', "*"):
        unchanged = audio(stack, job_id, **{"If-None-Match": validator})
        assert unchanged.status_code == 304 and unchanged.content == b"", validator
        assert unchanged.headers["etag"] == etag and unchanged.headers["cache-control"] == "private, no-cache"
    assert audio(stack, job_id, **{"If-None-Match": '"0123456789abcdef"'}).content == content


@pytest.mark.parametrize(("filename", "served_as"), [
    ("page.html", "application/octet-stream"), ("picture.svg", "application/octet-stream"),
    ("notes.txt", "application/octet-stream"), ("script.js", "application/octet-stream"),
    ("noname", "application/octet-stream"), ("talk.mp3", "audio/mpeg"), ("meeting.mp4", "video/mp4")])
def test_playback_serves_audio_and_video_types_only(stack, made_job, filename, served_as):
    """The type comes from the uploader's file name: one named x.html must not be a page of this
    origin, opened inline."""
    job_id = made_job(filename, b"<html><script>alert(1)</script></html>")
    answer = audio(stack, job_id)
    assert answer.status_code == 200 and answer.headers["content-type"].split(";")[0] == served_as
    assert answer.headers["x-content-type-options"] == "nosniff"


def changed_while_played(stack, made_job, size: int, change) -> tuple[int, int]:
    """A recording of `size` bytes of 1 played, and `change(its key)` done once the server has
    filled the sockets and waits: the answer must end short with only the first version's bytes.
    The job's id, and where the ingest log stood before."""
    job_id = made_job("call.mp3", b"\x01" * size)  # many pieces, past what the sockets between hold
    received = io.BytesIO()
    logged_before = len(stack.log_text("ingest"))
    with httpx.Client(timeout=60) as client, client.stream("GET", f"{stack.api}/transcripts/{job_id}/audio") as answer:
        assert answer.status_code == 200 and answer.headers["content-length"] == str(size)
        pieces = answer.iter_bytes(64 * 1024)
        received.write(next(pieces))
        time.sleep(1)  # the server has filled the sockets and waits
        change(f"uploads/{job_id}")
        with pytest.raises(httpx.HTTPError):
            for piece in pieces:
                received.write(piece)
    assert 0 < received.tell() < size and set(received.getvalue()) == {1}
    return job_id, logged_before


def test_a_recording_replaced_while_it_is_played_breaks_the_answer_off(stack, made_job):
    """Each piece is read from the version the answer began with: the recording replaced
    meanwhile (by its redacted copy) ends the answer short, never continues it with the new file."""
    size = 24 * 1024 * 1024
    job_id, logged_before = changed_while_played(stack, made_job, size, lambda key: upload_bytes(
        stack.s3(), stack.settings().audio_bucket, key, b"\x02" * size))
    # Asked again, it is the new recording, whole.
    again = audio(stack, job_id)
    assert again.status_code == 200 and again.content == b"\x02" * size
    # An answer broken off is said in a line, not an error with a traceback.
    deadline = time.monotonic() + 10
    while f"job={job_id} " not in (logged := stack.log_text("ingest")[logged_before:]):
        assert time.monotonic() < deadline, logged
        time.sleep(0.2)
    # (Other jobs' lines may come meanwhile, a bucket drop's traceback among them: only this
    # answer's are looked for.)
    assert "playback broken off" in logged, logged
    assert not any(sign in logged for sign in ("Exception in ASGI application", "RecordingChanged",
                                                "AnswerBrokenOff", "services/ingest/playback.py")), logged



def test_a_recording_removed_while_it_is_played_breaks_the_answer_off(stack, made_job):
    """The recording removed (a DELETE, retention) after the answer began: the status is sent, so
    the answer ends short, said in a line, not an error with a traceback."""
    job_id, logged_before = changed_while_played(
        stack, made_job, 24 * 1024 * 1024, lambda key: stack.s3().remove_object(stack.settings().audio_bucket, key))
    assert audio(stack, job_id).status_code == 404  # asked again: gone
    deadline = time.monotonic() + 10
    while "playback broken off" not in (logged := stack.log_text("ingest")[logged_before:]):
        assert time.monotonic() < deadline, logged
        time.sleep(0.2)
    time.sleep(1)  # a traceback would come after the line
    logged = stack.log_text("ingest")[logged_before:]
    assert f"job={job_id} " in logged and "the recording was removed meanwhile" in logged, logged
    # (Not any S3Error of the log: other tests' jobs are handled by this ingest meanwhile.)
    assert not any(sign in logged for sign in ("Exception in ASGI application", "AnswerBrokenOff",
                                                "services/ingest/playback.py")), logged


async def test_a_store_gone_while_a_recording_is_played_breaks_the_answer_off(stack, made_job, caplog):
    """The object store unreachable between two pieces of an answer (its status sent): the body
    ends short with a line saying why (AnswerBrokenOff), no connection error out of it."""
    import logging
    from types import SimpleNamespace

    from common.storage import make_client
    from devstack import free_port
    from services.ingest.playback import AnswerBrokenOff, _pieces

    job_id = made_job("call.mp3", b"\x01" * 4096)
    etag = stack.s3().stat_object(stack.settings().audio_bucket, f"uploads/{job_id}").etag
    gone = stack.settings(minio_endpoint=f"127.0.0.1:{free_port()}")  # nothing listens there
    state = SimpleNamespace(s3=make_client(gone, timeout_s=5), settings=gone)
    caplog.set_level(logging.INFO, logger="services.ingest.playback")
    body = _pieces(state, job_id, f"uploads/{job_id}", etag, b"\x01" * 1024, 0, 4095)
    assert await anext(body) == b"\x01" * 1024
    with pytest.raises(AnswerBrokenOff):
        await anext(body)
    said = [r.getMessage() for r in caplog.records if r.name == "services.ingest.playback"]
    assert said == ["playback broken off at byte 1024: the object store could not be reached (MaxRetryError)"], said


def test_a_range_or_if_range_past_what_can_be_read_is_ignored(stack, made_job):
    """A Range with a number of more digits than int() reads, an If-Range with a year past what a
    date holds: ignored (RFC 9110 lets a server), the whole recording, not a 500."""
    content = bytes(range(256)) * 4
    job_id = made_job("talk.flac", content)
    for headers in ({"Range": "bytes=" + "1" * 5000 + "-"}, {"Range": "bytes=0-" + "9" * 5000},
                    {"Range": "bytes=-" + "9" * 5000},
                    {"Range": "bytes=0-9", "If-Range": "Mon, 01 Jan 99999999999 00:00:00 GMT"}):
        answer = audio(stack, job_id, **headers)
        assert answer.status_code == 200 and answer.content == content, (answer.status_code, answer.text[:200])
        assert "content-range" not in answer.headers

async def test_the_redacted_copy_of_a_job_gone_meanwhile_is_removed_without_holding_its_lock(stack, made_job):
    """Retention removes the recording while its redacted copy is written: the copy is removed
    too, by a store call made after the transaction that locks the job (a store that does not
    answer must not hold the lock, and every request waiting on it)."""
    import asyncpg
    import numpy as np

    from common.db import create_pool
    from services.ingest.redacted_audio import redact_recording

    settings = stack.settings()
    bucket = settings.audio_bucket
    job_id = made_job("call.mp3", b"ID3 the upload as sent", options={"redact": ["phone"]}, segment=True,
                      due=True)
    upload_bytes(stack.s3(), bucket, pcm_key(job_id), np.full(5 * 16000, 1000, dtype="<i2").tobytes())
    lock_free: list[bool] = []

    class Store(Minio):  # the real store; the test only acts and looks between two calls
        def put_object(self, bucket_name, object_name, *args, **kwargs):
            result = super().put_object(bucket_name, object_name, *args, **kwargs)
            if object_name == f"uploads/{job_id}":  # retention, meanwhile
                stack.query("UPDATE transcripts SET audio_removed_at = now() WHERE id = $1", job_id)
            return result

        def remove_object(self, bucket_name, object_name, *args, **kwargs):
            async def free() -> bool:
                conn = await asyncpg.connect(stack.database_url)
                try:
                    await conn.execute("SET lock_timeout = '1s'")
                    async with conn.transaction():
                        await conn.fetchval("SELECT id FROM transcripts WHERE id = $1 FOR UPDATE", job_id)
                    return True
                except asyncpg.exceptions.LockNotAvailableError:
                    return False
                finally:
                    await conn.close()
            lock_free.append(asyncio.run(free()))
            return super().remove_object(bucket_name, object_name, *args, **kwargs)

    store = Store(settings.minio_endpoint, access_key=settings.minio_access_key,
                  secret_key=settings.minio_secret_key.get_secret_value(), secure=settings.minio_secure,
                  region=settings.minio_region)
    pool = await create_pool(settings)
    try:
        await redact_recording(pool, store, bucket, job_id)
    finally:
        await pool.close()
    assert lock_free == [True]
    with pytest.raises(S3Error):  # the redacted copy did not outlive the removal
        stack.s3().stat_object(bucket, f"uploads/{job_id}")
    assert stack.value("SELECT audio_redacted_at FROM transcripts WHERE id = $1", job_id) is None


async def test_a_redacted_copy_left_by_a_stopped_run_is_removed_when_the_job_end_is_retried(stack, made_job):
    """Retention removed the recording (and marked its objects removed) while a redaction wrote its
    copy; ingest stopped before removing that copy. The retried job-end message is the only step
    that looks again: the copy must not stay stored while playback answers 410."""
    from common.db import create_pool
    from common.messages import TranscriptCompleted
    from services.ingest.inbox import Inbox

    settings = stack.settings()
    bucket = settings.audio_bucket
    job_id = made_job("call.mp3", b"ID3 the upload as sent", options={"redact": ["phone"]}, segment=True,
                      due=True)
    stack.query("UPDATE transcripts SET audio_removed_at = now(), audio_objects_removed_at = now() WHERE id = $1",
                job_id)
    upload_bytes(stack.s3(), bucket, f"uploads/{job_id}", b"RIFF the redacted copy")  # landed after the removal
    ended = TranscriptCompleted(job_id=job_id, transcript_id=job_id, filename="call.mp3", segment_count=1)
    pool = await create_pool(settings)
    try:
        await Inbox(settings, pool, stack.s3(), asyncio.Event()).on_job_ended(ended)  # the retry
    finally:
        await pool.close()
    with pytest.raises(S3Error):
        stack.s3().stat_object(bucket, f"uploads/{job_id}")
    assert audio(stack, job_id).status_code == 410


async def test_a_job_with_redaction_is_marked_as_it_ends(stack, made_job):
    """The persister marks a job's recording as still to be redacted in the transaction that ends
    the job: when the job asked for redaction, or the transcriber replaced words of it (REDACT).
    Read then, once: what a request later holds back is that mark, never a look at the words."""
    import asyncpg

    from common import jobstore

    asked = made_job("asked.mp3", b"ID3 one", options={"redact": ["phone"]}, status="processing")
    by_words = made_job("by-words.mp3", b"ID3 two", status="processing", segment=True)
    neither = made_job("neither.mp3", b"ID3 three", status="processing")
    conn = await asyncpg.connect(stack.database_url)
    try:
        ending = conn.transaction()  # rolled back: no transcript.completed, no usage line
        await ending.start()
        try:
            for job_id in (asked, by_words, neither):
                await jobstore.mark_done(conn, job_id)
            due = dict(await conn.fetch("SELECT id, audio_redaction_due FROM transcripts WHERE id = ANY($1::bigint[])",
                                        [asked, by_words, neither]))
        finally:
            await ending.rollback()
    finally:
        await conn.close()
    assert due == {asked: True, by_words: True, neither: False}


def _rerun_then_remove(stack, job_id: int, body: dict | None = None,
                       redact: list[str] | None = None) -> httpx.Response:
    """POST /transcripts/{job_id}/rerun with `body` ({}); the job it made, if any, cancelled and
    deleted, once its `redact` option is checked to be `redact` (when given)."""
    answer = httpx.post(f"{stack.api}/transcripts/{job_id}/rerun", json=body or {}, timeout=60)
    if answer.status_code == 202:
        new_id = answer.json()["id"]
        if redact is not None:
            assert json.loads(stack.value("SELECT (options->'redact')::text FROM transcripts WHERE id = $1",
                                          new_id)) == redact
        httpx.post(f"{stack.api}/transcripts/{new_id}/cancel", timeout=30)
        stack.wait_finished(new_id, timeout=120)
        httpx.delete(f"{stack.api}/transcripts/{new_id}", timeout=30)
    return answer


def test_a_label_typed_by_hand_holds_nothing_back(stack, made_job):
    """A job that had no redaction, whose words a user corrected to "call me at [PHONE]", has
    nothing to redact: its recording plays, its words can be corrected again and it can be rerun
    (they were held back for good: no redaction ever comes). So does a job that ended before
    jobs were marked for redaction (asked for it, never marked: its decoded audio is long gone)."""
    typed = made_job("call.mp3", b"ID3 the upload as sent", segment=True)  # the words as a correction left them
    older = made_job("older.mp3", b"ID3 an older upload", options={"redact": ["phone"]}, segment=True)
    for job_id, content in ((typed, b"ID3 the upload as sent"), (older, b"ID3 an older upload")):
        played = audio(stack, job_id)
        assert played.status_code == 200 and played.content == content, played.text
        corrected = httpx.patch(f"{stack.api}/transcripts/{job_id}/segments/0/0",
                                json={"text": "call me at [PHONE] tomorrow"}, timeout=60)
        assert corrected.status_code == 200, corrected.text
        rerun = _rerun_then_remove(stack, job_id)
        assert rerun.status_code == 202, rerun.text


async def test_a_recording_whose_decoded_audio_is_gone_stays_as_uploaded_and_is_served(stack, made_job, caplog):
    """Redaction is made from the decoded audio: with it gone (removed after a crash, say), the
    recording can never be redacted. The job is not held back as "being redacted" for ever: it
    plays as uploaded, its words can be corrected, and a warning names the job."""
    import logging

    from common.db import create_pool
    from services.ingest.redacted_audio import redact_recording

    settings = stack.settings()
    job_id = made_job("call.mp3", b"ID3 the upload as sent", options={"redact": ["phone"]}, segment=True,
                      due=True)
    assert audio(stack, job_id).status_code == 503
    caplog.set_level(logging.WARNING, logger="services.ingest.redacted_audio")
    pool = await create_pool(settings)
    try:
        await redact_recording(pool, stack.s3(), settings.audio_bucket, job_id)  # no pcm/{id} stored
    finally:
        await pool.close()
    assert stack.value("SELECT audio_redacted_at FROM transcripts WHERE id = $1", job_id) is None
    played = audio(stack, job_id)
    assert played.status_code == 200 and played.content == b"ID3 the upload as sent", played.text
    corrected = httpx.patch(f"{stack.api}/transcripts/{job_id}/segments/0/0", json={"text": "call me at home"},
                            timeout=60)
    assert corrected.status_code == 200, corrected.text
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("stays as uploaded" in line for line in warned), warned  # stamped job=N in the service's log


async def test_a_label_typed_by_hand_before_the_job_end_step_is_not_redacted(stack, made_job):
    """The job-end step follows the mark, not the words: a job without redaction whose words a
    user corrected to "call me at [PHONE]" before ingest handled its end (behind other jobs, or an
    outage) keeps its recording as uploaded, not a 16 kHz WAV with the typed label silent."""
    from common.db import create_pool
    from common.messages import TranscriptCompleted
    from services.ingest.inbox import Inbox

    settings = stack.settings()
    content = b"\x00\x00\x00\x18ftypmp42 the video as uploaded"
    job_id = made_job("meeting.mp4", content, segment=True)  # done, not due, no redact option
    upload_bytes(stack.s3(), settings.audio_bucket, pcm_key(job_id), b"\xe8\x03" * 5 * 16000)  # still stored
    corrected = httpx.patch(f"{stack.api}/transcripts/{job_id}/segments/0/0",
                            json={"text": "call me at [PHONE] tomorrow"}, timeout=60)
    assert corrected.status_code == 200, corrected.text
    ended = TranscriptCompleted(job_id=job_id, transcript_id=job_id, filename="meeting.mp4", segment_count=1)
    pool = await create_pool(settings)
    try:
        await Inbox(settings, pool, stack.s3(), asyncio.Event()).on_job_ended(ended)
    finally:
        await pool.close()
    assert stack.value("SELECT audio_redacted_at FROM transcripts WHERE id = $1", job_id) is None
    played = audio(stack, job_id)
    assert played.status_code == 200 and played.content == content, played.text[:200]
    assert played.headers["content-type"].split(";")[0] == "video/mp4"


async def test_a_job_marked_for_the_transcribers_redact_alone_is_redacted_as_it_ends(stack, made_job):
    """No `redact` option, words the transcriber's REDACT replaced: the persister marked it as it
    ended (test_a_job_with_redaction_is_marked_as_it_ends), and the mark is what the job-end step
    follows: its recording is the WAV with those words silent."""
    import wave

    import numpy as np

    from common.db import create_pool
    from services.ingest.redacted_audio import MARGIN_S, redact_recording

    settings = stack.settings()
    job_id = made_job("call.mp3", b"ID3 the upload as sent", segment=True, due=True)
    upload_bytes(stack.s3(), settings.audio_bucket, pcm_key(job_id), np.full(5 * 16000, 1000, dtype="<i2").tobytes())
    pool = await create_pool(settings)
    try:
        await redact_recording(pool, stack.s3(), settings.audio_bucket, job_id)
    finally:
        await pool.close()
    assert stack.value("SELECT audio_redacted_at IS NOT NULL AND NOT audio_redaction_due FROM transcripts"
                       " WHERE id = $1", job_id)
    with wave.open(io.BytesIO(stack.s3().get_object(settings.audio_bucket, f"uploads/{job_id}").read())) as stored:
        frames = np.frombuffer(stored.readframes(stored.getnframes()), dtype="<i2")
    start, end = SEGMENT_WORDS[-1]["start"], SEGMENT_WORDS[-1]["end"]  # " [PHONE]."
    assert (frames[round((start - MARGIN_S) * 16000):round((end + MARGIN_S) * 16000)] == 0).all()
    assert (frames[:round((start - MARGIN_S) * 16000)] == 1000).all()
