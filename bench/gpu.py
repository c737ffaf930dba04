"""python -m bench.gpu: the diarizer and the transcriber on the CPU and on a CUDA GPU, side by side.

For each device (--devices; default: cpu, and cuda when torch sees a GPU), with the offline
defaults (the offline diarizer, Whisper from --whisper-model, by default the bundled `base`;
int8 on the CPU, float16 on CUDA): every fixture with a reference, then one long recording made
by laying the fixtures end to end (--long-min minutes). What each stage does is what its service
does for a job (bench.common.run_pipeline). Per file and device: diarization and transcription
wall time and real-time factor, speakers found; the GPU's peak memory in use (nvidia-smi) while
each device runs; whether diarizing one clip twice gives the same turns. Loading the models and
one warm-up pass over 10 s of audio are timed apart ("models load s").

Scores (DER at +-0.25 s against the references, cpWER, and how far the CUDA diarization is from
the CPU one) need pyannote.metrics and meeteval. --save FILE keeps every turn and segment as
JSON; `--report FILE` prints the tables of a saved run, scoring it where those packages are
installed (a GPU host may lack them).

    python -m bench.gpu [--devices cpu,cuda] [--long-min 30] [--save run.json] [--fixtures DIR]
    python -m bench.gpu --report run.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import (
    DEFAULT_FIXTURES,
    SAMPLE_RATE,
    WHISPER_MODEL,
    bench_settings,
    concatenate,
    fmt,
    load_fixtures,
    quiet_logs,
    run_pipeline,
    table,
)

LONG = "long"
TWICE = "ami_trn07"  # the clip diarized twice on each device (four people, overlap)


class GpuMemory:
    """Peak GPU memory in use (MiB, all processes) while the block runs, sampled by nvidia-smi."""

    def __init__(self, every_s: float = 0.2):
        self.every_s = every_s
        self.peak_mib: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            used = gpu_memory_used_mib()
            if used is not None:
                self.peak_mib = max(self.peak_mib or 0, used)
            self._stop.wait(self.every_s)

    def __enter__(self) -> GpuMemory:
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def gpu_memory_used_mib() -> int | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return int(out.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def machine() -> dict:
    import torch

    gpu = None
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip()
        gpu = out or None
    return {"cpu_cores": os.cpu_count(), "processor": platform.processor() or platform.machine(), "gpu": gpu,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}


def default_devices() -> list[str]:
    import torch

    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def inputs(fixtures_dir: Path, long_min: float) -> list[tuple[str, np.ndarray]]:
    from common.audio import decode_audio

    fixtures = load_fixtures(fixtures_dir)
    named = [(f.name, decode_audio(str(f.path))) for f in fixtures]
    if long_min > 0:
        named.append((LONG, concatenate(fixtures, long_min * 60).audio))
    return named


def run_device(device: str, audio: list[tuple[str, np.ndarray]], whisper_model: str, transcribe: bool = True) -> dict:
    from common.messages import JobOptions
    from services.diarizer.pipeline import make_diarizer
    from services.transcriber.whisper import load_model, pick_device

    settings = bench_settings(diarizer_device=device, whisper_device=device, whisper_model=whisper_model)
    with GpuMemory() as memory:
        t = time.perf_counter()
        diarize, _ = make_diarizer(settings)
        model = load_model(settings)[0] if transcribe else None
        # One clip through both first, outside the timings: the first CUDA calls set up kernels.
        warm_up = audio[0][1][: 10 * SAMPLE_RATE]
        warm = diarize(warm_up, JobOptions())
        if model is not None:
            run_pipeline(warm_up, diarize, model, settings, diarization=warm)
        load_s = time.perf_counter() - t
        files = []
        for name, waveform in audio:
            t = time.perf_counter()
            diarization = diarize(waveform, JobOptions())
            diarize_s = time.perf_counter() - t
            t = time.perf_counter()
            segments = []
            if model is not None:
                segments = run_pipeline(waveform, diarize, model, settings, diarization=diarization).segment_tuples()
            transcribe_s = time.perf_counter() - t
            files.append({"file": name, "duration_s": round(waveform.size / SAMPLE_RATE, 2),
                          "diarize_s": round(diarize_s, 3), "transcribe_s": round(transcribe_s, 3) if model else None,
                          "turns": [(turn.speaker, turn.start, turn.end) for turn in diarization.turns],
                          "segments": segments})
            print(f"  {device} {name}: diarized in {diarize_s:.1f} s"
                  + (f", transcribed in {transcribe_s:.1f} s" if model is not None else ""), flush=True)
        twice = next((waveform for name, waveform in audio if Path(name).stem == TWICE), None)
        repeatable = None
        if twice is not None:
            first, second = (diarize(twice, JobOptions()).turns for _ in range(2))
            repeatable = first == second
    compute_type = pick_device(settings)[1] if transcribe else None
    return {"device": device, "compute_type": compute_type, "load_s": round(load_s, 2),
            "gpu_peak_mib": memory.peak_mib, "repeatable": repeatable, "files": files}


def _scores(report: dict) -> dict[tuple[str, str], dict]:
    """(device, file) -> {"der": ..., "cpwer": ..., "vs_cpu": ...} where the packages and references allow."""
    from bench.common import cpwer, der, load_fixture

    fixtures_dir = Path(report["fixtures"])
    references = {f.name: f for f in (load_fixture(p) for p in sorted(fixtures_dir.iterdir())
                                      if p.name in {r["file"] for r in report["runs"][0]["files"]})}
    cpu = next((r for r in report["runs"] if r["device"] == "cpu"), None)
    cpu_turns = {f["file"]: f["turns"] for f in cpu["files"]} if cpu else {}
    scores: dict[tuple[str, str], dict] = {}
    for run in report["runs"]:
        for f in run["files"]:
            s = scores.setdefault((run["device"], f["file"]), {})
            fixture = references.get(f["file"])
            turns = [tuple(t) for t in f["turns"]]
            if fixture and fixture.turns:
                s["der"] = der(fixture.turns, turns, 0.5)
            if fixture and fixture.utterances and f["transcribe_s"] is not None:
                reference = [(u.speaker, u.text) for u in sorted(fixture.utterances, key=lambda u: u.start)]
                said = [(speaker, text) for speaker, _, _, text in sorted(f["segments"], key=lambda x: x[1])]
                s["cpwer"] = cpwer(reference, said)
            if run["device"] != "cpu" and f["file"] in cpu_turns:
                s["vs_cpu"] = der([tuple(t) for t in cpu_turns[f["file"]]], turns, 0.0)
    return scores


def render(report: dict) -> str:
    try:
        scores = _scores(report)
    except ImportError as exc:
        scores = {}
        print(f"(no scores: {exc}; print them where pyannote.metrics and meeteval are installed: "
              "python -m bench.gpu --report FILE)")
    m = report["machine"]
    lines = [f"Machine: {m['cpu_cores']} CPU cores ({m['processor']}), GPU: {m['gpu'] or 'none'}, "
             f"torch {m['torch']}, {m['date']}. Whisper: {report['whisper_model']}."]
    rows = []
    for run in report["runs"]:
        for f in run["files"]:
            s = scores.get((run["device"], f["file"]), {})
            rows.append([f["file"], run["device"], f"{f['duration_s']:.0f}", f"{f['diarize_s']:.1f}",
                         _rtf(f["diarize_s"], f["duration_s"]), fmt(f["transcribe_s"], "s"),
                         _rtf(f["transcribe_s"], f["duration_s"]), str(len({t[0] for t in f["turns"]})),
                         fmt(s.get("der")), fmt(s.get("cpwer")), fmt(s.get("vs_cpu"))])
    rows.sort(key=lambda r: (r[0] == LONG, r[0], r[1]))
    lines.append(table(["file", "device", "audio s", "diarize s", "diarize RTF", "transcribe s", "transcribe RTF",
                        "speakers", "DER % ±0.25", "cpWER %", "vs CPU turns %"], rows))
    summary = []
    for run in report["runs"]:
        clips = [f for f in run["files"] if f["file"] != LONG]
        audio = sum(f["duration_s"] for f in clips)
        summary.append([run["device"], run["compute_type"] or "-", f"{run['load_s']:.1f}",
                        _rtf(_total(clips, "diarize_s"), audio), _rtf(_total(clips, "transcribe_s"), audio),
                        # nvidia-smi counts every process's memory: only a CUDA run's figure is its own
                        str(run["gpu_peak_mib"]) if run["device"] == "cuda" and run["gpu_peak_mib"] else "-",
                        {True: "yes", False: "NO", None: "-"}[run["repeatable"]]])
    lines.append("")
    lines.append(table(["device", "Whisper compute", "models load s", "clips diarize RTF", "clips transcribe RTF",
                        "GPU peak MiB", f"{TWICE} twice alike"], summary))
    by_device = {run["device"]: {f["file"]: f for f in run["files"]} for run in report["runs"]}
    if "cpu" in by_device and "cuda" in by_device:
        lines.append("")
        ratio_rows = []
        for label, names in (("all clips", [n for n in by_device["cpu"] if n != LONG]), (LONG, [LONG])):
            cpu = [by_device["cpu"][n] for n in names if n in by_device["cpu"] and n in by_device["cuda"]]
            cuda = [by_device["cuda"][n["file"]] for n in cpu]
            if cpu:
                ratio_rows.append([label] + [_ratio(_total(cpu, k), _total(cuda, k))
                                             for k in ("diarize_s", "transcribe_s")])
        lines.append(table(["audio", "diarize CPU/CUDA", "transcribe CPU/CUDA"], ratio_rows))
    return "\n".join(lines)


def _total(files: list[dict], key: str) -> float | None:
    values = [f[key] for f in files]
    return None if not values or None in values else sum(values)


def _rtf(seconds: float | None, audio_s: float) -> str:
    return "-" if seconds is None or not audio_s else f"{seconds / audio_s:.4f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", help="comma-separated: cpu, cuda (default: both when a GPU is visible)")
    parser.add_argument("--long-min", type=float, default=30.0, help="minutes of the long recording (0: none)")
    parser.add_argument("--whisper-model", default=str(WHISPER_MODEL), help="a size name or a model directory")
    parser.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES)
    parser.add_argument("--diarize-only", action="store_true", help="measure the diarizer alone")
    parser.add_argument("--save", type=Path, help="write the run (turns and segments included) as JSON")
    parser.add_argument("--report", type=Path, help="print the tables of a saved run instead of running")
    args = parser.parse_args()
    if args.report:
        report = json.loads(args.report.read_text())
        if not Path(report["fixtures"]).is_dir():  # saved on another machine: score with the local copies
            report["fixtures"] = str(args.fixtures)
        print(render(report))
        return
    quiet_logs()
    devices = args.devices.split(",") if args.devices else default_devices()
    audio = inputs(args.fixtures, args.long_min)
    report = {"machine": machine(), "fixtures": str(args.fixtures), "whisper_model": Path(args.whisper_model).name,
              "runs": []}
    for device in devices:
        report["runs"].append(run_device(device, audio, args.whisper_model, not args.diarize_only))
        if args.save:  # after each device, so a run cut short keeps what it measured
            args.save.write_text(json.dumps(report))
    print(render(report))


if __name__ == "__main__":
    main()
