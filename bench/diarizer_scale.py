"""python -m bench.diarizer_scale: the offline diarizer on recordings longer than a clip.

Who spoke when: the fixtures laid end to end, scored against their references with the AMI
speakers who recur across clips counted as the same person: every fixture once (27 people in
6 minutes, 13 rooms), ami_dev00 + ami_dev01 repeated to 5 minutes (the same 2 people), and
ami_trn07 + ami_trn08 repeated (the same 4 people). Prints speakers found and DER.

Time and memory: recordings of each asked length made by laying the nine AMI clips end to end,
and one voice talking without pauses (the English half of multilingual.mp3 repeated: every
window then holds 10 s of one speaker, the CAM++ model's largest inputs); wall time, real-time
factor, the process's peak resident memory above what it held before (the audio itself is
decoded before the clock starts) and in all (models, audio and what the runs before left
allocated), and the speakers found.

    python -m bench.diarizer_scale [--minutes 10 60] [--one-voice-minutes 10] [--fixtures DIR]
"""

from __future__ import annotations

import argparse
import re
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import DEFAULT_FIXTURES, concatenate, der, load_fixture, load_fixtures, table

AMI = ("ami_dev00", "ami_dev01", "ami_trn03", "ami_trn04", "ami_trn05", "ami_trn06", "ami_trn07",
       "ami_trn08", "ami_trn09")


class PeakRss:
    """Samples this process's RSS every 50 ms while running."""

    def __init__(self) -> None:
        import psutil

        self.process = psutil.Process()
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self.start = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _person(label: str) -> str:
    """`<file>:<speaker>` -> the AMI participant id when it is one (they recur across clips)."""
    speaker = label.split(":", 1)[1]
    return speaker if re.match(r"^[MF][EO][EO]\d+$", speaker) else label


def quality(fixtures_dir: Path) -> list[list[str]]:
    from services.diarizer.offline import diarize_offline

    every = load_fixtures(fixtures_dir)
    cases = {
        "every fixture once": concatenate(every, sum(1 for _ in every) * 26.0),
        "ami_dev00 + ami_dev01, 5 min": concatenate(
            [load_fixture(fixtures_dir / f"{s}.wav") for s in ("ami_dev00", "ami_dev01")], 290.0),
        "ami_trn07 + ami_trn08, 5 min": concatenate(
            [load_fixture(fixtures_dir / f"{s}.wav") for s in ("ami_trn07", "ami_trn08")], 290.0),
    }
    rows = []
    for name, case in cases.items():
        reference = [(_person(s), a, b) for s, a, b in case.turns]
        result = diarize_offline(case.audio)
        hypothesis = [(t.speaker, t.start, t.end) for t in result.turns]
        rows.append([name, f"{case.duration / 60:.1f}", str(len({s for s, _, _ in reference})),
                     str(len({s for s, _, _ in hypothesis})), f"{100 * der(reference, hypothesis, 0.5):.1f}",
                     f"{100 * der(reference, hypothesis, 0.0):.1f}"])
        print(f"  {name} done", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, nargs="+", default=[10.0, 60.0])
    parser.add_argument("--one-voice-minutes", type=float, nargs="*", default=[10.0])
    parser.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES)
    args = parser.parse_args()

    from common.audio import decode_audio
    from services.diarizer.offline import diarize_offline, load_offline_models

    load_offline_models()
    quality_rows = quality(args.fixtures)
    clips = [decode_audio(str(args.fixtures / f"{stem}.wav")) for stem in AMI]
    diarize_offline(clips[0])  # warm up
    one_voice = [decode_audio(str(args.fixtures / "multilingual.mp3"))[: 29 * 16_000]]
    cases = [(f"{m:g} min of AMI clips", m, clips) for m in args.minutes]
    cases += [(f"{m:g} min of one voice", m, one_voice) for m in args.one_voice_minutes]
    rows = []
    for name, minutes, pieces in cases:
        samples = int(minutes * 60 * 16_000)
        tiled = np.concatenate(pieces * (samples // sum(len(c) for c in pieces) + 1))[:samples]
        with PeakRss() as rss:
            started = time.perf_counter()
            result = diarize_offline(tiled)
            wall = time.perf_counter() - started
        rows.append([name, f"{wall:.1f}", f"{wall / (minutes * 60):.3f}",
                     f"{(rss.peak - rss.start) / 2**20:.0f}", f"{rss.peak / 2**20:.0f}", f"{tiled.nbytes / 2**20:.0f}",
                     str(len({t.speaker for t in result.turns})), str(len(result.turns))])
        print(f"  {name} done in {wall:.1f} s", flush=True)
        del tiled, result
    print()
    print(table(["recording", "min", "people", "speakers found", "DER±.25 %", "DER@0 %"], quality_rows))
    print()
    print(table(["audio", "wall s", "RTF", "peak RSS growth MB", "peak RSS MB", "audio itself MB", "speakers",
                 "turns"], rows))


if __name__ == "__main__":
    main()
