"""Replacing spans of a segment's text while keeping its words in step: the words a span covers
become one word over their time, holding the replacement (and whatever the first and last of them
held outside the span: a space, punctuation). Redaction and custom spelling both work so."""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable
from itertools import accumulate

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
# Another speaker's word goes on the same text (see _across_speakers) only where the two talk over
# each other: it overlaps the words before it or starts less than this after them. A reply after
# a pause ("It started in 2019." "2020, I think.") is something else said.
OVERLAP_GAP_S = 0.3


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


def rewrite(segments: list[Segment], find: Finder, across_speakers: bool = False) -> list[Segment]:
    """Segments with what `find` finds replaced in their words and text. One speaker's segments
    less than JOIN_GAP_S apart are searched as one text, also with another speaker's segments
    between them (an "Okay." from the other side of a call in the middle of a phone number): a
    number said across a pause that cut the segment there is found whole, and its word stays in
    the segment it starts in (which then ends with it). With `across_speakers`, everyone's words
    are searched too, in the order said: see _across_speakers."""
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
    # What to replace in each run of words' text.
    found = {n: find("".join(w.word for p in run for w in segments[p].words))
             for n, run in enumerate(runs) if segments[run[0]].words}
    if across_speakers:
        _across_speakers(segments, runs, found, find)
    rewritten: dict[int, Segment] = {}
    for n, run in enumerate(runs):
        mine = [segments[position] for position in run]
        if not mine[0].words:
            rewritten.update((p, s.model_copy(update={"text": rewrite_text(s.text, find)})) for p, s in zip(run, mine))
            continue
        owner = [n for n, segment in enumerate(mine) for _ in segment.words]
        kept: list[list[Word]] = [[] for _ in mine]
        for first, word in _rewritten([w for s in mine for w in s.words], lambda _, spans=found[n]: spans):
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


def _covered(bounds: list[int], start: int, end: int) -> tuple[int, int]:
    """[first, last) of the words (their text from bounds[i] to bounds[i + 1]) that a span covers."""
    return bisect_right(bounds, start) - 1, bisect_left(bounds, end)


def _across_speakers(segments: list[Segment], runs: list[list[int]], found: dict[int, Replacements],
                     find: Finder) -> None:
    """Adds to `found` (each run's spans, in its text) what `find` finds in everyone's words in
    the order said (a word less than JOIN_GAP_S after the same speaker's talk before it goes on
    the same text, another speaker's word only where it overlaps the talk before it or starts
    less than OVERLAP_GAP_S after it) where the words found went to two speakers or more: where
    people talk over each other, one number's words can be given some to one speaker, some to
    the other. Each speaker's part of it becomes one word in the segment that holds it (one also
    where another speaker's word came between two of its words). What a speaker's own search found is not taken
    into a longer match with another speaker's words around it (A's "555 1234" and B's "12" said
    after it are two things said), only one that fills the words of another speaker said in
    between ("555", "123", "4567" given to A, B, A: A's search saw "555 4567"); that one then
    stands instead of the own spans it covers, and those on its words that it does not cover stay
    ("9" of A's "9:30" where it is "30" and B's "555 1234"); one it covers only in part keeps it
    out ("089/" of A's "089/1234567" where it is "1234567" and B's "1234567")."""
    Place = tuple[int, int]  # a word: (segment, its index there)
    where: dict[Place, tuple[int, int]] = {}  # each word's run and its start in the run's text
    texts: dict[int, str] = {}
    taken: dict[Place, set[tuple[int, int]]] = {}  # the run's own spans (run, which) covering each word
    own: dict[tuple[int, int], list[Place]] = {}  # each such span's words
    for n, spans in found.items():
        places = [(p, k) for p in runs[n] for k in range(len(segments[p].words))]
        bounds = list(accumulate((len(segments[p].words[k].word) for p, k in places), initial=0))
        texts[n] = "".join(segments[p].words[k].word for p, k in places)
        where.update((place, (n, bound)) for place, bound in zip(places, bounds))
        for i, (start, end, _) in enumerate(spans):
            first, last = _covered(bounds, start, end)
            own[n, i] = places[first:last]
            for place in places[first:last]:
                taken.setdefault(place, set()).add((n, i))
    order = sorted((segments[p].words[k].start, p, k) for p, k in where)
    pieces: list[list[Place]] = []
    reach = 0.0
    for start, p, k in order:
        # One speaker's next word goes on as in their own search; another speaker's only where
        # they talk over each other.
        same = bool(pieces) and segments[pieces[-1][-1][0]].speaker == segments[p].speaker
        if pieces and start - reach < (JOIN_GAP_S if same else OVERLAP_GAP_S):
            pieces[-1].append((p, k))
            reach = max(reach, segments[p].words[k].end)
        else:
            pieces.append([(p, k)])
            reach = segments[p].words[k].end
    dropped: set[tuple[int, int]] = set()
    added: dict[int, Replacements] = {}
    for piece in pieces:
        if len({segments[p].speaker for p, _ in piece}) < 2:
            continue
        word = {place: segments[place[0]].words[place[1]] for place in piece}
        bounds = list(accumulate((len(word[place].word) for place in piece), initial=0))
        for start, end, replacement in find("".join(word[place].word for place in piece)):
            first, last = _covered(bounds, start, end)
            covered = piece[first:last]
            if len({segments[p].speaker for p, _ in covered}) < 2:
                continue  # one speaker's own: their own search has it
            touched = {span for place in covered for span in taken.get(place, ())}
            if touched:
                theirs = {place for span in touched for place in own[span]}
                # A speaker's own match may hold words outside this piece (said after a pause
                # longer than OVERLAP_GAP_S, or after a word of another speaker): their times come
                # from the segments, not from the piece's words.
                extents = [(min(segments[p].words[k].start for p, k in own[span]),
                            max(segments[p].words[k].end for p, k in own[span])) for span in touched]
                if not theirs <= set(covered) or any(
                        place not in theirs and not any(a <= (word[place].start + word[place].end) / 2 <= b
                                                        for a, b in extents) for place in covered):
                    continue
            parts: list[list[int]] = []  # [run, segment, word, start, end]: the words of one segment in a row
            latest: dict[int, list[int]] = {}  # each segment's latest part
            for i, (p, k) in enumerate(covered, start=first):
                n, at = where[p, k]
                low, high = at + max(start - bounds[i], 0), at + min(end, bounds[i + 1]) - bounds[i]
                part = latest.get(p)
                # A segment's words next to each other make one part, also where another
                # speaker's word was said between them (A, B, A over each other): one label.
                if part is not None and part[2] == k - 1 and part[4] == at == low:
                    part[2], part[4] = k, high
                else:
                    latest[p] = [n, p, k, low, high]
                    parts.append(latest[p])
            # Of the speakers' own spans on its words, only those it covers give way to it: A's
            # "9" in "9:30" stays a number where the match is "30 555 1234".
            overlapped = {(n, i) for n, i in touched if any(
                m == n and found[n][i][0] < high and low < found[n][i][1] for m, _, _, low, high in parts)}
            # Where it covers one of them only in part, that one stays and the match is not taken:
            # A's phone number "089/1234567" and B's "1234567" said over its end make the card
            # "1234567 1234567", which in its place would leave A's "089/" in clear.
            if any(not all(any(m == n and low <= c < high for m, _, _, low, high in parts)
                           for c in range(found[n][i][0], found[n][i][1])) for n, i in overlapped):
                continue
            dropped |= overlapped
            for n, _, _, low, high in parts:
                said = texts[n][low:high]
                # A part keeps the space before it (the other speaker's part ended there).
                low, high = low + len(said) - len(said.lstrip()), high - len(said) + len(said.rstrip())
                if high > low:
                    added.setdefault(n, []).append((low, high, replacement))
    for n in found:
        found[n] = sorted([span for i, span in enumerate(found[n]) if (n, i) not in dropped] + added.get(n, []))
