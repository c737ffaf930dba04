"""What the transcriber rewrites in a job's text (README "Redaction", "Custom spelling") where
Whisper writes digits, addresses and Latin words against Chinese, Japanese or Thai, which have no
spaces between words, and where a pause puts a full stop in a card number."""

from __future__ import annotations

import pytest

from common.messages import Segment, Word
from services.transcriber.redaction import redact_text
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
