"""The OpenAI-compatible endpoint driven by the official `openai` SDK, as code written for
OpenAI's audio API would use it, against the real stack: only the base URL changes."""

from __future__ import annotations

import json
import threading
import time
import uuid

import httpx
import openai
import pytest

from tests.conftest import another_ingest


@pytest.fixture
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.api}/v1", api_key="not-needed-without-API_KEYS", max_retries=0)


def test_the_sdk_gets_the_text_and_who_said_what(stack, fixtures_dir, client):
    last_before = stack.value("SELECT coalesce(max(id), 0) FROM transcripts")
    with (fixtures_dir / "en_dialogue.wav").open("rb") as f:
        plain = client.audio.transcriptions.create(model="whisper-1", file=f)
    assert "sales" in plain.text.lower() and "quarter" in plain.text.lower()

    with (fixtures_dir / "en_dialogue.wav").open("rb") as f:
        diarized = client.audio.transcriptions.create(model="gpt-4o-transcribe-diarize", file=f,
                                                      response_format="diarized_json")
    assert [s.speaker for s in diarized.segments][:2] == ["A", "B"]  # labelled as OpenAI labels them
    assert {s.speaker for s in diarized.segments} == {"A", "B"} and 14 < diarized.duration < 17
    assert diarized.text == plain.text

    # Streamed, as gpt-4o-transcribe streams: the text a segment at a time as it is written, then all of it.
    with (fixtures_dir / "en_dialogue.wav").open("rb") as f:
        events = list(client.audio.transcriptions.create(model="gpt-4o-transcribe", file=f, stream=True))
    assert [e.type for e in events] == ["transcript.text.delta"] * (len(events) - 1) + ["transcript.text.done"]
    assert len(events) > 2 and "".join(e.delta for e in events[:-1]) == events[-1].text == plain.text

    with (fixtures_dir / "en_dialogue.wav").open("rb") as f:
        verbose = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="verbose_json",
                                                     timestamp_granularities=["word"])
    assert verbose.language == "english" and {s.speaker for s in verbose.segments} == {"spk_0", "spk_1"}
    assert verbose.words and all(w.start <= w.end for w in verbose.words)
    # Every field OpenAI's segments have is there, as typed clients require (the SDK would give None).
    fields = ("id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob", "compression_ratio",
              "no_speech_prob")
    assert all(getattr(s, name) is not None for s in verbose.segments for name in fields)
    assert all(-5 < s.avg_logprob < 0 for s in verbose.segments), verbose.segments
    assert verbose.usage.seconds == verbose.duration and plain.usage.seconds == verbose.duration

    # A prompt is often the text of the piece before, longer than a vocabulary: its end is kept.
    before = " ".join(f"Point {n} of the agenda was settled," for n in range(1, 30)) + " thanks to the Americans"
    with (fixtures_dir / "jfk.flac").open("rb") as f:
        srt = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="srt", language="en",
                                                 prompt=before, extra_body={"num_speakers": 1, "redact": "number"})
    assert srt.startswith("1\n00:00:") and "-->" in srt and "ask not" in srt.lower()
    [job] = stack.query("SELECT options FROM transcripts WHERE filename = 'jfk.flac' ORDER BY id DESC LIMIT 1")
    options = json.loads(job["options"])
    assert {k: options.get(k) for k in ("language", "num_speakers", "redact")} == {
        "language": "en", "num_speakers": 1, "redact": ["number"]}
    kept = ",".join(options["vocabulary"])
    assert kept.endswith("Americans") and 100 < len(kept) <= 150 and before.endswith(kept.split(",")[-1])

    # Each request was an ordinary job: listed, and deletable like any other.
    listed = httpx.get(f"{stack.api}/transcripts", params={"filename": "en_dialogue", "limit": 500},
                       timeout=30).json()["items"]
    ours = [job for job in listed if job["id"] > last_before]
    # The four requests for en_dialogue asked for the same file with the same options in different
    # formats: one job answered them all.
    assert len(ours) == 1 and {job["status"] for job in ours} == {"done"}
    assert httpx.delete(f"{stack.api}/transcripts/{ours[0]['id']}", timeout=30).status_code == 204
    assert httpx.get(f"{stack.api}/status/{ours[0]['id']}", timeout=30).status_code == 404


def test_a_translation_is_in_english(stack, fixtures_dir, client):
    with (fixtures_dir / "ru_dialogue.wav").open("rb") as f:
        translated = client.audio.translations.create(model="whisper-1", file=f, response_format="verbose_json")
    assert "hear" in translated.text.lower() and translated.language == "english"
    # The same recording asked again in OpenAI's diarized format: the same job, said to be a translation.
    diarized = httpx.post(f"{stack.api}/v1/audio/translations", timeout=300,
                          files={"file": ("ru_dialogue.wav", (fixtures_dir / "ru_dialogue.wav").read_bytes())},
                          data={"model": "whisper-1", "response_format": "diarized_json"})
    assert diarized.status_code == 200, diarized.text
    assert diarized.json()["task"] == "translate" and diarized.json()["text"] == translated.text


def test_the_same_request_again_while_it_runs_waits_for_the_same_job(stack, fixtures_dir, client, tmp_path):
    """What the SDK does after a timeout or a 503: send the same file again. It must not make a
    second job of it."""
    recording = tmp_path / f"retry {uuid.uuid4().hex[:6]}.wav"
    recording.write_bytes((fixtures_dir / "en_dialogue.wav").read_bytes())
    answers: list[str] = []

    def transcribe() -> None:
        with recording.open("rb") as f:
            answers.append(client.audio.transcriptions.create(model="whisper-1", file=f).text)

    first = threading.Thread(target=transcribe)
    first.start()
    deadline = time.monotonic() + 60
    while not stack.query("SELECT id FROM transcripts WHERE filename = $1", recording.name):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    transcribe()  # sent again while the first one's job runs
    first.join()
    transcribe()  # and once more, its job done: the SDK's retry can come just after the job ended
    assert len(answers) == 3 and answers[0] == answers[1] == answers[2]
    assert len(stack.query("SELECT id FROM transcripts WHERE filename = $1", recording.name)) == 1


def test_what_cannot_be_done_is_refused_with_the_reason(stack, client, fixtures_dir):
    with (fixtures_dir / "jfk.flac").open("rb") as f, pytest.raises(openai.BadRequestError) as refused:
        client.audio.transcriptions.create(model="whisper-1", file=f, response_format="xml")
    assert "response_format" in str(refused.value)
    with pytest.raises(openai.BadRequestError) as refused:  # as OpenAI answers it
        client.audio.transcriptions.create(model="whisper-1", file=("notes.wav", b"not audio at all" * 50))
    assert "not audio" in refused.value.message
    # An Idempotency-Key is checked as POST /recognize checks it (a long one could not be stored).
    with (fixtures_dir / "jfk.flac").open("rb") as f, pytest.raises(openai.BadRequestError) as refused:
        client.audio.transcriptions.create(model="whisper-1", file=f, extra_headers={"Idempotency-Key": "k" * 3000})
    assert "Idempotency-Key" in refused.value.message


def test_a_waiting_request_holds_no_upload_place(stack, fixtures_dir):
    """With room for one upload at a time, a request waiting for its job (minutes on a long
    recording) must not keep every other upload out."""
    with another_ingest(stack, "ingest-one-upload", MAX_CONCURRENT_UPLOADS="1") as api:
        client = openai.OpenAI(base_url=f"{api}/v1", api_key="-", max_retries=0)
        recording = (f"waiting {uuid.uuid4().hex[:6]}.wav", (fixtures_dir / "en_dialogue.wav").read_bytes())
        answers: list[str] = []
        waiting = threading.Thread(target=lambda: answers.append(
            client.audio.transcriptions.create(model="whisper-1", file=recording).text))
        waiting.start()
        deadline = time.monotonic() + 60
        while not stack.query("SELECT id FROM transcripts WHERE filename = $1", recording[0]):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        with (fixtures_dir / "jfk.flac").open("rb") as f:
            other = httpx.post(f"{api}/recognize", files={"file": ("jfk.flac", f)}, timeout=60)
        assert other.status_code == 202, other.text
        waiting.join(300)
        assert answers and "sales" in answers[0].lower()


def test_a_stream_past_the_event_stream_limit_is_told_to_come_back_and_its_job_goes_on(stack, fixtures_dir):
    """A streamed answer reads PostgreSQL every second as GET /events does, so it takes one of
    MAX_EVENT_STREAMS' places: past them, 503 with Retry-After in OpenAI's shape; the recording
    was stored, so its job goes on, and the same request sent again follows that job."""
    recording = (f"streamed {uuid.uuid4().hex[:6]}.flac", (fixtures_dir / "jfk.flac").read_bytes())
    with another_ingest(stack, "ingest-one-stream", MAX_EVENT_STREAMS="1") as api, \
            httpx.stream("GET", f"{api}/events", timeout=httpx.Timeout(60, connect=10)) as watching:
        assert watching.status_code == 200
        client = openai.OpenAI(base_url=f"{api}/v1", api_key="-", max_retries=0)
        with pytest.raises(openai.APIStatusError) as refused:
            client.audio.transcriptions.create(model="gpt-4o-transcribe", file=recording, stream=True)
        assert refused.value.status_code == 503 and refused.value.response.headers["retry-after"].isdigit()
        assert "event streams" in refused.value.message
        [job] = stack.query("SELECT id FROM transcripts WHERE filename = $1", recording[0])
        # Waiting for the job without a stream reads PostgreSQL as often: it needs a place too.
        with pytest.raises(openai.APIStatusError) as refused:
            client.audio.transcriptions.create(model="gpt-4o-transcribe", file=recording)
        assert refused.value.status_code == 503 and "event streams" in refused.value.message
        watching.close()
        deadline = time.monotonic() + 15
        while True:
            try:
                events = list(client.audio.transcriptions.create(model="gpt-4o-transcribe", file=recording,
                                                                 stream=True))
                break
            except openai.APIStatusError as exc:  # until the closed stream's place is given back
                assert exc.status_code == 503 and time.monotonic() < deadline
                time.sleep(0.5)
    assert events[-1].type == "transcript.text.done" and "ask not" in events[-1].text.lower()
    assert stack.query("SELECT id FROM transcripts WHERE filename = $1", recording[0]) == [job]


async def test_a_job_deleted_while_its_request_waits_is_not_found(stack):
    """The web page's delete, or retention, right after the job ended: the wait sees the row gone
    (the route then answers 404 in OpenAI's shape, which the SDK raises as NotFoundError), where it
    raised TypeError, a 500. (A job cannot be deleted while it runs, so the wait is asked of one
    that no longer exists.)"""
    from types import SimpleNamespace

    from common.db import create_pool
    from services.ingest.live import Wakeups
    from services.ingest.openai_api import wait_for_end

    pool = await create_pool(stack.settings())
    try:
        assert await wait_for_end(SimpleNamespace(pool=pool, wakeups=Wakeups()), 987654321, 5.0) == "deleted"
    finally:
        await pool.close()


def test_a_prompt_written_without_spaces_keeps_its_end(stack, client, fixtures_dir):
    """The prompt's last whole words within 150 characters became the vocabulary: text written
    without spaces (Chinese, Japanese) or a long URL is one "word" longer than that, and nothing
    was kept, without a word. Its last characters are kept, from a sentence's start where one is."""
    from services.ingest.openai_api import prompt_vocabulary

    prompt = "会议记录" * 40 + "。张伟和李娜讨论了ComfyUI的问题。"
    assert prompt_vocabulary(prompt) == "张伟和李娜讨论了ComfyUI的问题。"
    link = "see https://example.org/" + "a" * 300
    assert len(prompt_vocabulary(link)) == 150 and link.endswith(prompt_vocabulary(link))
    assert prompt_vocabulary("x" * 10 + " ok") == "x" * 10 + " ok"  # whole words as before
    name = f"prompt {uuid.uuid4().hex[:6]}.flac"
    client.audio.transcriptions.create(model="whisper-1", file=(name, (fixtures_dir / "jfk.flac").read_bytes()),
                                       language="en", prompt=prompt, response_format="text")
    [job] = stack.query("SELECT options FROM transcripts WHERE filename = $1", name)
    assert json.loads(job["options"])["vocabulary"] == ["张伟和李娜讨论了ComfyUI的问题。"]


def test_a_fault_is_answered_in_openais_shape_and_logged_once(stack, fixtures_dir, monkeypatch, caplog):
    """A 500 (a fault here) had Litestar's own body, {"status_code", "detail"}, where OpenAI's SDKs
    read {"error": {...}}. It has OpenAI's shape now, and is logged once, with its traceback."""
    import logging

    from litestar.testing import TestClient

    from services.ingest import openai_api
    from services.ingest.app import create_app

    def broken(stream) -> str:
        raise RuntimeError("the digest broke")

    monkeypatch.setattr(openai_api, "file_digest", broken)
    with TestClient(create_app(stack.settings()), timeout=60, raise_server_exceptions=False) as http, \
            caplog.at_level(logging.INFO):
        sdk = openai.OpenAI(base_url="http://testserver.local/v1", api_key="-", http_client=http, max_retries=0)
        with (fixtures_dir / "jfk.flac").open("rb") as f, pytest.raises(openai.InternalServerError) as failed:
            sdk.audio.transcriptions.create(model="whisper-1", file=f)
    assert failed.value.status_code == 500
    assert failed.value.response.json() == {"error": {"message": "Internal Server Error", "type": "server_error",
                                                      "param": None, "code": None}}
    logged = [r for r in caplog.records if r.exc_info and "the digest broke" in str(r.exc_info[1])]
    assert len(logged) == 1 and "/v1/audio/transcriptions" in logged[0].getMessage(), caplog.text
