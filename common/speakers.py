"""Recognising enrolled voices: which of a recording's speakers is which enrolled person.

A recording speaker is scored against a profile by the best cosine similarity between its
centroid (the diarizer's mean voice embedding) and any of the profile's voiceprints. Names are
one to one (one profile names at most one speaker of a recording) and stable: the pairs are taken
from the most alike down, so each person goes to the most alike speaker not already given a closer
match, and a clear match is never given up for two marginal ones."""

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
    candidates = [s for s in recording if s.speech_s >= min_speech_s]
    scores = similarities(candidates, profiles)
    if scores.size == 0:
        return {}
    # A stable matching: pairs at or over the threshold, most alike first (ties in speaker, then
    # profile order), each speaker and each profile taken once. A person goes to the speaker that
    # sounds most like them among those still unnamed, so a clear match is never traded for two
    # marginal ones (a sum of margins would give a speaker at 0.90 its second choice at 0.75 to
    # name another at 0.76), and forgetting a person no speaker got changes no other name.
    matches: dict[str, Match] = {}
    named: set[int] = set()
    order = np.argsort(-scores, axis=None, kind="stable")
    for i, j in zip(*(axis.tolist() for axis in np.unravel_index(order, scores.shape))):
        if scores[i, j] < threshold:
            break
        label = candidates[i].label
        if label in matches or j in named:
            continue
        matches[label] = Match(profiles[j].speaker_id, profiles[j].name, round(float(scores[i, j]), 4))
        named.add(j)
    return matches


def most_alike(embedding: np.ndarray, profiles: list[Profile], threshold: float) -> tuple[Profile, float] | None:
    """The profile the voice scores highest for, as the matching scores a recording speaker
    (its best voiceprint), when that score is at least `threshold`: a voice the matching could
    give that person's name."""
    scores = similarities([RecordingSpeaker("", np.asarray(embedding), 0.0)], profiles)[0]
    if not profiles or scores.max() < threshold:
        return None
    best = int(scores.argmax())
    return profiles[best], round(float(scores[best]), 4)
