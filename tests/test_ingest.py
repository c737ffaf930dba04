"""What the API answers for bad requests, and what it serves besides jobs."""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, unquote

import httpx
import pytest
from pydantic import SecretStr

from tests.conftest import Stack, another_ingest, through_another_ingest
from tests.test_db_timeouts import FreezableProxy


def post(stack: Stack, content: bytes, name: str = "audio.mp3", data: dict | None = None) -> httpx.Response:
    return httpx.post(f"{stack.api}/recognize", files={"file": (name, content)}, data=data or {}, timeout=60)


@pytest.mark.parametrize("case, content, name, expected, says", [
    ("text file", b"this is not audio at all\n" * 40, "notes.txt", 415, "not audio"),
    ("text named .mp3", b"hello, I am text pretending to be sound\n" * 40, "song.mp3", 415, "not audio"),
    ("zero bytes", b"", "audio.wav", 400, "empty"),
])
def test_undecodable_or_empty_uploads_are_rejected(stack, case, content, name, expected, says):
    before = stack.value("SELECT count(*) FROM transcripts")
    response = post(stack, content, name)
    assert response.status_code == expected, (case, response.text)
    assert says in response.json()["detail"]
    assert stack.value("SELECT count(*) FROM transcripts") == before  # no job, no row


def test_truncated_mp3_is_rejected(stack, fixtures_dir):
    head = (fixtures_dir / "multilingual.mp3").read_bytes()[:300]
    response = post(stack, head, "cut.mp3")
    assert response.status_code == 415, response.text


def test_upload_over_the_limit_is_413(stack):
    response = post(stack, b"\0" * (6 * 1024 * 1024), "big.wav")  # MAX_UPLOAD_MB=5 in tests
    assert response.status_code == 413, response.text


def test_missing_file_field_is_400(stack):
    response = httpx.post(f"{stack.api}/recognize", files={"upload": ("a.wav", b"RIFF")}, timeout=30)
    assert response.status_code == 400, response.text


def test_inconsistent_speaker_hints_are_400(stack, fixtures_dir):
    content = (fixtures_dir / "jfk.flac").read_bytes()
    response = post(stack, content, "jfk.flac", {"min_speakers": "3", "max_speakers": "2"})
    assert response.status_code == 400, response.text  # in plain words, not "form: Value error, ..."
    assert response.json()["detail"] == "form: min_speakers must not exceed max_speakers", response.text
    response = post(stack, content, "jfk.flac", {"num_speakers": "two"})
    assert response.status_code == 400 and "num_speakers: Input should be a valid integer" in response.json()["detail"]
    # A field in a charset Python does not know is the client's error, not a 500.
    response = httpx.post(f"{stack.api}/recognize", timeout=60, files={
        "file": ("jfk.flac", content), "reference": (None, b"x", "text/plain; charset=bogus")})
    assert response.status_code == 400 and "charset" in response.text, response.text
    # A misspelt option is not dropped without a word (the job would run without it).
    response = post(stack, content, "jfk.flac", {"num_speaker": "2"})
    assert response.status_code == 400 and "unknown form field 'num_speaker'" in response.text, response.text


def test_blank_form_fields_and_auto_language_ask_for_nothing(stack, fixtures_dir):
    """What a plain HTML form sends for inputs left empty, and what front ends send for
    "detect the language", submit the job as if those fields were left out."""
    blank = {"language": "auto", "num_speakers": "", "min_speakers": "", "max_speakers": "", "callback_url": " "}
    response = post(stack, (fixtures_dir / "jfk.flac").read_bytes(), "jfk.flac", blank)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert stack.wait_finished(job_id)["status"] == "done"
    assert httpx.get(f"{stack.api}/transcripts/{job_id}").json()["language"] == "en"  # detected


def test_speaker_hint_is_honoured(stack, fixtures_dir):
    response = stack.submit(fixtures_dir / "sample.wav", data={"num_speakers": "3"})
    assert response.status_code == 202
    document = stack.wait_finished(response.json()["id"])
    assert document["status"] == "done"
    assert len({s["speaker"] for s in document["segments"]}) == 3


def test_a_request_sent_again_with_its_idempotency_key_makes_one_job(stack, fixtures_dir):
    """A client that lost the answer (a timeout, a dropped connection) sends the request again:
    with the same Idempotency-Key it gets the first answer, at once or later, and one job."""
    key = f"upload-{uuid.uuid4()}"
    audio = (fixtures_dir / "jfk.flac").read_bytes()

    def send(language: str = "en", idempotency_key: str = key) -> httpx.Response:
        return httpx.post(f"{stack.api}/recognize", files={"file": ("jfk.flac", audio)}, data={"language": language},
                          headers={"Idempotency-Key": idempotency_key}, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        answers = list(pool.map(lambda _: send(), range(2)))  # both at once
    answers.append(send())  # and once more later
    assert [a.status_code for a in answers] == [202] * 3, [a.text for a in answers]
    [job_id] = {a.json()["id"] for a in answers}
    assert sorted(a.headers.get("idempotent-replayed", "") for a in answers) == ["", "true", "true"]
    assert stack.value("SELECT count(*) FROM transcripts WHERE idempotency_key = $1", key) == 1

    other = send(language="de")  # the same key for another request is a mistake, not a replay
    assert other.status_code == 422 and f"job {job_id}" in other.json()["detail"]
    assert send(idempotency_key="a key with spaces").status_code == 400

    rerun_key = f"rerun-{uuid.uuid4()}"
    reruns = [httpx.post(f"{stack.api}/transcripts/{job_id}/rerun", json={"num_speakers": 1},
                         headers={"Idempotency-Key": rerun_key}, timeout=60) for _ in range(2)]
    assert [r.status_code for r in reruns] == [202, 202]
    assert reruns[0].json()["id"] == reruns[1].json()["id"] != job_id
    assert reruns[1].headers["idempotent-replayed"] == "true"


def test_a_rerun_sent_again_after_a_person_its_original_expects_was_renamed_gets_its_job(stack, made_job,
                                                                                         fixtures_dir):
    """`stt rerun 5 --speakers 3` lost its answer, and the person job 5 expects was renamed before
    it was sent again: the resend was 422 "this Idempotency-Key was used for another request", as
    its key's hash was of job 5's options (the rename rewrites them) merged with the changes. The
    hash is of what the request itself asked for: the resend gets the job the first one made."""
    name = f"Anna {uuid.uuid4().hex[:8]}"
    speaker_id = stack.value("INSERT INTO speakers (owner, name) VALUES (NULL, $1) RETURNING id", name)
    made: list[int] = []
    try:
        original = made_job("expects anna.flac", (fixtures_dir / "jfk.flac").read_bytes(),
                            options={"expected_speakers": [name]})
        key = f"rerun-renamed-{uuid.uuid4()}"

        def rerun() -> httpx.Response:
            return httpx.post(f"{stack.api}/transcripts/{original}/rerun", json={"num_speakers": 1},
                              headers={"Idempotency-Key": key}, timeout=60)

        first = rerun()
        assert first.status_code == 202, first.text
        made.append(first.json()["id"])
        renamed = httpx.patch(f"{stack.api}/speakers/{speaker_id}", json={"name": f"{name} K."}, timeout=60)
        assert renamed.status_code == 200, renamed.text
        assert stack.value("SELECT options->'expected_speakers'->>0 FROM transcripts WHERE id = $1",
                           original) == f"{name} K."
        again = rerun()
        assert again.status_code == 202, again.text
        assert again.json()["id"] == first.json()["id"] and again.headers.get("idempotent-replayed") == "true"
        assert stack.value("SELECT count(*) FROM transcripts WHERE idempotency_key = $1", key) == 1
        # Another request under the same key is still refused.
        other = httpx.post(f"{stack.api}/transcripts/{original}/rerun", json={"num_speakers": 2},
                           headers={"Idempotency-Key": key}, timeout=60)
        assert other.status_code == 422 and f"job {first.json()['id']}" in other.json()["detail"], other.text
    finally:
        for job_id in made:
            httpx.post(f"{stack.api}/transcripts/{job_id}/cancel", timeout=60)
            stack.wait_finished(job_id, 120)
            httpx.delete(f"{stack.api}/transcripts/{job_id}", timeout=60)
        httpx.delete(f"{stack.api}/speakers/{speaker_id}", timeout=60)


def test_multichannel_is_one_of_the_listed_words(stack, made_job, fixtures_dir):
    """`multichannel` took pydantic's lax bool: t/f, y/n were taken, "true " (a blank after it) was
    a 400. It takes true/false, 1/0, yes/no, on/off in any case, blanks around them ignored, as
    `stream` does; on /recognize and in a rerun's JSON alike (bucket drops: tests/test_units.py)."""
    audio = (fixtures_dir / "jfk.flac").read_bytes()
    original = made_job("any.flac", audio)
    made: list[int] = []

    def recognize(value: str) -> httpx.Response:
        return post(stack, audio, "jfk.flac", {"multichannel": value})

    def rerun(value: object) -> httpx.Response:
        return httpx.post(f"{stack.api}/transcripts/{original}/rerun", json={"multichannel": value}, timeout=60)

    try:
        for send, value in ((recognize, "t"), (recognize, "Y"), (rerun, "n"), (rerun, "f"), (rerun, 2)):
            refused = send(value)
            assert refused.status_code == 400, (value, refused.text)
            assert refused.json()["detail"] == ("multichannel: true or false (1/0, yes/no, on/off; blank or left out:"
                                                " false)"), refused.text
        for send, value, meant in ((recognize, " TRUE ", True), (recognize, "off", False), (rerun, " On ", True),
                                   (rerun, "0", False), (rerun, True, True)):
            taken = send(value)
            assert taken.status_code == 202, (value, taken.text)
            made.append(taken.json()["id"])
            assert stack.value("SELECT (options->>'multichannel')::boolean FROM transcripts WHERE id = $1",
                               made[-1]) is meant, value
    finally:
        for job_id in made:
            httpx.post(f"{stack.api}/transcripts/{job_id}/cancel", timeout=60)
        for job_id in made:
            stack.wait_finished(job_id, 120)
            httpx.delete(f"{stack.api}/transcripts/{job_id}", timeout=60)


def test_unknown_job_is_404(stack):
    for job_id in ("987654321", "0", "-3", str(2**63), "1" + "0" * 30):  # beyond bigint too, not a 500
        response = httpx.get(f"{stack.api}/status/{job_id}")
        assert response.status_code == 404, (job_id, response.text)


def test_health_readiness_and_openapi(stack):
    assert httpx.get(f"{stack.api}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{stack.api}/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"postgres": "ok", "rabbitmq": "ok", "object_store": "ok"}
    assert httpx.get(f"{stack.api}/readyz", params={"need": "postgres"}).status_code == 200
    unknown = httpx.get(f"{stack.api}/readyz", params={"need": "postgres,redis"})
    assert unknown.status_code == 400 and "redis" in unknown.text, unknown.text
    schema = httpx.get(f"{stack.api}/docs/openapi.json").json()
    assert {"/recognize", "/status/{job_id}"} <= set(schema["paths"])
    assert "swagger" in httpx.get(f"{stack.api}/docs/").text.lower()


def test_the_openapi_document_says_an_upload_may_be_given_up_with_408(stack):
    """Every route that takes an upload's body answers 408 when it stops coming (or comes too
    slowly while every upload place is taken); a client generated from the document knows it."""
    paths = httpx.get(f"{stack.api}/docs/openapi.json").json()["paths"]
    uploads = ("/recognize", "/v1/audio/transcriptions", "/v1/audio/translations", "/speakers")
    assert {path: "408" in paths[path]["post"]["responses"] for path in uploads} == dict.fromkeys(uploads, True)


def test_a_url_that_is_not_utf8_text_is_refused_by_its_form():
    """A lone surrogate (from a field decoded with Python's unicode_escape, say) cannot be sent
    nor stored: the webhook was refused by the database inside the job's transaction, a 503
    "try again later" that could never succeed."""
    from common.outbound import url_problem

    assert url_problem("https://example.com/\ud800", "a callback URL") == "a callback URL is not UTF-8 text"
    assert url_problem("https://example.com/ünïcode") is None


@pytest.fixture(scope="module")
def two_uploads_at_once(stack):
    """The stack as seen through a second ingest that takes two uploads at once (the bound is
    ingest's own: the workers behind it are the stack's)."""
    with through_another_ingest(stack, "ingest-two-uploads", MAX_CONCURRENT_UPLOADS="2") as bounded:
        yield bounded


def slow_upload(stack: Stack, audio: bytes, seconds: float) -> httpx.Response:
    """A multipart upload whose body trickles in over `seconds` (a slow client or a big file)."""
    boundary = "slowboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"slow.wav\"\r\n"
            f"Content-Type: audio/wav\r\n\r\n").encode()

    def body():
        yield head
        pieces = 10
        step = len(audio) // pieces + 1
        for i in range(0, len(audio), step):
            time.sleep(seconds / pieces)
            yield audio[i:i + step]
        yield f"\r\n--{boundary}--\r\n".encode()

    return httpx.post(f"{stack.api}/recognize", content=body(), timeout=60,
                      headers={"content-type": f"multipart/form-data; boundary={boundary}"})


def test_uploads_beyond_the_bound_are_told_to_retry(two_uploads_at_once, fixtures_dir):
    stack = two_uploads_at_once
    audio = (fixtures_dir / "jfk.flac").read_bytes()
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        slow = [pool.submit(slow_upload, stack, audio, 8.0) for _ in range(2)]
        time.sleep(2.0)  # both are streaming in now (the stack's workers may still be loading models)
        refused = stack.submit(fixtures_dir / "jfk.flac")
        still_uploading = [not future.done() for future in slow]
        accepted = [future.result() for future in slow]
    assert refused.status_code == 503 and refused.headers["retry-after"] == "5", refused.text
    # Refused without waiting for a slot: while both slow uploads were still streaming in.
    assert "uploads are in progress" in refused.json()["detail"]
    assert still_uploading == [True, True], "the refusal came only after a slow upload had ended"
    assert [r.status_code for r in accepted] == [202, 202], [r.text for r in accepted]
    later = stack.submit(fixtures_dir / "jfk.flac")  # the slots are free again
    assert later.status_code == 202, later.text
    for job_id in [*(r.json()["id"] for r in accepted), later.json()["id"]]:
        assert stack.wait_finished(job_id)["status"] == "done"


def test_the_cli_waits_out_a_busy_server(two_uploads_at_once, fixtures_dir):
    stack = two_uploads_at_once
    audio = (fixtures_dir / "jfk.flac").read_bytes()
    stt = str(Path(sys.executable).parent / "stt")
    env = {name: value for name, value in os.environ.items() if name not in ("STT_API_URL", "STT_API_KEY")}
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        slow = [pool.submit(slow_upload, stack, audio, 7.0) for _ in range(2)]
        time.sleep(1.5)  # both slots are taken now
        cli = subprocess.run([stt, "submit", "--no-wait", "--api", stack.api, str(fixtures_dir / "jfk.flac")],
                             env=env, capture_output=True, text=True, timeout=120)
        accepted = [future.result() for future in slow]
    assert [r.status_code for r in accepted] == [202, 202], [r.text for r in accepted]
    assert cli.returncode == 0, cli.stderr
    assert "jfk.flac: the server is busy, trying again in 5 s" in cli.stderr
    assert stack.wait_finished(int(cli.stdout.strip()))["status"] == "done"


# ---- recordings fetched by URL ----------------------------------------------------------------


def form(**fields: str) -> dict:
    """Multipart form fields without a file, as `curl -F name=value` sends them."""
    return {name: (None, value) for name, value in fields.items()}


@contextlib.contextmanager
def serving(files: dict[str, bytes]) -> Iterator[str]:
    """An HTTP server on this machine: `files` by path, /go/<path> redirecting to /<path>."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the http.server name)
            if self.path.startswith("/slow/"):  # /slow/<n>/<path>: n redirects of a second each
                hops, target = self.path.removeprefix("/slow/").split("/", 1)
                time.sleep(1.0)
                self.send_response(302)
                self.send_header("Location", f"/slow/{int(hops) - 1}/{target}" if int(hops) > 1 else f"/{target}")
                self.end_headers()
            elif self.path.startswith("/go/"):
                self.send_response(302)
                self.send_header("Location", self.path.removeprefix("/go"))
                self.end_headers()
            elif self.path.startswith("/to/"):  # /to/<a Location, percent-encoded>: a redirect there, as UTF-8
                self.send_response(302)
                self.send_header("Location", unquote(self.path.removeprefix("/to/")).encode().decode("latin-1"))
                self.end_headers()
            elif self.path in files:
                self.send_response(200)
                self.send_header("Content-Length", str(len(files[self.path])))
                self.end_headers()
                self.wfile.write(files[self.path])
            else:
                self.send_error(404)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def fetching(stack) -> Iterator[str]:
    """A second ingest of the stack that may fetch from this machine (AUDIO_URL_ALLOW_PRIVATE),
    for at most 3 s a recording."""
    with another_ingest(stack, "ingest-fetching", AUDIO_URL_ALLOW_PRIVATE="true", AUDIO_URL_TIMEOUT_S="3") as api:
        yield api


def test_a_recording_is_fetched_from_its_url(stack, fetching, fixtures_dir):
    files = {"/calls/en_dialogue.wav": (fixtures_dir / "en_dialogue.wav").read_bytes(),
             "/notes.txt": b"not a recording\n" * 100, "/big.wav": b"\0" * (6 * 1024 * 1024)}
    with serving(files) as site:
        accepted = httpx.post(f"{fetching}/recognize", files=form(url=f"{site}/go/calls/en_dialogue.wav",
                                                                   num_speakers="2"), timeout=60)
        assert accepted.status_code == 202, accepted.text
        assert accepted.json()["filename"] == "en_dialogue.wav"  # the name in the address it led to
        for path, status, says in [("/missing.wav", 400, "answered HTTP 404"), ("/notes.txt", 415, "not audio"),
                                   ("/big.wav", 413, "MAX_UPLOAD_MB"),
                                   # each answer within the 3 s, the whole fetch not
                                   ("/slow/5/calls/en_dialogue.wav", 400, "AUDIO_URL_TIMEOUT_S (3 s)")]:
            refused = httpx.post(f"{fetching}/recognize", files=form(url=site + path), timeout=60)
            assert refused.status_code == status and says in refused.json()["detail"], (path, refused.text)
        # This stack's own ingest keeps the default: nothing on this machine's network is fetched
        private = httpx.post(f"{stack.api}/recognize", files=form(url=f"{site}/calls/en_dialogue.wav"), timeout=60)
        assert private.status_code == 400 and "AUDIO_URL_ALLOW_PRIVATE" in private.json()["detail"], private.text
    document = stack.wait_finished(accepted.json()["id"])
    assert document["status"] == "done" and {s["speaker"] for s in document["segments"]} == {"spk_0", "spk_1"}
    assert "sales" in " ".join(s["text"] for s in document["segments"]).lower()


def test_a_redirect_to_an_address_that_is_not_a_url_is_refused_with_the_reason(stack, fetching):
    """A server that redirected to a Location that is no URL (an unclosed IPv6 bracket, a host that
    NFKC makes another) was answered 500 with a traceback: joining it to the address raised a
    ValueError, which the fetch did not take for a failure to fetch."""
    logged_before = len(stack.log_text("ingest-fetching"))
    with serving({}) as site:
        for location in ("http://[", "http://[::1", "//[x]/", "https://ex\uff03ample.com/"):
            refused = httpx.post(f"{fetching}/recognize", files=form(url=f"{site}/to/{quote(location, safe='')}"),
                                 timeout=60)
            detail = refused.json()["detail"]
            assert refused.status_code == 400, (location, refused.text)
            assert "127.0.0.1 redirected to an address that is not a valid URL" in detail, (location, detail)
    logged = stack.log_text("ingest-fetching")[logged_before:]
    assert "POST /recognize failed" not in logged and "Traceback" not in logged, logged


@pytest.mark.parametrize("fields, files", [({}, None), ({"url": "https://example.org/a.wav"}, "a.wav")])
def test_a_recording_is_a_file_or_a_url_not_both_nor_neither(stack, fields, files):
    response = httpx.post(f"{stack.api}/recognize", files={**form(**fields, language="en"),
                                                           **({"file": (files, b"RIFF")} if files else {})}, timeout=60)
    assert response.status_code == 400 and "one of the two" in response.json()["detail"], response.text


@pytest.mark.parametrize("url, says", [("ftp://example.org/a.wav", "http:// or https://"),
                                       ("https://user:pw@example.org/a.wav", "presigned"),
                                       ("http://169.254.169.254/latest/meta-data", "private"),
                                       # (these were a 500: split, for the rate floor, before they were checked)
                                       ("http://[::1", "an audio URL is not a valid URL (Invalid IPv6 URL)"),
                                       ("http://[a]/", "an audio URL is not a valid URL"),
                                       ("https://ex\uff03ample.com/", "an audio URL is not a valid URL")])
def test_audio_urls_that_cannot_be_fetched_are_refused_with_the_reason(stack, url, says):
    response = httpx.post(f"{stack.api}/recognize", files=form(url=url), timeout=60)
    assert response.status_code == 400 and says in response.json()["detail"], response.text


def test_a_file_sent_as_a_plain_field_is_told_so(stack):
    """A part without a filename is a text field; a file's bytes there are not UTF-8."""
    body = (b'--b\r\nContent-Disposition: form-data; name="file"\r\n\r\n\x89PNG\r\n\x1a\n\x00\xff\r\n--b--\r\n')
    response = httpx.post(f"{stack.api}/recognize", content=body,
                          headers={"content-type": "multipart/form-data; boundary=b"}, timeout=60)
    assert response.status_code == 400 and "filename" in response.json()["detail"], response.text


def test_a_form_that_is_not_multipart_is_told_so(stack):
    response = httpx.post(f"{stack.api}/recognize", data={"url": "https://example.org/a.wav"}, timeout=60)
    assert response.status_code == 400, response.text
    assert "multipart/form-data" in response.json()["detail"] and "urlencoded" in response.json()["detail"]


def test_without_api_keys_usage_counts_the_jobs_made_while_keys_were_on(stack):
    """A server that ran with API_KEYS and now runs without: its jobs are everyone's, as
    GET /transcripts shows them, and GET /usage counts them too."""
    before = httpx.get(f"{stack.api}/usage").json()
    stack.query("INSERT INTO job_usage (job_id, owner, ended_at, status, audio_s)"
                " VALUES (987654, 'the-hash-of-an-old-key', now(), 'done', 12.5)")
    try:
        after = httpx.get(f"{stack.api}/usage").json()
    finally:
        stack.query("DELETE FROM job_usage WHERE job_id = 987654")
    assert (after["jobs"] - before["jobs"], round(after["audio_s"] - before["audio_s"], 3)) == (1, 12.5)
    assert len({day["day"] for day in after["days"]}) == len(after["days"])  # one line a day


def test_a_name_that_turns_private_as_it_is_connected_to_is_refused_with_the_reason(stack, monkeypatch):
    """An address's name is checked before each request and again as its connection is made (a
    name that changes its address in between, DNS rebinding). Refused at the connection, the
    reason was lost in aiohttp's wrapping: "Cannot connect to host localhost:80 ssl:default [None]".
    Here the first check is passed, as a rebinding name passes it, and the name is localhost."""
    from litestar.testing import TestClient

    from services.ingest import fetch
    from services.ingest.app import create_app

    async def passed(*args, **kwargs) -> None:
        return None

    monkeypatch.setattr(fetch, "target_problem", passed)
    with TestClient(create_app(stack.settings(audio_url_allow_private=False)), timeout=60) as client:
        response = client.post("/recognize", files=form(url="http://localhost:9/meeting.wav"))
    detail = response.json()["detail"]
    assert response.status_code == 400, response.text
    assert "localhost does not resolve to a public address" in detail and "AUDIO_URL_ALLOW_PRIVATE" in detail, detail
    assert not any(leak in detail for leak in ("127.0.0.1", "::1", "[None]")), detail  # the address stays in the log


@contextlib.contextmanager
def trickling(size: int, every_s: float, answers_after_s: float = 0.0,
              asked: threading.Event | None = None) -> Iterator[str]:
    """An HTTP server on this machine answering every GET, after `answers_after_s`, with `size`
    bytes (its Content-Length), one byte every `every_s` seconds; its address. `asked` is set as a
    GET arrives."""
    stop = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the http.server name)
            if asked is not None:
                asked.set()
            if stop.wait(answers_after_s):
                return
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            for _ in range(size):
                if stop.wait(every_s):
                    return
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return  # the fetch was given up

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/meeting.wav"
    finally:
        stop.set()
        server.shutdown()


def test_a_recording_trickled_in_by_its_server_gives_up_its_upload_place(stack, monkeypatch):
    """A `url` submission holds a place among MAX_CONCURRENT_UPLOADS while it downloads, and the rate
    floor that stops a trickled upload body was never applied to it: MAX_CONCURRENT_UPLOADS
    submissions of a server sending a byte every 50 s (within the 60 s without anything) locked
    every upload out for AUDIO_URL_TIMEOUT_S (10 minutes). The download is now held to the body's
    rate (here 4 KiB/s after 1 s, for the test's sake) while every place is taken, and given up with
    the reason; while one is free, a slow server takes as long as it takes, as a slow upload does."""
    from services.ingest import admission
    from services.ingest.app import create_app
    from tests.test_bad_input import served

    monkeypatch.setattr(admission, "UPLOAD_RATE_GRACE_S", 1.0)
    monkeypatch.setattr(admission, "UPLOAD_MIN_RATE", 4096)
    monkeypatch.setattr(admission, "UPLOAD_RATE_CHECK_S", 0.05)
    # Every place taken (the only one, by the fetch itself): given up past the grace, not after
    # AUDIO_URL_TIMEOUT_S (20 s here).
    asked = threading.Event()
    with trickling(2**20, 0.1, asked=asked) as url, served(create_app(stack.settings(
            max_concurrent_uploads=1, audio_url_allow_private=True, audio_url_timeout_s=20))) as api:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            fetching = pool.submit(httpx.post, f"{api}/recognize", files=form(url=url), timeout=60)
            # The fetch holds its place from before its GET (the place is taken as its request comes in).
            assert asked.wait(30), fetching.result() if fetching.done() else "the fetch never asked for the recording"
            held = httpx.post(f"{api}/recognize", files=form(url=url), timeout=30)  # meanwhile: no place
            answer = fetching.result()
            elapsed = time.monotonic() - started
        assert held.status_code == 503, held.text
        detail = answer.json()["detail"]
        assert answer.status_code == 400 and "the recording at 127.0.0.1 arrived slower than 4 KiB/s" in detail, detail
        assert elapsed < 10, (elapsed, detail)
        # The place is free again.
        free = httpx.post(f"{api}/recognize", timeout=30)
        assert free.status_code == 400 and "one of the two" in free.json()["detail"], free.text
    # One place of two free: the same trickle goes on past the grace to its end (3 s; not audio).
    with trickling(30, 0.1) as url, served(create_app(stack.settings(
            max_concurrent_uploads=2, audio_url_allow_private=True, audio_url_timeout_s=20))) as api:
        started = time.monotonic()
        answer = httpx.post(f"{api}/recognize", files=form(url=url), timeout=60)
        assert answer.status_code == 415 and "not audio" in answer.json()["detail"], answer.text
        assert time.monotonic() - started >= 3.0
    # Every place taken, a server slow to answer (within the grace) and then fast: no trickle. The
    # time before its answer counts too (past the grace with nothing come, it is given up:
    # test_a_server_that_trickles_the_start_of_its_answer_gives_up_its_upload_place). A grace of
    # 3 s: the whole fetch (its 0.5 s wait included) is to end within it however slow the machine.
    monkeypatch.setattr(admission, "UPLOAD_RATE_GRACE_S", 3.0)
    with trickling(30, 0.0, answers_after_s=0.5) as url, served(create_app(stack.settings(
            max_concurrent_uploads=1, audio_url_allow_private=True, audio_url_timeout_s=20))) as api:
        answer = httpx.post(f"{api}/recognize", files=form(url=url), timeout=60)
        assert answer.status_code == 415 and "not audio" in answer.json()["detail"], answer.text


@contextlib.contextmanager
def never_answering(how: str) -> Iterator[str]:
    """A server on this machine that reads each request and never gets to its answer's end: it
    sends `HTTP/1.1 200 OK` and header lines a byte every 0.3 s ("trickled status line"), or an
    `HTTP/1.1 102 Processing` answer every 0.3 s, which an HTTP client skips to wait on for the
    final one ("102 answers"); its address."""
    stop = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))

    def pieces() -> Iterator[bytes]:
        if how == "102 answers":
            while True:
                yield b"HTTP/1.1 102 Processing\r\n\r\n"
        yield from (bytes([byte]) for byte in b"HTTP/1.1 200 OK\r\n")
        while True:
            yield from (bytes([byte]) for byte in b"X-Still-Coming: yes\r\n")

    def answer(connection: socket.socket) -> None:
        with connection:
            request = b""
            while b"\r\n\r\n" not in request:
                got = connection.recv(4096)
                if not got:
                    return
                request += got
            for piece in pieces():
                if stop.wait(0.3):
                    return
                try:
                    connection.sendall(piece)
                except OSError:
                    return  # the fetch was given up

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=answer, args=(connection,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/meeting.wav"
    finally:
        stop.set()
        listener.close()


@pytest.mark.parametrize("how", ["trickled status line", "102 answers"])
def test_a_server_that_trickles_the_start_of_its_answer_gives_up_its_upload_place(stack, monkeypatch, how):
    """The rate floor counted from the final answer's headers, so everything before them was left
    to the timeouts on silence (60 s without a byte, 30 s per connection, 6 hops): a server that
    sent its status line a byte every 50 s, or `102 Processing` again and again, or answered each
    of 5 redirects after 59 s, held its upload place for all of AUDIO_URL_TIMEOUT_S (10 minutes)
    while every other upload was refused. The floor now counts from the fetch's start, as README
    says and as it does for an upload's body: here given up past the 1 s grace, not after 20 s."""
    from services.ingest import admission
    from services.ingest.app import create_app
    from tests.test_bad_input import served

    monkeypatch.setattr(admission, "UPLOAD_RATE_GRACE_S", 1.0)
    monkeypatch.setattr(admission, "UPLOAD_MIN_RATE", 4096)
    monkeypatch.setattr(admission, "UPLOAD_RATE_CHECK_S", 0.05)
    with never_answering(how) as url, served(create_app(stack.settings(
            max_concurrent_uploads=1, audio_url_allow_private=True, audio_url_timeout_s=20))) as api:
        started = time.monotonic()
        answer = httpx.post(f"{api}/recognize", files=form(url=url), timeout=60)
        elapsed = time.monotonic() - started
        detail = answer.json()["detail"]
        assert answer.status_code == 400 and "the recording at 127.0.0.1 arrived slower than 4 KiB/s" in detail, detail
        assert elapsed < 10, (elapsed, detail)


class CommitAnswerCutter(FreezableProxy):
    """Forwards TCP connections to PostgreSQL byte for byte, but once a connection sends the COMMIT
    of a transaction that inserted a job, the answer to it (which PostgreSQL sends once it has
    committed) is not passed on: the connection is closed instead, as a network dropping it then
    does. Once only; later connections are forwarded whole. With `down_s`, PostgreSQL goes down
    then as far as its clients can tell: every connection is closed, and those made in the next
    `down_s` seconds are closed as they come (until come_back())."""

    COMMIT = b"Q\x00\x00\x00\x0cCOMMIT;\x00"  # asyncpg's, a simple query

    def __init__(self, upstream, down_s: float = 0):
        super().__init__(upstream)  # its start and close; its own forwarding
        self.cut = False
        self.down_s, self.down_until, self.refused = down_s, 0.0, 0

    def go_down(self) -> None:
        if self.down_s:
            self.down_until = time.monotonic() + self.down_s
            for writer in self.writers:
                writer.close()

    def come_back(self) -> None:
        self.down_until = 0.0

    async def _serve(self, client_reader, client_writer) -> None:
        import asyncio

        if time.monotonic() < self.down_until:
            self.refused += 1
            client_writer.close()
            return
        server_reader, server_writer = await self.upstream()
        self.writers += [client_writer, server_writer]
        committing = asyncio.Event()

        async def to_server() -> None:
            inserted = False
            with contextlib.suppress(ConnectionError, OSError):
                while data := await client_reader.read(65536):
                    inserted = inserted or b"INSERT INTO transcripts" in data
                    if inserted and not self.cut and self.COMMIT in data:
                        self.cut = True
                        committing.set()
                    server_writer.write(data)
                    await server_writer.drain()
            server_writer.close()

        async def to_client() -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await server_reader.read(65536):
                    if committing.is_set():  # the COMMIT's answer: it came, so the row is committed
                        self.go_down()
                        break
                    client_writer.write(data)
                    await client_writer.drain()
            client_writer.close()
            server_writer.close()

        for pump in (to_server(), to_client()):
            task = asyncio.create_task(pump)
            self.tasks.add(task)


async def job_through_a_cut_commit(stack, filename: str, down_s: float | None = None):
    """create_job through a proxy that loses the answer to its COMMIT (and keeps PostgreSQL away
    for `down_s` after): the job id, the object keys stored, the proxy and the seconds it took."""
    import asyncio

    from common.db import create_pool
    from common.messages import JobOptions
    from common.storage import upload_bytes
    from services.ingest.jobs import create_job
    from tests.test_db_timeouts import _through, _upstream

    settings = stack.settings()
    url = settings.database_url.get_secret_value()
    s3 = stack.s3()
    stored: list[str] = []

    def put_audio(key: str) -> None:
        upload_bytes(s3, settings.audio_bucket, key, b"RIFF-not-really-audio")
        stored.append(key)

    async with CommitAnswerCutter(_upstream(url), down_s=down_s or 0) as proxy:
        pool = await create_pool(settings.model_copy(update={"database_url": SecretStr(_through(proxy, url))}))
        try:
            started = time.monotonic()
            # Failed through the outbox at once (`refused`), so that no worker takes the made-up audio.
            job_id = await create_job(pool, s3, settings.audio_bucket, put_audio, filename=filename,
                                      options=JobOptions(), owner=None, outbox_wake=asyncio.Event(),
                                      refused="a test's job: its commit's answer was lost",
                                      tell_maybe_created=down_s is not None)
            elapsed = time.monotonic() - started
        finally:
            await pool.close()
    return job_id, stored, proxy, elapsed


async def test_a_job_whose_commit_answer_was_lost_is_the_requests_answer(stack):
    """The job's COMMIT went through but its answer was lost (the connection dropped as it came):
    the recording was kept and the job runs, yet the request was answered 503 "nothing was created;
    try again", and a client sending it again (without an Idempotency-Key) got a second job. The
    job is the answer now (POST /recognize's 202 with its id)."""
    from common.storage import object_exists

    job_id, stored, proxy, _ = await job_through_a_cut_commit(stack, "commit lost.wav")
    assert proxy.cut
    assert stored == [f"uploads/{job_id}"]
    assert stack.value("SELECT filename FROM transcripts WHERE id = $1", job_id) == "commit lost.wav"
    assert object_exists(stack.s3(), stack.settings().audio_bucket, stored[0])


async def test_a_job_whose_commit_answer_was_lost_as_postgresql_went_down_is_looked_for_until_it_is_back(stack):
    """PostgreSQL went down as the job's COMMIT was answered: the row was looked for once, at once,
    the database still down, and the request was answered 503 "the job could not be queued ... try
    again later" while its job was committed and runs (a client without an Idempotency-Key sent it
    again: two jobs). It is looked for again, a little later each time, for ROW_CHECK_S (10 s):
    the database back after 2 s, the job is the request's answer."""
    from common.storage import object_exists

    job_id, stored, proxy, elapsed = await job_through_a_cut_commit(stack, "postgres went down.wav", down_s=2.0)
    assert proxy.cut and proxy.refused >= 1  # it was asked while down, and again once back
    assert 2.0 <= elapsed < 10, elapsed
    assert stored == [f"uploads/{job_id}"]
    assert stack.value("SELECT filename FROM transcripts WHERE id = $1", job_id) == "postgres went down.wav"
    assert object_exists(stack.s3(), stack.settings().audio_bucket, stored[0])


async def test_a_job_whose_commit_cannot_be_told_is_named_in_the_503(stack, fixtures_dir, monkeypatch):
    """PostgreSQL went down as the job's COMMIT was answered, and stays down past ROW_CHECK_S: the
    503 said "the job could not be queued ... try again later" (nothing made, as the README says of
    a 503), while job N was committed and runs. It names the job, to look up before sending again."""
    import asyncio

    from services.ingest import jobs
    from services.ingest.app import create_app
    from tests.test_bad_input import served
    from tests.test_db_timeouts import _through, _upstream

    monkeypatch.setattr(jobs, "ROW_CHECK_S", 1.5)
    reference = f"went down {uuid.uuid4()}"
    settings = stack.settings()
    url = settings.database_url.get_secret_value()
    async with CommitAnswerCutter(_upstream(url), down_s=600) as proxy:
        # Served in a thread of its own, its database reached through this loop's proxy.
        server = served(create_app(stack.settings(database_url=SecretStr(_through(proxy, url)))))
        api = await asyncio.to_thread(server.__enter__)
        try:
            async with httpx.AsyncClient(timeout=60) as client:
                answer = await client.post(f"{api}/recognize", files={
                    "file": ("jfk.flac", (fixtures_dir / "jfk.flac").read_bytes())}, data={"reference": reference})
        finally:
            proxy.come_back()  # for the app to stop as usual
            await asyncio.to_thread(server.__exit__, None, None, None)
    [job_id] = [r["id"] for r in stack.query("SELECT id FROM transcripts WHERE options->>'reference' = $1", reference)]
    try:
        assert proxy.cut and proxy.refused >= 1
        assert answer.status_code == 503, answer.text
        detail = answer.json()["detail"]
        assert f"job {job_id} may have been created" in detail and f"GET /status/{job_id}" in detail, detail
        assert "try again later" not in detail, detail
    finally:
        httpx.post(f"{stack.api}/transcripts/{job_id}/cancel", timeout=60)
        stack.wait_finished(job_id, 120)
        httpx.delete(f"{stack.api}/transcripts/{job_id}", timeout=60)
