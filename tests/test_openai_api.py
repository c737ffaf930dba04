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

    with (fixtures_dir / "en_dialogue.wav").open("rb") as f:
        verbose = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="verbose_json",
                                                     timestamp_granularities=["word"])
    assert verbose.language == "en" and {s.speaker for s in verbose.segments} == {"spk_0", "spk_1"}
    assert verbose.words and all(w.start <= w.end for w in verbose.words)

    with (fixtures_dir / "jfk.flac").open("rb") as f:
        srt = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="srt", language="en",
                                                 extra_body={"num_speakers": 1, "redact": "number"})
    assert srt.startswith("1\n00:00:") and "-->" in srt and "ask not" in srt.lower()
    [job] = stack.query("SELECT options FROM transcripts WHERE filename = 'jfk.flac' ORDER BY id DESC LIMIT 1")
    options = json.loads(job["options"])
    assert {k: options.get(k) for k in ("language", "num_speakers", "redact")} == {
        "language": "en", "num_speakers": 1, "redact": ["number"]}

    # Each request was an ordinary job: listed, and deletable like any other.
    listed = httpx.get(f"{stack.api}/transcripts", params={"filename": "en_dialogue", "limit": 500},
                       timeout=30).json()["items"]
    ours = [job for job in listed if job["id"] > last_before]
    assert len(ours) == 3 and {job["status"] for job in ours} == {"done"}
    assert httpx.delete(f"{stack.api}/transcripts/{ours[0]['id']}", timeout=30).status_code == 204
    assert httpx.get(f"{stack.api}/status/{ours[0]['id']}", timeout=30).status_code == 404


def test_a_translation_is_in_english(stack, fixtures_dir, client):
    with (fixtures_dir / "ru_dialogue.wav").open("rb") as f:
        translated = client.audio.translations.create(model="whisper-1", file=f)
    assert "hear" in translated.text.lower()


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
    assert len(answers) == 2 and answers[0] == answers[1]
    assert len(stack.query("SELECT id FROM transcripts WHERE filename = $1", recording.name)) == 1


def test_what_cannot_be_done_is_refused_with_the_reason(stack, client, fixtures_dir):
    with (fixtures_dir / "jfk.flac").open("rb") as f, pytest.raises(openai.BadRequestError) as refused:
        client.audio.transcriptions.create(model="whisper-1", file=f, response_format="xml")
    assert "response_format" in str(refused.value)
    with pytest.raises(openai.APIStatusError) as refused:
        client.audio.transcriptions.create(model="whisper-1", file=("notes.wav", b"not audio at all" * 50))
    assert refused.value.status_code == 415
