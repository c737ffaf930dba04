"""Cancelling a job (POST /transcripts/{id}/cancel) on the real stack: it ends at once, and every
stage stops working on it. Chunks are small here (20 s of speech) so a 5-minute meeting has
enough of them to see the transcriber stop."""

from __future__ import annotations

import asyncio
import json
import re
import time
from datetime import datetime

import aio_pika
import httpx
import numpy as np
import pytest

from common.audio import decode_audio
from common.storage import object_exists, pcm_key
from tests.audio_files import encode
from tests.conftest import events_queue, job_events, record_figure, running_stack, wait_settled


@pytest.fixture(scope="module")
def small_chunks(tmp_path_factory, fixtures_dir):
    with running_stack(tmp_path_factory, CHUNK_MAX_SPEECH_S="20", MAX_AUDIO_HOURS="1") as stack:
        yield stack


@pytest.fixture(scope="module")
def meeting(fixtures_dir, tmp_path_factory):
    """About 5 minutes of talk, 12 chunks or so."""
    parts = [decode_audio(str(fixtures_dir / n)) for n in
             ("sample.wav", "ami_dev00.wav", "ami_dev01.wav", "ru_dialogue.wav", "en_dialogue.wav")]
    path = tmp_path_factory.mktemp("cancel") / "meeting.opus"
    path.write_bytes(encode(np.concatenate(parts * 2), "ogg", "libopus", 48_000, channels=1, bit_rate=24_000))
    return path


def log_count(stack, service: str, pattern: str) -> int:
    return len(re.findall(pattern, stack.log_text(service)))


def skipped(stack, stage: str) -> float:
    """Messages of `stage` acked because their job had ended (its metrics): unworked, or worked
    on with what they produced not sent on (`dropped`)."""
    lines = httpx.get(stack.metrics_url(stage), timeout=10).text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("stt_messages_total{")
               and 'outcome="skipped"' in line and f'stage="{stage}"' in line)


def diarizing_s(stack, job_id: int) -> float:
    """Seconds from a job's file decoded to its chunks planned, by the diarizer's log (0: not both)."""
    def at(pattern: str) -> list[datetime]:
        return [datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
                for line in stack.log_text("diarizer").splitlines() if re.search(pattern, line)]

    decoded, planned = at(rf"job={job_id} decoded"), at(rf"job={job_id} \d+ turns, ")
    return (planned[0] - decoded[0]).total_seconds() if decoded and planned else 0.0


def pcm_exists(stack, job_id: int) -> bool:
    return object_exists(stack.s3(), stack.settings().audio_bucket, pcm_key(job_id))


def dropped(stack, job_id: int) -> int:
    """Chunks the transcriber worked on whose text it did not send on: the job ended meanwhile."""
    return log_count(stack, "transcriber", rf"job {job_id} has ended .*it produced is not published")


def test_cancelling_while_transcribing_stops_every_stage_and_keeps_what_was_stored(small_chunks, meeting):
    stack = small_chunks
    job_id = stack.submit_job(meeting)

    async def cancel_and_hear_it() -> tuple[httpx.Response, int, int, list[dict]]:
        """The cancel's answer, the chunks started before it, the job's chunk count, and every
        transcript.failed of the job heard until what was in hand then has reached the persister."""
        connection = await aio_pika.connect_robust(stack.amqp_url)
        async with connection:
            channel = await connection.channel()
            queue = await events_queue(channel, "transcript.failed")
            deadline = time.monotonic() + 240
            while stack.status(job_id)["percent"] == 0:  # the first chunk is stored
                assert time.monotonic() < deadline, stack.log_tail("transcriber")
                await asyncio.sleep(0.2)
            assert pcm_exists(stack, job_id), "the chunks still to transcribe read the decoded audio"
            answer = httpx.post(f"{stack.api}/transcripts/{job_id}/cancel", timeout=30)
            transcribed_then = log_count(stack, "transcriber", rf"job={job_id} transcribing chunk")
            failed = await job_events(queue, job_id, lambda bodies: bodies, timeout=30)
            [job] = stack.query("SELECT chunk_count FROM transcripts WHERE id = $1", job_id)
            chunk_count = job["chunk_count"]
            # Every chunk message is settled one way or the other: worked on, or skipped unworked.
            deadline = time.monotonic() + 120
            while log_count(stack, "transcriber", rf"job={job_id} transcribing chunk") \
                    + skipped(stack, "transcriber") - dropped(stack, job_id) < chunk_count:
                assert time.monotonic() < deadline, stack.log_tail("transcriber")
                await asyncio.sleep(0.5)
            # What was in hand reaches the persister, which stores none of it, and does not announce
            # the cancel again: the stages working then heard it.
            heard_until = time.monotonic() + 8
            failed += await job_events(queue, job_id, lambda _: time.monotonic() > heard_until, timeout=30)
            return answer, transcribed_then, chunk_count, failed

    answer, transcribed_then, chunk_count, failed = asyncio.run(cancel_and_hear_it())
    assert answer.status_code == 200, answer.text
    document = answer.json()
    assert document["status"] == "error" and document["error"] == "cancelled"
    assert document["segments"], "what was stored before the cancel is kept"
    assert [body["reason"] for body in failed] == ["cancelled"], failed
    assert stack.status(job_id) == document

    assert chunk_count >= 8
    transcribed = log_count(stack, "transcriber", rf"job={job_id} transcribing chunk")
    record_figure(f"{'cancel while transcribing':<34} {chunk_count} chunks: {transcribed_then} started before the"
                  f" cancel, {transcribed - transcribed_then} after, {skipped(stack, 'transcriber'):.0f} skipped")
    # At most the chunk in hand, and one taken before the news arrived, after the cancel; what
    # they made after hearing it is not sent on.
    assert transcribed <= transcribed_then + 2 < chunk_count
    assert dropped(stack, job_id) <= transcribed - transcribed_then + 1
    assert skipped(stack, "transcriber") == chunk_count - transcribed + dropped(stack, job_id)
    assert stack.status(job_id)["segments"] == document["segments"]

    assert httpx.post(f"{stack.api}/transcripts/{job_id}/cancel", timeout=30).status_code == 409
    assert httpx.delete(f"{stack.api}/transcripts/{job_id}", timeout=30).status_code == 204
    assert not pcm_exists(stack, job_id)
    assert httpx.post(f"{stack.api}/transcripts/{job_id}/cancel", timeout=30).status_code == 404


def test_cancelling_while_diarizing_sends_no_chunk_and_leaves_no_audio(small_chunks, meeting):
    stack = small_chunks

    async def cancel_and_delete() -> tuple[int, list[dict]]:
        """The job, and every chunk message of it sent for the transcriber, or by it, until the
        diarizer is done with it."""
        connection = await aio_pika.connect(stack.amqp_url)
        async with connection:
            channel = await connection.channel()
            chunks = await channel.declare_queue(exclusive=True)
            for routing_key in ("job.diarized", "chunk.transcribed"):
                await chunks.bind(await channel.get_exchange("stt"), routing_key)
            job_id = stack.submit_job(meeting)
            answer = httpx.post(f"{stack.api}/transcripts/{job_id}/cancel", timeout=30)
            assert answer.status_code == 200, answer.text
            assert answer.json()["segments"] == [] and answer.json()["error"] == "cancelled"
            # Deleted at once, while the diarizer may still be decoding or diarizing the file.
            assert httpx.delete(f"{stack.api}/transcripts/{job_id}", timeout=30).status_code == 204
            deadline = time.monotonic() + 120
            while not re.search(rf"job={job_id} .*the job has ended", stack.log_text("diarizer")):
                assert time.monotonic() < deadline, stack.log_tail("diarizer")
                await asyncio.sleep(0.3)
            # Its delivery acked (what it sends goes before), and anything sent on taken and acked;
            # a diarizer that went on after noting the end would take minutes to send its chunks.
            await wait_settled(stack, ["stt.diarizer", "stt.transcriber"], timeout=300)
            sent = []
            while (message := await chunks.get(fail=False)) is not None:
                await message.ack()
                sent.append(json.loads(message.body))
            return job_id, [body for body in sent if body.get("job_id") == job_id]

    job_id, sent = asyncio.run(cancel_and_delete())
    assert sent == []
    assert f"job={job_id} " not in stack.log_text("transcriber")
    assert not pcm_exists(stack, job_id)  # the PCM it may have stored after the delete is removed
    assert stack.query("SELECT 1 FROM transcripts WHERE id = $1", job_id) == []


def test_cancelling_a_long_diarization_stops_it_within_a_batch_of_windows(small_chunks, meeting):
    """The diarizer holds one message for a whole file (minutes on a long recording): it asks
    between batches of windows whether the job has ended, so a cancel does not wait for the
    whole file. Measured against the same file diarized in full earlier in this module."""
    stack = small_chunks
    job_id = stack.submit_job(meeting)
    deadline = time.monotonic() + 120
    while not stack.log_times("diarizer", f"job={job_id} decoded"):
        assert time.monotonic() < deadline, stack.log_tail("diarizer")
        time.sleep(0.05)
    cancelled_at = time.monotonic()
    assert httpx.post(f"{stack.api}/transcripts/{job_id}/cancel", timeout=30).status_code == 200
    while not stack.log_times("diarizer", f"job={job_id} the job has ended"):
        assert time.monotonic() < deadline, stack.log_tail("diarizer")
        time.sleep(0.05)
    stopped_after = time.monotonic() - cancelled_at
    # The same file diarized in full: by the first test of this module, or (run alone) now.
    whole_s = max([diarizing_s(stack, other) for other in range(1, job_id)], default=0.0)
    if not whole_s:
        whole = stack.submit_job(meeting)
        stack.wait_finished(whole, 600)
        whole_s = diarizing_s(stack, whole)
        assert whole_s > 0, stack.log_tail("diarizer")
    record_figure(f"{'cancel while diarizing':<34} stopped {stopped_after:.1f} s after the cancel; the whole file"
                  f" took {whole_s:.1f} s")
    assert stopped_after < whole_s / 2
    assert f"job={job_id} " not in stack.log_text("transcriber")
    assert not pcm_exists(stack, job_id)


def test_a_job_that_has_ended_cannot_be_cancelled(small_chunks, fixtures_dir):
    stack = small_chunks
    job_id = stack.submit_job(fixtures_dir / "jfk.flac")
    assert stack.wait_finished(job_id)["status"] == "done"
    answer = httpx.post(f"{stack.api}/transcripts/{job_id}/cancel", timeout=30)
    assert answer.status_code == 409 and "already ended (done)" in answer.json()["detail"]
    assert stack.status(job_id)["status"] == "done"
    assert httpx.post(f"{stack.api}/transcripts/999999/cancel", timeout=30).status_code == 404


def test_another_keys_cancel_is_refused_at_once_while_the_job_is_held(stack, made_job):
    """While a request of the owner's holds the job, another key is told at once that there is no
    such job: an answer only once the owner's request is done would say that it exists."""
    from litestar.testing import TestClient

    from services.ingest.app import create_app
    from services.ingest.auth import owner_of
    from tests.test_transcripts import held

    alice, bob = "key-alice-cancel", "key-bob-cancel"
    job_id = made_job("held.wav", b"RIFF", status="processing")
    stack.query("UPDATE transcripts SET owner = $2 WHERE id = $1", job_id, owner_of(alice))
    with TestClient(create_app(stack.settings(api_keys=f"{alice},{bob}")), timeout=60) as api:
        with held(stack.database_url, "SELECT id FROM transcripts WHERE id = $1 FOR UPDATE", job_id):
            started = time.monotonic()
            answer = api.post(f"/transcripts/{job_id}/cancel", headers={"X-API-Key": bob})
            assert answer.status_code == 404 and time.monotonic() - started < 4, answer.text
        assert stack.value("SELECT status FROM transcripts WHERE id = $1", job_id) == "processing"
        cancelled = api.post(f"/transcripts/{job_id}/cancel", headers={"X-API-Key": alice})
        assert cancelled.status_code == 200 and cancelled.json()["error"] == "cancelled", cancelled.text
