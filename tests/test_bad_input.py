"""The bad-input matrix: every case gets a clear 4xx with a message, or a job that ends with a
reason a user understands. And a mix of them leaves no worker crashed and no orphaned object or row.
The outcome of each case is printed as a table at the end of the run."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest

from common.audio import SAMPLE_RATE, decode_audio
from tests.audio_files import encode, wav, wav_header, without_its_length
from tests.conftest import FIXTURES, SERVICES, Stack, free_port, record_figure


@cache
def jfk() -> np.ndarray:
    return decode_audio(str(FIXTURES / "jfk.flac"))


@cache
def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", bytes.fromhex("0000000100000001080200000000"))
            + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b""))


def pdf() -> bytes:
    return (b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n2 0 obj<</Type/Pages/Kids[]/Count 0>>"
            b"endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n")


def long_silence_flac(hours: float) -> bytes:
    return encode(np.zeros(int(hours * 3600 * 8000), dtype=np.float32), "flac", "flac", 8000,
                  channels=1, sample_rate=8000)


def wav_of_codec(format_tag: int) -> bytes:
    """A WAV whose header names the codec `format_tag`."""
    header = wav_header(32_000)
    return header[:20] + format_tag.to_bytes(2, "little") + header[22:] + bytes(32_000)


@dataclass
class Case:
    name: str
    content: Callable[[], bytes]
    filename: str = "audio.wav"
    data: dict = field(default_factory=dict)
    # an HTTP status (4xx) with words the message must contain, or a job's final status and reason
    status: int = 202
    says: str = ""
    job: str | None = None


CASES = [
    Case("text file", lambda: b"meeting notes, not audio\n" * 50, "notes.txt", status=415, says="not audio"),
    Case("text named .mp3", lambda: b"I am text pretending to be sound\n" * 50, "song.mp3", status=415, says="not audio"),
    Case("PDF named .mp3", pdf, "report.mp3", status=415, says="not audio"),
    Case("PNG named .mp3", png, "picture.mp3", status=415, says="not audio"),
    Case("random bytes named .wav", lambda: np.random.default_rng(7).bytes(50_000), status=415, says="not audio"),
    Case("zero bytes", lambda: b"", status=400, says="empty"),
    Case("corrupt WAV header", lambda: b"RIFF\x10\x00\x00\x00WAVEfmX " + b"\x00" * 5000, status=415, says="not audio"),
    Case("WAV header only, no samples", lambda: wav_header(0), status=415, says="not audio"),
    Case("1 Hz sample rate (crafted)", lambda: wav_header(100_000, rate=1) + bytes(100_000), status=415, says="sample rate 1 Hz"),
    Case("9 channels", lambda: wav_header(96_000, channels=9) + bytes(96_000), status=415, says="9 channels"),
    Case("WAV truncated mid-header", lambda: wav(jfk())[:30], status=415, says="not audio"),
    Case("WAV truncated to 0.3 s", lambda: wav(jfk())[:44 + 9600], job="done", says="no speech"),
    Case("FLAC truncated to its header", lambda: fixture("jfk.flac")[:2000], "jfk.flac", status=415, says="not audio"),
    Case("FLAC truncated halfway", lambda: fixture("jfk.flac")[: len(fixture("jfk.flac")) // 2], "jfk.flac", job="done"),
    Case("MP3 truncated to 300 bytes", lambda: fixture("multilingual.mp3")[:300], "a.mp3", status=415, says="not audio"),
    Case("MP3 truncated halfway", lambda: fixture("hotwords.mp3")[: len(fixture("hotwords.mp3")) // 2], "a.mp3", job="done"),
    Case("M4A truncated halfway", lambda: (lambda b: b[: len(b) // 2])(encode(jfk(), "ipod", "aac", 44_100)),
         "a.m4a", status=415, says="not audio"),
    Case("OGG/Vorbis truncated halfway", lambda: (lambda b: b[: len(b) // 2])(encode(jfk(), "ogg", "vorbis", 44_100)),
         "a.ogg", job="done"),
    Case("Opus truncated halfway", lambda: (lambda b: b[: len(b) // 2])(encode(jfk(), "ogg", "libopus", 48_000)),
         "a.opus", job="done"),
    Case("only silence (10 s)", lambda: wav(np.zeros(10 * SAMPLE_RATE, dtype=np.float32)), job="done", says="no speech"),
    Case("0.1 s of audio", lambda: wav(jfk()[: SAMPLE_RATE // 10]), job="done", says="no speech"),
    Case("8 kHz telephone audio", lambda: wav(jfk(), rate=8000), job="done"),
    Case("6-channel audio", lambda: encode(jfk(), "wav", "pcm_s16le", SAMPLE_RATE, channels=6), job="done"),
    Case("192 kHz audio", lambda: encode(jfk()[: 6 * SAMPLE_RATE], "wav", "pcm_s16le", 192_000, channels=1), job="done"),
    Case("µ-law WAV", lambda: encode(jfk(), "wav", "pcm_mulaw", 8000, channels=1), job="done"),
    Case("2 hours (over MAX_AUDIO_HOURS)", lambda: long_silence_flac(2.0), "long.flac", status=413,
         says="'long.flac' is refused: the audio is longer than the limit of 0.1 h"),
    # Matroska/WebM and FLV give the file's length, not the stream's: one was taken, and failed
    # after it was stored and decoded.
    Case("7 min of WebM (over MAX_AUDIO_HOURS)", lambda: encode(np.zeros(420 * 8000, dtype=np.float32), "webm", "libopus",
                                                                48_000, channels=1, sample_rate=8000),
         "long.webm", status=413, says="'long.webm' is refused: the audio is longer than the limit of 0.1 h"),
    Case("2 hours, no length in its header", lambda: without_its_length(long_silence_flac(2.0)), "long.flac",
         job="error", says="longer than"),
    Case("2 channels of 4 min kept apart", lambda: encode(np.zeros(240 * 8000, dtype=np.float32), "flac", "flac",
                                                          8000, channels=2, sample_rate=8000),
         "call.flac", data={"multichannel": "true"}, status=413, says="its 2 channels kept apart"),
    Case("codec without a decoder", lambda: wav_of_codec(0x1234), status=415,
         says="its audio codec cannot be decoded here"),
    Case("file over MAX_UPLOAD_MB", lambda: wav_header(6 * 2**20) + bytes(6 * 2**20), status=413, says="MAX_UPLOAD_MB"),
    Case("missing file field", lambda: b"", status=400, says="send the recording as `file`"),
    Case("unknown form fields", lambda: wav(jfk()), data={"colour": "blue", "priority": "9"}, status=400,
         says="unknown form field 'colour', 'priority'"),
    Case("num_speakers not a number", lambda: wav(jfk()), data={"num_speakers": "two"}, status=400, says="num_speakers"),
    Case("num_speakers = 0", lambda: wav(jfk()), data={"num_speakers": "0"}, status=400, says="num_speakers"),
    Case("min_speakers > max_speakers", lambda: wav(jfk()), data={"min_speakers": "4", "max_speakers": "2"},
         status=400, says="min_speakers"),
    Case("unknown language", lambda: wav(jfk()), data={"language": "klingon"}, status=400, says="unsupported language"),
    Case("unknown language in a list", lambda: wav(jfk()), data={"language": "en,tlh"}, status=400,
         says="unsupported language 'tlh'"),
    Case("speaker count with multichannel", lambda: wav(jfk()), data={"multichannel": "true", "num_speakers": "2"},
         status=400, says="multichannel"),
    Case("vocabulary over 150 characters", lambda: wav(jfk()),
         data={"vocabulary": ", ".join(f"Kubernetes {i}" for i in range(20))}, status=400,
         says="vocabulary is longer than 150 characters"),
    Case("unknown task", lambda: wav(jfk()), data={"task": "summarize"}, status=400, says="task"),
    Case("custom spelling without =", lambda: wav(jfk()), data={"spelling": "ComfyUI"}, status=400,
         says="heard=written"),
    Case("unknown kind to redact", lambda: wav(jfk()), data={"redact": "card,names"}, status=400,
         says="'email', 'card', 'phone' or 'number'"),
    Case("reference over 200 characters", lambda: wav(jfk()), data={"reference": "x" * 201}, status=400,
         says="200 characters"),
    Case("reference of two lines", lambda: wav(jfk()), data={"reference": "CALL-1\nCALL-2"}, status=400,
         says="one line"),
    Case("callback_url with a NUL", lambda: wav(jfk()), data={"callback_url": "https://example.com/a\x00b"},
         status=400, says="control characters"),
    Case("callback_url with port 99999", lambda: wav(jfk()), data={"callback_url": "https://example.com:99999/"},
         status=400, says="not a valid URL"),
    Case("callback_url with an unclosed [", lambda: wav(jfk()), data={"callback_url": "http://[::1/hook"},
         status=400, says="not a valid URL"),
    Case("vocabulary with a NUL", lambda: wav(jfk()), data={"vocabulary": "Kube\x00rnetes"}, job="done"),
    Case("path-traversal filename", lambda: wav(jfk()), "../../../etc/passwd.wav", job="done"),
    Case("10 KB filename", lambda: wav(jfk()), "n" * 10_240 + ".wav", status=400, says="filename"),
    Case("2 KB filename (kept to 255)", lambda: wav(jfk()), "n" * 2_048 + ".wav", job="done"),
    Case("video container without audio", lambda: encode_video_only(), "clip.mp4", status=415, says="no audio stream"),
]


def encode_video_only() -> bytes:
    import io

    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(10):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), i * 20, dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()


def uploads(stack: Stack) -> set[str]:
    return {o.object_name for o in stack.s3().list_objects("audio", prefix="uploads/", recursive=True)}


def submit(stack: Stack, case: Case) -> httpx.Response:
    files = {"upload" if case.name == "missing file field" else "file": (case.filename, case.content())}
    return httpx.post(f"{stack.api}/recognize", files=files, data=case.data, timeout=120)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(stack: Stack, case: Case):
    before = uploads(stack)
    response = submit(stack, case)
    if case.job is None:
        outcome = f"{response.status_code} {response.json().get('detail', '')[:70]}"
        record_figure(f"bad input | {case.name:<32} | {outcome}")
        assert response.status_code == case.status, response.text
        assert case.says in response.json()["detail"]
        return
    assert response.status_code == 202, response.text
    body = response.json()
    assert len(body["filename"]) <= 255
    # The client's name is kept as data: the upload is stored under the job's id, whatever it says.
    stored = uploads(stack) - before
    assert f"uploads/{body['id']}" in stored
    assert all(key.removeprefix("uploads/").isdigit() for key in stored), stored
    document = stack.wait_finished(body["id"], timeout=300)
    outcome = f"job {document['status']}" + (f": {document['error'][:60]}" if document.get("error") else
                                               f", {len(document['segments'])} segments")
    record_figure(f"bad input | {case.name:<32} | 202 -> {outcome}")
    assert document["status"] == case.job, document
    if case.job == "error":
        assert case.says in document["error"]
    elif case.says == "no speech":  # silence is a result: done, nothing said
        assert document["no_speech"] is True and document["segments"] == []
    else:
        assert document["segments"] and all(s["text"] for s in document["segments"])
        assert document["no_speech"] is False


def test_oversized_stream_is_refused_while_it_streams(stack: Stack):
    """Chunked (no Content-Length): the 413 arrives after ~MAX_UPLOAD_MB, not after 64 MB."""
    url = urlparse(stack.api)
    boundary = "bigboundary"
    preamble = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.wav\"\r\n"
                f"Content-Type: audio/wav\r\n\r\n").encode() + wav_header(64 * 2**20)
    sent = 0
    answer = b""
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall((f"POST /recognize HTTP/1.1\r\nHost: {url.hostname}\r\nTransfer-Encoding: chunked\r\n"
                      f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode())
        sock.sendall(f"{len(preamble):x}\r\n".encode() + preamble + b"\r\n")
        piece = bytes(2**16)
        try:
            while sent < 12 * 2**20:  # 12 MB of the announced 64: then stop sending and listen
                sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                sent += len(piece)
        except OSError:
            pass  # the server may close as soon as it has answered
        try:
            answer = sock.recv(4096)
        except OSError:
            answer = b""
    status = answer.split(b"\r\n", 1)[0].decode(errors="replace")
    record_figure(f"bad input | {'64 MB chunked upload (limit 5 MB)':<32} | {status} after {sent / 2**20:.1f} MB sent")
    assert status.startswith("HTTP/1.1 413"), answer[:300]


def test_a_body_read_whole_that_says_both_its_length_and_chunked_is_refused_before_it_is_read(stack: Stack):
    """With Content-Length and Transfer-Encoding: chunked both, the server reads the body as
    chunked, of any length: a Content-Length of 10 bounded nothing, and a JSON enrolment went into
    ingest's memory whole up to the route's bound for a sample (51 MiB), past the 1 MiB of a body
    read whole. It is refused as a chunked body is, before more than its first piece is sent."""
    url = urlparse(stack.api)
    bodies = {"/recognize": ("application/x-www-form-urlencoded", b"url=" + b"a" * (2 * 2**20)),
              "/v1/audio/transcriptions": ("application/x-www-form-urlencoded", b"model=" + b"a" * (2 * 2**20)),
              "/speakers": ("application/json", b'{"name": "' + b"a" * (2 * 2**20) + b'"}')}
    piece = 2**16
    answers = {}
    for path, (content_type, body) in bodies.items():
        with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
            sock.sendall((f"POST {path} HTTP/1.1\r\nHost: {url.hostname}\r\nContent-Type: {content_type}\r\n"
                          f"Content-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n").encode())
            sock.sendall(f"{piece:x}\r\n".encode() + body[:piece] + b"\r\n")
            try:
                answer = sock.recv(4096)  # refused before the rest is sent
            except TimeoutError:  # the server waits for the rest: it is reading the body
                answer = b"no answer until all of the body was sent; then "
                with contextlib.suppress(OSError):
                    for start in range(piece, len(body), piece):
                        chunk = body[start:start + piece]
                        sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                    sock.sendall(b"0\r\n\r\n")
                    answer += sock.recv(4096)
        answers[path] = answer
    assert all(a.startswith((b"HTTP/1.1 411", b"HTTP/1.1 413")) for a in answers.values()), {
        path: a[:400] for path, a in answers.items()}


def test_a_body_read_whole_is_given_up_past_its_bound_whatever_its_headers_said():
    """Behind the 411 and 413 on a body's headers: were a server to deliver more of a JSON or
    URL-encoded body than they said, it is given up (413) once past SMALL_BODY_BYTES."""
    from litestar.exceptions import ClientException

    from services.ingest.admission import SMALL_BODY_BYTES, _small_body_bounded

    pieces = iter([{"type": "http.request", "body": bytes(2**16), "more_body": True}] * 64)  # 4 MiB

    async def receive() -> dict:
        return next(pieces)

    async def read_until_refused() -> tuple[int, int]:
        bounded, read = _small_body_bounded(receive), 0
        try:
            while True:
                read += len((await bounded())["body"])
        except ClientException as refused:
            return refused.status_code, read

    assert asyncio.run(read_until_refused()) == (413, SMALL_BODY_BYTES)


def test_a_form_field_is_bounded_like_a_body_read_whole(stack: Stack, fixtures_dir):
    """A multipart part without a filename is a text field, which the form parser holds in memory
    whole: `curl -F file=<meeting.wav` (not `@`), or a huge prompt, put up to MAX_UPLOAD_MB (2 GB
    by default) of it in ingest's memory. Past 1 MiB it is 413, named, before the rest is read."""
    recording = (fixtures_dir / "jfk.flac").read_bytes()
    for path in ("/recognize", "/v1/audio/transcriptions", "/speakers"):
        answer = httpx.post(f"{stack.api}{path}", timeout=60, files={"file": ("jfk.flac", recording)},
                            data={"prompt" if path.startswith("/v1") else "name": "x" * (2 * 2**20),
                                  "model": "whisper-1"})
        assert answer.status_code == 413, (path, answer.text[:300])
        assert "text fields" in answer.text, (path, answer.text[:300])  # OpenAI's shape or ours
    # Many fields each under the bound are bounded together.
    many = httpx.post(f"{stack.api}/recognize", timeout=60, files={"file": ("jfk.flac", recording)},
                      data={f"f{i}": "x" * (256 * 1024) for i in range(6)})
    assert many.status_code == 413 and "text fields" in many.text, many.text[:300]
    # The recording sent as a field: said so.
    sent_as_text = httpx.post(f"{stack.api}/recognize", timeout=60, files={"file": (None, bytes(3 * 2**20))})
    assert sent_as_text.status_code == 413 and "filename" in sent_as_text.json()["detail"], sent_as_text.text[:300]
    # A field within the bound, beside a recording, is read as before.
    submitted = httpx.post(f"{stack.api}/recognize", timeout=60, files={"file": ("jfk.flac", recording)},
                           data={"reference": "r" * 100})
    assert submitted.status_code == 202, submitted.text[:300]
    assert stack.wait_finished(submitted.json()["id"])["status"] == "done"


def test_a_body_read_whole_into_memory_is_bounded_far_below_an_upload(stack: Stack):
    """JSON and URL-encoded bodies are read into memory whole, so up to MAX_UPLOAD_MB each (2 GB
    by default) of them, sixteen uploads at a time, could exhaust ingest's memory. Past 1 MiB they
    are 413; a recording sent as multipart still goes up to MAX_UPLOAD_MB."""
    big = "x" * (2 * 2**20)
    answers = {
        "urlencoded /recognize": httpx.post(f"{stack.api}/recognize", data={"url": big}, timeout=30),
        "JSON enrolment": httpx.post(f"{stack.api}/speakers", json={"name": big}, timeout=30),
        "speaker names": httpx.patch(f"{stack.api}/transcripts/1/speakers", json={"spk_0": big}, timeout=30),
        "rerun options": httpx.post(f"{stack.api}/transcripts/1/rerun", json={"vocabulary": big}, timeout=30),
        "webhook": httpx.post(f"{stack.api}/webhooks", json={"url": big}, timeout=30),
    }
    assert {what: r.status_code for what, r in answers.items()} == dict.fromkeys(answers, 413), {
        what: r.text[:200] for what, r in answers.items()}
    assert all("1024 KiB" in r.json()["detail"] for r in answers.values()), {
        what: r.text[:200] for what, r in answers.items()}
    # A JSON body sent in pieces without its length cannot be bounded before it is read.
    chunked = httpx.post(f"{stack.api}/speakers", headers={"Content-Type": "application/json"}, timeout=30,
                         content=iter([b'{"name": ', b'"Anna"}']))
    assert chunked.status_code == 411, chunked.text
    # No body at all is what it was: neither a file nor an address.
    assert "one of the two" in httpx.post(f"{stack.api}/recognize", timeout=30).json()["detail"]
    # A small body is read as before: here the options of a job that does not exist.
    assert httpx.post(f"{stack.api}/transcripts/999999999/rerun", json={"vocabulary": "x" * 100},
                      timeout=30).status_code == 404


def test_upload_that_stops_midway_leaves_nothing_behind(stack: Stack):
    def uploads() -> set[str]:
        return {o.object_name for o in stack.s3().list_objects("audio", prefix="uploads/", recursive=True)}

    before, stored_before = stack.value("SELECT count(*) FROM transcripts"), uploads()
    url = urlparse(stack.api)
    boundary = "cutboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"cut.wav\"\r\n"
            f"Content-Type: audio/wav\r\n\r\n").encode() + wav(jfk())[:100_000]
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall((f"POST /recognize HTTP/1.1\r\nHost: {url.hostname}\r\n"
                      f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                      f"Content-Length: {len(head) + 400_000}\r\n\r\n").encode() + head)
        time.sleep(0.5)
    time.sleep(1)
    assert stack.value("SELECT count(*) FROM transcripts") == before
    assert uploads() == stored_before
    record_figure(f"bad input | {'upload stopped midway':<32} | no job, no row, no stored audio")


def test_an_upload_its_client_gives_up_is_counted_as_the_clients_and_logged(stack: Stack):
    """A client that closes its connection in the middle of its body was answered (to no one) 500
    "client disconnected prematurely", Litestar's own, counted as a 500 in stt_http_requests_total
    and logged nowhere: a fault here to whoever watches the figures. It is 499 (nginx's "client
    closed request"), logged with the reason."""
    from tests.test_metrics import parse, total

    def counted(status: str) -> float:
        samples = parse(httpx.get(stack.metrics_url("ingest"), timeout=10).text)
        return total(samples, "stt_http_requests_total", method="POST", route="/recognize", status=status)

    before, logged_before = {status: counted(status) for status in ("499", "500")}, len(stack.log_text("ingest"))
    url = urlparse(stack.api)
    head = (b'--gone\r\nContent-Disposition: form-data; name="file"; filename="gone.wav"\r\n'
            b"Content-Type: audio/wav\r\n\r\n") + wav(jfk())[:100_000]
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall((f"POST /recognize HTTP/1.1\r\nHost: {url.hostname}\r\n"
                      f"Content-Type: multipart/form-data; boundary=gone\r\n"
                      f"Content-Length: {len(head) + 400_000}\r\n\r\n").encode() + head)
        time.sleep(0.5)
    deadline = time.monotonic() + 10
    while counted("499") == before["499"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert {status: counted(status) - before[status] for status in before} == {"499": 1, "500": 0}
    logged = stack.log_text("ingest")[logged_before:]
    assert (f"POST /recognize: the client closed the connection before the whole body came"
            f" ({len(head) + 400_000} bytes announced); answered 499") in logged, logged


def test_a_multipart_body_cut_short_or_not_in_its_boundary_is_told_so(stack: Stack):
    """Every multipart body the form parser could not read was answered "headers must be UTF-8 (a
    filename in another encoding?)": one cut short before its closing boundary, or written with
    another boundary than its Content-Type names, too. That is said only of headers that are not
    UTF-8 now (test_non_utf8_filename); the others are told what is wrong with them."""
    part = b'--cut\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF'
    answers = {
        "cut short": httpx.post(f"{stack.api}/recognize", content=part, timeout=60,
                                headers={"content-type": "multipart/form-data; boundary=cut"}),
        "another boundary": httpx.post(f"{stack.api}/recognize", content=part + b"\r\n--cut--\r\n", timeout=60,
                                       headers={"content-type": "multipart/form-data; boundary=other"}),
        "junk": httpx.post(f"{stack.api}/recognize", content=b"hello", timeout=60,
                           headers={"content-type": "multipart/form-data; boundary=cut"}),
        "a line break that is not CRLF": httpx.post(
            f"{stack.api}/recognize", content=part.replace(b"cut\r\n", b"cut\n", 1) + b"\r\n--cut--\r\n", timeout=60,
            headers={"content-type": "multipart/form-data; boundary=cut"}),
    }
    details = {what: (answer.status_code, answer.json()["detail"]) for what, answer in answers.items()}
    assert all(status == 400 and "UTF-8" not in detail for status, detail in details.values()), details
    assert "it ends before its closing boundary (--cut--): it was cut short" in details["cut short"][1], details
    assert "(--other--)" in details["another boundary"][1] and "(--cut--)" in details["junk"][1], details
    assert "Invalid line break after first boundary" in details["a line break that is not CRLF"][1], details
    assert "(--cut)" in details["a line break that is not CRLF"][1], details


def test_non_utf8_filename(stack: Stack):
    boundary = "latinboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"".encode()
            + b"r\xe9union\xff.wav" + b"\"\r\nContent-Type: audio/wav\r\n\r\n" + wav(jfk()[: 3 * SAMPLE_RATE])
            + f"\r\n--{boundary}--\r\n".encode())
    response = httpx.post(f"{stack.api}/recognize", content=body, timeout=60,
                          headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    record_figure(f"bad input | {'non-UTF-8 filename':<32} | {response.status_code} {response.text[:60]}")
    assert response.status_code == 400 and "UTF-8" in response.json()["detail"], response.text


def test_hundred_concurrent_uploads(stack: Stack):
    silence = wav(np.zeros(SAMPLE_RATE, dtype=np.float32))

    def one(i: int) -> httpx.Response:
        """As a client should: a 503 with Retry-After (too many uploads at once) is tried again."""
        for _ in range(60):
            response = httpx.post(f"{stack.api}/recognize", files={"file": (f"quiet-{i}.wav", silence)}, timeout=120)
            if response.status_code != 503 or "retry-after" not in response.headers:
                return response
            retried.append(i)
            time.sleep(float(response.headers["retry-after"]) / 10)
        return response

    retried: list[int] = []

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=100) as pool:
        responses = list(pool.map(one, range(100)))
    elapsed = time.monotonic() - started
    codes = sorted({r.status_code for r in responses})
    ids = [r.json()["id"] for r in responses if r.status_code == 202]
    documents = [stack.wait_finished(i, timeout=300) for i in ids]
    outcomes = {(d["status"], d["no_speech"]) for d in documents}
    record_figure(f"bad input | {'100 concurrent uploads':<32} | {codes} in {elapsed:.1f} s "
                  f"({len(retried)} retries after 503); {len(ids)} jobs -> {outcomes}")
    assert codes == [202] and len(set(ids)) == 100
    assert outcomes == {("done", True)}


def test_a_mix_of_bad_inputs_crashes_no_worker_and_orphans_nothing(stack: Stack):
    """Its own uploads (refused ones, ones that fail, ones that end with no speech, a good one),
    whatever ran before: afterwards every service is the process it was, and of what it sent no
    job is left processing, every stored audio object belongs to a job and every job has its audio."""
    pids = {name: stack.processes[name].pid for name in SERVICES}
    # What this test made: the jobs and uploads past this id (other tests' leave theirs behind).
    floor = stack.value("SELECT nextval(pg_get_serial_sequence('transcripts', 'id'))")
    mix = [c for c in CASES if c.name in (
        "random bytes named .wav", "1 Hz sample rate (crafted)", "FLAC truncated halfway",
        "WAV truncated to 0.3 s", "2 hours, no length in its header", "file over MAX_UPLOAD_MB",
        "6-channel audio", "unknown language")]
    assert len(mix) == 8
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(mix)) as pool:
        responses = list(pool.map(lambda case: submit(stack, case), mix))
    assert [r.status_code for r in responses] == [c.status if c.job is None else 202 for c in mix]
    job_ids = [r.json()["id"] for r in responses if r.status_code == 202]
    documents = [stack.wait_finished(job_id, timeout=300) for job_id in job_ids]
    assert [d["status"] for d in documents] == [c.job for c in mix if c.job is not None]
    assert {name: stack.processes[name].poll() for name in SERVICES} == dict.fromkeys(SERVICES)
    assert {name: stack.processes[name].pid for name in SERVICES} == pids
    assert stack.value("SELECT count(*) FROM transcripts WHERE status = 'processing' AND id > $1", floor) == 0
    rows = [r["id"] for r in stack.query("SELECT id FROM transcripts WHERE id > $1", floor)]
    objects = {key for key in uploads(stack) if key.removeprefix("uploads/").isdigit()
               and int(key.removeprefix("uploads/")) > floor}
    expected = {f"uploads/{job_id}" for job_id in rows}
    record_figure(f"bad input | {'orphans after a mix of 8':<32} | rows without audio: {len(expected - objects)}, "
                  f"audio without row: {len(objects - expected)}")
    assert set(job_ids) <= set(rows)
    assert objects == expected


def _detail(response: httpx.Response) -> str:
    """The reason of an error answer, in this API's shape or OpenAI's."""
    body = response.json()
    return body["error"]["message"] if "error" in body else body["detail"]


def test_the_text_field_bound_holds_however_the_content_type_is_written(stack: Stack):
    """The bound on a multipart body's text fields read the boundary with a parser that takes only a
    space after `;`: with a tab, which the form parser takes too, it found none and let the body
    through unchecked (a 2 GiB prompt in memory). With two Content-Type headers it read the last and
    the form parser the first. The boundary is now read as the form parser reads it, and a body
    whose boundary cannot be read, or that has two Content-Types, is refused before it is read."""
    body = (b'--XYZ\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n' + b"x" * (2 * 2**20)
            + b"\r\n--XYZ--\r\n")
    for path in ("/recognize", "/v1/audio/transcriptions"):
        tabbed = httpx.post(f"{stack.api}{path}", content=body, timeout=60,
                            headers={"content-type": "multipart/form-data;\tboundary=XYZ"})
        assert tabbed.status_code == 413 and "text fields" in _detail(tabbed), (path, tabbed.text[:300])
        two = httpx.post(f"{stack.api}{path}", content=body, timeout=60,
                         headers=[("content-type", "multipart/form-data; boundary=XYZ"),
                                  ("content-type", "multipart/form-data; boundary=OTHER")])
        assert two.status_code == 400 and "more than one Content-Type" in _detail(two), (path, two.text[:300])
        for content_type in ("multipart/form-data", "multipart/form-data; boundary="):
            unbounded = httpx.post(f"{stack.api}{path}", content=body, timeout=60,
                                   headers={"content-type": content_type})
            assert unbounded.status_code == 400 and "boundary" in _detail(unbounded), (path, unbounded.text[:300])


def _multipart(boundary: str, parts: list[tuple[str, str | None, bytes]], recording: bytes) -> bytes:
    """A multipart body: text parts (name, Content-Type or None, bytes), then `recording` as `file`."""
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n'.encode()
                    + (f"Content-Type: {content_type}\r\n".encode() if content_type else b"") + b"\r\n" + value
                    + b"\r\n" for name, content_type, value in parts)
    return (body + f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="jfk.flac"\r\n'
                   f"Content-Type: audio/flac\r\n\r\n".encode() + recording + f"\r\n--{boundary}--\r\n".encode())


def test_a_text_field_in_an_odd_charset_or_a_body_not_form_data_is_400_not_a_fault(stack: Stack):
    """A multipart text field is decoded in its part's charset: one that is no text encoding
    (rot13, base64, hex) or one of Python's own codecs (punycode; unicode_escape, in which
    `\\ud800` written out is a lone surrogate the database cannot store: a 503 "try again later"
    that never succeeds) was a 500 with a traceback, or that 503. So were a field's bytes that are
    not UTF-8 in a body sent as multipart/mixed, or as text/plain with a boundary, which the form
    parser reads all the same. Each is a 400 that says what to send; UTF-8, ASCII and Latin-1 (the
    default of Java's Apache HttpClient) fields are read as before."""
    recording = fixture("jfk.flac")
    fields = {"/recognize": ("callback_url", []), "/v1/audio/transcriptions": ("prompt", [("model", None, b"whisper-1")]),
              "/speakers": ("name", [])}
    logged_before = len(stack.log_text("ingest"))
    answers = {}
    for path, (field_name, others) in fields.items():
        for charset, value in (("rot13", b"x"), ("base64", b"eA=="), ("hex", b"78"), ("punycode", b"abc-99999999999"),
                               ("unicode_escape", b"https://example.com/\\ud800"), ("bogus", b"x")):
            body = _multipart("XX", [*others, (field_name, f"text/plain; charset={charset}", value)], recording)
            answer = httpx.post(f"{stack.api}{path}", content=body, timeout=60,
                                headers={"content-type": "multipart/form-data; boundary=XX"})
            answers[path, charset] = (answer.status_code, "charset" in answer.text, answer.text[:200])
        # (A body that does not say it is multipart is refused past 1 MiB first: a short one.)
        body = _multipart("XX", [*others, (field_name, None, b"\xff\xfe")], recording[:100_000])
        for content_type in ("multipart/mixed; boundary=XX", "text/plain; boundary=XX"):
            answer = httpx.post(f"{stack.api}{path}", content=body, timeout=60, headers={"content-type": content_type})
            answers[path, content_type] = (answer.status_code, "multipart/form-data" in answer.text,
                                           answer.text[:200])
    assert {case: told[:2] for case, told in answers.items()} == dict.fromkeys(answers, (400, True)), answers
    logged = stack.log_text("ingest")[logged_before:]
    assert not any(sign in logged for sign in ("POST /recognize failed", "POST /speakers failed",
                                                "POST /v1/audio/transcriptions failed", "could not submit")), logged
    # The charsets clients send are read as before.
    body = _multipart("XX", [("reference", "text/plain; charset=ISO-8859-1", "Réunion".encode("latin-1")),
                             ("language", "text/plain; charset=UTF-8", b"en"),
                             ("task", "text/plain; charset=us-ascii", b"transcribe")], recording)
    submitted = httpx.post(f"{stack.api}/recognize", content=body, timeout=60,
                           headers={"content-type": "multipart/form-data; boundary=XX"})
    assert submitted.status_code == 202, submitted.text[:300]
    assert stack.wait_finished(submitted.json()["id"])["status"] == "done"
    assert httpx.get(f"{stack.api}/transcripts/{submitted.json()['id']}").json()["reference"] == "Réunion"


def test_a_request_holds_one_file_and_a_few_parts(stack: Stack):
    """A part with a filename is held by the form parser (in memory up to 1 MiB each) and was not
    counted: a thousand parts of ~1 MiB held ~1 GiB per request. /v1/audio/transcriptions took
    the extra files without a word, /recognize refused them only once all were read. A second
    file is refused as it begins; the recording routes take at most UPLOAD_FORM_PARTS parts."""
    from services.ingest.admission import UPLOAD_FORM_PARTS

    recording = fixture("jfk.flac")
    for path in ("/recognize", "/v1/audio/transcriptions", "/speakers"):
        two = httpx.post(f"{stack.api}{path}", timeout=60, data={"name": "Anna", "model": "whisper-1"},
                         files=[("file", ("a.flac", recording)), ("file", ("b.flac", recording))])
        assert two.status_code == 400 and "one file per request" in _detail(two), (path, two.text[:300])
        other = httpx.post(f"{stack.api}{path}", timeout=60, data={"name": "Anna"},
                           files=[("file", ("a.flac", recording)), ("extra", ("b.bin", b"x" * 1000))])
        assert other.status_code == 400 and "'extra' is a second file" in _detail(other), (path, other.text[:300])
    for path in ("/recognize", "/v1/audio/transcriptions"):
        many = httpx.post(f"{stack.api}{path}", timeout=60, data={f"f{i}": "x" for i in range(UPLOAD_FORM_PARTS + 6)},
                          files={"file": ("a.flac", recording)})
        assert many.status_code == 400 and f"more than {UPLOAD_FORM_PARTS} parts" in _detail(many), (path, many.text[:300])


def test_a_part_over_the_form_parsers_limits_is_told_which_they_are(stack: Stack):
    """The form parser answers "Request Entity Too Large" (a 400) for too many parts, too many
    headers in a part and a header over 4 KB alike: the reason names them all, not the last alone."""
    headers = "".join(f"X-Header-{i}: {i}\r\n" for i in range(9))
    body = (f'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n{headers}\r\n'
            f"RIFF\r\n--b--\r\n").encode()
    response = httpx.post(f"{stack.api}/recognize", content=body, timeout=60,
                          headers={"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 400, response.text
    assert all(words in response.json()["detail"] for words in ("parts", "headers in a part", "4 KB")), response.text


@contextlib.contextmanager
def served(app) -> Iterator[str]:
    """`app` served by uvicorn in this process, as python -m services.ingest serves it."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    api = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{api}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert thread.is_alive() and time.monotonic() < deadline
            time.sleep(0.2)
        yield api
    finally:
        server.should_exit = True
        thread.join(30)


def test_a_body_trickled_in_gives_up_its_upload_place(stack: Stack, monkeypatch):
    """Only the gap between two pieces of a body was bounded (2 minutes): MAX_CONCURRENT_UPLOADS
    clients sending a byte every minute held every upload place for as long as they liked, and
    every other upload was 503. A body now has to come at UPLOAD_MIN_RATE on average once
    UPLOAD_RATE_GRACE_S have passed (here 4 KiB/s after 1 s, for the test's sake), or it is 408."""
    from services.ingest import admission
    from services.ingest.app import create_app

    # (raising=False: without these settings the test fails on what the server does, not here.)
    monkeypatch.setattr(admission, "UPLOAD_RATE_GRACE_S", 1.0, raising=False)
    monkeypatch.setattr(admission, "UPLOAD_MIN_RATE", 4096, raising=False)
    app = create_app(stack.settings(max_concurrent_uploads=1))
    reading = threading.Event()

    async def noting_the_slow_body_read(scope, receive, send) -> None:
        """The app, setting `reading` once it reads the slow request's body: it was let in, its
        place taken (a request is let in or refused before its body is read)."""
        if scope["type"] != "http" or b"boundary=tb" not in dict(scope["headers"]).get(b"content-type", b""):
            await app(scope, receive, send)
            return

        async def noted():
            reading.set()
            return await receive()

        await app(scope, noted, send)

    with served(noting_the_slow_body_read) as api:
        url = urlparse(api)
        head = (b'--tb\r\nContent-Disposition: form-data; name="file"; filename="slow.wav"\r\n'
                b"Content-Type: audio/wav\r\n\r\n")
        answer, held, started = b"", None, time.monotonic()
        with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
            sock.sendall((f"POST /recognize HTTP/1.1\r\nHost: {url.hostname}\r\n"
                          f"Content-Type: multipart/form-data; boundary=tb\r\n"
                          f"Content-Length: {4 * 2**20}\r\n\r\n").encode() + head)  # within MAX_UPLOAD_MB
            sock.settimeout(0.2)
            assert reading.wait(10), "the server never began reading the slow body"
            while not answer and time.monotonic() - started < 15:
                try:
                    sock.sendall(b"\0")  # a byte at a time, each well within the 2 minutes
                except OSError:
                    pass  # the server may close as soon as it has answered
                if held is None:  # meanwhile the one upload place is taken
                    held = httpx.post(f"{api}/recognize", timeout=30)
                try:
                    answer = sock.recv(4096)
                except TimeoutError:
                    pass
                except OSError:
                    break
            elapsed = time.monotonic() - started
            sock.settimeout(5)
            with contextlib.suppress(OSError):  # the rest of the answer, until the server closes
                while answer and (more := sock.recv(4096)):
                    answer += more
        assert held is not None and held.status_code == 503, held.text
        assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
        assert b"KiB/s" in answer and elapsed < 10, (elapsed, answer[:500])
        # The place is free again: the next request is answered for itself.
        free = httpx.post(f"{api}/recognize", timeout=30)
        assert free.status_code == 400 and "one of the two" in free.json()["detail"], free.text
    record_figure(f"bad input | {'body trickled in (test rate)':<32} | 408 after {elapsed:.1f} s")


async def test_a_slow_upload_keeps_its_place_while_another_is_free(monkeypatch):
    """The rate bound gave a phone on a poor uplink (40 kbit/s, 20 MB) 408 after a minute while no
    one else was uploading: it is a bound on holding a place another upload needs, so it applies
    only while every place among MAX_CONCURRENT_UPLOADS is taken. Here (rate 4 KiB/s after 0.5 s)
    a body trickled in well under the rate goes on past the grace while one of two places is free,
    and is given up as soon as a second upload takes the other."""
    import asyncio

    from litestar.exceptions import ClientException

    from services.ingest import admission

    monkeypatch.setattr(admission, "UPLOAD_RATE_GRACE_S", 0.5, raising=False)
    monkeypatch.setattr(admission, "UPLOAD_MIN_RATE", 4096, raising=False)
    monkeypatch.setattr(admission, "UPLOAD_RATE_CHECK_S", 0.05, raising=False)

    def trickle(seconds: float):
        """A byte every 0.1 s for `seconds`, then the end of the body."""
        end = asyncio.get_running_loop().time() + seconds

        async def receive():
            await asyncio.sleep(0.1)
            more = asyncio.get_running_loop().time() < end
            return {"type": "http.request", "body": b"\0", "more_body": more}
        return receive

    def quick_then_quiet():
        """1 MiB at once (well within the rate), then nothing for a while: it holds its place."""
        messages = [{"type": "http.request", "body": b"\0" * 2**20, "more_body": True}]

        async def receive():
            if messages:
                return messages.pop(0)
            await asyncio.Event().wait()
        return receive

    async def app_reading_the_body(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    app = admission.upload_limit_middleware(2)(admission.small_body_middleware(app_reading_the_body))
    scope = {"type": "http", "path": "/recognize", "method": "POST",
             "headers": [(b"content-type", b"multipart/form-data; boundary=b")]}
    sent = []

    async def send(message):
        sent.append(message)

    # Alone, one place of two free: 2 s (four times the grace) at 10 bytes/s, and answered.
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(app(dict(scope), trickle(2.0), send), 10)
    assert sent[0]["status"] == 200 and asyncio.get_running_loop().time() - started >= 2.0

    # The same trickle while another upload comes to take the last place: given up.
    slow = asyncio.ensure_future(app(dict(scope), trickle(30.0), send))
    await asyncio.sleep(1.0)  # past the grace, still going
    assert not slow.done()
    other = asyncio.ensure_future(app(dict(scope), quick_then_quiet(), send))
    try:
        with pytest.raises(ClientException) as refused:
            await asyncio.wait_for(slow, 2)
        assert refused.value.status_code == 408 and "KiB/s" in refused.value.detail
        assert not other.done()  # its own body came within the rate
    finally:
        other.cancel()
        await asyncio.gather(other, return_exceptions=True)
