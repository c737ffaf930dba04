"""python -m bench.soak: many jobs through the whole stack while workers are SIGKILLed.

    python -m bench.soak [--jobs 200] [--audio-hours 2] [--kill-every 30] [--transcribers 2]
                         [--fixtures DIR] [--timeout S] [--keep-logs DIR] [--json FILE]
    python -m bench.soak --jobs 12 --audio-hours 0.1 --kill-every 20      # a short one

A benchmark, not part of `make test` (the default takes 30-60 minutes on 2 cores). Ctrl-C while
it waits for the jobs (or SIGTERM) stops the waiting and reports what is there.

Audio: `--jobs` files, together about `--audio-hours`, each the fixtures that have a reference
laid end to end in a seeded random order and cut to its length: 15 s plus a log-normal excess
(the default's run from 15 s to 2.5 minutes, median 26 s); alternately WAV and FLAC. They are
submitted up front (`POST /recognize`, 4 at a time). The stack is bench.stack's (offline
diarizer, local embedder, production-like limits) plus `--transcribers - 1` more transcriber
processes, each transcriber one Whisper thread (a replica sized to one core, as bench.speed
--long runs them), and chunks of at most `--chunk-speech-s` of speech, so that longer jobs spread
over the transcribers.

Faults: from the first submission on, every `--kill-every` s one process drawn (seeded) from the
workers (diarizer, each transcriber, embedder, persister) and, once every upload was accepted,
ingest, is SIGKILLed and started again at once. A process that dies unasked is restarted too and
counted as a crash.

Figures:
- jobs: accepted (202), done, error, still processing when the wait ended. Lost = accepted but
  not done. Duplicated = segments stored twice (same transcript, speaker, start, end and text),
  plus extra `transcripts` rows (a file name seen twice, or a row no upload of this run made).
  Also, informational: events on `stt.events` received more than once (same message id; events
  are at-least-once, subscribers dedupe by id), work the logs show started and never finished by
  the process that started it (killed mid-message), work done again after a redelivery, and
  duplicates the persister recognised and ignored.
- makespan: from the first submission to the last job's `completed_at`. Beside it, each stage's
  work: the seconds its processes spent on the messages they settled, from each process's own
  Prometheus histogram stt_message_duration_seconds (scraped every 2 s and once more right before
  the process is killed, so a killed process's figures are kept; work cut short by a kill is not
  counted, it is the faults' cost). Divided by the stage's replicas, the largest is the
  bottleneck: makespan / bottleneck work = 1.00 means the bottleneck never waited, neither for
  the stages before it nor for restarts. The stage seconds are measured in this run, under its own
  CPU sharing (2 transcribers, the diarizer and the embedder on the same cores), so this says how
  well the pipeline kept its slowest stage busy through the faults, not how fast the models are
  (bench.speed does that). A second line sets the makespan against all CPU seconds the services
  used (psutil, every process including the killed ones) divided by the cores: near 1.00, the
  machine itself was the limit.
- RSS (psutil, the process alone): per process instance at its first sample, at its warm-up (the
  first sample after it settled `--warmup` messages; ingest: answered 20 HTTP requests, after the
  uploads), every 2 s after that, and at its end (the sample right before its kill, or after the
  last job). Growth is the highest RSS of the second half of the life after warm-up over the
  highest of the first half: a worker's memory rises and falls with the length of the file in
  hand (files here run from 15 s to 2.5 minutes), so a point-to-point comparison measures which
  files came last, while a leak keeps raising the peak. With a kill
  every 30 s no worker lives through a long run, so growth is judged on every instance that lived
  at least `--rss-min-life` s after its warm-up (n/a when none did); the table shows each
  service's longest-lived instance and the worst growth among those judged. moto's S3 stand-in
  keeps every object in memory and is shown for information only.

Targets (from the issue): every job done, 0 lost, 0 duplicate segments, RSS growth < 10 % after
warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

from bench.common import DEFAULT_FIXTURES, SAMPLE_RATE, Fixture, load_fixtures, table, verdict, write_wav

WORKER_SERVICES = ("diarizer", "transcriber", "embedder", "persister")
INGEST_WARM_REQUESTS = 20
SAMPLE_EVERY_S = 2.0


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def service_of(name: str) -> str:
    """transcriber2 -> transcriber."""
    return re.sub(r"\d+$", "", name)


# ---- audio ----------------------------------------------------------------------------------

def job_lengths(jobs: int, total_s: float, rng: np.random.Generator) -> list[float]:
    """`jobs` lengths adding up to `total_s`: 15 s (less when the mean is below 30 s) plus a
    log-normal excess, at most 240 s (more when the mean is above 120 s)."""
    mean = total_s / jobs
    low, high = min(15.0, mean / 2), max(240.0, 2 * mean)
    excess = rng.lognormal(0.0, 1.3, jobs)
    lengths = low + excess * (mean - low) / excess.mean()
    capped = np.zeros(jobs, dtype=bool)
    while (lengths > high).any() and not capped.all():  # cap the longest, give what they lose to the others
        capped |= lengths > high
        lengths[capped] = high
        free = ~capped
        lengths[free] = low + (lengths[free] - low) * (total_s - high * capped.sum() - low * free.sum()) / (
            lengths[free] - low).sum()
    return [round(float(x), 1) for x in lengths]


@dataclass
class SoakFile:
    path: Path
    seconds: float
    pieces: list[str]


def write_flac(path: Path, audio: np.ndarray) -> None:
    """16-bit mono FLAC through PyAV (FFmpeg), which the services decode with."""
    import av

    pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).astype(np.int16)
    with av.open(str(path), mode="w", format="flac") as out:
        stream = out.add_stream("flac", rate=SAMPLE_RATE, layout="mono")
        for start in range(0, len(pcm), 4096):
            frame = av.AudioFrame.from_ndarray(pcm[None, start:start + 4096], format="s16", layout="mono")
            frame.sample_rate = SAMPLE_RATE
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def make_files(fixtures: list[Fixture], lengths: list[float], rng: np.random.Generator, out: Path) -> list[SoakFile]:
    from common.audio import decode_audio

    decoded = {f.stem: decode_audio(str(f.path)) for f in fixtures}
    gap = np.zeros(SAMPLE_RATE // 2, dtype=np.float32)
    files = []
    for i, seconds in enumerate(lengths):
        need = int(seconds * SAMPLE_RATE)
        parts, pieces, have = [], [], 0
        while have < need:
            stem = fixtures[int(rng.integers(len(fixtures)))].stem
            parts += [decoded[stem], gap]
            pieces.append(stem)
            have += decoded[stem].size + gap.size
        audio = np.concatenate(parts)[:need]
        if i % 2:
            path = out / f"soak_{i:04d}.flac"
            write_flac(path, audio)
        else:
            path = out / f"soak_{i:04d}.wav"
            write_wav(path, audio)
        files.append(SoakFile(path, need / SAMPLE_RATE, pieces))
    return files


# ---- process instances: metrics, CPU, RSS ---------------------------------------------------

@dataclass
class Instance:
    """One OS process of one service (a restart is a new instance)."""

    name: str
    service: str
    pid: int
    started: float  # time.time()
    ended: float | None = None
    end: str = ""  # killed | crashed | alive (at the end of the run)
    rss_first: int | None = None
    rss_warm: int | None = None
    warm_at: float | None = None
    rss_last: int | None = None
    last_sample: float | None = None
    # (time, RSS) from the warm-up on, every sample
    trace: list[tuple[float, int]] = field(default_factory=list)
    units: int = 0  # messages settled (workers) or HTTP requests answered (ingest)
    handled: int = 0  # messages handled (acked after their work)
    busy_s: float = 0.0  # seconds on settled messages
    cpu_s: float = 0.0
    scrapes_failed: int = 0

    @property
    def life_after_warm(self) -> float:
        return (self.last_sample or 0) - self.warm_at if self.warm_at else 0.0

    def peaks(self) -> tuple[int, int] | None:
        """The highest RSS in the first half of the life after warm-up, and in the second."""
        if not self.warm_at or len(self.trace) < 2:
            return None
        middle = self.warm_at + (self.trace[-1][0] - self.warm_at) / 2
        first = [rss for t, rss in self.trace if t <= middle]
        second = [rss for t, rss in self.trace if t > middle]
        return (max(first), max(second)) if first and second else None

    @property
    def growth(self) -> float | None:
        """How much the second half's peak exceeds the first half's. Memory that follows the size
        of the message in hand rises and falls with it, and its peak repeats; a leak keeps raising it."""
        peaks = self.peaks()
        return peaks[1] / peaks[0] - 1 if peaks else None


def scrape(url: str, client: httpx.Client) -> dict[str, float] | None:
    """Sums of the figures this benchmark reads from a process's /metrics, or None."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = client.get(url, timeout=3).text
    except httpx.HTTPError:
        return None
    out = {"settled": 0.0, "busy_s": 0.0, "handled": 0.0, "http": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "stt_message_duration_seconds_count":
                out["settled"] += sample.value
            elif sample.name == "stt_message_duration_seconds_sum":
                out["busy_s"] += sample.value
            elif sample.name == "stt_messages_total" and sample.labels.get("outcome") == "handled":
                out["handled"] += sample.value
            elif sample.name == "stt_http_requests_total":
                out["http"] += sample.value
    return out


class Chaos(threading.Thread):
    """Samples every service process every 2 s and, once armed, SIGKILLs one every `kill_every`
    seconds and starts it again."""

    def __init__(self, stack, names: list[str], kill_every: float, seed: int, warmup: int):
        super().__init__(daemon=True)
        self.stack, self.names, self.kill_every, self.warmup = stack, names, kill_every, warmup
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.live: dict[str, Instance] = {}
        self.instances: list[Instance] = []
        self.kills: Counter[str] = Counter()
        self.crashes: Counter[str] = Counter()
        self.kill_log: list[tuple[float, str]] = []
        self.armed_at: float | None = None
        self.ingest_killable = False  # set once every upload was accepted
        self.uploads_done = False
        self._halt = threading.Event()
        self.client = httpx.Client()
        self.error: BaseException | None = None
        for name in names:
            if name in stack.processes:
                self.track(name)

    # -- processes --

    def start_process(self, name: str):
        """Start process `name` the way devstack starts a service; a second replica
        (transcriber2, ...) gets a METRICS_PORT of its own."""
        from devstack import free_port

        service = service_of(name)
        if name == service:
            return self.stack.start_service(service)
        port = self.stack.metrics_ports.setdefault(name, free_port())
        return self.stack.start(name, "-m", f"services.{service}", env={**self.stack.env, "METRICS_PORT": str(port)})

    def track(self, name: str) -> Instance:
        import psutil

        process = self.stack.processes[name]
        instance = Instance(name, service_of(name), process.pid, time.time())
        instance.ps = psutil.Process(process.pid)
        self.live[name] = instance
        self.instances.append(instance)
        return instance

    def restart(self, name: str) -> None:
        self.start_process(name)
        self.track(name)

    # -- sampling --

    def sample(self, instance: Instance) -> None:
        import psutil

        url = self.stack.metrics_url(instance.name) if (
            instance.service == "ingest" or instance.name in self.stack.metrics_ports) else None
        figures = scrape(url, self.client) if url else None
        try:
            rss = instance.ps.memory_info().rss
            cpu = instance.ps.cpu_times()
        except psutil.Error:
            return
        now = time.time()
        instance.cpu_s = cpu.user + cpu.system
        if figures is None:
            instance.scrapes_failed += 1
        else:
            instance.units = int(figures["http"] if instance.service == "ingest" else figures["settled"])
            instance.handled, instance.busy_s = int(figures["handled"]), figures["busy_s"]
        if instance.rss_first is None:
            instance.rss_first = rss
        warm = instance.units >= (INGEST_WARM_REQUESTS if instance.service == "ingest" else self.warmup)
        if instance.service == "ingest":
            warm = warm and self.uploads_done
        if instance.rss_warm is None and warm:
            instance.rss_warm, instance.warm_at = rss, now
        if instance.warm_at is not None:
            instance.trace.append((now, rss))
        instance.rss_last, instance.last_sample = rss, now

    def finish(self, instance: Instance, how: str) -> None:
        instance.ended, instance.end = time.time(), how
        self.live.pop(instance.name, None)

    # -- the loop --

    def arm(self) -> None:
        self.armed_at = time.monotonic()

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the main thread
            self.error = exc

    def _run(self) -> None:
        next_kill = None
        while not self._halt.is_set():
            with self.lock:
                for name, instance in list(self.live.items()):
                    process = self.stack.processes.get(name)
                    if process is not None and process.poll() is None:
                        self.sample(instance)
                        continue
                    log(f"{name} (pid {instance.pid}) died unasked (exit {process and process.returncode}); "
                        "restarting")
                    self.crashes[instance.service] += 1
                    self.finish(instance, "crashed")
                    self.stack.processes.pop(name, None)
                    self.restart(name)
                if self.armed_at is not None and self.kill_every > 0:
                    if next_kill is None:
                        next_kill = self.armed_at + self.kill_every
                    if time.monotonic() >= next_kill:
                        self.kill_one()
                        next_kill += self.kill_every
            self._halt.wait(SAMPLE_EVERY_S)

    def kill_one(self) -> None:
        victims = [n for n in self.names if n != "ingest" or self.ingest_killable]
        name = self.rng.choice(victims)
        instance = self.live[name]
        self.sample(instance)  # its last figures, right before the kill
        process = self.stack.processes.pop(name)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        self.finish(instance, "killed")
        self.kills[instance.service] += 1
        self.kill_log.append((time.time(), name))
        self.restart(name)

    def stop(self) -> None:
        """No more kills; a last sample of every live process."""
        self._halt.set()
        self.join()
        with self.lock:
            for instance in list(self.live.values()):
                self.sample(instance)
                instance.end = "alive"
        self.client.close()


# ---- events ---------------------------------------------------------------------------------

class EventLog(threading.Thread):
    """Every event published on stt.events during the run, counted by message id."""

    def __init__(self, amqp_url: str):
        super().__init__(daemon=True)
        self.amqp_url = amqp_url
        self.ids: Counter[str] = Counter()
        self.keys: Counter[str] = Counter()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self.error = exc
            self.ready.set()

    async def _main(self) -> None:
        import aio_pika

        from common.broker import EVENTS_EXCHANGE

        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        connection = await aio_pika.connect_robust(self.amqp_url)
        try:
            channel = await connection.channel()
            exchange = await channel.get_exchange(EVENTS_EXCHANGE)
            queue = await channel.declare_queue(exclusive=True)
            await queue.bind(exchange, "#")

            async def on_event(message) -> None:
                self.ids[message.message_id or ""] += 1
                self.keys[message.routing_key] += 1

            await queue.consume(on_event, no_ack=True)
            self.ready.set()
            await self._stopping.wait()
        finally:
            await connection.close()

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self.join(30)

    def duplicated(self, prefix: str) -> tuple[int, int]:
        """(events received, received more than once) among ids starting with `prefix`."""
        counts = [c for i, c in self.ids.items() if i.startswith(prefix)]
        return sum(counts), sum(c - 1 for c in counts)


# ---- jobs -----------------------------------------------------------------------------------

def submit_all(stack, files: list[SoakFile], threads: int = 4) -> tuple[dict[int, SoakFile], list[str], float]:
    """Upload every file; returns accepted job ids, refusals and the first submission's time."""
    local = threading.local()
    first: list[float] = []

    def one(item: SoakFile) -> tuple[SoakFile, int | None, str]:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = httpx.Client(timeout=600)
        first.append(time.time())
        try:
            response = stack.submit(item.path, client=client)
        except httpx.HTTPError as exc:
            return item, None, repr(exc)
        if response.status_code != 202:
            return item, None, f"{response.status_code}: {response.text[:200]}"
        return item, response.json()["id"], ""

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(one, files))
    accepted = {job_id: item for item, job_id, _ in results if job_id is not None}
    refused = [f"{item.path.name}: {why}" for item, job_id, why in results if job_id is None]
    return accepted, refused, min(first)


def query_retrying(stack, sql: str, *args, attempts: int = 30) -> list:
    """stack.query, waiting out a PostgreSQL restart (this machine's tests may do one)."""
    for attempt in range(attempts):
        try:
            return stack.query(sql, *args)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            if attempt == attempts - 1:
                raise
            log(f"database query failed ({type(exc).__name__}); retrying")
            time.sleep(2)
    raise AssertionError("unreachable")


def wait_jobs(stack, job_ids: list[int], timeout: float, progress) -> tuple[dict[int, dict], bool]:
    """Poll the database until no job is processing (or `timeout`, or Ctrl-C / SIGTERM); a few
    pending jobs per round are also asked through the API, as a client would (errors while ingest
    is down are expected). Returns each job's row and whether every job finished."""
    deadline = time.monotonic() + timeout
    rows: dict[int, dict] = {}
    last_report = 0.0
    turn = 0

    def interrupt(*_):
        raise KeyboardInterrupt

    handlers = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with httpx.Client(timeout=10) as client:
            while True:
                rows = {r["id"]: dict(r) for r in query_retrying(
                    stack, "SELECT id, status, stage, error, completed_at FROM transcripts"
                    " WHERE id = ANY($1::bigint[])", job_ids)}
                pending = [i for i in job_ids if rows.get(i, {}).get("status", "processing") == "processing"]
                if not pending:
                    return rows, True
                if time.monotonic() - last_report > 60:
                    log(f"jobs: {dict(Counter(r['status'] for r in rows.values()))}; {progress()}")
                    last_report = time.monotonic()
                if time.monotonic() > deadline:
                    log(f"timeout: {len(pending)} jobs still processing")
                    return rows, False
                for job_id in pending[turn % len(pending):][:2]:
                    try:
                        client.get(f"{stack.api}/status/{job_id}")
                    except httpx.HTTPError:
                        pass
                turn += 1
                time.sleep(2)
    except KeyboardInterrupt:
        log("interrupted: reporting what is there")
        return rows, False
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def wait_outbox_empty(stack, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not query_retrying(stack, "SELECT count(*) AS n FROM outbox")[0]["n"]:
            time.sleep(2)  # what the flusher just published reaches our queue
            return
        time.sleep(1)


LOG_WORK = {  # stage: (started, finished) patterns with the work item in groups
    "diarizer": (r"job=(\d+) decoded ", r"job=(\d+) \d+ turns, "),
    "transcriber": (r"job=(\d+) transcribing chunk (\d+)/", r"job=(\d+) chunk (\d+)/\d+ transcribed"),
    "embedder": (r"job=(\d+) embedding chunk (\d+)/", r"job=(\d+) chunk (\d+)/\d+ embedded"),
}


def log_work(stack, names: list[str]) -> dict[str, dict[str, int]]:
    """Per stage, from every log of its processes: started, finished, interrupted (started and
    not finished: the process was killed first) and finished again (the same item twice)."""
    out = {}
    for stage, (started_re, finished_re) in LOG_WORK.items():
        text = "\n".join(stack.log_text(n) for n in names if service_of(n) == stage)
        started = re.findall(started_re, text)
        finished = re.findall(finished_re, text)
        out[stage] = {"started": len(started), "finished": len(finished),
                      "interrupted": max(0, len(started) - len(finished)),
                      "finished_again": len(finished) - len(set(finished))}
    persister = "\n".join(stack.log_text(n) for n in names if service_of(n) == "persister")
    out["persister"] = {"duplicates_ignored": len(re.findall(r"already stored; duplicate ignored", persister)),
                        "late_ignored": len(re.findall(r"late message ignored", persister))}
    return out


def database_figures(stack, job_ids: list[int], files: dict[int, SoakFile]) -> dict:
    [row] = query_retrying(
        stack, "SELECT count(*) AS segments,"
        " count(*) - count(DISTINCT (transcript_id, speaker, start_ts, end_ts, text)) AS duplicate_segments"
        " FROM segments WHERE transcript_id = ANY($1::bigint[])", job_ids)
    names = {f.path.name for f in files.values()}
    transcripts = query_retrying(stack, "SELECT id, filename FROM transcripts")
    by_name = Counter(r["filename"] for r in transcripts)
    foreign = [r["id"] for r in transcripts if r["filename"] not in names]
    return {"segments": row["segments"], "duplicate_segments": row["duplicate_segments"],
            "jobs_created_twice": sum(c - 1 for c in by_name.values() if c > 1) + len(foreign),
            "transcript_rows": len(transcripts)}


# ---- report ---------------------------------------------------------------------------------

def process_rss(pid: int) -> int | None:
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return None


def mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}"


def stage_rows(chaos: Chaos, names: list[str], audio_s: float):
    rows, per_replica = [], {}
    for stage in WORKER_SERVICES:
        mine = [i for i in chaos.instances if i.service == stage]
        replicas = sum(service_of(n) == stage for n in names)
        busy = sum(i.busy_s for i in mine)
        per_replica[stage] = busy / replicas
        rows.append([stage, str(replicas), str(sum(i.units for i in mine)), str(sum(i.handled for i in mine)),
                     f"{busy:.0f}", f"{busy / audio_s:.3f}", f"{busy / replicas:.0f}",
                     f"{sum(i.cpu_s for i in mine):.0f}", str(chaos.kills[stage]), str(chaos.crashes[stage])])
    ingest = [i for i in chaos.instances if i.service == "ingest"]
    rows.append(["ingest", "1", "-", "-", "-", "-", "-", f"{sum(i.cpu_s for i in ingest):.0f}",
                 str(chaos.kills["ingest"]), str(chaos.crashes["ingest"])])
    bottleneck = max(per_replica, key=per_replica.get)
    return rows, bottleneck, per_replica[bottleneck]


def rss_rows(chaos: Chaos, min_life: float) -> tuple[list[list[str]], float | None, int]:
    rows, worst_all, judged_all = [], None, 0
    for service in ("ingest", *WORKER_SERVICES):
        mine = [i for i in chaos.instances if i.service == service]
        if not mine:
            continue
        longest = max(mine, key=lambda i: i.life_after_warm)
        judged = [i for i in mine if i.warm_at and i.life_after_warm >= min_life and i.growth is not None]
        worst = max((i.growth for i in judged), default=None)
        judged_all += len(judged)
        if worst is not None:
            worst_all = worst if worst_all is None else max(worst_all, worst)
        peaks = longest.peaks() or (None, None)
        rows.append([service, str(len(mine)), f"{longest.name} {longest.end}", f"{longest.life_after_warm:.0f}",
                     str(longest.units), mb(longest.rss_first), mb(longest.rss_warm), mb(peaks[0]), mb(peaks[1]),
                     mb(longest.rss_last), pct(longest.growth), str(len(judged)), pct(worst)])
    return rows, worst_all, judged_all


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--audio-hours", type=float, default=2.0, help="total audio of all jobs")
    parser.add_argument("--kill-every", type=float, default=30.0, help="seconds between kills (0: none)")
    parser.add_argument("--transcribers", type=int, default=2)
    parser.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES)
    parser.add_argument("--timeout", type=float, help="seconds to wait for the jobs after the uploads "
                        "(default: 1.5 x the audio, at least 900)")
    parser.add_argument("--seed", type=int, default=0, help="audio and the choice of victims")
    parser.add_argument("--warmup", type=int, default=3, help="messages a process settles before its RSS baseline")
    parser.add_argument("--rss-min-life", type=float, default=300.0,
                        help="judge RSS growth on processes that lived this long after warm-up")
    parser.add_argument("--whisper-threads", type=int, default=1, help="WHISPER_CPU_THREADS of each transcriber")
    parser.add_argument("--chunk-speech-s", type=float, default=60.0, help="CHUNK_MAX_SPEECH_S")
    parser.add_argument("--keep-logs", type=Path, help="copy the services' logs here")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args()
    if args.jobs < 1 or args.audio_hours <= 0 or args.transcribers < 1:
        raise SystemExit("--jobs, --audio-hours and --transcribers must be positive")

    from bench.stack import running_stack

    fixtures = [f for f in load_fixtures(args.fixtures) if f.name != "empty.wav"]
    rng = np.random.default_rng(args.seed)
    total_s = args.audio_hours * 3600
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    started = time.perf_counter()
    try:
        files = make_files(fixtures, job_lengths(args.jobs, total_s, rng), rng, tmp)
        audio_s = sum(f.seconds for f in files)
        seconds = [f.seconds for f in files]
        log(f"{len(files)} files, {audio_s:.0f} s of audio ({min(seconds):.0f}-{max(seconds):.0f} s each, "
            f"median {float(np.median(seconds)):.0f} s) from {len(fixtures)} fixtures in {tmp}")
        timeout = args.timeout or max(900.0, 1.5 * audio_s)
        names = ["ingest", *[s for s in WORKER_SERVICES if s != "transcriber"]]
        names[2:2] = ["transcriber"] + [f"transcriber{i}" for i in range(2, args.transcribers + 1)]
        with running_stack(keep_logs=args.keep_logs, WHISPER_CPU_THREADS=str(args.whisper_threads),
                           CHUNK_MAX_SPEECH_S=str(args.chunk_speech_s)) as stack:
            extra = [n for n in names if n not in stack.processes]
            chaos = Chaos(stack, names, args.kill_every, args.seed, args.warmup)
            for name in extra:
                chaos.start_process(name)
            if extra:
                stack.wait_ready(workers=tuple(extra))
                for name in extra:
                    chaos.track(name)
            moto_rss = [process_rss(stack.processes["s3"].pid)]
            events = EventLog(stack.amqp_url)
            events.start()
            events.ready.wait(30)
            if events.error:
                raise events.error
            log(f"stack ready: {', '.join(names)}; submitting {len(files)} jobs, a kill every {args.kill_every:g} s")
            chaos.start()
            chaos.arm()
            accepted, refused, t0 = submit_all(stack, files)
            chaos.uploads_done = chaos.ingest_killable = True
            log(f"{len(accepted)} accepted, {len(refused)} refused in {time.time() - t0:.0f} s")
            job_ids = sorted(accepted)
            rows, finished = wait_jobs(stack, job_ids, timeout, lambda: (
                f"{sum(chaos.kills.values())} kills, {sum(chaos.crashes.values())} crashes"
                + (f"; KILLER STOPPED: {chaos.error!r}" if chaos.error else "")))
            chaos.stop()
            if chaos.error:
                raise chaos.error
            wait_outbox_empty(stack)
            events.stop()
            moto_rss.append(process_rss(stack.processes["s3"].pid))
            db = database_figures(stack, job_ids, accepted)
            work = log_work(stack, names)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    # ---- figures ----
    states = Counter(rows.get(i, {}).get("status", "processing") for i in job_ids)
    done = states["done"]
    lost = len(job_ids) - done
    completed = [r["completed_at"].timestamp() for r in rows.values() if r["status"] == "done" and r["completed_at"]]
    makespan = (max(completed) - t0) if completed and finished else None
    stages, bottleneck, bottleneck_s = stage_rows(chaos, names, audio_s)
    cpu_s = sum(i.cpu_s for i in chaos.instances)
    cores = os.cpu_count() or 1
    rss, worst_growth, judged = rss_rows(chaos, args.rss_min_life)
    seg_events, seg_event_dupes = events.duplicated("segment.created:")
    done_events, done_event_dupes = events.duplicated("transcript.completed:")
    duplicated = db["duplicate_segments"] + db["jobs_created_twice"]

    print()
    print(f"== soak: {len(files)} jobs, {audio_s:.0f} s of audio ({audio_s / 3600:.2f} h, "
          f"{min(seconds):.0f}-{max(seconds):.0f} s each), {args.transcribers} transcriber(s), "
          f"a random process SIGKILLed every {args.kill_every:g} s ({sum(chaos.kills.values())} kills) ==")
    print()
    print(table(["jobs", "submitted", "accepted", "done", "error", "processing", "lost", "duplicated"],
                [["", str(len(files)), str(len(job_ids)), str(done), str(states["error"]),
                  str(states["processing"]), str(lost), str(duplicated)]]))
    print(f"  duplicated = {db['duplicate_segments']} duplicate segments (of {db['segments']}) + "
          f"{db['jobs_created_twice']} jobs created twice ({db['transcript_rows']} transcripts rows)")
    errors = Counter((rows[i].get("error") or "")[:100] for i in job_ids if rows.get(i, {}).get("status") == "error")
    for reason, count in errors.items():
        print(f"  error x{count}: {reason}")
    if states["processing"]:
        stuck = Counter(rows[i]["stage"] for i in job_ids if rows.get(i, {}).get("status") == "processing")
        print(f"  still processing, by stage: {dict(stuck)}")
    for line in refused[:5]:
        print(f"  refused: {line}")
    print(f"  events: segment.created {seg_events} received for {db['segments']} segments, "
          f"{seg_event_dupes} received again; transcript.completed {done_events} for {done} jobs, "
          f"{done_event_dupes} again (at-least-once, deduped by message id)")
    print("  work interrupted by kills (started, never finished by that process) / finished a second time: "
          + ", ".join(f"{s} {w['interrupted']}/{w['finished_again']}" for s, w in work.items() if s in LOG_WORK)
          + f"; persister ignored {work['persister']['duplicates_ignored']} duplicate chunks")
    print()
    print(table(["stage", "replicas", "msgs settled", "handled", "busy s", "s per audio s", "busy s / replica",
                 "CPU s", "kills", "crashes"], stages))
    print()
    if makespan is not None:
        print(f"  makespan (first submission to last job done)  {makespan:.0f} s  ({makespan / audio_s:.3f} "
              "of the audio's length)")
        print(f"  bottleneck: {bottleneck}, {bottleneck_s:.0f} s of work per replica   "
              f"makespan / bottleneck work = {makespan / bottleneck_s:.2f}")
        print(f"  CPU: {cpu_s:.0f} CPU-s over all service processes / {cores} cores = {cpu_s / cores:.0f} s   "
              f"makespan / that = {makespan / (cpu_s / cores):.2f}")
    else:
        print(f"  makespan: n/a (not every job finished); bottleneck so far: {bottleneck}, {bottleneck_s:.0f} s "
              "per replica")
    print()
    print(table(["process", "instances", "longest-lived", "s after warm-up", "units", "RSS start MB",
                 "RSS warm MB", "peak 1st half MB", "peak 2nd half MB", "RSS end MB", "growth %",
                 f"judged (>= {args.rss_min_life:.0f} s)", "worst judged %"], rss))
    print("  units: messages settled (ingest: HTTP requests answered). Kills by process: "
          + ", ".join(f"{n} {c}" for n, c in Counter(n for _, n in chaos.kill_log).most_common()))
    print(f"  moto's S3 stand-in (keeps every object in memory; not judged): {mb(moto_rss[0])} MB after start-up, "
          f"{mb(moto_rss[1])} MB at the end")
    print()
    targets = [
        ["every job done", f"{done}/{len(files)}", verdict(done == len(files))],
        ["0 lost", str(lost), verdict(lost == 0)],
        ["0 duplicate segments (and no job created twice)", str(duplicated), verdict(duplicated == 0)],
        [f"RSS peak growth < 10 % after warm-up ({judged} processes lived >= {args.rss_min_life:.0f} s after it)",
         pct(worst_growth), verdict(None if worst_growth is None else worst_growth < 0.10)],
    ]
    print(table(["target", "measured", "verdict"], targets))
    wall = time.perf_counter() - started
    print(f"\nwall time {wall:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({
            "jobs": len(files), "audio_s": audio_s, "accepted": len(job_ids), "states": dict(states), "lost": lost,
            "database": db, "events": dict(events.keys), "work": work, "makespan_s": makespan,
            "bottleneck": bottleneck, "bottleneck_s": bottleneck_s, "cpu_s": cpu_s,
            "kills": dict(chaos.kills), "crashes": dict(chaos.crashes), "kill_log": chaos.kill_log,
            "instances": [asdict(i) for i in chaos.instances], "wall_s": wall,
        }, indent=1, default=str))


if __name__ == "__main__":
    main()
