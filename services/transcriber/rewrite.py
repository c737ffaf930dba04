"""Replacing spans of a segment's text while keeping its words in step: the words a span covers
become one word over their time, holding the replacement (and whatever the first and last of them
held outside the span: a space, punctuation). Redaction and custom spelling both work so."""

from __future__ import annotations

from collections.abc import Callable

from common.messages import Segment, Word

# (start, end, replacement) in a text, in order, none overlapping.
Replacements = list[tuple[int, int, str]]
Finder = Callable[[str], Replacements]


def rewrite_words(words: list[Word], find: Finder) -> list[Word]:
    text = "".join(w.word for w in words)
    found = find(text)
    if not found:
        return words
    edges, position = [], 0
    for word in words:
        edges.append((position, position + len(word.word)))
        position += len(word.word)
    rewritten: list[Word] = []
    i = 0
    for start, end, replacement in found:
        while i < len(words) and edges[i][1] <= start:
            rewritten.append(words[i])
            i += 1
        first = i
        while i < len(words) and edges[i][0] < end:
            i += 1
        covered = words[first:i]
        if not covered:
            continue
        before = text[edges[first][0]:start] if edges[first][0] < start else ""
        after = text[end:edges[i - 1][1]] if end < edges[i - 1][1] else ""
        probabilities = [w.probability for w in covered if w.probability is not None]
        rewritten.append(Word(word=before + replacement + after, start=covered[0].start, end=covered[-1].end,
                              probability=min(probabilities) if probabilities else None))
    rewritten.extend(words[i:])
    return rewritten


def rewrite_text(text: str, find: Finder) -> str:
    for start, end, replacement in reversed(find(text)):
        text = text[:start] + replacement + text[end:]
    return text


def rewrite(segments: list[Segment], find: Finder) -> list[Segment]:
    """Segments with what `find` finds replaced in their words and text."""
    out = []
    for segment in segments:
        if segment.words:
            words = rewrite_words(segment.words, find)
            text = "".join(w.word for w in words).strip()
        else:
            words, text = segment.words, rewrite_text(segment.text, find)
        out.append(segment.model_copy(update={"words": words, "text": text}))
    return out
