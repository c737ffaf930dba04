"""Replacing spans of a segment's text while keeping its words in step: the words a span covers
become one word over their time, holding the replacement (and whatever the first and last of them
held outside the span: a space, punctuation). Redaction and custom spelling both work so."""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable

from common.messages import Segment, Word

# (start, end, replacement) in a text, in order, none overlapping.
Replacements = list[tuple[int, int, str]]
Finder = Callable[[str], Replacements]
# Scripts written without spaces between words (Chinese, Japanese kana, Thai, Lao, Myanmar,
# Khmer): a word, a number or an address written against one of their characters begins or ends
# there all the same.
UNSPACED = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff"
# A letter, digit or underscore of any other script: next to one, a word goes on.
SPACED_WORD_CHAR = f"[^\\W{UNSPACED}]"
# One speaker's segments this close are searched as one text (a number said with a pause in it);
# after a longer silence what follows is something else said.
JOIN_GAP_S = 3.0


def _rewritten(words: list[Word], find: Finder) -> list[tuple[int, Word]]:
    """The words with what `find` finds in their text replaced, each with the index of the first
    word it stands for. Spans within the same words ("9:30" is one word and two numbers) are
    replaced together in the one word that stands for them all."""
    text = "".join(w.word for w in words)
    starts, ends, position = [], [], 0
    for word in words:
        starts.append(position)
        position += len(word.word)
        ends.append(position)
    groups: list[tuple[int, int, Replacements]] = []  # [first, last) words and the spans in them
    for start, end, replacement in find(text):
        first, last = bisect_right(ends, start), bisect_left(starts, end)
        if first >= last:
            continue
        if groups and first < groups[-1][1]:
            groups[-1] = (groups[-1][0], max(last, groups[-1][1]), [*groups[-1][2], (start, end, replacement)])
        else:
            groups.append((first, last, [(start, end, replacement)]))
    out: list[tuple[int, Word]] = []
    i = 0
    for first, last, replacements in groups:
        out += [(k, words[k]) for k in range(i, first)]
        covered = words[first:last]
        offset = starts[first]
        piece = _replaced(text[offset:ends[last - 1]], [(s - offset, e - offset, r) for s, e, r in replacements])
        probabilities = [w.probability for w in covered if w.probability is not None]
        out.append((first, Word(word=piece, start=covered[0].start, end=covered[-1].end,
                                probability=min(probabilities) if probabilities else None)))
        i = last
    return out + [(k, words[k]) for k in range(i, len(words))]


def rewrite_words(words: list[Word], find: Finder) -> list[Word]:
    return [word for _, word in _rewritten(words, find)]


def _replaced(text: str, replacements: Replacements) -> str:
    for start, end, replacement in reversed(replacements):
        text = text[:start] + replacement + text[end:]
    return text


def rewrite_text(text: str, find: Finder) -> str:
    return _replaced(text, find(text))


def rewrite(segments: list[Segment], find: Finder) -> list[Segment]:
    """Segments with what `find` finds replaced in their words and text. One speaker's segments
    less than JOIN_GAP_S apart are searched as one text, also with another speaker's segments
    between them (an "Okay." from the other side of a call in the middle of a phone number): a
    number said across a pause that cut the segment there is found whole, and its word stays in
    the segment it starts in (which then ends with it)."""
    runs: list[list[int]] = []  # each run: the positions of its segments
    open_runs: dict[tuple[str, bool], list[int]] = {}  # the latest run of each speaker
    for position, segment in enumerate(segments):
        key = (segment.speaker, bool(segment.words))
        run = open_runs.get(key)
        if run is not None and segment.start_ts - segments[run[-1]].end_ts < JOIN_GAP_S:
            run.append(position)
        else:
            open_runs[key] = [position]
            runs.append(open_runs[key])
    rewritten: dict[int, Segment] = {}
    for run in runs:
        mine = [segments[position] for position in run]
        if not mine[0].words:
            rewritten.update((p, s.model_copy(update={"text": rewrite_text(s.text, find)})) for p, s in zip(run, mine))
            continue
        owner = [n for n, segment in enumerate(mine) for _ in segment.words]
        kept: list[list[Word]] = [[] for _ in mine]
        for first, word in _rewritten([w for s in mine for w in s.words], find):
            kept[owner[first]].append(word)
        for position, segment, words in zip(run, mine, kept, strict=True):
            if words:
                rewritten[position] = segment.model_copy(update={
                    "words": words, "text": "".join(w.word for w in words).strip(),
                    # It starts later when its first words went to the segment before.
                    "start_ts": segment.start_ts if words[0].start <= segment.words[0].start else words[0].start,
                    "end_ts": max(segment.end_ts, words[-1].end)})
    out = [rewritten[position] for position in range(len(segments)) if position in rewritten]
    return [s.model_copy(update={"index": n}) for n, s in enumerate(out)]
