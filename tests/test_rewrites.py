"""What the transcriber rewrites in a job's text (README "Redaction", "Custom spelling") where
Whisper writes digits, addresses and Latin words against Chinese, Japanese or Thai, which have no
spaces between words, and where a pause puts a full stop in a card number."""

from __future__ import annotations

import time

import pytest

from common.messages import JobOptions, Segment, Word
from services.transcriber.redaction import redact, redact_text
from services.transcriber.spelling import respell


@pytest.mark.parametrize("said, stored", [
    ("我的电话是13812345678。", "我的电话是[PHONE]。"),
    ("電話番号は090-1234-5678です", "電話番号は[PHONE]です"),
    ("โทร0812345678ครับ", "โทร[PHONE]ครับ"),
    # Digits against a Latin letter or a full stop are part of something else (a code, "no.").
    ("Order A5551234567 or no.5551234567.", "Order A5551234567 or no.5551234567."),
])
def test_a_phone_number_written_against_chinese_japanese_or_thai_is_redacted_whole(said, stored):
    assert redact_text(said, ["phone"]) == stored


@pytest.mark.parametrize("said, stored", [
    ("It's 4111 1111. 1111 1111. Thanks.", "It's [CARD]. Thanks."),
    ("It's 4111, 1111. 1111, 1111.", "It's [CARD]."),
    ("我的卡号是4111 1111. 1111 1111。", "我的卡号是[CARD]。"),
    # Its expiry said after it, or a number said before, stays outside; twenty digits are no card.
    ("The card is 4111 1111. 1111 1111. 0427. 737.", "The card is [CARD]. 0427. 737."),
    ("In 2019. 4111, 1111. 1111 1111 was it.", "In 2019. [CARD] was it."),
    ("4111 1111. 1111 1111 2222.", "4111 1111. 1111 1111 2222."),
])
def test_a_card_number_said_with_a_pause_between_its_groups_is_found_whole(said, stored):
    assert redact_text(said, ["card"]) == stored


@pytest.mark.parametrize("said, stored", [
    ("我的邮箱是anna@example.org", "我的邮箱是[EMAIL]"),
    ("メールはanna.p+work@mail.example.orgです", "メールは[EMAIL]です"),
    ("我的邮箱是anna at example dot com谢谢", "我的邮箱是[EMAIL]谢谢"),
])
def test_an_address_written_against_chinese_or_japanese_takes_only_the_address(said, stored):
    assert redact_text(said, ["email"]) == stored


def test_custom_spelling_of_a_latin_phrase_is_found_inside_chinese():
    words = [Word(word=w, start=i, end=i + 1) for i, w in enumerate(["我们用", "gpt写", "代码,", " gpts", " gpt."])]
    segment = Segment(index=0, speaker="spk_0", start_ts=0, end_ts=5, text="我们用gpt写代码, gpts gpt.", words=words)
    [spelled] = respell([segment], {"gpt": "GPT-4o"})
    assert spelled.text == "我们用GPT-4o写代码, gpts GPT-4o."
    assert [(w.word, w.start, w.end) for w in spelled.words] == [
        ("我们用", 0, 1), ("GPT-4o写", 1, 2), ("代码,", 2, 3), (" gpts", 3, 4), (" GPT-4o.", 4, 5)]


@pytest.mark.parametrize("said, stored", [
    # Groups said hesitantly, as Whisper writes them.
    ("It's 4111... 1111... 1111... 1111.", "It's [CARD]."),
    ("It's 4111 - 1111 - 1111 - 1111, thanks.", "It's [CARD], thanks."),
    # An expiry said right after the card made one run too long for a card: nothing was redacted,
    # or with a comma the month was taken in ("[CARD]/25").
    ("It's 4111 1111 1111 1111 12 25 and 737.", "It's [CARD] 12 25 and 737."),
    ("Card 4111 1111 1111 1111 1225.", "Card [CARD] 1225."),
    ("Card 4111 1111 1111 1111, 12/25, 737.", "Card [CARD], 12/25, 737."),
    ("Card 4111... 1111... 1111... 1111, 12/25.", "Card [CARD], 12/25."),
    # Not a card: numbers with no expiry after them, years, amounts, a date.
    ("Codes 4111 1111 1111 1111 1111 1111.", "Codes 4111 1111 1111 1111 1111 1111."),
    ("From 2019 - 2020 - 2021 we sold 1,000,000 units, 12/25 of them abroad.",
     "From 2019 - 2020 - 2021 we sold 1,000,000 units, 12/25 of them abroad."),
])
def test_a_card_number_said_hesitantly_or_with_its_expiry_is_redacted_without_the_expiry(said, stored):
    assert redact_text(said, ["card"]) == stored


@pytest.mark.parametrize("said, stored", [
    ("Write to anna underscore smith at example dot com.", "Write to [EMAIL]."),
    ("It's john dash doe at gmail dot com", "It's [EMAIL]"),
    ("Mail anna at acme dash shop dot com, thanks.", "Mail [EMAIL], thanks."),
    ("Mail anna@example dot com today.", "Mail [EMAIL] today."),
    ("Mail anna@müller.de or anna@пример.рф.", "Mail [EMAIL] or [EMAIL]."),
    ("Schreib an anna hyphen lee at müller dot de.", "Schreib an [EMAIL]."),
    ("メールはanna@müller.deです", "メールは[EMAIL]です"),
    # Speech with those words in it but no address stays.
    ("Look at this, dot com boom.", "Look at this, dot com boom."),
    ("We made a dash at the park and went home dot.", "We made a dash at the park and went home dot."),
    ("Meet at 5 dot 30 in the dot com era.", "Meet at 5 dot 30 in the dot com era."),
])
def test_an_address_spoken_with_joiners_or_with_letters_beyond_ascii_is_redacted_whole(said, stored):
    assert redact_text(said, ["email"]) == stored


@pytest.mark.parametrize("said, stored", [
    # Years and counts said with dashes or ellipses between them have no valid checksum.
    ("Between 2019 - 2020 - 2021 - 2022 we grew.", "Between 2019 - 2020 - 2021 - 2022 we grew."),
    ("We paid 1200… 1300… 1400… 1500 for it.", "We paid 1200… 1300… 1400… 1500 for it."),
    ("We had 1500 – 2000 – 2500 – 3000 people.", "We had 1500 – 2000 – 2500 – 3000 people."),
    ("Then the count went 1000 1100 1200 1300 12 25.", "Then the count went 1000 1100 1200 1300 12 25."),
    # Four groups within a longer run are no card, whatever their checksum.
    ("In 1998 - 1999 - 2000 - 2001 - 2002 it rained.", "In 1998 - 1999 - 2000 - 2001 - 2002 it rained."),
    ("Codes 4111 - 1111 - 1111 - 1111 - 1111.", "Codes 4111 - 1111 - 1111 - 1111 - 1111."),
    # A card said hesitantly has one break between all its groups; with its checksum it is a card.
    ("It's 4111… 1111… 1111… 1111, thanks.", "It's [CARD], thanks."),
    ("It's 4111 – 1111 – 1111 – 1111 – 12/25.", "It's [CARD] – 12/25."),
])
def test_numbers_said_one_after_another_with_dashes_or_ellipses_are_no_card_unless_the_checksum_holds(said, stored):
    assert redact_text(said, ["card"]) == stored


@pytest.mark.parametrize("said, stored", [
    # A card with one digit misheard (its checksum fails) and its expiry said straight after it:
    # the card is replaced as when said on its own, the expiry stays.
    ("Card 4111 1111 1111 1112, 12/25, thanks.", "Card [CARD], 12/25, thanks."),
    ("Card 4111 1111 1111 1112 12 25 and 737.", "Card [CARD] 12 25 and 737."),
    ("Card 5500-0000-0000-0005 1225.", "Card [CARD] 1225."),
    ("Card 4111111111111112, 12/25.", "Card [CARD], 12/25."),
    # Groups said hesitantly with a pause, not the same break, between some: a card with its checksum.
    ("It's 4111... 1111. 1111. 1111.", "It's [CARD]."),
    ("It's 4111 - 1111, 1111... 1111, 12/25.", "It's [CARD], 12/25."),
    # Without it, or within a longer run, years and codes said so stay.
    ("In 2019... 2020. 2021. 2022. we grew.", "In 2019... 2020. 2021. 2022. we grew."),
    ("Codes 4111... 1111. 1111. 1111... 1111.", "Codes 4111... 1111. 1111. 1111... 1111."),
])
def test_a_card_with_a_misheard_digit_before_its_expiry_or_said_with_mixed_breaks_is_redacted(said, stored):
    assert redact_text(said, ["card"]) == stored


@pytest.mark.parametrize("said", [
    # A sentence after "dot" is no top-level domain.
    "We were looking at mid dash year dot So we waited.",
    "We were at Coca dash Cola dot Then we left.",
    # A domain beyond ASCII written down after a spoken "at" (not "@") is speech run together.
    "Let's meet at Müller.de tomorrow.",
    "Er war at Köln.Da ging er.",
    # A country code that is a word too, with the sentence going on after it, ends no address;
    # nor does a word of a sentence said as the name or the domain.
    "Staring at the dot in the middle",
    "I am at home dot so what",
    "we looked at it dot by dot",
    "Connect the dots at one dot to another dot",
    "Staring at the dot IN THE middle",
    "We laughed at the dot com bubble.",
])
def test_speech_that_looks_like_a_spoken_address_stays(said):
    assert redact_text(said, ["email"]) == said


@pytest.mark.parametrize("said, stored", [
    ("anna at example dot com", "[EMAIL]"),
    ("boris dot petrov at gmail dot com", "[EMAIL]"),
    ("Write to anna at web dot de, thanks.", "Write to [EMAIL], thanks."),
    ("Schreib an anna at web dot de und dann", "Schreib an [EMAIL] und dann"),
    ("Mail anna at example dot it, thanks.", "Mail [EMAIL], thanks."),
    ("Mail john at icloud dot me and that is it", "Mail [EMAIL] and that is it"),
    ("Schreib anna at web dot it danke", "Schreib [EMAIL] danke"),
    ("Mail anna at example dot co dot uk", "Mail [EMAIL]"),
    ("Schreib an helpdesk at it dot example dot edu oder anna at me dot com.", "Schreib an [EMAIL] oder [EMAIL]."),
])
def test_a_spoken_address_ending_in_a_country_code_or_with_a_short_word_in_its_domain_is_redacted(said, stored):
    assert redact_text(said, ["email"]) == stored


@pytest.mark.parametrize("joiner", ["dot", "underscore", "dash"])
def test_a_long_run_of_joined_words_is_searched_for_addresses_in_linear_time(joiner):
    """Each word of the run was tried as an address's start and read to the run's end: 20,000
    characters of "a dot a dot ..." took seconds. At 40,000 the quadratic search takes 2 to 10 s
    of CPU, the linear one under 0.02 s. CPU time, not wall-clock time: a loaded machine stalls
    the process without making the search any slower."""
    run = f"a {joiner} " * (40_000 // len(f"a {joiner} "))
    started = time.process_time()
    assert redact_text(run, ["email"]) == run
    assert redact_text(run + "anna at example dot com", ["email"]) == "[EMAIL]"
    assert time.process_time() - started < 0.5


def test_custom_spelling_of_a_turkish_word_with_a_capital_dotted_i_matches_it():
    """str.lower() made the heard side "İstanbul" an "i" and a combining dot, which no word
    Whisper writes has: the rule never applied."""
    words = [Word(word=w, start=i, end=i + 1) for i, w in enumerate(["İstanbul", " ISTANBUL", " i\u0307stanbul."])]
    segment = Segment(index=0, speaker="spk_0", start_ts=0, end_ts=3, text="".join(w.word for w in words), words=words)
    for spelling in ({"İstanbul": "Istanbul"}, "istanbul=Istanbul", {"i\u0307stanbul": "Istanbul"}):
        [spelled] = respell([segment], JobOptions(spelling=spelling).spelling)
        assert spelled.text == "Istanbul Istanbul Istanbul."
    assert JobOptions(spelling="İzmir=Izmir").spelling == {"izmir": "Izmir"}
    with pytest.raises(ValueError, match="'izmir' is given twice"):
        JobOptions(spelling="İzmir=Izmir, izmir=İzmir")


def said_by(speaker: str, *timed: tuple[str, float], index: int = 0) -> Segment:
    """A segment as the transcriber makes it: Whisper's words (each with its space before it)
    given to the speaker talking under them."""
    words = [Word(word=w, start=t, end=round(t + 0.4, 3), probability=0.9) for w, t in timed]
    return Segment(index=index, speaker=speaker, start_ts=words[0].start, end_ts=words[-1].end,
                   text="".join(w.word for w in words).strip(), words=words)


def test_a_number_whose_words_went_to_two_speakers_is_redacted_in_both():
    """Where B talks over A, the word-level speaker assignment can give the end of A's number to
    B: each speaker's words alone hold no phone number, everyone's in the order said do."""
    a = said_by("spk_0", (" My", 0), (" number", 0.5), (" is", 1), (" 555", 1.5), (" 123", 2))
    b = said_by("spk_1", (" 4567.", 2.5), (" Got", 3.1), (" it.", 3.4), index=1)
    redacted = redact([a, b], ["phone"])
    assert [(s.index, s.speaker, s.text) for s in redacted] == [
        (0, "spk_0", "My number is [PHONE]"), (1, "spk_1", "[PHONE]. Got it.")]
    # Each part is one word over its own words' time, in its own segment: both are silenced.
    assert [(w.word, w.start, w.end) for s in redacted for w in s.words if "PHONE" in w.word] == [
        (" [PHONE]", 1.5, 2.4), (" [PHONE].", 2.5, 2.9)]
    assert [(s.start_ts, s.end_ts) for s in redacted] == [(0, 2.4), (2.5, 3.8)]
    # Given back and forth (A, B, A): still one number, each part in its own speaker's segment.
    first = said_by("spk_0", (" Call", 0), (" 555", 0.5))
    middle = said_by("spk_1", (" 123", 1.0), index=1)
    last = said_by("spk_0", (" 4567", 1.5), (" please.", 2.0), index=2)
    assert [s.text for s in redact([first, middle, last], ["phone"])] == ["Call [PHONE]", "[PHONE]", "[PHONE] please."]


def test_two_speakers_own_numbers_are_not_joined_into_one():
    """A's phone number is found in A's words; B's "12" a second later is B's own and stays, as
    does a number said after everyone was silent for JOIN_GAP_S."""
    a = said_by("spk_0", (" It's", 0), (" 555", 0.5), (" 1234.", 1))
    b = said_by("spk_1", (" 12", 2.4), (" minutes?", 2.8), index=1)
    assert [s.text for s in redact([a, b], ["phone"])] == ["It's [PHONE].", "12 minutes?"]
    late = said_by("spk_1", (" 4567", 5.5), index=1)
    half = said_by("spk_0", (" It's", 0), (" 555", 0.5), (" 123", 1))
    assert [s.text for s in redact([half, late], ["phone"])] == ["It's 555 123", "4567"]
    # Spelling is searched in each speaker's words only, as before.
    assert [s.text for s in respell([half, b], {"123 12": "x"})] == ["It's 555 123", "12 minutes?"]


def test_a_reply_after_a_pause_is_not_joined_into_one_number_with_what_was_said_before():
    """Only words said over each other are searched across speakers: B's "2020," answering
    after A's "2019." is two years, not an eight-digit phone number; B's "4567" said on top of
    the end of A's "555 123" still makes one."""
    a = said_by("spk_0", (" It", 0), (" started", 0.4), (" in", 0.8), (" 2019.", 1.2))
    b = said_by("spk_1", (" 2020,", 2.2), (" I", 2.6), (" think.", 2.9), index=1)
    assert [s.text for s in redact([a, b], ["phone"])] == ["It started in 2019.", "2020, I think."]
    # A quicker answer, still after A stopped (0.5 s): two things said.
    quick = said_by("spk_1", (" 2020,", 2.1), index=1)
    assert [s.text for s in redact([a, quick], ["phone"])] == ["It started in 2019.", "2020,"]
    # Said over each other (B starts before A's "123" ends) or right after it: one number.
    for at in (2.2, 2.45):
        mine = said_by("spk_0", (" My", 0), (" number", 0.5), (" is", 1), (" 555", 1.5), (" 123", 2))
        theirs = said_by("spk_1", (" 4567", at), index=1)
        assert [s.text for s in redact([mine, theirs], ["phone"])] == ["My number is [PHONE]", "[PHONE]"]


def test_one_segments_words_of_a_number_with_another_speakers_between_them_get_one_label():
    """A's segment holds "555" and "4567" with B's "123" said between them in time: A's part of
    the number is one word, one [PHONE], over both of A's words."""
    a = said_by("spk_0", (" Call", 0), (" 555", 0.5), (" 4567", 1.3), (" please.", 1.8))
    b = said_by("spk_1", (" 123", 0.9), index=1)
    redacted = redact([a, b], ["phone"])
    assert [s.text for s in redacted] == ["Call [PHONE] please.", "[PHONE]"]
    assert [(w.word, w.start, w.end) for w in redacted[0].words] == [
        (" Call", 0, 0.4), (" [PHONE]", 0.5, 1.7), (" please.", 1.8, 2.2)]


@pytest.mark.parametrize("said, kinds, stored", [
    # A card said hesitantly with its expiry or its code straight after it: the four groups are the
    # card, what follows stays, as when said plainly ("Card [CARD] 1225.").
    ("Card 4111 – 1111 – 1111 – 1111 – 1225.", "card,phone,email", "Card [CARD] – 1225."),
    ("Card 4111 – 1111 – 1111 – 1111 – 12 – 25.", "card,phone,email", "Card [CARD] – 12 – 25."),
    ("Card 4111… 1111… 1111… 1111… 12… 25.", "card,phone,email", "Card [CARD]… 12… 25."),
    ("Card 4111 – 1111 – 1111 – 1111, 737.", "card,phone,email", "Card [CARD], 737."),
    ("Card 4111… 1111… 1111… 1111 1225.", "card,phone,email", "Card [CARD] 1225."),
    ("4111 - 1111 - 1111 - 1111, 737.", "card", "[CARD], 737."),
    ("Card 4111 — 1111 — 1111 — 1111, 12/25.", "card", "Card [CARD], 12/25."),
    ("Card 4111. 1111. 1111. 1111, 737.", "card", "Card [CARD], 737."),
    # The expiry's month and year said with a pause between them.
    ("4111 1111 1111 1111, 12, 25.", "card", "[CARD], 12, 25."),
    ("4111111111111111 12, 25.", "card", "[CARD] 12, 25."),
    # Groups said as sentences and the expiry straight after: all four groups are the card, also
    # with a digit misheard.
    ("4111. 1111. 1111. 1111 1225.", "card", "[CARD] 1225."),
    ("4111. 1111. 1111. 1112 1225.", "card", "[CARD] 1225."),
    # Still no card: years and counts, a longer run, years said as sentences and then a count.
    ("Between 2019 – 2020 – 2021 – 2022 – 1225.", "card", "Between 2019 – 2020 – 2021 – 2022 – 1225."),
    ("Codes 4111 – 1111 – 1111 – 1111 – 1111 – 737.", "card", "Codes 4111 – 1111 – 1111 – 1111 – 1111 – 737."),
    ("In 2019. 2020. 2021. 2022, 100 people came.", "card", "In 2019. 2020. 2021. 2022, 100 people came."),
])
def test_a_card_said_hesitantly_or_in_sentences_is_redacted_without_the_expiry_or_code_after_it(said, kinds, stored):
    assert redact_text(said, kinds.split(",")) == stored


@pytest.mark.parametrize("said, stored", [
    # Digits said hesitantly, as Whisper writes them.
    ("Call 555 – 123 – 4567.", "Call [PHONE]."),
    ("Call 555… 123… 4567.", "Call [PHONE]."),
    ("Call 555… 1234.", "Call [PHONE]."),
    ("Call 555 — 123 — 4567.", "Call [PHONE]."),
    ("Call +49 – 30 – 1234567", "Call [PHONE]"),
    # An area code with a slash after it, as written in German.
    ("Meine Nummer ist 089/123456.", "Meine Nummer ist [PHONE]."),
    ("Meine Nummer ist 089 / 123456.", "Meine Nummer ist [PHONE]."),
    ("0171/2345678, 089/123456", "[PHONE], [PHONE]"),
    # Dates and fractions have no area code.
    ("Am 12/25/2024, am 01/12/2024 und 05/2027: 3/4 davon, 1,000,000 / 2.",
     "Am 12/25/2024, am 01/12/2024 und 05/2027: 3/4 davon, [PHONE] / 2."),
])
def test_a_phone_number_said_hesitantly_or_with_a_slash_after_its_area_code_is_redacted_whole(said, stored):
    assert redact_text(said, ["phone"]) == stored


def test_a_number_match_across_speakers_leaves_a_speakers_other_numbers_in_the_same_word():
    """A's "9:30" is two numbers; B's "555 1234" said over its end makes "30 555 1234" a phone
    number across both. The "9" is not in it and stays a number: it was left in clear."""
    def said(speaker: str, index: int, *timed: tuple[str, float, float]) -> Segment:
        words = [Word(word=w, start=start, end=end, probability=0.9) for w, start, end in timed]
        return Segment(index=index, speaker=speaker, start_ts=words[0].start, end_ts=words[-1].end,
                       text="".join(w.word for w in words).strip(), words=words)

    a = said("spk_0", 0, (" meet", 0.5, 0.65), (" at", 0.65, 0.8), (" 9:30", 0.8, 1.0))
    b = said("spk_1", 1, (" 555", 0.8, 1.1), (" 1234", 1.1, 1.5))
    redacted = redact([a, b], ["phone", "number"])
    assert [s.text for s in redacted] == ["meet at [NUMBER]:[PHONE]", "[PHONE]"]
    assert [(w.word, w.start, w.end) for w in redacted[0].words] == [
        (" meet", 0.5, 0.65), (" at", 0.65, 0.8), (" [NUMBER]:[PHONE]", 0.8, 1.0)]


def test_a_match_across_speakers_that_covers_part_of_a_speakers_own_one_leaves_nothing_in_clear():
    """A's "089/1234567" is a phone number; B's "1234567?" said over its end makes "1234567
    1234567" a card across both. It stood instead of A's phone number and left "089/" in clear."""
    a = said_by("spk_0", (" Ruf", 0), (" 089/1234567", 0.5))
    b = said_by("spk_1", (" 1234567?", 0.6), index=1)
    for kinds in (["card", "phone", "number"], ["card", "phone"]):
        assert [s.text for s in redact([a, b], kinds)] == ["Ruf [PHONE]", "[PHONE]?"]


@pytest.mark.parametrize("words, spelled", [
    # README's example: the written side's full stop and the sentence's are one.
    ([" We", " joined", " acme", " corp."], "We joined ACME Corp."),
    ([" We", " joined", " acme", " corp", " last", " year."], "We joined ACME Corp. last year."),
    ([" acme", " corp..."], "ACME Corp..."),
    ([" Is", " it", " acme", " corp?"], "Is it ACME Corp.?"),
])
def test_a_spelling_ending_in_a_full_stop_said_at_a_sentences_end_has_one(words, spelled):
    timed = [Word(word=w, start=i, end=i + 1) for i, w in enumerate(words)]
    segment = Segment(index=0, speaker="spk_0", start_ts=0, end_ts=len(words), text="".join(words).strip(), words=timed)
    [respelled] = respell([segment], JobOptions(spelling="confu i=ComfyUI, acme corp=ACME Corp.").spelling)
    assert respelled.text == spelled
    assert respelled.words[-1].end == len(words)


@pytest.mark.parametrize("said", [
    # Four numbers said as a list and then two more were taken for a card with its expiry: with an
    # expiry written "12, 25" and no checksum; with both written with commas, checksum or not
    # (5000510052005300 has one); with the four written with commas, an expiry and no checksum.
    "sales in 2019, 2020, 2021, 2022, 12, 25 percent",
    "figures 5000, 5100, 5200, 5300, 10, 24",
    "In 2019, 2020, 2021, 2022, 12, 25 of them.",
    "sales in 2019 2020 2021 2022, 12, 25 percent",
    "sales in 2019, 2020, 2021, 2022 12, 25 percent",
    "sales in 2019, 2020, 2021, 2022, 12/25 of them abroad",
])
def test_a_list_of_four_numbers_with_two_more_after_it_is_no_card(said):
    assert redact_text(said, ["card"]) == said


@pytest.mark.parametrize("said, stored", [
    # With its checksum a card said with commas, or with its expiry written "12, 2025", is a card:
    # the expiry after it stays.
    ("4111, 1111, 1111, 1111, 12/25.", "[CARD], 12/25."),
    ("Card 4111 1111 1111 1111 12, 2025.", "Card [CARD] 12, 2025."),
])
def test_a_card_said_with_commas_before_its_expiry_is_redacted_with_its_checksum(said, stored):
    assert redact_text(said, ["card"]) == stored


@pytest.mark.parametrize("said, stored", [
    # Four numbers with a comma between each and nothing after them are a list, not a card,
    # unless their digits pass the checksum.
    ("Sales in 2019, 2020, 2021, 2022 were flat.", "Sales in 2019, 2020, 2021, 2022 were flat."),
    ("We booked room 1200, 1300, 1400, 1500", "We booked room 1200, 1300, 1400, 1500"),
    ("It's 4111, 1111, 1111, 1111.", "It's [CARD]."),
    ("It's 4111,1111,1111,1111 thanks", "It's [CARD] thanks"),
])
def test_four_numbers_said_as_a_list_are_a_card_only_with_the_checksum(said, stored):
    assert redact_text(said, ["card"]) == stored


@pytest.mark.parametrize("heard, said, stored", [
    # A vowel sign or virama (a combining mark, which Python's \w leaves out) goes on the word.
    ("राम", "रामायण में राम आए", "रामायण में Ram आए"),
    ("राम", "राम्या और राम", "राम्या और Ram"),
    ("मत", "इसकी कीमत क्या है? मत पूछो", "इसकी कीमत क्या है? Mat पूछो"),
    ("cafe", "cafe\u0301 or cafe", "cafe\u0301 or Cafe"),
])
def test_custom_spelling_is_not_applied_inside_a_word_whose_next_or_last_letter_is_a_combining_mark(
        heard, said, stored):
    written = {"राम": "Ram", "मत": "Mat", "cafe": "Cafe"}[heard]
    words = [Word(word=(" " if i else "") + w, start=i, end=i + 1) for i, w in enumerate(said.split())]
    segment = Segment(index=0, speaker="spk_0", start_ts=0, end_ts=len(words), text=said, words=words)
    [spelled] = respell([segment], JobOptions(spelling=f"{heard}={written}").spelling)
    assert spelled.text == stored


def test_custom_spelling_typed_with_combining_accents_matches_the_precomposed_words_whisper_writes():
    """"nguyễn" typed with combining accents (as macOS may write it) was kept so, and never matched
    Whisper's precomposed "Nguyễn": the pair was accepted and did nothing."""
    import unicodedata

    decomposed = unicodedata.normalize("NFD", "nguyễn=Nguyễn Văn A")
    assert JobOptions(spelling=decomposed).spelling == {"nguyễn": "Nguyễn Văn A"}
    with pytest.raises(ValueError, match="is given twice"):
        JobOptions(spelling=f"nguyễn=X, {unicodedata.normalize('NFD', 'nguyễn')}=Y")
    said = "Anh Nguyễn nói, " + unicodedata.normalize("NFD", "Nguyễn") + " nghe."
    words = [Word(word=(" " if i else "") + w, start=i, end=i + 1) for i, w in enumerate(said.split())]
    segment = Segment(index=0, speaker="spk_0", start_ts=0, end_ts=len(words), text=said, words=words)
    for spelling in (decomposed, {unicodedata.normalize("NFD", "nguyễn"): "Nguyễn Văn A"}):
        [spelled] = respell([segment], JobOptions(spelling=spelling).spelling)
        assert spelled.text == "Anh Nguyễn Văn A nói, Nguyễn Văn A nghe."
