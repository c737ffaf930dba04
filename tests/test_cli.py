"""The `stt` command-line client, run as the installed script against a running stack with API
keys on (so every call proves the key is sent)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import aio_pika
import httpx
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from cli.app import app, clock
from common.audio import SAMPLE_RATE, decode_audio
from tests.audio_files import en_dialogue_voices, wav
from tests.conftest import ROOT, Stack, amqp_url, free_port, private_vhost, running_stack

API_KEY = "cli-key-0b7d2e"
OTHER_KEY = "cli-key-other-5c1a"
# The console script pip installed next to this interpreter.
STT = str(Path(sys.executable).parent / "stt")
SRT_CUE = re.compile(r"\d+\n(\d{2}:\d{2}:\d{2},\d{3}) --> (\d{2}:\d{2}:\d{2},\d{3})\n(spk_\d+): (\S.*(?:\n.+)*)")


@pytest.fixture(scope="module")
def keyed_stack(tmp_path_factory, fixtures_dir) -> Iterator[Stack]:
    with running_stack(tmp_path_factory, API_KEYS=f"{API_KEY},{OTHER_KEY}", INBOX_API_KEY=API_KEY) as stack:
        yield stack


def cli_env(stack: Stack, **changes: str | None) -> dict[str, str]:
    env = {**os.environ, "STT_API_URL": stack.api, "STT_API_KEY": API_KEY, "AMQP_URL": stack.amqp_url,
           "PYTHONUNBUFFERED": "1", **changes}
    return {name: value for name, value in env.items() if value is not None}


def stt(stack: Stack, *args: str, timeout: float = 300, **env_changes: str | None) -> subprocess.CompletedProcess:
    return subprocess.run([STT, *args], env=cli_env(stack, **env_changes), capture_output=True, text=True,
                          timeout=timeout)


class Background:
    """A long-running CLI command whose merged output is read as it comes."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen([STT, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 300) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if match := re.search(pattern, line):
                    return match
            if self.process.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.2)
        raise AssertionError(f"no line matching {pattern!r} in:\n{self.output}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        code = self.process.wait(15)
        self.reader.join(5)
        return code


def cancel_jobs(stack: Stack, job_ids: list[int]) -> None:
    """Stop jobs a test leaves processing: on a 2-core machine they would take the CPU of the tests
    after it. A job that has ended is answered 409 and left as it is."""
    with httpx.Client(base_url=stack.api, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as client:
        for job_id in job_ids:
            client.post(f"/transcripts/{job_id}/cancel")


@pytest.fixture(scope="module")
def jfk_submission(keyed_stack, fixtures_dir) -> tuple[subprocess.CompletedProcess, int]:
    result = stt(keyed_stack, "submit", str(fixtures_dir / "jfk.flac"), "--wait", "--reference", "inaugural-1961")
    match = re.search(r"accepted as job (\d+)", result.stderr)
    assert match, result.stdout + result.stderr
    return result, int(match.group(1))


def test_submit_waits_and_prints_the_transcript(jfk_submission):
    result, job_id = jfk_submission
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ask not what your country" in result.stdout.lower()
    assert f"job {job_id}: jfk.flac" in result.stdout
    assert re.search(r"^\[00:\d\d\.\d\] spk_\d+: \S", result.stdout, re.MULTILINE), result.stdout
    assert "Traceback" not in result.stderr


def test_status_shows_done(keyed_stack, jfk_submission):
    _, job_id = jfk_submission
    # Flags in place of the environment.
    result = stt(keyed_stack, "status", str(job_id), "--api", keyed_stack.api, "--api-key", API_KEY,
                 STT_API_URL=None, STT_API_KEY=None)
    assert result.returncode == 0, result.stderr
    assert re.search(r"status\s+done", result.stdout), result.stdout
    assert re.search(r"percent\s+100%", result.stdout), result.stdout
    raw = stt(keyed_stack, "status", str(job_id), "--json")
    document = json.loads(raw.stdout)
    assert (document["status"], document["stage"], document["percent"]) == ("done", "done", 100)
    assert any("ask not what your country" in s["text"].lower() for s in document["segments"])


def test_list_shows_the_keys_jobs_filtered(keyed_stack, jfk_submission):
    _, job_id = jfk_submission
    listed = stt(keyed_stack, "list")
    assert listed.returncode == 0, listed.stderr
    row = next(line.split("\t") for line in listed.stdout.splitlines() if line.startswith(f"{job_id}\t"))
    assert (row[1], row[2], row[5], row[6], row[7]) == ("done", "100%", "en", "jfk.flac", "inaugural-1961"), row
    assert row[4].startswith("00:1"), row  # 11 s
    # Another key's jobs are not listed.
    others = stt(keyed_stack, "list", STT_API_KEY=OTHER_KEY)
    assert others.returncode == 0 and f"{job_id}\t" not in others.stdout, others.stderr

    failed = stt(keyed_stack, "list", "--status", "error")
    assert failed.returncode == 0 and f"{job_id}\t" not in failed.stdout, failed.stderr
    created = json.loads(stt(keyed_stack, "list", "--filename", "JFK", "--json").stdout)
    assert job_id in [item["id"] for item in created]
    day_after = (datetime.fromisoformat(next(i["created_at"] for i in created if i["id"] == job_id))
                 + timedelta(days=1)).date().isoformat()
    # The submitter's own name for the job finds it, exactly as given.
    referred = json.loads(stt(keyed_stack, "list", "--reference", "inaugural-1961", "--json").stdout)
    assert [(i["id"], i["reference"]) for i in referred] == [(job_id, "inaugural-1961")]
    partial = stt(keyed_stack, "list", "--reference", "inaugural")
    assert (partial.returncode, partial.stdout, partial.stderr.strip()) == (0, "", "no jobs")
    later = stt(keyed_stack, "list", "--since", day_after)
    assert (later.returncode, later.stdout, later.stderr.strip()) == (0, "", "no jobs")
    bad = stt(keyed_stack, "list", "--since", "yesterday")
    assert bad.returncode == 1 and "since is not an ISO 8601 date" in bad.stderr, bad.stderr


def seconds(stamp: str) -> float:
    hours, minutes, rest = stamp.replace(",", ".").split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(rest)


def test_get_writes_srt_with_speaker_names(keyed_stack, jfk_submission, tmp_path):
    _, job_id = jfk_submission
    target = tmp_path / "out.srt"
    result = stt(keyed_stack, "get", str(job_id), "--format", "srt", "-o", str(target))
    assert result.returncode == 0, result.stderr
    cues = target.read_text(encoding="utf-8").strip().split("\n\n")
    assert cues and all(SRT_CUE.fullmatch(cue) for cue in cues), cues
    assert [int(cue.split("\n")[0]) for cue in cues] == list(range(1, len(cues) + 1))
    said = " ".join(SRT_CUE.fullmatch(cue)[4].replace("\n", " ") for cue in cues)
    assert "ask not what your country" in said.lower()
    # The 11 s sentence is cut into cues a viewer can read: two lines of 42 characters, 7 s
    assert len(cues) >= 2 and all(len(line) <= 42 for cue in cues for line in cue.split("\n")[2:])
    assert all(seconds(SRT_CUE.fullmatch(c)[2]) - seconds(SRT_CUE.fullmatch(c)[1]) <= 7 for c in cues)
    narrow = stt(keyed_stack, "get", str(job_id), "--format", "srt", "--max-line-width", "24", "--max-line-count", "1")
    assert narrow.returncode == 0, narrow.stderr
    narrow_cues = narrow.stdout.strip().split("\n\n")
    assert len(narrow_cues) > len(cues) and all(len(cue.split("\n")) == 3 for cue in narrow_cues)
    assert all(len(cue.split("\n")[2]) <= 24 for cue in narrow_cues), narrow_cues
    assert stt(keyed_stack, "get", str(job_id), "--max-line-width", "30").returncode == 2  # JSON has no lines

    text = stt(keyed_stack, "get", str(job_id), "--format", "txt")
    assert text.returncode == 0 and "ask not what your country" in text.stdout.lower()

    timed = json.loads(stt(keyed_stack, "get", str(job_id), "--words").stdout)
    spoken = [w for segment in timed["segments"] for w in segment["words"]]
    assert "country" in " ".join(w["word"].lower() for w in spoken)
    assert all(0 <= w["start"] <= w["end"] <= 11.1 for w in spoken), spoken
    assert "words" not in json.loads(stt(keyed_stack, "get", str(job_id)).stdout)["segments"][0]
    assert stt(keyed_stack, "get", str(job_id), "--words", "--format", "srt").returncode == 2


def test_get_rttm_one_voice_is_one_speaker(keyed_stack, jfk_submission):
    _, job_id = jfk_submission
    result = stt(keyed_stack, "get", str(job_id), "--format", "rttm")
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines()]
    assert lines and all(len(f) == 10 and f[0] == "SPEAKER" and f[1] == "jfk" for f in lines), lines
    assert {f[7] for f in lines} == {"spk_0"}


def test_rerun_runs_the_recording_again_with_a_speaker_count_and_keeps_the_first_job(keyed_stack, fixtures_dir):
    """sample.wav comes back with its two speakers; rerun with three asked for, it has three."""
    first = stt(keyed_stack, "submit", str(fixtures_dir / "sample.wav"), "--language", "en")
    job_id = int(re.search(r"accepted as job (\d+)", first.stderr).group(1))
    assert len(set(re.findall(r"\] (spk_\d+):", first.stdout))) == 2, first.stdout

    result = stt(keyed_stack, "rerun", str(job_id), "--speakers", "3", "--vocabulary", "Gorilla", "--redact", "phone")
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(rf"job {job_id} runs again as job (\d+)", result.stderr)
    assert match, result.stderr
    new_id = int(match.group(1))
    assert f"job {new_id}: sample.wav" in result.stdout
    assert len(set(re.findall(r"\] (spk_\d+):", result.stdout))) == 3, result.stdout
    with httpx.Client(headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        new, kept = (client.get(f"{keyed_stack.api}/transcripts/{i}").json() for i in (new_id, job_id))
    assert new["options"] == {"language": "en", "num_speakers": 3, "expected_speakers": [], "multichannel": False,
                              "vocabulary": ["Gorilla"], "task": "transcribe", "redact": ["phone"], "spelling": {}}, new
    assert "num_speakers" not in kept["options"] and len({s["speaker"] for s in kept["segments"]}) == 2, kept

    refused = stt(keyed_stack, "rerun", str(job_id), "--speakers", "2", STT_API_KEY=OTHER_KEY)
    assert refused.returncode == 1 and f"404: no job with id {job_id}" in refused.stderr, refused.stderr
    # --expect names enrolled speakers; a name nobody is enrolled under is refused, not ignored.
    for command in (["rerun", str(job_id)], ["submit", str(fixtures_dir / "jfk.flac")]):
        refused = stt(keyed_stack, *command, "--expect", "Anna, Nobody")
        said = " ".join(refused.stderr.split())
        assert refused.returncode == 1 and "no enrolled speaker is called 'Anna', 'Nobody'" in said, said
    impossible = stt(keyed_stack, "rerun", str(job_id), "--min-speakers", "5", "--max-speakers", "2")
    assert impossible.returncode == 1 and "400" in impossible.stderr and "min_speakers" in impossible.stderr


def test_watch_prints_segments_and_the_completion(keyed_stack, fixtures_dir):
    watcher = Background(["watch"], cli_env(keyed_stack))
    try:
        watcher.wait_for(r"watching stt\.events", timeout=60)
        submitted = stt(keyed_stack, "submit", str(fixtures_dir / "en_dialogue.wav"), "--no-wait")
        assert submitted.returncode == 0, submitted.stderr
        job_id = int(submitted.stdout.strip())  # --no-wait prints only the id
        done = watcher.wait_for(rf"^job {job_id} done: en_dialogue\.wav \(.*\b(\d+) segments\)")
        segment_line = re.compile(rf"job {job_id}  \[\d\d:\d\d\.\d\] spk_\d+: \S")
        segment_lines = [line for line in watcher.lines if segment_line.match(line)]
        assert len(segment_lines) == int(done.group(1)) > 0, watcher.output
        assert watcher.lines.index(done.group(0)) > watcher.lines.index(segment_lines[-1])
    finally:
        code = watcher.stop()
    assert code == 0, watcher.output
    assert "Traceback" not in watcher.output


def test_watch_reconnects_when_its_connection_drops(keyed_stack, fixtures_dir):
    watcher = Background(["watch"], cli_env(keyed_stack))
    try:
        watcher.wait_for(r"watching stt\.events", timeout=60)
        vhost = keyed_stack.amqp_url.rsplit("/", 1)[1]
        listing = subprocess.run(["rabbitmqctl", "list_connections", "-q", "--no-table-headers", "pid", "vhost",
                                  "client_properties"], capture_output=True, text=True, timeout=60, check=True)
        ours = [line.split("\t")[0] for line in listing.stdout.splitlines()
                if f"\t{vhost}\t" in line and '"stt watch"' in line]
        assert len(ours) == 1, listing.stdout
        subprocess.run(["rabbitmqctl", "close_connection", ours[0], "closed by test_cli"], capture_output=True,
                       timeout=60, check=True)
        watcher.wait_for(r"reconnected to RabbitMQ", timeout=60)
        submitted = stt(keyed_stack, "submit", str(fixtures_dir / "jfk.flac"), "--no-wait")
        job_id = int(submitted.stdout.strip())
        watcher.wait_for(rf"^job {job_id} done: jfk\.flac")
    finally:
        code = watcher.stop()
    assert code == 0, watcher.output
    assert "lost the connection to RabbitMQ" in watcher.output


def test_watch_for_one_job_ends_with_it(keyed_stack, fixtures_dir):
    submitted = stt(keyed_stack, "submit", str(fixtures_dir / "jfk.flac"), "--no-wait")
    job_id = int(submitted.stdout.strip())
    # Whether it ends before or after watching begins, watch --job returns on its own.
    watcher = subprocess.run([STT, "watch", "--job", str(job_id)], env=cli_env(keyed_stack),
                             capture_output=True, text=True, timeout=300)
    assert watcher.returncode == 0, watcher.stdout + watcher.stderr
    assert re.search(rf"job {job_id} (done|had already ended: done|ended \(seen through the API\): done)",
                     watcher.stdout), watcher.stdout


def test_watch_for_another_keys_job_ends_with_its_event(keyed_stack, fixtures_dir):
    """With API keys the API answers another key's job 404, as if it did not exist, while watch
    reads the broker's events of every job: `watch --job` exited 1 ("no job"), which the README
    says means the job failed. It now says the API does not know the job for this key, and the
    job's event ends it: 0 for done. The job is submitted once the watcher listens (it watches the
    id the job will get), so its end cannot come before the watcher's queue is bound."""
    next_id = keyed_stack.value("SELECT CASE WHEN is_called THEN last_value + 1 ELSE last_value END"
                                " FROM transcripts_id_seq")
    watcher = Background(["watch", "--job", str(next_id)], cli_env(keyed_stack, STT_API_KEY=OTHER_KEY))
    job_ids: list[int] = []
    try:
        watcher.wait_for(rf"the API does not know job {next_id} for this key", timeout=60)
        submitted = stt(keyed_stack, "submit", str(fixtures_dir / "jfk.flac"), "--no-wait", timeout=60)
        assert submitted.returncode == 0, submitted.stderr
        job_ids.append(int(submitted.stdout.strip()))
        assert job_ids == [next_id], "another job took the id the watcher waits for"
        watcher.wait_for(rf"^job {next_id} done: jfk\.flac", timeout=120)
        code = watcher.process.wait(15)
    finally:
        watcher.stop()
        cancel_jobs(keyed_stack, job_ids)
    assert code == 0, watcher.output
    assert "Traceback" not in watcher.output, watcher.output


def test_watching_a_job_the_api_hides_gives_up_when_its_events_stop(keyed_stack, jfk_submission, capsys,
                                                                     monkeypatch):
    """With a key, a job the API hides (another key's) is watched through its events only: one
    that had ended before watching began (or was deleted, or whose end was published while the
    watcher was disconnected) was waited for ever. Watching now gives up, 1, once no event of the
    job has come for HIDDEN_JOB_SILENCE_S; each event of the job starts that wait again. Here the
    watcher listens where only the test publishes (an empty vhost of its own)."""
    from cli import app as cli
    from common.broker import EVENTS_EXCHANGE
    from common.messages import SegmentCreated

    monkeypatch.setattr(cli, "HIDDEN_JOB_SILENCE_S", 4.0)
    _, job_id = jfk_submission  # done, and API_KEY's: hidden from OTHER_KEY
    said: list[str] = []

    def output() -> str:
        captured = capsys.readouterr()
        said.append(captured.out + captured.err)
        return " ".join("".join(said).split())

    async def watch_while_events_come() -> tuple[int, float, float]:
        watching = asyncio.create_task(cli.watch_events(amqp_url(vhost), job_id, keyed_stack.api, OTHER_KEY))
        deadline = time.monotonic() + 60
        while "watching its events anyway, until none has come for 4 s" not in output():
            assert time.monotonic() < deadline and not watching.done(), output()
            await asyncio.sleep(0.1)
        began = time.monotonic()
        connection = await aio_pika.connect(amqp_url(vhost))
        try:
            exchange = await (await connection.channel()).get_exchange(EVENTS_EXCHANGE)
            for index in range(7):  # one a second, for longer than the wait
                segment = SegmentCreated(job_id=job_id, transcript_id=job_id, chunk_index=0, index=index,
                                         speaker="spk_0", start_ts=index, end_ts=index + 1, text=f"line {index}")
                await exchange.publish(aio_pika.Message(segment.model_dump_json().encode()),
                                       routing_key=segment.ROUTING_KEY)
                await asyncio.sleep(1)
                assert not watching.done(), output()
            last_event = time.monotonic() - 1
        finally:
            await connection.close()
        code = await asyncio.wait_for(watching, 30)
        return code, time.monotonic() - began, time.monotonic() - last_event

    with private_vhost() as vhost:
        asyncio.run(declare_events_exchange(amqp_url(vhost)))
        code, watched_s, silent_s = asyncio.run(watch_while_events_come())
    everything = output()
    assert code == 1, everything
    assert watched_s > 7 and 3.5 < silent_s < 15, (watched_s, silent_s)
    assert "line 6" in everything, everything
    assert (f"error: no event of job {job_id} for 4 s, and the API does not know it for this key: stopped"
            f" watching") in everything, everything


async def declare_events_exchange(url: str) -> None:
    from common.broker import EVENTS_EXCHANGE

    connection = await aio_pika.connect(url)
    try:
        await (await connection.channel()).declare_exchange(EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC,
                                                            durable=True)
    finally:
        await connection.close()


def test_watch_for_one_job_ends_with_it_when_its_events_are_missed(keyed_stack, fixtures_dir):
    """Events published while the watcher was disconnected are lost; the job's end is still seen.
    Here the watcher listens where no event of the stack ever comes (an empty vhost of its own)."""
    with private_vhost() as vhost:
        asyncio.run(declare_events_exchange(amqp_url(vhost)))
        submitted = stt(keyed_stack, "submit", str(fixtures_dir / "en_dialogue.wav"), "--no-wait")
        job_id = int(submitted.stdout.strip())
        started = time.monotonic()
        watcher = stt(keyed_stack, "watch", "--job", str(job_id), timeout=400, AMQP_URL=amqp_url(vhost))
    assert watcher.returncode == 0, watcher.stdout + watcher.stderr
    # Fifteen seconds of audio take longer than starting to watch: it ends while watched.
    assert re.search(rf"job {job_id} ended \(seen through the API\): done", watcher.stdout), watcher.stdout
    # Within the processing (well under 2 minutes here, more beside other stacks on a loaded
    # machine) and a poll or two of STATUS_POLL_S; the command's own limit is above this bound.
    assert time.monotonic() - started < 300, watcher.stdout


@pytest.fixture
def forgets_its_speakers(keyed_stack):
    """The test enrols voices on the module's stack: they are forgotten after it, passed or
    failed, or they would name en_dialogue's voices in the tests after it."""
    yield
    with httpx.Client(base_url=keyed_stack.api, headers={"X-API-Key": API_KEY}, timeout=30) as client:
        for speaker in client.get("/speakers").json()["items"]:
            assert client.delete(f"/speakers/{speaker['id']}").status_code in (204, 404)


def test_an_enrolled_speaker_is_named_in_printed_transcripts_until_forgotten(keyed_stack, fixtures_dir, tmp_path,
                                                                           forgets_its_speakers):
    voices = en_dialogue_voices(fixtures_dir)
    sample, recording = tmp_path / "anna.wav", tmp_path / "meeting.wav"
    sample.write_bytes(voices["a_alone"])
    recording.write_bytes(voices["second_half"])

    enrolled = stt(keyed_stack, "speakers", "enroll", "Anna", str(sample))
    assert enrolled.returncode == 0, enrolled.stdout + enrolled.stderr
    assert re.match(r"speaker \d+ Anna: 1 voiceprint\(s\)", enrolled.stdout), enrolled.stdout
    assert re.search(r"^\d+\tAnna\t1 voiceprint\(s\)$", stt(keyed_stack, "speakers", "list").stdout, re.MULTILINE)

    submitted = stt(keyed_stack, "submit", str(recording))
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = re.search(r"accepted as job (\d+)", submitted.stderr).group(1)
    lines = re.findall(r"^\[\d\d:\d\d\.\d\] (\S+): (.*)$", submitted.stdout, re.MULTILINE)
    said_by_anna = [text.lower() for who, text in lines if who == "Anna"]
    # Speaker A of en_dialogue talks about the sales numbers; the other voice stays a label.
    assert said_by_anna and all("sales" in text or "twelve" in text for text in said_by_anna), submitted.stdout
    assert {who for who, _ in lines} - {"Anna"} and all(
        re.fullmatch(r"spk_\d+", who) for who, _ in lines if who != "Anna"), submitted.stdout

    forgotten = stt(keyed_stack, "speakers", "forget", "anna")
    assert (forgotten.returncode, forgotten.stdout) == (0, "forgot Anna\n"), forgotten.stderr
    assert "Anna" not in stt(keyed_stack, "get", job_id, "--format", "txt").stdout
    listed = stt(keyed_stack, "speakers", "list")
    assert listed.stdout == "" and "no speakers enrolled" in listed.stderr
    again = stt(keyed_stack, "speakers", "forget", "Anna")
    assert again.returncode == 1 and "no enrolled speaker called 'Anna'" in again.stderr

    # Enrolled from the recording's own speaker instead of a sample: named again at once.
    unnamed = stt(keyed_stack, "get", job_id, "--format", "txt").stdout
    anna_label = re.match(r"\[[\d:]+\] (spk_\d+): .*sales", unnamed)  # her line comes first
    assert anna_label, unnamed
    from_job = stt(keyed_stack, "speakers", "enroll", "Anna", "--job", job_id, "--speaker", anna_label.group(1))
    assert re.match(rf"speaker \d+ Anna: 1 voiceprint\(s\); transcripts renamed: .*\b{job_id}\b", from_job.stdout), (
        from_job.stdout + from_job.stderr)
    assert "] Anna: " in stt(keyed_stack, "get", job_id, "--format", "txt").stdout
    assert stt(keyed_stack, "speakers", "enroll", "Anna", str(sample), "--job", job_id).returncode == 2

    # A speaker whose name is another's id: forgetting by that text is refused, never guessed.
    anna_id = re.match(r"speaker (\d+) Anna", from_job.stdout).group(1)
    other = next(label for label in re.findall(r"\] (spk_\d+): ", unnamed) if label != anna_label.group(1))
    numbered = stt(keyed_stack, "speakers", "enroll", anna_id, "--job", job_id, "--speaker", other)
    assert numbered.returncode == 0, numbered.stdout + numbered.stderr
    ambiguous = stt(keyed_stack, "speakers", "forget", anna_id)
    assert ambiguous.returncode == 1 and "both the name of speaker" in ambiguous.stderr, ambiguous.stderr
    assert re.search(r"^\d+\tAnna\t", stt(keyed_stack, "speakers", "list").stdout, re.MULTILINE)
    assert stt(keyed_stack, "speakers", "forget", " anna ").stdout == "forgot Anna\n"
    assert stt(keyed_stack, "speakers", "forget", anna_id).stdout == f"forgot {anna_id}\n"
    # A name typed with a combining accent is the one kept precomposed (NFC, as the server keeps it).
    accented = stt(keyed_stack, "speakers", "enroll", "Jos\u00e9", "--job", job_id, "--speaker", other)
    assert accented.returncode == 0, accented.stdout + accented.stderr
    assert stt(keyed_stack, "speakers", "forget", "Jose\u0301").stdout == "forgot Jos\u00e9\n"


def test_a_job_is_named_by_hand_and_deleted(keyed_stack, fixtures_dir):
    submitted = stt(keyed_stack, "submit", str(fixtures_dir / "en_dialogue.wav"))
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = re.search(r"accepted as job (\d+)", submitted.stderr).group(1)
    labels = sorted(set(re.findall(r"^\[\d\d:\d\d\.\d\] (spk_\d+): ", submitted.stdout, re.MULTILINE)))
    assert len(labels) == 2, submitted.stdout

    named = stt(keyed_stack, "name", job_id, f"{labels[0]}=Anna", f"{labels[1]}=Boris Petrov")
    assert (named.returncode, named.stdout) == (0, f"{labels[0]}\tAnna\n{labels[1]}\tBoris Petrov\n"), named.stderr
    text = stt(keyed_stack, "get", job_id, "--format", "txt").stdout
    assert "] Anna: " in text and "] Boris Petrov: " in text and "spk_" not in text, text
    listed = stt(keyed_stack, "name", job_id).stdout.splitlines()  # no LABEL=NAME: the speakers
    assert [line.split("\t")[:2] + line.split("\t")[3:] for line in listed] == [
        [labels[0], "Anna", "by hand"], [labels[1], "Boris Petrov", "by hand"]], listed
    assert all(re.fullmatch(r"00:0\d\.\d", line.split("\t")[2]) for line in listed), listed  # speaking time
    unnamed = stt(keyed_stack, "name", job_id, f"{labels[0]}=")
    assert unnamed.stdout == f"{labels[0]}\t-\n{labels[1]}\tBoris Petrov\n", unnamed.stderr
    unknown = stt(keyed_stack, "name", job_id, "spk_9=Zed")
    assert unknown.returncode == 1 and "spk_9" in unknown.stderr, unknown.stderr
    assert stt(keyed_stack, "name", job_id, "Anna").returncode == 2  # not LABEL=NAME

    # Another key cannot delete it; its owner can, once; an unknown id is reported and the rest go on.
    theirs = stt(keyed_stack, "delete", job_id, STT_API_KEY=OTHER_KEY)
    assert theirs.returncode == 1 and f"job {job_id}: not deleted, 404" in theirs.stderr, theirs.stderr
    deleted = stt(keyed_stack, "delete", "999999", job_id)
    assert (deleted.returncode, deleted.stdout) == (1, f"deleted job {job_id}\n"), deleted.stderr
    assert "job 999999: not deleted, 404" in deleted.stderr
    gone = stt(keyed_stack, "status", job_id)
    assert gone.returncode == 1 and "404" in gone.stderr


def test_ctrl_c_while_following_several_jobs_tells_how_to_look_at_each(keyed_stack, fixtures_dir):
    """It printed `stt status 7 8`, but status takes one id (a usage error): now one line a job."""
    follower = Background(["submit", str(fixtures_dir / "jfk.flac"), str(fixtures_dir / "jfk.flac")],
                          cli_env(keyed_stack))
    ids: list[str] = []
    try:
        follower.wait_for(r"accepted as job \d+", timeout=120)
        deadline = time.monotonic() + 120
        while len(ids := re.findall(r"accepted as job (\d+)", follower.output)) < 2:
            assert time.monotonic() < deadline and follower.process.poll() is None, follower.output
            time.sleep(0.1)
    finally:
        code = follower.stop()
        cancel_jobs(keyed_stack, [int(job_id) for job_id in ids])
    assert code == 130, follower.output
    assert "stopped waiting; the jobs go on" in follower.output, follower.output
    for job_id in ids:
        assert re.search(rf"^\s*job {job_id} \(jfk\.flac\) (stt status {job_id}|is done: stt get {job_id} "
                         rf"--format txt)$", follower.output, re.MULTILINE), follower.output
    assert f"stt status {ids[0]} {ids[1]}" not in follower.output


def test_a_job_still_processing_is_cancelled_then_deleted(keyed_stack, fixtures_dir, tmp_path):
    parts = [decode_audio(str(fixtures_dir / n)) for n in ("ami_dev00.wav", "ami_dev01.wav", "ami_trn03.wav")]
    meeting = tmp_path / "meeting.wav"
    meeting.write_bytes(wav(np.concatenate(parts)))  # 90 s: still diarizing when cancelled
    submitted = stt(keyed_stack, "submit", "--no-wait", str(meeting))
    job_id = submitted.stdout.split()[0]
    refused = stt(keyed_stack, "delete", job_id)
    assert refused.returncode == 1 and f"POST /transcripts/{job_id}/cancel" in refused.stderr, refused.stderr

    theirs = stt(keyed_stack, "cancel", job_id, STT_API_KEY=OTHER_KEY)
    assert theirs.returncode == 1 and f"job {job_id}: not cancelled, 404" in theirs.stderr, theirs.stderr
    cancelled = stt(keyed_stack, "cancel", "999999", job_id)
    # (however many segments were kept by then: how far it got depends on the machine)
    assert cancelled.returncode == 1, cancelled.stderr
    assert re.fullmatch(rf"cancelled job {job_id} \(\d+ segments kept\)\n", cancelled.stdout), cancelled.stdout
    assert "job 999999: not cancelled, 404" in cancelled.stderr
    again = stt(keyed_stack, "cancel", job_id)
    assert again.returncode == 1 and "has already ended (error)" in again.stderr, again.stderr
    status = json.loads(stt(keyed_stack, "status", job_id, "--json").stdout)
    assert (status["status"], status["error"]) == ("error", "cancelled")
    assert stt(keyed_stack, "delete", job_id).stdout == f"deleted job {job_id}\n"


class AnswerLosingProxy:
    """A TCP proxy to the API that lets the first request through and then drops the connection
    instead of passing the answer back: the job exists, the client never hears of it."""

    def __init__(self, api: str) -> None:
        self.target = httpx.URL(api)
        self.port = free_port()
        self.connections = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        server_reader, server_writer = await asyncio.open_connection(self.target.host, self.target.port)
        sending = asyncio.ensure_future(self._pipe(client_reader, server_writer))
        if self.connections == 1:
            await server_reader.read(1)  # the service has answered: the job was made
            client_writer.transport.abort()
            server_writer.close()
            sending.cancel()
            return
        await asyncio.gather(sending, self._pipe(server_reader, client_writer))

    def __enter__(self) -> str:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(asyncio.start_server(self._serve, "127.0.0.1", self.port),
                                         self.loop).result(10)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


def test_an_upload_whose_answer_was_lost_is_sent_again_and_makes_one_job(keyed_stack, fixtures_dir, tmp_path):
    recording = tmp_path / f"call-{time.monotonic_ns()}.flac"
    recording.write_bytes((fixtures_dir / "jfk.flac").read_bytes())
    proxy = AnswerLosingProxy(keyed_stack.api)
    with proxy as api:
        submitted = stt(keyed_stack, "submit", "--no-wait", "--api", api, str(recording), timeout=120)
    if submitted.stdout.strip().isdigit():
        cancel_jobs(keyed_stack, [int(submitted.stdout)])
    assert submitted.returncode == 0, submitted.stderr
    assert "the connection broke" in submitted.stderr and proxy.connections == 2
    jobs = keyed_stack.query("SELECT id FROM transcripts WHERE filename = $1", recording.name)
    assert [str(job["id"]) for job in jobs] == [submitted.stdout.strip()]  # the job the first send made


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that prints no line for each request."""

    def log_message(self, *args) -> None:
        pass


def send_json(handler: BaseHTTPRequestHandler, status: int, body: object,
              headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    for header, value in (headers or {}).items():
        handler.send_header(header, value)
    handler.end_headers()
    handler.wfile.write(data)


class LocalServer:
    """An HTTP server on a free local port, serving on a thread of its own while in a `with`, which
    gives its address."""

    def __init__(self, handler: type[BaseHTTPRequestHandler],
                 server_class: type[ThreadingHTTPServer] = ThreadingHTTPServer) -> None:
        self.server = server_class(("127.0.0.1", free_port()), handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self) -> str:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()


class GivingUpGateway(LocalServer):
    """A gateway in front of the API (as ingress-nginx is) that passes requests on, but for the first
    POST to `path` answers 504 itself after the API has answered (its wait for the API ran out): the
    job was made, the client is told the gateway gave up. `keys` holds each such POST's Idempotency-Key."""

    def __init__(self, api: str, path: str) -> None:
        keys = self.keys = []

        class Handler(QuietHandler):
            def forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                answer = httpx.request(self.command, api + self.path, content=body, headers=headers, timeout=120)
                status, content_type, data = answer.status_code, answer.headers.get("content-type", ""), answer.content
                if self.command == "POST" and self.path.split("?")[0] == path:
                    keys.append(self.headers.get("Idempotency-Key"))
                    if len(keys) == 1:
                        status, content_type = 504, "text/html"
                        data = b"<html><head><title>504 Gateway Time-out</title></head><body>nginx</body></html>"
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = forward  # noqa: N815 (http.server's names)

        super().__init__(Handler)


def test_an_upload_a_gateway_gave_up_on_is_sent_again_and_makes_one_job(keyed_stack, fixtures_dir, tmp_path):
    """A gateway's 504 (ingress-nginx gives up after 60 s) was printed as "refused", exit 1, and
    the user submitting again made a second job. The upload carries an Idempotency-Key: it is sent
    again with it, and the service answers with the job the first send made."""
    recording = tmp_path / f"gateway-{time.monotonic_ns()}.flac"
    recording.write_bytes((fixtures_dir / "jfk.flac").read_bytes())
    gateway = GivingUpGateway(keyed_stack.api, "/recognize")
    with gateway as api:
        submitted = stt(keyed_stack, "submit", "--no-wait", "--api", api, str(recording), timeout=120)
    if submitted.stdout.strip().isdigit():
        cancel_jobs(keyed_stack, [int(submitted.stdout)])
    assert submitted.returncode == 0, submitted.stderr
    assert "a gateway answered 504: Gateway Timeout, sending it again" in submitted.stderr, submitted.stderr
    assert "refused" not in submitted.stderr, submitted.stderr
    assert len(gateway.keys) == 2 and gateway.keys[0] == gateway.keys[1] and gateway.keys[0], gateway.keys
    jobs = keyed_stack.query("SELECT id FROM transcripts WHERE filename = $1", recording.name)
    assert [str(job["id"]) for job in jobs] == [submitted.stdout.strip()]


def test_an_address_a_gateway_gave_up_on_is_not_sent_again(keyed_stack):
    """The service downloads and decodes a recording at an address before it answers: a gateway's
    504 may come while it still downloads, and the send again (up to three) started another download
    of the same recording. It is reported at once, as maybe accepted. (The stack refuses this private
    address; the gateway answers 504 in its place.)"""
    gateway = GivingUpGateway(keyed_stack.api, "/recognize")
    with gateway as api:
        submitted = stt(keyed_stack, "submit", "--no-wait", "--api", api, "http://127.0.0.1:9/meeting.wav",
                        timeout=120)
    said = " ".join(submitted.stderr.split())
    assert submitted.returncode == 1 and submitted.stdout == "", said
    assert ("http://127.0.0.1:9/meeting.wav: no answer: a gateway answered 504: Gateway Timeout (the service may"
            " still be fetching the address); it may have been accepted: see stt list before sending it again") in said
    assert ", sending it again" not in said and "refused" not in said, said
    assert len(gateway.keys) == 1, gateway.keys


def test_a_rerun_whose_answer_was_lost_is_sent_again_and_makes_one_job(keyed_stack, fixtures_dir, tmp_path):
    """`stt rerun` sent no Idempotency-Key: a lost answer was an error, and running it again made a
    second rerun. It now sends one, and sends it once more when the answer is lost."""
    recording = tmp_path / f"rerun-{time.monotonic_ns()}.flac"
    recording.write_bytes((fixtures_dir / "jfk.flac").read_bytes())
    first = stt(keyed_stack, "submit", "--no-wait", str(recording))
    assert first.returncode == 0, first.stderr
    proxy = AnswerLosingProxy(keyed_stack.api)
    with proxy as api:
        rerun = stt(keyed_stack, "rerun", first.stdout.strip(), "--speakers", "1", "--no-wait", "--api", api,
                    timeout=120)
    cancel_jobs(keyed_stack, [int(first.stdout), *([int(rerun.stdout)] if rerun.stdout.strip().isdigit() else [])])
    assert rerun.returncode == 0, rerun.stderr
    assert "sending it again" in rerun.stderr and proxy.connections == 2, rerun.stderr
    jobs = keyed_stack.query("SELECT id FROM transcripts WHERE filename = $1 ORDER BY id", recording.name)
    assert [str(job["id"]) for job in jobs] == [first.stdout.strip(), rerun.stdout.strip()]


def test_a_call_with_one_party_per_channel_is_transcribed_channel_by_channel(keyed_stack, fixtures_dir):
    """stereo_diarization.wav: two people talking at once, one on each channel. Mixed, one
    sentence is lost under the other; with --multichannel each is whole, under its own speaker."""
    submitted = stt(keyed_stack, "submit", "--multichannel", str(fixtures_dir / "stereo_diarization.wav"))
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    lines = re.findall(r"^\[\d\d:\d\d\.\d\] (spk_\d+): (.*)$", submitted.stdout, re.MULTILINE)
    said = {who: " ".join(text.lower() for w, text in lines if w == who) for who, _ in lines}
    assert len(said) == 2, submitted.stdout
    left, right = sorted(said.values(), key=lambda text: "horizon" in text)
    assert "complaint against the wizard" in left and "curtain" in left and "horizon" not in left, said
    assert "horizon seems extremely distant" in right and "wizard" not in right, said

    # A count of speakers does not go with channels kept apart; run again mixed, it does.
    job_id = re.search(r"accepted as job (\d+)", submitted.stderr).group(1)
    refused = stt(keyed_stack, "rerun", job_id, "--speakers", "2", "--no-wait")
    assert refused.returncode == 1 and "multichannel" in refused.stderr, refused.stderr
    mixed = stt(keyed_stack, "rerun", job_id, "--mixed", "--speakers", "2", "--no-wait")
    assert mixed.returncode == 0, mixed.stderr
    options = json.loads(stt(keyed_stack, "get", mixed.stdout.strip()).stdout)["options"]
    assert (options["multichannel"], options["num_speakers"]) == (False, 2)


def test_a_vocabulary_spells_the_names_a_recording_uses(keyed_stack, fixtures_dir):
    """hotwords.mp3 says "ComfyUI" twice, which Whisper alone writes as other words
    (test_handlers shows both)."""
    submitted = stt(keyed_stack, "submit", "--vocabulary", "Anna Petrova, ComfyUI", "--language", "en",
                    "--spelling", "folder=directory", str(fixtures_dir / "hotwords.mp3"))
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert submitted.stdout.count("ComfyUI") == 2 and "directory" in submitted.stdout, submitted.stdout
    assert "folder" not in submitted.stdout, submitted.stdout
    assert "Anna" not in submitted.stdout, submitted.stdout


def test_redaction_keeps_card_phone_and_email_out_of_everything_stored(keyed_stack):
    """billing_call.flac reads out a card number, a phone number and an e-mail address
    (test_handlers shows Whisper writes them without redaction)."""
    submitted = stt(keyed_stack, "submit", "--redact", "card,phone,email", "--language", "en",
                    str(ROOT / "tests" / "data" / "billing_call.flac"))
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert all(label in submitted.stdout for label in ("[CARD]", "[PHONE]", "[EMAIL]")), submitted.stdout
    job_id = int(re.search(r"accepted as job (\d+)", submitted.stderr)[1])
    with httpx.Client(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as client:
        document = client.get(f"{keyed_stack.api}/transcripts/{job_id}", params={"words": "true"}).json()
        srt = client.get(f"{keyed_stack.api}/transcripts/{job_id}", params={"format": "srt"}).text
        found = client.get(f"{keyed_stack.api}/search", params={"q": "card number", "mode": "text"}).json()
    assert document["options"]["redact"] == ["card", "phone", "email"]
    cues = [line for line in srt.splitlines() if "-->" not in line and not line.isdigit()]
    stored = keyed_stack.query("SELECT text, words::text, search_text::text FROM segments WHERE transcript_id = $1",
                               job_id)
    everything = " ".join([*cues, *(w["word"] for s in document["segments"] for w in s["words"])]
                          + [row["text"] for row in stored]
                          + [w["word"] for row in stored for w in json.loads(row["words"])]
                          + [lexeme for row in stored for lexeme in re.findall(r"'([^']*)'", row["search_text"])])
    assert "[CARD]" in srt and not re.search(r"\d{3}", everything) and ".com" not in everything, everything
    assert any("[CARD]" in hit["text"] for hit in found["items"] if hit["transcript_id"] == job_id), found

    # The stored recording becomes the audio with the redacted words silent, and only them.
    deadline = time.monotonic() + 60
    with httpx.Client(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as client:
        while (audio := client.get(f"{keyed_stack.api}/transcripts/{job_id}/audio")).headers[
                "content-type"] != "audio/wav":
            assert time.monotonic() < deadline, audio.headers
            time.sleep(0.5)
    assert 'filename="billing_call.wav"' in audio.headers["content-disposition"]
    samples = decode_audio(io.BytesIO(audio.content))
    assert abs(samples.size / SAMPLE_RATE - document["duration"]) < 0.05

    def loudest(word: dict) -> float:
        return float(np.abs(samples[int(word["start"] * SAMPLE_RATE):int(word["end"] * SAMPLE_RATE)]).max())

    words = [w for s in document["segments"] for w in s["words"]]
    hidden = [w for w in words if re.search(r"\[(CARD|PHONE|EMAIL)\]", w["word"])]
    assert len(hidden) == 3 and all(loudest(w) == 0 for w in hidden), hidden
    # Only those: every word apart from them keeps its sound (a word shorter than a few hundredths
    # of a second can be quiet between syllables, so the loudest of each word is what counts).
    kept = [w for w in words if w not in hidden and w["end"] - w["start"] >= 0.1]
    assert len(kept) >= 10 and sum(loudest(w) > 0.05 for w in kept) >= 0.9 * len(kept), words

    # A rerun runs on that WAV, and says so: its audio is served as the WAV it is.
    with httpx.Client(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as client:
        rerun = client.post(f"{keyed_stack.api}/transcripts/{job_id}/rerun", json={"redact": []})
        assert rerun.status_code == 202 and rerun.json()["filename"] == "billing_call.wav", rerun.text
        again = client.get(f"{keyed_stack.api}/transcripts/{rerun.json()['id']}/audio")
        assert again.headers["content-type"] == "audio/wav" and again.content == audio.content
        keyed_stack.wait_finished(rerun.json()["id"], client=client)


def test_translate_writes_russian_speech_in_english_under_its_two_speakers(keyed_stack, fixtures_dir, tmp_path):
    opening = tmp_path / "opening.wav"  # ru_dialogue's first two lines
    opening.write_bytes(wav(decode_audio(str(fixtures_dir / "ru_dialogue.wav"))[:8 * SAMPLE_RATE]))
    submitted = stt(keyed_stack, "submit", "--translate", str(opening))
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    lines = re.findall(r"^\[\d\d:\d\d\.\d\] (spk_\d+): (.*)$", submitted.stdout, re.MULTILINE)
    said = " ".join(text for _, text in lines).lower()
    assert not re.search("[а-яё]", said) and "hear" in said and "well" in said, submitted.stdout
    assert len({speaker for speaker, _ in lines}) == 2, submitted.stdout


def test_a_text_file_is_refused_with_the_servers_reason(keyed_stack, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a recording, just words\n" * 50)
    result = stt(keyed_stack, "submit", str(notes))
    assert result.returncode == 1
    assert "notes.txt: refused, 415:" in result.stderr
    assert "is not audio this service can decode" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_address_is_given_to_the_service_to_fetch(keyed_stack):
    """The stack fetches only public addresses (its default), so the refusal shows the address
    reached the service (tests/test_ingest.py fetches one)."""
    result = stt(keyed_stack, "submit", "http://127.0.0.1:9/meeting.wav", "--no-wait")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "http://127.0.0.1:9/meeting.wav: refused, 400" in result.stderr
    assert "AUDIO_URL_ALLOW_PRIVATE" in result.stderr, result.stderr


def test_an_upload_over_the_size_limit_is_refused(keyed_stack, tmp_path):
    big = tmp_path / "big.wav"
    big.write_bytes(b"\0" * (5 * 1024 * 1024 + 1000))  # the test stack allows 5 MB
    bigger = tmp_path / "bigger.wav"
    bigger.write_bytes(b"\0" * (64 * 1024 * 1024))  # over the request limit too: refused before it is read
    result = stt(keyed_stack, "submit", str(big), str(bigger), timeout=120)
    assert result.returncode == 1
    assert "big.wav: refused, 413: the file exceeds MAX_UPLOAD_MB (5 MB)" in result.stderr, result.stderr
    assert "bigger.wav: refused, 413:" in result.stderr, result.stderr


def test_without_a_key_the_servers_reason_is_shown(keyed_stack, fixtures_dir):
    result = stt(keyed_stack, "status", "1", STT_API_KEY=None)
    assert result.returncode == 1
    assert "401: an API key is required" in result.stderr
    unknown = stt(keyed_stack, "get", "999999", "--format", "srt")
    assert unknown.returncode == 1 and "404: no job with id 999999" in unknown.stderr


def test_a_file_that_cannot_be_written_and_a_mistyped_job_are_reported(keyed_stack, jfk_submission, tmp_path):
    _, job_id = jfk_submission
    unwritable = stt(keyed_stack, "get", str(job_id), "--format", "srt", "-o", str(tmp_path / "missing" / "x.srt"))
    assert unwritable.returncode == 1 and "cannot write" in unwritable.stderr, unwritable.stderr
    assert "Traceback" not in unwritable.stderr


def test_watching_a_job_the_api_does_not_know_ends_only_without_a_key():
    """Without an API key a 404 means no such job: watching it would wait for ever. With one,
    another key's job is answered 404 too (test_watch_for_another_keys_job_ends_with_its_event)."""
    unknown = {"detail": "no job with id 999999"}
    with private_vhost() as vhost, StandInApi({("GET", "/status/999999"): [(404, unknown)]}) as api:
        asyncio.run(declare_events_exchange(amqp_url(vhost)))
        env = {**os.environ, "STT_API_URL": api, "AMQP_URL": amqp_url(vhost)}
        env.pop("STT_API_KEY", None)
        watched = subprocess.run([STT, "watch", "--job", "999999"], env=env, capture_output=True, text=True,
                                 timeout=60)
    assert watched.returncode == 1 and "job 999999: no job with id 999999" in watched.stderr, watched.stderr


def test_file_names_that_are_not_utf8_or_hold_a_backslash_are_sent(keyed_stack, fixtures_dir, tmp_path):
    """Linux file names are bytes: a Latin-1 é is no UTF-8, and a backslash is an ordinary character."""
    recording = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9 a\\b.flac"))
    recording.write_bytes((fixtures_dir / "jfk.flac").read_bytes())
    submitted = stt(keyed_stack, "submit", "--no-wait", str(recording))
    assert submitted.returncode == 0, submitted.stderr
    job = keyed_stack.query("SELECT filename FROM transcripts WHERE id = $1", int(submitted.stdout))
    assert [row["filename"] for row in job] == ["caf\ufffd a\\b.flac"]


class RedirectingServer(LocalServer):
    """Answers every request with a permanent redirect, as a proxy sending http:// to https:// does."""

    def __init__(self) -> None:
        class Handler(QuietHandler):
            def answer(self) -> None:
                self.send_response(301)
                self.send_header("Location", "https://stt.example" + self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = do_DELETE = do_PATCH = answer

        super().__init__(Handler)


class StandInApi(LocalServer):
    """A local HTTP server answering each (method, path) with its answers in turn, (status, JSON
    body) or (status, JSON body, headers), the last one again and again: the API as the client sees
    it when it errs. A body that is a str is sent as an HTML page. With `page` (status, content type,
    text), every request gets that instead. `delays` holds seconds to wait before answering a
    (method, path): an API that does not answer in time. `requests` holds what it was sent:
    (method, path, body); `headers` the headers of each."""

    def __init__(self, answers: dict[tuple[str, str], list[tuple]],
                 page: tuple[int, str, str] | None = None, delays: dict[tuple[str, str], float] | None = None) -> None:
        requests = self.requests = []
        sent_headers = self.headers = []

        class Handler(QuietHandler):
            def answer(self) -> None:
                sent = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                requests.append((self.command, self.path.split("?")[0], sent))
                sent_headers.append(dict(self.headers))
                extra_headers: dict[str, str] = {}
                if page is not None:
                    status, content_type, text = page
                    data = text.encode()
                else:
                    queue = answers[(self.command, self.path.split("?")[0])]
                    status, body, *more = queue.pop(0) if len(queue) > 1 else queue[0]
                    extra_headers = more[0] if more else {}
                    content_type, data = (("text/html", body.encode()) if isinstance(body, str)
                                          else ("application/json", json.dumps(body).encode()))
                time.sleep((delays or {}).get((self.command, self.path.split("?")[0]), 0))
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for header, value in extra_headers.items():
                    self.send_header(header, value)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = answer  # noqa: N815 (http.server's names)

        class QuietServer(ThreadingHTTPServer):
            def handle_error(self, request, client_address) -> None:
                pass  # a client that gave up waiting: the answer goes nowhere

        super().__init__(Handler, QuietServer)


def test_following_a_job_waits_out_an_api_error_and_tells_an_unknown_outcome_from_a_failure():
    """A /status answer of 500 (one request's error) is not the job failing; an API that will not
    say (the job gone, the key refused) leaves its outcome unknown, not "failed"."""
    from cli.app import NOT_FOLLOWED, SubmittedJob, follow_jobs

    done = {"status": "done", "segments": []}
    answers = {("GET", "/status/7"): [(500, {"detail": "Internal Server Error"})] * 2 + [(200, done)],
               ("GET", "/status/8"): [(404, {"detail": "no job with id 8"})]}
    with StandInApi(answers) as api, httpx.Client(base_url=api) as client:
        documents = follow_jobs(client, [SubmittedJob(7, "a.wav"), SubmittedJob(8, "b.wav")])
    assert documents[7]["status"] == "done"
    assert documents[8]["status"] == NOT_FOLLOWED and "no job with id 8" in documents[8]["error"]


def reindex_progress(running: bool, pending: int) -> tuple[int, dict]:
    return 200, {"model": "all-minilm", "running": running, "done_segments": 10 - pending,
                 "pending_segments": pending, "error": None}


def test_a_reindex_being_followed_waits_out_a_proxys_bad_gateway():
    """A run takes hours: one 502 from a proxy ended `stt reindex --wait` with an error while the
    run went on on the server."""
    progress = reindex_progress
    answers = {("POST", "/admin/reindex"): [progress(True, 10)],
               ("GET", "/admin/reindex"): [(502, {"detail": "Bad Gateway"}), progress(True, 4),
                                           (503, {"detail": "database unavailable"}), progress(False, 0)]}
    with StandInApi(answers) as api:
        result = CliRunner().invoke(app, ["reindex", "--api", api])
    assert result.exit_code == 0, result.output
    assert "10 segments embedded with all-minilm, 0 to do (done)" in result.output


def test_a_reindex_that_stops_with_segments_to_do_exits_1_saying_what_to_do():
    """A run ends without an error while segments of its jobs are left (one ended just as it
    finished), or having seen the embedder, not switched, embed new jobs with the old model:
    `stt reindex` said "(stopped)" and exited 0. It exits 1, saying to run it again, and to switch
    the embedder only where the run saw it not switched."""
    answers = {("POST", "/admin/reindex"): [reindex_progress(True, 10)],
               ("GET", "/admin/reindex"): [reindex_progress(False, 3)]}
    with StandInApi(answers) as api:
        result = CliRunner().invoke(app, ["reindex", "--api", api])
    said = " ".join(result.output.split())
    assert result.exit_code == 1, said
    assert "7 segments embedded with all-minilm, 3 to do (stopped)" in said, said
    assert ("error: the run ended with 3 segments of its jobs not embedded with all-minilm (jobs that ended as it"
            " finished); run stt reindex again") in said and "switch" not in said, said
    not_switched = (200, {**reindex_progress(False, 0)[1], "embedder_not_switched": True})
    with StandInApi({("POST", "/admin/reindex"): [reindex_progress(True, 10)],
                     ("GET", "/admin/reindex"): [not_switched]}) as api:
        result = CliRunner().invoke(app, ["reindex", "--api", api])
    said = " ".join(result.output.split())
    assert result.exit_code == 1 and "0 to do (stopped)" in said, said
    assert "the embedder was not switched; switch it" in said, said


def test_a_reindex_whose_start_is_not_answered_in_time_is_followed(monkeypatch):
    """POST /admin/reindex may count every segment before it answers (an hour on a big store): its
    read timeout printed "did not answer within 30 s" and exited 1, though the run had started. It
    is said that the run may have started, and the run is followed (asked about, with --no-wait)."""
    from cli import app as cli

    monkeypatch.setattr(cli, "REQUEST_TIMEOUT", httpx.Timeout(0.2, connect=5))
    slow_start = {("POST", "/admin/reindex"): 1.0}
    followed = StandInApi({("POST", "/admin/reindex"): [reindex_progress(True, 10)],
                           ("GET", "/admin/reindex"): [reindex_progress(True, 4), reindex_progress(False, 0)]},
                          delays=slow_start)
    with followed as api:
        result = CliRunner().invoke(app, ["reindex", "--api", api])
    said = " ".join(result.output.split())
    assert result.exit_code == 0, said
    assert ("POST /admin/reindex: the API did not answer within 0.2 s; the run may have started: following it"
            in said), said
    assert "10 segments embedded with all-minilm, 0 to do (done)" in said, said
    asked = StandInApi({("POST", "/admin/reindex"): [reindex_progress(True, 10)],
                        ("GET", "/admin/reindex"): [reindex_progress(True, 4)]}, delays=slow_start)
    with asked as api:
        result = CliRunner().invoke(app, ["reindex", "--no-wait", "--api", api])
    said = " ".join(result.output.split())
    assert result.exit_code == 0 and "the run may have started: asking how far it is" in said, said
    assert "6 segments embedded with all-minilm, 4 to do (running)" in said, said
    assert [method for method, _, _ in asked.requests] == ["POST", "GET"], asked.requests


def test_search_highlights_are_unescaped_and_only_the_servers_marks_highlight():
    """The server sends `highlighted` HTML-escaped, with only its own <mark> tags as markup: an
    escaped `<` was shown as `&lt;`, and a `<mark>` said in a transcript must show as it is."""
    from cli.app import marked

    line = marked("1 &lt; 2 &amp;&amp; <mark>Anna</mark> typed &lt;mark&gt;x&lt;/mark&gt; &quot;ok&quot;")
    assert line.plain == '1 < 2 && Anna typed <mark>x</mark> "ok"'
    highlighted = [line.plain[span.start:span.end] for span in line.spans if "reverse" in str(span.style)]
    assert highlighted == ["Anna"]


def page_server(status: int, content_type: str, body: str) -> StandInApi:
    """Answers every request with one page that is not the API's JSON: what --api gets when it
    names a web site, or a proxy in front of the API answers with its own error page."""
    return StandInApi({}, page=(status, content_type, body))


HTML_PAGE = ("<!DOCTYPE html>\n<html>\n<head><title>Welcome</title></head>\n<body>\n"
             + "<p>lorem ipsum</p>\n" * 50 + "</body>\n</html>\n")


def test_an_api_address_answering_a_web_page_is_reported_not_a_traceback():
    with page_server(200, "text/html", HTML_PAGE) as api:
        status = subprocess.run([STT, "status", "5", "--api", api], capture_output=True, text=True, timeout=60)
        submitted = subprocess.run([STT, "submit", "https://example.com/a.wav", "--api", api],
                                   capture_output=True, text=True, timeout=60)
        got = subprocess.run([STT, "get", "5", "--format", "json", "--api", api],
                             capture_output=True, text=True, timeout=60)
    for result in (status, submitted, got):
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"the API at {api} did not answer JSON; is --api right?" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_an_error_page_that_is_not_json_is_reported_in_one_line():
    """A proxy's 502 page was printed whole as the error (and as a job's progress stage)."""
    from cli.app import ApiError, SubmittedJob, checked, follow_jobs

    with page_server(502, "text/html", HTML_PAGE) as api:
        status = subprocess.run([STT, "status", "5", "--api", api], capture_output=True, text=True, timeout=60)
    assert status.returncode == 1
    assert status.stderr.strip() == "error: 502: Bad Gateway", status.stderr

    with page_server(404, "text/html", HTML_PAGE) as api, httpx.Client(base_url=api) as client:
        documents = follow_jobs(client, [SubmittedJob(7, "a.wav")])
    assert documents[7]["error"] == "404: Not Found"

    with page_server(500, "text/plain", "\n\n  " + "x" * 1000 + "\nsecond line\n") as api, \
            httpx.Client(base_url=api) as client:
        with pytest.raises(ApiError) as raised:
            checked(client.get("/status/7"))
    assert raised.value.detail.startswith("x" * 100) and len(raised.value.detail) <= 200
    assert "\n" not in raised.value.detail

    # A gateway's own JSON error, printed over lines: its content, not its first line ("{").
    with page_server(503, "application/json", '{\n  "message": "no Route matched"\n}\n') as api, \
            httpx.Client(base_url=api) as client:
        with pytest.raises(ApiError) as raised:
            checked(client.get("/status/7"))
    assert raised.value.detail == '{"message":"no Route matched"}'


GATEWAY_TIMEOUT_PAGE = "<html><head><title>504 Gateway Time-out</title></head><body>nginx</body></html>"


def test_an_upload_whose_answer_never_comes_may_have_been_accepted_not_refused(fixtures_dir, monkeypatch):
    """A gateway that gives up on every send (504), or a send again that meets a 503 past the
    wait: an earlier send may have made the job, so the user is told to look, not "refused"."""
    from cli import app as cli

    monkeypatch.setattr(cli, "RESEND_PAUSE_S", 0)
    gave_up = StandInApi({("POST", "/recognize"): [(504, GATEWAY_TIMEOUT_PAGE)]})
    with gave_up as api:
        result = CliRunner().invoke(app, ["submit", str(fixtures_dir / "jfk.flac"), "--no-wait", "--api", api])
    said = " ".join(result.output.split())
    assert result.exit_code == 1, said
    assert "jfk.flac: sent again, it was answered 504: Gateway Timeout; it may have been accepted: see stt list" \
           in said, said
    assert "refused" not in said and len(gave_up.requests) == cli.UPLOAD_ATTEMPTS
    assert len({headers["Idempotency-Key"] for headers in gave_up.headers}) == 1

    busy = StandInApi({("POST", "/recognize"): [(504, GATEWAY_TIMEOUT_PAGE),
                                                 (503, {"detail": "busy"}, {"Retry-After": "999"})]})
    with busy as api:
        result = CliRunner().invoke(app, ["submit", str(fixtures_dir / "jfk.flac"), "--no-wait", "--api", api])
    said = " ".join(result.output.split())
    assert result.exit_code == 1 and "sent again, it was answered 503: busy; it may have been accepted" in said, said
    assert "refused" not in said and len(busy.requests) == 2


# services/ingest/submission.py maybe_created: the database went away as the job was committed.
MAYBE_CREATED_DETAIL = ("the job could not be confirmed (ConnectionDoesNotExistError): job 12 may have been created"
                        " and then runs; check GET /status/12 before sending the request again (sent again with the"
                        " same Idempotency-Key, it gets that job if it was created)")


def test_an_upload_answered_that_its_job_may_have_been_created_is_not_refused(fixtures_dir, monkeypatch):
    """A 503 whose detail names a job that may have been created was printed as "refused, 503",
    and the user submitting again made a second job. It is sent again with the same key while the
    server asks to wait (it gets that job if it was created); never confirmed, the file is told
    as maybe accepted as that job, not refused, even where a later 503 names no job."""
    from cli import app as cli

    monkeypatch.setattr(cli, "UPLOAD_BUSY_WAIT_S", 0.5)
    maybe = (503, {"detail": MAYBE_CREATED_DETAIL}, {"Retry-After": "0.2"})
    for later in (maybe, (503, {"detail": "the job could not be queued (OSError); try again later"})):
        api_answers = StandInApi({("POST", "/recognize"): [maybe, later]})
        with api_answers as api:
            result = CliRunner().invoke(app, ["submit", str(fixtures_dir / "jfk.flac"), "--no-wait", "--api", api])
        said = " ".join(result.output.split())
        assert result.exit_code == 1 and result.stdout == "", said
        assert "jfk.flac: it was answered 503: the job could not be confirmed" in said, said
        assert "job 12 may have been created" in said, said
        assert "it may have been accepted: see stt list before sending it again" in said, said
        assert "refused" not in said, said
        assert len({headers["Idempotency-Key"] for headers in api_answers.headers}) == 1
    # Confirmed by a send again (the database back): that job, once.
    with StandInApi({("POST", "/recognize"): [maybe, (202, {"id": 12, "filename": "jfk.flac"})]}) as api:
        result = CliRunner().invoke(app, ["submit", str(fixtures_dir / "jfk.flac"), "--no-wait", "--api", api])
    assert result.exit_code == 0 and result.stdout.strip() == "12", result.output


def test_a_rerun_waits_out_a_busy_server_and_a_run_that_may_have_been_made_is_said_so(monkeypatch):
    """`stt rerun` took a 503 or 429 with Retry-After (the database briefly away, a rate limit) as
    its end, exit 1, its Idempotency-Key thrown away: after a 503 naming a job that may have been
    created, running it again could make a second run. It waits them out as submit does, with the
    same key (getting that job if it was created); never confirmed, it says a new run may have been
    made, naming the job."""
    from cli import app as cli

    monkeypatch.setattr(cli, "UPLOAD_BUSY_WAIT_S", 1.0)
    route = ("POST", "/transcripts/5/rerun")
    maybe = (503, {"detail": MAYBE_CREATED_DETAIL}, {"Retry-After": "0.2"})
    limited = (429, {"detail": "rate limited"}, {"Retry-After": "0.2"})
    confirmed = StandInApi({route: [limited, maybe, (202, {"id": 12, "filename": "a.wav"})]})
    with confirmed as api:
        result = CliRunner().invoke(app, ["rerun", "5", "--no-wait", "--api", api])
    said = " ".join(result.output.split())
    assert result.exit_code == 0 and result.stdout.strip() == "12", said
    assert said.count("the server is busy, trying again in 0.2 s") == 2, said
    assert len(confirmed.requests) == 3, confirmed.requests
    assert len({headers["Idempotency-Key"] for headers in confirmed.headers}) == 1

    never = StandInApi({route: [maybe]})
    with never as api:
        result = CliRunner().invoke(app, ["rerun", "5", "--no-wait", "--api", api])
    said = " ".join(result.output.split())
    assert result.exit_code == 1 and result.stdout == "", said
    assert ("it was answered 503: the job could not be confirmed (ConnectionDoesNotExistError): job 12 may have been"
            " created") in said, said
    assert "a new run of job 5 may have been made: see stt list before running it again" in said, said
    assert len(never.requests) >= 2 and len({headers["Idempotency-Key"] for headers in never.headers}) == 1


def test_the_apis_password_is_never_printed(fixtures_dir):
    """https://user:password@host in --api (httpx sends it as Basic auth) was printed as it is."""
    secret = "s3cretpw"
    port = free_port()
    unreachable = f"http://user:{secret}@127.0.0.1:{port}"
    outputs = [CliRunner().invoke(app, ["status", "5", "--api", unreachable]),
               CliRunner().invoke(app, ["submit", str(fixtures_dir / "jfk.flac"), "--api", unreachable]),
               CliRunner().invoke(app, ["status", "5", "--api", f"http://user:{secret}@[::1"]),
               CliRunner().invoke(app, ["status", "5", "--api", f"http://user:{secret}#x@host:80"]),
               CliRunner().invoke(app, ["status", "5", "--api", f"ftp://user:{secret}@host"])]
    with page_server(200, "text/html", HTML_PAGE) as api:
        outputs.append(CliRunner().invoke(app, ["status", "5", "--api", api.replace("//", f"//user:{secret}@")]))
    with StandInApi({("POST", "/transcripts/5/rerun"): [(504, GATEWAY_TIMEOUT_PAGE)]}) as api:
        outputs.append(CliRunner().invoke(app, ["rerun", "5", "--api", api.replace("//", f"//user:{secret}@")]))
    for result in outputs:
        assert result.exit_code == 1 and secret not in result.output, result.output
    said = [" ".join(result.output.split()) for result in outputs]
    assert f"cannot reach the API at http://user:***@127.0.0.1:{port}:" in said[0], said[0]
    assert f"upload failed, cannot reach the API at http://user:***@127.0.0.1:{port}" in said[1], said[1]
    assert "is not a valid URL" in said[2] and "is not a valid URL" in said[3], said
    assert "must start with http://" in said[4] and "did not answer JSON" in said[5], said


def test_only_the_addresss_own_password_is_hidden(monkeypatch):
    """The password was replaced wherever its characters appeared in a message: a short one ("80",
    "a") turned the job's id, port numbers and ordinary words into ***. And everything before the
    address's last @ was taken for user:password, so an @ in its path hid the port and the path."""
    from cli import app as cli

    monkeypatch.setattr(cli, "RESEND_PAUSE_S", 0)
    said = {}
    with StandInApi({("POST", "/transcripts/80/rerun"): [(504, GATEWAY_TIMEOUT_PAGE)]}) as api:
        for secret in ("a", "80"):
            address = api.replace("//", f"//user:{secret}@")
            result = CliRunner().invoke(app, ["rerun", "80", "--api", address])
            said[secret] = " ".join(result.output.split())
            assert result.exit_code == 1 and f"user:{secret}@" not in said[secret], said[secret]
    for secret in ("a", "80"):
        assert ("sent again, it was answered 504: Gateway Timeout; a new run of job 80 may have been made: see stt"
                " list before running it again") in said[secret], said[secret]
    port = free_port()
    for address, shown in [(f"http://127.0.0.1:{port}/a@b", f"http://127.0.0.1:{port}/a@b"),
                           (f"http://user:pw@127.0.0.1:{port}/a@b", f"http://user:***@127.0.0.1:{port}/a@b")]:
        result = CliRunner().invoke(app, ["status", "5", "--api", address])
        output = " ".join(result.output.split())
        assert result.exit_code == 1 and f"cannot reach the API at {shown}:" in output, output


def test_a_change_whose_answer_is_late_may_have_been_made(fixtures_dir, monkeypatch):
    """A read timeout on a request that changes something was "cannot reach the API", though the
    API had it: running it again named, enrolled, registered twice. Each says it may have been done
    and how to look; a rerun is sent once more with its Idempotency-Key first."""
    from cli import app as cli

    monkeypatch.setattr(cli, "REQUEST_TIMEOUT", httpx.Timeout(0.2, connect=5))
    monkeypatch.setattr(cli, "SPEAKER_CHANGE_TIMEOUT", httpx.Timeout(0.2, connect=5))
    monkeypatch.setattr(cli, "RESEND_PAUSE_S", 0)
    routes = [("PATCH", "/transcripts/7/speakers"), ("POST", "/transcripts/7/cancel"),
              ("POST", "/transcripts/8/cancel"), ("POST", "/webhooks"), ("POST", "/speakers"),
              ("POST", "/transcripts/7/rerun"), ("GET", "/status/7")]
    slow = StandInApi({route: [(200, {})] for route in routes}, delays=dict.fromkeys(routes, 1.0))
    commands = {"name": ["name", "7", "spk_0=Anna"], "cancel": ["cancel", "7", "8"],
                "webhooks": ["webhooks", "add", "https://hooks.example/x"],
                "enroll": ["speakers", "enroll", "Anna", str(fixtures_dir / "jfk.flac")],
                "rerun": ["rerun", "7"], "status": ["status", "7"]}
    with slow as api:
        said = {}
        for command, args in commands.items():
            result = CliRunner().invoke(app, [*args, "--api", api])
            said[command] = " ".join(result.output.split())
            assert result.exit_code == 1 and "Traceback" not in said[command], said[command]
    late = "the API did not answer within 0.2 s"
    assert f"{late}; the names may have been given: see stt name 7" in said["name"], said
    assert (f"job 7: {late}; it may have been cancelled: see stt status 7" in said["cancel"]
            and f"job 8: {late}; it may have been cancelled: see stt status 8" in said["cancel"]), said
    assert f"{late}; the webhook may have been registered: see stt webhooks list" in said["webhooks"], said
    assert f"{late}; 'Anna' may have been enrolled: see stt speakers list" in said["enroll"], said
    assert "sending it again" in said["rerun"], said
    assert f"sent again, {late}; a new run of job 7 may have been made: see stt list" in said["rerun"], said
    reruns = [headers for (_, path, _), headers in zip(slow.requests, slow.headers, strict=True)
              if path == "/transcripts/7/rerun"]
    assert len(reruns) == 2 and reruns[0]["Idempotency-Key"] == reruns[1]["Idempotency-Key"], reruns
    # Asking changes nothing: no "may have been".
    assert f"the API at {api} did not answer within 0.2 s" in said["status"] and "may have" not in said["status"]
    assert "cannot reach" not in " ".join(said.values()), said


def test_answers_of_the_wrong_shape_are_reported_not_a_traceback(monkeypatch):
    """A 200 page that is no JSON while following jobs stopped following all of them with no list
    of those still running; JSON of another shape on a listing was a KeyError traceback."""
    from cli import app as cli

    monkeypatch.setattr(cli, "FOLLOW_TRIES", 2)
    monkeypatch.setattr(cli, "POLL_INTERVAL_S", 0.01)
    answers = {("POST", "/recognize"): [(202, {"id": 7, "filename": "a.wav"}), (202, {"id": 8, "filename": "b.wav"})],
               ("GET", "/status/7"): [(200, "<html><body>Please sign in to the Wi-Fi</body></html>")],
               ("GET", "/status/8"): [(200, {"status": "done", "segments": []})],
               ("GET", "/transcripts"): [(200, {"hello": "world"})]}
    with StandInApi(answers) as api:
        followed = CliRunner().invoke(app, ["submit", "https://example.com/a.wav", "https://example.com/b.wav",
                                            "--api", api])
        listed = CliRunner().invoke(app, ["list", "--api", api])
    said = " ".join(followed.output.split())
    assert followed.exit_code == 1, said
    assert ("job 7 (a.wav): could not follow it (GET /status/7 answered something that is not JSON); it may still"
            " be running: stt status 7") in said, said
    assert "job 8: b.wav (no speech)" in said, said
    said = " ".join(listed.output.split())
    assert listed.exit_code == 1 and isinstance(listed.exception, SystemExit), said  # not a KeyError
    assert 'GET /transcripts answered JSON that is not a listing ({"hello":"world"})' in said, said


def test_an_empty_events_list_is_sent_for_the_api_to_refuse_not_taken_as_all():
    refusal = {"detail": "events are some of transcript.completed, transcript.failed"}
    stand_in = StandInApi({("POST", "/webhooks"): [(400, refusal)]})
    with stand_in as api:
        result = CliRunner().invoke(app, ["webhooks", "add", "https://hooks.example/x", "--events", "",
                                          "--api", api])
    assert result.exit_code == 1
    assert "events are some of" in result.output
    [(_, _, sent)] = stand_in.requests
    assert json.loads(sent) == {"url": "https://hooks.example/x", "events": []}


def test_the_webhook_secret_is_read_from_the_environment():
    """A secret on the command line is in the shell's history and in `ps`."""
    hook = {"id": 3, "url": "https://hooks.example/x", "events": ["transcript.completed"],
            "secret": "whsec_from-the-environment-1234"}
    stand_in = StandInApi({("POST", "/webhooks"): [(201, hook)]})
    with stand_in as api:
        result = CliRunner().invoke(app, ["webhooks", "add", "https://hooks.example/x", "--api", api],
                                    env={"STT_WEBHOOK_SECRET": "whsec_from-the-environment-1234"})
    assert result.exit_code == 0, result.output
    [(_, _, sent)] = stand_in.requests
    assert json.loads(sent)["secret"] == "whsec_from-the-environment-1234"
    # The user's own secret is not printed back (logs, scrollback); one the server made is, once.
    assert result.output == "webhook 3: https://hooks.example/x (transcript.completed)\n", result.output
    with StandInApi({("POST", "/webhooks"): [(201, {**hook, "secret": "whsec_made-by-the-server"})]}) as api:
        made = CliRunner().invoke(app, ["webhooks", "add", "https://hooks.example/x", "--api", api],
                                  env={"STT_WEBHOOK_SECRET": None})
    assert made.exit_code == 0 and "secret: whsec_made-by-the-server\n" in made.output, made.output


def test_watch_for_one_job_stopped_before_it_ends_does_not_exit_as_done():
    """`watch --job` exits 0 when the job is done: a Ctrl-C (or a SIGTERM) before it ended said the
    same. It now ends as submit does when stopped (130; 143 for SIGTERM); plain watch still 0."""
    processing = {"status": "processing", "stage": "transcribing", "percent": 40}
    with private_vhost() as vhost, StandInApi({("GET", "/status/7"): [(200, processing)]}) as api:
        asyncio.run(declare_events_exchange(amqp_url(vhost)))
        env = {**os.environ, "STT_API_URL": api, "AMQP_URL": amqp_url(vhost), "PYTHONUNBUFFERED": "1"}
        codes = {}
        for args, signum in ((["--job", "7"], signal.SIGINT), (["--job", "7"], signal.SIGTERM),
                             ([], signal.SIGTERM)):
            watcher = Background(["watch", *args], env)
            try:
                watcher.wait_for(r"watching stt\.events", timeout=60)
                watcher.process.send_signal(signum)
                codes[(bool(args), signum)] = watcher.process.wait(15)
            finally:
                watcher.stop()
            assert "Traceback" not in watcher.output, watcher.output
    assert codes == {(True, signal.SIGINT): 130, (True, signal.SIGTERM): 143, (False, signal.SIGTERM): 0}


def test_watch_for_one_job_ends_when_it_is_deleted():
    """`watch --job` ignored its job's transcript.deleted: with an API that cannot say (another
    key's job, the API unreachable) it waited HIDDEN_JOB_SILENCE_S (60 minutes) before exiting 1.
    It now says so and exits 1 at once; another job's deletion changes nothing."""
    from common.broker import EVENTS_EXCHANGE
    from common.messages import TranscriptDeleted

    async def publish(url: str, *events: TranscriptDeleted) -> None:
        connection = await aio_pika.connect(url)
        try:
            exchange = await (await connection.channel()).get_exchange(EVENTS_EXCHANGE)
            for event in events:
                await exchange.publish(aio_pika.Message(event.model_dump_json().encode()),
                                       routing_key=event.ROUTING_KEY)
        finally:
            await connection.close()

    processing = {"status": "processing", "stage": "transcribing", "percent": 40}
    with private_vhost() as vhost, StandInApi({("GET", "/status/7"): [(200, processing)]}) as api:
        asyncio.run(declare_events_exchange(amqp_url(vhost)))
        env = {**os.environ, "STT_API_URL": api, "AMQP_URL": amqp_url(vhost), "PYTHONUNBUFFERED": "1"}
        watcher = Background(["watch", "--job", "7"], env)
        try:
            watcher.wait_for(r"watching stt\.events", timeout=60)
            asyncio.run(publish(amqp_url(vhost), TranscriptDeleted(job_id=8, transcript_id=8),
                                TranscriptDeleted(job_id=7, transcript_id=7)))
            code = watcher.process.wait(30)
        finally:
            watcher.stop()
    assert code == 1 and "job 7 was deleted" in watcher.output, watcher.output
    assert "job 8" not in watcher.output and "Traceback" not in watcher.output, watcher.output


def test_a_redirect_is_reported_not_taken_for_success(tmp_path):
    with RedirectingServer() as api:
        deleted = subprocess.run([STT, "delete", "5", "--api", api], capture_output=True, text=True, timeout=60)
        got = subprocess.run([STT, "get", "5", "--format", "srt", "-o", str(tmp_path / "x.srt"), "--api", api],
                             capture_output=True, text=True, timeout=60)
    assert deleted.returncode == 1 and "deleted" not in deleted.stdout, deleted.stdout
    assert "redirect to https://stt.example/transcripts/5" in deleted.stderr, deleted.stderr
    assert got.returncode == 1 and not (tmp_path / "x.srt").exists(), got.stderr


def test_a_connection_refused_after_a_broken_send_says_the_job_may_exist(fixtures_dir):
    """The first send breaks off after the service read it; then the service is gone (restarting):
    the job may have been made, so the user is told to look before sending it again."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def take_one_then_go() -> None:
        connection, _ = listener.accept()
        connection.recv(65536)
        connection.close()
        listener.close()

    threading.Thread(target=take_one_then_go, daemon=True).start()
    result = subprocess.run([STT, "submit", str(fixtures_dir / "jfk.flac"), "--api", f"http://127.0.0.1:{port}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "the connection broke" in result.stderr and "may have been accepted" in result.stderr, result.stderr


def test_an_unreachable_api_is_reported(fixtures_dir):
    result = subprocess.run([STT, "submit", str(fixtures_dir / "jfk.flac"), "--api", "http://127.0.0.1:9"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "cannot reach the API at http://127.0.0.1:9" in result.stderr


SUBTITLES = "1\n00:00:00,000 --> 00:00:02,000\nspk_0: Hello.\n"


def test_get_writes_only_the_formats_answer_and_keeps_the_file_until_then(tmp_path):
    """A 200 of another kind (a captive portal's page) was written as the subtitles over a good
    file, exit 0. The answer's type must be the format's (parameters aside); the file is replaced
    only then, and keeps its permissions."""
    from cli.app import TEXT_MEDIA_TYPES
    from services.ingest.transcripts import MEDIA_TYPES

    assert TEXT_MEDIA_TYPES == MEDIA_TYPES
    target = tmp_path / "meeting.srt"
    target.write_text(SUBTITLES)
    target.chmod(0o600)
    with page_server(200, "text/html; charset=utf-8", HTML_PAGE) as api:
        portal = CliRunner().invoke(app, ["get", "5", "-f", "srt", "-o", str(target), "--api", api])
        printed = CliRunner().invoke(app, ["get", "5", "-f", "txt", "--api", api])
    said = " ".join(portal.output.split())
    assert portal.exit_code == 1, said
    assert (f"the API at {api}: GET /transcripts/5 answered text/html, not application/x-subrip; is --api"
            f" right?") in said, said
    assert target.read_text() == SUBTITLES
    assert printed.exit_code == 1 and "lorem ipsum" not in printed.output, printed.output

    newer = SUBTITLES.replace("Hello", "Goodbye")
    with page_server(200, "application/x-subrip; charset=utf-8", newer) as api:
        written = CliRunner().invoke(app, ["get", "5", "-f", "srt", "-o", str(target), "--api", api])
    assert written.exit_code == 0, written.output
    assert target.read_text() == newer and target.stat().st_mode & 0o777 == 0o600
    assert [path.name for path in tmp_path.iterdir()] == ["meeting.srt"]  # no temporary file left


def test_get_writes_into_a_pipe_as_it_is(tmp_path):
    """-o naming a pipe or a device (/dev/stdout, /dev/null) was replaced by a regular file (as
    root, /dev/null too) or refused: only a regular file is written beside and renamed over."""
    import stat

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    read: list[str] = []
    reader = threading.Thread(target=lambda: read.append(pipe.read_text()), daemon=True)
    reader.start()
    with page_server(200, "application/x-subrip; charset=utf-8", SUBTITLES) as api:
        written = CliRunner().invoke(app, ["get", "5", "-f", "srt", "-o", str(pipe), "--api", api])
    reader.join(10)
    assert written.exit_code == 0, written.output
    assert read == [SUBTITLES] and stat.S_ISFIFO(pipe.stat().st_mode), read


def test_get_to_dev_stdout_writes_through_it_keeping_what_it_held(tmp_path):
    """`-o /dev/stdout` was resolved to the file stdout was redirected to, and a temporary file was
    renamed over it: `stt get 5 -o /dev/stdout >> log.txt` wiped the log's earlier lines, and the
    second of two in `{ ...; ...; } > both.txt` wrote into a file no longer there; into a pipe it
    failed with "No such file or directory". It is written through stdout, as it is."""
    log = tmp_path / "log.txt"
    log.write_text("earlier line\n")
    both = tmp_path / "both.txt"
    with page_server(200, "application/x-subrip; charset=utf-8", SUBTITLES) as api:
        command = [STT, "get", "5", "-f", "srt", "-o", "/dev/stdout", "--api", api]
        with log.open("a") as appended:
            runs = [subprocess.run(command, stdout=appended, stderr=subprocess.PIPE, text=True, timeout=60)]
        with both.open("w") as grouped:  # { echo head; stt ...; stt ...; echo tail; } > both.txt
            grouped.write("head\n")
            grouped.flush()
            runs += [subprocess.run(command, stdout=grouped, stderr=subprocess.PIPE, text=True, timeout=60)
                     for _ in range(2)]
            grouped.write("tail\n")
        piped = subprocess.run(command, capture_output=True, text=True, timeout=60)
    for result in (*runs, piped):
        assert result.returncode == 0 and "wrote /dev/stdout" in result.stderr, result.stderr
    assert log.read_text() == "earlier line\n" + SUBTITLES
    assert both.read_text() == "head\n" + SUBTITLES * 2 + "tail\n"
    assert piped.stdout == SUBTITLES


def test_a_busy_answer_after_a_long_upload_is_waited_out(monkeypatch):
    """The busy wait (UPLOAD_BUSY_WAIT_S) was counted from the start of the first send: a 503 with
    Retry-After that came after an upload longer than that was never offered again, but refused.
    It is counted from the first busy answer."""
    from cli import app as cli

    monkeypatch.setattr(cli, "UPLOAD_BUSY_WAIT_S", 1.0)
    busy = (503, {"detail": "too many uploads at once"}, {"Retry-After": "0.5"})
    answers = {("POST", "/recognize"): [busy, (202, {"id": 7, "filename": "a.wav"})]}
    with StandInApi(answers, delays={("POST", "/recognize"): 1.5}) as api:
        result = CliRunner().invoke(app, ["submit", "--no-wait", "https://example.com/a.wav", "--api", api])
    said = " ".join(result.output.split())
    assert result.exit_code == 0 and "refused" not in said, said
    assert "the server is busy, trying again in 0.5 s" in said and "accepted as job 7" in said, said


class ChangingFilesApi(LocalServer):
    """Accepts every upload it got whole (job 1, 2...), read in full only after `on_upload[filename]`
    ran as its first bytes came: a file changed or removed while it is being sent. `accepted` holds
    the file names of those accepted."""

    def __init__(self, on_upload: dict[str, Callable[[], None]]) -> None:
        accepted = self.accepted = []

        class Handler(QuietHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                length = int(self.headers["Content-Length"])
                first = self.rfile.read(min(length, 64 * 1024))
                filename = re.search(rb'filename="([^"]+)"', first).group(1).decode()
                on_upload.get(filename, lambda: None)()
                got = len(first)
                while got < length and (data := self.rfile.read1(min(1 << 20, length - got))):
                    got += len(data)
                if got < length:
                    return  # the client gave up on it
                accepted.append(filename)
                send_json(self, 202, {"id": len(accepted), "filename": filename})

        super().__init__(Handler)


def test_a_file_that_changes_or_goes_while_the_files_are_sent_is_not_sent_and_the_others_are(tmp_path):
    """A file that shrank or grew while it was sent raised h11's LocalProtocolError ("Too little/
    much data for declared Content-Length"), and one gone before its turn FileNotFoundError: a
    traceback, the files after it never sent, the jobs accepted not listed. Each is now not sent,
    saying why, and the others are; `speakers enroll` says the same of its sample. The files are
    larger than what the sockets hold, so each changes before it has been read to its end."""
    size = 32 * 1024 * 1024
    files = {name: tmp_path / name for name in ("shrinks.wav", "grows.wav", "stays.wav", "goes.wav")}
    for name, path in files.items():
        with path.open("wb") as file:
            file.truncate(1000 if name in ("stays.wav", "goes.wav") else size)

    def shrink_one_and_remove_another() -> None:
        os.truncate(files["shrinks.wav"], 1024 * 1024)
        files["goes.wav"].unlink()

    def grow() -> None:
        with files["grows.wav"].open("ab") as file:
            file.write(b"\0" * 1000)

    stand_in = ChangingFilesApi({"shrinks.wav": shrink_one_and_remove_another, "grows.wav": grow})
    with stand_in as api:
        result = CliRunner().invoke(app, ["submit", "--no-wait", *map(str, files.values()), "--api", api])
        files["grows.wav"].write_bytes(b"\0" * size)
        enrolled = CliRunner().invoke(app, ["speakers", "enroll", "Anna", str(files["grows.wav"]), "--api", api])
    said = " ".join(result.output.split())
    assert result.exit_code == 1 and "Traceback" not in said, said
    assert stand_in.accepted == ["stays.wav"] and "stays.wav: accepted as job 1" in said, said
    assert (f"shrinks.wav: not sent, it changed while it was being sent (it shrank below the {size} bytes it had"
            f" when its upload began); is it still being written?") in said, said
    assert (f"grows.wav: not sent, it changed while it was being sent (it grew past the {size} bytes it had when"
            f" its upload began); is it still being written?") in said, said
    assert "goes.wav: not sent, it cannot be read (No such file or directory)" in said, said
    enrolled_said = " ".join(enrolled.output.split())
    assert enrolled.exit_code == 1 and "Traceback" not in enrolled_said, enrolled_said
    assert "grows.wav: not sent, it changed while it was being sent (it grew past" in enrolled_said, enrolled_said


def test_a_file_gone_before_it_is_sent_again_may_have_been_accepted_by_its_first_send(tmp_path):
    """The first send went whole and its answer was lost; before the second, the file was removed
    (or changed as it was sent again). It was said "not sent", yet the first send may have made a
    job: submitting it again would make a second."""
    recording = tmp_path / "lost.wav"
    recording.write_bytes(b"\0" * 1000)

    class Handler(QuietHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers["Content-Length"]))
            recording.unlink(missing_ok=True)
            self.close_connection = True  # no answer: the connection closes after the whole upload

    with LocalServer(Handler) as api:
        result = CliRunner().invoke(app, ["submit", "--no-wait", str(recording), "--api", api])
    said = " ".join(result.output.split())
    assert result.exit_code == 1 and "Traceback" not in said, said
    assert "lost.wav: not sent," not in said, said
    assert "it may have been accepted: see stt list before sending it again" in said, said


def test_a_file_that_changes_or_goes_after_its_job_may_have_been_created_may_have_been_accepted(tmp_path):
    """After a 503 naming a job that may have been created, a file removed during the Retry-After
    wait (or changed as it was sent again) was said "not sent": the wait counts as no attempt, so
    its error was taken for a first send's. Yet the job may exist, and submitting it again would
    make a second: it is said that it may have been accepted, naming the job."""
    size = 32 * 1024 * 1024
    goes, shrinks = tmp_path / "goes.wav", tmp_path / "shrinks.wav"
    goes.write_bytes(b"\0" * 1000)
    with shrinks.open("wb") as file:
        file.truncate(size)
    sends: dict[str, int] = {}

    class Handler(QuietHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            length = int(self.headers["Content-Length"])
            first = self.rfile.read(min(length, 64 * 1024))
            filename = re.search(rb'filename="([^"]+)"', first).group(1).decode()
            sends[filename] = sends.get(filename, 0) + 1
            if sends[filename] > 1:
                os.truncate(shrinks, 1024 * 1024)  # as it is sent again
            got = len(first)
            while got < length and (data := self.rfile.read1(min(1 << 20, length - got))):
                got += len(data)
            if got < length:
                return  # the client gave up on it
            goes.unlink(missing_ok=True)  # before the client sends it again
            send_json(self, 503, {"detail": MAYBE_CREATED_DETAIL}, {"Retry-After": "0.2"})

    with LocalServer(Handler) as api:
        result = CliRunner().invoke(app, ["submit", "--no-wait", str(goes), str(shrinks), "--api", api])
    said = " ".join(result.output.split())
    assert result.exit_code == 1 and "Traceback" not in said and "not sent," not in said, said
    assert sends == {"goes.wav": 1, "shrinks.wav": 2}, sends
    maybe = "it was answered 503: the job could not be confirmed (ConnectionDoesNotExistError): job 12 may have been"
    assert (f"goes.wav: {maybe}" in said and "then not sent again, it changed or cannot be read now (No such file or"
            " directory); it may have been accepted: see stt list before sending it again" in said), said
    assert (f"shrinks.wav: {maybe}" in said and f"then not sent again, it changed or cannot be read now (it shrank"
            f" below the {size} bytes it had when its upload began); it may have been accepted" in said), said


def test_an_api_key_with_a_user_in_the_api_address_is_refused():
    """httpx sends an address's user and password (https://user:pw@host, or a token as the user) as
    Basic auth, which silently took the place of `Authorization: Bearer <key>` from --api-key."""
    done = {"status": "done", "segments": []}
    stand_in = StandInApi({("GET", "/status/5"): [(200, done)]})
    with stand_in as api:
        for userinfo in ("user:s3cretpw@", "t0kensecret@"):
            address = api.replace("http://", f"http://{userinfo}")
            for command in (["status", "5"], ["watch", "--job", "5", "--amqp-url", "amqp://127.0.0.1:1/"]):
                result = CliRunner().invoke(app, [*command, "--api", address, "--api-key", "KEY"])
                said = re.sub(r"[\s│]+", " ", result.output)
                assert result.exit_code == 2, (command, said)
                assert "in place of the API key" in said and "give one or the other" in said, said
                assert "s3cretpw" not in said and "t0kensecret" not in said, said
        assert stand_in.requests == []
        # Without a key the address's user goes as Basic auth, as before.
        plain = CliRunner().invoke(app, ["status", "5", "--api", address], env={"STT_API_KEY": None})
    assert plain.exit_code == 0, plain.output
    assert stand_in.headers[-1]["Authorization"].startswith("Basic ")


def test_watching_a_job_the_api_cannot_be_asked_about_gives_up_when_no_event_comes(capsys, monkeypatch):
    """`watch --job` asked an API that refused the connection (or answered 401, 403, 5xx) every
    STATUS_POLL_S without a word, for ever. It now says once that the API could not be asked, and
    why, and gives up as for a job the API hides: once no event of it came for HIDDEN_JOB_SILENCE_S."""
    from cli import app as cli

    monkeypatch.setattr(cli, "HIDDEN_JOB_SILENCE_S", 3.0)
    monkeypatch.setattr(cli, "STATUS_POLL_S", 0.2)
    api = f"http://127.0.0.1:{free_port()}"
    with private_vhost() as vhost:
        asyncio.run(declare_events_exchange(amqp_url(vhost)))
        started = time.monotonic()
        code = asyncio.run(asyncio.wait_for(cli.watch_events(amqp_url(vhost), 7, api, API_KEY), 20))
        took_s = time.monotonic() - started
    captured = capsys.readouterr()
    said = " ".join((captured.out + captured.err).split())
    assert code == 1 and 2.5 < took_s < 15, (code, took_s, said)
    warning = f"the API could not be asked about job 7 (cannot reach the API at {api}:"
    assert said.count(warning) == 1 and "until none has come for 3 s" in said, said
    assert "error: no event of job 7 for 3 s, and the API could not be asked about it (cannot reach" in said, said


class HoldingApi(LocalServer):
    """Accepts the first `answered` POSTs at once (as job 7) and holds every later one without an
    answer, as the service does while it decodes a long recording. `held` is set once one is held."""

    def __init__(self, answered: int) -> None:
        held = self.held = threading.Event()
        released = self.released = threading.Event()
        posts = self.posts = []

        class Handler(QuietHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                posts.append(self.path)
                if len(posts) > answered:
                    held.set()
                    released.wait(60)
                    return
                send_json(self, 202, {"id": 7, "filename": "a.wav"})

        super().__init__(Handler)

    def __exit__(self, *exc: object) -> None:
        self.released.set()
        super().__exit__(*exc)


def test_ctrl_c_while_an_upload_waits_for_its_answer_says_it_may_have_been_accepted():
    """Ctrl-C while the service held an upload printed only "Aborted!": the job may exist all the
    same, and the jobs accepted before it were not listed. Now as when following is stopped: 130."""
    outputs, codes = {}, {}
    for command, answered in ((["submit", "--no-wait", "https://example.com/a.wav", "https://example.com/b.wav",
                                "https://example.com/c.wav"], 1), (["rerun", "5"], 0)):
        holding = HoldingApi(answered)
        with holding as api:
            waiting = Background(command, {**os.environ, "STT_API_URL": api, "PYTHONUNBUFFERED": "1"})
            try:
                assert holding.held.wait(60) and waiting.process.poll() is None, waiting.output
            finally:
                codes[command[0]] = waiting.stop()
            outputs[command[0]] = waiting.output
    assert codes == {"submit": 130, "rerun": 130}, outputs
    submitted, rerun = (" ".join(outputs[name].split()) for name in ("submit", "rerun"))
    assert "Aborted" not in submitted + rerun and "Traceback" not in submitted + rerun, outputs
    assert ("https://example.com/b.wav: stopped before the API answered; it may have been accepted: see stt list"
            " before sending it again") in submitted, submitted
    assert "not sent: https://example.com/c.wav" in submitted, submitted
    assert re.search(r"^\s*job 7 \(a\.wav\) stt status 7$", outputs["submit"], re.MULTILINE), outputs["submit"]
    assert ("stopped before the API answered; a new run of job 5 may have been made: see stt list before running"
            " it again") in rerun, rerun


def test_enrolling_waits_out_a_busy_server_and_ctrl_c_says_it_may_have_been_done(fixtures_dir):
    """`speakers enroll` posted once: a 503 with Retry-After (uploads busy, the database briefly
    away; nothing made) exited 1 at once, where submit waits it out. It now waits too. Ctrl-C while
    enrolling or forgetting waits for the answer printed click's bare "Aborted!"; it now says the
    change may have been made and how to look, 130."""
    sample = str(fixtures_dir / "jfk.flac")
    busy = (503, {"detail": "too many uploads at once"}, {"Retry-After": "0.5"})
    profile = {"id": 3, "name": "Anna", "voiceprint_count": 1, "relabelled": []}
    for source in ([sample], ["--job", "12", "--speaker", "spk_1"]):
        stand_in = StandInApi({("POST", "/speakers"): [busy, busy, (201, profile)]})
        with stand_in as api:
            result = CliRunner().invoke(app, ["speakers", "enroll", "Anna", *source, "--api", api])
        said = " ".join(result.output.split())
        assert result.exit_code == 0 and "speaker 3 Anna: 1 voiceprint(s)" in said, said
        assert said.count("the server is busy, trying again in 0.5 s") == 2, said
        sent = [body for _, _, body in stand_in.requests]
        assert len(sent) == 3 and all(len(body) == len(sent[0]) for body in sent), [len(body) for body in sent]

    listing = {"items": [{"id": 3, "name": "Anna", "voiceprint_count": 1}]}
    slow = {("POST", "/speakers"): 60.0, ("DELETE", "/speakers/3"): 60.0}
    outputs, codes = {}, {}
    for command in (["enroll", "Anna", sample], ["forget", "Anna"]):
        stand_in = StandInApi({("POST", "/speakers"): [(201, profile)], ("GET", "/speakers"): [(200, listing)],
                               ("DELETE", "/speakers/3"): [(204, {})]}, delays=slow)
        with stand_in as api:
            waiting = Background(["speakers", *command], {**os.environ, "STT_API_URL": api, "PYTHONUNBUFFERED": "1"})
            try:
                deadline = time.monotonic() + 60
                while not any((method, path) in slow for method, path, _ in stand_in.requests):
                    assert time.monotonic() < deadline and waiting.process.poll() is None, waiting.output
                    time.sleep(0.1)
            finally:
                codes[command[0]] = waiting.stop()
            outputs[command[0]] = " ".join(waiting.output.split())
    assert codes == {"enroll": 130, "forget": 130}, outputs
    assert "Aborted" not in str(outputs) and "Traceback" not in str(outputs), outputs
    assert ("stopped before the API answered; 'Anna' may have been enrolled: see stt speakers list before enrolling"
            " again") in outputs["enroll"], outputs
    assert "stopped before the API answered; 'Anna' may have been forgotten: see stt speakers list" in outputs["forget"]


def test_a_rate_limit_that_says_how_long_to_wait_is_waited_out(monkeypatch):
    """A 429 with Retry-After (a gateway's rate limit) refused an upload at once, and while
    following counted as one of FOLLOW_TRIES failures at once, polled again a second later."""
    from cli import app as cli

    monkeypatch.setattr(cli, "FOLLOW_TRIES", 2)
    monkeypatch.setattr(cli, "POLL_INTERVAL_S", 0.01)
    limited = (429, {"detail": "rate limited"}, {"Retry-After": "1"})
    answers = {("POST", "/recognize"): [limited, (202, {"id": 7, "filename": "a.wav"})],
               ("GET", "/status/7"): [limited, limited, limited, (200, {"status": "done", "segments": []})]}
    with StandInApi(answers) as api:
        started = time.monotonic()
        result = CliRunner().invoke(app, ["submit", "https://example.com/a.wav", "--api", api])
        took_s = time.monotonic() - started
    said = " ".join(result.output.split())
    assert "the server is busy, trying again in 1 s" in said and "refused" not in said, said
    assert result.exit_code == 0 and "job 7: a.wav (no speech)" in said, said
    assert took_s >= 4, took_s  # 1 s before the upload again, then 1 s after each 429 while following


def test_a_retry_after_given_as_a_date_is_waited_out():
    """RFC 9110 lets Retry-After be an HTTP date (Wed, 09 Dec 2026 10:00:00 GMT), as gateways' 429s
    give it: it was not read (float() of it failed), and the upload was refused at once. It is the
    whole seconds from now to then, kept within the busy wait as the seconds form is."""
    from cli import app as cli
    from cli.app import ApiError, checked

    def retry_after(seconds: float) -> dict[str, str]:
        return {"Retry-After": format_datetime(datetime.now(UTC) + timedelta(seconds=seconds), usegmt=True)}

    answers = {("POST", "/recognize"): [(429, {"detail": "rate limited"}, retry_after(2)),
                                        (202, {"id": 7, "filename": "a.wav"})]}
    with StandInApi(answers) as api:
        started = time.monotonic()
        result = CliRunner().invoke(app, ["submit", "--no-wait", "https://example.com/a.wav", "--api", api])
        took_s = time.monotonic() - started
    said = " ".join(result.output.split())
    assert result.exit_code == 0 and "refused" not in said and "accepted as job 7" in said, said
    assert re.search(r"the server is busy, trying again in [12] s", said), said
    assert took_s >= 0.9, took_s

    waits = {}
    for name, seconds in (("far", 3600), ("past", -60)):
        with StandInApi({("GET", "/status/7"): [(503, {"detail": "busy"}, retry_after(seconds))]}) as api, \
                httpx.Client(base_url=api) as client, pytest.raises(ApiError) as raised:
            checked(client.get("/status/7"))
        waits[name] = raised.value.retry_after_s
    assert waits == {"far": cli.UPLOAD_BUSY_WAIT_S, "past": 0.0}, waits


def test_an_address_with_a_password_or_token_never_prints_it_even_without_its_scheme():
    """`user:pw@host:8000` (no scheme) printed the password in its error, and a token given as the
    user name (https://TOKEN@host) was never hidden."""
    port = free_port()
    no_scheme = CliRunner().invoke(app, ["status", "5", "--api", "user:s3cretpw@api.example.com:8000"])
    token = CliRunner().invoke(app, ["status", "5", "--api", f"http://t0kensecret@127.0.0.1:{port}"])
    for result in (no_scheme, token):
        assert result.exit_code == 1 and "s3cretpw" not in result.output and "t0kensecret" not in result.output, \
            result.output
    assert "(it is 'user:***@api.example.com:8000')" in " ".join(no_scheme.output.split()), no_scheme.output
    assert f"cannot reach the API at http://***@127.0.0.1:{port}:" in " ".join(token.output.split()), token.output


CLOUDFLARE_TIMEOUT_PAGE = "<html><head><title>524: A timeout occurred</title></head><body>cloudflare</body></html>"


def test_a_cloudflare_gateway_time_out_may_have_been_done_not_refused(tmp_path, monkeypatch):
    """Cloudflare answers 520-524 when it gives up on the API (524: no answer in 100 s): it was
    reported as "refused", and the user sending it again made a second job."""
    from cli import app as cli

    monkeypatch.setattr(cli, "RESEND_PAUSE_S", 0)
    recording = tmp_path / "call.wav"
    recording.write_bytes(b"RIFF" + bytes(100))
    gave_up = StandInApi({("POST", "/recognize"): [(524, CLOUDFLARE_TIMEOUT_PAGE)],
                          ("POST", "/transcripts/7/cancel"): [(522, CLOUDFLARE_TIMEOUT_PAGE)]})
    with gave_up as api:
        submitted = CliRunner().invoke(app, ["submit", str(recording), "--no-wait", "--api", api])
        cancelled = CliRunner().invoke(app, ["cancel", "7", "--api", api])
    said = " ".join(submitted.output.split())
    assert submitted.exit_code == 1 and "refused" not in said, said
    assert "call.wav: sent again, it was answered 524" in said and "it may have been accepted: see stt list" in said
    uploads = [headers["Idempotency-Key"] for (_, path, _), headers in zip(gave_up.requests, gave_up.headers,
                                                                           strict=True) if path == "/recognize"]
    assert len(uploads) == cli.UPLOAD_ATTEMPTS and len(set(uploads)) == 1, uploads
    said = " ".join(cancelled.output.split())
    assert cancelled.exit_code == 1 and "not cancelled" not in said, said
    assert "job 7: a gateway answered 522" in said and "it may have been cancelled: see stt status 7" in said, said


def test_a_presigned_address_is_shown_without_its_signature():
    """A presigned URL's query (its signature: anyone with it may fetch the recording) and a
    password in it were printed in every line about it; the service is still sent all of it."""
    address = "https://user:pw@bucket.example:9000/calls/a.wav?X-Amz-Credential=AKIA&X-Amz-Signature=0123abcd#t=5"
    stand_in = StandInApi({("POST", "/recognize"): [(202, {"id": 7, "filename": "a.wav"}),
                                                     (415, {"detail": "not audio"})]})
    with stand_in as api:
        accepted = CliRunner().invoke(app, ["submit", "--no-wait", address, "--api", api])
        refused = CliRunner().invoke(app, ["submit", "--no-wait", address, "--api", api])
    shown = "https://bucket.example:9000/calls/a.wav"
    assert accepted.exit_code == 0 and f"{shown}: accepted as job 7" in accepted.output, accepted.output
    assert refused.exit_code == 1 and f"{shown}: refused, 415: not audio" in refused.output, refused.output
    for result in (accepted, refused):
        assert "0123abcd" not in result.output and "AKIA" not in result.output and "pw@" not in result.output
    assert b"X-Amz-Signature=0123abcd" in stand_in.requests[0][2]


def test_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "cli", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "stt" in result.stdout and "submit" in result.stdout


# ---- argument parsing only (no stack) -------------------------------------------------------


def test_a_key_read_with_its_line_ending_works_and_a_bad_key_is_never_printed(keyed_stack, jfk_submission):
    """A key from `$(cat key.txt)` of a Windows file ends in a carriage return: httpx refused the
    header and its error, printed as "cannot reach the API", held the whole key."""
    _, job_id = jfk_submission
    read_with_crlf = stt(keyed_stack, "status", str(job_id), STT_API_KEY=f"{API_KEY}\r\n")
    assert read_with_crlf.returncode == 0 and "done" in read_with_crlf.stdout, read_with_crlf.stderr
    secret = f"{API_KEY}\u00e9"
    refused = stt(keyed_stack, "status", str(job_id), STT_API_KEY=secret)
    assert refused.returncode == 1 and "cannot carry" in refused.stderr
    assert API_KEY not in refused.stdout + refused.stderr and "Traceback" not in refused.stderr


def test_an_address_without_its_scheme_is_said_once_and_not_sent_again(fixtures_dir):
    result = CliRunner().invoke(app, ["submit", str(fixtures_dir / "jfk.flac"), "--no-wait",
                                      "--api", "localhost:8000"])
    assert result.exit_code == 1
    assert "must start with http:// or https://" in result.output
    assert "sending it again" not in result.output and "may have been accepted" not in result.output


def test_following_a_job_gives_up_on_an_api_gone_for_good(monkeypatch):
    """A port-forward or VPN that is gone never answers again: `submit` waited for ever, saying
    "API unreachable, retrying"; it now reports the jobs as not followed (the jobs go on)."""
    from cli import app as cli

    monkeypatch.setattr(cli, "API_AWAY_S", 0.5)
    monkeypatch.setattr(cli, "POLL_INTERVAL_S", 0.05)
    outcome: dict = {}
    jobs = [cli.SubmittedJob(id=4, filename="a.wav"), cli.SubmittedJob(id=5, filename="b.wav")]
    with httpx.Client(base_url=f"http://127.0.0.1:{free_port()}", timeout=2) as client:
        follower = threading.Thread(target=lambda: outcome.update(cli.follow_jobs(client, jobs)), daemon=True)
        follower.start()
        follower.join(15)
    assert not follower.is_alive(), "still following an API that is gone"
    assert {job_id: document["status"] for job_id, document in outcome.items()} == {4: cli.NOT_FOLLOWED,
                                                                                     5: cli.NOT_FOLLOWED}
    assert "has not answered for" in outcome[4]["error"]


def test_following_a_rate_limited_job_stops_once_the_api_has_been_away_long_enough(monkeypatch):
    """Past API_AWAY_S, a 429 with Retry-After counted as a 429 without one: FOLLOW_TRIES (60) more
    polls, a second apart, a job. It now ends following the job at once, as a 503 does."""
    from cli import app as cli

    monkeypatch.setattr(cli, "API_AWAY_S", 1.0)
    monkeypatch.setattr(cli, "POLL_INTERVAL_S", 0.05)
    limited = (429, {"detail": "rate limited"}, {"Retry-After": "0.2"})
    stand_in = StandInApi({("GET", "/status/7"): [limited]})
    with stand_in as api, httpx.Client(base_url=api) as client:
        started = time.monotonic()
        documents = cli.follow_jobs(client, [cli.SubmittedJob(7, "a.wav")])
        took_s = time.monotonic() - started
    assert documents[7]["status"] == cli.NOT_FOLLOWED and "429: rate limited" in documents[7]["error"], documents
    # One poll every Retry-After within API_AWAY_S, then none.
    assert len(stand_in.requests) <= 8 and 1.0 <= took_s < 3, (len(stand_in.requests), took_s)


def test_exact_and_ranged_speaker_counts_exclude_each_other(fixtures_dir):
    result = CliRunner().invoke(app, ["submit", str(fixtures_dir / "jfk.flac"), "--speakers", "2",
                                      "--min-speakers", "1"])
    assert result.exit_code == 2
    assert "give either --speakers or --min-speakers/--max-speakers, not both" in re.sub(r"[\s│]+", " ", result.output)


def test_unknown_format_and_missing_file_are_usage_errors(tmp_path):
    assert CliRunner().invoke(app, ["get", "1", "--format", "docx"]).exit_code == 2
    missing = CliRunner().invoke(app, ["submit", str(tmp_path / "missing.wav")])
    # Rich wraps the message in a box at the terminal's width: where the line breaks depends on
    # how long the temporary path is.
    assert missing.exit_code == 2 and "no such file" in re.sub(r"[\s│]+", " ", missing.output)


def test_clock():
    assert clock(1.5) == "00:01.5"
    assert clock(59.96) == "01:00.0"
    assert clock(3723.4) == "1:02:03.4"


def test_bucket_drops_belong_to_the_inbox_key(keyed_stack, fixtures_dir):
    keyed_stack.s3().fput_object("inbox", "cli/drop.flac", str(fixtures_dir / "jfk.flac"))
    deadline = time.monotonic() + 120
    rows = []
    while not rows and time.monotonic() < deadline:
        rows = keyed_stack.query("SELECT id FROM transcripts WHERE source_key = 'cli/drop.flac'")
        time.sleep(0.5)
    assert rows, "the drop never became a job"
    job_id = rows[0]["id"]
    result = stt(keyed_stack, "status", str(job_id), "--json")  # as INBOX_API_KEY's caller
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["status"] in ("processing", "done")
    other = stt(keyed_stack, "status", str(job_id), "--json", STT_API_KEY=OTHER_KEY)
    assert other.returncode != 0 and "404" in other.stderr  # another key: as if it did not exist


def subscriber_permissions() -> dict[str, str]:
    """The permissions compose gives its subscriber user (deploy/compose.yaml, rabbitmq-init)."""
    command = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())["services"]["rabbitmq-init"]["command"][0]
    return json.loads(re.search(r"-d '(\{\"configure\".*?\})'", command)[1].replace("$$", "$"))


def test_watch_as_a_subscriber_that_can_only_read_events(keyed_stack, fixtures_dir):
    vhost = keyed_stack.amqp_url.rsplit("/", 1)[1]
    user, password = f"{vhost}-subscriber", "subscriber-secret"
    permissions = subscriber_permissions()
    subprocess.run(["rabbitmqctl", "add_user", user, password], check=True, capture_output=True)
    subprocess.run(["rabbitmqctl", "set_permissions", "-p", vhost, user, permissions["configure"],
                    permissions["write"], permissions["read"]], check=True, capture_output=True)
    amqp_url = f"amqp://{user}:{password}@127.0.0.1:5672/{vhost}"
    try:
        watcher = Background(["watch"], cli_env(keyed_stack, AMQP_URL=amqp_url))
        try:
            watcher.wait_for(r"watching stt\.events", timeout=60)
            submitted = stt(keyed_stack, "submit", str(fixtures_dir / "jfk.flac"), "--no-wait")
            job_id = int(submitted.stdout.strip())
            watcher.wait_for(rf"^job {job_id} done: jfk\.flac")
        finally:
            assert watcher.stop() == 0, watcher.output

        async def try_to_publish() -> str:
            connection = await aio_pika.connect(amqp_url)
            try:
                channel = await connection.channel(publisher_confirms=True)
                exchange = await channel.get_exchange("stt", ensure=False)
                await exchange.publish(aio_pika.Message(b"{}"), routing_key="job.submitted")
                await asyncio.sleep(0.5)
                return "published"
            except Exception as exc:
                return f"{type(exc).__name__}: {exc}"
            finally:
                await connection.close()

        refused = asyncio.run(try_to_publish())
        assert "ACCESS_REFUSED" in refused, refused  # it cannot start or fake jobs
    finally:
        subprocess.run(["rabbitmqctl", "delete_user", user], capture_output=True)


def test_forgetting_by_name_never_forgets_a_speaker_the_server_calls_otherwise(keyed_stack, forgets_its_speakers):
    """The server keeps names unique by PostgreSQL's lower(): "Maße" and "Masse" are two names
    there, though casefold() makes them one. Forgetting cannot be undone: `forget Maße` never
    forgets Masse, and with both enrolled forgets the one called so."""
    from services.ingest.auth import owner_of

    def enrolled() -> list[str]:
        return [line.split("\t")[1] for line in stt(keyed_stack, "speakers", "list").stdout.splitlines()]

    def enrol(name: str) -> None:
        keyed_stack.value("INSERT INTO speakers (owner, name) VALUES ($1, $2)", owner_of(API_KEY), name)

    enrol("Masse")
    wrong = stt(keyed_stack, "speakers", "forget", "Maße")
    assert wrong.returncode == 1 and "no enrolled speaker called 'Maße'" in wrong.stderr, wrong.stdout + wrong.stderr
    assert enrolled() == ["Masse"]
    enrol("Maße")
    assert sorted(enrolled()) == ["Masse", "Maße"]
    forgotten = stt(keyed_stack, "speakers", "forget", "Maße")
    assert (forgotten.returncode, forgotten.stdout) == (0, "forgot Maße\n"), forgotten.stderr
    assert enrolled() == ["Masse"]
    # In another case it is still the one speaker called so.
    enrol("Maße")
    assert stt(keyed_stack, "speakers", "forget", "MASSE").stdout == "forgot Masse\n"
    assert stt(keyed_stack, "speakers", "forget", "maße").stdout == "forgot Maße\n"
    assert enrolled() == []


def test_watch_and_the_api_address_refuse_a_url_they_cannot_use_with_the_reason():
    """`stt watch --amqp-url localhost:5672` (no scheme, so no host) tried to connect again for ever
    without a word (aio-pika's robust connection takes the error for a failed connection, and its
    log goes nowhere); a port that is no number was a traceback, and so was an --api httpx cannot
    read. Each is refused at once with the reason (a usage error, 2, for --amqp-url; 1 for --api,
    as an --api that is not http(s) is), never printing the URL's password."""
    command = str(Path(sys.executable).parent / "stt")
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("AMQP_URL", None)
    for url, says in [("localhost:5672", "not an amqp:// or amqps:// URL"),
                      ("amqp://user:secretpw@host:abc/", "not a valid URL (a port that is not a number"),
                      # A "/" in the password makes the parser read its first part as the port.
                      ("amqp://user:secret/pw@host/", "not a valid URL"),
                      ("amqp://user:secretpw@[::1/", "not a valid URL"), ("amqp:///", "the URL names no host")]:
        try:
            watched = subprocess.run([command, "watch", "--amqp-url", url], env=env, capture_output=True, text=True,
                                     timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"stt watch --amqp-url {url} still at it after 30 s, without a word")
        assert watched.returncode == 2 and says in watched.stderr, (url, watched.returncode, watched.stderr)
        assert "Traceback" not in watched.stderr and "secret" not in watched.stderr, watched.stderr
    status = subprocess.run([command, "status", "1", "--api", "http://[::1"], env=env, capture_output=True, text=True,
                            timeout=30)
    assert status.returncode == 1, (status.returncode, status.stderr)
    assert "--api / STT_API_URL is not a valid URL" in status.stderr and "Traceback" not in status.stderr, status.stderr
