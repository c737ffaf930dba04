"""The OpenAI-compatible endpoint driven by the official `openai` SDK, as code written for
OpenAI's audio API would use it, against the real stack: only the base URL changes."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import signal
import socket
import subprocess
import threading
import time
import uuid
from urllib.parse import urlparse

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
    from services.ingest.openai_api import wait_for_text

    pool = await create_pool(stack.settings())
    try:
        assert await wait_for_text(SimpleNamespace(pool=pool, wakeups=Wakeups()), 987654321, 5.0) == "deleted"
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


def test_the_sdks_lists_and_objects_reach_the_job_and_unknown_fields_are_refused(stack, client, fixtures_dir):
    """The SDK sends extra_body's lists as `redact[]` fields and its objects as `spelling[heard]`
    fields: they were dropped without a word (the job ran unredacted, answered 200, and its
    request hash did not tell it from one without them). A field neither OpenAI's nor this
    service's (misspelt, or POST /recognize's) was dropped too."""
    name = f"lists {uuid.uuid4().hex[:6]}.flac"
    recording = (name, (fixtures_dir / "jfk.flac").read_bytes())
    text = client.audio.transcriptions.create(
        model="whisper-1", file=recording, response_format="text", language="en",
        # OpenAI's own fields are taken even where ignored, an object among them.
        timestamp_granularities=["word"], include=["logprobs"], chunking_strategy={"type": "server_vad"},
        extra_body={"redact": ["email", "number"], "spelling": {"country": "Nation"}})
    assert "Nation" in text and "country" not in text.lower(), text
    [job] = stack.query("SELECT options FROM transcripts WHERE filename = $1", name)
    options = json.loads(job["options"])
    assert (options["redact"], options["spelling"]) == (["email", "number"], {"country": "Nation"})

    # Other options, another job; the same asked as one plain text field (blanks not given), the same job.
    client.audio.transcriptions.create(model="whisper-1", file=recording, language="en",
                                       extra_body={"redact": ["number"]})
    plain = httpx.post(f"{stack.api}/v1/audio/transcriptions", timeout=300, files={"file": recording},
                       data={"model": "whisper-1", "language": "en", "redact": "number", "temperature": "",
                             "num_speakers": "", "response_format": ""})
    assert plain.status_code == 200, plain.text
    jobs = stack.query("SELECT options FROM transcripts WHERE filename = $1 ORDER BY id", name)
    assert [json.loads(job["options"])["redact"] for job in jobs] == [["email", "number"], ["number"]]

    for extra, field in (({"vocabulary": "ComfyUI"}, "vocabulary"), ({"num_speaker": 2}, "num_speaker"),
                         ({"redact": {"email": True}}, "redact[email]")):
        with pytest.raises(openai.BadRequestError, match=re.escape(f"unknown form field '{field}'")):
            client.audio.transcriptions.create(model="whisper-1", file=recording, extra_body=extra)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.audio.transcriptions.create(model="whisper-1", file=recording, extra_body={"temperature": "hot"})
    # One field of names: a name cannot hold a comma, so these are two (neither enrolled here).
    with pytest.raises(openai.BadRequestError, match="no enrolled speaker is called 'Anna', 'Boris'"):
        client.audio.transcriptions.create(model="whisper-1", file=recording,
                                           extra_body={"known_speaker_names": "Anna, Boris"})
    assert len(stack.query("SELECT id FROM transcripts WHERE filename = $1", name)) == 2


def test_the_sdks_languages_and_keywords_reach_the_job(stack, client, fixtures_dir):
    """The SDK's transcriptions.create() takes `languages` and `keywords`, and sends them as
    `languages[]` and `keywords[]` fields: they were refused as unknown. The languages are those
    the job's passages are told apart among (as `language` "en,de"), the keywords its vocabulary,
    ahead of the prompt's end; keywords the vocabulary would not take are refused, as on /recognize."""
    name = f"languages {uuid.uuid4().hex[:6]}.flac"
    recording = (name, (fixtures_dir / "jfk.flac").read_bytes())
    text = client.audio.transcriptions.create(model="whisper-1", file=recording, response_format="text",
                                              languages=["en", "de"], keywords=["Nation", "Anna Kowalski"],
                                              prompt="We choose to go to the moon.")
    assert "country" in text.lower(), text
    [job] = stack.query("SELECT options FROM transcripts WHERE filename = $1", name)
    options = json.loads(job["options"])
    assert options["language"] == "en,de"
    assert options["vocabulary"] == ["Nation", "Anna Kowalski", "We choose to go to the moon."]
    # The prompt's last words fill the room the keywords leave, within the vocabulary's 150 characters.
    from services.ingest.openai_api import asked_vocabulary

    assert asked_vocabulary(["x" * 140], "one two three four") == "x" * 140 + ",four"

    with pytest.raises(openai.BadRequestError, match="language and languages: give one of them"):
        client.audio.transcriptions.create(model="whisper-1", file=recording, language="en", languages=["en", "de"])
    with pytest.raises(openai.BadRequestError) as refused:
        client.audio.transcriptions.create(model="whisper-1", file=recording,
                                           keywords=[f"term {n:02d}" for n in range(20)])
    error = refused.value.response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"].startswith(
        "keywords: longer than 150 characters"), error
    assert len(stack.query("SELECT id FROM transcripts WHERE filename = $1", name)) == 1


def test_the_documented_100_spelling_pairs_reach_the_job_through_the_sdk(stack, client, fixtures_dir):
    """The SDK sends each `spelling` pair of extra_body as a form part of its own, and a form took
    at most 64 parts: some 60 pairs with the file and the other fields were refused with 400,
    where 100 are documented."""
    name = f"spellings {uuid.uuid4().hex[:6]}.flac"
    spelling = {f"heard{n}": f"Written{n}" for n in range(99)} | {"country": "Nation"}
    text = client.audio.transcriptions.create(
        model="whisper-1", file=(name, (fixtures_dir / "jfk.flac").read_bytes()), response_format="text",
        language="en", prompt="We choose to go to the moon.", temperature=0,
        timestamp_granularities=["word", "segment"],
        include=["logprobs"], chunking_strategy={"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300},
        extra_body={"spelling": spelling, "redact": ["email", "card", "phone", "number"], "num_speakers": 1})
    assert "Nation" in text, text
    [job] = stack.query("SELECT options FROM transcripts WHERE filename = $1", name)
    assert json.loads(job["options"])["spelling"] == spelling


def same_request_hash(content: bytes, filename: str) -> str:
    """The hash of a plain request (model whisper-1, nothing else) for this file."""
    import hashlib

    from common.messages import JobOptions
    from services.ingest.openai_api import request_hash

    return request_hash(hashlib.sha256(content).hexdigest(), filename, JobOptions(task="transcribe"))


def test_text_written_without_spaces_is_joined_without_them(stack, made_job, client, fixtures_dir):
    """Segments' texts were joined with a space: Chinese, Japanese and Thai came out with spaces
    between sentences, where they are written without. And the streamed whole text was in the
    order segments are stored, not the start-time order of the answer without `stream`."""
    name = f"unspaced {uuid.uuid4().hex[:6]}.flac"
    content = (fixtures_dir / "jfk.flac").read_bytes()
    job_id = made_job(name, content)
    stack.query("UPDATE transcripts SET request_hash = $1 WHERE id = $2", same_request_hash(content, name), job_id)
    # Within a chunk, a later segment may start first (two speakers at once).
    for chunk, index, start, text in ((0, 0, 2.0, "今天开会。"), (0, 1, 0.5, "大家好。"),
                                      (1, 0, 6.0, "Let's begin."), (1, 1, 8.0, "Thank you.")):
        stack.query("INSERT INTO segments (transcript_id, chunk_index, index, speaker, start_ts, end_ts, text)"
                    " VALUES ($1, $2, $3, 'spk_0', $4::float8, $4::float8 + 1, $5)", job_id, chunk, index, start, text)
    whole = client.audio.transcriptions.create(model="whisper-1", file=(name, content)).text
    assert whole == "大家好。今天开会。Let's begin. Thank you."
    events = list(client.audio.transcriptions.create(model="whisper-1", file=(name, content), stream=True))
    assert "".join(e.delta for e in events[:-1]) == "今天开会。大家好。Let's begin. Thank you."
    assert events[-1].type == "transcript.text.done" and events[-1].text == whole
    assert [job["id"] for job in stack.query("SELECT id FROM transcripts WHERE filename = $1", name)] == [job_id]


def test_a_stopping_server_answers_its_waits_and_streams_so_that_they_are_sent_again(stack, made_job, fixtures_dir):
    """On SIGTERM a streamed transcription ended as if the text so far were all of it (no
    transcript.text.done, no error), and a request waiting for its job held the restart for up to
    5 minutes (here: until the process was killed). Both are told to send the request again."""
    name = f"stopping {uuid.uuid4().hex[:6]}.flac"
    content = (fixtures_dir / "jfk.flac").read_bytes()
    job_id = made_job(name, content, status="processing")  # a job that runs on: nothing works on it
    stack.query("UPDATE transcripts SET request_hash = $1 WHERE id = $2", same_request_hash(content, name), job_id)
    outcomes: dict[str, object] = {}

    def ask(how: str, **stream) -> None:
        try:
            answer = sdk.audio.transcriptions.create(model="whisper-1", file=(name, content), **stream)
            outcomes[how] = [e.type for e in answer] if stream else answer
        except openai.APIError as exc:
            outcomes[how] = exc

    # (Another test's process of the same name wrote to the same log before.)
    logged_before = len(stack.log_text("ingest-stopping"))
    with another_ingest(stack, "ingest-stopping") as api:
        sdk = openai.OpenAI(base_url=f"{api}/v1", api_key="-", max_retries=0, timeout=60)
        asking = [threading.Thread(target=ask, args=("waiting",)),
                  threading.Thread(target=ask, args=("streaming",), kwargs={"stream": True})]
        for thread in asking:
            thread.start()
        deadline = time.monotonic() + 60
        while stack.log_text("ingest-stopping")[logged_before:].count(
                f"job={job_id} the same transcription request again") < 2:
            assert time.monotonic() < deadline, stack.log_tail("ingest-stopping")
            time.sleep(0.2)
        time.sleep(1)  # both waiting on the job
        server = stack.processes["ingest-stopping"]
        server.terminate()  # SIGTERM, as an orchestrator stops it
        with contextlib.suppress(subprocess.TimeoutExpired):  # (another_ingest kills it)
            server.wait(120)
        exited = server.returncode
    for thread in asking:
        thread.join(30)
    waiting, streaming = outcomes["waiting"], outcomes["streaming"]
    assert isinstance(waiting, openai.APIStatusError), waiting
    assert waiting.status_code == 503 and waiting.response.headers["retry-after"].isdigit()
    assert "restarting" in waiting.message and "send the same request again" in waiting.message
    assert isinstance(streaming, openai.APIError) and "send the request again" in streaming.message, streaming
    # It stopped of itself (uvicorn raises the SIGTERM again once it shut down), not killed, and
    # no request was left for it to cut off when SHUTDOWN_GRACE_S ran out.
    log = stack.log_text("ingest-stopping")[logged_before:]
    assert exited in (0, -signal.SIGTERM), (exited, log[-3000:])
    assert "timeout graceful shutdown exceeded" not in log, log[-3000:]


def test_a_stream_ended_by_postgresql_going_away_says_the_job_store_is_unavailable(stack, made_job, fixtures_dir):
    """A streamed transcription whose updates stopped because PostgreSQL went away ended saying
    "this server is restarting", which sends an operator looking at the wrong thing; it says the
    job store is unavailable, and still that the job goes on and the request may be sent again."""
    from tests.test_live import CuttableProxy

    name = f"outage {uuid.uuid4().hex[:6]}.flac"
    content = (fixtures_dir / "jfk.flac").read_bytes()
    job_id = made_job(name, content, status="processing")  # a job that runs on: nothing works on it
    stack.query("UPDATE transcripts SET request_hash = $1 WHERE id = $2", same_request_hash(content, name), job_id)
    outcome: list[object] = []

    def stream() -> None:
        try:
            outcome.append([e.type for e in sdk.audio.transcriptions.create(model="whisper-1", file=(name, content),
                                                                             stream=True)])
        except openai.APIError as exc:
            outcome.append(exc)

    proxy = CuttableProxy(stack.database_url)
    logged_before = len(stack.log_text("ingest-openai-db-outage"))
    try:
        with another_ingest(stack, "ingest-openai-db-outage", DATABASE_URL=proxy.url) as api:
            sdk = openai.OpenAI(base_url=f"{api}/v1", api_key="-", max_retries=0, timeout=60)
            streaming = threading.Thread(target=stream)
            streaming.start()
            deadline = time.monotonic() + 60
            while f"job={job_id} the same transcription request again" not in \
                    stack.log_text("ingest-openai-db-outage")[logged_before:]:
                assert time.monotonic() < deadline and streaming.is_alive(), stack.log_tail("ingest-openai-db-outage")
                time.sleep(0.2)
            time.sleep(1)  # the stream reads the job
            proxy.cut()
            streaming.join(30)
    finally:
        proxy.cut()
    [ended] = outcome
    assert isinstance(ended, openai.APIError), ended
    assert ended.message.startswith(f"the job store is unavailable; job {job_id} goes on: send the request again"), \
        ended.message
    assert "restarting" not in ended.message, ended.message


def test_a_browser_page_of_an_allowed_origin_may_call_the_api(stack, fixtures_dir):
    """A chat front end in the browser calls /v1 from its own origin: the browser first sends a
    preflight (OPTIONS, without the key), which was answered 401, so the page could never send
    the request. With CORS_ORIGINS the preflight is answered, and every answer (a 401 too) says
    the page may read it; an origin not listed, and a server without CORS_ORIGINS, get no such
    headers."""
    page = "https://chat.example.org"
    preflight = {"Origin": page, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type, x-stainless-lang"}
    recording = {"file": ("jfk.flac", (fixtures_dir / "jfk.flac").read_bytes())}
    with another_ingest(stack, "ingest-cors", API_KEYS="key-cors-1",
                        CORS_ORIGINS=f"{page}, https://other.example.org") as api:
        allowed = httpx.options(f"{api}/v1/audio/transcriptions", headers=preflight, timeout=30)
        assert allowed.status_code in (200, 204), allowed.text
        assert allowed.headers["access-control-allow-origin"] == page
        asked = {h.strip().lower() for h in allowed.headers["access-control-allow-headers"].split(",")}
        assert {"authorization", "content-type", "x-stainless-lang"} <= asked
        refused = httpx.post(f"{api}/v1/audio/transcriptions", files=recording, data={"model": "whisper-1"},
                             headers={"Origin": page, "Authorization": "Bearer wrong"}, timeout=30)
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == page
        listed = httpx.get(f"{api}/transcripts", headers={"Origin": page, "Authorization": "Bearer key-cors-1"},
                           timeout=30)
        assert listed.status_code == 200 and listed.headers["access-control-allow-origin"] == page
        stranger = httpx.options(f"{api}/v1/audio/transcriptions", headers={**preflight, "Origin": "https://x.example"},
                                 timeout=30)
        assert "access-control-allow-origin" not in stranger.headers
    with another_ingest(stack, "ingest-no-cors", API_KEYS="key-cors-1") as api:
        answer = httpx.options(f"{api}/v1/audio/transcriptions", headers=preflight, timeout=30)
        assert answer.status_code == 401 and "access-control-allow-origin" not in answer.headers


def test_blank_stream_and_repeated_plain_redact_and_spelling_fields_are_taken(stack, made_job, fixtures_dir):
    """README: a blank field counts as not given; `stream=` was refused with 400 "Expected bool,
    got str". And `redact` and `spelling` sent as repeated plain fields (curl -F redact=email -F
    redact=card) were refused with 400 before the form's repeated fields were read."""
    from common.messages import JobOptions
    from services.ingest.openai_api import request_hash

    name = f"fields {uuid.uuid4().hex[:6]}.flac"
    content = (fixtures_dir / "jfk.flac").read_bytes()
    digest = hashlib.sha256(content).hexdigest()
    plain = made_job(name, content, segment=True)
    stack.query("UPDATE transcripts SET request_hash = $1 WHERE id = $2", same_request_hash(content, name), plain)
    blank = httpx.post(f"{stack.api}/v1/audio/transcriptions", timeout=60, files={"file": (name, content)},
                       data={"model": "whisper-1", "stream": ""})
    assert blank.status_code == 200 and blank.json()["text"] == "call me at [PHONE].", blank.text
    bad = httpx.post(f"{stack.api}/v1/audio/transcriptions", timeout=60, files={"file": (name, content)},
                     data={"model": "whisper-1", "stream": "sometimes"})
    assert bad.status_code == 400 and "stream: true or false" in bad.json()["error"]["message"], bad.text
    # The README's words in any case, and only those: pydantic's lax bool took t/f and y/n too.
    for word in ("t", "f", "y", "n", "tru", "nope"):
        bad = httpx.post(f"{stack.api}/v1/audio/transcriptions", timeout=60, files={"file": (name, content)},
                         data={"model": "whisper-1", "stream": word})
        assert bad.status_code == 400 and "stream: true or false" in bad.json()["error"]["message"], (word, bad.text)
    for word, streamed in (("OFF", False), ("No", False), ("0", False), ("YES", True), ("On", True)):
        answer = httpx.post(f"{stack.api}/v1/audio/transcriptions", timeout=60, files={"file": (name, content)},
                            data={"model": "whisper-1", "stream": word})
        assert answer.status_code == 200, (word, answer.text)
        assert answer.headers["content-type"].startswith("text/event-stream") == streamed, (word, answer.headers)
        assert "call me at [PHONE]." in answer.text, (word, answer.text)

    # The same request as one made with both kinds and both pairs: its job, found by the request's hash.
    asked = JobOptions(task="transcribe", redact="email,card", spelling="confu i=ComfyUI,jay son=JSON")
    repeated = made_job(name, content, segment=True)
    stack.query("UPDATE transcripts SET request_hash = $1 WHERE id = $2", request_hash(digest, name, asked), repeated)
    answer = httpx.post(f"{stack.api}/v1/audio/transcriptions", timeout=60, files={"file": (name, content)},
                        data={"model": "whisper-1", "redact": ["email", "card"],
                              "spelling": ["confu i=ComfyUI", "jay son=JSON"], "stream": "false"})
    assert answer.status_code == 200 and answer.json()["text"] == "call me at [PHONE].", answer.text
    # The SDK sends extra_body's list of pairs as `spelling[]` fields: refused as an unknown field,
    # where repeated plain `spelling` fields are taken. The same job, by the request's hash.
    sdk = openai.OpenAI(base_url=f"{stack.api}/v1", api_key="-", max_retries=0)
    listed = sdk.audio.transcriptions.create(model="whisper-1", file=(name, content), extra_body={
        "redact": ["email", "card"], "spelling": ["confu i=ComfyUI", "jay son=JSON"]})
    assert listed.text == "call me at [PHONE]."
    # Pairs both as texts and as spelling[heard] fields are still refused, as with plain `spelling` texts.
    for texts in ("spelling", "spelling[]"):
        both = httpx.post(f"{stack.api}/v1/audio/transcriptions", timeout=60, files={"file": (name, content)},
                          data={"model": "whisper-1", texts: "confu i=ComfyUI", "spelling[jay son]": "JSON"})
        assert both.status_code == 400 and "not both" in both.json()["error"]["message"], (texts, both.text)
    assert [job["id"] for job in stack.query("SELECT id FROM transcripts WHERE filename = $1 ORDER BY id", name)] == [
        plain, repeated]


@pytest.mark.parametrize("field", ["known_speaker_references", "known_speaker_references[]"])
def test_reference_clips_are_refused_as_such_whatever_their_size(stack, fixtures_dir, field):
    """Four reference clips as data URLs (as the SDK sends them) are some 1.7 MB of text fields:
    they were refused with 413 "text fields hold over 1024 KiB", not with the reason they are not
    taken (enrol each voice once)."""
    clip = "data:audio/wav;base64," + base64.b64encode(b"\0" * 320_000).decode()  # 10 s at 16 kHz
    name = f"references {uuid.uuid4().hex[:6]}.flac"
    answer = httpx.post(f"{stack.api}/v1/audio/transcriptions", timeout=60,
                        files={"file": (name, (fixtures_dir / "jfk.flac").read_bytes())},
                        data={"model": "gpt-4o-transcribe-diarize", f"known_speaker_names{field[24:]}": list("ABCD"),
                              field: [clip] * 4})
    assert answer.status_code == 400, answer.text
    assert "enrol each voice once" in answer.json()["error"]["message"], answer.text
    assert not stack.query("SELECT id FROM transcripts WHERE filename = $1", name)


def test_a_job_that_failed_is_not_made_again_by_the_same_request(stack, made_job, fixtures_dir):
    """The same request again (the SDK's retry) found the job it made only while that ran or once
    done: one that failed (or was cancelled) meanwhile was made again, and failed again (or, being
    cancelled, came back). It is answered as a wait for it that saw it fail is."""
    name = f"failed {uuid.uuid4().hex[:6]}.flac"
    content = (fixtures_dir / "jfk.flac").read_bytes()
    job_id = made_job(name, content, status="processing")
    stack.query("UPDATE transcripts SET status = 'error', error = 'cancelled by its owner', completed_at = now(),"
                " request_hash = $1 WHERE id = $2", same_request_hash(content, name), job_id)
    sdk = openai.OpenAI(base_url=f"{stack.api}/v1", api_key="-", max_retries=0, timeout=60)
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        sdk.audio.transcriptions.create(model="whisper-1", file=(name, content))
    error = refused.value.response.json()["error"]
    assert error["message"] == f"job {job_id} failed: cancelled by its owner", error
    assert [job["id"] for job in stack.query("SELECT id FROM transcripts WHERE filename = $1", name)] == [job_id]
    # Sent again on purpose a while later (past the SDK's retries), it is a new job.
    stack.query("UPDATE transcripts SET completed_at = now() - interval '3 minutes' WHERE id = $1", job_id)
    patient = openai.OpenAI(base_url=f"{stack.api}/v1", api_key="-", max_retries=0, timeout=300)
    assert "ask not" in patient.audio.transcriptions.create(model="whisper-1", file=(name, content)).text.lower()
    again = [job["id"] for job in stack.query("SELECT id FROM transcripts WHERE filename = $1 ORDER BY id", name)]
    assert len(again) == 2 and again[0] == job_id, again


def test_a_client_that_leaves_during_the_wait_is_counted_as_the_clients(stack, made_job, fixtures_dir):
    """A client that closed its connection while its request waited for the job was answered 503,
    counted in stt_http_requests_total as a fault here; it is 499, as a client gone before its
    body came is."""
    from tests.test_metrics import parse, total

    def counted(status: str) -> float:
        samples = parse(httpx.get(stack.metrics_url("ingest"), timeout=10).text)
        return total(samples, "stt_http_requests_total", method="POST", route="/v1/audio/transcriptions",
                     status=status)

    name = f"leaving {uuid.uuid4().hex[:6]}.flac"
    content = (fixtures_dir / "jfk.flac").read_bytes()
    job_id = made_job(name, content, status="processing")  # a job that runs on: nothing works on it
    stack.query("UPDATE transcripts SET request_hash = $1 WHERE id = $2", same_request_hash(content, name), job_id)
    before, logged_before = {status: counted(status) for status in ("499", "503")}, len(stack.log_text("ingest"))
    body = (f'--leaving\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: audio/flac\r\n\r\n").encode() + content + b"\r\n--leaving--\r\n"
    url = urlparse(stack.api)
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall((f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: {url.hostname}\r\n"
                      f"Content-Type: multipart/form-data; boundary=leaving\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
        deadline = time.monotonic() + 30
        while f"job={job_id} the same transcription request again" not in stack.log_text("ingest")[logged_before:]:
            assert time.monotonic() < deadline, stack.log_tail("ingest")
            time.sleep(0.2)
        time.sleep(1)  # waiting on the job
    deadline = time.monotonic() + 10
    while counted("499") == before["499"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert {status: counted(status) - before[status] for status in before} == {"499": 1, "503": 0}
    assert f"job={job_id} the client went away before the job ended" in stack.log_text("ingest")[logged_before:]


def test_the_text_is_answered_once_stored_without_waiting_for_its_search_vectors(stack, fixtures_dir):
    """The answer waited for the job to end, which it does once the embedder stored every chunk's
    search vectors: with Ollama away a request was answered 503 after 5 minutes (and the SDK sent
    the file again), and a stream never got its transcript.text.done, though every chunk's text
    was stored, final, minutes before. Both are answered once the job is at `embedding`."""
    from tests.conftest import wait_for_port

    ollama_port = int(stack.env["OLLAMA_URL"].rsplit(":", 1)[1])
    name = f"unembedded {uuid.uuid4().hex[:6]}.flac"
    recording = (name, (fixtures_dir / "jfk.flac").read_bytes())
    sdk = openai.OpenAI(base_url=f"{stack.api}/v1", api_key="-", max_retries=0, timeout=120)
    streamed: list = []

    def stream() -> None:
        streamed.extend(sdk.audio.transcriptions.create(model="whisper-1", file=recording, stream=True))

    stack.stop("ollama")
    try:
        answer = sdk.audio.transcriptions.create(model="whisper-1", file=recording, response_format="verbose_json")
        [held] = stack.query("SELECT id, status, stage FROM transcripts WHERE filename = $1", name)
        streaming = threading.Thread(target=stream, daemon=True)
        streaming.start()
        streaming.join(60)
        [still] = stack.query("SELECT status, stage FROM transcripts WHERE id = $1", held["id"])
    finally:
        stack.start("ollama", "-m", "tests.fake_ollama", "--port", str(ollama_port))
        wait_for_port(ollama_port, timeout=120)
    assert (held["status"], held["stage"]) == ("processing", "embedding") == (still["status"], still["stage"])
    assert "ask not" in answer.text.lower() and answer.language == "english" and answer.segments, answer
    assert [e.type for e in streamed][-1:] == ["transcript.text.done"] and streamed[-1].text == answer.text
    assert "".join(e.delta for e in streamed[:-1]) == answer.text
    # Embedded once Ollama is back, the job ends with that same text, and the same request gets it.
    assert stack.wait_finished(held["id"], timeout=180)["status"] == "done"
    assert sdk.audio.transcriptions.create(model="whisper-1", file=recording).text == answer.text
    assert [job["id"] for job in stack.query("SELECT id FROM transcripts WHERE filename = $1", name)] == [held["id"]]


def test_a_stream_without_news_for_the_wait_limit_is_told_to_come_back(stack, made_job, fixtures_dir, monkeypatch):
    """A streamed transcription had no deadline: its keep-alive comments reset the SDK's read
    timeout, so a job that never ends held the call open for ever. After WAIT_S without news it
    ends as a wait past WAIT_S does: the job goes on, send the request again."""
    from litestar.testing import TestClient

    from services.ingest import live, openai_api
    from services.ingest.app import create_app

    name = f"endless {uuid.uuid4().hex[:6]}.flac"
    content = (fixtures_dir / "jfk.flac").read_bytes()
    job_id = made_job(name, content, status="processing")  # a job that runs on: nothing works on it
    stack.query("UPDATE transcripts SET request_hash = $1 WHERE id = $2", same_request_hash(content, name), job_id)
    monkeypatch.setattr(openai_api, "WAIT_S", 2.0)
    monkeypatch.setattr(live, "KEEPALIVE_S", 0.5)
    # Without a deadline the stream would never end: the job is failed after a while, which ends it.
    failing = threading.Timer(30, stack.query, ("UPDATE transcripts SET status = 'error', error = 'given up by the"
                                                " test' WHERE id = $1", job_id))
    failing.start()
    started = time.monotonic()
    try:
        with TestClient(create_app(stack.settings()), timeout=60) as http:
            sdk = openai.OpenAI(base_url="http://testserver.local/v1", api_key="-", http_client=http, max_retries=0)
            with pytest.raises(openai.APIError) as ended:
                list(sdk.audio.transcriptions.create(model="whisper-1", file=(name, content), stream=True))
    finally:
        failing.cancel()
    took = time.monotonic() - started
    assert ended.value.message.startswith(f"job {job_id} is still processing, nothing new for 2 s;"), \
        ended.value.message
    assert "goes on: send the request again" in ended.value.message and took < 20, took
    assert stack.query("SELECT status FROM transcripts WHERE id = $1", job_id)[0]["status"] == "processing"


def test_a_diarized_stream_sends_each_segment_with_its_speaker(stack, made_job, client, fixtures_dir):
    """OpenAI's diarizing model streams a transcript.text.segment event (id, start, end, speaker,
    text) per segment before transcript.text.done, and its deltas name their segment: here a
    stream asked for diarized_json sent only deltas, without a word of who spoke. The speakers
    are named as the answer without `stream` names them (A, B... or an enrolled speaker's name)."""
    name = f"diarized {uuid.uuid4().hex[:6]}.flac"
    content = (fixtures_dir / "jfk.flac").read_bytes()
    job_id = made_job(name, content)
    stack.query("UPDATE transcripts SET request_hash = $1 WHERE id = $2", same_request_hash(content, name), job_id)
    for chunk, index, speaker, start, text in ((0, 0, "spk_1", 0.5, "Good morning."), (0, 1, "spk_0", 2.0, "Hello."),
                                               (1, 0, "spk_2", 6.0, "Shall we begin?"),
                                               (1, 1, "spk_1", 8.0, "Yes.")):
        stack.query("INSERT INTO segments (transcript_id, chunk_index, index, speaker, start_ts, end_ts, text)"
                    " VALUES ($1, $2, $3, $4, $5::float8, $5::float8 + 1, $6)", job_id, chunk, index, speaker, start,
                    text)
    stack.query("INSERT INTO transcript_speakers (transcript_id, speaker, name, name_source)"
                " VALUES ($1, 'spk_2', 'Anna', 'manual')", job_id)
    whole = client.audio.transcriptions.create(model="whisper-1", file=(name, content), response_format="diarized_json")
    events = list(client.audio.transcriptions.create(model="whisper-1", file=(name, content), stream=True,
                                                     response_format="diarized_json"))
    segments = [e for e in events if e.type == "transcript.text.segment"]
    assert [(s.id, s.start, s.end, s.speaker, s.text) for s in segments] == [
        (s.id, s.start, s.end, s.speaker, s.text) for s in whole.segments]
    assert [s.speaker for s in segments] == ["A", "B", "Anna", "A"]
    deltas = [e for e in events if e.type == "transcript.text.delta"]
    assert [d.segment_id for d in deltas] == [s.id for s in segments]
    assert events[-1].type == "transcript.text.done" and events[-1].text == whole.text
    # Without diarized_json, deltas alone, as before.
    plain = list(client.audio.transcriptions.create(model="whisper-1", file=(name, content), stream=True))
    assert {e.type for e in plain} == {"transcript.text.delta", "transcript.text.done"}


def test_a_silent_recordings_language_is_named_as_asked_or_english(stack, client, fixtures_dir):
    """verbose_json answered "language": null for a recording nobody talks in (no language was
    detected), where OpenAI's type is a string: the asked language's name, else English."""
    name = f"silent {uuid.uuid4().hex[:6]}.wav"
    recording = (name, (fixtures_dir / "empty.wav").read_bytes())
    detected = client.audio.transcriptions.create(model="whisper-1", file=recording, response_format="verbose_json")
    asked = client.audio.transcriptions.create(model="whisper-1", file=recording, response_format="verbose_json",
                                               language="de")
    assert (detected.text, detected.language) == ("", "english"), detected
    assert (asked.text, asked.language) == ("", "german"), asked
    # Nothing was detected in the first; the second's language is the one asked.
    jobs = stack.query("SELECT status, language FROM transcripts WHERE filename = $1 ORDER BY id", name)
    assert [(job["status"], job["language"]) for job in jobs] == [("done", None), ("done", "de")]


def test_postgresql_going_away_while_a_request_waits_is_logged_with_its_job(stack, made_job, fixtures_dir):
    """The route has no job_id in its path: the 503 of PostgreSQL going away while the request
    waited for its job (and a 500 in rendering) was logged without `job=`, though the job was
    known by then. The request records its job once known, and the error's line carries it."""
    from tests.test_live import CuttableProxy

    name = f"wait outage {uuid.uuid4().hex[:6]}.flac"
    content = (fixtures_dir / "jfk.flac").read_bytes()
    job_id = made_job(name, content, status="processing")  # a job that runs on: nothing works on it
    stack.query("UPDATE transcripts SET request_hash = $1 WHERE id = $2", same_request_hash(content, name), job_id)
    answers: list[httpx.Response] = []
    proxy = CuttableProxy(stack.database_url)
    process = "ingest-openai-wait-outage"
    logged_before = len(stack.log_text(process))
    try:
        with another_ingest(stack, process, DATABASE_URL=proxy.url) as api:
            waiting = threading.Thread(target=lambda: answers.append(httpx.post(
                f"{api}/v1/audio/transcriptions", files={"file": (name, content)}, data={"model": "whisper-1"},
                timeout=60)))
            waiting.start()
            deadline = time.monotonic() + 60
            while f"job={job_id} the same transcription request again" not in stack.log_text(process)[logged_before:]:
                assert time.monotonic() < deadline and waiting.is_alive(), stack.log_tail(process)
                time.sleep(0.2)
            time.sleep(1)  # waiting on the job
            proxy.cut()
            waiting.join(30)
            logged = stack.log_text(process)[logged_before:]
    finally:
        proxy.cut()
    [answer] = answers
    assert answer.status_code == 503, answer.text
    [line] = [line for line in logged.splitlines() if "backing service unavailable" in line]
    assert f"job={job_id} POST /v1/audio/transcriptions: backing service unavailable" in line, line
