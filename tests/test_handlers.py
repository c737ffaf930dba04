"""The stage handlers called directly, as a unit test calls any function: real models, no broker.
The diarizer's handler turns an uploaded file into its progress and chunk messages, through the
real S3 protocol (the stack's moto); the transcriber's turns each chunk into speaker-attributed
text. The tests of transcription options hand the transcriber its audio through its `read_pcm`
dependency instead of the store: what they check is the text, not the storage."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import re
import socket
import socketserver
import subprocess
import sys
import threading
import urllib.parse
import uuid
from pathlib import Path

import numpy as np
import pytest

from common.audio import SAMPLE_RATE, decode_audio
from common.messages import JobDiarized, JobOptions, JobProgress, JobSubmitted, Segment, SpeakerTurn, TimeSpan
from common.settings import Settings
from common.storage import pcm_key, stored_size
from services.diarizer import handler as diarizer
from services.diarizer.pipeline import make_diarizer
from services.transcriber import handler as transcriber
from services.transcriber.whisper import load_model, transcribe_chunk
from tests.conftest import ROOT, Stack


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


async def test_diarizer_then_transcriber_handlers_give_who_said_what(stack: Stack, fixtures_dir):
    settings = stack.settings()
    s3 = stack.s3()
    job_id = 900_000 + uuid.uuid4().int % 10_000
    key = f"uploads/handler-test-{job_id}"
    s3.fput_object(settings.audio_bucket, key, str(fixtures_dir / "en_dialogue.wav"))
    diarize, _ = make_diarizer(settings)
    deps = diarizer.Deps(settings=settings, storage=s3, diarize=diarize)
    submitted = JobSubmitted(job_id=job_id, audio_bucket=settings.audio_bucket, audio_key=key,
                             filename="en_dialogue.wav")

    produced = [message async for message in diarizer.handle(submitted, deps)]

    assert [type(m) for m in produced[:2]] == [JobProgress, JobProgress]
    assert [produced[0].stage, produced[1].stage] == ["diarizing", "transcribing"]
    chunks = produced[2:]
    assert chunks and all(isinstance(m, JobDiarized) for m in chunks)
    assert produced[1].chunk_count == len(chunks) and [c.chunk_index for c in chunks] == list(range(len(chunks)))
    # The decoded audio is stored for the next stage: 16-bit samples at 16 kHz (duration in ms).
    assert abs(s3.stat_object(settings.audio_bucket, pcm_key(job_id)).size - produced[1].duration * 32_000) <= 32

    model, _ = load_model(settings)
    tdeps = transcriber.Deps(model=model, read_pcm=transcriber.pcm_reader(s3), beam_size=settings.whisper_beam_size)
    segments = [s for chunk in chunks for s in transcriber.transcribe(chunk, tdeps).segments]

    utterances = json.loads((fixtures_dir / "en_dialogue.json").read_text())
    said = words(" ".join(s.text for s in segments))
    expected = words(" ".join(u["text"] for u in utterances))
    assert len(set(said) & set(expected)) >= 0.8 * len(set(expected))
    # Who said it: each reference speaker's utterances land under one speaker, a different one each.
    heard_as: dict[str, set[str]] = {}
    for utterance in utterances:
        middle = (utterance["start"] + utterance["end"]) / 2
        under = [s.speaker for s in segments if s.start_ts - 0.3 <= middle <= s.end_ts + 0.3]
        heard_as.setdefault(utterance["speaker"], set()).update(under[:1])
    assert all(len(labels) == 1 for labels in heard_as.values()), heard_as
    assert len(set.union(*heard_as.values())) == len(heard_as) == 2, heard_as


async def test_a_jobs_language_is_its_first_chunks_whichever_is_stored_first(stack: Stack):
    """In a recording that switches language the chunks' languages differ, and replicas store
    chunks in no set order: the job's language was whichever chunk came first."""
    import asyncpg

    from common import jobstore

    conn = await asyncpg.connect(stack.database_url)
    try:
        for order in ([1, 0, 2], [0, 1, 2], [2, 1, 0]):
            job_id = await conn.fetchval("INSERT INTO transcripts (filename) VALUES ('switching.wav') RETURNING id")
            for chunk in order:
                await jobstore.advance(conn, job_id, "transcribing", language=["en", "de", "fr"][chunk],
                                       first_chunk=chunk == 0)
            assert await conn.fetchval("SELECT language FROM transcripts WHERE id = $1", job_id) == "en", order
            await conn.execute("DELETE FROM transcripts WHERE id = $1", job_id)
    finally:
        await conn.close()


async def test_a_second_run_of_a_job_leaves_its_decoded_audio_to_the_job(stack: Stack, fixtures_dir):
    """A delivery again (the first run cut off after its chunks went) that sees the job end while
    it diarizes must not remove the decoded audio: ingest is reading it then to redact the
    recording. A run that stored it for a job that ended meanwhile removes its own copy, and a
    stored PCM of another length (a job of the same id before the database was reset) is not
    taken for this recording's."""
    settings = stack.settings()
    s3 = stack.s3()
    diarize, _ = make_diarizer(settings)
    pcm_bytes = decode_audio(str(fixtures_dir / "jfk.flac")).size * 2
    for stored_before, left_after in ((pcm_bytes, pcm_bytes), (None, None), (64, None)):
        job_id = 900_000 + uuid.uuid4().int % 10_000
        key = f"uploads/handler-test-{job_id}"
        try:
            s3.fput_object(settings.audio_bucket, key, str(fixtures_dir / "jfk.flac"))
            if stored_before:
                s3.put_object(settings.audio_bucket, pcm_key(job_id), io.BytesIO(bytes(stored_before)), stored_before)
            ended: set[int] = set()

            def done_meanwhile(waveform, options, stop, job_id=job_id, ended=ended):
                ended.add(job_id)  # the job's transcript.completed, heard while this run diarizes
                return diarize(waveform, options, stop)

            deps = diarizer.Deps(settings=settings, storage=s3, diarize=done_meanwhile, ended=ended)
            submitted = JobSubmitted(job_id=job_id, audio_bucket=settings.audio_bucket, audio_key=key,
                                     filename="jfk.flac")
            produced = [message async for message in diarizer.handle(submitted, deps)]
            assert [type(m) for m in produced] == [JobProgress]  # no chunk of an ended job
            assert stored_size(s3, settings.audio_bucket, pcm_key(job_id)) == left_after, stored_before
            if left_after:  # the earlier run's copy, not written over
                assert s3.get_object(settings.audio_bucket, pcm_key(job_id)).read(64) == bytes(64)
        finally:
            s3.remove_object(settings.audio_bucket, pcm_key(job_id))
            s3.remove_object(settings.audio_bucket, key)


async def test_a_diarization_whose_delivery_is_gone_stops_instead_of_running_beside_the_next(stack: Stack,
                                                                                          fixtures_dir):
    """A closed channel cancels the handler's task, not its thread: the diarization went on beside
    the copy the broker delivered again (twice the memory, half the CPU each, and slower still
    each time the consumer timeout took the message back)."""
    import asyncio
    import threading
    import time

    settings = stack.settings()
    s3 = stack.s3()
    diarize, _ = make_diarizer(settings)
    job_id = 900_000 + uuid.uuid4().int % 10_000
    key = f"uploads/handler-test-{job_id}"
    started, told_to_stop = threading.Event(), []

    def diarize_slowly(waveform, options, stop):
        started.set()
        deadline = time.monotonic() + 20
        while not stop() and time.monotonic() < deadline:
            time.sleep(0.02)
        told_to_stop.append(stop())
        return diarize(waveform, options, stop)

    try:
        s3.fput_object(settings.audio_bucket, key, str(fixtures_dir / "jfk.flac"))
        deps = diarizer.Deps(settings=settings, storage=s3, diarize=diarize_slowly, ended=set())
        submitted = JobSubmitted(job_id=job_id, audio_bucket=settings.audio_bucket, audio_key=key, filename="jfk.flac")

        async def run() -> list:
            return [message async for message in diarizer.handle(submitted, deps)]

        handling = asyncio.create_task(run())
        assert await asyncio.to_thread(started.wait, 60)
        handling.cancel()
        deadline = time.monotonic() + 5
        while not told_to_stop and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert told_to_stop == [True]
    finally:
        s3.remove_object(settings.audio_bucket, pcm_key(job_id))
        s3.remove_object(settings.audio_bucket, key)


@pytest.mark.parametrize("batch_size", [0, 2])
async def test_a_transcription_whose_delivery_is_gone_stops_instead_of_running_beside_the_next(
        fixtures_dir, monkeypatch, batch_size):
    """A closed channel (or the consumer timeout) cancels the handler's task, not its Whisper
    thread: the chunk delivered again waited behind the orphaned transcription (twice the memory,
    twice the latency), and each flap of the connection added another. The thread stops at the
    next segment (batched: the next batch) instead of going on through 8 minutes of speech."""
    import asyncio
    import threading
    import time

    settings = Settings()
    model, _ = load_model(settings.model_copy(update={"whisper_model": settings.whisper_fallback_model}))
    speech = decode_audio(str(fixtures_dir / "jfk.flac"))
    audio = np.concatenate([speech, np.zeros(SAMPLE_RATE, dtype=np.float32)] * 40)
    duration = audio.size / SAMPLE_RATE
    chunk = JobDiarized(job_id=1, chunk_index=0, chunk_count=1, pcm_bucket="audio", pcm_key="pcm/1",
                        duration=duration, span=TimeSpan(start=0, end=duration),
                        turns=[SpeakerTurn(speaker="spk_0", start=0, end=duration)], options=JobOptions(language="en"))
    deps = transcriber.Deps(model=model, beam_size=1, batch_size=batch_size,
                            read_pcm=lambda bucket, key, span: audio[int(span.start * SAMPLE_RATE):
                                                                     int(span.end * SAMPLE_RATE)])
    started, ended = threading.Event(), threading.Event()
    outcome: list = []  # what the thread returned (all the audio transcribed) or raised
    transcribe = transcriber.transcribe

    def transcribe_noting_its_end(*args, **kwargs):
        started.set()
        try:
            outcome.append(transcribe(*args, **kwargs))
            return outcome[-1]
        except BaseException as error:
            outcome.append(error)
            raise
        finally:
            ended.set()

    monkeypatch.setattr(transcriber, "transcribe", transcribe_noting_its_end)

    async def run() -> list:
        return [message async for message in transcriber.handle(chunk, deps)]

    handling = asyncio.create_task(run())
    assert await asyncio.to_thread(started.wait, 60)
    await asyncio.sleep(2)  # decoding
    handling.cancel()
    cancelled_at = time.monotonic()
    # One window (30 s of audio) or batch may still be decoded: seconds, or some 15 s on two busy cores.
    assert await asyncio.to_thread(ended.wait, 40), "the transcription went on after its delivery was gone"
    # Stopped, not finished: a thread that went on through all 8 minutes of audio ends too.
    assert len(outcome) == 1 and isinstance(outcome[0], transcriber.TranscriptionStopped), [
        type(o).__name__ for o in outcome]
    assert not handling.done() or handling.cancelled()
    print(f"batch size {batch_size}: the thread ended {time.monotonic() - cancelled_at:.1f} s after the cancel")


def test_batched_decoding_gives_each_person_their_words(fixtures_dir):
    """WHISPER_BATCH_SIZE: the chunk's speech cut into clips where its regions join and decoded
    several at once; the words and who said them are what one window after another gives."""
    settings = Settings()
    model, _ = load_model(settings.model_copy(update={"whisper_model": settings.whisper_fallback_model}))
    audio = decode_audio(str(fixtures_dir / "en_dialogue.wav"))
    utterances = json.loads((fixtures_dir / "en_dialogue.json").read_text())
    turns = [SpeakerTurn(speaker=u["speaker"], start=u["start"], end=u["end"]) for u in utterances]
    by_speaker = {}
    for batch_size in (0, 4):
        segments, _ = transcribe_chunk(model, audio, 0.0, turns, "en", batch_size=batch_size)
        by_speaker[batch_size] = {speaker: words(" ".join(s.text for s in segments if s.speaker == speaker))
                                  for speaker in {t.speaker for t in turns}}
    for speaker, said in by_speaker[4].items():
        expected = words(" ".join(u["text"] for u in utterances if u["speaker"] == speaker))
        assert len(set(said) & set(expected)) >= 0.8 * len(set(expected)), (speaker, said)
        assert len(set(said) ^ set(by_speaker[0][speaker])) <= 2, (said, by_speaker[0][speaker])


def reference_turns(fixtures_dir: Path, name: str) -> list[SpeakerTurn]:
    """The fixture's reference who-spoke-when (its .rttm), as the diarizer's turns."""
    fields = [line.split() for line in (fixtures_dir / f"{name}.rttm").read_text().splitlines() if line.strip()]
    return [SpeakerTurn(speaker=f[7], start=float(f[3]), end=round(float(f[3]) + float(f[4]), 3)) for f in fields]


@pytest.mark.parametrize("name", ["sample", "ami_trn03"])
def test_a_word_said_at_a_chunk_cut_inside_talk_is_written_once(fixtures_dir, name):
    """Meetings cut into chunks of at most 6 s of speech (CHUNK_MAX_SPEECH_S), their reference
    turns as the diarizer's, so that cuts fall inside talk or in pauses under 0.6 s. A chunk heard
    only 0.3 s before its span: Whisper timed the first word it heard from where that audio
    starts, which put the middle of the chunk's first word before the cut, and the chunk before,
    timing it right, left it to this one: "This" (sample, cut at 12.47 s) and "having" (ami_trn03,
    6.0 s) were in neither chunk. Around every cut, each word the recording transcribed as one
    chunk gives is written once: none left out, none twice. (A word spelled otherwise, as Whisper
    may write it with other audio around, is no word lost.)"""
    import difflib

    from common.messages import JobSubmitted
    from services.diarizer.handler import chunk_messages
    from services.diarizer.offline import Diarization
    from services.transcriber.whisper import REGION_PAD_S

    settings = Settings()
    model, _ = load_model(settings.model_copy(update={"whisper_model": settings.whisper_fallback_model}))
    audio = decode_audio(str(fixtures_dir / f"{name}.wav"))
    duration = round(audio.size / SAMPLE_RATE, 3)
    turns = reference_turns(fixtures_dir, name)
    deps = transcriber.Deps(model=model, read_pcm=lambda bucket, key, span: audio[
        max(0, int(span.start * SAMPLE_RATE)):int(span.end * SAMPLE_RATE)])
    job = JobSubmitted(job_id=1, audio_bucket="audio", audio_key="uploads/1", filename=f"{name}.wav",
                       options=JobOptions(language="en"))

    def chunked(max_speech_s: float) -> tuple[list[JobDiarized], list]:
        chunks = [m for m in chunk_messages(job, duration, Diarization(turns=turns),
                                            settings.model_copy(update={"chunk_max_speech_s": max_speech_s}),
                                            waveform=audio) if isinstance(m, JobDiarized)]
        return chunks, [w for chunk in chunks for s in transcriber.transcribe(chunk, deps).segments for w in s.words]

    [_], whole = chunked(10 * duration)
    chunks, cut_up = chunked(6.0)
    cuts = [chunk.span.start for chunk in chunks[1:]]
    # Cuts where one chunk hears the other's words: its speech within the padding of the cut.
    assert any(min(t.start for t in chunk.turns) - chunk.span.start < REGION_PAD_S for chunk in chunks[1:]), cuts

    def near_a_cut(found) -> bool:
        return any(abs((w.start + w.end) / 2 - cut) < 1.0 for w in found for cut in cuts)

    said, written = (["".join(words(w.word)) for w in found] for found in (whole, cut_up))
    faults = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, said, written, autojunk=False).get_opcodes():
        if op == "delete" and near_a_cut(whole[i1:i2]):
            faults.append(f"left out {said[i1:i2]} at {whole[i1].start} s")
        if op == "insert" and near_a_cut(cut_up[j1:j2]):
            faults.append(f"written again {written[j1:j2]} at {cut_up[j1].start} s")
    assert not faults, (cuts, faults)


def test_the_first_word_after_a_join_is_the_next_speakers_and_said_in_their_turn(fixtures_dir):
    """A chunk's speech regions are laid end to end for Whisper, which times the first word after
    a join from early: from inside the region before, often the end of the previous word, its
    end where it is. Mapped back through the region holding its middle, it went to the region
    before: the second person's first word was written as the first person's last, seconds
    before it was said (hotwords.mp3, then jfk.flac's "And so my fellow Americans" after 3 s;
    in ami_trn05, FEE078's "Okay" at 5.9 s as FEE081's at 2.0 s)."""
    from services.transcriber.whisper import REGION_PAD_S

    settings = Settings()
    model, _ = load_model(settings.model_copy(update={"whisper_model": settings.whisper_fallback_model}))
    first, second = decode_audio(str(fixtures_dir / "hotwords.mp3")), decode_audio(str(fixtures_dir / "jfk.flac"))
    audio = np.concatenate([first, np.zeros(3 * SAMPLE_RATE, dtype=np.float32), second])
    joined_at = (first.size + 3 * SAMPLE_RATE) / SAMPLE_RATE
    # A diarizer starts a turn somewhere in its first word ("And", about 0.3-0.55 s into jfk.flac).
    for onset in (0.3, 0.4, 0.5, 0.6):
        turns = [SpeakerTurn(speaker="spk_0", start=0.0, end=first.size / SAMPLE_RATE),
                 SpeakerTurn(speaker="spk_1", start=round(joined_at + onset, 3), end=audio.size / SAMPLE_RATE)]
        segments, _ = transcribe_chunk(model, audio, 0.0, turns, "en")
        before, after = ([w for s in segments if s.speaker == spk for w in s.words] for spk in ("spk_0", "spk_1"))
        assert words(after[0].word) == ["and"] and words(before[-1].word) != ["and"], (onset, segments)
        # Word times are written to the millisecond.
        assert after[0].start >= turns[1].start - REGION_PAD_S - 1e-3, (onset, after[0])
        assert before[-1].end <= turns[0].end + REGION_PAD_S + 1e-3, (onset, before[-1])
    # A meeting, its reference turns as the diarizer's: FEE078 says "Okay" alone at 5.9-6.3 s.
    meeting = decode_audio(str(fixtures_dir / "ami_trn05.wav"))
    turns = reference_turns(fixtures_dir, "ami_trn05")
    [alone] = [t for t in turns if t.speaker == "FEE078" and 5.0 < t.start < 7.0]
    segments, _ = transcribe_chunk(model, meeting, 0.0, turns, "en")
    okay = [(s.speaker, w) for s in segments for w in s.words if words(w.word) == ["okay"] and w.start < 7.0]
    assert [speaker for speaker, _ in okay] == ["FEE078"], segments
    [(_, word)] = okay
    assert alone.start - REGION_PAD_S - 1e-3 <= word.start and word.end <= alone.end + REGION_PAD_S + 1e-3, word


def test_batched_decoding_of_a_quick_hand_over_to_another_language_transcribes_both(fixtures_dir):
    """WHISPER_BATCH_SIZE with language=en,de: where one person hands over to another in another
    language with under 0.6 s between, the language part is cut halfway between them, and the
    pause where a clip may end is the same instant computed in another order, a float's rounding
    after the part's start. With 30 s of talk after it, the first clip was that rounding long
    (no samples): faster-whisper crashed in its word alignment (IndexError), every try of the
    chunk alike, and the job failed."""
    from common.turns import speech_regions
    from services.transcriber.languages import language_spans, passages
    from services.transcriber.whisper import REGION_PAD_S

    settings = Settings()
    model, _ = load_model(settings.model_copy(update={"whisper_model": settings.whisper_fallback_model}))
    licence = decode_audio(str(fixtures_dir / "multilingual.mp3"))  # English to 29.2 s, then German from 31.0 s

    def clip(start: float, end: float) -> np.ndarray:
        return licence[round(start * SAMPLE_RATE):round(end * SAMPLE_RATE)]

    english, german = clip(20.0, 29.2), np.concatenate([clip(31.0, 59.9), clip(31.0, 40.0)])  # 9.2 s, 37.9 s
    audio = np.concatenate([english, np.zeros(round(0.3 * SAMPLE_RATE), dtype=np.float32), german])
    offset = 100.7  # the chunk's start in the job
    handed_over = offset + english.size / SAMPLE_RATE
    turns = [SpeakerTurn(speaker="spk_0", start=offset, end=handed_over),
             SpeakerTurn(speaker="spk_1", start=handed_over + 0.3, end=offset + audio.size / SAMPLE_RATE)]
    # The case: the pause lies a rounding error after the start of the German part.
    runs = passages(turns, offset, audio.size / SAMPLE_RATE)
    runs[0].language, runs[1].language = "en", "de"
    [_, (german_part, _)] = language_spans(runs, audio.size / SAMPLE_RATE, REGION_PAD_S)
    first, second = speech_regions(turns)
    assert 0 < (first.end + second.start) / 2 - offset - german_part.start < 1e-9

    segments, language = transcribe_chunk(model, audio, offset, turns, None, among=["en", "de"], batch_size=8)

    assert language == "de"
    assert {(s.speaker, s.language) for s in segments} == {("spk_0", "en"), ("spk_1", "de")}, segments
    assert {"software", "permission"} <= set(words(" ".join(s.text for s in segments if s.speaker == "spk_0")))
    assert {"und", "der", "software"} <= set(words(" ".join(s.text for s in segments if s.speaker == "spk_1")))


def test_a_jobs_vocabulary_is_spelled_as_given(fixtures_dir):
    """hotwords.mp3 says "ComfyUI" twice; Whisper alone writes it as words it knows."""
    settings = Settings()
    model, _ = load_model(settings.model_copy(update={"whisper_model": settings.whisper_fallback_model}))
    audio = decode_audio(str(fixtures_dir / "hotwords.mp3"))
    duration = audio.size / SAMPLE_RATE

    def transcript(options: JobOptions) -> str:
        chunk = JobDiarized(job_id=1, chunk_index=0, chunk_count=1, pcm_bucket="audio", pcm_key="pcm/1",
                            duration=duration, span=TimeSpan(start=0, end=duration),
                            turns=[SpeakerTurn(speaker="spk_0", start=0, end=duration)], options=options)
        deps = transcriber.Deps(model=model, read_pcm=lambda bucket, key, span: audio[
            round(span.start * SAMPLE_RATE):round(span.end * SAMPLE_RATE)])
        return " ".join(s.text for s in transcriber.transcribe(chunk, deps).segments)

    plain = transcript(JobOptions(language="en"))
    told = transcript(JobOptions(language="en", vocabulary="Kubernetes, ComfyUI"))
    assert "ComfyUI" not in plain and "folder" in plain, plain
    assert told.count("ComfyUI") == 2 and "folder" in told and "Kubernetes" not in told, told
    # Custom spelling fixes what Whisper writes after the fact, whatever it heard.
    assert plain.lower().count("confu i") == 2, plain
    spelled = transcript(JobOptions(language="en", spelling="confu i=ComfyUI, folder=directory"))
    assert spelled.count("ComfyUI") == 2 and "directory" in spelled and "folder" not in spelled, spelled


def test_a_jobs_redaction_replaces_numbers_and_addresses_in_its_words_and_text():
    """billing_call.flac reads out a card number, a phone number and an e-mail address."""
    settings = Settings()
    model, _ = load_model(settings.model_copy(update={"whisper_model": settings.whisper_fallback_model}))
    audio = decode_audio(str(ROOT / "tests" / "data" / "billing_call.flac"))
    duration = audio.size / SAMPLE_RATE

    def transcribed(options: JobOptions, always: list[str]) -> list[Segment]:
        chunk = JobDiarized(job_id=1, chunk_index=0, chunk_count=1, pcm_bucket="audio", pcm_key="pcm/1",
                            duration=duration, span=TimeSpan(start=0, end=duration),
                            turns=[SpeakerTurn(speaker="spk_0", start=0, end=duration)], options=options)
        deps = transcriber.Deps(model=model, redact=always, read_pcm=lambda bucket, key, span: audio[
            round(span.start * SAMPLE_RATE):round(span.end * SAMPLE_RATE)])
        return transcriber.transcribe(chunk, deps).segments

    def text(segments: list[Segment]) -> str:
        return " ".join(s.text for s in segments)

    plain = transcribed(JobOptions(language="en"), [])
    assert re.search(r"\d{6}", text(plain)) and ".com" in text(plain), text(plain)
    redacted = transcribed(JobOptions(language="en", redact="card,phone,email"), [])
    said = text(redacted)
    assert all(label in said for label in ("[CARD]", "[PHONE]", "[EMAIL]")), said
    assert not re.search(r"\d{3}", said) and ".com" not in said and "team" in said.lower(), said
    # The words say the same as the text, and a label spans the time of the words it replaces.
    for segment in redacted:
        assert "".join(w.word for w in segment.words).strip() == segment.text
    [card] = [w for s in redacted for w in s.words if "[CARD]" in w.word]
    assert card.end - card.start > 2, card  # sixteen digits read out one by one
    # The operator's REDACT adds to what the job asks for.
    numbers = text(transcribed(JobOptions(language="en", redact="email"), ["number"]))
    assert "[EMAIL]" in numbers and "[NUMBER]" in numbers and not re.search(r"\d", numbers), numbers


def test_a_translated_chunk_is_english_under_the_speakers_who_said_it(fixtures_dir):
    settings = Settings()
    model, _ = load_model(settings.model_copy(update={"whisper_model": settings.whisper_fallback_model}))
    audio = decode_audio(str(fixtures_dir / "ru_dialogue.wav"))
    duration = audio.size / SAMPLE_RATE
    utterances = json.loads((fixtures_dir / "ru_dialogue.json").read_text())
    turns = [SpeakerTurn(speaker=f"spk_{u['speaker']}", start=u["start"], end=u["end"]) for u in utterances]
    chunk = JobDiarized(job_id=1, chunk_index=0, chunk_count=1, pcm_bucket="audio", pcm_key="pcm/1",
                        duration=duration, span=TimeSpan(start=0, end=duration), turns=turns,
                        options=JobOptions(task="translate"))
    deps = transcriber.Deps(model=model, read_pcm=lambda bucket, key, span: audio[
        round(span.start * SAMPLE_RATE):round(span.end * SAMPLE_RATE)])

    transcribed = transcriber.transcribe(chunk, deps)

    assert (transcribed.language, transcribed.text_language) == ("ru", "en")  # spoken, written
    said = " ".join(s.text for s in transcribed.segments)
    assert not re.search("[а-яё]", said.lower()) and {"hear", "well"} <= set(words(said)), said
    # Each reference utterance's words stay with its speaker.
    for utterance in utterances:
        middle = (utterance["start"] + utterance["end"]) / 2
        [segment] = [s for s in transcribed.segments if s.start_ts - 0.3 <= middle <= s.end_ts + 0.3]
        assert segment.speaker == f"spk_{utterance['speaker']}", (utterance, segment)


def transcribed_with(audio, turns: list[SpeakerTurn], language: str | None):
    settings = Settings()
    model, _ = load_model(settings.model_copy(update={"whisper_model": settings.whisper_fallback_model}))
    duration = audio.size / SAMPLE_RATE
    chunk = JobDiarized(job_id=1, chunk_index=0, chunk_count=1, pcm_bucket="audio", pcm_key="pcm/1",
                        duration=duration, span=TimeSpan(start=0, end=duration), turns=turns,
                        language_probe=[TimeSpan(start=0, end=min(30.0, duration))],
                        options=JobOptions(language=language))
    deps = transcriber.Deps(model=model, read_pcm=lambda bucket, key, span: audio[
        round(span.start * SAMPLE_RATE):round(span.end * SAMPLE_RATE)])
    return transcriber.transcribe(chunk, deps)


def test_a_meeting_that_switches_language_is_written_in_each_language_spoken(fixtures_dir):
    """The English dialogue, then the Russian one (other voices). Detected once, the job would
    be one language and Whisper would write the other part in it; asked for en,ru each speaker's
    passage is transcribed in its own, and its segments say which."""
    english = decode_audio(str(fixtures_dir / "en_dialogue.wav"))
    russian = decode_audio(str(fixtures_dir / "ru_dialogue.wav"))
    offset = english.size / SAMPLE_RATE
    utterances = [(u, "en", 0.0) for u in json.loads((fixtures_dir / "en_dialogue.json").read_text())] + [
        (u, "ru", offset) for u in json.loads((fixtures_dir / "ru_dialogue.json").read_text())]
    turns = [SpeakerTurn(speaker=f"spk_{language}_{u['speaker']}", start=u["start"] + shift, end=u["end"] + shift)
             for u, language, shift in utterances]

    transcribed = transcribed_with(np.concatenate([english, russian]), turns, "en,ru")

    assert transcribed.language in ("en", "ru")
    for utterance, language, shift in utterances:
        middle = (utterance["start"] + utterance["end"]) / 2 + shift
        [segment] = [s for s in transcribed.segments if s.start_ts - 0.3 <= middle <= s.end_ts + 0.3]
        assert segment.language == language, (utterance, segment)
        cyrillic = re.findall("[а-яё]", segment.text.lower())
        assert (len(cyrillic) > len(segment.text) / 2) if language == "ru" else not cyrillic, segment.text
    english_said = words(" ".join(s.text for s in transcribed.segments if s.language == "en"))
    assert {"everyone", "sales", "quarter", "growth"} <= set(english_said), english_said


def test_one_voice_switching_language_is_not_translated(fixtures_dir):
    """multilingual.mp3 reads a licence in English, then in German. With `multi` the German half
    comes back in German; detected once (English), Whisper translated it into English."""
    audio = decode_audio(str(fixtures_dir / "multilingual.mp3"))
    turns = [SpeakerTurn(speaker="spk_0", start=0.0, end=29.2), SpeakerTurn(speaker="spk_1", start=31.0, end=59.9)]

    transcribed = transcribed_with(audio, turns, "multi")

    [english, german] = [[s for s in transcribed.segments if s.speaker == spk] for spk in ("spk_0", "spk_1")]
    assert {s.language for s in english} == {"en"} and {s.language for s in german} == {"de"}
    assert {"permission", "software"} <= set(words(" ".join(s.text for s in english)))
    assert {"und", "der", "software"} <= set(words(" ".join(s.text for s in german)))


def test_a_cantonese_job_on_a_model_without_cantonese_is_transcribed_as_chinese(fixtures_dir):
    """Only Whisper large-v3 knows Cantonese (yue). The bundled base and the default medium were
    given no language at all for it (faster-whisper leaves out a language token it cannot find)
    and wrote whatever they guessed; Whisper before v3 writes Cantonese as Chinese, so the job is
    transcribed as zh, its language still the one asked for, and the log says so."""
    import logging

    from common.logs import _JobIdFilter, job_logged
    from services.transcriber import whisper

    settings = Settings()
    model, _ = load_model(settings.model_copy(update={"whisper_model": settings.whisper_fallback_model}))
    audio = decode_audio(str(fixtures_dir / "jfk.flac"))
    duration = audio.size / SAMPLE_RATE
    chunk = JobDiarized(job_id=31, chunk_index=0, chunk_count=1, pcm_bucket="audio", pcm_key="pcm/31",
                        duration=duration, span=TimeSpan(start=0, end=duration),
                        turns=[SpeakerTurn(speaker="spk_0", start=0, end=duration)], options=JobOptions(language="yue"))
    deps = transcriber.Deps(model=model, read_pcm=lambda bucket, key, span: audio[
        round(span.start * SAMPLE_RATE):round(span.end * SAMPLE_RATE)])
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    handler.addFilter(_JobIdFilter())
    whisper.log.addHandler(handler)
    try:
        with job_logged(31):
            transcribed = transcriber.transcribe(chunk, deps)
    finally:
        whisper.log.removeHandler(handler)

    assert transcribed.language == "yue" and transcribed.segments
    assert [r.getMessage() for r in records] == [
        "job=31 Cantonese (yue) asked for, which this Whisper model does not know (large-v3 does): transcribed"
        " as Chinese (zh)"], records
    # What Whisper is told: Chinese for Cantonese; a language it knows as asked.
    assert [whisper.model_language(model, code) for code in ("yue", "zh", "de", None)] == ["zh", "zh", "de", None]


def test_a_chunk_with_long_silence_reads_only_the_speech_it_transcribes(stack: Stack, fixtures_dir):
    """A chunk holds at most CHUNK_MAX_SPEECH_S of speech, but from cut to cut it may span hours
    of silence, and all of it was fetched and held as float32 (a 6 h recording with 4 min of
    speech: 700 MB fetched, over 1 GB of arrays). Only the speech Whisper hears is read."""
    from common.audio import PCM_BYTES_PER_SECOND, float_to_pcm16
    from common.storage import upload_bytes
    from services.transcriber.whisper import REGION_PAD_S

    settings = Settings()
    model, _ = load_model(settings.model_copy(update={"whisper_model": settings.whisper_fallback_model}))
    s3, bucket = stack.s3(), stack.settings().audio_bucket
    speech = decode_audio(str(fixtures_dir / "jfk.flac"))
    said, silent = speech.size / SAMPLE_RATE, 600.0
    duration = round(2 * said + silent, 3)
    job_id = 900_000 + uuid.uuid4().int % 10_000
    upload_bytes(s3, bucket, pcm_key(job_id), float_to_pcm16(
        np.concatenate([speech, np.zeros(int(silent * SAMPLE_RATE), dtype=np.float32), speech])))
    chunk = JobDiarized(job_id=job_id, chunk_index=0, chunk_count=1, pcm_bucket=bucket, pcm_key=pcm_key(job_id),
                        duration=duration, span=TimeSpan(start=0, end=duration),
                        turns=[SpeakerTurn(speaker="spk_0", start=0, end=said),
                               SpeakerTurn(speaker="spk_0", start=said + silent, end=duration)],
                        options=JobOptions(language="en"))
    read, bytes_read = transcriber.pcm_reader(s3), []

    def counted(bucket: str, key: str, span: TimeSpan) -> np.ndarray:
        samples = read(bucket, key, span)
        bytes_read.append(samples.size * 2)
        return samples

    try:
        segments = transcriber.transcribe(chunk, transcriber.Deps(model=model, read_pcm=counted)).segments
    finally:
        s3.remove_object(bucket, pcm_key(job_id))

    # The two speeches with the padding around each, not the ten minutes between them.
    assert sum(bytes_read) <= 2 * (said + 2 * REGION_PAD_S) * PCM_BYTES_PER_SECOND + 64, bytes_read
    middle = said + silent / 2
    for heard in ([s for s in segments if s.end_ts < middle], [s for s in segments if s.start_ts > middle]):
        assert {"ask", "what", "country"} <= set(words(" ".join(s.text for s in heard))), segments


def test_a_chunk_whose_decoded_audio_is_gone_fails_its_job_at_once(stack: Stack):
    """The job was cancelled or deleted while its chunk waited, and its decoded audio removed
    with it: no retry brings that back, yet the chunk was retried, then dead-lettered as an
    internal failure. A bucket that is not there (the store's setup) is still retried."""
    from minio.error import S3Error

    from common.broker import PermanentError

    settings = Settings()
    model, _ = load_model(settings.model_copy(update={"whisper_model": settings.whisper_fallback_model}))
    job_id = 900_000 + uuid.uuid4().int % 10_000
    deps = transcriber.Deps(model=model, read_pcm=transcriber.pcm_reader(stack.s3()))

    def chunk(bucket: str) -> JobDiarized:
        return JobDiarized(job_id=job_id, chunk_index=0, chunk_count=1, pcm_bucket=bucket, pcm_key=pcm_key(job_id),
                           duration=5.0, span=TimeSpan(start=0, end=5),
                           turns=[SpeakerTurn(speaker="spk_0", start=0.5, end=4.5)], options=JobOptions(language="en"))

    with pytest.raises(PermanentError, match="^the job's decoded audio is gone$"):
        transcriber.transcribe(chunk(stack.settings().audio_bucket), deps)
    with pytest.raises(S3Error, match="NoSuchBucket"):
        transcriber.transcribe(chunk("no-such-bucket"), deps)


def test_a_short_passage_takes_its_own_speakers_language_before_anyone_elses():
    """An interpreted interview: the German speaker's short "Ja, genau." (too short to identify)
    in a chunk that is mostly English takes German, the language of that speaker's nearest
    identified passage, not English, the nearest passage's; a speaker with no passage long enough
    takes the nearest one's; with none identified at all, the job's language stands."""
    from services.transcriber.languages import Passage, identify

    spoken = {"spk_en": "en", "spk_de": "de", "spk_fr": "fr"}
    codes = list(spoken.values())

    class Identifier:  # Whisper's identification, told the language by the audio it is given
        def detect_language(self, speech):
            code = codes[int(speech[0])]
            return code, 0.9, [(code, 0.9)]

    runs = [Passage(0.0, 12.0, "spk_en"), Passage(12.5, 20.0, "spk_de"), Passage(20.5, 40.0, "spk_en"),
            Passage(40.3, 41.0, "spk_de"), Passage(41.5, 55.0, "spk_en"), Passage(55.4, 56.0, "spk_fr")]

    def samples(start: float, end: float) -> np.ndarray:
        [run] = [r for r in runs if (r.start, r.end) == (start, end)]
        return np.full(round((end - start) * SAMPLE_RATE), codes.index(spoken[run.speaker]), dtype=np.float32)

    identify(Identifier(), samples, runs, ["en", "de", "fr"], fallback="en")
    assert [r.language for r in runs] == ["en", "de", "en", "de", "en", "en"]
    short = [Passage(0.0, 1.0, "spk_en"), Passage(1.2, 2.0, "spk_de")]
    identify(Identifier(), samples, short, ["en", "de"], fallback="de")
    assert [r.language for r in short] == ["de", "de"]


def reads_and_hearing(monkeypatch, read):
    """`read` that records the spans asked of it, those spans, and what Whisper (replaced) hears."""
    reads: list[TimeSpan] = []
    heard = []

    def counted(bucket: str, key: str, span: TimeSpan) -> np.ndarray:
        reads.append(span)
        return read(bucket, key, span)

    def whisper(model, audio, *args, **kwargs):
        heard.append(audio)
        return [], "en"

    monkeypatch.setattr(transcriber, "transcribe_chunk", whisper)
    return counted, reads, heard


def test_a_chunk_of_many_close_speech_regions_is_read_in_one_go(monkeypatch):
    """A GET for each speech region: a chatty chunk (a back-and-forth of short turns) made dozens
    of sequential requests to the store. Regions less than READ_BRIDGE_S apart are read at once,
    apart only across a long silence; what Whisper hears is the same, sample for sample."""
    from services.transcriber.whisper import CUT_CONTEXT_S, heard_spans

    rng = np.random.default_rng(7)
    duration = 400.0
    pcm = rng.standard_normal(int(duration * SAMPLE_RATE)).astype(np.float32)
    # 40 short turns 4 s apart (each its own region), a silence of 60 s, then 5 more.
    starts = [100.05 + 4 * i for i in range(40)] + [320.5 + 4 * i for i in range(5)]
    turns = [SpeakerTurn(speaker=f"spk_{i % 2}", start=round(t, 3), end=round(t + 1.2, 3))
             for i, t in enumerate(starts)]
    chunk = JobDiarized(job_id=1, chunk_index=1, chunk_count=3, pcm_bucket="b", pcm_key="k", duration=duration,
                        span=TimeSpan(start=99.0, end=345.0), turns=turns, options=JobOptions(language="en"))
    def read(bucket: str, key: str, span: TimeSpan) -> np.ndarray:
        """As pcm_reader reads the store."""
        start, end = max(0, int(span.start * SAMPLE_RATE)), int(span.end * SAMPLE_RATE)
        return pcm[start:end].copy() if end > start else np.zeros(0, dtype=np.float32)

    counted, reads, heard = reads_and_hearing(monkeypatch, read)
    transcriber.transcribe(chunk, transcriber.Deps(model=None, read_pcm=counted))
    [audio] = heard
    at = chunk.span.start - CUT_CONTEXT_S  # the chunk as heard, from a little before it
    spans = heard_spans(turns, at, audio.length_s, keep=chunk.span)
    assert len(spans) == 45 and audio.spans == spans
    # One read for the 40 close regions, one for the 5 after the long silence, which is not read.
    assert [(round(r.start, 3), round(r.end, 3)) for r in reads] == [
        (round(at + spans[0].start, 3), round(at + spans[39].end, 3)),
        (round(at + spans[40].start, 3), round(at + spans[44].end, 3))]
    # Each region's samples as reading it alone gave them.
    for span, piece in zip(spans, audio.pieces, strict=True):
        assert np.array_equal(piece, read("b", "k", TimeSpan(start=at + span.start, end=at + span.end))), span


def test_sparse_talk_is_read_in_gets_of_little_silence_and_only_its_speech_is_held(stack: Stack, monkeypatch):
    """A radio-dispatch recording: a few seconds of speech every 20 s. Every region was less
    than READ_BRIDGE_S from the next, so a chunk's half hour was fetched in one GET, converted to
    float32 whole, and each region kept as a view of it: the silence stayed in memory, 4 bytes a
    sample, for the whole Whisper pass. Now a GET bridges at most READ_MAX_BRIDGED_S of silence,
    and only the speech is converted, into arrays of its own, sample for sample as before."""
    from common.audio import float_to_pcm16, pcm16_to_float
    from common.storage import upload_bytes
    from services.transcriber.whisper import REGION_PAD_S, heard_spans

    s3, bucket = stack.s3(), stack.settings().audio_bucket
    duration = 900.0
    rng = np.random.default_rng(11)
    stored = float_to_pcm16(rng.uniform(-0.5, 0.5, int(duration * SAMPLE_RATE)).astype(np.float32))
    job_id = 900_000 + uuid.uuid4().int % 10_000
    upload_bytes(s3, bucket, pcm_key(job_id), stored)
    # 2.5 s of speech every 20 s, for 15 minutes.
    turns = [SpeakerTurn(speaker="spk_0", start=10.0 + 20 * i, end=12.5 + 20 * i) for i in range(44)]
    chunk = JobDiarized(job_id=job_id, chunk_index=0, chunk_count=1, pcm_bucket=bucket, pcm_key=pcm_key(job_id),
                        duration=duration, span=TimeSpan(start=0, end=duration), turns=turns,
                        options=JobOptions(language="en"))
    counted, reads, heard = reads_and_hearing(monkeypatch, transcriber.pcm_reader(s3))
    try:
        transcriber.transcribe(chunk, transcriber.Deps(model=None, read_pcm=counted))
    finally:
        s3.remove_object(bucket, pcm_key(job_id))

    [audio] = heard
    spans = heard_spans(turns, 0.0, audio.length_s)
    assert len(spans) == 44 and audio.spans == spans
    # Each GET: whole regions, and at most READ_MAX_BRIDGED_S of the silence between them.
    region = 2.5 + 2 * REGION_PAD_S
    assert 5 <= len(reads) <= 8, reads
    for r in reads:
        inside = [s for s in spans if r.start - 1e-6 <= s.start and s.end <= r.end + 1e-6]
        silence = (r.end - r.start) - region * len(inside)
        assert inside and silence <= transcriber.READ_MAX_BRIDGED_S + 1e-3, (r, len(inside))
    assert [s for r in reads for s in spans if r.start - 1e-6 <= s.start and s.end <= r.end + 1e-6] == spans
    # Only the speech is held: each region's float32 samples in an array of its own, the values
    # those of converting the stored 16-bit samples.
    pcm = np.frombuffer(stored, dtype="<i2")
    for span, piece in zip(spans, audio.pieces, strict=True):
        first, last = int(span.start * SAMPLE_RATE), int(span.end * SAMPLE_RATE)
        assert piece.base is None and piece.flags.owndata, span
        assert piece.dtype == np.float32 and np.array_equal(piece, pcm16_to_float(pcm[first:last])), span
    assert sum(p.nbytes for p in audio.pieces) <= 44 * region * SAMPLE_RATE * 4 + 44 * 4


def test_a_whisper_model_that_is_no_model_stops_the_transcriber_instead_of_serving_base(tmp_path):
    """WHISPER_FALLBACK_MODEL is for a model that cannot be fetched (no network). Every load error
    loaded it: a typo in WHISPER_MODEL, a directory that holds no model (or a GPU out of memory,
    or a compute type it lacks) quietly served `base`. Now the transcriber does not start, and
    says which model and why."""
    settings = Settings(whisper_device="cpu")
    assert Path(settings.whisper_fallback_model).is_dir()
    with pytest.raises(RuntimeError, match=r"cannot load Whisper model 'mediun' \(WHISPER_MODEL\):"
                                           r" Invalid model size 'mediun'"):
        load_model(settings.model_copy(update={"whisper_model": "mediun"}))
    with pytest.raises(RuntimeError, match=f"cannot load Whisper model '{tmp_path}' on cpu with compute type int8"):
        load_model(settings.model_copy(update={"whisper_model": str(tmp_path)}))


def test_a_whisper_model_the_gpu_cannot_run_moves_to_the_cpu_with_auto_and_stops_the_transcriber_otherwise(
        monkeypatch, caplog):
    """A GPU host where CTranslate2 cannot load cuBLAS (or cuDNN): the model loaded, and its first
    encode raised `Library libcublas.so.12 is not found or cannot be loaded`, so with
    WHISPER_DEVICE=auto every job failed while the transcriber looked healthy. load_model now
    transcribes a second of silence on a GPU: with auto, the model is loaded on the CPU instead,
    with a warning; with cuda, the transcriber does not start, saying why. WHISPER_DEVICE=cuda on a
    host without CUDA raised CTranslate2's bare RuntimeError, not ModelNotLoaded."""
    import logging

    import ctranslate2

    from services.transcriber import whisper

    fallback = Settings().whisper_fallback_model
    if ctranslate2.get_cuda_device_count() == 0:  # a host without CUDA (this one): CTranslate2's own refusal
        with pytest.raises(whisper.ModelNotLoaded, match=r"cannot load Whisper model '.*' on cuda \(WHISPER_DEVICE\)"
                                                         r" with compute type auto \(WHISPER_COMPUTE_TYPE\): "):
            load_model(Settings(whisper_model=fallback, whisper_device="cuda"))
    # The warm-up as the real model takes it (on the CPU here).
    whisper.warm_up(load_model(Settings(whisper_model=fallback, whisper_device="cpu"))[0])

    loaded = []

    class WhisperWithoutCublas:
        """Stands in for faster_whisper.WhisperModel on a GPU host whose cuBLAS CTranslate2 cannot
        load (this machine has no GPU): it loads anywhere, and on CUDA its first encode, when the
        segments are asked for, raises what CTranslate2 raises there."""

        def __init__(self, path, device, compute_type, cpu_threads):
            self.device, self.compute_type = device, compute_type
            loaded.append(self)

        def transcribe(self, audio, **options):
            def segments():
                if self.device == "cuda":
                    raise RuntimeError("Library libcublas.so.12 is not found or cannot be loaded")
                yield from ()

            return segments(), None

    monkeypatch.setattr(whisper, "WhisperModel", WhisperWithoutCublas)
    monkeypatch.setattr(ctranslate2, "get_cuda_device_count", lambda: 1)
    monkeypatch.setattr(ctranslate2, "get_supported_compute_types",
                        lambda device: {"float32", "float16", "int8", "int8_float16"} if device == "cuda"
                        else {"float32", "int8", "int8_float32"})
    with caplog.at_level(logging.WARNING, logger=whisper.log.name):
        model, name = load_model(Settings(whisper_model=fallback, whisper_device="auto"))
    assert name == fallback and [(m.device, m.compute_type) for m in loaded] == [("cuda", "float16"), ("cpu", "int8")]
    assert model is loaded[-1]
    [warning] = [r for r in caplog.records if r.name == whisper.log.name and r.levelno >= logging.WARNING]
    assert "cannot transcribe there" in warning.getMessage() and "libcublas.so.12" in warning.getMessage()
    assert "runs on the CPU instead (int8)" in warning.getMessage(), warning.getMessage()

    with pytest.raises(whisper.ModelNotLoaded, match=r"loads on cuda with compute type float16 but cannot transcribe"
                                                     r" there: Library libcublas.so.12 is not found"):
        load_model(Settings(whisper_model=fallback, whisper_device="cuda"))


def load_in_a_process(env: dict[str, str], hub_cache: Path, model: str = "tiny",
                      retry_delays_s: tuple[float, ...] | None = (0.0, 0.0)) -> subprocess.CompletedProcess:
    """load_model for WHISPER_MODEL=`model` in a process of its own with `env` (the Hub's address,
    a proxy) and the Hugging Face cache `hub_cache`; with `retry_delays_s`, as its pauses before
    fetching again (None: the transcriber's own)."""
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1",
           **env}
    shorten = "" if retry_delays_s is None else f" whisper.FETCH_RETRY_DELAYS_S = {tuple(retry_delays_s)!r};"
    return subprocess.run(
        [sys.executable, "-c", "import logging; logging.basicConfig();"
         " from common.settings import Settings; from services.transcriber import whisper;" + shorten +
         f" print(whisper.load_model(Settings(whisper_model={model!r}, whisper_device='cpu'))[1])"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_a_whisper_model_that_cannot_be_fetched_is_replaced_by_the_bundled_one(tmp_path):
    """No network and the model not in the cache: the bundled base is loaded, with a warning that
    says how to get the model asked for."""
    settings = Settings()
    with socket.socket() as closed:  # bound, never listening: connections to it are refused
        closed.bind(("127.0.0.1", 0))
        loaded = load_in_a_process({"HF_ENDPOINT": f"http://127.0.0.1:{closed.getsockname()[1]}"}, tmp_path)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == settings.whisper_fallback_model, loaded.stdout
    assert "cannot fetch Whisper model 'tiny'" in loaded.stderr, loaded.stderr
    # Fetched again after each pause (shortened here) before the bundled model is served until a restart.
    assert loaded.stderr.count("trying again in") == 2, loaded.stderr
    assert "until the transcriber is restarted" in loaded.stderr, loaded.stderr


def test_a_whisper_model_not_cached_with_the_hub_offline_is_replaced_by_the_bundled_one_at_once(tmp_path):
    """With HF_HUB_OFFLINE set, fetching again cannot help: the bundled base is loaded without
    waiting out the pauses between fetches."""
    settings = Settings()
    loaded = load_in_a_process({"HF_HUB_OFFLINE": "1"}, tmp_path, retry_delays_s=None)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == settings.whisper_fallback_model, loaded.stdout
    assert "trying again" not in loaded.stderr, loaded.stderr


# What huggingface_hub answers for a model: the commit its files are at.
HUB_COMMIT = "4d3c2b1a" * 5


def flaky_hub(model_dir: Path, repo: str, refused_gets: int) -> http.server.ThreadingHTTPServer:
    """A Hugging Face Hub serving `model_dir`'s files as `repo`, whose network breaks partway
    through model.bin and stays down for `refused_gets` requests more."""
    files = {path.name: path.read_bytes() for path in model_dir.iterdir() if path.is_file()}
    failing_gets = [1 + refused_gets]

    class Hub(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_HEAD(self):
            self.answer(with_body=False)

        def do_GET(self):
            self.answer(with_body=True)

        def answer(self, with_body: bool):
            path = urllib.parse.urlsplit(self.path).path
            name = path.removeprefix(f"/{repo}/resolve/{HUB_COMMIT}/")
            if path == f"/api/models/{repo}/revision/main":
                body = json.dumps({"id": repo, "sha": HUB_COMMIT, "siblings": [{"rfilename": n} for n in files]})
                return self.send(body.encode(), with_body, {"Content-Type": "application/json"})
            if path == f"/api/models/{repo}/tree/{HUB_COMMIT}":
                body = json.dumps([{"type": "file", "path": n, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                                   for n, data in files.items()])
                return self.send(body.encode(), with_body, {"Content-Type": "application/json"})
            if name not in files:
                return self.send(b"", with_body, status=404)
            data = files[name]
            headers = {"X-Repo-Commit": HUB_COMMIT, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
            if with_body and name == "model.bin" and failing_gets[0] > 0:
                failing_gets[0] -= 1
                if failing_gets[0] == refused_gets:  # the break: half the file, then the connection is gone
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[:len(data) // 2])
                    self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.send(data, with_body, headers)

        def send(self, body: bytes, with_body: bool, headers: dict[str, str] | None = None, status: int = 200):
            self.send_response(status)
            for header, value in {**(headers or {}), "Content-Length": str(len(body))}.items():
                self.send_header(header, value)
            self.end_headers()
            if with_body:
                self.wfile.write(body)

    return http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)


def test_a_whisper_model_whose_download_the_network_breaks_off_for_a_while_is_fetched_again(tmp_path):
    """A connection reset partway through the download, and the network down for longer than
    huggingface_hub resumes it by itself (five times, a second apart): the transcriber served the
    bundled base for its whole life. Now it fetches the model again after a pause and serves it."""
    settings = Settings()
    hub = flaky_hub(Path(settings.whisper_fallback_model), "Systran/faster-whisper-base", refused_gets=5)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    try:
        loaded = load_in_a_process({"HF_ENDPOINT": f"http://127.0.0.1:{hub.server_address[1]}"}, tmp_path,
                                   model="base", retry_delays_s=(0.5, 0.5))
    finally:
        hub.shutdown()
        hub.server_close()
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert loaded.stdout.strip() == "base", (loaded.stdout, loaded.stderr[-3000:])
    assert "cannot fetch Whisper model 'base'" in loaded.stderr and "trying again" in loaded.stderr, loaded.stderr


class RefusingProxy(socketserver.StreamRequestHandler):
    """A proxy that lets nothing out, as one left configured on a host without a way out answers."""

    def handle(self):
        self.rfile.readline()
        self.wfile.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


def test_a_whisper_model_behind_a_proxy_that_lets_nothing_through_is_replaced_by_the_bundled_one(tmp_path):
    """huggingface_hub raises a proxy's refusal itself instead of its error for a model it cannot
    fetch: a host with a leftover HTTPS_PROXY and no way out refused to start (before the fallback
    was kept for that error alone, it loaded the bundled model). Refused by the proxy or with no
    proxy listening at all, the bundled base is loaded."""
    settings = Settings()
    proxy = socketserver.ThreadingTCPServer(("127.0.0.1", 0), RefusingProxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            for address in (f"http://127.0.0.1:{proxy.server_address[1]}", f"http://127.0.0.1:{closed.getsockname()[1]}"):
                loaded = load_in_a_process({"HTTPS_PROXY": address, "https_proxy": address, "NO_PROXY": "",
                                                 "no_proxy": "", "HF_ENDPOINT": "https://huggingface.co"}, tmp_path)
                assert loaded.returncode == 0, (address, loaded.stderr[-3000:])
                assert loaded.stdout.strip() == settings.whisper_fallback_model, loaded.stdout
                assert "cannot fetch Whisper model 'tiny'" in loaded.stderr, loaded.stderr
    finally:
        proxy.shutdown()
        proxy.server_close()
