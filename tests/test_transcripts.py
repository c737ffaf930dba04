"""Reading results: progress in /status, /transcripts as JSON, SRT, WebVTT and text, the job
list, and deleting a job with its audio. Formatter edge cases are plain unit tests."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import unquote

import aio_pika
import httpx
import numpy as np
import pytest
from litestar.testing import TestClient

from common.messages import SpeakerTurn, Word
from services.diarizer.pipeline import plan_chunks
from services.ingest.app import create_app
from services.ingest.captions import columns
from services.ingest.jobs import percent_done, public_stage
from services.ingest.segments import TranscriptSegment
from services.ingest.transcripts import (
    content_disposition,
    download_name,
    rttm_uri,
    speaking_time,
    srt_timestamp,
    to_rttm,
    to_srt,
    to_txt,
    to_vtt,
    txt_timestamp,
    vtt_timestamp,
)
from tests.audio_files import encode, without_its_length
from tests.conftest import Stack, events_queue, free_port, job_events, running_stack

ALICE, BOB = "key-alice-transcripts", "key-bob-transcripts"


# ---- formatters (no stack) --------------------------------------------------------------------


@pytest.mark.parametrize("seconds, srt, vtt, txt", [
    (0, "00:00:00,000", "00:00:00.000", "00:00:00"),
    (1.5, "00:00:01,500", "00:00:01.500", "00:00:01"),
    (59.9994, "00:00:59,999", "00:00:59.999", "00:00:59"),
    (59.9996, "00:01:00,000", "00:01:00.000", "00:01:00"),  # rounds up into the next minute
    (3599.9995, "01:00:00,000", "01:00:00.000", "01:00:00"),
    (2 * 3600 + 61.25, "02:01:01,250", "02:01:01.250", "02:01:01"),
    (100 * 3600 + 0.001, "100:00:00,001", "100:00:00.001", "100:00:00"),
    (-0.2, "00:00:00,000", "00:00:00.000", "00:00:00"),
])
def test_timestamps(seconds, srt, vtt, txt):
    assert (srt_timestamp(seconds), vtt_timestamp(seconds), txt_timestamp(seconds)) == (srt, vtt, txt)


SEGMENTS = [
    TranscriptSegment(speaker="spk_0", start_ts=0.5, end_ts=3.25, text="Hello everyone."),
    TranscriptSegment(speaker="spk_1", start_ts=3.9, end_ts=3661.5, text="Tom & Jerry <3\nsecond line --> x"),
]


def test_srt_cues_are_numbered_with_speaker_and_comma_milliseconds():
    assert to_srt(SEGMENTS) == (
        "1\n00:00:00,500 --> 00:00:03,250\nspk_0: Hello everyone.\n\n"
        "2\n00:00:03,900 --> 01:01:01,500\nspk_1: Tom & Jerry <3 second line -> x\n"
    )


def test_an_arrow_of_any_length_in_the_text_never_reads_as_timing():
    """One pass of replace("-->", "->") made "--->" into "-->", which players read as a timing line."""
    segment = TranscriptSegment(speaker="spk_0", start_ts=0.0, end_ts=2.0, text="step one ---> step two ----> three")
    lines = to_srt([segment]).splitlines()
    assert [line for line in lines if "-->" in line] == ["00:00:00,000 --> 00:00:02,000"]


def test_vtt_has_header_voice_tags_and_escaped_text():
    assert to_vtt(SEGMENTS) == (
        "WEBVTT\n\n"
        "00:00:00.500 --> 00:00:03.250\n<v spk_0>Hello everyone.\n\n"
        "00:00:03.900 --> 01:01:01.500\n<v spk_1>Tom &amp; Jerry &lt;3 second line --&gt; x\n"
    )


def test_txt_lines_and_empty_transcripts():
    assert to_txt(SEGMENTS) == ("[00:00:00] spk_0: Hello everyone.\n"
                                "[00:00:03] spk_1: Tom & Jerry <3 second line --> x\n")
    assert (to_srt([]), to_vtt([]), to_txt([])) == ("", "WEBVTT\n", "")


def timed(text: str, words: list[str], start: float = 0.3, step: float = 0.45) -> TranscriptSegment:
    """A segment whose words follow each other every `step` seconds, with half a second more
    after a comma or a full stop, as a speaker pauses."""
    timed_words, t = [], start
    for word in words:
        timed_words.append(Word(word=word, start=round(t, 3), end=round(t + step - 0.1, 3)))
        t += step + (0.5 if word.endswith((",", ".", "，", "。")) else 0.0)
    return TranscriptSegment(speaker="spk_0", start_ts=timed_words[0].start, end_ts=timed_words[-1].end,
                             text=text, words=timed_words)


JFK = "And so my fellow Americans, ask not what your country can do for you, ask what you can do for your country."


def test_a_long_segment_is_cut_into_cues_that_fit_on_screen():
    """11 s and 110 characters of one speaker: one cue would be a wall of text on screen."""
    segment = timed(JFK, JFK.split())
    assert to_srt([segment]) == (
        "1\n00:00:00,300 --> 00:00:07,000\n"
        "spk_0: And so my fellow Americans, ask\nnot what your country can do for you,\n\n"
        "2\n00:00:07,600 --> 00:00:11,100\n"
        "spk_0: ask what you can\ndo for your country.\n"
    )
    # Without the speaker in the lines, the second cue fits on one
    assert to_vtt([segment]) == (
        "WEBVTT\n\n"
        "00:00:00.300 --> 00:00:07.000\n"
        "<v spk_0>And so my fellow Americans, ask not\nwhat your country can do for you,\n\n"
        "00:00:07.600 --> 00:00:11.100\n<v spk_0>ask what you can do for your country.\n"
    )


def test_cue_limits_can_be_narrowed_and_a_cue_stays_long_enough_to_read():
    cues = parse_vtt(to_vtt([timed(JFK, JFK.split())], line_width=24, line_count=1))
    assert [c.text for c in cues] == ["And so my fellow", "Americans, ask not what", "your country can do for",
                                      "you, ask what you can do", "for your country."]
    assert all(len(c.lines) == 1 and columns(c.lines[0]) <= 24 and 1.0 <= c.end - c.start <= 7.0 for c in cues)


def test_wide_characters_take_two_columns_and_no_spaces_are_added():
    text = "我们今天讨论一下项目的进度，然后决定下一步怎么做。大家有什么意见吗？"
    words = re.findall("..?", text)  # Whisper's Chinese words: a character or two, no spaces
    [cue] = parse_srt(to_srt([timed(text, words, step=0.3)]))
    assert cue.lines == ["spk_0: 我们今天讨论一下项目的进度，然后", "决定下一步怎么做。大家有什么意见吗？"]
    assert max(columns(line) for line in cue.lines) <= 42


def test_lines_break_only_where_the_text_has_a_space():
    text = "Yes, sales grew by 12% in the last quarter, and by 30% in the one before it."
    words = ["Yes,", "sales", "grew", "by", "12", "%", "in", "the", "last", "quarter,", "and", "by", "30", "%",
             "in", "the", "one", "before", "it."]
    cues = parse_vtt(to_vtt([timed(text, words)], line_width=20, line_count=2))
    assert " ".join(c.text for c in cues) == text
    assert all("%" not in line.split()[0] for c in cues for line in c.lines), cues


def test_a_blank_word_does_not_make_a_long_segment_one_cue():
    segment = timed(JFK, JFK.split())
    segment.words.insert(4, Word(word=" ", start=2.4, end=2.45))
    assert to_srt([segment]) == to_srt([timed(JFK, JFK.split())])


def test_a_segment_without_word_times_is_one_cue_on_as_many_lines_as_it_needs():
    segment = TranscriptSegment(speaker="spk_1", speaker_name="Anna", start_ts=2.0, end_ts=13.0, text=JFK)
    [cue] = parse_srt(to_srt([segment]))
    assert (cue.start, cue.end, cue.speaker, cue.text) == (2.0, 13.0, "Anna", JFK)
    assert len(cue.lines) == 3 and all(columns(line) <= 42 for line in cue.lines)


def test_cues_of_people_talking_at_once_come_in_the_order_they_start():
    """WebVTT requires cues in order of their start; a long turn cut into cues must not keep the
    other person's interjection after it."""
    long_turn = timed(JFK, JFK.split())  # cut into two cues: 0.3 s and 7.6 s
    interjection = TranscriptSegment(speaker="spk_1", start_ts=3.0, end_ts=4.0, text="Yes.",
                                     words=[Word(word="Yes.", start=3.0, end=4.0)])
    cues = parse_vtt(to_vtt([long_turn, interjection]))
    assert [c.start for c in cues] == [0.3, 3.0, 7.6]
    assert [c.start for c in parse_srt(to_srt([long_turn, interjection]))] == [0.3, 3.0, 7.6]


def test_a_word_timed_at_one_instant_still_makes_a_cue_that_is_shown():
    hm = TranscriptSegment(speaker="spk_0", start_ts=1.0, end_ts=1.0, text="Hm.",
                           words=[Word(word="Hm.", start=1.0, end=1.0)])
    yes = TranscriptSegment(speaker="spk_0", start_ts=1.4, end_ts=1.4, text="Yes.")
    cues = parse_srt(to_srt([hm, yes]))
    assert [(c.start, c.end) for c in cues] == [(1.0, 1.4), (1.4, 2.4)]


def test_cues_of_words_all_timed_at_one_instant_follow_one_another_and_are_each_shown():
    """Whisper now and then times a run of words at one instant: cut to fit on one narrow line,
    they made three cues that all started at 12.000 and ended a millisecond later, shown at once
    and gone before anyone could read them."""
    from services.ingest.captions import MIN_CUE_S, caption_cues

    words = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
    at_once = TranscriptSegment(speaker="spk_0", start_ts=12.0, end_ts=12.0, text=" ".join(words),
                                words=[Word(word=w, start=12.0, end=12.0) for w in words])
    cues = parse_srt(to_srt([at_once], line_width=20, line_count=1))
    assert [(c.start, c.end, c.text) for c in cues] == [
        (12.0, 13.0, "one two three"), (13.0, 14.0, "four five six"), (14.0, 15.0, "seven eight")]

    # With the speaker's next words 1.5 s later, and someone else's in between: the three share
    # that time and none runs into the next; the other speaker's cue keeps its place.
    later = TranscriptSegment(speaker="spk_0", start_ts=13.5, end_ts=15.0, text="Then more.",
                              words=[Word(word="Then", start=13.5, end=14.0), Word(word="more.", start=14.2, end=15.0)])
    other = TranscriptSegment(speaker="spk_1", start_ts=12.2, end_ts=13.4, text="Yes.",
                              words=[Word(word="Yes.", start=12.2, end=13.4)])
    cues = caption_cues([at_once, later, other], line_width=20, line_count=1)
    assert [(c.speaker, round(c.start, 3), round(c.end, 3), c.lines) for c in cues] == [
        ("spk_0", 12.0, 12.5, ["one two three"]), ("spk_1", 12.2, 13.4, ["Yes."]),
        ("spk_0", 12.5, 13.0, ["four five six"]), ("spk_0", 13.0, 13.5, ["seven eight"]),
        ("spk_0", 13.5, 15.0, ["Then more."])], cues
    for speaker in ("spk_0", "spk_1"):
        own = [c for c in cues if c.speaker == speaker]
        assert all(a.end <= b.start for a, b in itertools.pairwise(own)), own
        assert all(c.end > c.start for c in own), own
    assert [c.start for c in cues] == sorted(c.start for c in cues)
    assert MIN_CUE_S == 1.0  # README: such a cue lasts up to 1 s


def test_many_cues_at_one_instant_with_the_next_soon_after_each_last_a_millisecond():
    """Cues of words all timed at one instant share the time until that speaker's next cue: with
    thirty of them and the next 15 ms later, each got half a millisecond, and once written to the
    millisecond started where it ended (players drop such a cue). Each lasts at least 1 ms; where
    that leaves no room before the next cue, the last of them run past its start."""
    def cues_of(count: int, next_in_ms: int) -> list[Cue]:
        words = [f"w{i:02d}" for i in range(count)]
        at_once = TranscriptSegment(speaker="spk_0", start_ts=5.0, end_ts=5.0, text=" ".join(words),
                                    words=[Word(word=w, start=5.0, end=5.0) for w in words])
        after = 5.0 + next_in_ms / 1000
        then = TranscriptSegment(speaker="spk_0", start_ts=after, end_ts=6.0, text="Next.",
                                 words=[Word(word="Next.", start=after, end=6.0)])
        vtt = parse_vtt(to_vtt([at_once, then], line_width=3, line_count=1))
        srt = parse_srt(to_srt([at_once, then], line_width=3, line_count=1))
        assert [(c.start, c.end) for c in vtt] == [(c.start, c.end) for c in srt]
        assert [c.start for c in vtt] == sorted(c.start for c in vtt)  # in the order they start
        assert [c.text for c in vtt if c.text != "Next."] == words
        return vtt

    for count, next_in_ms in ((30, 15), (10, 15), (12, 20)):
        cues = cues_of(count, next_in_ms)
        shared, [following] = [c for c in cues if c.text != "Next."], [c for c in cues if c.text == "Next."]
        assert following.start == 5.0 + next_in_ms / 1000
        assert all(round((c.end - c.start) * 1000) >= 1 for c in shared), (count, shared)
        assert all(a.end <= b.start for a, b in itertools.pairwise(shared)), (count, shared)
        assert shared[0].start == 5.0
        if count <= next_in_ms:  # room for 1 ms each: none runs into the next
            assert shared[-1].end <= following.start, (count, shared)
        else:  # 1 ms each, one after another
            assert [round(c.start * 1000) for c in shared] == list(range(5000, 5000 + count))


def test_thai_words_written_without_spaces_are_cut_into_cues_that_fit():
    words = ["สวัสดี", "ครับ", "วันนี้", "เรา", "จะ", "คุย", "เรื่อง", "โครงการ", "ใหม่", "ของ", "บริษัท", "และ",
             "แผนงาน", "ใน", "ปี", "หน้า", "ที่", "ทุก", "คน", "ต้อง", "รู้"]
    cues = parse_srt(to_srt([timed("".join(words), words, step=0.9)]))
    assert "".join(c.text.replace("spk_0: ", "") for c in cues).replace(" ", "") == "".join(words)
    assert len(cues) > 1 and all(len(c.lines) <= 2 and c.end - c.start <= 7.0 for c in cues), cues
    assert all(columns(line) <= 42 for c in cues for line in c.lines), cues


def test_marks_that_sit_on_a_letter_take_no_column_and_a_blank_segment_makes_no_cue():
    assert [columns(text) for text in ("नमस्ते", "e\u0301", "会议", "ok")] == [4, 1, 4, 2]
    blank = TranscriptSegment(speaker="spk_0", start_ts=1.0, end_ts=2.0, text="   ")
    assert (to_srt([blank]), to_vtt([blank])) == ("", "WEBVTT\n")


def test_rttm_keeps_file_names_in_any_script_and_leaves_out_turns_too_short_to_write():
    assert rttm_uri("встреча 1.wav") == "встреча_1" and rttm_uri("会议.mp3") != rttm_uri("会谈.mp3")
    turns = [SpeakerTurn(speaker="spk_0", start=1.0, end=1.0002), SpeakerTurn(speaker="spk_1", start=2.0, end=3.5)]
    assert to_rttm("x", turns) == "SPEAKER x 1 2.000 1.500 <NA> <NA> spk_1 <NA> <NA>\n"


def test_a_turn_cut_between_chunks_is_one_rttm_turn_again():
    """Talk longer than a chunk is cut with its turns (plan_chunks); the diarization is one turn."""
    turns = [turn for _, group in plan_chunks([SpeakerTurn(speaker="spk_0", start=0.0, end=700.0),
                                               SpeakerTurn(speaker="spk_1", start=650.0, end=705.0)], 710.0, 300)
             for turn in group]
    assert len(turns) > 2
    assert to_rttm("x", turns) == ("SPEAKER x 1 0.000 700.000 <NA> <NA> spk_0 <NA> <NA>\n"
                                   "SPEAKER x 1 650.000 55.000 <NA> <NA> spk_1 <NA> <NA>\n")


def test_download_names_keep_any_language():
    assert download_name("meeting.mp3", "srt") == "meeting.srt"
    assert download_name("audio", "vtt") == "audio.vtt"
    assert download_name(".hidden", "txt") == ".hidden.txt"
    header = content_disposition('встреча "1".srt')
    assert header.startswith('attachment; filename="_______ _1_.srt"; filename*=UTF-8\'\'')
    assert unquote(header.split("''", 1)[1]) == 'встреча "1".srt'
    header.encode("ascii")  # a valid HTTP header value


def test_percent_reaches_100_only_when_done_and_stages_are_pipeline_steps():
    assert [percent_done("processing", p) for p in (0.0, 0.333, 0.996, 1.0)] == [0, 33, 99, 99]
    assert percent_done("done", 0.5) == 100 and percent_done("error", 0.5) == 50
    assert [public_stage(s) for s in ("embedding", "diarizer", "transcriber", "dead-letter")] == [
        "embedding", "diarizing", "transcribing", "submitted"]


# ---- helpers ----------------------------------------------------------------------------------


@dataclass
class Cue:
    start: float
    end: float
    speaker: str
    text: str  # the lines joined, without the speaker
    lines: list[str]  # as shown: SRT's first line starts with the speaker


def seconds_of(stamp: str) -> float:
    hours, minutes, rest = stamp.replace(",", ".").split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(rest)


def _joined(lines: list[str]) -> str:
    """Lines of Chinese or Japanese were cut where no space was, so they join without one."""
    return ("" if all(columns(line) > len(line) for line in lines) else " ").join(lines)


def parse_srt(body: str) -> list[Cue]:
    cues = []
    for number, block in enumerate(body.strip("\n").split("\n\n"), start=1):
        index, timing, *lines = block.split("\n")
        assert index == str(number) and lines, block
        match = re.fullmatch(r"(\d{2,}:\d{2}:\d{2},\d{3}) --> (\d{2,}:\d{2}:\d{2},\d{3})", timing)
        assert match, timing
        speaker, _, first = lines[0].partition(": ")
        cues.append(Cue(seconds_of(match[1]), seconds_of(match[2]), speaker, _joined([first, *lines[1:]]), lines))
    return cues


def parse_vtt(body: str) -> list[Cue]:
    header, *blocks = body.strip("\n").split("\n\n")
    assert header == "WEBVTT"
    cues = []
    for block in blocks:
        timing, text, *more = block.split("\n")
        match = re.fullmatch(r"(\d{2,}:\d{2}:\d{2}\.\d{3}) --> (\d{2,}:\d{2}:\d{2}\.\d{3})", timing)
        voice = re.fullmatch(r"<v ([^>]+)>(.*)", text)
        assert match and voice, block
        lines = [line.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&") for line in [voice[2], *more]]
        cues.append(Cue(seconds_of(match[1]), seconds_of(match[2]), voice[1], _joined(lines), lines))
    return cues


def assert_cues_match(cues: list[Cue], segments: list[dict]) -> None:
    """Each segment's text comes back, in order, as one or more cues that fit on screen
    (at most two lines of 42 columns, at most 7 s) and lie within the segment's time (ending
    sooner only where the same speaker's next cue begins: one speaker's cues never overlap, also
    where two chunks' segments of theirs do)."""
    assert cues and segments
    next_start = {}
    for i, cue in enumerate(cues):
        later = [c.start for c in cues[i + 1:] if c.speaker == cue.speaker]
        next_start[id(cue)] = later[0] if later else None
    remaining = list(cues)
    for segment in segments:
        text = " ".join(segment["text"].split())
        mine: list[Cue] = []
        while " ".join(c.text for c in mine) != text:
            assert remaining and len(" ".join(c.text for c in mine)) < len(text), (segment, mine)
            mine.append(remaining.pop(0))
        assert {c.speaker for c in mine} == {segment["speaker"]} and re.fullmatch(r"spk_\d+", segment["speaker"])
        following = next_start[id(mine[-1])]
        end = segment["end_ts"] if following is None else min(segment["end_ts"], following)
        assert abs(mine[0].start - segment["start_ts"]) < 0.0015 and abs(mine[-1].end - end) < 0.0015
        for cue in mine:
            assert cue.start <= cue.end <= cue.start + 7.0 and len(cue.lines) <= 2
            assert all(columns(line) <= 42 for line in cue.lines), cue
    assert not remaining
    starts = [c.start for c in cues]
    assert starts == sorted(starts)


def transcript(stack: Stack, job_id: int, **params) -> httpx.Response:
    return httpx.get(f"{stack.api}/transcripts/{job_id}", params=params, timeout=30)


def over_the_length_limit(path: Path) -> Path:
    """Silence longer than the test stacks' MAX_AUDIO_HOURS (0.1 h), its header not saying how long
    (refused at submission otherwise): a job that fails."""
    path.write_bytes(without_its_length(encode(np.zeros(7 * 60 * 8000, dtype=np.float32), "flac", "flac", 8000,
                                               channels=1, sample_rate=8000)))
    return path


@contextlib.contextmanager
def held(database_url: str, statement: str, *args, at_most_s: float = 10.0) -> Iterator[None]:
    """`statement` run in a transaction of another connection, kept open (its locks held) until
    the block ends, or `at_most_s` at most."""
    import asyncpg

    holding, release = threading.Event(), threading.Event()

    async def hold() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            async with conn.transaction():
                await conn.execute(statement, *args)
                holding.set()
                await asyncio.to_thread(release.wait, at_most_s)
        finally:
            await conn.close()

    thread = threading.Thread(target=asyncio.run, args=(hold(),), daemon=True)
    thread.start()
    try:
        assert holding.wait(30), "the statement to hold never ran"
        yield
    finally:
        release.set()
        thread.join(30)


def objects_of(stack: Stack, job_id: int) -> set[str]:
    names = {o.object_name for o in stack.s3().list_objects("audio", recursive=True)}
    return names & {f"uploads/{job_id}", f"pcm/{job_id}.s16le"}


@pytest.fixture(scope="module")
def dialogue(stack: Stack, fixtures_dir) -> dict:
    """en_dialogue.wav (two speakers, 15 s) submitted under a unique name and finished."""
    name = f"Dialogue {uuid.uuid4().hex[:6]}.wav"
    response = stack.submit(fixtures_dir / "en_dialogue.wav", name=name)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    return {"id": job_id, "filename": name, **stack.wait_finished(job_id)}


# ---- status and the JSON document ------------------------------------------------------------


def test_status_says_stage_and_percent(dialogue, stack, tmp_path):
    assert dialogue["status"] == "done" and dialogue["stage"] == "done" and dialogue["percent"] == 100
    assert len({s["speaker"] for s in dialogue["segments"]}) == 2
    light = httpx.get(f"{stack.api}/status/{dialogue['id']}", params={"segments": "false"}, timeout=30).json()
    assert light == {k: v for k, v in dialogue.items() if k in ("status", "stage", "percent", "no_speech")}
    too_long = stack.submit(over_the_length_limit(tmp_path / "long.flac")).json()["id"]
    failed = stack.wait_finished(too_long)
    assert failed["status"] == "error" and "longer than" in failed["error"]
    assert failed["stage"] == "diarizing"  # the step it failed in, not the service's name
    assert 0 <= failed["percent"] < 100


def test_json_transcript_has_the_job_facts_and_segments(dialogue, stack):
    response = transcript(stack, dialogue["id"])
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/json")
    document = response.json()
    assert {k: document[k] for k in ("id", "filename", "status", "stage", "percent", "language")} == {
        "id": dialogue["id"], "filename": dialogue["filename"], "status": "done", "stage": "done",
        "percent": 100, "language": "en"}
    assert 14 < document["duration"] < 17
    created, completed = (datetime.fromisoformat(document[k]) for k in ("created_at", "completed_at"))
    assert created.tzinfo is not None and created <= completed < created + timedelta(minutes=5)
    assert "error" not in document
    assert document["segments"] == dialogue["segments"]  # as /status has them
    where = [(s["chunk_index"], s["index"], s["edited"]) for s in document["segments"]]
    assert where[:2] == [(0, 0, False), (0, 1, False)]
    assert all("words" not in s for s in document["segments"])
    assert "sales" in " ".join(s["text"] for s in document["segments"]).lower()


def test_words_come_with_their_times(dialogue, stack):
    segments = transcript(stack, dialogue["id"], words="true").json()["segments"]
    assert segments
    for segment in segments:
        words = segment["words"]
        assert words, segment
        assert "".join(w["word"] for w in words) == "".join(segment["text"].split())
        starts = [w["start"] for w in words]
        assert starts == sorted(starts)
        assert segment["start_ts"] - 0.001 <= words[0]["start"] and words[-1]["end"] <= segment["end_ts"] + 0.001
        assert all(w["start"] <= w["end"] and 0 <= w["probability"] <= 1 for w in words)
    stored = stack.value("SELECT count(*) FROM segments WHERE transcript_id = $1 AND words <> '[]'::jsonb",
                         dialogue["id"])
    assert stored == len(segments)


# ---- subtitles and text ----------------------------------------------------------------------


def test_srt(dialogue, stack):
    response = transcript(stack, dialogue["id"], format="srt")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-subrip; charset=utf-8"
    stem = dialogue["filename"].removesuffix(".wav")
    assert f'filename="{stem}.srt"' in response.headers["content-disposition"]
    assert_cues_match(parse_srt(response.text), dialogue["segments"])


def test_vtt(dialogue, stack):
    response = transcript(stack, dialogue["id"], format="vtt")
    assert response.status_code == 200, response.text
    # One charset: a repeated parameter is refused by strict parsers (Go's mime package).
    assert response.headers["content-type"] == "text/vtt; charset=utf-8"
    assert response.headers["content-disposition"].endswith(".vtt")
    assert response.text.startswith("WEBVTT\n\n")
    assert_cues_match(parse_vtt(response.text), dialogue["segments"])


def test_txt(dialogue, stack):
    response = transcript(stack, dialogue["id"], format="txt")
    assert response.status_code == 200 and response.headers["content-type"] == "text/plain; charset=utf-8"
    lines = response.text.splitlines()
    assert len(lines) == len(dialogue["segments"])
    for line, segment in zip(lines, dialogue["segments"]):
        match = re.fullmatch(r"\[(\d{2}):(\d{2}):(\d{2})\] (spk_\d+): (.+)", line)
        assert match, line
        assert int(match[1]) * 3600 + int(match[2]) * 60 + int(match[3]) == int(segment["start_ts"])
        assert (match[4], match[5]) == (segment["speaker"], segment["text"])


@pytest.fixture(scope="module")
def meeting(stack: Stack, fixtures_dir) -> dict:
    """ami_trn07.wav: four people in a far-field meeting room, talking over each other."""
    job_id = stack.submit(fixtures_dir / "ami_trn07.wav").json()["id"]
    return {"id": job_id, **stack.wait_finished(job_id)}


def test_rttm_is_the_whole_diarization_with_its_overlaps(meeting, stack, fixtures_dir, tmp_path):
    import warnings

    from pyannote.database.util import load_rttm
    from pyannote.metrics.diarization import DiarizationErrorRate

    from common.audio import decode_audio
    from services.diarizer.offline import diarize_offline

    assert meeting["status"] == "done", meeting
    response = transcript(stack, meeting["id"], format="rttm")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    assert 'filename="ami_trn07.rttm"' in response.headers["content-disposition"]
    (tmp_path / "hyp.rttm").write_text(response.text)
    [(uri, hypothesis)] = load_rttm(tmp_path / "hyp.rttm").items()
    assert uri == "ami_trn07"
    tracks = list(hypothesis.itertracks(yield_label=True))
    overlapping = [(a, b) for (a, _, x), (b, _, y) in itertools.combinations(tracks, 2) if x != y and a & b]
    assert overlapping, response.text
    # All of the diarizer's turns, not only those that got words.
    expected = diarize_offline(decode_audio(str(fixtures_dir / "ami_trn07.wav"))).turns
    assert [(round(s.start, 3), round(s.end, 3), label) for s, _, label in tracks] == \
        [(t.start, t.end, t.speaker) for t in expected]
    reference = load_rttm(fixtures_dir / "ami_trn07.rttm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        der = DiarizationErrorRate(collar=0.5)(next(iter(reference.values())), hypothesis)
    assert der < 0.9  # scored against the reference: the right file, times and labels
    segments = transcript(stack, meeting["id"]).json()["segments"]
    assert any(s["overlap"] for s in segments) and not all(s["overlap"] for s in segments)


def test_speaking_time_counts_a_speakers_touching_or_overlapping_turns_once():
    turns = [SpeakerTurn(speaker="spk_0", start=0, end=2), SpeakerTurn(speaker="spk_0", start=1, end=3),
             SpeakerTurn(speaker="spk_1", start=2.5, end=4), SpeakerTurn(speaker="spk_0", start=5, end=5.5)]
    assert speaking_time(turns) == {"spk_0": 3.5, "spk_1": 1.5}


def test_words_are_counted_a_character_at_a_time_in_chinese_as_the_transcriber_parts_them(stack):
    """Text written without spaces counted as one word a segment: a speaker of a Chinese meeting
    who said hundreds of words showed a dozen."""
    chinese = [{"word": c, "start": i * 0.2, "end": i * 0.2 + 0.2} for i, c in enumerate("我们的客户很满意。")]
    english = [{"word": f" {w}", "start": i * 0.3, "end": i * 0.3 + 0.3}
               for i, w in enumerate("Sales grew a lot.".split())]
    job_id = stack.value("INSERT INTO transcripts (filename, status) VALUES ('words.wav', 'done') RETURNING id")
    try:
        stack.query("INSERT INTO segments (transcript_id, chunk_index, index, speaker, start_ts, end_ts, text, words)"
                    " VALUES ($1, 0, 0, 'spk_0', 0, 2, $2, $3::jsonb), ($1, 0, 1, 'spk_1', 2, 3, $4, $5::jsonb),"
                    " ($1, 0, 2, 'spk_1', 3, 4, 'no word times here', '[]')",
                    job_id, "我们的客户很满意。", json.dumps(chinese), "Sales grew a lot.", json.dumps(english))
        speakers = httpx.get(f"{stack.api}/transcripts/{job_id}/speakers", timeout=30).json()["speakers"]
        assert {label: s["words"] for label, s in speakers.items()} == {"spk_0": 9, "spk_1": 8}
    finally:
        stack.query("DELETE FROM transcripts WHERE id = $1", job_id)


def test_a_jobs_speakers_with_their_names_and_speaking_time(dialogue, stack):
    """Who talks how long and says how many words: for each speaker label, what the job's own
    turns (its RTTM) and its transcript's words say of that label; a name given by hand shows
    with its source."""
    url = f"{stack.api}/transcripts/{dialogue['id']}/speakers"
    speakers = httpx.get(url, timeout=30).json()["speakers"]
    assert sorted(speakers) == ["spk_0", "spk_1"]
    # Speaking time: the union of the label's turns (turns of one speaker may overlap), each
    # written in the RTTM to the millisecond.
    rttm = httpx.get(f"{stack.api}/transcripts/{dialogue['id']}", params={"format": "rttm"}, timeout=30).text
    turns: dict[str, list[tuple[float, float]]] = {}
    for line in rttm.splitlines():
        fields = line.split()
        turns.setdefault(fields[7], []).append((float(fields[3]), float(fields[3]) + float(fields[4])))
    assert sorted(turns) == sorted(speakers), rttm
    for label, own in turns.items():
        talked, reached = 0.0, float("-inf")
        for start, end in sorted(own):
            talked += max(0.0, end - max(start, reached))
            reached = max(reached, end)
        assert talked > 0 and abs(speakers[label]["speech_s"] - talked) <= 0.001 * (len(own) + 1), (
            label, speakers[label], talked)
    found = [s["speech_s"] for s in speakers.values()]
    assert abs(sum(s["share"] for s in speakers.values()) - 1) < 0.01
    assert all(abs(s["share"] - s["speech_s"] / sum(found)) < 0.001 for s in speakers.values())
    # Words: those the label's segments hold (timed words, else the text's), as the transcript gives them.
    document = httpx.get(f"{stack.api}/transcripts/{dialogue['id']}", params={"words": "true"}, timeout=30).json()
    said: dict[str, int] = {}
    for segment in document["segments"]:
        if segment["text"].strip():
            timed = [w for w in segment["words"] if w["word"].strip()]
            said[segment["speaker"]] = said.get(segment["speaker"], 0) + (
                len(timed) if segment["words"] else len(segment["text"].split()))
    assert all(said.values()) and {label: s["words"] for label, s in speakers.items()} == said, (speakers, said)

    assert httpx.patch(url, json={"spk_1": "Boris"}, timeout=30).status_code == 200
    try:
        named = httpx.get(url, timeout=30).json()["speakers"]
        assert (named["spk_1"]["name"], named["spk_1"]["source"]) == ("Boris", "manual")
        assert "name" not in named["spk_0"] and named["spk_1"]["speech_s"] == speakers["spk_1"]["speech_s"]
    finally:
        httpx.patch(url, json={"spk_1": None}, timeout=30)
    assert httpx.get(f"{stack.api}/transcripts/987654321/speakers", timeout=30).status_code == 404


def test_a_segment_corrected_by_hand_reads_so_everywhere(stack, fixtures_dir):
    job_id = stack.submit_job(fixtures_dir / "en_dialogue.wav")
    running = httpx.patch(f"{stack.api}/transcripts/{job_id}/segments/0/0", json={"text": "x"}, timeout=30)
    assert running.status_code == 409, running.text  # its chunks may still be written
    assert stack.wait_finished(job_id)["status"] == "done"
    segments = httpx.get(f"{stack.api}/transcripts/{job_id}?words=true", timeout=30).json()["segments"]
    target = next(s for s in segments if len(s["text"].split()) >= 4)
    where = f"{stack.api}/transcripts/{job_id}/segments/{target['chunk_index']}/{target['index']}"
    words = target["text"].split()
    term = "Kwazulu" + uuid.uuid4().hex[:6].translate(str.maketrans("0123456789", "ghijklmnop"))  # in no other
    corrected = " ".join([words[0], term, *words[2:]])

    async def correct_and_hear_it() -> tuple[httpx.Response, list[dict]]:
        connection = await aio_pika.connect_robust(stack.amqp_url)
        async with connection:
            queue = await events_queue(await connection.channel(), "segment.updated")
            answer = httpx.patch(where, json={"text": corrected}, timeout=30)
            return answer, await job_events(queue, job_id, lambda bodies: bodies, timeout=30)

    answer, [event] = asyncio.run(correct_and_hear_it())
    assert answer.status_code == 200, answer.text
    assert answer.json()["text"] == event["text"] == corrected and answer.json()["edited"] is True
    assert (event["chunk_index"], event["index"], event["speaker"]) == (target["chunk_index"], target["index"],
                                                                        target["speaker"])
    after = httpx.get(f"{stack.api}/transcripts/{job_id}?words=true", timeout=30).json()["segments"]
    changed = [s for s in after if s["edited"]]
    assert [s["text"] for s in changed] == [corrected] and len(after) == len(segments)
    # One word replaced: every word keeps its time, and the new one has no probability.
    assert [(w["start"], w["end"]) for w in changed[0]["words"]] == [(w["start"], w["end"]) for w in target["words"]]
    assert changed[0]["words"][1]["word"] == term and changed[0]["words"][1].get("probability") is None
    assert term in httpx.get(f"{stack.api}/transcripts/{job_id}?format=srt", timeout=30).text
    hits = httpx.get(f"{stack.api}/search", params={"q": term, "mode": "text"}, timeout=30).json()["items"]
    assert [(h["transcript_id"], h["text"]) for h in hits] == [(job_id, corrected)]

    # Who said it: another label of the job, or a new one that can then be named.
    moved = httpx.patch(where, json={"speaker": "spk_7"}, timeout=30)
    assert moved.status_code == 200 and (moved.json()["speaker"], moved.json()["text"]) == ("spk_7", corrected)
    named = httpx.patch(f"{stack.api}/transcripts/{job_id}/speakers", json={"spk_7": "Guest"}, timeout=30)
    assert named.status_code == 200, named.text
    txt = httpx.get(f"{stack.api}/transcripts/{job_id}?format=txt", timeout=30).text
    assert f"Guest: {corrected}" in txt
    assert stack.status(job_id)["segments"][after.index(changed[0])]["speaker_name"] == "Guest"
    # /status shows every segment as the transcript does, corrections and names included.
    assert stack.status(job_id)["segments"] == httpx.get(f"{stack.api}/transcripts/{job_id}", timeout=30).json()[
        "segments"]

    # Each refusal says what is wrong in plain words (not "invalid Value error, give the right...").
    for body, says in (({}, 'give the right "text", "speaker" or both'),
                       ({"speaker": "Anna"}, "invalid field speaker: String should match pattern"),
                       ({"text": "  "}, "text must have words"), ({"text": "a\x00b"}, "text cannot hold a NUL")):
        refused = httpx.patch(where, json=body, timeout=30)
        assert refused.status_code == 400 and refused.json()["detail"].startswith(says), refused.text
    assert httpx.patch(f"{stack.api}/transcripts/{job_id}/segments/99/0", json={"text": "x"},
                       timeout=30).status_code == 404



def test_naming_speakers_answers_them_in_the_order_the_speaker_list_has(stack):
    """spk_2 before spk_10 in PATCH's answer, as GET /transcripts/{id}/speakers and every format
    list them (sorted as text, spk_10 came before spk_2 there only)."""
    job_id = stack.value("INSERT INTO transcripts (filename, status, stage, progress, language, completed_at)"
                         " VALUES ('eleven.wav', 'done', 'done', 1, 'en', now()) RETURNING id")
    try:
        stack.query("INSERT INTO segments (transcript_id, chunk_index, index, speaker, start_ts, end_ts, text)"
                    " VALUES ($1, 0, 0, 'spk_10', 0, 1, 'One.'), ($1, 0, 1, 'spk_2', 1, 2, 'Two.'),"
                    " ($1, 0, 2, 'spk_0', 2, 3, 'Three.')", job_id)
        named = httpx.patch(f"{stack.api}/transcripts/{job_id}/speakers", json={"spk_2": "Anna"}, timeout=30)
        assert named.status_code == 200, named.text
        listed = httpx.get(f"{stack.api}/transcripts/{job_id}/speakers", timeout=30).json()["speakers"]
        assert list(named.json()["speakers"]) == list(listed) == ["spk_0", "spk_2", "spk_10"]
        assert named.json()["speakers"]["spk_2"] == "Anna"
    finally:
        stack.query("DELETE FROM transcripts WHERE id = $1", job_id)


def test_a_correction_that_changes_nothing_is_no_correction(stack):
    """A PATCH giving a segment the words and speaker it has: answered with the segment as it is,
    not marked edited, and no segment.updated (its webhooks would tell of a change)."""
    job_id = stack.value("INSERT INTO transcripts (filename, status, stage, progress, language, completed_at)"
                         " VALUES ('same.wav', 'done', 'done', 1, 'en', now()) RETURNING id")
    try:
        stack.query("INSERT INTO segments (transcript_id, chunk_index, index, speaker, start_ts, end_ts, text)"
                    " VALUES ($1, 0, 0, 'spk_0', 0, 1.5, 'As it was said.'), ($1, 0, 1, 'spk_1', 2, 3.5, 'Yes.')",
                    job_id)

        async def correct_and_hear() -> tuple[list[httpx.Response], list[dict]]:
            connection = await aio_pika.connect_robust(stack.amqp_url)
            async with connection:
                queue = await events_queue(await connection.channel(), "segment.updated")
                # The same words (spaced otherwise) and speaker, then a real change of another
                # segment: its event is the first to come.
                answers = [httpx.patch(f"{stack.api}/transcripts/{job_id}/segments/0/{index}", json=body, timeout=30)
                           for index, body in ((0, {"text": " As it  was said. ", "speaker": "spk_0"}),
                                               (0, {"speaker": "spk_0"}), (1, {"speaker": "spk_0"}))]
                return answers, await job_events(queue, job_id, lambda bodies: bodies, timeout=30)

        answers, events = asyncio.run(correct_and_hear())
        assert [answer.status_code for answer in answers] == [200, 200, 200], [answer.text for answer in answers]
        for same in (answers[0].json(), answers[1].json()):
            assert (same["index"], same["speaker"], same["text"], same["edited"]) == (0, "spk_0", "As it was said.",
                                                                                      False), same
        assert answers[2].json()["edited"] is True
        assert [(event["index"], event["speaker"]) for event in events] == [(1, "spk_0")], events
        assert stack.value("SELECT edited_at FROM segments WHERE transcript_id = $1 AND index = 0", job_id) is None
    finally:
        stack.query("DELETE FROM transcripts WHERE id = $1", job_id)

def test_a_correction_waits_only_briefly_on_a_job_another_request_holds(stack):
    """While another transaction holds the job, or the segment (a reindex storing its vectors), a
    correction says so soon rather than holding a pooled connection as long as it lasts."""
    job_id = stack.value("INSERT INTO transcripts (filename, status, stage, progress, language, completed_at)"
                         " VALUES ('held.wav', 'done', 'done', 1, 'en', now()) RETURNING id")
    where = f"{stack.api}/transcripts/{job_id}/segments/0/0"
    try:
        stack.query("INSERT INTO segments (transcript_id, chunk_index, index, speaker, start_ts, end_ts, text)"
                    " VALUES ($1, 0, 0, 'spk_0', 0, 1.5, 'Held for a while.')", job_id)
        for holding in ("SELECT id FROM transcripts WHERE id = $1 FOR UPDATE",
                        "UPDATE segments SET embedding_model = embedding_model WHERE transcript_id = $1"):
            started = time.monotonic()
            with held(stack.database_url, holding, job_id, at_most_s=30):
                busy = httpx.patch(where, json={"speaker": "spk_1"}, timeout=60)
            assert busy.status_code == 503 and "nothing was corrected" in busy.json()["detail"], (holding, busy.text)
            assert busy.headers["retry-after"] and time.monotonic() - started < 20
            assert stack.value("SELECT speaker FROM segments WHERE transcript_id = $1", job_id) == "spk_0"
        moved = httpx.patch(where, json={"speaker": "spk_1"}, timeout=30)
        assert moved.status_code == 200 and moved.json()["speaker"] == "spk_1", moved.text
    finally:
        stack.query("DELETE FROM transcripts WHERE id = $1", job_id)


def test_long_corrections_and_their_widest_subtitles_leave_the_service_answering(stack):
    """A segment corrected to 10,000 characters, then to 10,000 others of the same two kinds, and
    its widest subtitles: matching the words took 33 s and cutting the cues 6 s, on the event loop,
    so that nothing else was answered meanwhile, liveness checks included (a pod restarted)."""
    import random

    job_id = stack.value("INSERT INTO transcripts (filename, status, stage, progress, language, completed_at)"
                         " VALUES ('long.wav', 'done', 'done', 1, 'zh', now()) RETURNING id")
    where = f"{stack.api}/transcripts/{job_id}/segments/0/0"
    slowest, stop = [0.0], threading.Event()

    def check_liveness() -> None:
        while not stop.wait(0.2):
            started = time.monotonic()
            assert httpx.get(f"{stack.api}/healthz", timeout=120).status_code == 200
            slowest[0] = max(slowest[0], time.monotonic() - started)

    checker = threading.Thread(target=check_liveness, daemon=True)
    try:
        said = [{"word": c, "start": i * 0.5, "end": i * 0.5 + 0.5} for i, c in enumerate("你好。")]
        stack.query("INSERT INTO segments (transcript_id, chunk_index, index, speaker, start_ts, end_ts, text, words)"
                    " VALUES ($1, 0, 0, 'spk_0', 0, 30, '你好。', $2::jsonb)", job_id, json.dumps(said))
        checker.start()
        rng = random.Random(7)
        for _ in range(2):
            text = "".join(rng.choice("的是") for _ in range(10_000))
            corrected = httpx.patch(where, json={"text": text}, timeout=120)
            assert corrected.status_code == 200 and corrected.json()["text"] == text, corrected.text[:200]
        stored = httpx.get(f"{stack.api}/transcripts/{job_id}?words=true", timeout=30).json()["segments"][0]
        assert [w["word"] for w in stored["words"]] == list(text)
        for format in ("srt", "vtt"):
            subtitles = transcript(stack, job_id, format=format, max_line_width=200, max_line_count=10)
            assert subtitles.status_code == 200 and subtitles.text.count(" --> ") > 1, subtitles.text[:200]
        stop.set()
        checker.join(120)
        assert slowest[0] < 3, f"/healthz took {slowest[0]:.1f} s"
    finally:
        stop.set()
        stack.query("DELETE FROM transcripts WHERE id = $1", job_id)


def test_unknown_format_or_job(dialogue, stack):
    response = transcript(stack, dialogue["id"], format="docx")
    assert response.status_code == 400
    assert response.json()["detail"] == "invalid query parameter format: Invalid enum value 'docx'"
    response = httpx.get(f"{stack.api}/transcripts/0", timeout=30)
    assert response.status_code == 400 and "path parameter job_id" in response.json()["detail"]
    for limits in ({"max_line_width": 5}, {"max_line_count": 0}, {"max_line_width": "wide"}):
        response = transcript(stack, dialogue["id"], format="srt", **limits)
        assert response.status_code == 400 and next(iter(limits)) in response.json()["detail"], response.text
    for fmt in ("json", "srt"):
        assert transcript(stack, 987654321, format=fmt).status_code == 404
    assert httpx.delete(f"{stack.api}/transcripts/987654321").status_code == 404


def test_a_running_job_has_no_subtitles_and_cannot_be_deleted(stack, fixtures_dir):
    job_id = stack.submit(fixtures_dir / "jfk.flac").json()["id"]
    response = transcript(stack, job_id, format="srt")
    assert response.status_code == 409 and "still processing" in response.json()["detail"]
    assert transcript(stack, job_id).json()["status"] == "processing"  # json shows what exists so far
    response = httpx.delete(f"{stack.api}/transcripts/{job_id}")
    assert response.status_code == 409 and "delete it after it ends" in response.json()["detail"]
    assert stack.wait_finished(job_id)["status"] == "done"
    assert httpx.delete(f"{stack.api}/transcripts/{job_id}").status_code == 204


# ---- the list ---------------------------------------------------------------------------------


def list_jobs(stack: Stack, **params) -> dict:
    response = httpx.get(f"{stack.api}/transcripts", params=params, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_list_pages_newest_first_with_filters(stack, fixtures_dir, tmp_path):
    tag = uuid.uuid4().hex[:6]
    ids = [stack.submit(fixtures_dir / "jfk.flac", name=f"Call_{tag} {n}.flac").json()["id"] for n in range(3)]
    silent = stack.submit(over_the_length_limit(tmp_path / "long.flac"), name=f"silence_{tag}.flac").json()["id"]
    mine = list_jobs(stack, filename=tag.upper())["items"]  # substring, any case
    assert [item["id"] for item in mine] == sorted([*ids, silent], reverse=True)
    assert set(mine[0]) >= {"id", "filename", "status", "stage", "percent", "created_at"}

    first = list_jobs(stack, filename=f"call_{tag}", limit=2)
    assert [i["id"] for i in first["items"]] == ids[:0:-1]
    second = list_jobs(stack, filename=f"call_{tag}", limit=2, cursor=first["next_cursor"])
    assert [i["id"] for i in second["items"]] == ids[:1] and "next_cursor" not in second

    assert list_jobs(stack, filename="%")["items"] == []  # % and _ are literal characters
    for job_id in [*ids, silent]:
        stack.wait_finished(job_id)
    assert [i["id"] for i in list_jobs(stack, filename=tag, status="error")["items"]] == [silent]
    assert [i["id"] for i in list_jobs(stack, filename=tag, status="done")["items"]] == ids[::-1]
    done = list_jobs(stack, filename=tag, status="done")["items"]
    assert all(i["percent"] == 100 and i["language"] == "en" and 10 < i["duration"] < 12 for i in done)

    middle = next(i for i in mine if i["id"] == ids[1])["created_at"]
    assert [i["id"] for i in list_jobs(stack, filename=tag, since=middle)["items"]] == [silent, ids[2], ids[1]]
    assert [i["id"] for i in list_jobs(stack, filename=tag, until=middle)["items"]] == [ids[0]]
    naive_future = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0, tzinfo=None).isoformat()
    assert list_jobs(stack, filename=tag, since=naive_future)["items"] == []
    # A plain date is that day's midnight (UTC).
    day_after = (datetime.fromisoformat(max(i["created_at"] for i in mine)) + timedelta(days=1)).date().isoformat()
    assert [i["id"] for i in list_jobs(stack, filename=tag, until=day_after)["items"]] == [silent, *ids[::-1]]
    assert list_jobs(stack, filename=tag, since=day_after)["items"] == []

    for params in ({"limit": 0}, {"limit": 501}, {"status": "finished"}, {"since": "yesterday"}):
        response = httpx.get(f"{stack.api}/transcripts", params=params, timeout=30)
        assert response.status_code == 400, (params, response.text)


def test_a_reference_given_at_submission_comes_back_with_the_job_and_its_end(stack, fixtures_dir, tmp_path):
    """A submitter's own name for a job (a call id) is how its systems match the job's end to
    their records, whether it ends done or failed, and how they find the job later."""
    ours, theirs = f"CALL-{uuid.uuid4().hex[:8]}", f"CALL-{uuid.uuid4().hex[:8]}"

    async def submit_and_hear_the_ends() -> tuple[int, int, list[dict], list[dict]]:
        connection = await aio_pika.connect_robust(stack.amqp_url)
        async with connection:
            channel = await connection.channel()
            completions = await events_queue(channel, "transcript.completed")
            failures = await events_queue(channel, "transcript.failed")
            done = stack.submit_job(fixtures_dir / "jfk.flac", data={"reference": f"  {ours} "})
            failed = stack.submit_job(over_the_length_limit(tmp_path / "long.flac"), data={"reference": theirs})
            return (done, failed, await job_events(completions, done, lambda bodies: bodies, timeout=300),
                    await job_events(failures, failed, lambda bodies: bodies, timeout=300))

    done, failed, [completed], [failure] = asyncio.run(submit_and_hear_the_ends())
    assert (completed["reference"], failure["reference"]) == (ours, theirs)
    document = transcript(stack, done).json()
    assert document["reference"] == document["options"]["reference"] == ours
    assert [i["id"] for i in list_jobs(stack, reference=ours)["items"]] == [done]
    assert [(i["id"], i["reference"]) for i in list_jobs(stack, reference=theirs)["items"]] == [(failed, theirs)]
    assert list_jobs(stack, reference=ours.lower())["items"] == []  # exactly as given
    # A rerun is the same recording for the submitter's systems: it keeps the reference.
    rerun = httpx.post(f"{stack.api}/transcripts/{done}/rerun", json={"language": "en"}, timeout=30).json()["id"]
    assert [i["id"] for i in list_jobs(stack, reference=ours)["items"]] == [rerun, done]
    assert transcript(stack, rerun).json()["reference"] == ours


def test_the_reference_filter_reads_the_reference_as_submission_does(stack):
    """Submission keeps a reference without the spaces around it, and takes a blank one for none:
    so does the list's filter."""
    tag, reference = uuid.uuid4().hex[:8], f"CALL-{uuid.uuid4().hex[:8]}"
    given, other = (stack.value("INSERT INTO transcripts (filename, status, stage, progress, options, completed_at)"
                                " VALUES ($1, 'done', 'done', 1, $2::jsonb, now()) RETURNING id",
                                f"{tag}-{n}.wav", json.dumps(options))
                    for n, options in enumerate(({"reference": reference}, {})))
    try:
        for asked in (reference, f" {reference}  "):
            assert [i["id"] for i in list_jobs(stack, reference=asked)["items"]] == [given], repr(asked)
        for blank in ("", "   "):
            assert [i["id"] for i in list_jobs(stack, filename=tag, reference=blank)["items"]] == [other, given]
        assert list_jobs(stack, reference=f"{reference} x")["items"] == []
    finally:
        stack.query("DELETE FROM transcripts WHERE id = ANY($1::bigint[])", [given, other])


# ---- delete -----------------------------------------------------------------------------------


def test_a_rerun_repeats_the_options_not_given_and_needs_the_stored_audio(dialogue, stack):
    rerun = f"{stack.api}/transcripts/{dialogue['id']}/rerun"
    response = httpx.post(rerun, timeout=30)  # no body: the same options again
    assert response.status_code == 202 and response.json()["filename"] == dialogue["filename"], response.text
    again = response.json()["id"]
    assert transcript(stack, again).json()["options"] == transcript(stack, dialogue["id"]).json()["options"]

    for changes, says in [({"task": "summarize"}, "field task: Input should be 'transcribe' or 'translate'"),
                          ({"min_speakers": 5, "max_speakers": 2}, "min_speakers must not exceed max_speakers"),
                          ({"num_speakers": 5, "max_speakers": 2}, "num_speakers must lie within"),
                          ({"vocabulary": ", ".join(f"term {i}" for i in range(30))}, "longer than 150 characters"),
                          ({"expected_speakers": [f"P{i}" for i in range(33)]}, "expected_speakers: at most 32"),
                          ({"speakers": 4}, "speakers")]:  # a misspelt option is not ignored
        refused = httpx.post(rerun, json=changes, timeout=30)
        assert refused.status_code == 400 and says in refused.json()["detail"], refused.text
        # In plain words, each field named once (not "options: Value error, min_speakers must...")
        detail = refused.json()["detail"]
        assert "Value error" not in detail and "expected_speakers: expected_speakers" not in detail, detail
    assert httpx.post(f"{stack.api}/transcripts/999999999/rerun", timeout=30).status_code == 404

    assert stack.wait_finished(again)["status"] == "done"
    # Marked removed by retention, whose removal of the object failed or is still to come: the
    # recording is past its days, so it is not copied into a new job with days of its own.
    stack.query("UPDATE transcripts SET audio_removed_at = now() WHERE id = $1", again)
    expired = httpx.post(f"{stack.api}/transcripts/{again}/rerun", json={"num_speakers": 2}, timeout=30)
    assert expired.status_code == 409 and "no longer stored" in expired.json()["detail"], expired.text
    stack.query("UPDATE transcripts SET audio_removed_at = NULL WHERE id = $1", again)
    stack.s3().remove_object("audio", f"uploads/{again}")
    gone = httpx.post(f"{stack.api}/transcripts/{again}/rerun", json={"num_speakers": 2}, timeout=30)
    assert gone.status_code == 409 and "no longer stored" in gone.json()["detail"], gone.text


def test_delete_removes_rows_and_audio(stack, fixtures_dir):
    job_id = stack.submit(fixtures_dir / "jfk.flac").json()["id"]
    assert stack.wait_finished(job_id)["status"] == "done"
    # The decoded PCM is removed once the job has ended; the upload stays until DELETE.
    deadline = time.monotonic() + 30
    while objects_of(stack, job_id) != {f"uploads/{job_id}"} and time.monotonic() < deadline:
        time.sleep(0.2)
    assert objects_of(stack, job_id) == {f"uploads/{job_id}"}
    assert stack.value("SELECT count(*) FROM segments WHERE transcript_id = $1", job_id) > 0

    # While another request holds the job (a delete waiting on a store that does not answer), a
    # second delete says so soon, rather than holding a pooled connection as long as the first. So
    # it does while a reindex stores the job's new vectors (every segment of it, in one
    # transaction), and the recording stays: the job is not left without it.
    for holding in ("SELECT id FROM transcripts WHERE id = $1 FOR UPDATE",
                    "UPDATE segments SET embedding_model = embedding_model WHERE transcript_id = $1"):
        started = time.monotonic()
        with held(stack.database_url, holding, job_id, at_most_s=30):
            busy = httpx.delete(f"{stack.api}/transcripts/{job_id}", timeout=60)
        assert busy.status_code == 503 and "another request" in busy.json()["detail"], (holding, busy.text)
        assert busy.headers["retry-after"] and time.monotonic() - started < 20
        assert objects_of(stack, job_id) == {f"uploads/{job_id}"}
        assert httpx.get(f"{stack.api}/transcripts/{job_id}/audio", timeout=30).status_code == 200

    response = httpx.delete(f"{stack.api}/transcripts/{job_id}")
    assert response.status_code == 204 and response.content == b""
    assert objects_of(stack, job_id) == set()
    for table, column in (("transcripts", "id"), ("chunks", "transcript_id"), ("segments", "transcript_id")):
        assert stack.value(f"SELECT count(*) FROM {table} WHERE {column} = $1", job_id) == 0
    assert httpx.get(f"{stack.api}/status/{job_id}").status_code == 404
    assert httpx.delete(f"{stack.api}/transcripts/{job_id}").status_code == 404


def test_a_delete_the_object_store_fails_leaves_the_job_whole(stack):
    """The rows are deleted before the objects, in the same transaction: the store failing rolls
    them back, and the delete can be sent again."""
    job_id = stack.value("INSERT INTO transcripts (filename, status, stage, completed_at)"
                         " VALUES ('kept.wav', 'done', 'done', now()) RETURNING id")
    stack.query("INSERT INTO segments (transcript_id, chunk_index, index, speaker, start_ts, end_ts, text)"
                " VALUES ($1, 0, 0, 'spk_0', 0, 1, 'Kept.')", job_id)
    stack.s3().put_object("audio", f"uploads/{job_id}", io.BytesIO(b"RIFF"), 4)
    with TestClient(create_app(stack.settings(minio_endpoint=f"127.0.0.1:{free_port()}")), timeout=120) as away:
        refused = away.delete(f"/transcripts/{job_id}")
    assert refused.status_code == 503 and "the job is still there" in refused.json()["detail"], refused.text
    assert stack.value("SELECT count(*) FROM segments WHERE transcript_id = $1", job_id) == 1
    assert objects_of(stack, job_id) == {f"uploads/{job_id}"}
    assert httpx.delete(f"{stack.api}/transcripts/{job_id}", timeout=60).status_code == 204
    assert objects_of(stack, job_id) == set()
    assert stack.value("SELECT count(*) FROM transcripts WHERE id = $1", job_id) == 0


def test_deleting_a_bucket_drop_keeps_the_users_object_and_does_not_rerun_it(stack, fixtures_dir):
    s3 = stack.s3()
    key = f"deleted/{uuid.uuid4().hex[:6]}.flac"
    s3.fput_object("inbox", key, str(fixtures_dir / "jfk.flac"))
    deadline = time.monotonic() + 120
    while (job_id := stack.value("SELECT id FROM transcripts WHERE source_key = $1", key)) is None:
        assert time.monotonic() < deadline, "the drop never became a job"
        time.sleep(0.5)
    stack.wait_finished(job_id)
    while not stack.value("SELECT result_written FROM transcripts WHERE id = $1", job_id):
        assert time.monotonic() < deadline, "no result file was written"
        time.sleep(0.5)
    results = {f"results/{key}.json", f"results/{key}.srt"}
    assert results <= {o.object_name for o in s3.list_objects("inbox", recursive=True)}

    assert httpx.delete(f"{stack.api}/transcripts/{job_id}").status_code == 204
    time.sleep(4)  # several inbox scans (INBOX_SCAN_INTERVAL_S=1)
    inbox = {o.object_name for o in s3.list_objects("inbox", recursive=True)}
    assert key in inbox and not results & inbox
    assert objects_of(stack, job_id) == set()
    assert stack.value("SELECT count(*) FROM transcripts WHERE source_key = $1", key) == 0


# ---- API keys ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_api(stack: Stack):
    app = create_app(stack.settings(api_keys=f"{ALICE},{BOB}"))
    with TestClient(app, timeout=60) as client:
        yield client


def test_another_keys_jobs_are_invisible(keyed_api, stack, fixtures_dir):
    alice, bob = {"Authorization": f"Bearer {ALICE}"}, {"X-API-Key": BOB}
    with (fixtures_dir / "jfk.flac").open("rb") as f:
        job_id = keyed_api.post("/recognize", files={"file": ("alice.flac", f)}, headers=alice).json()["id"]
    deadline = time.monotonic() + 300
    while keyed_api.get(f"/status/{job_id}", headers=alice).json()["status"] == "processing":
        assert time.monotonic() < deadline
        time.sleep(0.5)

    assert keyed_api.get("/transcripts").status_code == 401
    assert [i["id"] for i in keyed_api.get("/transcripts", headers=alice).json()["items"]] == [job_id]
    assert keyed_api.get("/transcripts", headers=bob).json()["items"] == []
    for fmt in ("json", "srt", "vtt", "txt"):
        assert keyed_api.get(f"/transcripts/{job_id}?format={fmt}", headers=bob).status_code == 404
        assert keyed_api.get(f"/transcripts/{job_id}?format={fmt}", headers=alice).status_code == 200
    assert keyed_api.delete(f"/transcripts/{job_id}", headers=bob).status_code == 404
    # Nor is its event stream Bob's to follow (Alice's ends with the job's end: it is done).
    assert keyed_api.get(f"/transcripts/{job_id}/events", headers=bob).status_code == 404
    told = keyed_api.get(f"/transcripts/{job_id}/events", headers=alice)
    assert told.status_code == 200 and "transcript.completed" in told.text, told.text
    assert keyed_api.get(f"/status/{job_id}", headers=alice).status_code == 200  # still there
    # While a request of Alice's holds her job, Bob is still told at once that there is no such
    # job: a 503 "being changed", or an answer only once she is done, would say that it exists.
    with held(stack.database_url, "SELECT id FROM transcripts WHERE id = $1 FOR UPDATE", job_id):
        for method, path, body in (("DELETE", "", None), ("PATCH", "/speakers", {"spk_0": "Bob's guess"}),
                                   ("PATCH", "/segments/0/0", {"speaker": "spk_1"})):
            started = time.monotonic()
            answer = keyed_api.request(method, f"/transcripts/{job_id}{path}", json=body, headers=bob)
            assert answer.status_code == 404 and time.monotonic() - started < 4, (method, path, answer.text)
    assert keyed_api.delete(f"/transcripts/{job_id}", headers=alice).status_code == 204
    assert keyed_api.get(f"/transcripts/{job_id}", headers=alice).status_code == 404


# ---- progress on a job of many chunks --------------------------------------------------------


@pytest.fixture(scope="module")
def chunked(tmp_path_factory, fixtures_dir):
    """A second stack whose diarizer cuts jobs into chunks of at most 4 s of speech."""
    with running_stack(tmp_path_factory, CHUNK_MAX_SPEECH_S="4") as running:
        yield running


def test_progress_moves_chunk_by_chunk(chunked, fixtures_dir):
    job_id = chunked.submit(fixtures_dir / "ru_dialogue.wav").json()["id"]
    seen: list[tuple[str, int]] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        document = httpx.get(f"{chunked.api}/status/{job_id}", timeout=10).json()
        if not seen or seen[-1] != (document["stage"], document["percent"]):
            seen.append((document["stage"], document["percent"]))
        if document["status"] != "processing":
            break
        time.sleep(0.05)
    assert document["status"] == "done", document
    chunk_count = chunked.value("SELECT chunk_count FROM transcripts WHERE id = $1", job_id)
    assert chunk_count >= 4
    order = ["submitted", "diarizing", "transcribing", "embedding", "done"]
    assert [order.index(stage) for stage, _ in seen] == sorted(order.index(stage) for stage, _ in seen)
    percents = [percent for _, percent in seen]
    assert percents == sorted(percents) and percents[-1] == 100
    partial = {p for p in percents if 0 < p < 100}
    assert len(partial) >= 2, seen  # a poller sees it move, not jump from 0 to 100
    assert "transcribing" in {stage for stage, _ in seen}
    srt = httpx.get(f"{chunked.api}/transcripts/{job_id}", params={"format": "srt"}, timeout=30).text
    assert_cues_match(parse_srt(srt), document["segments"])  # chunks come back in time order
    # A speaker keeps one label over the whole job, whichever chunk they talk in: the job has the
    # reference's speakers, each reference speaker's utterances under one label of their own.
    heard_as: dict[str, set[str]] = {}
    for utterance in json.loads((fixtures_dir / "ru_dialogue.json").read_text()):
        middle = (utterance["start"] + utterance["end"]) / 2
        under = [s["speaker"] for s in document["segments"] if s["start_ts"] - 0.3 <= middle <= s["end_ts"] + 0.3]
        heard_as.setdefault(utterance["speaker"], set()).update(under[:1])
    assert all(len(labels) == 1 for labels in heard_as.values()), heard_as
    assert len(set.union(*heard_as.values())) == len(heard_as) == 2, heard_as
    assert {s["speaker"] for s in document["segments"]} == set.union(*heard_as.values()), document["segments"]


def test_an_arrow_in_the_text_is_rewritten_only_in_srt():
    """SRT has no escaping; WebVTT's &gt; already keeps `-->` from reading as timing, and text has no cues."""
    segment = TranscriptSegment(speaker="spk_0", start_ts=0.0, end_ts=2.0, text="x --> 0")
    assert to_txt([segment]) == "[00:00:00] spk_0: x --> 0\n"
    assert to_vtt([segment]).splitlines()[-1] == "<v spk_0>x --&gt; 0"
    assert to_srt([segment]).splitlines()[-1] == "spk_0: x -> 0"


def test_rttm_of_a_file_or_speakers_named_as_pandas_na_strings_reads_back_whole(tmp_path):
    """pyannote.database's load_rttm reads with pandas' default NA strings: a file id `null` lost
    every turn, speakers `None` and `NA` became one speaker with no name."""
    from pyannote.database.util import load_rttm

    turns = [SpeakerTurn(speaker=f"spk_{n}", start=2.0 * n, end=2.0 * n + 1.5) for n in range(4)]
    rttm = to_rttm(rttm_uri("null.wav"), turns, {"spk_0": "None", "spk_1": "NA", "spk_2": "n/a"})
    (tmp_path / "hyp.rttm").write_text(rttm)
    [(uri, hypothesis)] = load_rttm(tmp_path / "hyp.rttm").items()
    assert uri == "null_"
    assert [label for _, _, label in hypothesis.itertracks(yield_label=True)] == ["None_", "NA_", "n/a_", "spk_3"]



def test_rttm_of_a_file_or_speakers_named_with_double_quotes_reads_back_as_written(tmp_path):
    """pandas reads a field that starts with `"` as quoted: `"Bob"` came back as Bob, one with
    Bob's name, and a lone `"` swallowed the rest of the file."""
    from pyannote.database.util import load_rttm

    turns = [SpeakerTurn(speaker=f"spk_{n}", start=2.0 * n, end=2.0 * n + 1.5) for n in range(5)]
    names = {"spk_0": '"Bob"', "spk_1": "Bob", "spk_2": '"Ann', "spk_3": 'Jo "JJ" Lee'}
    rttm = to_rttm(rttm_uri('"draft.wav'), turns, names)
    (tmp_path / "hyp.rttm").write_text(rttm)
    [(uri, hypothesis)] = load_rttm(tmp_path / "hyp.rttm").items()
    labels = [label for _, _, label in hypothesis.itertracks(yield_label=True)]
    assert uri == "'draft" and labels == ["'Bob'", "Bob", "'Ann", "Jo_'JJ'_Lee", "spk_4"]
    assert [line.split()[1] for line in rttm.splitlines()] == [uri] * 5
    assert [line.split()[7] for line in rttm.splitlines()] == labels  # each reads back as written


def test_download_name_replaces_only_an_extension():
    """A dot in a name is not always an extension's: "Dr. Smith interview" was downloaded as Dr.srt."""
    assert [download_name(name, "srt") for name in (
        "Dr. Smith interview", "2025.11.25 standup", "standup 2025.11.25", "meeting.", "clip.WEBM", "x.m4a",
        "call.3gp", "notes v1.2", "a.tar.gz")] == [
        "Dr. Smith interview.srt", "2025.11.25 standup.srt", "standup 2025.11.25.srt", "meeting.srt", "clip.srt",
        "x.srt", "call.srt", "notes v1.2.srt", "a.tar.srt"]
    assert (rttm_uri("Dr. Smith interview"), rttm_uri("2025.11.25 standup.m4a")) == (
        "Dr._Smith_interview", "2025.11.25_standup")


def test_a_correction_embedded_later_is_announced_again_with_its_vector(stack):
    """A correction made while the embedding service is away (or slow, or the segment's vector in
    an older model) goes out in segment.updated without a vector; ingest's corrections embedder
    gave it one later and told nobody, so a subscriber keeping vectors from the events kept the
    old text's (or none) for good. It now sends a second segment.updated with the vector, once the
    text it embedded is still the segment's (one corrected again meanwhile waits for its own)."""
    import aiohttp

    from common.db import LockKey, create_pool
    from services.embedder.backends import make_embedder
    from services.ingest.reindex import embed_corrections
    from tests.conftest import through_another_ingest

    job_id = stack.value("INSERT INTO transcripts (filename, status, stage, progress, language, completed_at)"
                         " VALUES ('later.wav', 'done', 'done', 1, 'en', now()) RETURNING id")
    first, second = "The giraffes were fed fresh leaves.", "The zebras were fed fresh hay at noon."
    try:
        stack.query("INSERT INTO segments (transcript_id, chunk_index, index, speaker, start_ts, end_ts, text)"
                    " VALUES ($1, 0, 0, 'spk_0', 0, 3, 'The giraffe was fed.')", job_id)
        with through_another_ingest(stack, "ingest-corrections-embedder-away", OLLAMA_RETRIES="0",
                                    OLLAMA_URL=f"http://127.0.0.1:{free_port()}") as away:
            where = f"{away.api}/transcripts/{job_id}/segments/0/0"

            async def correct_then_embed() -> tuple[list[dict], list[float], str]:
                pool = await create_pool(stack.settings(), min_size=2, max_size=3)  # as ingest's (its codecs)
                connection = await aio_pika.connect_robust(stack.amqp_url)
                try:
                    async with pool.acquire() as lock, aiohttp.ClientSession() as http, connection, \
                            httpx.AsyncClient(timeout=60) as client:
                        # The ingests' own turns (every minute) are held off; the test takes them.
                        while not await lock.fetchval("SELECT pg_try_advisory_lock($1)", LockKey.CORRECTIONS):
                            await asyncio.sleep(0.2)
                        queue = await events_queue(await connection.channel(), "segment.updated")
                        corrected = await client.patch(where, json={"text": first})
                        assert corrected.status_code == 200, corrected.text
                        embed, model = make_embedder(stack.settings(), http)

                        async def corrected_again_meanwhile(texts: list[str]) -> list[list[float]]:
                            vectors = await embed(texts)
                            again = await client.patch(where, json={"text": second})
                            assert again.status_code == 200, again.text
                            return vectors

                        await embed_corrections(pool, corrected_again_meanwhile, model)  # `first` is not stored
                        assert await embed_corrections(pool, embed, model) >= 1
                        [expected] = await embed([second])
                        return await job_events(queue, job_id, lambda bodies: len(bodies) >= 3, timeout=30), \
                            expected, model
                finally:
                    await pool.close()

            events, expected, model = asyncio.run(correct_then_embed())
        assert [(event["text"], event["embedding"] is None) for event in events] == [
            (first, True), (second, True), (second, False)], events
        announced = events[2]
        assert (announced["chunk_index"], announced["index"], announced["speaker"]) == (0, 0, "spk_0")
        assert announced["embedding_model"] == model and np.allclose(announced["embedding"], expected, atol=1e-5)
        assert stack.value("SELECT embedding_model FROM segments WHERE transcript_id = $1", job_id) == model
    finally:
        stack.query("DELETE FROM transcripts WHERE id = $1", job_id)
