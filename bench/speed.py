"""python -m bench.speed: wall times of the same audio and the same models, side by side.

  (a) floor   bare models in one process: decode once, diarize, transcribe the whole file in
              one call, embed the segment texts (the local embedding backend with
              LOCAL_EMBEDDING_MODEL's default, as the stack runs; named in each table's header)
  (b) seed    the naive prototype: per diarization turn, decode the file from disk again, write
              the turn to a temporary wav, WhisperModel.transcribe(path) on it (language
              detected per clip); then embed
  (c) stack   this project end to end: six services as processes, POST /recognize, poll
              GET /status/{id}; submit to done

Default: a ~5-minute English file concatenated from en_dialogue, jfk and sample (references
offset, so cpWER is computed over the parts with a speaker-attributed transcript: en_dialogue
and jfk); --pieces chooses others, --pieces all takes every fixture with a reference.

Extra measurements (each prints its own table; given any, the default comparison is skipped
unless --default is also given):
  --long [MIN]          a MIN-minute file (default 30) through the stack with 1, then 2
                        transcriber processes, and the seed approach on it (time-capped, extrapolated)
  --concurrent N        N fixture files submitted at once: makespan vs the slowest stage's work
  --upload-gb G         one G GB WAV upload: peak RSS growth of the ingest process
  --small-uploads N     N small uploads: requests/s, p50/p99 latency
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.common import (
    DEFAULT_FIXTURES,
    SAMPLE_RATE,
    Concatenated,
    at_most,
    bench_settings,
    concatenate,
    cpwer_by_piece,
    cpwer_in_regions,
    fmt,
    load_components,
    load_fixtures,
    quiet_logs,
    run_pipeline,
    table,
    verdict,
    warm_up,
    write_wav,
)

REPORT: dict = {}
# One recording's worth of English: a job has one language (detected once, as WhisperX does), and
# pieces from different rooms and microphones make the offline diarizer count recordings rather
# than voices (see the README), which would hide the speed comparison behind diarization errors.
DEFAULT_PIECES = "en_dialogue,jfk,sample"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---- (a) floor ------------------------------------------------------------------------------

def run_floor(path: Path, diarize, model, settings) -> dict:
    from common.audio import decode_audio
    from common.messages import JobOptions
    from services.embedder.backends import local_embedder
    from services.transcriber.whisper import transcribe_chunk

    t0 = time.perf_counter()
    waveform = decode_audio(str(path))
    t1 = time.perf_counter()
    turns = diarize(waveform, JobOptions()).turns
    t2 = time.perf_counter()
    # One call over the whole file, with the pipeline's own options (VAD, word timestamps).
    segments, language = transcribe_chunk(model, waveform, 0.0, turns, None, settings.whisper_beam_size)
    t3 = time.perf_counter()
    local_embedder(settings)([s.text for s in segments])
    t4 = time.perf_counter()
    return {"wall_s": t4 - t0, "decode_s": t1 - t0, "diarize_s": t2 - t1, "transcribe_s": t3 - t2,
            "embed_s": t4 - t3, "turns": len(turns), "segments": len(segments), "language": language,
            "segment_tuples": [(s.speaker, s.start_ts, s.end_ts, s.text) for s in segments]}


# ---- (b) the seed's approach ----------------------------------------------------------------

def run_seed(path: Path, diarize, model, settings, budget_s: float) -> dict:
    """Per turn: decode the file from disk, cut the turn, write it to a temporary wav,
    transcribe that path (language detected per clip, faster-whisper defaults otherwise).
    After `budget_s` seconds the rest is extrapolated from the speech seconds done so far."""
    from common.audio import decode_audio
    from common.messages import JobOptions
    from services.embedder.backends import local_embedder

    t0 = time.perf_counter()
    waveform = decode_audio(str(path))
    turns = diarize(waveform, JobOptions()).turns
    del waveform
    t1 = time.perf_counter()
    segments = []
    done_speech = 0.0
    total_speech = sum(t.end - t.start for t in turns)
    processed = 0
    with tempfile.TemporaryDirectory(prefix="bench-seed-") as tmp:
        for i, turn in enumerate(turns):
            if time.perf_counter() - t1 > budget_s:
                break
            audio = decode_audio(str(path))
            clip = audio[int(turn.start * SAMPLE_RATE):int(turn.end * SAMPLE_RATE)]
            clip_path = Path(tmp) / f"turn_{i}.wav"
            write_wav(clip_path, clip)
            pieces, _ = model.transcribe(str(clip_path), beam_size=settings.whisper_beam_size)
            text = " ".join(p.text.strip() for p in pieces).strip()
            clip_path.unlink()
            if text:
                segments.append((turn.speaker, turn.start, turn.end, text))
            done_speech += turn.end - turn.start
            processed += 1
    t2 = time.perf_counter()
    local_embedder(settings)([s[3] for s in segments] or [""])
    t3 = time.perf_counter()
    transcribe_s = t2 - t1
    complete = processed == len(turns)
    if not complete and done_speech > 0:
        transcribe_s = transcribe_s * total_speech / done_speech
    return {"wall_s": (t1 - t0) + transcribe_s + (t3 - t2), "diarize_s": t1 - t0, "transcribe_s": transcribe_s,
            "embed_s": t3 - t2, "turns": len(turns), "turns_done": processed, "complete": complete,
            "segment_tuples": segments}


# ---- (c) the stack --------------------------------------------------------------------------

def transcription_stage_s(stack, job_id: int, names: list[str]) -> float | None:
    """From the first chunk picked up to the last chunk.transcribed, over the named processes."""
    starts, ends = [], []
    for name in names:
        starts += stack.log_times(name, f"job={job_id} transcribing chunk")
        ends += stack.log_times(name, f"job={job_id} chunk ")
    if not starts or not ends:
        return None
    return (max(ends) - min(starts)).total_seconds()


def chunks_of(stack, job_id: int, names: list[str]) -> dict[str, int]:
    return {n: len(stack.log_times(n, f"job={job_id} transcribing chunk")) for n in names}


def run_stack_job(stack, path: Path, timeout: float) -> dict:
    t0 = time.monotonic()
    job_id = stack.submit_job(path)
    t_submitted = time.monotonic()
    finished = stack.wait_done([job_id], timeout)
    t_done, document = finished[job_id]
    if document["status"] != "done":
        raise RuntimeError(f"job {job_id} ended {document['status']}: {document.get('error')}")
    segments = [(s["speaker"], s["start_ts"], s["end_ts"], s["text"]) for s in document["segments"]]
    return {"job_id": job_id, "wall_s": t_done - t0, "upload_s": t_submitted - t0,
            "segments": len(segments), "segment_tuples": segments}


# ---- default: the 5-minute comparison -------------------------------------------------------

def default_comparison(fixtures, seconds: float, seed_budget: float, tmp: Path) -> None:
    from bench.stack import running_stack

    concat = concatenate(fixtures, seconds)
    path = tmp / "bench_5min.wav"
    write_wav(path, concat.audio)
    log(f"default audio: {concat.duration:.1f} s from {len(concat.pieces)} pieces -> {path}")
    settings = bench_settings()
    diarize, _, model = load_components(settings)
    warm_up(diarize, model, settings, concat.audio)
    log("(a) floor ...")
    floor = run_floor(path, diarize, model, settings)
    log(f"(a) {floor['wall_s']:.1f} s; (b) seed ...")
    seed = run_seed(path, diarize, model, settings, seed_budget)
    log(f"(b) {seed['wall_s']:.1f} s; (c) stack: starting ...")
    del model, diarize
    with running_stack() as stack:
        log("(c) stack ready; submitting")
        stack_run = run_stack_job(stack, path, timeout=900)
        stack_run["transcription_stage_s"] = transcription_stage_s(stack, stack_run["job_id"], ["transcriber"])
    log(f"(c) {stack_run['wall_s']:.1f} s")
    report_comparison("default", concat, floor, seed, stack_run, c_over_a_target=1.10, b_over_c_target=2.0,
                      embedding_model=settings.local_embedding_model)


def report_comparison(label: str, concat: Concatenated, floor: dict | None, seed: dict, stack_run: dict,
                      c_over_a_target: float | None, b_over_c_target: float, embedding_model: str) -> None:
    rows = []
    piece_names = sorted({Path(n).stem for n, a, _ in concat.pieces if any(a == s for s, _ in concat.text_regions)})
    entries = [("(a) floor: bare models, one process", floor), ("(b) seed: per-turn wav files", seed),
               ("(c) stack: HTTP API, 6 services", stack_run)]
    for name, r in entries:
        if r is None:
            continue
        note = ""
        if r is seed and not seed["complete"]:
            note = f" (extrapolated from {seed['turns_done']}/{seed['turns']} turns)"
        partial = r is seed and not seed["complete"]
        cp = None if partial else cpwer_in_regions(concat, r["segment_tuples"])
        pieces = {} if partial else cpwer_by_piece(concat, r["segment_tuples"])
        r["cpwer_whole_file"], r["cpwer_by_piece"] = cp, pieces
        rows.append([name + note, fmt(r["wall_s"], "s"), fmt(r["wall_s"] / concat.duration, "x"), fmt(cp),
                     fmt(pieces.get("all"))]
                    + [fmt(pieces.get(k)) for k in piece_names])
    print()
    print(f"== {label}: {concat.duration:.0f} s of audio ({concat.duration / 60:.1f} min);"
          f" embedding model {embedding_model} (local) ==")
    print(table(["run", "wall s", "RTF", "cpWER % file", "cpWER % pieces"]
                + [f"{k} %" for k in piece_names], rows))
    print("  cpWER % file: one speaker mapping over the whole file (every transcribed piece);"
          " pieces: mapped piece by piece, summed")
    details = []
    if floor:
        details.append(f"(a) decode {floor['decode_s']:.1f} s, diarize {floor['diarize_s']:.1f} s "
                       f"({floor['turns']} turns), "
                       f"transcribe {floor['transcribe_s']:.1f} s, embed {floor['embed_s']:.1f} s")
    details.append(f"(b) diarize {seed['diarize_s']:.1f} s, transcribe {seed['transcribe_s']:.1f} s "
                   f"({seed['turns']} turns), embed {seed['embed_s']:.1f} s")
    if stack_run.get("transcription_stage_s") is not None:
        details.append(f"(c) upload {stack_run['upload_s']:.1f} s, transcription stage "
                       f"{stack_run['transcription_stage_s']:.1f} s (first chunk picked up to last transcribed)")
    print("\n".join("  " + d for d in details))
    out = {"audio_s": concat.duration, "b_over_c": seed["wall_s"] / stack_run["wall_s"]}
    print()
    if floor:
        out["c_over_a"] = stack_run["wall_s"] / floor["wall_s"]
        print(f"  c/a (pipeline overhead)  {out['c_over_a']:.2f}   target <= {c_over_a_target:.2f}: "
              f"{verdict(out['c_over_a'] <= c_over_a_target)}")
    print(f"  b/c (speed-up over seed) {out['b_over_c']:.2f}   target >= {b_over_c_target:.1f}: "
          f"{verdict(out['b_over_c'] >= b_over_c_target)}")
    seed_cp, stack_cp = seed["cpwer_whole_file"], stack_run["cpwer_whole_file"]
    print(f"  cpWER (c) {fmt(stack_cp)} % vs (b) {fmt(seed_cp)} %   target (c) <= (b): "
          f"{verdict(at_most(stack_cp, seed_cp))}")
    strip = lambda r: {k: v for k, v in r.items() if k != "segment_tuples"} if r else None  # noqa: E731
    REPORT[label] = {**out, "embedding_model": embedding_model, "floor": strip(floor), "seed": strip(seed),
                     "stack": strip(stack_run)}


# ---- --long ---------------------------------------------------------------------------------

LONG_CHUNK_SPEECH_S = 120

def long_file(fixtures, minutes: float, seed_budget: float, tmp: Path) -> None:
    from bench.stack import running_stack

    concat = concatenate(fixtures, minutes * 60)
    path = tmp / "bench_long.wav"
    write_wav(path, concat.audio)
    log(f"long audio: {concat.duration / 60:.1f} min -> {path}")
    timeout = max(900.0, concat.duration * 1.5)
    # Scale-out as a cluster does it: each transcriber replica sized to one core (as a pod with a
    # CPU request of 1), and chunks small enough that a long file spreads over the replicas.
    with running_stack(WHISPER_CPU_THREADS="1", CHUNK_MAX_SPEECH_S=str(LONG_CHUNK_SPEECH_S)) as stack:
        log(f"stack ready (1 transcriber, 1 thread each, chunks <= {LONG_CHUNK_SPEECH_S} s of speech); submitting")
        one = run_stack_job(stack, path, timeout)
        one["transcription_stage_s"] = transcription_stage_s(stack, one["job_id"], ["transcriber"])
        one["chunks"] = chunks_of(stack, one["job_id"], ["transcriber"])
        log(f"1 transcriber: {one['wall_s']:.1f} s; starting a second transcriber")
        stack.start_service("transcriber", "transcriber2")
        stack.wait_ready(workers=("transcriber2",))
        two = run_stack_job(stack, path, timeout)
        names = ["transcriber", "transcriber2"]
        two["transcription_stage_s"] = transcription_stage_s(stack, two["job_id"], names)
        two["chunks"] = chunks_of(stack, two["job_id"], names)
        log(f"2 transcribers: {two['wall_s']:.1f} s")
    settings = bench_settings()
    diarize, _, model = load_components(settings)
    log(f"(b) seed on the long file (capped at {seed_budget:.0f} s, then extrapolated) ...")
    seed = run_seed(path, diarize, model, settings, seed_budget)
    del model, diarize

    for r in (one, two):
        r["cpwer"] = cpwer_in_regions(concat, r["segment_tuples"])
    seed["cpwer"] = cpwer_in_regions(concat, seed["segment_tuples"]) if seed["complete"] else None
    rows = []
    for name, r in (("1 transcriber", one), ("2 transcribers", two)):
        rows.append([name, fmt(r["wall_s"], "s"), fmt(r["wall_s"] / concat.duration, "x"),
                     fmt(r["transcription_stage_s"], "s"), " ".join(f"{k}:{v}" for k, v in r["chunks"].items()),
                     fmt(r["cpwer"])])
    note = "" if seed["complete"] else f" (extrapolated, {seed['turns_done']}/{seed['turns']} turns)"
    rows.append(["(b) seed" + note, fmt(seed["wall_s"], "s"), fmt(seed["wall_s"] / concat.duration, "x"),
                 fmt(seed["transcribe_s"], "s"), "-", fmt(seed["cpwer"])])
    print()
    print(f"== --long: {concat.duration:.0f} s of audio ({concat.duration / 60:.1f} min); "
          f"transcriber replicas of 1 thread each, chunks <= {LONG_CHUNK_SPEECH_S} s of speech ==")
    print(table(["run", "job wall s", "RTF", "transcription stage s", "chunks per process", "cpWER %"], rows))
    stage_speedup = (one["transcription_stage_s"] / two["transcription_stage_s"]
                     if one["transcription_stage_s"] and two["transcription_stage_s"] else None)
    total_speedup = one["wall_s"] / two["wall_s"]
    b_over_c = seed["wall_s"] / one["wall_s"]
    print()
    print(f"  second transcriber, transcription stage  {fmt(stage_speedup, 'x')}x  target >= 1.6: "
          f"{verdict(stage_speedup >= 1.6 if stage_speedup else None)}")
    print(f"  second transcriber, job total            {total_speedup:.2f}x")
    print(f"  b/c (seed vs 1 transcriber)              {b_over_c:.2f}   target >= 3: {verdict(b_over_c >= 3)}")
    if seed["complete"]:
        print(f"  cpWER 1 transcriber {fmt(one['cpwer'])} % vs seed {fmt(seed['cpwer'])} %   target <=: "
              f"{verdict(at_most(one['cpwer'], seed['cpwer']))}")
    else:
        print("  cpWER vs seed: n/a (the seed was capped; its cpWER is in the default comparison)")
    strip = lambda r: {k: v for k, v in r.items() if k != "segment_tuples"}  # noqa: E731
    REPORT["long"] = {"audio_s": concat.duration, "one": strip(one), "two": strip(two), "seed": strip(seed),
                      "stage_speedup": stage_speedup, "total_speedup": total_speedup, "b_over_c": b_over_c}


# ---- --concurrent N -------------------------------------------------------------------------

def concurrent(fixtures, n: int) -> None:
    from bench.stack import running_stack
    from common.audio import decode_audio
    from services.embedder.backends import local_embedder

    files = [fixtures[i % len(fixtures)].path for i in range(n)]
    with running_stack() as stack:
        log(f"stack ready; submitting {n} files at once")
        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=min(n, 16)) as pool:
            ids = list(pool.map(lambda p: stack.submit_job(p), files))
        t_submitted = time.monotonic()
        finished = stack.wait_done(ids, timeout=max(600.0, 60.0 * n))
    makespan = max(t for t, _ in finished.values()) - t0
    states = [d["status"] for _, d in finished.values()]
    log(f"makespan {makespan:.1f} s; measuring each stage's work in one process ...")
    # The same files through the same components, one at a time, stage by stage.
    settings = bench_settings()
    diarize, _, model = load_components(settings)
    # The stack's services were warm when they took the jobs: so are these, or the first file's
    # stages would carry the models' first-inference set-up.
    warm_up(diarize, model, settings, decode_audio(str(files[0])))
    work = {"diarizer (decode+diarize)": 0.0, "transcriber": 0.0, "embedder": 0.0}
    audio_s = 0.0
    for path in files:
        t = time.perf_counter()
        waveform = decode_audio(str(path))
        decode_s = time.perf_counter() - t
        result = run_pipeline(waveform, diarize, model, settings)
        t = time.perf_counter()
        local_embedder(settings)([s.text for s in result.segments] or [""])
        work["embedder"] += time.perf_counter() - t
        work["diarizer (decode+diarize)"] += decode_s + result.timings["diarize"]
        work["transcriber"] += result.timings["transcribe"]
        audio_s += result.duration
    del model, diarize
    slowest = max(work, key=work.get)
    rows = [[name, fmt(seconds, "s")] for name, seconds in work.items()]
    rows.append(["makespan (first submit to last done)", fmt(makespan, "s")])
    print()
    print(f"== --concurrent {n}: {n} files, {audio_s:.0f} s of audio in all; "
          f"{states.count('done')}/{n} done, submits took {t_submitted - t0:.1f} s;"
          f" embedding model {settings.local_embedding_model} (local) ==")
    print(table(["stage (total work, one process, in sequence)", "s"], rows))
    print(f"\n  makespan / slowest stage's work ({slowest}) = {makespan / work[slowest]:.2f} "
          f"(1.00 = perfectly pipelined; sum of all stages = {sum(work.values()):.1f} s)")
    REPORT["concurrent"] = {"n": n, "audio_s": audio_s, "makespan_s": makespan, "stage_work_s": work,
                            "done": states.count("done"), "ratio": makespan / work[slowest]}


# ---- --upload-gb ----------------------------------------------------------------------------

def write_big_wav(path: Path, size_bytes: int) -> None:
    """A valid 16 kHz mono 16-bit WAV of `size_bytes` of data: quiet noise, written in 1 MiB
    blocks (never held in memory)."""
    block = (np.random.default_rng(0).normal(0, 300, 512 * 1024)).astype("<i2").tobytes()
    with path.open("wb") as f:
        f.write(b"RIFF" + struct.pack("<I", 36 + size_bytes) + b"WAVE")
        f.write(b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, SAMPLE_RATE, SAMPLE_RATE * 2, 2, 16))
        f.write(b"data" + struct.pack("<I", size_bytes))
        left = size_bytes
        while left > 0:
            f.write(block[:left])
            left -= len(block)


class RssSampler:
    """Peak RSS of a process and its children, sampled every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 0.02):
        import psutil

        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        total = self.process.memory_info().rss
        for child in self.process.children(recursive=True):
            try:
                total += child.memory_info().rss
            except Exception:
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def upload_gb(fixtures, gigabytes: float, tmp: Path) -> None:
    import httpx

    from bench.stack import running_stack

    size = int(gigabytes * 1024**3)
    path = tmp / "bench_big.wav"
    t = time.perf_counter()
    write_big_wav(path, size)
    log(f"wrote {size / 1024**3:.2f} GiB WAV in {time.perf_counter() - t:.1f} s")
    megabytes = int(size / 1024**2) + 64
    # Ingest reads the duration from the WAV's header (1 GiB is 9.3 h of 16 kHz 16-bit mono): a
    # limit below it answers 413 before a byte reaches the store, which is what is measured.
    audio_hours = size / (SAMPLE_RATE * 2) / 3600
    try:
        with running_stack(services=("ingest",), MAX_UPLOAD_MB=str(max(2048, megabytes)),
                           MAX_AUDIO_HOURS=f"{audio_hours + 1:.2f}") as stack:
            pid = stack.processes["ingest"].pid
            stack.submit_job(fixtures[0].path)  # warm-up: imports and connections already made
            time.sleep(1.0)
            sampler = RssSampler(pid)
            baseline = sampler.rss()
            with sampler:
                t0 = time.perf_counter()
                with path.open("rb") as f, httpx.Client(timeout=1800) as client:
                    response = client.post(f"{stack.api}/recognize", files={"file": ("big.wav", f, "audio/wav")})
                elapsed = time.perf_counter() - t0
                time.sleep(0.5)
            after = sampler.rss()
    finally:
        path.unlink(missing_ok=True)
    growth = sampler.peak - baseline
    rows = [[f"{size / 1024**3:.2f} GiB WAV upload", str(response.status_code), fmt(elapsed, "s"),
             f"{size / 1024**2 / elapsed:.0f}", f"{baseline / 1024**2:.0f}", f"{sampler.peak / 1024**2:.0f}",
             f"{growth / 1024**2:.1f}", f"{after / 1024**2:.0f}"]]
    print()
    print("== --upload-gb: ingest process (and children) RSS while one large upload streams in ==")
    print(table(["upload", "HTTP", "wall s", "MB/s", "RSS before MB", "peak MB", "growth MB", "after MB"], rows))
    ok = response.status_code == 202 and growth < 64 * 1024**2
    print(f"\n  RSS growth {growth / 1024**2:.1f} MB  target < 64 MB (and 202): {verdict(ok)}")
    REPORT["upload"] = {"bytes": size, "status": response.status_code, "wall_s": elapsed,
                        "rss_baseline": baseline, "rss_peak": sampler.peak, "growth": growth}


# ---- --small-uploads ------------------------------------------------------------------------

def small_uploads(fixtures, n: int, concurrency: int, tmp: Path) -> None:
    import httpx

    from bench.stack import running_stack
    from common.audio import decode_audio

    path = tmp / "bench_small.wav"
    write_wav(path, decode_audio(str(fixtures[0].path))[: 2 * SAMPLE_RATE])
    body = path.read_bytes()
    local = threading.local()

    with running_stack(services=("ingest",)) as stack:
        url = f"{stack.api}/recognize"

        def one(i: int) -> tuple[float, int]:
            client = getattr(local, "client", None)
            if client is None:
                client = local.client = httpx.Client(timeout=60)
            t = time.perf_counter()
            try:
                status = client.post(url, files={"file": (f"small_{i}.wav", body, "audio/wav")}).status_code
            except httpx.HTTPError:
                status = 0
            return time.perf_counter() - t, status

        for i in range(5):
            one(-i)  # warm-up
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            results = list(pool.map(one, range(n)))
        wall = time.perf_counter() - t0
    latencies = sorted(r[0] for r in results)
    ok = sum(1 for r in results if r[1] == 202)
    p50 = statistics.median(latencies)
    p99 = latencies[min(len(latencies) - 1, int(round(0.99 * len(latencies))) - 1)]
    print()
    print(f"== --small-uploads: {n} uploads of {len(body) / 1024:.0f} KB, {concurrency} at a time ==")
    print(table(["uploads", "202", "wall s", "req/s", "p50 ms", "p99 ms", "max ms"],
                [[str(n), str(ok), fmt(wall, "s"), f"{n / wall:.1f}", f"{1000 * p50:.0f}",
                  f"{1000 * p99:.0f}", f"{1000 * latencies[-1]:.0f}"]]))
    REPORT["small_uploads"] = {"n": n, "ok": ok, "wall_s": wall, "rps": n / wall, "p50_s": p50, "p99_s": p99}


# ---- main -----------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES)
    parser.add_argument("--seconds", type=float, default=300.0, help="length of the default file")
    parser.add_argument("--seed-budget", type=float, default=360.0,
                        help="cap on the seed approach's transcription, seconds (then extrapolated)")
    parser.add_argument("--pieces", default=DEFAULT_PIECES,
                        help="comma-separated fixture stems to concatenate, or 'all' for every fixture with a "
                             f"reference (default: {DEFAULT_PIECES})")
    parser.add_argument("--default", action="store_true", help="run the default comparison too")
    parser.add_argument("--long", type=float, nargs="?", const=30.0, metavar="MIN")
    parser.add_argument("--long-seed-budget", type=float, default=300.0)
    parser.add_argument("--concurrent", type=int, metavar="N")
    parser.add_argument("--upload-gb", type=float, metavar="G")
    parser.add_argument("--small-uploads", type=int, metavar="N")
    parser.add_argument("--upload-concurrency", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    quiet_logs()
    fixtures = load_fixtures(args.fixtures)
    if args.pieces != "all":
        wanted = [p.strip() for p in args.pieces.split(",") if p.strip()]
        by_stem = {f.stem: f for f in fixtures}
        missing = [w for w in wanted if w not in by_stem]
        if missing:
            raise SystemExit(f"no fixture with a reference named {missing} (have {sorted(by_stem)})")
        fixtures = [by_stem[w] for w in wanted]
    if not fixtures:
        raise SystemExit(f"no fixtures with references in {args.fixtures}")
    extra = any(v is not None for v in (args.long, args.concurrent, args.upload_gb, args.small_uploads))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp_name:
        tmp = Path(tmp_name)
        if args.default or not extra:
            default_comparison(fixtures, args.seconds, args.seed_budget, tmp)
        if args.long is not None:
            long_file(fixtures, args.long, args.long_seed_budget, tmp)
        if args.concurrent:
            concurrent(fixtures, args.concurrent)
        if args.upload_gb:
            upload_gb(fixtures, args.upload_gb, tmp)
        if args.small_uploads:
            small_uploads(fixtures, args.small_uploads, args.upload_concurrency, tmp)
    wall = time.perf_counter() - started
    print(f"\nwall time {wall:.1f} s")
    if args.json:
        REPORT["wall_s"] = wall
        args.json.write_text(json.dumps(REPORT, indent=1, default=str))


if __name__ == "__main__":
    main()
