"""Offline diarizer (silero-vad ONNX + resemblyzer + spectral clustering) on real fixtures.

DER bounds were measured (collar 0.5 s = +/-0.25 s) and set with a margin:
sample 1.2 %, en_dialogue 0.0 %, ru_dialogue 0.0 %.
"""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from common.messages import SpeakerTurn
from services.diarizer.offline import diarize_offline, load_offline_models

FIXTURES = Path("/work/shared/fixtures")


def load_wav(name: str) -> np.ndarray:
    audio, sr = sf.read(FIXTURES / name, dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if sr != 16000:
        from scipy.signal import resample_poly

        g = np.gcd(sr, 16000)
        audio = resample_poly(audio, 16000 // g, sr // g).astype(np.float32)
    return audio


def load_rttm(name: str):
    from pyannote.core import Annotation, Segment

    ref = Annotation(uri=name)
    for i, line in enumerate((FIXTURES / name).read_text().splitlines()):
        parts = line.split()
        if not parts or parts[0] != "SPEAKER":
            continue
        start, dur = float(parts[3]), float(parts[4])
        ref[Segment(start, start + dur), i] = parts[7]
    return ref


def der(turns: list[SpeakerTurn], rttm: str, collar: float = 0.5) -> float:
    from pyannote.core import Annotation, Segment
    from pyannote.metrics.diarization import DiarizationErrorRate

    hyp = Annotation(uri=rttm)
    for i, t in enumerate(turns):
        hyp[Segment(t.start, t.end), i] = t.speaker
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DiarizationErrorRate(collar=collar)(load_rttm(rttm), hyp)


def speakers(turns: list[SpeakerTurn]) -> set[str]:
    return {t.speaker for t in turns}


@pytest.fixture(scope="module")
def sample() -> np.ndarray:
    return load_wav("sample.wav")


@pytest.fixture(scope="module")
def sample_turns(sample) -> list[SpeakerTurn]:
    return diarize_offline(sample)


def assert_well_formed(turns: list[SpeakerTurn], duration: float) -> None:
    assert turns == sorted(turns, key=lambda t: t.start)
    for t in turns:
        assert 0.0 <= t.start < t.end <= duration + 1e-6
    for a, b in itertools.pairwise(turns):
        assert a.end <= b.start + 1e-9, "turns overlap"
        assert not (a.speaker == b.speaker and abs(a.end - b.start) < 1e-6), (
            "adjacent same-speaker turns not merged"
        )
    first_seen = list(dict.fromkeys(t.speaker for t in turns))
    assert first_seen == [f"spk_{i}" for i in range(len(first_seen))]


@pytest.mark.parametrize(
    ("name", "bound"), [("en_dialogue", 0.08), ("ru_dialogue", 0.08)]
)
def test_synthetic_dialogues_two_speakers_low_der(name, bound):
    audio = load_wav(f"{name}.wav")
    turns = diarize_offline(audio)
    assert_well_formed(turns, len(audio) / 16000)
    assert len(speakers(turns)) == 2
    assert der(turns, f"{name}.rttm") < bound


def test_sample_meeting(sample, sample_turns):
    assert_well_formed(sample_turns, len(sample) / 16000)
    assert len(speakers(sample_turns)) >= 2
    assert der(sample_turns, "sample.rttm") < 0.10
    # Speech covers the reference's 6.7 s .. 30 s, nothing much before it.
    assert sample_turns[0].start > 5.5
    assert sample_turns[-1].end > 29.0


def test_silence_gives_no_turns():
    assert diarize_offline(load_wav("empty.wav")) == []
    assert diarize_offline(np.zeros(16000 * 3, dtype=np.float32)) == []
    assert diarize_offline(np.zeros(0, dtype=np.float32)) == []


def test_num_speakers_is_honoured(sample):
    turns = diarize_offline(sample, num_speakers=3)
    assert_well_formed(turns, len(sample) / 16000)
    assert speakers(turns) == {"spk_0", "spk_1", "spk_2"}


def test_max_speakers_clamps(sample, sample_turns):
    turns = diarize_offline(sample, max_speakers=1)
    assert speakers(turns) == {"spk_0"}
    # One speaker: the turns are just the speech regions, covering what the 2-speaker run covers.
    covered = sum(t.end - t.start for t in turns)
    assert covered == pytest.approx(
        sum(t.end - t.start for t in sample_turns), abs=0.05
    )


def test_min_speakers_clamps():
    audio = load_wav("en_dialogue.wav")
    assert len(speakers(diarize_offline(audio, min_speakers=3))) == 3


def test_deterministic(sample, sample_turns):
    again = diarize_offline(sample)
    assert [t.model_dump() for t in again] == [t.model_dump() for t in sample_turns]


def test_models_load_once_and_work_from_a_thread(sample_turns, sample):
    import asyncio

    assert load_offline_models() is load_offline_models()
    turns = asyncio.run(asyncio.to_thread(diarize_offline, sample))
    assert turns == sample_turns
