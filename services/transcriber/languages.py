"""Which language is spoken where: once per job, or per passage when a recording switches.

A passage is one speaker's run of turns (closer than PASSAGE_GAP_S): people switch language
between turns far more than inside one. Whisper's language identification needs a few seconds
of speech: on the AMI clips (all English, many non-native speakers) every passage it put in
another language (Polish, Welsh, German) was 2.2 s or shorter, so shorter passages take the
language of the same speaker's nearest identified passage instead."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from common.audio import SAMPLE_RATE
from common.messages import SpeakerTurn, TimeSpan

log = logging.getLogger(__name__)

IDENTIFY_MIN_S = 3.0
PASSAGE_GAP_S = 1.0
# Whisper identifies a language from one 30 s window.
WINDOW_S = 30.0


def detect_language(model, speech: np.ndarray, among: list[str] | None = None) -> str | None:
    """The most likely language of `speech` (at least half a second), among `among` if given;
    English for an English-only model (`medium.en`), which cannot identify languages at all."""
    if not getattr(getattr(model, "model", None), "is_multilingual", True):
        return "en"
    if speech.size < SAMPLE_RATE // 2:
        return None
    language, probability, ranked = model.detect_language(speech[:int(WINDOW_S * SAMPLE_RATE)])
    if among is not None:
        language, probability = best_among(ranked, among)
    log.debug("detected language %s (p=%.2f) in %.1f s of speech", language, probability, speech.size / SAMPLE_RATE)
    return language


def best_among(ranked: list[tuple[str, float]], among: list[str]) -> tuple[str, float]:
    """The most likely of the languages `among`, from Whisper's (code, probability) for every
    language the model knows. A model without Cantonese (all before large-v3) hears it as
    Chinese, and transcribes a job in `yue` as zh: there Cantonese is as likely as Chinese."""
    if "yue" in among and all(code != "yue" for code, _ in ranked):
        ranked = [*ranked, *(("yue", p) for code, p in ranked if code == "zh")]
    allowed = set(among)
    return max(((code, p) for code, p in ranked if code in allowed), key=lambda pair: pair[1],
               default=(among[0], 0.0))


@dataclass
class Passage:
    start: float
    end: float
    speaker: str
    language: str | None = None


def passages(turns: list[SpeakerTurn], offset: float, length_s: float) -> list[Passage]:
    """Each speaker's runs of turns, in chunk time (the chunk starts at `offset` in the job)."""
    runs: list[Passage] = []
    for turn in sorted(turns, key=lambda t: t.start):
        start, end = max(0.0, turn.start - offset), min(length_s, turn.end - offset)
        if end <= start:
            continue
        if runs and runs[-1].speaker == turn.speaker and start - runs[-1].end < PASSAGE_GAP_S:
            runs[-1].end = max(runs[-1].end, end)
        else:
            runs.append(Passage(start, end, turn.speaker))
    return runs


def identify(model, samples: Callable[[float, float], np.ndarray], runs: list[Passage], among: list[str],
             fallback: str | None) -> None:
    """Sets each passage's language: identified on passages of IDENTIFY_MIN_S or more (their
    audio from `samples(start, end)`, in the chunk's seconds), else the language of the same
    speaker's nearest identified passage, else of the nearest one, else `fallback` (the job's)."""
    for run in runs:
        if run.end - run.start >= IDENTIFY_MIN_S:
            run.language = detect_language(model, samples(run.start, run.end), among)
    known = [run for run in runs if run.language]
    for run in runs:
        if run.language is None:
            same_voice = [k for k in known if k.speaker == run.speaker] or known
            nearest = min(same_voice, key=lambda k: abs((k.start + k.end) - (run.start + run.end)), default=None)
            run.language = nearest.language if nearest else fallback
    spoken = Counter(run.language for run in runs)
    log.info("passages by language: %s (%d identified)", ", ".join(f"{code} {n}" for code, n in spoken.most_common()),
             len(known))


def language_spans(runs: list[Passage], length_s: float, margin_s: float) -> list[tuple[TimeSpan, str | None]]:
    """The chunk (0 to `length_s`) cut where the language changes, each piece with its
    language. A cut lies `margin_s` before the passage in the new language starts, so that its
    first word is heard whole; where the talk before ends nearer than that, halfway between the
    two (the last word before is heard whole too), and where it goes on, at the new passage's
    start. A passage within the time of the one before goes with it."""
    cuts: list[tuple[float, str | None]] = []
    reach = 0.0
    for run in sorted(runs, key=lambda r: r.start):
        if not cuts:
            cuts.append((0.0, run.language))
        elif run.language != cuts[-1][1] and run.end > reach:
            cut = min(max(run.start - margin_s, (reach + run.start) / 2), run.start)
            cuts.append((max(cut, cuts[-1][0]), run.language))
        reach = max(reach, run.end)
    ends = [start for start, _ in cuts[1:]] + [length_s]
    return [(TimeSpan(start=start, end=end), language) for (start, language), end in zip(cuts, ends) if end > start]
