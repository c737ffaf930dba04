"""Pure logic that decides what users see: chunk plans, word-to-speaker assignment, contracts,
and which heavy libraries each service pulls in (what its image must carry)."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
from pydantic import ValidationError

from common.messages import JobOptions, Segment, SpeakerTurn, TimeSpan, Word, language_choices, person_name
from common.turns import speech_regions
from services.diarizer.pipeline import language_probe, plan_chunks
from services.ingest.inbox import drop_options
from services.transcriber.languages import Passage, language_spans, passages
from services.transcriber.redaction import redact, redact_text, redact_words
from services.transcriber.spelling import respell
from services.transcriber.whisper import _clips, _heard_times, _runs_by_speaker, _talked_over, speaker_of
from tests.conftest import ROOT


def turn(speaker: str, start: float, end: float) -> SpeakerTurn:
    return SpeakerTurn(speaker=speaker, start=start, end=end)


def test_chunks_tile_the_file_and_cut_between_turns():
    turns = [turn("spk_0", i * 10.0, i * 10.0 + 8.0) for i in range(10)]  # 80 s of speech
    chunks = plan_chunks(turns, duration=100.0, max_speech_s=25.0)
    assert [len(t) for _, t in chunks] == [3, 3, 3, 1]
    assert chunks[0][0].start == 0.0 and chunks[-1][0].end == 100.0
    for (span, group), (following, _) in zip(chunks, chunks[1:]):
        assert span.end == following.start  # no gap, no overlap: no word lost or doubled
        assert group[-1].end <= span.end <= following.start + 2.0
    assert [t for _, group in chunks for t in group] == turns


def test_a_turn_longer_than_a_chunk_is_cut_into_chunks_within_the_limit():
    """One chunk is one delivery: a 10-minute turn in one chunk could outlast the broker's
    acknowledgement timeout in the transcriber."""
    chunks = plan_chunks([turn("spk_0", 0, 5), turn("spk_1", 6, 600), turn("spk_0", 601, 605)], 610, 300)
    assert [[(t.speaker, t.start, t.end) for t in group] for _, group in chunks] == [
        [("spk_0", 0, 5)], [("spk_1", 6, 303)], [("spk_1", 303, 600)], [("spk_0", 601, 605)]]
    assert [span.start for span, _ in chunks] == [0, 5.5, 303, 600.5]  # the parts meet where the turn is cut
    # Two people talking over each other throughout, one of them pausing: cut with both.
    crosstalk = plan_chunks([turn("spk_0", 0, 700), turn("spk_1", 1, 350), turn("spk_1", 351, 699)], 700, 300)
    assert max(sum(t.end - t.start for t in speech_regions(group)) for _, group in crosstalk) <= 300
    assert [sorted({t.speaker for t in group}) for _, group in crosstalk] == [["spk_0", "spk_1"]] * 3


def test_a_word_where_two_stitched_regions_meet_is_not_stretched_over_the_silence_between():
    to_chunk = _heard_times([TimeSpan(start=0.0, end=1.0), TimeSpan(start=3.0, end=4.0)])
    assert to_chunk(0.6, 1.0) == (0.6, 1.0) and to_chunk(1.0, 1.5) == (3.0, 3.5)
    # Timed a little across the junction: kept in the region its end is in (Whisper starts the
    # first word after a pause early, and ends it where it ends).
    assert to_chunk(0.7, 1.1) == pytest.approx((3.0, 3.1)) and to_chunk(0.9, 1.3) == pytest.approx((3.0, 3.3))


def test_batched_clips_end_where_regions_join_or_in_a_pause_and_hold_at_most_a_whisper_window():
    spans = [TimeSpan(start=0, end=12), TimeSpan(start=20, end=35), TimeSpan(start=40, end=48),
             TimeSpan(start=50, end=120)]  # 12 + 15 + 8 + 70 s of speech, laid end to end
    clips = _clips(spans, pauses=[80.0, 100.0])  # two pauses inside the last region
    assert [(c["start"], c["end"]) for c in clips] == [(0, 27), (27, 35), (35, 65), (65, 85), (85, 105)]
    # Talk with no pause at all: cut where the window is full.
    assert [(c["start"], c["end"]) for c in _clips([TimeSpan(start=5, end=75)], [])] == [(0, 30), (30, 60), (60, 70)]


def test_batched_clips_are_never_too_short_for_whisper_to_hear():
    """A language part cut in a pause starts where the pause is, give or take a float's rounding:
    the pause ~1e-14 s into the part was a place to cut, and faster-whisper was handed a clip of
    no samples, crashed in its word alignment, and the job failed. No clip is shorter than
    CLIP_MIN_S, nor longer than CLIP_MAX_S."""
    from services.transcriber.whisper import CLIP_MAX_S, CLIP_MIN_S

    cases = [([TimeSpan(start=10, end=50)], [10 + 1e-14]), ([TimeSpan(start=10, end=50)], [50 - 1e-14]),
             ([TimeSpan(start=0, end=10), TimeSpan(start=20, end=20 + 1e-14), TimeSpan(start=30, end=55)], []),
             ([TimeSpan(start=10, end=40.01)], []), ([TimeSpan(start=10, end=40.03)], [])]
    for spans, pauses in cases:
        clips = _clips(spans, pauses)
        assert all(CLIP_MIN_S <= c["end"] - c["start"] <= CLIP_MAX_S for c in clips), (spans, pauses, clips)
        # End to end, all of it.
        assert clips[0]["start"] == 0 and all(a["end"] == b["start"] for a, b in zip(clips, clips[1:]))
        assert clips[-1]["end"] == pytest.approx(sum(s.end - s.start for s in spans)), clips
    assert [(c["start"], c["end"]) for c in _clips([TimeSpan(start=10, end=50)], [10 + 1e-14])] == [(0, 30), (30, 40)]
    assert _clips([TimeSpan(start=10, end=10.01)], []) == []  # nothing Whisper could time a word in


def test_a_chunk_ends_in_a_wide_pause_near_its_end_rather_than_a_narrow_one():
    """Each chunk is heard with 0.3 s more audio on each side: at a 0.1 s hand-over both would
    hear the same words, and a word timed differently by each could be written twice or never."""
    turns = [turn("spk_0", 0, 4), turn("spk_1", 5.5, 8), turn("spk_0", 8.1, 10), turn("spk_1", 10.1, 13)]
    chunks = plan_chunks(turns, duration=14.0, max_speech_s=10.0)
    assert [[t.start for t in group] for _, group in chunks] == [[0], [5.5, 8.1, 10.1]]
    assert chunks[0][0].end == 4.75  # in the middle of the 1.5 s pause
    # A pause wide enough where the budget ends: the cut stays there.
    wide = [turn("spk_0", 0, 4), turn("spk_1", 5.5, 8), turn("spk_0", 8.1, 10), turn("spk_1", 11.0, 13)]
    assert [len(group) for _, group in plan_chunks(wide, 14.0, 10.0)] == [3, 1]


def test_a_turn_of_no_length_is_no_speech_to_plan():
    chunks = plan_chunks([turn("spk_0", 0, 2), turn("spk_1", 5, 5), turn("spk_0", 5, 7)], 8, 2)
    assert [[(t.speaker, t.start, t.end) for t in turns] for _, turns in chunks] == [
        [("spk_0", 0, 2)], [("spk_0", 5, 7)]]


def test_no_speech_plans_one_empty_chunk():
    [(span, turns)] = plan_chunks([], 12.0, 300)
    assert (span.start, span.end, turns) == (0.0, 12.0, [])


def test_language_probe_takes_the_first_30_seconds_of_speech():
    probe = language_probe([turn("a", 0, 20), turn("b", 25, 40), turn("a", 50, 60)])
    assert [(s.start, s.end) for s in probe] == [(0, 20), (25, 35)]


def test_words_go_to_the_speaker_who_overlaps_most_or_the_nearest():
    turns = [turn("spk_0", 0.0, 2.0), turn("spk_1", 2.5, 5.0)]
    assert speaker_of(1.9, 2.8, turns) == "spk_1"  # 0.1 s in spk_0's turn, 0.3 s in spk_1's
    assert speaker_of(0.5, 1.0, turns) == "spk_0"
    assert speaker_of(2.1, 2.3, turns) == "spk_0"  # in the gap, nearer spk_0's end
    assert speaker_of(9.0, 9.5, turns) == "spk_1"  # after all turns


def test_segments_break_at_speaker_changes_and_long_pauses():
    turns = [turn("spk_0", 0.0, 4.0), turn("spk_1", 4.2, 20.0)]
    words = [Word(word=w, start=s, end=s + 0.3) for w, s in
             [(" Hi", 0.1), (" there.", 0.5), (" Hello", 4.5), (" you.", 4.9), (" Later", 8.0)]]
    runs = _runs_by_speaker(words, [None] * len(words), turns)
    assert [(s, "".join(w.word for w in r).strip()) for s, r, _ in runs] == [
        ("spk_0", "Hi there."), ("spk_1", "Hello you."), ("spk_1", "Later")]
    # A speaker who switches language gets a segment per language.
    runs = _runs_by_speaker(words[2:4], ["en", "de"], turns)
    assert [(s, language) for s, _, language in runs] == [("spk_1", "en"), ("spk_1", "de")]


def test_a_recording_that_switches_language_is_cut_where_the_passage_language_changes():
    turns = [turn("spk_0", 0, 5), turn("spk_0", 5.5, 9), turn("spk_1", 9.2, 9.8), turn("spk_1", 10, 20),
             turn("spk_0", 12, 13), turn("spk_0", 21, 30)]
    runs = passages(turns, offset=0.0, length_s=31.0)
    assert [(r.start, r.end, r.speaker) for r in runs] == [
        (0, 9, "spk_0"), (9.2, 20, "spk_1"), (12, 13, "spk_0"), (21, 30, "spk_0")]
    for run, language in zip(runs, ["en", "de", "en", "en"]):
        run.language = language
    # spk_0's "en" inside spk_1's German passage is heard with it; cuts fall 0.3 s before a passage,
    # but never into the talk before it: halfway through a shorter pause (9.0 to 9.2).
    assert [(round(s.start, 3), round(s.end, 3), language) for s, language in language_spans(runs, 31.0, 0.3)] == [
        (0.0, 9.1, "en"), (9.1, 20.7, "de"), (20.7, 31.0, "en")]
    # Someone starts in another language while the speaker before is still talking: at their start.
    over = [Passage(0.0, 10.0, "spk_0", "en"), Passage(9.5, 20.0, "spk_1", "de")]
    assert [(s.start, s.end) for s, _ in language_spans(over, 20.0, 0.3)] == [(0.0, 9.5), (9.5, 20.0)]


def test_a_job_language_is_one_code_several_or_multi():
    assert JobOptions(language=" DE ").language == "de" and JobOptions(language="auto").language is None
    assert JobOptions(language="en, DE,en").language == "en,de" and language_choices("en,de") == ["en", "de"]
    assert JobOptions(language="multi").language == "multi" and "uk" in language_choices("multi")
    assert language_choices("en") is None and language_choices(None) is None
    assert drop_options({"X-Amz-Meta-Language": "en, de"}).language == "en,de"
    for bad in ("en,xx", "english", ","):
        with pytest.raises(ValidationError, match="unsupported language"):
            JobOptions(language=bad)


def test_overlapping_turns_stay_in_one_chunk_and_the_cut_is_in_silence():
    turns = [turn("spk_0", 0, 10), turn("spk_1", 8, 20), turn("spk_0", 19, 24), turn("spk_1", 30, 40)]
    chunks = plan_chunks(turns, duration=50.0, max_speech_s=25.0)
    assert [[(t.speaker, t.start) for t in group] for _, group in chunks] == [
        [("spk_0", 0), ("spk_1", 8), ("spk_0", 19)], [("spk_1", 30)]]
    assert chunks[0][0].end == 27.0  # halfway between the end of all talk (24) and 30
    probe = language_probe(turns, seconds=26)
    assert [(s.start, s.end) for s in probe] == [(0, 24), (30, 32)]  # overlap counted once


def test_a_chunk_may_end_where_one_speaker_hands_over_to_the_next():
    turns = [turn("spk_0", 0, 10), turn("spk_1", 10, 20), turn("spk_0", 20, 30)]
    chunks = plan_chunks(turns, duration=30.0, max_speech_s=12.0)
    assert [(span.start, span.end) for span, _ in chunks] == [(0.0, 10.0), (10.0, 20.0), (20.0, 30.0)]


def test_a_word_is_talked_over_when_another_speakers_turn_covers_part_of_it():
    turns = [turn("spk_0", 0.0, 3.0), turn("spk_1", 2.0, 5.0)]
    assert _talked_over(Word(word=" yes", start=2.2, end=2.6), "spk_0", turns)
    assert not _talked_over(Word(word=" no", start=0.5, end=0.9), "spk_0", turns)
    assert not _talked_over(Word(word=" so", start=2.95, end=3.3), "spk_1", turns)  # 0.05 s is a touch
    # A hand-over with nobody talking at once: a word timed across it is not talked over.
    handover = [turn("spk_0", 0.0, 3.0), turn("spk_1", 3.0, 5.0)]
    assert speaker_of(2.7, 3.2, handover) == "spk_0"
    assert not _talked_over(Word(word=" then", start=2.7, end=3.2), "spk_0", handover)
    assert not _talked_over(Word(word=" well", start=2.8, end=3.4), "spk_1", handover)
    # With no turn of its own under it (one channel's word where its diarization has a gap while
    # the other channel talks), another speaker's turn over the word is enough.
    assert _talked_over(Word(word=" hm", start=3.5, end=3.9), "spk_0", turns)
    assert speaker_of(2.2, 2.6, turns) == "spk_0"  # a tie goes to the earlier turn: the same words, the same speakers
    assert speaker_of(2.5, 3.5, turns) == "spk_1"  # most of the word is in spk_1's turn


def test_speaker_hints_must_be_consistent():
    with pytest.raises(ValidationError, match="min_speakers"):
        JobOptions(min_speakers=3, max_speakers=2)
    with pytest.raises(ValidationError):
        JobOptions(num_speakers=0)
    assert JobOptions(min_speakers=2, max_speakers=2).max_speakers == 2


def test_a_vocabulary_is_read_as_terms_from_a_form_field_or_bucket_metadata():
    assert JobOptions(vocabulary=" Anna  Petrova,ComfyUI,\nComfyUI, ,").vocabulary == ["Anna Petrova", "ComfyUI"]
    assert JobOptions(vocabulary="").vocabulary == [] == JobOptions(vocabulary=None).vocabulary
    assert drop_options({"X-Amz-Meta-Vocabulary": "Anna, Kubernetes"}).vocabulary == ["Anna", "Kubernetes"]
    with pytest.raises(ValueError, match="x-amz-meta-vocabulary: .*longer than 150"):
        drop_options({"x-amz-meta-vocabulary": ", ".join(f"term {i}" for i in range(30))})


def test_a_vocabulary_is_measured_as_the_page_s_field_takes_it():
    """The page's field takes 150 characters (maxlength) and the terms were measured joined by
    ", ": 30 terms typed as `a,b,c` within those 150 were refused."""
    typed = ",".join(f"T{n:03d}" for n in range(30)) + "x"
    assert len(typed) == 150 and len(JobOptions(vocabulary=typed).vocabulary) == 30
    assert len(JobOptions(vocabulary=typed.replace(",", ", ")).vocabulary) == 30  # spaces around terms are not kept
    with pytest.raises(ValidationError, match=r"longer than 150 characters \(its terms with a comma between each\)"):
        JobOptions(vocabulary=typed + "y")


def test_custom_spelling_takes_text_and_one_spelling_for_each_heard_side():
    """A JSON null was written into transcripts as "None", and two spellings of one heard side in
    different cases kept one of them silently."""
    for sent in ({"confu i": None}, {"confu i": 7}, {"confu i": ["ComfyUI"]}):
        with pytest.raises(ValidationError, match="both sides are text"):
            JobOptions(spelling=sent)
    for sent in ("confu i=ComfyUI, CONFU I=Comfyui", "confu i=ComfyUI\nconfu  i=Comfy UI"):
        with pytest.raises(ValidationError, match="'confu i' is given twice, as 'ComfyUI' and"):
            JobOptions(spelling=sent)
    # A mapping is also how a job's options are stored and read back: one stored before keys were
    # folded as they are now stays readable, its last spelling kept.
    assert JobOptions(spelling={"Confu I": "ComfyUI", "confu  i": "Comfy UI"}).spelling == {"confu i": "Comfy UI"}
    # The same pair twice says one thing: kept once.
    assert JobOptions(spelling={"Confu I": "ComfyUI", "confu i": "ComfyUI"}).spelling == {"confu i": "ComfyUI"}
    assert JobOptions(spelling="confu i=ComfyUI\nlama=Llama").spelling == {"confu i": "ComfyUI", "lama": "Llama"}


def test_non_ascii_bucket_metadata_reads_as_it_was_written():
    """MinIO returns a UTF-8 value as raw bytes (read by HTTP clients as ISO-8859-1: Cyrillic came
    out as mojibake); S3 returns it RFC 2047-encoded. Both read as written; Latin-1 stays."""
    as_minio_returns_it = "Анна Петрова, Zoë".encode().decode("latin-1")
    assert drop_options({"x-amz-meta-vocabulary": as_minio_returns_it}).vocabulary == ["Анна Петрова", "Zoë"]
    assert drop_options({"x-amz-meta-reference": "=?UTF-8?B?0JDQvdC90LA=?="}).reference == "Анна"
    assert drop_options({"x-amz-meta-reference": "Zoë"}).reference == "Zoë"


def test_a_task_is_transcribe_unless_translate_is_asked_for():
    assert JobOptions().task == "transcribe" == JobOptions(task=" ").task
    assert drop_options({"x-amz-meta-task": "Translate"}).task == "translate"
    with pytest.raises(ValueError, match="x-amz-meta-task"):
        drop_options({"x-amz-meta-task": "summarize"})


@pytest.mark.parametrize("said, kinds, stored", [
    ("Call me at +1 (555) 123-4567, thanks.", "phone", "Call me at [PHONE], thanks."),
    ("It's 555,867,5309 or 020 7946 0958.", "phone", "It's [PHONE] or [PHONE]."),
    ("In 2023 we grew 12% to 3.5 million.", "phone,card", "In 2023 we grew 12% to 3.5 million."),
    ("In 2023 we grew 12% to 3.5 million.", "number", "In [NUMBER] we grew [NUMBER]% to [NUMBER] million."),
    ("The card is 4111 1111 1111 1111, expiry soon.", "card,phone", "The card is [CARD], expiry soon."),
    ("Card 4,111,111,111,111,111,111.", "card", "Card [CARD]."),
    ("It's 4111. 1111. 1111. 1111. Thanks.", "card", "It's [CARD]. Thanks."),
    ("It's 4111.1111.1111.1111 and 3.5 million.", "card", "It's [CARD] and 3.5 million."),
    # The expiry and the code after it, or a number said before, are not taken into the card.
    ("The card is 4111 1111 1111 1111. 0427. 737.", "card", "The card is [CARD]. 0427. 737."),
    ("In 2019. 4111 1111 1111 1111 was it.", "card", "In 2019. [CARD] was it."),
    ("Card 4111111111111111. 12 months.", "card", "Card [CARD]. 12 months."),
    ("Mail anna.p+work@mail.example.org today.", "email", "Mail [EMAIL] today."),
    ("Write to support at example dot com or meet me at noon.", "email",
     "Write to [EMAIL] or meet me at noon."),
    ("Write to support at example.com, room 4.", "phone", "Write to support at example.com, room 4."),
    # Two numbers said one after another are two phones, not one too long to be a phone (or a card).
    ("Try 555-123-4567, 555-987-6543 today.", "card,phone", "Try [PHONE], [PHONE] today."),
    ("Write to anna dot petrova at example dot com.", "email", "Write to [EMAIL]."),
])
def test_redaction_finds_what_was_asked_for_and_leaves_the_rest(said, kinds, stored):
    assert redact_text(said, JobOptions(redact=kinds).redact) == stored


def test_a_redacted_span_becomes_one_word_over_the_time_of_the_words_it_covers():
    words = [Word(word=w, start=i, end=i + 0.5, probability=p) for i, (w, p) in
             enumerate([(" at", 0.9), (" 555", 0.8), (",867", 0.7), (",5309.", 0.95), (" Bye.", 0.9)])]
    assert [(w.word, w.start, w.end, w.probability) for w in redact_words(words, ["phone"])] == [
        (" at", 0, 0.5, 0.9), (" [PHONE].", 1, 3.5, 0.7), (" Bye.", 4, 4.5, 0.9)]
    assert JobOptions(redact=" Phone, card,phone").redact == ["phone", "card"] and JobOptions().redact == []
    with pytest.raises(ValidationError, match="'email', 'card', 'phone' or 'number'"):
        JobOptions(redact="names")
    assert drop_options({"x-amz-meta-redact": "card"}).redact == ["card"]


def segment_of(*timed: tuple[str, float], speaker: str = "spk_0", index: int = 0) -> Segment:
    words = [Word(word=w, start=t, end=t + 0.4) for w, t in timed]
    return Segment(index=index, speaker=speaker, start_ts=words[0].start, end_ts=words[-1].end,
                   text="".join(w.word for w in words).strip(), words=words)


def test_every_number_in_one_word_is_redacted_and_spelled_and_a_number_cut_by_a_pause_too():
    said = segment_of((" at", 0), (" 9:30", 0.5), (" on", 1), (" 12/05/1990.", 1.5), (" AI/ML", 2))
    [redacted] = redact([said], ["number"])
    assert redacted.text == "at [NUMBER]:[NUMBER] on [NUMBER]/[NUMBER]/[NUMBER]. AI/ML"
    assert redacted.text == "".join(w.word for w in redacted.words).strip()  # SRT is made of the words
    assert respell([said], {"ai": "A.I.", "ml": "M.L."})[0].text.endswith("A.I./M.L.")
    # A pause in the middle of a phone number cuts the segment there; the number is still one.
    first = segment_of((" my", 0), (" number", 0.5), (" is", 1), (" 555", 1.5), (" 123", 2))
    second = segment_of((" 4567.", 3.6), (" Thanks.", 4.2), index=1)
    other = segment_of((" OK.", 5), speaker="spk_1", index=2)
    later = segment_of((" 55", 8.0), (" 12", 8.5), index=3)  # after a long silence: something else said
    redacted = redact([first, second, other], ["phone"])
    assert [s.text for s in redact([first, later], ["phone"])] == ["my number is 555 123", "55 12"]
    assert [(s.index, s.speaker, s.text, round(s.start_ts, 3), round(s.end_ts, 3)) for s in redacted] == [
        (0, "spk_0", "my number is [PHONE].", 0, 4.0), (1, "spk_0", "Thanks.", 4.2, 4.6), (2, "spk_1", "OK.", 5, 5.4)]
    # The other side of a call says "Okay." in the middle of the number: still one number.
    okay = segment_of((" Okay.", 2.8), speaker="spk_1", index=1)
    rest = segment_of((" 4567.", 3.6), index=2)
    assert [(s.index, s.speaker, s.text) for s in redact([first, okay, rest], ["phone"])] == [
        (0, "spk_0", "my number is [PHONE]."), (1, "spk_1", "Okay.")]


def test_custom_spelling_finds_a_phrase_inside_text_written_without_spaces():
    """Chinese and Japanese are written without spaces between words: a phrase there was never
    matched, because the characters around it counted as the same word."""
    words = [Word(word=w, start=i, end=i + 1) for i, w in enumerate(["我们", "使用康", "菲工具。", " Ana"])]
    segment = Segment(index=0, speaker="spk_0", start_ts=0, end_ts=4, text="我们使用康菲工具。 Ana", words=words)
    [spelled] = respell([segment], {"康菲": "ComfyUI", "ana": "Anna"})
    assert spelled.text == "我们使用ComfyUI工具。 Anna"
    assert [(w.word, w.start, w.end) for w in spelled.words] == [
        ("我们", 0, 1), ("使用ComfyUI工具。", 1, 3), (" Anna", 3, 4)]


def test_custom_spelling_replaces_whole_words_in_any_case_longest_first():
    options = JobOptions(spelling="confu i = ComfyUI, Kubernetis=Kubernetes\nana=Anna, ana petrova=Anna Petrova")
    assert options.spelling == {"confu i": "ComfyUI", "kubernetis": "Kubernetes", "ana": "Anna",
                                "ana petrova": "Anna Petrova"}
    words = [Word(word=w, start=i, end=i + 1) for i, w in enumerate(
        [" Into", " your", " Confu", " i", " folder,", " Ana", " Petrova", " and", " Ana.", " Banana", " kubernetis."])]
    segment = Segment(index=0, speaker="spk_0", start_ts=0, end_ts=11, text="".join(w.word for w in words).strip(),
                      words=words)
    [spelled] = respell([segment], options.spelling)
    assert spelled.text == "Into your ComfyUI folder, Anna Petrova and Anna. Banana Kubernetes."
    assert [(w.word, w.start, w.end) for w in spelled.words][2:6] == [
        (" ComfyUI", 2, 4), (" folder,", 4, 5), (" Anna Petrova", 5, 7), (" and", 7, 8)]
    for wrong, says in [("abc", "heard=written"), ("x=", "needs both sides"), (
            ",".join(f"w{i}=W{i}" for i in range(101)), "at most 100 pairs")]:
        with pytest.raises(ValidationError, match=says):
            JobOptions(spelling=wrong)
    assert drop_options({"x-amz-meta-spelling": "confu i=ComfyUI"}).spelling == {"confu i": "ComfyUI"}
    # Whole words: not the start of a contraction; a possessive is the word's.
    [don] = respell([segment_of((" I", 0), (" don't", 1), (" know", 2), (" Don's", 3), (" plan.", 4))], {"don": "Donn"})
    assert don.text == "I don't know Donn's plan."


@pytest.mark.parametrize("service, forbidden", [
    ("ingest", ["torch", "faster_whisper", "pyannote.audio", "sentence_transformers"]),
    ("transcriber", ["torch", "pyannote.audio", "litestar"]),
    ("persister", ["torch", "faster_whisper", "litestar"]),
    ("notifier", ["torch", "faster_whisper", "litestar", "scipy"]),
    ("embedder", ["faster_whisper", "pyannote.audio", "litestar"]),
])
def test_each_service_imports_only_its_own_stack(service, forbidden):
    module = "services.ingest.app" if service == "ingest" else f"services.{service}.__main__"
    code = f"import sys, importlib; importlib.import_module({module!r}); print(sorted(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    assert not [m for m in forbidden if f"'{m}'" in loaded]


def test_expected_speakers_are_names_each_once():
    assert JobOptions(expected_speakers=" Anna,  Boris\tK. ,anna,\n").expected_speakers == ["Anna", "Boris K."]
    assert JobOptions(expected_speakers="").expected_speakers == [] == JobOptions().expected_speakers
    assert drop_options({"x-amz-meta-expected-speakers": "Anna, Boris"}).expected_speakers == ["Anna", "Boris"]
    with pytest.raises(ValidationError, match="at most 32 names"):
        JobOptions(expected_speakers=[f"Person {i}" for i in range(33)])
    with pytest.raises(ValidationError, match="at most 100 characters"):
        JobOptions(expected_speakers="A" * 101)


def test_a_name_typed_with_a_combining_accent_is_the_same_person_as_with_a_precomposed_letter():
    decomposed, precomposed = "Jose\u0301", "Jos\u00e9"
    assert JobOptions(expected_speakers=f"{decomposed}, {precomposed}").expected_speakers == [precomposed]
    assert person_name(f" {decomposed}\n") == precomposed


def test_every_line_about_a_job_names_it_even_where_its_error_is_logged():
    """The services' log format, with the job stamped on lines inside its block, and on the line
    of an error that escaped the block and was logged by a loop over many jobs."""
    code = """
import logging
from common.logs import job_logged, setup_logging
setup_logging("INFO")
log = logging.getLogger("sweep")
with job_logged(7):
    log.info("inside")
try:
    with job_logged(8):
        raise RuntimeError("boom")
except RuntimeError:
    log.exception("the sweep failed; will try again")
log.info("between jobs")
"""
    logged = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stderr
    lines = [line for line in logged.splitlines() if " | " in line]
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    assert re.fullmatch(stamp + r" \| INFO     \| sweep:\d+ \| job=7 inside", lines[0]), lines
    assert "| ERROR    | sweep:" in lines[1] and lines[1].endswith("| job=8 the sweep failed; will try again"), lines
    assert lines[2].endswith("| sweep:13 | between jobs"), lines


async def test_every_upload_path_counts_against_max_concurrent_uploads():
    """Past the bound, an upload to any path that takes a file is answered 503 with Retry-After
    before its body is read; other requests pass, an enrolment from a transcript (JSON, no file)
    among them: it held a place through its re-matching of every past recording."""
    import asyncio

    from services.ingest.admission import upload_limit_middleware

    release = asyncio.Event()

    async def app_holding_uploads(scope, receive, send):
        if scope["method"] == "POST":
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    app = upload_limit_middleware(1)(app_holding_uploads)

    async def request(path: str, method: str = "POST", content_type: bytes = b"multipart/form-data; boundary=b",
                      ) -> tuple[int, dict]:
        sent = []

        async def send(message):
            sent.append(message)

        await app({"type": "http", "path": path, "method": method, "headers": [(b"content-type", content_type)]},
                  None, send)
        return sent[0]["status"], dict(sent[0]["headers"])

    for path in ("/recognize", "/v1/audio/transcriptions", "/v1/audio/translations", "/speakers"):
        release.clear()
        first = asyncio.create_task(request(path))
        await asyncio.sleep(0)
        for other in ("/recognize", path):
            status, headers = await asyncio.wait_for(request(other), 5)  # answered at once, or held
            assert status == 503 and b"retry-after" in headers, (path, other)
        assert (await request("/status/1", "GET"))[0] == 200
        from_transcript = asyncio.create_task(request("/speakers", content_type=b"application/json"))
        await asyncio.sleep(0.1)
        assert not from_transcript.done()  # let in, held by the app like any request, not refused
        release.set()
        assert (await first)[0] == 200
        assert (await from_transcript)[0] == 200


async def test_an_upload_whose_body_stops_coming_gives_up_its_place(monkeypatch):
    """A client gone quiet in the middle of an upload (a laptop asleep, a connection a NAT dropped)
    held its place among MAX_CONCURRENT_UPLOADS for good: after MAX_CONCURRENT_UPLOADS of them,
    every upload was 503 until ingest restarted. The read now gives up (408) and the place is free;
    once the body is in, waiting (for the client to leave a streamed answer) is not bounded."""
    import asyncio

    from litestar.exceptions import ClientException

    from services.ingest import admission

    monkeypatch.setattr(admission, "UPLOAD_IDLE_S", 0.3)

    def client(messages: list[dict]):
        async def receive():
            if messages:
                return messages.pop(0)
            await asyncio.Event().wait()  # nothing more, ever
        return receive

    async def app_reading_the_body(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"", "more_body": True})
        await receive()  # until the client leaves

    app = admission.upload_limit_middleware(1)(admission.small_body_middleware(app_reading_the_body))
    scope = {"type": "http", "path": "/recognize", "method": "POST",
             "headers": [(b"content-type", b"multipart/form-data; boundary=b")]}
    sent = []

    async def send(message):
        sent.append(message)

    stalled = client([{"type": "http.request", "body": b"--b\r\n", "more_body": True}])
    with pytest.raises(ClientException) as refused:
        await asyncio.wait_for(app(dict(scope), stalled, send), 5)
    assert refused.value.status_code == 408
    # The place is free again, and once a whole body is in, the wait for the client to leave is
    # not cut short.
    whole = client([{"type": "http.request", "body": b"--b--\r\n", "more_body": False}])
    answering = asyncio.create_task(app(dict(scope), whole, send))
    await asyncio.sleep(1.0)
    assert sent[-2]["status"] == 200 and not answering.done(), sent
    answering.cancel()


async def test_a_background_task_that_fails_is_logged_and_started_again(caplog):
    """Ingest's consumers and watchers ran as bare tasks: one that failed as it declared its queue
    (the broker restarting at that moment) ended without a log line, and ingest went on without
    it (bucket drops unseen, recordings never redacted) while /readyz said ready."""
    import asyncio

    from common.runner import keep_running

    starts = []

    async def declares_then_consumes():
        starts.append(len(starts))
        if len(starts) == 1:
            raise ConnectionError("the broker is restarting")
        await asyncio.Event().wait()  # consuming, until cancelled

    with caplog.at_level("ERROR", logger="common.runner"):
        running = asyncio.create_task(keep_running("the test consumer", declares_then_consumes, restart_s=0.05))
        await asyncio.sleep(0.5)
        assert starts == [0, 1] and not running.done()
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
    [record] = caplog.records
    assert "the test consumer failed; starting it again" in record.getMessage() and record.exc_info


def test_an_english_only_whisper_model_is_not_asked_which_language_is_spoken():
    """WHISPER_MODEL=medium.en (a name faster-whisper accepts): CTranslate2 refuses to identify a
    language with it, so every job that did not name its language failed at transcription."""
    from types import SimpleNamespace

    from services.transcriber.languages import detect_language

    def refuses(_audio):
        raise RuntimeError("detect_language can only be called on multilingual models")

    english_only = SimpleNamespace(model=SimpleNamespace(is_multilingual=False), detect_language=refuses)
    speech = np.zeros(16000 * 5, dtype=np.float32)
    assert detect_language(english_only, speech) == "en"
    assert detect_language(english_only, speech, among=["en", "de"]) == "en"
    multilingual = SimpleNamespace(model=SimpleNamespace(is_multilingual=True),
                                   detect_language=lambda _audio: ("de", 0.9, [("de", 0.9), ("en", 0.1)]))
    assert detect_language(multilingual, speech) == "de"


async def test_a_request_that_fails_unexpectedly_is_logged_with_its_job():
    """Litestar logs nothing when its own logging is off (as in ingest, for the project's format):
    a 500 left no line at all, only a count in stt_http_requests_total."""
    import logging

    from litestar.exceptions import NotFoundException

    from common.logs import _JobIdFilter
    from services.ingest.error_handlers import log, log_unexpected

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    handler.addFilter(_JobIdFilter())
    log.addHandler(handler)
    try:
        scope = {"method": "GET", "path": "/transcripts/12", "path_params": {"job_id": 12}}
        await log_unexpected(KeyError("speaker"), scope)
        await log_unexpected(NotFoundException("no job with id 12"), scope)  # answered: not a fault
    finally:
        log.removeHandler(handler)
    [record] = records
    assert record.getMessage() == "job=12 GET /transcripts/12 failed" and record.exc_info, record.getMessage()


def test_a_message_whose_job_ended_meanwhile_counts_as_skipped_without_its_audio():
    """The diarizer counted a job cancelled while it decoded an hour of audio as handled, with that
    hour in stt_audio_seconds_total and a real-time factor near 0 from a few seconds of work."""
    import time

    from common import metrics

    def counted(outcome: str) -> float:
        return metrics.MESSAGES.labels("diarizer", "stt.diarizer", outcome)._value.get()

    before = (counted("handled"), counted("skipped"), metrics.AUDIO_SECONDS.labels("diarizer")._value.get())
    work, token = metrics.begin_message("diarizer")
    metrics.add_audio_seconds(3600.0)
    metrics.nothing_to_do()
    metrics.end_message(work, token, "stt.diarizer", "handled", time.perf_counter())
    after = (counted("handled"), counted("skipped"), metrics.AUDIO_SECONDS.labels("diarizer")._value.get())
    assert [b - a for a, b in zip(before, after)] == [0, 1, 0]


def test_a_pgvector_too_old_for_filtered_search_is_told_apart_by_version_numbers():
    from common.db import pgvector_too_old

    assert [pgvector_too_old(v) for v in ("0.5.1", "0.7.4", "0.8.0", "0.8.5", "0.10.1", "1.0")] == [
        True, True, False, False, False, False]


class BurstHearingModel:
    """Stands in for Whisper where only timing matters: each burst of sound in what it is given
    is one word, timed where the burst is."""

    def transcribe(self, audio, language=None, **_options):
        from types import SimpleNamespace

        loud = np.abs(audio) > 0.1
        edges = np.flatnonzero(np.diff(np.concatenate([[False], loud, [False]]).astype(int)))
        words = [SimpleNamespace(word=" word", start=a / 16_000, end=b / 16_000, probability=0.9)
                 for a, b in zip(edges[::2], edges[1::2])]
        return [SimpleNamespace(words=words)], SimpleNamespace(language=language or "en")


def test_a_word_said_across_a_chunk_cut_is_heard_whole_and_written_once():
    """One person hands over to the next with no pause where the chunk is cut, and the first is
    still finishing a word: that word is transcribed once, whole, in the chunk its middle is in."""
    from common.messages import JobDiarized
    from services.transcriber.handler import Deps, transcribe

    audio = np.zeros(12 * 16_000, dtype=np.float32)
    for start, end in ((2.0, 2.5), (5.8, 6.25), (9.0, 9.5)):  # the second runs over the cut at 6.0
        audio[int(start * 16_000):int(end * 16_000)] = 0.5
    turns = [turn("spk_0", 0.0, 6.0), turn("spk_1", 6.0, 12.0)]
    chunks = plan_chunks(turns, 12.0, max_speech_s=8.0)
    assert [(span.start, span.end) for span, _ in chunks] == [(0.0, 6.0), (6.0, 12.0)]
    deps = Deps(model=BurstHearingModel(),
                read_pcm=lambda _b, _k, s: audio[round(s.start * 16_000):round(s.end * 16_000)])
    words = [(w.start, w.end) for index, (span, chunk_turns) in enumerate(chunks)
             for segment in transcribe(JobDiarized(
                 job_id=1, chunk_index=index, chunk_count=2, pcm_bucket="b", pcm_key="k", duration=12.0, span=span,
                 turns=chunk_turns, options=JobOptions(language="en")), deps).segments for w in segment.words]
    assert words == [(2.0, 2.5), (5.8, 6.25), (9.0, 9.5)]


def test_whisper_with_its_own_voice_filter_gives_words_in_the_chunks_time():
    """The benchmarks' other way of choosing what Whisper hears (speech="whisper-vad")."""
    from services.transcriber.whisper import transcribe_chunk

    audio = np.zeros(4 * 16_000, dtype=np.float32)
    audio[16_000:24_000] = 0.5
    segments, _ = transcribe_chunk(BurstHearingModel(), audio, 10.0, [turn("spk_0", 10.0, 14.0)], "en",
                                   speech="whisper-vad")
    assert [(w.start, w.end) for s in segments for w in s.words] == [(11.0, 11.5)]


def test_an_english_only_whisper_model_fails_a_job_in_another_language():
    """WHISPER_MODEL=medium.en and a job in German: Whisper was told German, which an English-only
    model cannot write, wrote English, and the job and its segments said German (searched with
    German stemming). The job fails, saying why; English, detected or asked for, is transcribed."""
    from types import SimpleNamespace

    from common.broker import PermanentError
    from common.messages import JobDiarized
    from services.transcriber.handler import Deps, transcribe

    class EnglishOnly(BurstHearingModel):
        model = SimpleNamespace(is_multilingual=False)
        # An English-only model's vocabulary has the language tokens too, never trained on.
        hf_tokenizer = SimpleNamespace(token_to_id=lambda token: 50261)

    audio = np.zeros(6 * 16_000, dtype=np.float32)
    audio[16_000:24_000] = 0.5
    deps = Deps(model=EnglishOnly(), read_pcm=lambda _b, _k, s: audio[round(s.start * 16_000):round(s.end * 16_000)])

    def transcribed(language: str | None):
        return transcribe(JobDiarized(job_id=1, chunk_index=0, chunk_count=1, pcm_bucket="b", pcm_key="k",
                                      duration=6.0, span=TimeSpan(start=0, end=6.0), turns=[turn("spk_0", 0.0, 6.0)],
                                      options=JobOptions(language=language)), deps)

    for language in ("de", "yue"):
        with pytest.raises(PermanentError, match=f"transcribes English only, not language '{language}'"):
            transcribed(language)
    for language in ("en", None, "multi"):
        done = transcribed(language)
        assert done.language == "en" and [s.text for s in done.segments] == ["word"], (language, done)


async def test_a_message_is_held_through_an_outage_counted_from_its_errors(monkeypatch):
    """OUTAGE_HOLD_S counts the outage, not the handler's run: an attempt that ran for a while
    before a dependency failed it meets a new outage, and the clock starts again."""
    import asyncio
    import types

    from common import broker

    monkeypatch.setattr(broker, "OUTAGE_OVER_AFTER_S", 0.5)
    work = types.SimpleNamespace(stage="test", new_attempt=lambda: None)
    runs: list[str] = []

    async def handler(_message) -> None:
        runs.append("run")
        if len(runs) == 1:
            raise ConnectionRefusedError("down at once")
        if len(runs) == 2:
            await asyncio.sleep(0.8)  # worked a while, then the dependency went away again
            raise ConnectionRefusedError("down again, later")

    await broker._run_waiting_out_outages(handler, None, None, (ConnectionRefusedError,), work, hold_s=1.0)
    assert len(runs) == 3

    async def never_back(_message) -> None:
        raise ConnectionRefusedError("down for good")

    with pytest.raises(broker.HeldThroughOutage):
        await broker._run_waiting_out_outages(never_back, None, None, (ConnectionRefusedError,), work, hold_s=1.0)


async def test_an_attempt_that_worked_long_before_a_timeout_met_a_new_outage(monkeypatch):
    """A timeout ends an attempt that waited on the same outage (a locked row, a dropped
    connection): that one does not start the clock again. One that worked for longer than such a
    wait lasts before a fresh timeout (a long chunk embedded) met a new outage: it is held as
    long again, not handed back at once for the old outage's time."""
    import asyncio
    import types

    from common import broker

    monkeypatch.setattr(broker, "OUTAGE_OVER_AFTER_S", 0.2)
    monkeypatch.setattr(broker, "TIMED_OUT_ATTEMPT_S", 0.5)
    work = types.SimpleNamespace(stage="test", new_attempt=lambda: None)
    runs: list[str] = []

    async def handler(_message) -> None:
        runs.append("run")
        if len(runs) == 1:
            raise TimeoutError("no answer at once")
        if len(runs) == 2:
            await asyncio.sleep(1.2)  # worked longer than a timed-out wait lasts, then timed out
            raise TimeoutError("no answer again, later")

    await broker._run_waiting_out_outages(handler, None, None, (TimeoutError,), work, hold_s=1.0)
    assert len(runs) == 3

    async def waits_on_a_lock(_message) -> None:
        await asyncio.sleep(0.3)  # past OUTAGE_OVER_AFTER_S, within TIMED_OUT_ATTEMPT_S: the same outage
        raise TimeoutError("the row is still locked")

    with pytest.raises(broker.HeldThroughOutage):
        await broker._run_waiting_out_outages(waits_on_a_lock, None, None, (TimeoutError,), work, hold_s=1.0)


def test_a_job_failed_by_the_database_says_whether_it_was_down_or_refused_the_data():
    """A vector of another length under the same model name (class 22) failed jobs as "database
    unavailable", which sends people to look at a database that is up."""
    import asyncpg

    from common.failures import failure_category

    assert failure_category(asyncpg.exceptions.ConnectionDoesNotExistError("gone")) == "database unavailable"
    assert failure_category(asyncpg.exceptions.TooManyConnectionsError("full")) == "database unavailable"
    assert failure_category(asyncpg.exceptions.QueryCanceledError("slow")) == "database too slow (statement timeout)"
    conflict = failure_category(asyncpg.exceptions.DeadlockDetectedError("x"))
    assert conflict == "database conflict (deadlock or serialization)"
    schema = failure_category(asyncpg.exceptions.UndefinedColumnError("no column"))
    assert schema == "database schema error (SQLSTATE 42703)", schema
    refused = failure_category(asyncpg.exceptions.DataError("expected 1024 dimensions, not 768"))
    assert refused == "the database refused the data (SQLSTATE 22000)", refused


def test_an_event_is_dropped_only_when_a_queue_refused_it_for_a_while_with_the_broker_there(monkeypatch):
    """A subscriber's full queue refuses events for good; a broker failure refuses some, then
    loses the connection. After such a failure, the first refusal is not taken for the former."""
    from aio_pika.exceptions import DeliveryError

    from common import outbox

    now = [1000.0]
    monkeypatch.setattr(outbox.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(outbox, "_events_refused_since", {})
    refused = DeliveryError(None, None)
    assert not outbox.refused_too_long("transcript.completed", refused)
    while now[0] + 2 < 1000.0 + outbox.EVENT_REFUSED_FOR_S:  # the flusher tries every 2 s
        now[0] += 2
        assert not outbox.refused_too_long("transcript.completed", refused)
    now[0] = 1000.0 + outbox.EVENT_REFUSED_FOR_S
    assert outbox.refused_too_long("transcript.completed", refused)  # refused all along: dropped
    # Refused, then the connection lost for longer than the limit, then refused once more.
    now[0] += 1
    assert not outbox.refused_too_long("transcript.failed", refused)
    now[0] += 1
    assert not outbox.refused_too_long("transcript.failed", ConnectionError("broker gone"))
    now[0] += outbox.EVENT_REFUSED_FOR_S + 5
    assert not outbox.refused_too_long("transcript.failed", refused)
    assert not outbox.refused_too_long("transcript.completed", refused)


def test_an_old_refusal_does_not_make_the_first_refusal_hours_later_drop_the_event(monkeypatch):
    """Each flusher process keeps its own record of refusals, and only its own publication of that
    kind clears it. Refused once, then published by another process's flusher, then refused again
    an hour later: that refusal begins a new spell, sent again for EVENT_REFUSED_FOR_S, not dropped
    at once (an hour since the first refusal is no hour of refusals)."""
    from aio_pika.exceptions import DeliveryError

    from common import outbox

    now = [1000.0]
    monkeypatch.setattr(outbox.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(outbox, "_events_refused_since", {})
    refused, limit = DeliveryError(None, None), outbox.EVENT_REFUSED_FOR_S
    assert not outbox.refused_too_long("segment.created", refused)  # a transient nack at t0
    now[0] += 3600  # meanwhile another process published the row; this one sent no segment.created
    assert not outbox.refused_too_long("segment.created", refused)  # a new spell: sent again
    # A spell that lasts still drops: refused every 2 s (the flusher's interval) for the limit.
    while now[0] + 2 < 1000.0 + 3600 + limit:
        now[0] += 2
        assert not outbox.refused_too_long("segment.created", refused)
    now[0] = 1000.0 + 3600 + limit
    assert outbox.refused_too_long("segment.created", refused)
    now[0] += limit - 1  # and goes on dropping while the refusals come within the limit
    assert outbox.refused_too_long("segment.created", refused)
    # A quiet spell of the limit ends the dropping as well: the next refusal waits again.
    now[0] += limit
    assert not outbox.refused_too_long("segment.created", refused)


def _corrected_segment(text: str, words: list[Word]):
    from services.ingest.segments import TranscriptSegment

    return TranscriptSegment(speaker="spk_0", start_ts=words[0].start, end_ts=words[-1].end, text=text, words=words)


def test_a_chinese_segment_corrected_by_one_character_keeps_a_word_a_character_and_its_cues():
    """Whisper times Chinese a character at a time: after 客户 is corrected to 用户 the segment still
    has a word a character, the characters left as they were keep their times, and its subtitles
    are cut as before, not shown as one long line for the whole segment."""
    from services.ingest.captions import LINE_WIDTH, columns
    from services.ingest.corrections import retimed_words
    from services.ingest.transcripts import to_srt

    said = "我们今天和客户开会讨论了新产品的发布计划，大家都觉得时间有点紧，但是我们会尽力按时完成。"
    stored = [{"word": c, "start": round(i * 0.45, 3), "end": round(i * 0.45 + 0.4, 3), "probability": 0.9}
              for i, c in enumerate(said)]
    corrected = said.replace("客户", "用户")
    words = retimed_words(stored, corrected, 0.0, stored[-1]["end"])
    assert [w.word for w in words] == list(corrected)
    for old, new in zip(stored, words):
        if old["word"] == new.word:
            assert (new.start, new.end, new.probability) == (old["start"], old["end"], old["probability"])
        else:  # 用 in place of 客: its time, no probability
            assert (new.word, new.start, new.end, new.probability) == ("用", old["start"], old["end"], None)
    cues = [cue.split("\n") for cue in to_srt([_corrected_segment(corrected, words)]).strip().split("\n\n")]
    assert len(cues) > 1
    assert all(columns(line) <= LINE_WIDTH for cue in cues for line in cue[2:])
    assert to_srt([_corrected_segment(corrected, words)]) == to_srt([_corrected_segment(said, [
        Word(**w) for w in stored])]).replace("客", "用")


def test_a_correction_keeps_whole_a_word_of_several_characters_left_as_it_was():
    """Whisper's words in Chinese or Thai are sometimes a few characters: one left as it was is
    kept whole; new characters are words of their own, added ones in the pause before the next."""
    from services.ingest.corrections import retimed_words

    stored = [{"word": w, "start": s, "end": e, "probability": 0.8}
              for w, s, e in (("我们", 0.0, 0.4), ("和", 0.4, 0.6), ("客户", 0.7, 1.1), ("开会", 1.1, 1.5))]
    words = retimed_words(stored, "我们和重要客户开会", 0.0, 1.5)
    assert [(w.word, w.start, w.end) for w in words] == [
        ("我们", 0.0, 0.4), ("和", 0.4, 0.6), ("重", 0.6, 0.65), ("要", 0.65, 0.7), ("客户", 0.7, 1.1),
        ("开会", 1.1, 1.5)]
    assert [w.probability for w in words] == [0.8, 0.8, None, None, 0.8, 0.8]
    # 客户 parted by a space is no longer the word it was; Thai's vowel signs stay on their letter.
    assert [w.word for w in retimed_words(stored, "我们和客 户开会", 0.0, 1.5)] == ["我们", "和", "客", "户", "开会"]
    thai = [{"word": "กิน", "start": 0.0, "end": 0.5}, {"word": "ข้าว", "start": 0.5, "end": 1.0}]
    assert [w.word for w in retimed_words(thai, "กินข้าวไหม", 0.0, 1.0)][:2] == ["กิน", "ข้าว"]
    # Korean is written with spaces, and so are its words.
    korean = [{"word": " 안녕하세요", "start": 0.0, "end": 1.0}, {"word": " 여러분", "start": 1.0, "end": 2.0}]
    assert [(w.word, w.start, w.end) for w in retimed_words(korean, "안녕하세요 친구들", 0.0, 2.0)] == [
        ("안녕하세요", 0.0, 1.0), ("친구들", 1.0, 2.0)]


def test_an_english_correction_keeps_the_times_of_the_words_left_as_they_were():
    from services.ingest.corrections import retimed_words

    stored = [{"word": w, "start": s, "end": e, "probability": 0.9}
              for w, s, e in ((" We", 0.0, 0.3), (" ship", 0.4, 0.7), (" on", 0.8, 0.9), (" Monday.", 1.0, 1.5))]

    def timed(text: str) -> list[tuple[str, float, float, float | None]]:
        return [(w.word, w.start, w.end, w.probability) for w in retimed_words(stored, text, 0.0, 1.5)]

    assert timed("We ship on Tuesday.") == [("We", 0.0, 0.3, 0.9), ("ship", 0.4, 0.7, 0.9), ("on", 0.8, 0.9, 0.9),
                                            ("Tuesday.", 1.0, 1.5, None)]
    # A word added: the others keep their times, it takes the pause before the next.
    assert timed("We ship it on Monday.") == [("We", 0.0, 0.3, 0.9), ("ship", 0.4, 0.7, 0.9), ("it", 0.7, 0.8, None),
                                              ("on", 0.8, 0.9, 0.9), ("Monday.", 1.0, 1.5, 0.9)]
    # One taken out; one added where there was a pause; two in place of two, one each.
    assert timed("We ship Monday.") == [("We", 0.0, 0.3, 0.9), ("ship", 0.4, 0.7, 0.9), ("Monday.", 1.0, 1.5, 0.9)]
    assert timed("We will ship on Monday.")[:3] == [("We", 0.0, 0.3, 0.9), ("will", 0.3, 0.4, None),
                                                    ("ship", 0.4, 0.7, 0.9)]
    assert timed("They shipped on Monday.") == [("They", 0.0, 0.3, None), ("shipped", 0.4, 0.7, None),
                                                ("on", 0.8, 0.9, 0.9), ("Monday.", 1.0, 1.5, 0.9)]
    # Two in place of one share its time, by length.
    assert timed("We deliver it on Monday.")[1:3] == [("deliver", 0.4, 0.618, None), ("it", 0.618, 0.7, None)]


def test_an_empty_results_prefix_is_refused():
    """Empty, every bucket drop was taken for a result and nothing ever ran, without a word."""
    from pydantic import ValidationError

    from common.settings import Settings

    with pytest.raises(ValidationError, match="RESULTS_PREFIX"):
        Settings(_env_file=None, results_prefix="")
    assert Settings(_env_file=None, results_prefix="results-").results_prefix == "results-"


def test_the_audio_bucket_cannot_be_the_inbox():
    """One bucket for both: each job's copy of a drop (uploads/N) would be dropped in turn, without end."""
    from pydantic import ValidationError

    from common.settings import Settings

    with pytest.raises(ValidationError, match="AUDIO_BUCKET and INBOX_BUCKET must differ"):
        Settings(_env_file=None, audio_bucket="media", inbox_bucket="media")
    assert Settings(_env_file=None, audio_bucket="media", inbox_bucket="drops").inbox_bucket == "drops"


def test_auto_compute_type_is_one_the_gpu_computes():
    """WHISPER_COMPUTE_TYPE=auto asked for float16 on every GPU; CTranslate2 refuses it on one
    without efficient float16 (compute capability under 7, as a Pascal card), and the
    transcriber never started. On the CPU, int8 as before."""
    from services.transcriber.whisper import auto_compute_type

    ampere = {"float32", "float16", "bfloat16", "int8", "int8_float32", "int8_float16", "int8_bfloat16"}
    pascal = {"float32", "int8", "int8_float32"}
    assert auto_compute_type("cuda", ampere) == "float16"
    assert auto_compute_type("cuda", pascal) == "float32"
    assert auto_compute_type("cuda", {"float32", "int8_float16"}) == "int8_float16"
    assert auto_compute_type("cpu", {"float32", "int8", "int8_float32"}) == "int8"


def test_a_compute_type_the_cpu_lacks_gives_way_to_int8_there_with_a_warning(caplog):
    """One WHISPER_COMPUTE_TYPE=float16 shared by the CUDA and CPU transcribers (compose's .env):
    with WHISPER_DEVICE=auto on a host without a usable GPU, or cpu, CTranslate2 refused to load
    the model in float16 on the CPU, and the transcriber started again without end instead of
    falling back to the CPU as promised. A type CTranslate2 does not know is still refused."""
    import logging

    import ctranslate2

    from common.settings import Settings
    from services.transcriber import whisper

    if ctranslate2.get_cuda_device_count() > 0:
        pytest.skip("with a GPU, WHISPER_DEVICE=auto loads the model on it")
    bundled = str(ROOT / "models" / "whisper-base")
    for device in ("auto", "cpu"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=whisper.log.name):
            model, _ = whisper.load_model(Settings(_env_file=None, whisper_model=bundled, whisper_device=device,
                                                   whisper_compute_type="float16"))
        # int8_float32: what CTranslate2 calls int8 on the CPU (int8 weights, float32 activations).
        assert (model.model.device, model.model.compute_type) == ("cpu", "int8_float32")
        [warning] = [r for r in caplog.records if r.name == whisper.log.name and r.levelno >= logging.WARNING]
        assert "WHISPER_COMPUTE_TYPE=float16" in warning.getMessage() and "in int8 instead" in warning.getMessage()
        assert caplog.records[-1].getMessage() == f"Whisper model {bundled} on cpu (int8)"
    # What the CPU computes is kept, and what the GPU fallback (load_model's warm-up) takes too.
    assert whisper.compute_type_on("cpu", Settings(_env_file=None, whisper_compute_type="float32")) == "float32"
    assert whisper.compute_type_on("cpu", Settings(_env_file=None, whisper_compute_type="bfloat16")) == "int8"
    with pytest.raises(whisper.ModelNotLoaded, match="Invalid compute type: flaot16"):
        whisper.load_model(Settings(_env_file=None, whisper_model=bundled, whisper_device="cpu",
                                    whisper_compute_type="flaot16"))


def test_cantonese_among_the_languages_asked_for_is_found_on_a_model_without_it():
    """language=yue,en on Whisper before large-v3 (the bundled base, the default medium): the
    model has no Cantonese, and ranks what it hears as Chinese, which was not among the languages
    asked for, so every Cantonese passage was transcribed as English. Cantonese is now as likely
    as Chinese there (and transcribed as zh, as a job in yue alone is)."""
    from types import SimpleNamespace

    from services.transcriber.languages import detect_language

    def model(*ranked: tuple[str, float]):
        return SimpleNamespace(model=SimpleNamespace(is_multilingual=True),
                               detect_language=lambda _audio: (ranked[0][0], ranked[0][1], list(ranked)))

    speech = np.zeros(16000 * 5, dtype=np.float32)
    without_yue = model(("zh", 0.7), ("en", 0.2), ("ja", 0.1))
    assert detect_language(without_yue, speech, among=["yue", "en"]) == "yue"
    assert detect_language(without_yue, speech, among=["en", "yue"]) == "yue"
    assert detect_language(without_yue, speech, among=["zh", "yue"]) == "zh"
    assert detect_language(model(("en", 0.6), ("zh", 0.3), ("de", 0.1)), speech, among=["yue", "en"]) == "en"
    # large-v3 knows Cantonese: its own probability counts, not Chinese's.
    with_yue = model(("zh", 0.5), ("yue", 0.15), ("en", 0.35))
    assert detect_language(with_yue, speech, among=["yue", "en"]) == "en"


def test_words_added_between_two_words_that_overlap_in_time_do_not_end_before_they_start():
    """Whisper's words overlap now and then (one ends after the next starts): a word added between
    two such took the "pause" from the first's end back to the second's start, and ended before it
    started."""
    from services.ingest.corrections import retimed_words

    overlapping = [{"word": " a", "start": 1.0, "end": 2.0}, {"word": " b", "start": 1.5, "end": 2.5}]
    words = retimed_words(overlapping, "a new b", 0.0, 3.0)
    assert [(w.word, w.start, w.end) for w in words] == [("a", 1.0, 2.0), ("new", 1.5, 1.5), ("b", 1.5, 2.5)]
    # Words written in place of others whose times run backwards (the last ends before the first
    # starts) do not either.
    backwards = [{"word": " x", "start": 0.0, "end": 0.5}, {"word": " y", "start": 2.0, "end": 3.0},
                 {"word": " z", "start": 1.0, "end": 1.5}, {"word": " w", "start": 3.0, "end": 3.5}]
    for text in ("a new b", "x p q r w", "x p y z q w", "p x w"):
        for word in retimed_words(overlapping if text == "a new b" else backwards, text, 0.0, 4.0):
            assert word.start <= word.end, (text, word)


def test_a_segment_corrected_twice_to_long_repetitive_text_is_retimed_in_moments():
    """A segment corrected to 10,000 characters, then again to 10,000 others of the same two
    kinds: matching the old words to the new took difflib 33 s, during which the ingest answered
    nothing, liveness checks included. Texts that long are retimed as wholly new ones: each word in
    place of the one there was, taking its time."""
    import random
    import time

    from services.ingest.corrections import MAX_SEGMENT_CHARS, retimed_words

    rng = random.Random(7)
    said = [{"word": " Hello", "start": 0.0, "end": 0.5}, {"word": " there.", "start": 0.5, "end": 1.0}]
    first_text, second_text = ("".join(rng.choice("的是") for _ in range(MAX_SEGMENT_CHARS)) for _ in range(2))
    started = time.process_time()  # CPU time: other work on the machine does not count
    first = retimed_words(said, first_text, 0.0, 30.0)
    second = retimed_words([w.model_dump() for w in first], second_text, 0.0, 30.0)
    took = time.process_time() - started
    assert took < 5, f"{took:.1f} s of CPU"
    assert [w.word for w in first] == list(first_text) and [w.word for w in second] == list(second_text)
    assert [(w.start, w.end) for w in second] == [(w.start, w.end) for w in first]


def test_a_long_real_segment_corrected_by_a_character_keeps_the_others_times():
    """The bound on matching leaves a long segment matched (880 characters here; 30 s of speech,
    a segment's most, is a few hundred): only the changed character is new."""
    from services.ingest.corrections import WORD_MATCH_BUDGET, retimed_words

    said = "我们今天和客户开会讨论了新产品的发布计划，大家都觉得时间有点紧，但是我们会尽力按时完成。" * 20
    assert len(said) ** 2 <= WORD_MATCH_BUDGET
    stored = [{"word": c, "start": round(i * 0.03, 3), "end": round(i * 0.03 + 0.03, 3), "probability": 0.9}
              for i, c in enumerate(said)]
    corrected = said[:500] + "用" + said[501:]
    words = retimed_words(stored, corrected, 0.0, stored[-1]["end"])
    assert [(w.word, w.start, w.end) for w in words] == [(c, w["start"], w["end"]) for c, w in zip(corrected, stored)]
    assert [i for i, w in enumerate(words) if w.probability is None] == [500]


def _lookups_answering(monkeypatch, answers: dict, calls: dict):
    """socket.getaddrinfo answering `answers[host]`: a list of addresses, an OSError to raise, or
    a threading.Event to wait for (at most 30 s) before raising EAI_AGAIN (a name server that does
    not answer). Each call is counted in `calls`."""
    import socket
    import threading

    def lookup(host, *args, **kwargs):
        calls[host] = calls.get(host, 0) + 1
        answer = answers[host]
        if isinstance(answer, threading.Event):
            answer.wait(30)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        if isinstance(answer, OSError):
            raise answer
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, 0)) for address in answer]

    monkeypatch.setattr(socket, "getaddrinfo", lookup)


async def test_a_name_whose_name_server_does_not_answer_holds_one_lookup_thread(monkeypatch):
    """Every check of a name whose name server does not answer started a lookup of its own, given
    up after its limit but holding its thread (one of 32) until the system resolver gave up
    (minutes): a dead endpoint's deliveries took every thread, and then every other name "did not
    resolve". A name has one lookup at a time: a check finding one still running waits for it."""
    import asyncio
    import threading

    from common import outbound

    released = threading.Event()
    calls: dict[str, int] = {}
    _lookups_answering(monkeypatch, {"dead.example": released, "alive.example": ["93.184.216.34"]}, calls)
    try:
        for _ in range(40):  # more than there are lookup threads, each check given up
            problem = await outbound.target_problem("https://dead.example/hook", False, resolve_timeout_s=0.05)
            assert problem == "dead.example did not resolve within 0.05 s"
        assert calls == {"dead.example": 1}
        # Another name is looked up at once, as ever.
        assert await outbound.target_problem("https://alive.example/hook", False, resolve_timeout_s=5) is None
        assert await outbound.target_problem("https://alive.example/hook", False, resolve_timeout_s=5) is None
        assert calls["alive.example"] == 2  # one at a time, not remembered: each check looks again
    finally:
        released.set()
    # Once its lookup has ended, the dead name is looked up afresh.
    for _ in range(100):
        if "dead.example" not in outbound._lookups_in_flight:
            break
        await asyncio.sleep(0.05)
    assert await outbound.target_problem("https://dead.example/hook", False, resolve_timeout_s=5) == (
        "dead.example could not be resolved for now (temporary failure in name resolution)")
    assert calls["dead.example"] == 2


async def test_a_name_that_does_not_resolve_is_refused_as_one_of_a_private_address_is(monkeypatch, caplog):
    """A name that did not resolve was refused as "X does not resolve", one that resolves to a
    private address as "X resolves to a private ... address": through POST /webhooks, a
    callback_url or a `url`, anyone could tell which names the private network has. The two are
    one refusal; the log keeps the difference."""
    import logging
    import socket

    from common.outbound import PrivateAddressRefused, target_problem

    calls: dict[str, int] = {}
    no_such_name = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    _lookups_answering(monkeypatch, {"db.internal": ["10.0.0.5"], "nothing.internal": no_such_name}, calls)
    with caplog.at_level(logging.INFO, logger="common.outbound"):
        exists = await target_problem("https://db.internal/hook", False)
        missing = await target_problem("https://nothing.internal/hook", False, "AUDIO_URL_ALLOW_PRIVATE")
    assert exists == "db.internal does not resolve to a public address (set WEBHOOK_ALLOW_PRIVATE=true to allow" \
                     " private ones)"
    assert missing == exists.replace("db.", "nothing.").replace("WEBHOOK", "AUDIO_URL")
    assert "10.0.0.5" in caplog.text and "Name or service not known" in caplog.text
    # As the connection is made (a name that turned private since the check): the same words.
    assert PrivateAddressRefused("db.internal").strerror == "db.internal does not resolve to a public address"


def _words_said(segments: list[Segment]) -> dict[str, list[Word]]:
    said: dict[str, list[Word]] = {}
    for segment in segments:
        said.setdefault(segment.speaker, []).extend(segment.words)
    return said


def _each_word_stays_with_its_speaker(before: list[Segment], after: list[Segment]) -> None:
    """Every word after a rewrite is one or more of its speaker's own words (a replacement over
    their time), and every word said is within a word of the same speaker."""
    mine, theirs = _words_said(before), _words_said(after)
    for speaker, words in theirs.items():
        for word in words:
            assert any(w.start == word.start for w in mine[speaker]), (speaker, word)
            assert any(w.end == word.end for w in mine[speaker]), (speaker, word)
    for speaker, words in mine.items():
        for word in words:
            assert any(w.start <= word.start and word.end <= w.end for w in theirs.get(speaker, ())), (speaker, word)


def test_a_number_said_partly_by_another_speaker_is_redacted_where_it_is_the_speakers_own():
    """A dictates a number, B repeats its middle group back and A says the last group after a
    pause: A's own match held a word after B's, outside the words said over each other, and
    redaction raised KeyError, on every retry of the chunk until the job failed."""
    a = segment_of((" My", 0.0), (" number", 0.25), (" is", 0.65), (" 0171", 0.9), (" 234", 1.7))
    b = segment_of((" 234,", 2.3), speaker="spk_1", index=1)
    rest = segment_of((" 5678.", 3.6), index=2)
    for kinds, stored in ((["phone"], [("spk_0", "My number is [PHONE]."), ("spk_1", "234,")]),
                          (["phone", "card", "number"], [("spk_0", "My number is [PHONE]."), ("spk_1", "[NUMBER],")])):
        redacted = redact([a, b, rest], kinds)
        assert [(s.speaker, s.text) for s in redacted] == stored
        _each_word_stays_with_its_speaker([a, b, rest], redacted)


def test_redacting_words_of_speakers_who_talk_over_each_other_neither_fails_nor_moves_a_word():
    import random

    said = [" 555", " 1234", " 12", " 0171", " 234", " call", " me", " at", " 4111", " 1111", " okay", " 2020",
            " ,", " 7", " 89", " dash", " anna", " dot", " com", " 5678."]
    rng = random.Random(20240611)
    for layout in range(400):
        words: list[tuple[str, Word]] = []
        t = 0.0
        for _ in range(rng.randint(2, 14)):
            t += rng.choice([0.0, 0.05, 0.2, 0.5, 1.2, 3.5]) * rng.random()
            length = rng.uniform(0.1, 0.5)
            words.append((rng.choice("ab"), Word(word=rng.choice(said), start=round(t, 3), end=round(t + length, 3))))
            t += length
        # Segments as the transcriber makes them: a speaker's words until another speaker's or a pause.
        runs: list[tuple[str, list[Word]]] = []
        for speaker, word in words:
            if runs and runs[-1][0] == speaker and word.start - runs[-1][1][-1].end < 1.0:
                runs[-1][1].append(word)
            else:
                runs.append((speaker, [word]))
        segments = [Segment(index=i, speaker=speaker, start_ts=run[0].start, end_ts=run[-1].end,
                            text="".join(w.word for w in run).strip(), words=run)
                    for i, (speaker, run) in enumerate(runs)]
        for kinds in (["phone"], ["phone", "card", "number", "email"]):
            try:
                redacted = redact(segments, kinds)
            except Exception as exc:  # noqa: BLE001 - the layout is what the failure needs to show
                raise AssertionError(f"layout {layout}: {[(s.speaker, s.text, s.start_ts) for s in segments]}") from exc
            _each_word_stays_with_its_speaker(segments, redacted)
            assert all(s.text == "".join(w.word for w in s.words).strip() for s in redacted)


def test_a_word_goes_to_the_speaker_whose_turns_overlap_it_most_in_all():
    """Each turn was weighed alone: a word across a short pause of one speaker (0.4 s in one turn,
    0.4 s in the next) went to another speaker's turn of 0.5 s in that pause."""
    turns = [turn("spk_0", 0.0, 5.0), turn("spk_0", 5.1, 10.0), turn("spk_1", 4.8, 5.3)]
    assert speaker_of(4.6, 5.5, turns) == "spk_0"  # 0.4 s + 0.4 s against 0.5 s
    assert speaker_of(4.85, 5.3, turns) == "spk_1"  # 0.15 s + 0.2 s against 0.45 s
    words = [Word(word=w, start=s, end=e)
             for w, s, e in [(" so", 4.0, 4.5), (" anyway", 4.6, 5.5), (" then", 5.6, 6.0)]]
    assert [(s, "".join(w.word for w in r).strip()) for s, r, _ in _runs_by_speaker(words, [None] * 3, turns)] == [
        ("spk_0", "so anyway then")]


def test_recent_keeps_only_its_newest_entries():
    from common.recent import Recent

    recent: Recent[int, str] = Recent(2)
    recent[1], recent[2], recent[3] = "one", "two", "three"
    assert len(recent) == 2 and 1 not in recent
    assert (recent.peek(2), recent.peek(3)) == ("two", "three")
    recent.put(2, "two again")  # stored again: the newest now, so 3 is the oldest
    recent[4] = "four"
    assert 3 not in recent and (recent.peek(2), recent.peek(4)) == ("two again", "four")


def test_a_recent_entry_used_is_kept_and_one_only_looked_at_is_not():
    """get counts as a use (the notifier's endpoints, least recently used going first); peek and
    `in` do not (the persister's announced failures and the transcriber's languages go oldest first)."""
    from common.recent import Recent

    used: Recent[int, str] = Recent(2)
    used[1], used[2] = "one", "two"
    assert used.get(1) == "one" and used.get(5) is None and used.get(5, "none") == "none"
    used[3] = "three"
    assert 1 in used and 2 not in used

    looked_at: Recent[int, str] = Recent(2)
    looked_at[1], looked_at[2] = "one", "two"
    assert 1 in looked_at and looked_at.peek(1) == "one" and looked_at.peek(5) is None
    looked_at[3] = "three"
    assert 1 not in looked_at and 2 in looked_at


def test_ended_jobs_keep_the_newest_ends_in_the_order_first_announced():
    from common.broker import ENDED_JOBS_KEPT, EndedJobs

    ended = EndedJobs()
    for job_id in range(ENDED_JOBS_KEPT):
        ended.add(job_id)
    ended.add(0)  # announced again: keeps its first place
    ended.add(ENDED_JOBS_KEPT)
    assert 0 not in ended and 1 in ended and ENDED_JOBS_KEPT in ended


async def test_a_temporary_name_resolution_failure_is_told_apart_from_a_name_that_does_not_exist(monkeypatch):
    """Every resolution error was "does not resolve to a public address", a final 400 through the
    API, a name server's blip (EAI_AGAIN) and a lookup given up at its limit too. Those two are a
    TemporaryProblem now; a name that does not exist keeps the words a private address gets."""
    import socket
    import threading

    from common.outbound import TemporaryProblem, target_problem

    no_answer = threading.Event()
    calls: dict[str, int] = {}
    _lookups_answering(monkeypatch, {"blip.example": socket.gaierror(socket.EAI_AGAIN, "Temporary failure"),
                                     "nothing.example": socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
                                     "silent.example": no_answer}, calls)
    try:
        blip = await target_problem("https://blip.example/hook", False)
        silent = await target_problem("https://silent.example/hook", False, resolve_timeout_s=0.05)
    finally:
        no_answer.set()
    missing = await target_problem("https://nothing.example/hook", False)
    assert isinstance(blip, TemporaryProblem) and isinstance(silent, TemporaryProblem), (blip, silent)
    assert blip == "blip.example could not be resolved for now (temporary failure in name resolution)"
    assert silent == "silent.example did not resolve within 0.05 s"
    assert not isinstance(missing, TemporaryProblem)
    assert missing == "nothing.example does not resolve to a public address (set WEBHOOK_ALLOW_PRIVATE=true to allow" \
                      " private ones)"


def test_ipv6_site_local_addresses_are_not_public():
    """fec0::/10 (site-local, deprecated but still routed inside some networks) is neither private
    nor non-global to Python 3.11's ipaddress: a name resolving there was requested."""
    from common.outbound import is_private_address

    assert is_private_address("fec0::1") and is_private_address("feff::1") and is_private_address("fec0::1%eth0")
    assert not is_private_address("2606:4700::1")


def test_nat64_addresses_are_judged_by_the_ipv4_address_inside():
    """On an IPv6-only cluster with DNS64 every IPv4-only host resolves into NAT64's well-known
    prefix 64:ff9b::/96, which ipaddress counts as reserved: every such webhook target or recording
    URL was refused. The IPv4 address in its last 32 bits decides, as for mapped and 6to4 forms."""
    from common.outbound import is_private_address

    assert not is_private_address("64:ff9b::808:808")  # 8.8.8.8
    assert not is_private_address("64:ff9b::8.8.4.4")
    for inside in ("169.254.169.254", "127.0.0.1", "10.0.0.1", "192.168.1.1", "100.64.0.1", "0.0.0.0"):
        assert is_private_address(f"64:ff9b::{inside}"), inside
    # RFC 8215's local-use prefix embeds addresses as each network chooses: nothing to judge by.
    assert is_private_address("64:ff9b:1::808:808")
    # Only the /96 embeds the address in its last 32 bits: the rest of 64:ff9b::/32 stays refused.
    assert is_private_address("64:ff9b:0:0:1::808:808")


def test_special_purpose_ranges_are_refused_whatever_the_interpreter_says():
    """Before CVE-2024-4032's fix (Python 3.11.10, 3.12.4) ipaddress counted most of 192.0.0.0/24
    as global: a webhook or recording URL resolving to 192.0.0.192 (a cloud's older metadata
    address) was requested. IANA's not globally reachable ranges are refused on every release."""
    from common.outbound import is_private_address

    for address in ("192.0.0.192", "192.0.0.1", "192.0.0.9", "192.0.0.255", "192.0.2.1", "198.18.0.1",
                    "198.51.100.1", "203.0.113.1", "240.0.0.1", "255.255.255.255", "0.0.0.0",
                    "::1", "::", "100::1", "2001:db8::1", "3fff::1", "fc00::1", "fe80::1%eth0", "64:ff9b:1::1"):
        assert is_private_address(address), address
    # Inside IPv6's NAT64, mapped and 6to4 forms the IPv4 address is judged the same way.
    for address in ("64:ff9b::192.0.0.192", "::ffff:192.0.0.192", "2002:c000:c0::1"):
        assert is_private_address(address), address
    for address in ("8.8.8.8", "1.1.1.1", "2606:4700::1111", "64:ff9b::8.8.8.8", "::ffff:8.8.8.8"):
        assert not is_private_address(address), address


async def test_a_webhook_reached_through_nat64_is_registered_and_connected_to(monkeypatch):
    """With DNS64 an IPv4-only webhook endpoint resolves to 64:ff9b::/96 only: both the check at
    registration (target_problem) and the one as the connection is made (PublicOnlyResolver) let
    a public address there through and refuse the metadata service reached that way."""
    from common.outbound import PrivateAddressRefused, PublicOnlyResolver, target_problem

    _lookups_answering(monkeypatch, {"v4only.example": ["64:ff9b::5db8:d822"],  # 93.184.216.34
                                     "metadata.example": ["64:ff9b::a9fe:a9fe"]}, {})
    assert await target_problem("https://v4only.example/hook", False) is None
    assert "does not resolve to a public address" in await target_problem("https://metadata.example/hook", False)
    resolver = PublicOnlyResolver()
    try:
        found = await resolver.resolve("v4only.example", 443)
        assert [answer["host"] for answer in found] == ["64:ff9b::5db8:d822"]
        with pytest.raises(PrivateAddressRefused):
            await resolver.resolve("metadata.example", 443)
    finally:
        await resolver.close()


# ---- subtitle lines of scripts written without spaces, speaker labels ----------------------------


def _pieces_segment(pieces: list[str], step: float = 0.45):
    """A segment whose text is `pieces` written together, as Whisper gives Thai or Chinese: each
    piece a word with its own time."""
    from services.ingest.segments import TranscriptSegment

    words = [Word(word=piece, start=round(0.3 + n * step, 3), end=round(0.3 + n * step + step - 0.1, 3))
             for n, piece in enumerate(pieces)]
    return TranscriptSegment(speaker="spk_0", start_ts=words[0].start, end_ts=words[-1].end,
                             text="".join(pieces), words=words)


def test_thai_subtitle_lines_never_start_with_a_mark_torn_from_its_syllable():
    """Whisper cuts Thai into pieces that may start with a tone mark or vowel sign (ก + ่อน), or
    end with a vowel written before its consonant (เ + ขา): a line that starts with ่ shows it on
    nothing, a line that ends with เ tears the syllable in two."""
    import unicodedata

    from services.ingest.captions import caption_cues

    pieces = (["ก", "่อน", "ท", "ี่", "เ", "ขา", "จะ", "ไป", "โ", "รง", "เ", "รียน", "น", "้ำ", "ก", "็", "ไหล"]
              + ["ส", "วั", "สดี", "ค", "รับ", "วัน", "นี้", "อา", "กา", "ศ", "ร้", "อน", "ม", "า", "ก"]) * 2
    for width in range(12, 21):
        for count in (1, 2):
            cues = caption_cues([_pieces_segment(pieces)], width, count, speaker_takes_room=False)
            lines = [line for cue in cues for line in cue.lines]
            assert "".join(lines) == "".join(pieces) and len(cues) > 1
            on_nothing = [line for line in lines if unicodedata.category(line[0]) in ("Mn", "Mc", "Me")
                          or line[0] in "ะาำ"]
            torn_after_leading_vowel = [line for line in lines if line[-1] in "เแโใไ"]
            assert (on_nothing, torn_after_leading_vowel) == ([], []), (width, count)


def test_a_question_mark_of_chinese_or_thai_never_makes_a_cue_or_line_of_its_own():
    from services.ingest.captions import caption_cues

    chinese = _pieces_segment(["你", "今", "天", "去", "哪", "里", "？"])
    assert [cue.lines for cue in caption_cues([chinese], 12, 1, speaker_takes_room=False)] == [
        ["你今天去哪"], ["里？"]]
    thai = _pieces_segment(["คุณ", "จะ", "ไป", "ไหน", "กัน", "ดี", "?"])  # 12 columns and the ?
    assert [cue.lines for cue in caption_cues([thai], 12, 1, speaker_takes_room=False)] == [
        ["คุณจะไปไหนกัน"], ["ดี?"]]
    passage = list("我们今天开会。大家好！你去哪里？我不知道，真的。「好」、对吧？")
    for width in range(12, 21):
        for count in (1, 2):
            cues = caption_cues([_pieces_segment(passage)], width, count, speaker_takes_room=False)
            lines = [line for cue in cues for line in cue.lines]
            assert "".join(lines) == "".join(passage)
            assert not [line for line in lines if line[0] in "。！？，」、"], (width, count, lines)


def test_subtitles_of_segments_corrected_to_10000_characters_are_cut_in_moments():
    """Wide cues (?max_line_width=200&max_line_count=10) of a segment corrected to 10,000 Chinese
    characters took 6 s: each cue's lines were counted again for every character added, and its
    lines balanced by trying every cut."""
    import random
    import time

    from services.ingest.captions import columns
    from services.ingest.corrections import MAX_SEGMENT_CHARS
    from services.ingest.segments import TranscriptSegment
    from services.ingest.transcripts import to_srt, to_vtt

    rng = random.Random(3)
    segments = []
    for n, speaker in enumerate(("spk_0", "spk_1")):
        text = "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(MAX_SEGMENT_CHARS))
        step = 30.0 / len(text)
        words = [Word(word=c, start=round(n * 30 + i * step, 3), end=round(n * 30 + (i + 1) * step, 3))
                 for i, c in enumerate(text)]
        segments.append(TranscriptSegment(speaker=speaker, start_ts=n * 30.0, end_ts=n * 30.0 + 30, text=text,
                                          words=words))
    # The process's CPU time, not the wall clock: other work on the machine (a test beside this
    # one) does not count. About 1 s here now, 6 s before.
    started = time.process_time()
    srt, vtt = to_srt(segments, 200, 10), to_vtt(segments, 200, 10)
    took = time.process_time() - started
    assert took < 4, f"{took:.1f} s of CPU"
    srt_cues = [block.split("\n")[2:] for block in srt.strip().split("\n\n")]  # the speaker takes room
    vtt_cues = [[re.sub(r"^<v spk_\d>", "", line) for line in block.split("\n")[1:]]
                for block in vtt.strip().split("\n\n")[1:]]  # the voice tag does not
    for cues in (srt_cues, vtt_cues):
        assert all(len(lines) <= 10 and all(columns(line) <= 200 for line in lines) for lines in cues)
        assert "".join(re.sub(r"^spk_\d: ", "", line) for lines in cues for line in lines) == "".join(
            s.text for s in segments)


def test_subtitle_lines_are_as_even_as_trying_every_cut_makes_them():
    """wrap finds where to cut by bisection: the lines it gives are those of trying every cut, the
    first of equally good ones, for words of any width (a mark that takes no column, a word wider
    than a line) and a first line partly taken by the speaker's name."""
    import random

    from services.ingest.captions import _lines_needed, _Token, wrap

    def every_cut(tokens, width, count, taken):
        widths = [(t.columns, t.bare_columns) for t in tokens]
        fewest = _lines_needed(widths, width, taken)
        if fewest > count:
            return None
        n, inf, cut = len(tokens), float("inf"), {}
        widest = [[0 if i == n else inf for i in range(n + 1)] for _ in range(fewest + 1)]
        for k in range(1, fewest + 1):
            for i in range(n - 1, -1, -1):
                for j in range(i + 1, n + 1):
                    used = sum(w[0] for w in widths[i + 1:j]) + widths[i][1] + (taken if i == 0 else 0)
                    if used > width and j > i + 1:
                        break
                    if max(used, widest[k - 1][j]) < widest[k][i]:
                        widest[k][i], cut[(k, i)] = max(used, widest[k - 1][j]), j
        lines, i, k = [], 0, fewest
        while i < n:
            lines.append("".join(t.text for t in tokens[i:cut[(k, i)]]).strip())
            i, k = cut[(k, i)], k - 1
        return lines

    rng = random.Random(11)
    vocabulary = ["a", "I", "the", "meeting", "ok.", "我", "们", "。", "ก", "่อน", "\u200b", "é", "안녕하세요", "x" * 30]
    for _ in range(3000):
        tokens = [_Token((" " if i and rng.random() < 0.6 else "") + rng.choice(vocabulary), 0.0, 0.0)
                  for i in range(rng.randint(1, 30))]
        width, count, taken = rng.randint(1, 50), rng.randint(1, 12), rng.choice([0, 0, rng.randint(0, 20)])
        assert wrap(tokens, width, count, taken) == every_cut(tokens, width, count, taken), (tokens, width, count)


def test_a_speaker_label_is_spk_and_a_number_as_the_diarizer_writes_it():
    """`spk_1\\n`, `spk_１` (full-width digit) and `spk_01` are not labels: a correction to one would
    make a speaker no one else shows, and naming one while the job runs names no one."""
    from services.ingest.corrections import SegmentCorrection
    from services.ingest.segments import is_label
    from services.ingest.speakers import FromTranscript

    labels, not_labels = ["spk_0", "spk_7", "spk_10", "spk_9999"], ["spk_1\n", "spk_１", "spk_01", "spk_00",
                                                                   "spk_10000", "spk_", " spk_1", "spk_-1"]
    assert [is_label(text) for text in labels + not_labels] == [True] * len(labels) + [False] * len(not_labels)
    for text in labels:
        assert SegmentCorrection(speaker=text).speaker == text
        assert FromTranscript(name="Anna", transcript_id=1, label=text).label == text
    for text in not_labels:
        with pytest.raises(ValidationError):
            SegmentCorrection(speaker=text)
        with pytest.raises(ValidationError):
            FromTranscript(name="Anna", transcript_id=1, label=text)


# --- OpenAI-compatible answers: verbose_json's words in time order; segment texts joined -------


def test_verbose_json_words_are_in_time_order_though_speakers_overlap():
    """verbose_json's `words` were listed segment by segment: with A talking 0-10 s and B's "Yes."
    at 3.0 s the list went back in time, where OpenAI's words always go forward."""
    from types import SimpleNamespace

    from services.ingest.openai_api import rendered
    from services.ingest.segments import TranscriptSegment

    def segment(speaker: str, start: float, end: float, words: list[tuple[str, float, float]]) -> TranscriptSegment:
        return TranscriptSegment(speaker=speaker, start_ts=start, end_ts=end, text=" ".join(w for w, *_ in words),
                                 words=[Word(word=w, start=s, end=e) for w, s, e in words])

    a = segment("spk_0", 0.0, 10.0, [("So", 0.0, 1.0), ("we", 2.0, 3.0), ("agreed", 3.0, 3.5), ("on", 3.0, 5.0),
                                     ("it.", 8.0, 10.0)])
    b = segment("spk_1", 3.0, 4.0, [("Yes.", 3.0, 3.5), ("Sure.", 3.6, 4.0)])
    document = SimpleNamespace(segments=[a, b], duration=10.0, language="en", options=JobOptions(task="transcribe"))
    words = rendered(document, "verbose_json", "transcribe").content["words"]
    assert [(w["word"], w["start"]) for w in words] == [
        ("So", 0.0), ("we", 2.0), ("agreed", 3.0), ("Yes.", 3.0), ("on", 3.0), ("Sure.", 3.6), ("it.", 8.0)]
    # By start, then end; words of the same times stay as listed (A's before B's).
    assert all(x["start"] <= y["start"] for x, y in zip(words, words[1:]))


def test_segment_texts_are_joined_without_a_space_only_next_to_letters_of_unspaced_scripts():
    """An emoji or a full-width symbol is as wide as a Chinese character, and was taken for one:
    "That is funny 😂" and "Okay." were joined as "That is funny 😂Okay.". A space is left out
    only next to a Chinese, Japanese or Thai letter, past the punctuation where the two meet."""
    from services.ingest.captions import written_unspaced_letter, written_with_spaces
    from services.ingest.openai_api import joined_text, text_separator

    assert joined_text(["That is funny 😂", "Okay."]) == "That is funny 😂 Okay."
    assert joined_text(["Price: ＄5 ＃", "Next."]) == "Price: ＄5 ＃ Next."
    assert joined_text(["Good 👍🏽", "😂", "Okay."]) == "Good 👍🏽 😂 Okay."
    # Chinese, Japanese and Thai stay joined without one, their punctuation too, and next to Latin text.
    assert joined_text(["大家好。", "「今天开会」", "Let's begin.", "好的。"]) == (
        "大家好。「今天开会」Let's begin.好的。")
    assert joined_text(["ありがとうー", "はい。"]) == "ありがとうーはい。"
    assert joined_text(["สวัสดีครับ", "ไม่", "Hello"]) == "สวัสดีครับไม่Hello"  # ไม่ ends with a tone mark
    assert joined_text(["안녕하세요.", "네."]) == "안녕하세요. 네."  # Korean is written with spaces
    assert text_separator("", "x") == text_separator("x", "") == ""
    assert [written_unspaced_letter(c) for c in "我の々カｶกລកမ"] == [True] * 9
    assert not any(written_unspaced_letter(c) for c in "😂＄＃。、（a안")
    # Subtitles still part Chinese and Japanese at each character (their lines break between any two).
    assert not any(written_with_spaces(c) for c in "我の。")


def test_a_dropped_objects_key_is_logged_escaped_on_one_line():
    """A key with a line break (S3 takes one) began a log line of its own; unprintable characters
    and backslashes are escaped as Python writes them, so that keys that differ in them differ."""
    from services.ingest.inbox import loggable

    assert loggable("calls/monday.wav") == "calls/monday.wav"
    assert loggable("звонки/пн 1.wav") == "звонки/пн 1.wav"  # printable letters of any script stay
    assert loggable("a\nb\r\tc\x00\x1b[31m\u2028d") == "a\\nb\\r\\tc\\x00\\x1b[31m\\u2028d"
    assert loggable("a\\nb") == "a\\\\nb" != loggable("a\nb")
    assert "\n" not in loggable(RuntimeError("no such key: a\nb"))


def test_an_error_of_a_route_without_a_job_in_its_path_is_logged_with_the_job_it_recorded():
    """POST /v1/audio/transcriptions has no job_id in its path: once it knows its job it records it
    in the request's state, and an error it then ends with is logged with it."""
    from common.logs import current_job
    from services.ingest.error_handlers import _for_the_routes_job

    for scope, job in [({"path_params": {"job_id": 7}}, 7), ({"path_params": {}, "state": {"job_id": 8}}, 8),
                       ({"state": {"owner": "x"}}, None), ({}, None)]:
        with _for_the_routes_job(scope):
            assert current_job.get() == job, scope


def test_postgresql_14_before_14_4_is_refused_for_its_concurrent_index_builds():
    """PostgreSQL 14.0-14.3 could build a corrupt index with CREATE INDEX CONCURRENTLY (rows updated
    during the build left out), as the migrations and the search indexes build theirs: the README
    asked for "14 or later", and a start-up applied them there. apply_migrations now refuses such a
    server first (UnsupportedPostgres, naming the fix); the check by server_version_num."""
    from common.db import postgres_version_refused

    for refused in (140000, 140001, 140002, 140003):
        reason = postgres_version_refused(refused)
        assert reason is not None and f"14.{refused - 140000}" in reason and "14.4" in reason, (refused, reason)
        assert "upgrade" in reason
    for allowed in (140004, 140013, 150000, 150020, 160004, 170002, 180000):
        assert postgres_version_refused(allowed) is None, allowed


# --- multichannel's words (ingest fixes) ---------------------------------------------------------


@pytest.mark.parametrize("value, meant", [
    ("true", True), (" TRUE ", True), ("Yes", True), ("on", True), ("1", True), (True, True), (1, True),
    ("false", False), ("No ", False), ("OFF", False), ("0", False), (False, False), (0, False), ("", False),
    ("  ", False), (None, False)])
def test_multichannel_takes_the_listed_words_wherever_it_is_given(value, meant):
    """One field for POST /recognize's form, a rerun's JSON and a bucket drop's metadata: true/false,
    1/0, yes/no, on/off in any case, blanks around them ignored, as `stream` takes them."""
    from services.ingest.jobs import rerun_options
    from services.ingest.openai_api import asked_stream

    assert JobOptions(multichannel=value).multichannel is meant
    assert rerun_options({"language": "en"}, JobOptions.model_validate({"multichannel": value})).multichannel is meant
    if isinstance(value, str):
        assert drop_options({"x-amz-meta-multichannel": value}).multichannel is meant
        assert asked_stream(value) is meant


@pytest.mark.parametrize("value", ["t", "f", "y", "n", "T", "truee", "maybe", "2", 2, -1, 1.0, [True]])
def test_multichannel_refuses_what_pydantic_would_take_as_a_bool_and_other_words(value):
    with pytest.raises(ValidationError, match="multichannel: true or false"):
        JobOptions(multichannel=value)
    if isinstance(value, str):
        with pytest.raises(ValueError, match="x-amz-meta-multichannel"):
            drop_options({"x-amz-meta-multichannel": value})


def test_a_vocabulary_past_what_whisper_is_told_loses_whole_terms_with_a_warning_naming_the_job(caplog):
    """150 characters of Chinese are about 240 of Whisper's tokens, and faster-whisper's get_prompt
    keeps 223 of the hotwords' tokens: the last terms were cut off unsaid, the last of them in the
    middle of a character. Now whole terms are left out, with a warning that names the job."""
    import logging

    from faster_whisper import WhisperModel
    from faster_whisper.tokenizer import Tokenizer

    from common.logs import _JobIdFilter, job_logged
    from common.messages import VOCABULARY_MAX_CHARS
    from services.transcriber import whisper

    model = WhisperModel(str(ROOT / "models" / "whisper-base"), device="cpu", compute_type="int8")
    english = JobOptions(vocabulary="ComfyUI, Kubernetes, PostgreSQL, RabbitMQ, faster-whisper, pyannote, Grafana,"
                                    " Prometheus, Anthropic, Hetzner, Siobhan Nguyen, Joaquin").vocabulary
    tokenizer = Tokenizer(model.hf_tokenizer, True, task="transcribe", language="zh")
    assert len(tokenizer.encode(" " + ", ".join(english))) < 100  # 136 characters

    def told(hotwords: str) -> str:
        """What Whisper is told of `hotwords` before each window."""
        prompt = model.get_prompt(tokenizer, [], hotwords=hotwords)
        return tokenizer.decode(prompt[1:prompt.index(tokenizer.sot)]).strip()

    caplog.handler.addFilter(_JobIdFilter())
    # Names of ancient Chinese bronzes and beasts: a character is two or three tokens.
    terms = [a + b for a in ("饕餮", "麒麟", "鳳凰", "貔貅", "獬豸", "睚眦")
             for b in ("氍毹", "罍觥", "甗簋", "琮璜", "彝鼎", "觚觯")]
    for comma in (",", "，"):  # terms as the validator splits them, or one text with Chinese commas
        vocabulary = JobOptions(vocabulary=comma.join(terms)[:VOCABULARY_MAX_CHARS]).vocabulary
        whole = ", ".join(vocabulary)
        assert told(whole) != whole  # what faster-whisper does with all of it
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=whisper.log.name), job_logged(4242):
            hotwords = whisper._hotwords(model, vocabulary)
            assert whisper._hotwords(model, english) == ", ".join(english)
        assert told(hotwords) == hotwords and whole.startswith(hotwords)
        kept = re.split(r"\s*[,，]\s*", hotwords)
        assert kept == terms[:len(kept)] and 10 < len(kept) < 30
        [warning] = [r.getMessage() for r in caplog.records if r.name == whisper.log.name]
        assert warning.startswith("job=4242 ") and warning.endswith(whole[len(hotwords):].lstrip(", ，"))
    assert whisper._hotwords(model, []) is None and whisper._hotwords(model, None) is None


def test_every_store_client_trusts_the_same_certificates(monkeypatch, tmp_path):
    """With MINIO_SECURE=true ingest's main client trusted SSL_CERT_FILE or certifi's bundle, while
    the timeout clients (s3_quick, the /readyz probe, the workers' worker_client) passed none and
    urllib3 loaded the system's store: with an internal CA there only, /readyz was green and the
    workers read audio while every upload failed TLS. Every client now trusts the same."""
    import certifi

    from common import storage
    from common.settings import Settings
    from services.ingest.readiness import CHECK_TIMEOUT_S

    settings = Settings(_env_file=None, minio_endpoint="store.invalid:9000", minio_secure=True)

    def trusted() -> list[tuple[str | None, str | None]]:
        clients = [storage.make_client(settings),  # ingest's state.s3
                   storage.make_client(settings, timeout_s=storage.QUICK_CLIENT_TIMEOUT_S, connections=8),  # s3_quick
                   storage.make_client(settings, timeout_s=CHECK_TIMEOUT_S),  # the /readyz probe
                   storage.worker_client(settings)]  # the diarizer's and transcriber's
        return [(c._http.connection_pool_kw.get("cert_reqs"), c._http.connection_pool_kw.get("ca_certs"))
                for c in clients]

    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    assert trusted() == [("CERT_REQUIRED", certifi.where())] * 4
    bundle = tmp_path / "internal-ca.pem"
    bundle.write_text("")
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    assert trusted() == [("CERT_REQUIRED", str(bundle))] * 4


@pytest.mark.parametrize("value, delays", [("5,30,120", [5, 30, 120]), (" 1, 2 ,", [1, 2]), ("30.0", [30]), ("", [])])
def test_retry_delays_are_read_at_load(value, delays):
    """Whole seconds, at least 1 each; a blank RETRY_DELAYS_S means no retries, a blank
    WEBHOOK_RETRY_DELAYS_S one minute."""
    from common.settings import Settings

    settings = Settings(_env_file=None, retry_delays_s=value, webhook_retry_delays_s=value)
    assert settings.retry_delays == delays and settings.retry_delays_s == value
    assert settings.webhook_retry_delays == (delays or [60])


@pytest.mark.parametrize("setting", ["RETRY_DELAYS_S", "WEBHOOK_RETRY_DELAYS_S"])
@pytest.mark.parametrize("value, said", [("5s,30s", "'5s' is not a number of seconds"),
                                         ("1m", "'1m' is not a number of seconds"),
                                         ("5,-30", "'-30': each delay must be a whole number of seconds, at least 1"),
                                         ("0.5", "'0.5': each delay must be"), ("0", "'0': each delay must be"),
                                         ("1.5", "'1.5': each delay must be"), ("inf", "'inf': each delay must be"),
                                         ("nan", "'nan': each delay must be")])
def test_retry_delays_that_cannot_be_delays_stop_the_start(monkeypatch, setting, value, said):
    """RETRY_DELAYS_S=5s,30s loaded, then every worker crashed at each start when it began to
    consume (ingest's consumers restarted for ever); WEBHOOK_RETRY_DELAYS_S=1m stopped the
    notifier at start with a traceback; a negative delay was a negative x-message-ttl RabbitMQ
    refuses, and 0.5 became 0. Now the start stops at once, in the one line other settings get."""
    from common import settings as settings_module

    monkeypatch.setenv(setting, value)
    settings_module.get_settings.cache_clear()
    try:
        with pytest.raises(SystemExit) as stopped:
            settings_module.get_settings()
    finally:
        settings_module.get_settings.cache_clear()
    told = str(stopped.value)
    assert told.startswith(f"invalid settings: {setting}: Value error, {said}") and "\n" not in told
