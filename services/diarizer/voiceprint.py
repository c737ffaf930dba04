"""A voiceprint from an enrolment sample: the voice of the one person talking in it.

The sample is diarized like any recording; its voiceprint is the centroid of its main speaker
(the same kind of embedding the diarizer keeps per recording speaker, so the two compare). A
sample with too little speech, or with a second voice that talks for a real share of it and does
not sound like the first, is refused with the reason."""

from __future__ import annotations

import numpy as np

from common.messages import SpeakerEmbedding
from common.turns import speech_regions
from services.diarizer.offline import diarize_offline

MIN_SPEECH_S = 3.0
# A second voice counts when it talks for at least this share of the main voice's time (and a
# second): shorter ones are a cough or a word from someone passing by.
SECOND_VOICE_SHARE = 0.2


class NotOneVoice(ValueError):
    """The sample cannot give one person's voiceprint; the message says why."""


def voiceprint_of_sample(waveform: np.ndarray, same_voice_similarity: float) -> SpeakerEmbedding:
    """The sample's main voice. `same_voice_similarity` is the matching threshold: a "second
    speaker" at least that similar to the first is the same person split by the diarizer."""
    diarization = diarize_offline(waveform)
    speakers = sorted(diarization.speakers, key=lambda s: -s.speech_s)
    if not speakers or speakers[0].speech_s < MIN_SPEECH_S:
        # Speech too short for a voice (under half a second of anyone talking alone) has turns
        # but no speaker with a voice: its time is what the sample holds.
        found = speakers[0].speech_s if speakers else sum(r.end - r.start for r in speech_regions(diarization.turns))
        alone = "" if speakers or not found else ", none of it one person talking alone for long enough"
        raise NotOneVoice(f"the sample holds {found:.1f} s of speech{alone}; at least {MIN_SPEECH_S:g} s of one"
                          " person talking is needed")
    main = speakers[0]
    others = [s for s in speakers[1:]
              if s.speech_s >= max(1.0, SECOND_VOICE_SHARE * main.speech_s)
              and float(np.dot(s.embedding, main.embedding)) < same_voice_similarity]
    if others:
        talk = ", ".join(f"{s.speech_s:.1f} s" for s in [main, *others])
        raise NotOneVoice(f"the sample holds {len(others) + 1} voices ({talk} of speech): enrol one person"
                          " talking alone")
    return main
