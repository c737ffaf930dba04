"""Whether another speaker talks over a segment: its `overlap`, as the transcriber marks it and
as a correction by hand marks it again (a segment given to another speaker, or its words
retimed), from the diarizer's turns (with multichannel, every channel's)."""

from __future__ import annotations

from common.messages import SpeakerTurn, Word

# A word is talked over when another speaker's turn covers this much of it.
OVERLAP_MIN_S = 0.1


def word_talked_over(word: Word, speaker: str, turns: list[SpeakerTurn]) -> bool:
    """Whether, inside the word, another speaker's turn runs at the same time as one of its own
    speaker's. Not merely another turn under the word: word times are often a little off the
    turns', and a word across a hand-over is no one talking over anyone."""
    needed = max(1e-3, min(OVERLAP_MIN_S, (word.end - word.start) / 2))
    own = [(max(word.start, t.start), min(word.end, t.end)) for t in turns
           if t.speaker == speaker and min(word.end, t.end) > max(word.start, t.start)]
    # No turn of its own speaker under the word (given by the nearest turn: another channel's
    # talk, or speech the diarizer missed; or given to this speaker by hand): the word's own time
    # counts.
    own = own or [(word.start, word.end)]
    return any(t.speaker != speaker and min(end, t.end) - max(start, t.start) >= needed
               for t in turns for start, end in own)


def talked_over(words: list[Word], speaker: str, turns: list[SpeakerTurn]) -> bool:
    """A segment's `overlap`: another speaker talks over some of `speaker`'s words."""
    return any(word_talked_over(word, speaker, turns) for word in words)
