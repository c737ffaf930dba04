"""Recordings that switch language: `python -m bench.languages`.

Each recording is diarized once and transcribed as a job would be (bench.common's run_pipeline)
three ways: with the default (the language detected once, on the first 30 s of speech), with
`language=multi` (each speaker's passage in its own language, any Whisper knows) and with the
languages listed (`en,de,ru`). Printed side by side:

- the share of transcribed speech time (word by word) written in the language spoken there;
- cpWER where the fixtures have a transcript (the English dialogue followed by the Russian one);
- the transcriber's wall time.

Recordings: `multilingual.mp3` (English to 30.5 s, then German), `en_dialogue.wav` followed by
`ru_dialogue.wav`, and the nine AMI clips (English throughout, many non-native speakers: what
per-passage identification may get wrong on a recording in one language)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import (
    DEFAULT_FIXTURES,
    bench_settings,
    cpwer_counts,
    fmt,
    load_components,
    load_fixture,
    quiet_logs,
    run_pipeline,
    table,
)

MODES = {"detected once": None, "multi": "multi", "en,de,ru": "en,de,ru"}
AMI = [f"ami_dev0{i}" for i in range(2)] + [f"ami_trn0{i}" for i in range(3, 10)]


@dataclass
class Recording:
    name: str
    waveform: np.ndarray
    spoken: Callable[[float], str]  # the language spoken at a time
    reference: list[tuple[str, str]] | None = None  # (speaker, text) in time order


def recordings(fixtures_dir: Path) -> list[Recording]:
    from common.audio import SAMPLE_RATE, decode_audio

    english, russian = (load_fixture(fixtures_dir / f"{name}.wav") for name in ("en_dialogue", "ru_dialogue"))
    english_wave, russian_wave = decode_audio(str(english.path)), decode_audio(str(russian.path))
    switch_s = english_wave.size / SAMPLE_RATE
    reference = ([(f"en_{u.speaker}", u.text) for u in sorted(english.utterances, key=lambda u: u.start)]
                 + [(f"ru_{u.speaker}", u.text) for u in sorted(russian.utterances, key=lambda u: u.start)])
    return [
        Recording("multilingual.mp3", decode_audio(str(fixtures_dir / "multilingual.mp3")),
                  lambda t: "en" if t < 30.5 else "de"),
        Recording("en_dialogue + ru_dialogue", np.concatenate([english_wave, russian_wave]),
                  lambda t: "en" if t < switch_s else "ru", reference),
        Recording("AMI clips (9, English)", np.zeros(0, dtype=np.float32), lambda t: "en"),
    ]


def score(recording: Recording, result) -> tuple[float, float]:
    """Seconds of words written in the language spoken under them, and of all words."""
    right = total = 0.0
    for segment in result.segments:
        written = segment.language or result.language
        for word in segment.words:
            length = word.end - word.start
            total += length
            right += length * (written == recording.spoken((word.start + word.end) / 2))
    return right, total


def evaluate(fixtures_dir: Path) -> list[dict]:
    from common.audio import decode_audio
    from common.messages import JobOptions

    quiet_logs()
    settings = bench_settings()
    diarize, _, model = load_components(settings)
    rows = []
    for recording in recordings(fixtures_dir):
        parts = ([decode_audio(str(fixtures_dir / f"{name}.wav")) for name in AMI]
                 if recording.waveform.size == 0 else [recording.waveform])
        diarizations = [diarize(part, JobOptions()) for part in parts]
        for mode, language in MODES.items():
            options = JobOptions(language=language)
            right = total = seconds = 0.0
            errors = length = 0
            for part, diarization in zip(parts, diarizations):
                started = time.perf_counter()
                result = run_pipeline(part, diarize, model, settings, options, diarization=diarization)
                seconds += time.perf_counter() - started
                part_right, part_total = score(recording, result)
                right, total = right + part_right, total + part_total
                if recording.reference:
                    said = [(s.speaker, s.text) for s in sorted(result.segments, key=lambda s: s.start_ts)]
                    errors, length = cpwer_counts(recording.reference, said)
            rows.append({"recording": recording.name, "mode": mode, "right_language": right / total if total else None,
                         "cpwer": errors / length if length else None, "transcribe_s": seconds})
    return rows


def render(rows: list[dict]) -> str:
    return table(["recording", "language", "speech in the language spoken", "cpWER", "transcribe s"],
                 [[r["recording"], r["mode"], fmt(r["right_language"]), fmt(r["cpwer"]), fmt(r["transcribe_s"], "s")]
                  for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES, help="fixtures directory")
    args = parser.parse_args()
    started = time.perf_counter()
    print(render(evaluate(args.fixtures)))
    print(f"\nwall time {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
