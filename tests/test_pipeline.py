"""End to end through HTTP, the real services, broker, database, S3 protocol and models."""

from __future__ import annotations

import asyncio
import json
import re
import time

import aio_pika
import asyncpg
import httpx
import pytest

from tests.conftest import Stack, events_queue


def normalised(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


@pytest.fixture(scope="module")
def finished(stack: Stack, fixtures_dir) -> dict[str, dict]:
    """Submit the fixtures at once (as users would), then wait for each to finish."""
    submitted = {}
    for name in ("sample.wav", "jfk.flac", "ru_dialogue.wav", "multilingual.mp3", "empty.wav"):
        response = stack.submit(fixtures_dir / name)
        assert response.status_code == 202, response.text
        body = response.json()
        assert body["status"] == "processing" and body["filename"] == name and isinstance(body["id"], int)
        submitted[name] = body["id"]
    return {name: {"id": job_id, **stack.wait_finished(job_id)} for name, job_id in submitted.items()}


def fetch_segments(stack: Stack, job_id: int) -> list:
    return stack.query("SELECT chunk_index, index, speaker, start_ts, end_ts, text,"
                       " embedding::real[] AS embedding, embedding_model"
                       " FROM segments WHERE transcript_id = $1 ORDER BY start_ts", job_id)


def fetch_job(stack: Stack, job_id: int):
    return stack.query("SELECT * FROM transcripts WHERE id = $1", job_id)[0]


def test_meeting_is_diarized_and_transcribed(finished):
    doc = finished["sample.wav"]
    assert doc["status"] == "done", doc
    speakers = {s["speaker"] for s in doc["segments"]}
    assert len(speakers) >= 2, speakers
    assert all(set(s) == {"chunk_index", "index", "speaker", "start_ts", "end_ts", "text", "overlap", "edited"}
               for s in doc["segments"])
    assert " ".join(s["text"] for s in doc["segments"]).strip()
    starts = [s["start_ts"] for s in doc["segments"]]
    assert starts == sorted(starts)
    assert all(0 <= s["start_ts"] <= s["end_ts"] <= 30.5 for s in doc["segments"])


def test_flac_words_are_right(finished):
    doc = finished["jfk.flac"]
    assert doc["status"] == "done", doc
    text = normalised(" ".join(s["text"] for s in doc["segments"]))
    assert "ask not what your country can do for you" in text, text


async def test_russian_dialogue_in_russian_with_two_speakers(finished, stack):
    doc = finished["ru_dialogue.wav"]
    assert doc["status"] == "done", doc
    assert len({s["speaker"] for s in doc["segments"]}) == 2
    text = " ".join(s["text"] for s in doc["segments"])
    assert len(re.findall(r"[а-яё]", text.lower())) > 0.8 * len(re.findall(r"[a-zа-яё]", text.lower()))
    assert (fetch_job(stack, finished["ru_dialogue.wav"]["id"]))["language"] == "ru"


def test_mp3_is_transcribed(finished):
    doc = finished["multilingual.mp3"]
    assert doc["status"] == "done", doc
    text = normalised(" ".join(s["text"] for s in doc["segments"]))
    # The English first half's words: "software" alone is said in the German half too.
    assert "permission is hereby granted" in text, text


def test_silence_is_a_result_not_a_failure(finished):
    doc = finished["empty.wav"]
    assert (doc["status"], doc["segments"], doc["no_speech"], doc["percent"]) == ("done", [], True, 100)
    assert finished["jfk.flac"]["no_speech"] is False


def test_a_lone_short_word_is_transcribed_not_called_silence(stack, fixtures_dir, tmp_path):
    """A voicemail's "Hello?" is too short for a voice embedding; the job said nobody talks."""
    import numpy as np

    from common.audio import decode_audio
    from tests.audio_files import wav

    jfk = decode_audio(str(fixtures_dir / "jfk.flac"))
    pause = np.zeros(16000 * 2, dtype=np.float32)
    path = tmp_path / "and so.wav"
    path.write_bytes(wav(np.concatenate([pause, jfk[int(0.3 * 16000):int(0.7 * 16000)], pause])))
    doc = stack.wait_finished(stack.submit_job(path))
    assert doc["status"] == "done" and doc["no_speech"] is False, doc
    assert [s["speaker"] for s in doc["segments"]] == ["spk_0"] and doc["segments"][0]["text"].strip(), doc


async def test_every_segment_has_a_384_float_embedding(finished, stack):
    for name in ("sample.wav", "jfk.flac", "ru_dialogue.wav", "multilingual.mp3"):
        rows = fetch_segments(stack, finished[name]["id"])
        assert rows, name
        for row in rows:
            assert row["embedding"] is not None and len(row["embedding"]) == 384, (name, row["index"])
            assert abs(sum(x * x for x in row["embedding"]) - 1.0) < 1e-3  # unit vectors
            assert row["embedding_model"] == "all-minilm"


async def test_embeddings_are_pgvector_vectors_searchable_through_an_hnsw_index(finished, stack):
    job_id = finished["sample.wav"]["id"]
    [index] = stack.query("SELECT indexdef FROM pg_indexes WHERE tablename = 'segments' AND indexdef LIKE '%hnsw%'")
    assert "vector(384)" in index["indexdef"] and "'all-minilm'" in index["indexdef"]
    probe = stack.query("SELECT text, embedding::text AS vector FROM segments"
                        " WHERE transcript_id = $1 ORDER BY start_ts LIMIT 1", job_id)[0]
    # The segment nearest its own vector (cosine), the way a search asks. Other tests submit the
    # same file, so the nearest may be an identical segment of another job: same text, distance 0.
    nearest = stack.query(
        "SELECT text, embedding::vector(384) <=> $1::vector(384) AS distance FROM segments"
        " WHERE embedding_model = 'all-minilm' ORDER BY embedding::vector(384) <=> $1::vector(384) LIMIT 1",
        probe["vector"])[0]
    assert nearest["text"] == probe["text"] and nearest["distance"] < 1e-6, (nearest, probe["text"])
    conn = await asyncpg.connect(stack.database_url)
    try:
        await conn.execute("SET enable_seqscan = off")  # a few rows: the planner would just scan them
        plan = "\n".join(r[0] for r in await conn.fetch(
            "EXPLAIN SELECT index FROM segments WHERE embedding_model = 'all-minilm'"
            " ORDER BY embedding::vector(384) <=> $1::vector(384) LIMIT 5", probe["vector"]))
    finally:
        await conn.close()
    assert "segments_embedding_" in plan, plan


async def test_job_record_has_language_duration_and_progress(finished, stack):
    job = fetch_job(stack, finished["jfk.flac"]["id"])
    assert job["language"] == "en"
    assert job["duration"] == pytest.approx(11.0, abs=0.1)
    assert job["stage"] == "done" and job["progress"] == 1.0 and job["completed_at"] is not None


async def test_subscriber_receives_segment_events_and_one_completion(stack, fixtures_dir):
    connection = await aio_pika.connect(stack.amqp_url)
    try:
        queue = await events_queue(await connection.channel(), "#")
        response = stack.submit(fixtures_dir / "jfk.flac")
        job_id = response.json()["id"]
        await asyncio.to_thread(stack.wait_finished, job_id)
        segments = fetch_segments(stack, job_id)
        events: list[tuple[str, dict]] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            message = await queue.get(fail=False)
            if message is None:
                if any(k == "transcript.completed" and b["transcript_id"] == job_id for k, b in events):
                    await asyncio.sleep(1)  # a duplicate would arrive now
                    while (message := await queue.get(fail=False)) is not None:
                        await message.ack()
                        events.append((message.routing_key, json.loads(message.body)))
                    break
                await asyncio.sleep(0.2)
                continue
            await message.ack()
            events.append((message.routing_key, json.loads(message.body)))
        mine = [(k, b) for k, b in events if b.get("transcript_id") == job_id]
        created = [b for k, b in mine if k == "segment.created"]
        completed = [b for k, b in mine if k == "transcript.completed"]
        assert len(completed) == 1, mine
        assert completed[0]["segment_count"] == len(segments) and completed[0]["language"] == "en"
        assert sorted((b["chunk_index"], b["index"]) for b in created) == sorted(
            (r["chunk_index"], r["index"]) for r in segments)
        assert all(len(b["embedding"]) == 384 and b["text"] for b in created)
        assert mine[-1][0] == "transcript.completed"  # completion comes after its segments
    finally:
        await connection.close()


def test_bucket_drop_becomes_one_job_with_a_result_file(stack, fixtures_dir):
    s3 = stack.s3()
    s3.fput_object("inbox", "calls/en dialogue.wav", str(fixtures_dir / "en_dialogue.wav"))
    result_key = "results/calls/en dialogue.wav.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            document = json.loads(s3.get_object("inbox", result_key).read())
            break
        except Exception:
            time.sleep(1)
    else:
        pytest.fail("no result file appeared")
    assert document["status"] == "done", document
    assert len({s["speaker"] for s in document["segments"]}) == 2
    assert "sales" in normalised(" ".join(s["text"] for s in document["segments"]))
    sequence = stack.value("SELECT last_value FROM transcripts_id_seq")
    time.sleep(3)  # several more reconcile scans
    assert stack.value("SELECT last_value FROM transcripts_id_seq") == sequence  # no id spent per scan
    jobs = [r["id"] for r in stack.query(
        "SELECT id FROM transcripts WHERE source = 'bucket' AND source_key = $1", "calls/en dialogue.wav")]
    assert len(jobs) == 1, jobs  # scans keep running: still exactly one job
    assert httpx.get(f"{stack.api}/status/{jobs[0]}").json() == document
    subtitles = s3.get_object("inbox", "results/calls/en dialogue.wav.srt").read().decode()
    assert subtitles == httpx.get(f"{stack.api}/transcripts/{jobs[0]}", params={"format": "srt"}).text
    assert subtitles.startswith("1\n00:00:") and "sales" in normalised(subtitles)


def test_bucket_drop_options_come_from_the_object_metadata(stack, fixtures_dir):
    """A drop asks for a language and speaker counts as an upload does, in its S3 user metadata;
    one that asks for something impossible (or expects a speaker nobody is enrolled as) ends in
    error, its result file saying which value."""
    s3 = stack.s3()
    s3.fput_object("inbox", "meta/sample.wav", str(fixtures_dir / "sample.wav"),
                   metadata={"language": "de", "num-speakers": "3"})
    s3.fput_object("inbox", "meta/bad count.flac", str(fixtures_dir / "jfk.flac"), metadata={"num-speakers": "many"})
    s3.fput_object("inbox", "meta/nobody.flac", str(fixtures_dir / "jfk.flac"),
                   metadata={"expected-speakers": "Nobody Enrolled"})
    documents = {}
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(documents) < 3:
        for key in ("meta/sample.wav", "meta/bad count.flac", "meta/nobody.flac"):
            try:
                documents[key] = json.loads(s3.get_object("inbox", f"results/{key}.json").read())
            except Exception:
                time.sleep(0.5)
    bad = documents["meta/bad count.flac"]
    assert bad["status"] == "error" and "x-amz-meta-num-speakers" in bad["error"], bad
    unknown = documents["meta/nobody.flac"]
    assert unknown["status"] == "error" and "x-amz-meta-expected-speakers" in unknown["error"], unknown
    assert "'Nobody Enrolled'" in unknown["error"], unknown
    assert "results/meta/bad count.flac.srt" not in {o.object_name for o in s3.list_objects("inbox", recursive=True)}
    hinted = documents["meta/sample.wav"]
    assert hinted["status"] == "done" and len({s["speaker"] for s in hinted["segments"]}) == 3, hinted
    job_id = stack.value("SELECT id FROM transcripts WHERE source_key = 'meta/sample.wav'")
    transcript = httpx.get(f"{stack.api}/transcripts/{job_id}").json()
    assert transcript["language"] == "de" and transcript["options"]["num_speakers"] == 3, transcript


def test_bucket_drop_names_are_cleaned_like_upload_names(stack, fixtures_dir):
    key = "calls/" + "long name " * 30 + ".flac"  # 306 characters: over the 255 kept
    stack.s3().fput_object("inbox", key, str(fixtures_dir / "jfk.flac"))
    deadline = time.monotonic() + 120
    rows = []
    while time.monotonic() < deadline and not rows:
        rows = stack.query("SELECT id, filename FROM transcripts WHERE source_key = $1", key)
        time.sleep(0.5)
    assert rows, "the drop never became a job"
    filename = rows[0]["filename"]
    assert len(filename) == 255 and filename.endswith("….flac") and filename.startswith("long name")
    assert stack.wait_finished(rows[0]["id"])["status"] == "done"
