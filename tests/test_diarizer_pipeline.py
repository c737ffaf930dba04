"""The diarizer's backend-independent steps (services/diarizer/pipeline.py): how talk longer than
a chunk is cut, and how a backend's turns are cleaned up before they are handed on. No models."""

from __future__ import annotations

import numpy as np

from common.audio import SAMPLE_RATE
from common.messages import JobOptions, SpeakerTurn
from common.turns import speech_regions
from services.diarizer.pipeline import plan_chunks


def turn(speaker: str, start: float, end: float) -> SpeakerTurn:
    return SpeakerTurn(speaker=speaker, start=start, end=end)


def spans(chunks) -> list[tuple[float, float]]:
    return [(span.start, span.end) for span, _ in chunks]


def longest_speech(chunks) -> float:
    return max(sum(r.end - r.start for r in speech_regions(group)) for _, group in chunks)


def test_talk_longer_than_a_chunk_is_cut_where_one_speaker_hands_over_near_the_middle():
    """Two people talking without a pause between them for 330 s, with chunks of at most 200 s:
    the cut was at the halfway point (165 s), 15 s into the second person's turn; the hand-over
    at 150-150.2 s is within a fifth of a part of it, so the cut goes there, where the first
    person stops, and their turn stays whole in one chunk."""
    turns = [turn("spk_0", 0, 150.2), turn("spk_1", 150, 330)]
    chunks = plan_chunks(turns, 330.0, max_speech_s=200)
    assert spans(chunks) == [(0.0, 150.2), (150.2, 330.0)]
    assert [(t.speaker, t.start, t.end) for t in chunks[0][1]] == [("spk_0", 0, 150.2), ("spk_1", 150, 150.2)]
    assert [(t.speaker, t.start, t.end) for t in chunks[1][1]] == [("spk_1", 150.2, 330)]
    # Three parts, two hand-overs each near a third of the way: one cut at each.
    three = [turn("spk_0", 0, 95.1), turn("spk_1", 95, 205.3), turn("spk_0", 205, 330)]
    assert spans(plan_chunks(three, 330.0, max_speech_s=130)) == [(0.0, 95.1), (95.1, 205.3), (205.3, 330.0)]


def test_a_word_said_into_someones_talk_or_a_far_hand_over_does_not_move_the_cut():
    """A word said into a longer turn is no hand-over (the turn goes on across it); a hand-over
    further than a fifth of a part from the equal cut is out of reach; and a cut never makes a
    part longer than the limit, however near a hand-over is."""
    interjection = [turn("spk_0", 0, 330), turn("spk_1", 160, 161)]
    assert spans(plan_chunks(interjection, 330.0, max_speech_s=200)) == [(0.0, 165.0), (165.0, 330.0)]
    far = [turn("spk_0", 0, 120.2), turn("spk_1", 120, 330)]  # 45 s from 165, a fifth of a part is 33 s
    assert spans(plan_chunks(far, 330.0, max_speech_s=200)) == [(0.0, 165.0), (165.0, 330.0)]
    full = [turn("spk_0", 0, 230.2), turn("spk_1", 230, 400)]  # two parts of exactly the limit
    chunks = plan_chunks(full, 400.0, max_speech_s=200)
    assert spans(chunks) == [(0.0, 200.0), (200.0, 400.0)] and longest_speech(chunks) <= 200


def test_talk_with_no_hand_over_near_the_cut_is_cut_at_its_quietest_instant_when_the_audio_is_given():
    from services.diarizer.pipeline import quietest_instant

    audio = np.random.default_rng(0).normal(0.0, 0.1, 33 * SAMPLE_RATE).astype(np.float32)
    audio[int(18.0 * SAMPLE_RATE):int(18.3 * SAMPLE_RATE)] *= 0.01  # a breath 1.5 s after the halfway point
    monologue = [turn("spk_0", 0, 33)]
    [(first, _), (second, _)] = plan_chunks(monologue, 33.0, 20, quietest=quietest_instant(audio))
    assert 18.05 <= first.end <= 18.25 and second.start == first.end
    # Without the audio, or with the quiet place beyond reach (3.3 s), at the halfway point.
    assert spans(plan_chunks(monologue, 33.0, 20)) == [(0.0, 16.5), (16.5, 33.0)]
    audio[int(18.0 * SAMPLE_RATE):int(18.3 * SAMPLE_RATE)] *= 100
    audio[int(22.0 * SAMPLE_RATE):int(22.3 * SAMPLE_RATE)] *= 0.01
    [(first, _), _] = plan_chunks(monologue, 33.0, 20, quietest=quietest_instant(audio))
    assert 13.2 <= first.end <= 19.8 and not 21.9 <= first.end <= 22.4


def test_a_backends_turns_are_clipped_to_the_audio_and_empty_ones_dropped():
    """pyannote can give a turn past the end of the audio, or one that rounds to an instant."""
    from services.diarizer.pipeline import clean_turns

    raw = [("SPEAKER_02", -0.01, 1.0), ("SPEAKER_00", 0.5, 2.0004), ("SPEAKER_01", 1.2, 1.2004),
           ("SPEAKER_00", 2.9, 3.4), ("SPEAKER_03", 3.05, 3.2)]
    turns, labels = clean_turns(raw, duration=3.0)
    assert [(t.speaker, t.start, t.end) for t in turns] == [("spk_0", 0.0, 1.0), ("spk_1", 0.5, 2.0),
                                                            ("spk_1", 2.9, 3.0)]
    assert labels == {"SPEAKER_02": "spk_0", "SPEAKER_00": "spk_1"}  # SPEAKER_01 and _03 have nothing left


def test_the_pyannote_path_cleans_its_turns_and_gives_nothing_for_audio_under_a_tenth_of_a_second():
    """pyannote.audio cannot run here: a pipeline stand-in returns what pyannote's would, a
    pyannote.core Annotation."""
    from pyannote.core import Annotation, Segment

    from services.diarizer.pipeline import pyannote_diarization

    annotation = Annotation()
    annotation[Segment(-0.02, 1.5), "a"] = "SPEAKER_01"
    annotation[Segment(1.4, 2.6), "b"] = "SPEAKER_00"
    annotation[Segment(1.9, 1.9004), "c"] = "SPEAKER_02"
    calls = []

    def pipeline(audio, hook, **hints):
        calls.append(audio["waveform"].shape)
        return annotation

    result = pyannote_diarization(pipeline, np.zeros(2 * SAMPLE_RATE, dtype=np.float32), JobOptions(), None, "m")
    assert [(t.speaker, t.start, t.end) for t in result.turns] == [("spk_0", 0.0, 1.5), ("spk_1", 1.4, 2.0)]
    assert result.speakers == []  # an Annotation alone carries no embeddings
    short = pyannote_diarization(pipeline, np.zeros(SAMPLE_RATE // 20, dtype=np.float32), JobOptions(), None, "m")
    assert short.turns == [] and short.speakers == [] and len(calls) == 1
