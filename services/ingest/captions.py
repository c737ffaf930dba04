"""Subtitle cues from transcript segments: what fits on a screen at once.

A segment is one speaker's words until a pause or a change of speaker, up to 30 s: as a subtitle
that is a wall of text. With the words' times a segment is cut into cues of at most
`line_count` lines of `line_width` columns and MAX_CUE_S seconds, preferably after a sentence,
then after a clause, then at the longest pause. Widths are display columns: a Chinese or
Japanese character takes two, as on screen."""

from __future__ import annotations

import unicodedata
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from common.messages import Word

LINE_WIDTH = 42  # columns: the usual limit of broadcast and streaming subtitle guides
LINE_COUNT = 2
MAX_CUE_S = 7.0
MIN_CUE_S = 1.0
MIN_SHARE_MS = 1  # the least a cue lasts, where cues at one instant share the time after it
SENTENCE_ENDS = tuple(".?!…。？！")
CLAUSE_ENDS = tuple(",;:、，；：")
PAUSE_S = 0.3


class Captioned(Protocol):
    speaker: str
    speaker_name: str | None
    start_ts: float
    end_ts: float
    text: str
    words: list[Word] | None


@dataclass(frozen=True)
class Cue:
    start: float
    end: float
    speaker: str  # the name when there is one
    lines: list[str]


@dataclass(frozen=True)
class _Token:
    text: str  # the word with the space before it, if the text has one
    start: float
    end: float

    @property
    def columns(self) -> int:
        return columns(self.text)

    @property
    def bare_columns(self) -> int:
        """At the start of a line, where its space is dropped."""
        return self.columns - self.text.startswith(" ")


# Scripts written without spaces between words whose characters take one column: Thai, Lao,
# Myanmar, Khmer. A line may break between any two of their words, as between Chinese ones.
UNSPACED_SCRIPTS = ((0x0E00, 0x0EFF), (0x1000, 0x109F), (0x1780, 0x17FF))


def columns(text: str) -> int:
    """Display columns: two for a wide character, none for a mark that sits on the one before
    (Devanagari and Thai vowel signs, accents written apart, joiners and variation selectors)."""
    return sum(0 if unicodedata.category(c) in ("Mn", "Me", "Cf") else 2 if unicodedata.east_asian_width(c) in "WF"
               else 1 for c in text)


# Where letters of scripts written without spaces are: those above, and Chinese and Japanese
# (ideographs, 々 and 〇, kana, the prolonged sound mark, half-width katakana, bopomofo).
UNSPACED_LETTER_BLOCKS = UNSPACED_SCRIPTS + (
    (0x19E0, 0x19FF), (0xA9E0, 0xA9FF), (0xAA60, 0xAA7F),  # Khmer symbols, Myanmar extensions
    (0x3005, 0x3007), (0x3021, 0x3029), (0x3031, 0x3035), (0x3038, 0x303C), (0x3040, 0x30FF), (0x3100, 0x312F),
    (0x31A0, 0x31BF), (0x31F0, 0x31FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0xFF66, 0xFF9F),
    (0x1AFF0, 0x1B16F), (0x20000, 0x323AF))


def written_unspaced_letter(character: str) -> bool:
    """A letter (or digit, or mark) of Chinese, Japanese, Thai, Lao, Khmer or Myanmar, scripts
    written without spaces between words. Unlike written_with_spaces, not any wide character:
    an emoji or a full-width symbol is no letter of theirs, nor is Korean, written with spaces."""
    code = ord(character)
    return unicodedata.category(character)[0] in "LMN" and any(
        first <= code <= last for first, last in UNSPACED_LETTER_BLOCKS)


def written_with_spaces(character: str) -> bool:
    code = ord(character)
    return unicodedata.east_asian_width(character) not in "WF" and not any(
        first <= code <= last for first, last in UNSPACED_SCRIPTS)


# Thai and Lao vowels written before the consonant they follow in speech: the syllable goes on.
LEADING_VOWELS = frozenset("\u0e40\u0e41\u0e42\u0e43\u0e44\u0ec0\u0ec1\u0ec2\u0ec3\u0ec4")
# Thai and Lao vowels and the repetition mark, letters rather than marks, that only follow one.
FOLLOWING_LETTERS = frozenset("\u0e30\u0e32\u0e33\u0e45\u0e46\u0eb0\u0eb2\u0eb3\u0ec6")
# Punctuation that ends what is before it, where the script puts no space before it: full stops
# and commas of Thai, Myanmar and Khmer, and the ASCII ones that follow those scripts' words.
CLOSING_MARKS = frozenset(".?!…,;:%\u0e5a\u0e5b\u104a\u104b\u17d4\u17d5\u17d6")
# Wide punctuation that opens or stands alone rather than closes (#, @, quotes, the song mark).
WIDE_NOT_CLOSING = frozenset("〽＂＇＃＆＊＠＼﹟﹠﹡﹨﹫")


def _part_of_previous_letter(character: str) -> bool:
    """A combining mark (a Thai tone mark, a vowel sign) or a vowel that only follows a consonant."""
    return unicodedata.category(character) in ("Mn", "Mc", "Me") or character in FOLLOWING_LETTERS


def _closing(character: str) -> bool:
    """Punctuation that ends what is before it: ）, ？, 。, and the full stops of Thai, Myanmar, Khmer."""
    category = unicodedata.category(character)
    return category == "Pe" or character in CLOSING_MARKS or (
        category == "Po" and unicodedata.east_asian_width(character) in "WF" and character not in WIDE_NOT_CLOSING)


def _tokens(segment: Captioned) -> list[_Token] | None:
    """The words with their spacing as in the segment's text (none between Chinese words), or
    None when the segment has no word times or its words are not found in its text (blank ones
    left out). A token is where a line may break after: words written together ("12" "%") make
    one, and so do pieces of one syllable (Whisper cuts Thai, Lao, Khmer and Myanmar words into
    pieces that may start with a tone mark or vowel sign) and a word with the ？ after it."""
    if not segment.words:
        return None
    tokens, cursor = [], 0
    for word in segment.words:
        bare = word.word.strip()
        if not bare:
            continue  # a blank word (Whisper writes one now and then) is nothing to show
        found = segment.text.find(bare, cursor)
        if found < 0:
            return None
        spaced = found > cursor and segment.text[cursor:found].isspace()
        previous = tokens[-1].text[-1] if tokens else ""
        together = bool(tokens) and (
            # A syllable is never torn: a mark or dependent vowel stays with the letter before it
            # (even past a space, on which it would otherwise sit), a leading vowel with the next.
            _part_of_previous_letter(bare[0]) or previous in LEADING_VOWELS
            # "12" and "%": a line may break between two words only where a space is, or
            # between characters of a script written without spaces, but never before "？".
            or not spaced and (written_with_spaces(previous) and written_with_spaces(bare[0]) or _closing(bare[0])))
        if together:
            tokens[-1] = _Token(tokens[-1].text + (" " if spaced else "") + bare, tokens[-1].start, word.end)
        else:
            tokens.append(_Token((" " if spaced and tokens else "") + bare, word.start, word.end))
        cursor = found + len(bare)
    return tokens


def _joined(tokens: Sequence[_Token]) -> str:
    return "".join(t.text for t in tokens).strip()


def _lines_needed(widths: Sequence[tuple[int, int]], width: int, first_line_taken: int) -> int:
    """Filling each line before the next gives the fewest lines. `widths`: each token's
    columns, with its space and at the start of a line."""
    lines, used = 1, first_line_taken + widths[0][1]
    for spaced, bare in widths[1:]:
        if used + spaced <= width:
            used += spaced
        else:
            lines, used = lines + 1, bare
    return lines


def wrap(tokens: Sequence[_Token], width: int, count: int, first_line_taken: int = 0) -> list[str] | None:
    """The tokens on as few lines of `width` columns as they fit in, at most `count` (the first
    line already holds `first_line_taken`), as even as possible; None when they do not fit.
    A single word wider than a line still gets a line of its own."""
    widths = [(t.columns, t.bare_columns) for t in tokens]
    fewest = _lines_needed(widths, width, first_line_taken)
    if fewest > count:
        return None
    n = len(tokens)
    running = [0]
    for spaced, _ in widths:
        running.append(running[-1] + spaced)

    def line_width(i: int, j: int) -> int:
        return running[j] - running[i] - widths[i][0] + widths[i][1] + (first_line_taken if i == 0 else 0)

    # longest[i]: where the longest line that starts at tokens[i] ends (a single token wider than
    # a line still makes one); needed[i]: the fewest lines tokens[i:] fit on (filled greedily).
    longest, needed = [0] * n, [0] * (n + 1)
    for i in range(n - 1, -1, -1):
        room = width - line_width(i, i) + running[i]  # line_width(i, j) <= width where running[j] <= room
        longest[i] = max(i + 1, bisect_right(running, room, i + 1, n + 1) - 1)
        needed[i] = 1 + needed[longest[i]]
    # widest[k][i]: the narrowest possible widest line for tokens[i:] on at most k lines.
    inf = float("inf")
    widest = [[inf] * (n + 1) for _ in range(fewest + 1)]
    cut: dict[tuple[int, int], int] = {}
    for k in range(fewest + 1):
        widest[k][n] = 0
    for k in range(1, fewest + 1):
        rest = widest[k - 1]
        for i in range(n - 1, -1, -1):
            if needed[i] > k:
                continue  # they do not fit: no way to cut them
            # Cutting after more tokens widens this line and narrows the widest of the rest (fewer
            # tokens never need wider lines), so the best cut is where the two cross: found by
            # bisection rather than trying each (a line of a wide subtitle holds a hundred Chinese
            # characters). Of cuts as good, the first, as trying each from the first chose.
            first, last = i + 1, longest[i]
            crossing = first + bisect_left(range(first, last + 1), True,
                                           key=lambda j: line_width(i, j) >= rest[j])
            j = crossing
            if crossing > first and (crossing > last or rest[crossing - 1] <= line_width(i, crossing)):
                j = first + bisect_left(range(first, crossing), -rest[crossing - 1], key=lambda j: -rest[j])
            candidate = max(line_width(i, j), rest[j])
            if candidate < inf:
                widest[k][i], cut[(k, i)] = candidate, j
    lines, i, k = [], 0, fewest
    while i < n:
        j = cut[(k, i)]
        lines.append(_joined(tokens[i:j]))
        i, k = j, k - 1
    return lines


def _break_after(tokens: Sequence[_Token], room: int) -> int:
    """How many of `tokens` (which overflow a cue) go in this cue: after the last sentence end,
    else the last clause end, else at the longest pause, among cuts that fill at least a third
    of the cue and last long enough to be read; else as many as fit."""
    def ends_with(i: int, marks: tuple[str, ...]) -> bool:
        return tokens[i - 1].text.rstrip().endswith(marks)

    candidates, shown = [], 0  # shown: the columns of tokens[:i] as one line (the first one's space dropped)
    for i in range(1, len(tokens)):
        shown += tokens[0].bare_columns if i == 1 else tokens[i - 1].columns
        if shown * 3 >= room and tokens[i - 1].end - tokens[0].start >= MIN_CUE_S:
            candidates.append(i)
    for marks in (SENTENCE_ENDS, CLAUSE_ENDS):
        marked = [i for i in candidates if ends_with(i, marks)]
        if marked:
            return marked[-1]
    pauses = [(tokens[i].start - tokens[i - 1].end, i) for i in candidates]
    if pauses and max(pauses)[0] >= PAUSE_S:
        return max(pauses)[1]
    return len(tokens) - 1


def _segment_cues(segment: Captioned, width: int, count: int, speaker_takes_room: bool) -> list[Cue]:
    speaker = segment.speaker_name or segment.speaker
    label = columns(f"{speaker}: ") if speaker_takes_room else 0
    if not segment.text.strip():
        return []
    tokens = _tokens(segment)
    if tokens is None:  # no word times: the segment as one cue
        words = [_Token((" " if i else "") + w, segment.start_ts, segment.end_ts)
                 for i, w in enumerate(segment.text.split())]
        lines = wrap(words, width, max(count, len(words)), label) or [_joined(words)]
        return [Cue(segment.start_ts, max(segment.start_ts, segment.end_ts), speaker, lines)]
    widths = [(t.columns, t.bare_columns) for t in tokens]
    cues, start = [], 0
    while start < len(tokens):
        end = start + 1
        # The lines the cue's tokens need, filled as _lines_needed fills them, a token at a time.
        lines, used = 1, label + widths[start][1]
        while end < len(tokens) and tokens[end].end - tokens[start].start <= MAX_CUE_S:
            spaced, bare = widths[end]
            lines, used = (lines, used + spaced) if used + spaced <= width else (lines + 1, bare)
            if lines > count:
                break
            end += 1
        if end < len(tokens):
            end = start + _break_after(tokens[start:end + 1], width * count - label)
        chosen = tokens[start:end]
        lines = wrap(chosen, width, count, label) or [_joined(chosen)]
        cues.append(Cue(chosen[0].start, max(chosen[0].start, chosen[-1].end), speaker, lines))
        start = end
    return cues


def caption_cues(segments: Sequence[Captioned], line_width: int = LINE_WIDTH, line_count: int = LINE_COUNT,
                 speaker_takes_room: bool = True) -> list[Cue]:
    """`speaker_takes_room`: the speaker's name opens the first line (SRT) and counts in its width.
    Cues come in the order they start (WebVTT requires it; with two people talking at once, one's
    later cues would otherwise come before the other's), each lasts long enough to be shown, and
    no two of one speaker overlap."""
    cues = sorted((cue for segment in segments
                   for cue in _segment_cues(segment, line_width, line_count, speaker_takes_room)),
                  key=lambda cue: (cue.start, cue.end))
    by_speaker: dict[str, list[int]] = {}
    for i, cue in enumerate(cues):
        by_speaker.setdefault(cue.speaker, []).append(i)
    for indices in by_speaker.values():
        for i, cue in zip(indices, _readable([cues[i] for i in indices])):
            cues[i] = cue
    return sorted(cues, key=lambda cue: (cue.start, cue.end))  # stable: one speaker's stay in order


def _readable(cues: Sequence[Cue]) -> list[Cue]:
    """One speaker's cues, in order, timed to be shown. A cue that ends where it starts (a word
    Whisper timed at one instant) would never be: it is given up to MIN_CUE_S, but not past the
    start of the speaker's next cue. Several cues that start at one instant (a passage whose words
    were all timed alike, cut to fit on screen) follow one another over the time after it, up to
    MIN_CUE_S each, shared evenly where the speaker's next cue comes sooner, but at least
    MIN_SHARE_MS each (past the next cue's start where there is no room for that). A cue ends at
    the latest where the speaker's next one starts, but for those."""
    timed: list[Cue] = []
    first = 0
    while first < len(cues):
        at = cues[first].start
        last = first
        while last + 1 < len(cues) and cues[last + 1].start == at:
            last += 1
        following = cues[last + 1].start if last + 1 < len(cues) else float("inf")
        together = last - first + 1
        share = min(MIN_CUE_S, (following - at) / together)
        if share < MIN_CUE_S:
            # Shared out on whole milliseconds (the subtitle's precision), at least MIN_SHARE_MS
            # each: one that starts where it ends once rounded is dropped by players. Where there
            # is no room for that before the next cue, they run past its start.
            base = round(at * 1000)
            room = max(round(following * 1000) - base, together * MIN_SHARE_MS)
            bounds = [(base + n * room // together) / 1000 for n in range(together + 1)]
        else:
            bounds = [at + n * share for n in range(together + 1)]
        for n, cue in enumerate(cues[first:last + 1]):
            start, end = bounds[n], bounds[n + 1]
            if n == together - 1:  # the last keeps the time its words take, up to the next cue
                end = max(min(max(cue.end, end), following), end)
            timed.append(Cue(start, end, cue.speaker, cue.lines))
        first = last + 1
    return timed
