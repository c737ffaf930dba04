"""python -m bench.dither: how far the diarizer's DER moves under noise nobody can hear.

Every fixture with a reference .rttm is diarized as it is, then again with Gaussian noise added
at each --levels rms (default 1e-5 and 1e-4 of full scale, -100 and -80 dBFS), --seeds times each.
Printed per file: the recording's own noise floor (the 10th percentile of its 100 ms frames' rms),
DER at +-0.25 s as it is, and the mean, lowest and highest DER over the noisy runs with the speaker
counts found; then the same pooled over the nine AMI clips (total error / total reference, per
run). A DER that moves a lot under noise far below the recording's own is partly luck.

    python -m bench.dither [--seeds 3] [--levels 1e-5 1e-4] [--fixtures DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench.common import DEFAULT_FIXTURES, SAMPLE_RATE, der_counts, fmt, load_fixtures, pooled_rate, quiet_logs, table

AMI_PREFIX = "ami_"


def noise_floor_dbfs(waveform: np.ndarray) -> float:
    frame = SAMPLE_RATE // 10
    frames = waveform[: len(waveform) // frame * frame].reshape(-1, frame)
    rms = np.sqrt((frames.astype(np.float64) ** 2).mean(axis=1))
    return float(20 * np.log10(max(np.percentile(rms, 10), 1e-10)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--levels", type=float, nargs="+", default=[1e-5, 1e-4], help="noise rms, full scale = 1")
    parser.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES)
    args = parser.parse_args()
    quiet_logs()
    from common.audio import decode_audio
    from services.diarizer.offline import diarize_offline, load_offline_models

    load_offline_models()
    fixtures = [f for f in load_fixtures(args.fixtures) if f.turns]
    runs = [(level, seed) for level in args.levels for seed in range(args.seeds)]
    counts: dict[tuple[float, int] | None, dict[str, tuple[float, float]]] = {}
    rows = []
    for fixture in fixtures:
        waveform = decode_audio(str(fixture.path))
        found = {}
        for run in [None, *runs]:
            noisy = waveform
            if run is not None:
                level, seed = run
                noise = np.random.default_rng(seed).normal(0.0, level, waveform.shape).astype(np.float32)
                noisy = waveform + noise
            turns = [(t.speaker, t.start, t.end) for t in diarize_offline(noisy).turns]
            counts.setdefault(run, {})[fixture.stem] = der_counts(fixture.turns, turns, 0.5)
            found[run] = len({speaker for speaker, _, _ in turns})
        row = [fixture.stem, f"{noise_floor_dbfs(waveform):.0f}", str(fixture.ref_speakers),
               f"{fmt(pooled_rate([counts[None][fixture.stem]]))} ({found[None]})"]
        for level in args.levels:
            mine = [r for r in runs if r[0] == level]
            rates = [pooled_rate([counts[r][fixture.stem]]) for r in mine]
            row.append(f"{fmt(np.mean(rates))} [{fmt(min(rates))}-{fmt(max(rates))}] "
                       f"({','.join(str(found[r]) for r in mine)})")
        rows.append(row)
        print(f"  {fixture.stem}: done", flush=True)
    pooled = ["pooled AMI", "", "", fmt(_pooled(counts[None]))]
    for level in args.levels:
        rates = [_pooled(counts[r]) for r in runs if r[0] == level]
        pooled.append(f"{fmt(np.mean(rates))} [{fmt(min(rates))}-{fmt(max(rates))}]")
    rows.append(pooled)
    levels = [f"noise {20 * np.log10(level):.0f} dBFS: DER mean [low-high] (speakers)" for level in args.levels]
    print()
    print(table(["file", "noise floor dBFS", "speakers", "DER % as it is (speakers)", *levels], rows))


def _pooled(by_file: dict[str, tuple[float, float]]) -> float:
    return pooled_rate(c for stem, c in by_file.items() if stem.startswith(AMI_PREFIX))


if __name__ == "__main__":
    main()
