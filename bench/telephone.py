"""python -m bench.telephone: the diarizer on the fixtures as a telephone line would carry them.

Calls are often recorded at 8 kHz: nothing above 4 kHz, and on the public network only 300-3400
Hz, 8-bit G.711 mu-law. Every fixture with a reference .rttm is diarized as it is and after each
of those channels (resampled back to 16 kHz as the services do), without hints and told the
reference's speaker count (`num_speakers`). Printed per file: the share of the recording's energy
above 4.2 kHz (the bandwidth it already has), then DER at +-0.25 s with the speakers found, per
channel; then DER pooled over the nine AMI clips and over the other files (total error / total
reference).

Each recording is analysed once per channel (segmentation and embeddings); the hinted and unhinted
results are two clusterings of that analysis, as `diarize_offline` would make them.

    python -m bench.telephone [--fixtures DIR]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.common import DEFAULT_FIXTURES, SAMPLE_RATE, der_counts, fmt, load_fixtures, quiet_logs, table

AMI_PREFIX = "ami_"
MU = 255.0


def narrowband(waveform: np.ndarray) -> np.ndarray:
    """8 kHz sampling: nothing above 4 kHz."""
    from scipy.signal import resample_poly

    return resample_poly(resample_poly(waveform, 1, 2), 2, 1)[: len(waveform)]


def telephone_band(waveform: np.ndarray) -> np.ndarray:
    """8 kHz sampling and the network's 300-3400 Hz band."""
    from scipy.signal import butter, resample_poly, sosfilt

    at_8k = resample_poly(waveform, 1, 2)
    band = sosfilt(butter(4, [300, 3400], btype="band", fs=SAMPLE_RATE // 2, output="sos"), at_8k)
    return resample_poly(band, 2, 1)[: len(waveform)]


def g711(waveform: np.ndarray) -> np.ndarray:
    """The telephone band, then 8-bit mu-law companding (G.711) and back."""
    from scipy.signal import resample_poly

    band = resample_poly(telephone_band(waveform), 1, 2)
    compressed = np.sign(band) * np.log1p(MU * np.abs(np.clip(band, -1, 1))) / np.log1p(MU)
    quantised = np.round(compressed * 127) / 127
    expanded = np.sign(quantised) * ((1 + MU) ** np.abs(quantised) - 1) / MU
    return resample_poly(expanded, 2, 1)[: len(waveform)]


CHANNELS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "as it is": lambda w: w,
    "8 kHz": narrowband,
    "telephone band": telephone_band,
    "G.711": g711,
}


def high_band_db(waveform: np.ndarray) -> float:
    """Mean power density at 4.2-7.5 kHz relative to 0.3-3.4 kHz, in dB."""
    from scipy.signal import welch

    freqs, power = welch(waveform, fs=SAMPLE_RATE, nperseg=1024)
    high = power[(freqs > 4200) & (freqs < 7500)].mean()
    low = power[(freqs > 300) & (freqs < 3400)].mean()
    return float(10 * np.log10(max(high / max(low, 1e-30), 1e-30)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES)
    args = parser.parse_args()
    quiet_logs()
    from common.audio import decode_audio
    from services.diarizer.offline import analyse, decide, load_offline_models

    load_offline_models()
    fixtures = [f for f in load_fixtures(args.fixtures) if f.turns]
    counts: dict[tuple[str, bool], dict[str, tuple[float, float]]] = {}
    rows = []
    for fixture in fixtures:
        waveform = decode_audio(str(fixture.path))
        row = [fixture.stem, f"{high_band_db(waveform):.0f}", str(fixture.ref_speakers)]
        for name, channel in CHANNELS.items():
            local = analyse(np.ascontiguousarray(channel(waveform), dtype=np.float32))
            cells = []
            for hinted in (False, True):
                n = fixture.ref_speakers if hinted else None
                result = decide(local, n or 1, n)
                turns = [(t.speaker, t.start, t.end) for t in result.turns]
                counts.setdefault((name, hinted), {})[fixture.stem] = der_counts(fixture.turns, turns, 0.5)
                found = len({speaker for speaker, _, _ in turns})
                cells.append(f"{fmt(_rate(counts[(name, hinted)][fixture.stem]))} ({found})")
            row.append(" / ".join(cells))
        rows.append(row)
        print(f"  {fixture.stem}: done", flush=True)
    for group, label in ((True, "pooled AMI"), (False, "pooled others")):
        rows.append([label, "", ""] + [
            f"{fmt(_pooled(counts[(name, False)], group))} / {fmt(_pooled(counts[(name, True)], group))}"
            for name in CHANNELS])
    print()
    print(table(["file", "energy above 4.2 kHz dB", "speakers",
                 *[f"{name}: DER % (speakers), no hint / told the count" for name in CHANNELS]], rows))


def _rate(count: tuple[float, float]) -> float:
    error, total = count
    return error / total if total else 0.0


def _pooled(by_file: dict[str, tuple[float, float]], ami: bool) -> float:
    chosen = [c for stem, c in by_file.items() if stem.startswith(AMI_PREFIX) == ami]
    total = sum(t for _, t in chosen)
    return sum(e for e, _ in chosen) / total if total else 0.0


if __name__ == "__main__":
    main()
