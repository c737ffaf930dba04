"""Recognising enrolled voices: which of a recording's speakers is which enrolled person.

A recording speaker is scored against a profile by the best cosine similarity between its
centroid (the diarizer's mean voice embedding) and any of the profile's voiceprints. Names are
an assignment, not a greedy pick: one profile names at most one speaker of a recording, in the
pairing that maximises the summed margin of similarity over the threshold."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RecordingSpeaker:
    label: str
    embedding: np.ndarray
    speech_s: float


@dataclass(frozen=True)
class Profile:
    speaker_id: int
    name: str
    voiceprints: list[np.ndarray]


@dataclass(frozen=True)
class Match:
    speaker_id: int
    name: str
    confidence: float


def _unit(rows: list[np.ndarray]) -> np.ndarray:
    matrix = np.asarray(rows, dtype=np.float64)
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)


def similarities(recording: list[RecordingSpeaker], profiles: list[Profile]) -> np.ndarray:
    """(speakers, profiles): the best cosine similarity of each speaker to any voiceprint of each profile."""
    scores = np.full((len(recording), len(profiles)), -1.0)
    if not recording or not profiles:
        return scores
    speakers = _unit([s.embedding for s in recording])
    for j, profile in enumerate(profiles):
        if profile.voiceprints:
            scores[:, j] = (speakers @ _unit(profile.voiceprints).T).max(axis=1)
    return scores


def match_speakers(recording: list[RecordingSpeaker], profiles: list[Profile], threshold: float,
                   min_speech_s: float) -> dict[str, Match]:
    """label -> the enrolled speaker it is, for the speakers recognised; the others are left out.
    A speaker with less than `min_speech_s` of speech has too noisy a centroid to be named."""
    from scipy.optimize import linear_sum_assignment

    candidates = [s for s in recording if s.speech_s >= min_speech_s]
    scores = similarities(candidates, profiles)
    if scores.size == 0:
        return {}
    # Maximise the summed margin over the threshold: a pair under it gains nothing (and is dropped
    # below), so a clear match is never traded for two marginal ones.
    rows, cols = linear_sum_assignment(-np.maximum(scores - threshold, 0.0))
    return {candidates[i].label: Match(profiles[j].speaker_id, profiles[j].name, round(float(scores[i, j]), 4))
            for i, j in zip(rows, cols) if scores[i, j] >= threshold}


def most_alike(embedding: np.ndarray, profiles: list[Profile], threshold: float) -> tuple[Profile, float] | None:
    """The profile the voice scores highest for, as the matching scores a recording speaker
    (its best voiceprint), when that score is at least `threshold`: a voice the matching could
    give that person's name."""
    scores = similarities([RecordingSpeaker("", np.asarray(embedding), 0.0)], profiles)[0]
    if not profiles or scores.max() < threshold:
        return None
    best = int(scores.argmax())
    return profiles[best], round(float(scores[best]), 4)
