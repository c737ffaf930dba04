"""python -m bench.telephone: the diarizer on the fixtures as call recordings would bring them.

Calls are often recorded at 8 kHz: nothing above 4 kHz, and on the public telephone network only
300-3400 Hz, stored as 8-bit G.711 mu-law. Every fixture with a reference .rttm is written as such
a file (8 kHz WAV through PyAV's resampler, the one the services decode with; band-limited at 8 kHz
for the last two) and decoded back by the services' own `decode_audio`, then diarized without
hints and told the reference's speaker count (`num_speakers`). Printed per file: the recording's
energy above 4.2 kHz relative to 0.3-3.4 kHz (the bandwidth it already has), then DER at +-0.25 s
with the speakers found, per channel; then DER pooled over the nine AMI clips and over the other
files (total error / total reference).

Each recording is analysed once per channel (segmentation and embeddings); the hinted and unhinted
results are two clusterings of that analysis, as `diarize_offline` would make them.

    python -m bench.telephone [--fixtures DIR]
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np

from bench.common import DEFAULT_FIXTURES, SAMPLE_RATE, der_counts, fmt, load_fixtures, pooled_rate, quiet_logs, table

AMI_PREFIX = "ami_"
CALL_RATE = 8000
# name: (300-3400 Hz band, WAV codec)
CHANNELS = {
    "8 kHz": (False, "pcm_s16le"),
    "telephone band": (True, "pcm_s16le"),
    "G.711": (True, "pcm_mulaw"),
}
AS_IT_IS = "as it is"
CONDITIONS = [AS_IT_IS, *CHANNELS]


def call_recording(waveform: np.ndarray, band: bool, codec: str) -> bytes:
    """`waveform` (16 kHz float) as an 8 kHz mono WAV file in `codec`, band-limited to 300-3400 Hz
    when `band`."""
    import av
    from scipy.signal import butter, sosfiltfilt

    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(waveform, dtype=np.float32)[None, :],
                                       format="flt", layout="mono")
    frame.sample_rate = SAMPLE_RATE
    resampler = av.AudioResampler(format="flt", layout="mono", rate=CALL_RATE)
    at_8k = np.concatenate([f.to_ndarray().reshape(-1) for f in [*resampler.resample(frame),
                                                                   *resampler.resample(None)]])
    if band:
        at_8k = sosfiltfilt(butter(6, [300, 3400], btype="band", fs=CALL_RATE, output="sos"), at_8k)
    pcm = np.clip(np.round(at_8k * 32767), -32768, 32767).astype(np.int16)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="wav") as container:
        stream = container.add_stream(codec, rate=CALL_RATE, layout="mono")
        out = av.AudioFrame.from_ndarray(pcm[None, :], format="s16", layout="mono")
        out.sample_rate = CALL_RATE
        for packet in [*stream.encode(out), *stream.encode(None)]:
            container.mux(packet)
    return buffer.getvalue()


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
        for name in CONDITIONS:
            if name != AS_IT_IS:
                local = analyse(decode_audio(io.BytesIO(call_recording(waveform, *CHANNELS[name]))))
            else:
                local = analyse(waveform)
            cells = []
            for hinted in (False, True):
                n = fixture.ref_speakers if hinted else None
                result = decide(local, n or 1, n)
                turns = [(t.speaker, t.start, t.end) for t in result.turns]
                counts.setdefault((name, hinted), {})[fixture.stem] = der_counts(fixture.turns, turns, 0.5)
                found = len({speaker for speaker, _, _ in turns})
                cells.append(f"{fmt(pooled_rate([counts[(name, hinted)][fixture.stem]]))} ({found})")
            row.append(" / ".join(cells))
        rows.append(row)
        print(f"  {fixture.stem}: done", flush=True)
    for group, label in ((True, "pooled AMI"), (False, "pooled others")):
        rows.append([label, "", ""] + [
            f"{fmt(_pooled(counts[(name, False)], group))} / {fmt(_pooled(counts[(name, True)], group))}"
            for name in CONDITIONS])
    print()
    print(table(["file", "energy above 4.2 kHz dB", "speakers",
                 *[f"{name}: DER % (speakers), no hint / told the count" for name in CONDITIONS]], rows))


def _pooled(by_file: dict[str, tuple[float, float]], ami: bool) -> float:
    return pooled_rate(c for stem, c in by_file.items() if stem.startswith(AMI_PREFIX) == ami)


if __name__ == "__main__":
    main()
