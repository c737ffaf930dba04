"""Custom spelling: words as Whisper writes them replaced by how the job asked for them to be
written ("confu i" -> "ComfyUI"), matched whole and in any case, the longest phrase first.
Applied before redaction, so what is redacted is the final text."""

from __future__ import annotations

import re
import sys
import unicodedata

from common.messages import Segment
from services.transcriber.rewrite import SPACED_WORD_CHAR, UNSPACED, Finder, Replacements, rewrite

_UNSPACED = re.compile(f"[{UNSPACED}]")


def _mark_ranges() -> str:
    """Every combining mark (Unicode categories Mn, Mc, Me) outside the unspaced scripts, as a
    character class's ranges. Python's \\w leaves them out, but in Devanagari and the other Indic
    scripts each vowel sign and virama is one: "राम" ends inside "रामायण" at one."""
    ranges: list[list[int]] = []
    for code in range(sys.maxunicode + 1):
        if unicodedata.category(chr(code))[0] == "M" and not _UNSPACED.match(chr(code)):
            if ranges and ranges[-1][1] == code - 1:
                ranges[-1][1] = code
            else:
                ranges.append([code, code])
    return "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges)


# Next to one of these a word goes on: a letter, digit or underscore of a spaced script, or a
# combining mark (a word is not respelled inside a longer one whose next letter is a vowel sign).
_WORD_CHAR = f"(?:{SPACED_WORD_CHAR}|[{_mark_ranges()}])"


def _pattern(heard: str) -> re.Pattern[str]:
    """`heard` as whole words: not part of a contraction either ("don" is not respelled in
    "don't"), but a possessive is the word's ("Don's"). A phrase's edge in a script written without
    spaces is a word's edge wherever it falls, and so is a character of such a script next to it
    ("gpt" in "我们用gpt写代码"). A combining mark is part of the word it follows: "राम" is not a
    word of "रामायण", nor "मत" of "कीमत"."""
    before = "" if _UNSPACED.match(heard[0]) else f"(?<!{_WORD_CHAR})"
    after = "" if _UNSPACED.match(heard[-1]) else rf"(?!{_WORD_CHAR}|['’](?!s\b)\w)"
    return re.compile(before + r"\s+".join(map(_word, heard.split())) + after, re.IGNORECASE)


def _word(word: str) -> str:
    """`word` matched in any case, Turkish "İ" included: an "i" also matches "İ" and "i" with a
    combining dot, which is how str.lower() wrote "İ" in a heard side stored before. Its accents
    precomposed (as the job's heard side is kept, and as Whisper writes) or combining."""
    forms = dict.fromkeys(unicodedata.normalize(form, word) for form in ("NFC", "NFD"))
    return "(?:" + "|".join(re.escape(re.sub("[iIİ]\u0307|İ", "i", w)).replace("i", "i\u0307?") for w in forms) + ")"


def _finder(spelling: dict[str, str]) -> Finder:
    patterns = [(_pattern(heard), written)
                for heard, written in sorted(spelling.items(), key=lambda pair: -len(pair[0]))]

    def find(text: str) -> Replacements:
        found: Replacements = []
        for pattern, written in patterns:
            for match in pattern.finditer(text):
                start, end = match.span()
                # A written side ending in punctuation takes the same mark said after it: "ACME
                # Corp." at a sentence's end is not "ACME Corp..".
                if unicodedata.category(written[-1]).startswith("P") and text[end:end + 1] == written[-1]:
                    end += 1
                if not any(s < end and start < e for s, e, _ in found):
                    found.append((start, end, written))
        return sorted(found)
    return find


def respell(segments: list[Segment], spelling: dict[str, str]) -> list[Segment]:
    return rewrite(segments, _finder(spelling)) if spelling else segments
