"""A voiceprint from an enrolment sample: the voice of the one person talking in it.

The sample is diarized like any recording; its voiceprint is its main speaker's voice (CAM++ over
up to a minute of that speaker's lone speech, the same kind of embedding the diarizer keeps per
recording speaker, so the two compare). A sample with too little speech, or with a second voice
that talks for a real share of it and does not sound like the first, is refused with the reason."""

from __future__ import annotations

import numpy as np

from common.messages import SpeakerEmbedding
from common.turns import speech_regions
from services.diarizer.offline import Diarization, diarize_offline

MIN_SPEECH_S = 3.0
# A second voice counts when it talks for at least this share of the main voice's time (and a
# second): shorter ones are a cough or a word from someone passing by.
SECOND_VOICE_SHARE = 0.2


class NotOneVoice(ValueError):
    """The sample cannot give one person's voiceprint; the message says why."""


def _speech_s(diarization: Diarization, labels: set[str]) -> float:
    return sum(r.end - r.start for r in speech_regions([t for t in diarization.turns if t.speaker in labels]))


def main_voice(diarization: Diarization, same_voice_similarity: float) -> SpeakerEmbedding:
    """The voice of the one person talking in a diarized sample. Speakers at least
    `same_voice_similarity` alike to the main one are that person split by the diarizer: their
    speech counts as the main voice's (the returned speech_s is all of it; the voice is the main
    speaker's). A speaker with no voice (never talking alone for half a second) cannot be
    compared, so it is a second voice when it talks long enough to count."""
    speakers = sorted(diarization.speakers, key=lambda s: -s.speech_s)
    if not speakers:
        # Speech too short for a voice (under half a second of anyone talking alone) has turns
        # but no speaker with a voice: its time is what the sample holds.
        found = _speech_s(diarization, {t.speaker for t in diarization.turns})
        alone = ", none of it one person talking alone for long enough" if found else ""
        raise NotOneVoice(f"the sample holds {found:.1f} s of speech{alone}; at least {MIN_SPEECH_S:g} s of one"
                          " person talking is needed")
    main = speakers[0]
    same = {s.speaker for s in speakers if float(np.dot(s.embedding, main.embedding)) >= same_voice_similarity}
    main_s = _speech_s(diarization, same | {main.speaker})
    if main_s < MIN_SPEECH_S:
        raise NotOneVoice(f"the sample holds {main_s:.1f} s of speech; at least {MIN_SPEECH_S:g} s of one"
                          " person talking is needed")
    without_voice = sorted({t.speaker for t in diarization.turns} - {s.speaker for s in speakers})
    talk = [s.speech_s for s in speakers if s.speaker not in same]
    talk += [_speech_s(diarization, {label}) for label in without_voice]
    others = [seconds for seconds in talk if seconds >= max(1.0, SECOND_VOICE_SHARE * main_s)]
    if others:
        times = ", ".join(f"{seconds:.1f} s" for seconds in [main_s, *others])
        raise NotOneVoice(f"the sample holds {len(others) + 1} voices ({times} of speech): enrol one person"
                          " talking alone")
    return main.model_copy(update={"speech_s": round(main_s, 3)})


def voiceprint_of_sample(waveform: np.ndarray, same_voice_similarity: float) -> SpeakerEmbedding:
    """The sample's main voice. `same_voice_similarity` is the matching threshold: a "second
    speaker" at least that similar to the first is the same person split by the diarizer."""
    return main_voice(diarize_offline(waveform), same_voice_similarity)
