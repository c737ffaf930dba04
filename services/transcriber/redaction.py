"""Redaction: e-mail addresses, card numbers, phone numbers or every number replaced in a job's
text before it leaves the transcriber, so that no later stage, table, index, embedding or event
ever holds them (README "Redaction"). Whisper writes most spoken numbers in digits; a number it
spells out in words is not recognised."""

from __future__ import annotations

import re
from collections.abc import Iterable

from common.messages import REDACTABLE, Segment, Word, redacted_label
from services.transcriber.rewrite import SPACED_WORD_CHAR, UNSPACED, Finder, rewrite, rewrite_text, rewrite_words

# A domain's letters and digits in any script written with spaces (müller.de, пример.рф), not
# Chinese or Japanese written right after an address, which is the sentence going on.
_DOMAIN_PART = rf"(?:[^\W_{UNSPACED}]|-)+"
_TOP_LEVEL_DOMAIN = rf"[^\W\d_{UNSPACED}]{{2,}}"
# An address's name: its own letters and digits, not those of Chinese or Japanese written against
# it ("我的邮箱是anna@example.org" loses the address, not the sentence).
_NAME_CHAR = rf"(?:{SPACED_WORD_CHAR}|[%+-])"
_LOCAL_CHAR = rf"(?:{SPACED_WORD_CHAR}|[.%+-])"
# How a dot, underscore or hyphen in an address is said and written down ("anna underscore smith",
# "acme dash shop"); a domain has no underscore.
_SPOKEN_NAME_JOIN = r" (?:dot|underscore|dash|hyphen) "
_SPOKEN_DOMAIN_JOIN = r" (?:dash|hyphen) "
_SPOKEN_NAME = rf"(?:{_NAME_CHAR}+{_SPOKEN_NAME_JOIN})*{_LOCAL_CHAR}+"
# Digits in groups of four, with a comma, a full stop, an ellipsis, a space or a hyphen (spaced
# or not) between groups: "4111... 1111... 1111... 1111." as Whisper writes groups said hesitantly.
_GROUP_BREAK = r"(?:(?:[.,]|\.\.\.?|…) ?| [-–] | |-)"
# What joins the digits of one run: a number said right after another with only these between
# is one longer number, not a card. A spaced dash, like a full stop, can also end one number
# before another ("2019 - 2020").
_DIGIT_JOIN = r"(?:, ?|[ -])"
# An expiry said right after the card ("12 25", "12/25", "5/2027", or "1225" after a card said
# without full stops; a year 2020-2039, so that a card's own last group, "1111", is not taken for
# one), perhaps with its code after it.
_EXPIRY_SPACED = r"(?:0?[1-9]|1[0-2])(?: ?[/.-] ?| )(?:20)?[23]\d"
_EXPIRY = rf"(?:{_EXPIRY_SPACED}|(?:0[1-9]|1[0-2])(?:20)?[23]\d)"
_RUN_ENDS = rf"(?!{_DIGIT_JOIN}?\d|/\d)"
_CARD_STARTS = r"(?<![\d.,])(?<!\d[ -])(?<!\d, )"


def _card_ends(expiry: str) -> str:
    """Where a card's digits end: the run of digits ends, or an expiry said after it follows."""
    return rf"(?:{_RUN_ENDS}|(?={_DIGIT_JOIN}{expiry}(?:{_DIGIT_JOIN}\d{{3,4}})?{_RUN_ENDS}))"


PATTERNS: dict[str, re.Pattern[str]] = {
    # Written (a@b.com, anna@müller.de) or as spoken and written down (a at b dot com,
    # anna underscore smith at acme dash shop dot com, anna@example dot com).
    "email": re.compile(rf"(?<!{_LOCAL_CHAR}){_SPOKEN_NAME}@{_DOMAIN_PART}"
                        rf"(?:(?:\.| dot |{_SPOKEN_DOMAIN_JOIN}){_DOMAIN_PART})*(?:\.| dot ){_DOMAIN_PART}"
                        rf"|(?<!{_LOCAL_CHAR}){_SPOKEN_NAME} at {_DOMAIN_PART}"
                        rf"(?:(?: dot |\.|{_SPOKEN_DOMAIN_JOIN}){_DOMAIN_PART})*(?: dot |\.){_TOP_LEVEL_DOMAIN}"
                        rf"(?!{SPACED_WORD_CHAR})",
                        re.IGNORECASE),
    # 13-19 digits, grouped or not, and not part of a longer run (two phone numbers said one after
    # the other are no card) unless what makes it longer is an expiry said right after it ("4111
    # 1111 1111 1111 12 25"); or four groups of four with a full stop, an ellipsis or a spaced
    # dash after some or all of them, as Whisper writes groups said each as a sentence of its own
    # ("4111. 1111. 1111. 1111.", or "4111 1111. 1111, 1111." with a pause in the middle). A
    # number said after the card (its expiry) is not taken into it. No Luhn check: one digit
    # misheard would let the number through.
    "card": re.compile(rf"{_CARD_STARTS}\d(?:{_DIGIT_JOIN}?\d){{12,18}}{_card_ends(_EXPIRY)}"
                       rf"|{_CARD_STARTS}\d{{4}}(?:{_GROUP_BREAK}\d{{4}}){{3}}{_card_ends(_EXPIRY_SPACED)}"),
    # 7-15 digits with the separators people say them with, a country or area code included
    # (Whisper groups long numbers with commas); not the end of a word or of a number with a
    # decimal point, but right after Chinese, Japanese or Thai, which Whisper writes digits against.
    "phone": re.compile(rf"(?<![.,])(?<!{SPACED_WORD_CHAR})\+?\(?\d(?:[\d ().-]|, ?(?=\d)){{5,}}\d(?!\d)"),
    "number": re.compile(r"\d(?:[\d,.]*\d)?"),
}


PHONE_DIGITS = (7, 15)


def _digits(text: str) -> int:
    return len(re.sub(r"\D", "", text))


def _phones(match: re.Match[str]) -> list[tuple[int, int]]:
    """The phone numbers in a phone match: itself, or, where it runs past 15 digits (numbers said
    one after another, "555-123-4567, 555-987-6543"), its parts between commas taken in turn as
    long as they stay within 15 digits."""
    if _digits(match[0]) <= PHONE_DIGITS[1]:
        return [match.span()] if _digits(match[0]) >= PHONE_DIGITS[0] else []
    phones, group = [], None
    for part in re.finditer(r"[^,]+", match[0]):
        start, end = match.start() + part.start(), match.start() + part.end()
        if group and _digits(match.string[group[0]:end]) <= PHONE_DIGITS[1]:
            group = (group[0], end)
            continue
        if group and _digits(match.string[group[0]:group[1]]) >= PHONE_DIGITS[0]:
            phones.append(group)
        group = (start + len(part[0]) - len(part[0].lstrip()), end)
    if group and _digits(match.string[group[0]:group[1]]) >= PHONE_DIGITS[0]:
        phones.append(group)
    return phones


def spans(text: str, kinds: Iterable[str]) -> list[tuple[int, int, str]]:
    """(start, end, kind) of what to redact in `text`, in order, none overlapping; the kinds
    are tried in REDACTABLE's order, so a card number is a card, not a phone or a number."""
    found: list[tuple[int, int, str]] = []
    for kind in (k for k in REDACTABLE if k in set(kinds)):
        for match in PATTERNS[kind].finditer(text):
            for start, end in _phones(match) if kind == "phone" else [match.span()]:
                if not any(s < end and start < e for s, e, _ in found):
                    found.append((start, end, kind))
    return sorted(found)


def _finder(kinds: Iterable[str]) -> Finder:
    kinds = list(kinds)
    return lambda text: [(start, end, redacted_label(kind)) for start, end, kind in spans(text, kinds)]


def redact_words(words: list[Word], kinds: Iterable[str]) -> list[Word]:
    """The words with each redacted span's words merged into one `[KIND]` word over their time."""
    return rewrite_words(words, _finder(kinds))


def redact_text(text: str, kinds: Iterable[str]) -> str:
    return rewrite_text(text, _finder(kinds))


def redact(segments: list[Segment], kinds: Iterable[str]) -> list[Segment]:
    """Segments with what `kinds` names replaced in their words and text: each speaker's words
    searched, then everyone's in the order said (a number whose words went to two speakers
    where they talk over each other)."""
    kinds = list(kinds)
    return rewrite(segments, _finder(kinds), across_speakers=True) if kinds else segments
