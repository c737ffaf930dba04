"""python -m bench.accuracy: DER, speaker count, WER and cpWER of the pipeline's components
(run in-process exactly as the diarizer and transcriber services run them) on every fixture
with a reference, beside bare Whisper (the whole file in one transcribe call, no diarization).

    python -m bench.accuracy [--fixtures DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from bench.common import (
    DEFAULT_FIXTURES,
    bench_settings,
    cpwer,
    der,
    fmt,
    load_components,
    load_fixtures,
    quiet_logs,
    run_pipeline,
    table,
    verdict,
    wer,
)

DIALOGUES = ("en_dialogue", "ru_dialogue")
AMI = ("ami_dev00", "ami_dev01")
DER_TARGET = {**{d: 0.10 for d in DIALOGUES}, **{a: 0.25 for a in AMI}}
CPWER_MARGIN = 0.02


def bare_whisper(model, waveform: np.ndarray, beam_size: int) -> str:
    """Whisper alone: faster-whisper's defaults (language detected, no VAD), one call."""
    pieces, _ = model.transcribe(waveform, beam_size=beam_size)
    return " ".join(p.text.strip() for p in pieces)


def evaluate(fixtures_dir: Path) -> dict:
    from common.audio import decode_audio

    quiet_logs()
    settings = bench_settings()
    t = time.perf_counter()
    diarize, backend, model = load_components(settings)
    load_s = time.perf_counter() - t
    rows = []
    for fixture in load_fixtures(fixtures_dir):
        waveform = decode_audio(str(fixture.path))
        result = run_pipeline(waveform, diarize, model, settings)
        t = time.perf_counter()
        bare_text = bare_whisper(model, waveform, settings.whisper_beam_size)
        bare_s = time.perf_counter() - t
        hyp_text = " ".join(s.text for s in sorted(result.segments, key=lambda s: s.start_ts))
        row = {
            "file": fixture.name,
            "duration_s": result.duration,
            "language": result.language,
            "speakers_ref": fixture.ref_speakers,
            "speakers_found": result.speakers,
            "der_collar_0.25": der(fixture.turns, result.turn_tuples(), 0.5) if fixture.turns else None,
            "der_collar_0": der(fixture.turns, result.turn_tuples(), 0.0) if fixture.turns else None,
            "wer": wer(fixture.text, hyp_text) if fixture.text else None,
            "cpwer": cpwer([(u.speaker, u.text) for u in sorted(fixture.utterances, key=lambda u: u.start)],
                           [(s.speaker, s.text) for s in sorted(result.segments, key=lambda s: s.start_ts)])
            if fixture.utterances else None,
            "bare_wer": wer(fixture.text, bare_text) if fixture.text else None,
            "diarize_s": round(result.timings["diarize"], 2),
            "transcribe_s": round(result.timings["transcribe"], 2),
            "bare_s": round(bare_s, 2),
            "hypothesis": hyp_text,
            "bare_hypothesis": bare_text,
        }
        rows.append(row)
        print(f"  {fixture.name}: done ({row['diarize_s'] + row['transcribe_s'] + row['bare_s']:.1f} s)", flush=True)
    return {"diarization_backend": backend, "model_load_s": round(load_s, 2), "files": rows,
            "means": means(rows), "targets": targets(rows)}


def means(rows: list[dict]) -> dict:
    out = {}
    for key in ("der_collar_0.25", "der_collar_0", "wer", "cpwer", "bare_wer"):
        values = [r[key] for r in rows if r[key] is not None and not math.isnan(r[key])]
        out[key] = float(np.mean(values)) if values else None
    out["speakers_exact"] = sum(r["speakers_found"] == r["speakers_ref"] for r in rows if r["speakers_ref"])
    out["speakers_scored"] = sum(1 for r in rows if r["speakers_ref"])
    return out


def targets(rows: list[dict]) -> list[dict]:
    by_stem = {Path(r["file"]).stem: r for r in rows}
    out = []
    for stem, limit in DER_TARGET.items():
        r = by_stem.get(stem)
        value = r["der_collar_0.25"] if r else None
        out.append({"target": f"DER(+-0.25 s) {stem} <= {100 * limit:.0f}%",
                    "value": None if value is None else f"{100 * value:.1f}%",
                    "met": None if value is None else value <= limit})
    for stem in DIALOGUES:
        r = by_stem.get(stem)
        out.append({"target": f"speaker count exact {stem}",
                    "value": None if r is None else f"{r['speakers_found']} vs {r['speakers_ref']}",
                    "met": None if r is None else r["speakers_found"] == r["speakers_ref"]})
    for r in rows:
        if r["cpwer"] is not None and r["bare_wer"] is not None:
            out.append({"target": f"cpWER <= bare WER + 2 points {Path(r['file']).stem}",
                        "value": f"{100 * r['cpwer']:.1f} vs {100 * r['bare_wer']:.1f} + 2",
                        "met": r["cpwer"] <= r["bare_wer"] + CPWER_MARGIN + 1e-9})
    return out


def render(report: dict) -> str:
    headers = ["file", "dur s", "lang", "spk ref", "spk found", "DER±.25 %", "DER@0 %",
               "WER %", "cpWER %", "bare WER %", "diar s", "trans s", "bare s"]
    rows = []
    for r in report["files"]:
        rows.append([r["file"], fmt(r["duration_s"], "s"), r["language"] or "-", fmt(r["speakers_ref"], "n"),
                     fmt(r["speakers_found"], "n"), fmt(r["der_collar_0.25"]), fmt(r["der_collar_0"]),
                     fmt(r["wer"]), fmt(r["cpwer"]), fmt(r["bare_wer"]), fmt(r["diarize_s"], "s"),
                     fmt(r["transcribe_s"], "s"), fmt(r["bare_s"], "s")])
    m = report["means"]
    rows.append(["MEAN", "", "", "", f"{m['speakers_exact']}/{m['speakers_scored']} exact",
                 fmt(m["der_collar_0.25"]), fmt(m["der_collar_0"]), fmt(m["wer"]), fmt(m["cpwer"]),
                 fmt(m["bare_wer"]), "", "", ""])
    lines = [f"diarization backend: {report['diarization_backend']}; models loaded in {report['model_load_s']} s",
             table(headers, rows), "", "targets:"]
    width = max(len(t["target"]) for t in report["targets"]) if report["targets"] else 0
    for t in report["targets"]:
        lines.append(f"  {t['target'].ljust(width)}  {(t['value'] or '-'):>22}  {verdict(t['met'])}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES, help="fixtures directory")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    started = time.perf_counter()
    report = evaluate(args.fixtures)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    print()
    print(render(report))
    print(f"\nwall time {report['wall_s']} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
