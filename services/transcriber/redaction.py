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
# After a spoken "at" a domain written down must be in ASCII letters ("support at example.com"):
# "at Köln.Da" is a sentence run together, not an address.
_ASCII_DOMAIN_PART = r"[A-Za-z0-9-]+"
# What may follow the last spoken "dot" of an address: the common generic top-level domains and
# the country codes, as Whisper writes a word (lower case, or all capitals), not the next
# sentence's first word ("at mid dash year dot So we").
_TOP_LEVEL_DOMAINS = (
    "com net org edu gov mil int info biz name pro mobi aero asia jobs museum travel tel cat coop app dev"
    " ai io tech online site shop store blog cloud email news xyz club live studio agency design digital"
    " media space top website art page host link network systems solutions group company world"
    " ac ad ae af ag al am ao aq ar as at au aw ax az ba bb bd be bf bg bh bi bj bm bn bo br bs bt bw"
    " by bz ca cc cd cf cg ch ci ck cl cm cn co cr cu cv cw cx cy cz de dj dk dm do dz ec ee eg er es"
    " et eu fi fj fk fm fo fr ga gd ge gf gg gh gi gl gm gn gp gq gr gs gt gu gw gy hk hm hn hr ht hu"
    " id ie il im in iq ir is it je jm jo jp ke kg kh ki km kn kp kr kw ky kz la lb lc li lk lr ls lt"
    " lu lv ly ma mc md me mg mh mk ml mm mn mo mp mq mr ms mt mu mv mw mx my mz na nc ne nf ng ni nl"
    " no np nr nu nz om pa pe pf pg ph pk pl pm pn pr ps pt pw py qa re ro rs ru rw sa sb sc sd se sg"
    " sh si sk sl sm sn so sr ss st su sv sx sy sz tc td tf tg th tj tk tl tm tn to tr tt tv tw tz ua"
    " ug uk us uy uz va vc ve vg vi vn vu wf ws ye yt za zm zw рф").split()


def _said_as_written(words: list[str]) -> str:
    """Any of `words` as Whisper writes it, in lower case or all capitals, the longest first."""
    return "(?-i:" + "|".join(sorted([*words, *(w.upper() for w in words)], key=len, reverse=True)) + ")"


# Country codes that follow "dot" in a sentence as words ("home dot so what", "it dot by dot",
# "one dot to another"): said, one ends an address only where the sentence or the text goes on
# with no word after it ("anna at web dot to.", "... dot so, thanks", "... dot to谢谢"). The others
# end one wherever they are ("anna at web dot de und dann", "john at icloud dot me and then"):
# only these few, as an address left in clear costs more than a sentence's words redacted.
_TOP_LEVEL_DOMAINS_AS_WORDS = {"by", "do", "so", "to"}
_CODES_NOT_WORDS = [d for d in _TOP_LEVEL_DOMAINS if d not in _TOP_LEVEL_DOMAINS_AS_WORDS]
_SPOKEN_TOP_LEVEL_DOMAIN = (rf"(?:{_said_as_written(_CODES_NOT_WORDS)}"
                            rf"|{_said_as_written(sorted(_TOP_LEVEL_DOMAINS_AS_WORDS))}(?!\s*{SPACED_WORD_CHAR}))")
# An address's name: its own letters and digits, not those of Chinese or Japanese written against
# it ("我的邮箱是anna@example.org" loses the address, not the sentence).
_LOCAL_CHAR = rf"(?:{SPACED_WORD_CHAR}|[.%+-])"
# How a dot, underscore or hyphen in an address is said and written down ("anna underscore smith",
# "acme dash shop"); a domain has no underscore.
_SPOKEN_NAME_JOINERS = ("dot", "underscore", "dash", "hyphen")
_SPOKEN_NAME_JOIN = rf" (?:{'|'.join(_SPOKEN_NAME_JOINERS)}) "
_SPOKEN_DOMAIN_JOIN = r" (?:dash|hyphen) "
# A name starts only where no other name's part and joiner stand before it: one start per run of
# words, so that a long run ("a dot a dot a dot ...") is read once, not once from each of its words.
_NAME_STARTS = rf"(?<!{_LOCAL_CHAR})" + "".join(rf"(?<!{_LOCAL_CHAR} {joiner} )" for joiner in _SPOKEN_NAME_JOINERS)
_SPOKEN_NAME = rf"{_NAME_STARTS}(?:{_LOCAL_CHAR}+{_SPOKEN_NAME_JOIN})*{_LOCAL_CHAR}+"
# Words of a sentence that no address has as the name said before "at" or as the domain said
# after it ("I am at home dot...", "laughed at the dot com bubble"); not "me", "my", "it" or "us",
# which are mail domains (me.com) and their parts (it.example.edu).
_NO_SPOKEN_ADDRESS_PART = (rf"(?!(?:a|an|the|this|that|these|those|i|you|he|she|we|they|him|her|his|its|our|their"
                           rf"|them|am|is|are|was|were|be|been)(?!{_LOCAL_CHAR}))")
_SPOKEN_NAME_BEFORE_AT = rf"{_NAME_STARTS}(?:{_LOCAL_CHAR}+{_SPOKEN_NAME_JOIN})*{_NO_SPOKEN_ADDRESS_PART}{_LOCAL_CHAR}+"
# Digits in groups of four, with a comma, a full stop, a space or a hyphen between groups.
_GROUP_BREAK = r"(?:[.,] ?| |-)"
# Groups said hesitantly, as Whisper writes them: a spaced dash ("4111 – 1111", "4111 — 1111") or
# an ellipsis ("4111... 1111..."), between all four groups or between some, a pause or none
# between the others ("4111... 1111. 1111. 1111."). Years and counts are written so too ("2019 -
# 2020 - 2021 - 2022"): such groups are a card only where they are not within a longer run of them
# and pass the checksum (_is_card).
_HESITANT_BREAK = r"(?: [-–—] |(?:\.\.\.?|…) ?)"
_HESITANT_OR_GROUP_BREAK = rf"(?:{_HESITANT_BREAK}|{_GROUP_BREAK})"
_NOT_AFTER_HESITANT_GROUP = r"(?<!\d [-–—] )(?<!\d\.\. )(?<!\d\.\.\. )(?<!\d…)(?<!\d… )"
# What joins the digits of one run: a number said right after another with only these between
# is one longer number, not a card.
_DIGIT_JOIN = r"(?:, ?|[ -])"
# An expiry said right after the card ("12 25", "12/25", "12, 25", "12 – 25", "5/2027", or "1225";
# a year 2020-2039, so that a card's own last group, "1111", is not taken for one), perhaps with
# its code after it.
_EXPIRY_SPACED = rf"(?:0?[1-9]|1[0-2])(?: ?[/.-] ?|, ?| |{_HESITANT_BREAK})(?:20)?[23]\d"
_EXPIRY = rf"(?:{_EXPIRY_SPACED}|(?:0[1-9]|1[0-2])(?:20)?[23]\d)"
_CARD_STARTS = r"(?<![\d.,])(?<!\d[ -])(?<!\d, )"
_HESITANT_BREAK_OR_DIGIT_JOIN = rf"(?:{_HESITANT_BREAK}|{_DIGIT_JOIN})"
# A card's digits as Whisper writes them said plainly: four groups of four ("4111 1111 1111 1111"),
# or all in one.
_PLAIN_CARD_DIGITS = re.compile(rf"\d{{4}}(?:{_GROUP_BREAK}\d{{4}}){{3}}|\d{{13,19}}")
# Where a slash may follow in a phone number: after its area code, as written in German
# ("089/123456", "0171 / 2345678"). A date or a fraction has no such group (3-5 digits starting with
# 0, not after a thousands separator or a decimal point).
_AFTER_AREA_CODE = "(?:" + "|".join(rf"(?<=(?<![\d,.])0\d{{{n}}})" for n in (2, 3, 4)) + ")"
# What may stand between a phone number's digits.
_PHONE_BETWEEN_DIGITS = rf"(?:[\d ().\-–—…]|, ?(?=\d)|{_AFTER_AREA_CODE} ?/ ?(?=\d))"
# A date as it is written, which is no phone number: day, month and year with dots
# ("12.05.2024", "1.5.24", as Whisper writes German and Russian dates), with slashes, either
# way round ("12/25/2024", "25/12/2024"), or ISO ("2024-05-12"). Only parts within a day's, a
# month's and a year's ranges, and only a whole run: within a longer run of digits and separators
# ("06.12.34.56.78", "555.12.05.2024"), or after an area code ("0171 12.05.90", "(030) 12.05.24",
# "030 / 12.05.2024"), the same digits are part of a phone number.
_DAY = r"(?:0?[1-9]|[12]\d|3[01])"
_MONTH = r"(?:0?[1-9]|1[0-2])"
_YEAR = r"(?:[12]\d{3}|\d{2})"
_DATE_SEPARATOR = r"[.,/\-–—]"
_DATE = re.compile(rf"(?<![\d+])(?<!\d{_DATE_SEPARATOR})(?<![\d)][ /])(?<![\d)] / )"
                   rf"(?:{_DAY}\.{_MONTH}\.{_YEAR}|(?:{_DAY}/{_MONTH}|{_MONTH}/{_DAY})/{_YEAR}"
                   rf"|[12]\d{{3}}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01]))"
                   rf"(?!\d)(?!{_DATE_SEPARATOR}\d)")
# An expiry whose month and year have a comma between them ("12, 25"), said right after a card.
_EXPIRY_WITH_COMMA_AFTER = re.compile(rf"{_DIGIT_JOIN}(?:0?[1-9]|1[0-2]), ?(?:20)?[23]\d")
# Four groups with a comma between each, as a list of numbers is written ("2019, 2020, 2021, 2022").
_GROUPS_AS_A_LIST = re.compile(r"\d{4}(?:, ?\d{4}){3}")
# The first digit of a payment card's number (ISO/IEC 7812's industry: 2, 5 Mastercard; 3 Amex,
# JCB, Diners; 4 Visa; 6 Discover, UnionPay, Maestro): not 1, as counts said in fours often start.
_PAYMENT_CARD_FIRST_DIGITS = "23456"


def _card_ends(expiry: str, expiry_follows: str, join: str = _DIGIT_JOIN, code_follows: str | None = None) -> str:
    """Where a card's digits end: the run of digits ends, or an expiry said after it follows (the
    empty group `expiry_follows` then matches, for _is_card), or, given `code_follows`, its
    three-digit code on its own (that group then matches). A code alone is looked for only after
    groups said hesitantly, which must pass the checksum: after a run of digits said plainly it
    would make a list of numbers a card."""
    run_ends = rf"(?!{join}?\d|/\d)"
    ends = rf"{run_ends}|(?P<{expiry_follows}>)(?={join}{expiry}(?:{join}\d{{3,4}})?{run_ends})"
    if code_follows:
        ends += rf"|(?P<{code_follows}>)(?={join}\d{{3}}{run_ends})"
    return rf"(?:{ends})"


PATTERNS: dict[str, re.Pattern[str]] = {
    # Written (a@b.com, anna@müller.de) or as spoken and written down (a at b dot com,
    # anna underscore smith at acme dash shop dot com, anna@example dot com, support at example.com).
    "email": re.compile(rf"{_SPOKEN_NAME}@{_DOMAIN_PART}"
                        rf"(?:(?:\.| dot |{_SPOKEN_DOMAIN_JOIN}){_DOMAIN_PART})*(?:\.| dot ){_DOMAIN_PART}"
                        rf"|{_SPOKEN_NAME_BEFORE_AT} at {_NO_SPOKEN_ADDRESS_PART}"
                        rf"(?:{_DOMAIN_PART}(?:(?: dot |\.|{_SPOKEN_DOMAIN_JOIN}){_DOMAIN_PART})*"
                        rf" dot {_SPOKEN_TOP_LEVEL_DOMAIN}"
                        rf"|{_ASCII_DOMAIN_PART}(?:(?: dot |\.|{_SPOKEN_DOMAIN_JOIN}){_ASCII_DOMAIN_PART})*"
                        rf"\.[A-Za-z]{{2,}})(?!{SPACED_WORD_CHAR})",
                        re.IGNORECASE),
    # 13-19 digits, grouped or not, and not part of a longer run (two phone numbers said one after
    # the other are no card) unless what makes it longer is an expiry said right after it ("4111
    # 1111 1111 1111 12 25"); or four groups of four with a full stop after some or all of them,
    # as Whisper writes groups said each as a sentence of its own ("4111. 1111. 1111. 1111.", or
    # "4111 1111. 1111, 1111." with a pause in the middle); or said hesitantly (_HESITANT_BREAK).
    # A number said after the card (its expiry; its code, after groups said hesitantly) is not
    # taken into it. Which of these need the checksum: _is_card.
    "card": re.compile(rf"{_CARD_STARTS}\d(?:{_DIGIT_JOIN}?\d){{12,18}}{_card_ends(_EXPIRY, 'expiry_after_run')}"
                       rf"|{_CARD_STARTS}\d{{4}}(?:{_GROUP_BREAK}\d{{4}}){{3}}"
                       rf"{_card_ends(_EXPIRY, 'expiry_after_groups')}"
                       rf"|{_CARD_STARTS}{_NOT_AFTER_HESITANT_GROUP}(?P<hesitant>\d{{4}}(?:{_HESITANT_OR_GROUP_BREAK}\d{{4}}){{3}})"
                       + _card_ends(_EXPIRY, "expiry_after_hesitant", _HESITANT_BREAK_OR_DIGIT_JOIN,
                                    "code_after_hesitant")),
    # 7-15 digits with the separators people say them with, hesitant ones too ("555… 123… 4567",
    # "555 – 123 – 4567"), a country or area code included (_AFTER_AREA_CODE); Whisper groups long
    # numbers with commas. Not the end of a word or of a number with a decimal point, but right
    # after Chinese, Japanese or Thai, which Whisper writes digits against.
    "phone": re.compile(rf"(?<![.,])(?<!{SPACED_WORD_CHAR})\+?\(?\d{_PHONE_BETWEEN_DIGITS}{{5,}}\d(?!\d)"),
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


def _is_card(card: re.Match[str]) -> bool:
    """Whether a card match is a card. Said plainly, it is, checksum or not: a card with one digit
    misheard is still a card to redact. Said hesitantly, or as a list with a comma between each
    group ("in 2019, 2020, 2021, 2022 we"), only with a valid checksum: years and counts are said
    so too. Running on into an expiry, with a valid checksum, or without one where its digits
    are said plainly (_PLAIN_CARD_DIGITS) and start as a payment card's do: counts said in fours
    run on into a number so too ("1000 1100 1200 1300 12 25"). Numbers said as a list run
    on so too ("2019, 2020, 2021, 2022, 12/25"): groups with a comma between each need the checksum,
    and so does an expiry written "12, 25", which after such groups is no expiry at all: six numbers
    with commas between them are a list, whatever their checksum ("5000, 5100, 5200, 5300, 10, 24")."""
    digits = re.sub(r"\D", "", card[0])
    if card["hesitant"] is not None:
        return luhn_valid(digits)
    groups_as_a_list = _GROUPS_AS_A_LIST.fullmatch(card[0]) is not None
    if card["expiry_after_run"] is None and card["expiry_after_groups"] is None:
        return not groups_as_a_list or luhn_valid(digits)
    if _EXPIRY_WITH_COMMA_AFTER.match(card.string, card.end()):
        return luhn_valid(digits) and not groups_as_a_list
    return luhn_valid(digits) or (not groups_as_a_list and _PLAIN_CARD_DIGITS.fullmatch(card[0]) is not None
                                  and digits[0] in _PAYMENT_CARD_FIRST_DIGITS)


def luhn_valid(digits: str) -> bool:
    """Whether `digits` pass the Luhn checksum every card number carries in its last digit."""
    total = 0
    for position, digit in enumerate(int(d) for d in reversed(digits)):
        doubled = digit * 2 if position % 2 else digit
        total += doubled - 9 if doubled > 9 else doubled
    return total % 10 == 0


def _matches(kind: str, text: str) -> Iterable[re.Match[str]]:
    """PATTERNS[kind]'s matches in `text`, leaving out card matches that are no card (_is_card),
    searching again from the next character, where another may start, and phone matches over a
    date (_DATE)."""
    pattern, position = PATTERNS[kind], 0
    if kind == "phone":
        text = _without_dates(text)
    while match := pattern.search(text, position):
        if kind == "card" and not _is_card(match):
            position = match.start() + 1
            continue
        yield match
        position = match.end()


# Blanks out what the kinds before found while a later kind is searched: no pattern matches it or
# runs across it, and one stands for each character blanked, so what is found keeps its place.
_FOUND = "\0"


def _without_dates(text: str) -> str:
    """`text` with its dates (_DATE) blanked out with _FOUND: a phone number said right after
    one is not read with it into one match ("am 12.05.2024 555-123-4567")."""
    return _DATE.sub(lambda date: _FOUND * len(date[0]), text)


def _masked(text: str, found: list[tuple[int, int, str]]) -> str:
    """`text` with what `found` covers blanked out with _FOUND."""
    pieces, position = [], 0
    for start, end, _ in sorted(found):
        pieces += [text[position:start], _FOUND * (end - start)]
        position = end
    return "".join(pieces) + text[position:]


def spans(text: str, kinds: Iterable[str]) -> list[tuple[int, int, str]]:
    """(start, end, kind) of what to redact in `text`, in order, none overlapping; the kinds
    are tried in REDACTABLE's order, so a card number is a card, not a phone or a number. Each
    kind is searched with what the kinds before it found blanked out: a phone number said right
    after a card ("4111 1111 1111 1111. 555-123-4567.") would otherwise be read with the card
    into one match that overlaps it, and be dropped, and left in clear, with it."""
    found: list[tuple[int, int, str]] = []
    for kind in (k for k in REDACTABLE if k in set(kinds)):
        for match in _matches(kind, _masked(text, found)):
            found += [(start, end, kind) for start, end in (_phones(match) if kind == "phone" else [match.span()])]
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
