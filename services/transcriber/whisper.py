"""The transcriber's logic: faster-whisper over one chunk of speaker turns.

A chunk is transcribed in one pass (VAD on, word timestamps), and each word is given to the
speaker whose turn overlaps it most (the WhisperX way): one encoder pass per 30 s of audio
instead of one per turn, and no words lost at turn cuts."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from faster_whisper import WhisperModel

from common.messages import Segment, SpeakerTurn, Word
from common.settings import Settings

log = logging.getLogger(__name__)

# A segment is one speaker's words without a long pause, at most this long (subtitle-sized).
MAX_PAUSE_S = 1.0
MAX_SEGMENT_S = 30.0


def pick_device(settings: Settings) -> tuple[str, str]:
    device = settings.whisper_device
    if device == "auto":
        import ctranslate2

        device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    compute_type = settings.whisper_compute_type
    if compute_type == "auto":
        compute_type = "float16" if device == "cuda" else "int8"
    return device, compute_type


def load_model(settings: Settings) -> tuple[WhisperModel, str]:
    """WHISPER_MODEL (a size name or a model directory); if it cannot be loaded (no network
    for a download), the bundled fallback with a warning. Returns the model and its name."""
    device, compute_type = pick_device(settings)
    options = {"device": device, "compute_type": compute_type, "cpu_threads": settings.whisper_cpu_threads}
    try:
        model = WhisperModel(settings.whisper_model, **options)
        name = settings.whisper_model
    except Exception as exc:
        fallback = settings.whisper_fallback_model
        if not fallback or fallback == settings.whisper_model or not Path(fallback).is_dir():
            raise
        log.warning("cannot load Whisper model %r (%s); using the bundled model at %s",
                    settings.whisper_model, type(exc).__name__, fallback)
        model = WhisperModel(fallback, **options)
        name = fallback
    log.info("Whisper model %s on %s (%s)", name, device, compute_type)
    return model, name


def detect_language(model: WhisperModel, speech: np.ndarray) -> str | None:
    if speech.size < 16_000 // 2:
        return None
    language, probability, _ = model.detect_language(speech)
    log.info("detected language %s (p=%.2f)", language, probability)
    return language


def transcribe_chunk(model: WhisperModel, audio: np.ndarray, offset: float,
                     turns: list[SpeakerTurn], language: str | None,
                     beam_size: int = 5) -> tuple[list[Segment], str | None]:
    """Transcribe `audio` (which starts at `offset` seconds into the job) and split the text
    into speaker-labelled segments. Returns the segments and the language used."""
    if not turns or audio.size == 0:
        return [], language
    pieces, info = model.transcribe(
        audio,
        language=language,
        beam_size=beam_size,
        vad_filter=True,
        word_timestamps=True,
        condition_on_previous_text=False,
    )
    words = [
        Word(word=w.word, start=round(offset + w.start, 3), end=round(offset + w.end, 3),
             probability=round(w.probability, 3))
        for piece in pieces for w in (piece.words or [])
    ]
    segments: list[Segment] = []
    for speaker, run in _runs_by_speaker(words, turns):
        text = "".join(w.word for w in run).strip()
        if text:
            segments.append(Segment(index=len(segments), speaker=speaker, start_ts=run[0].start,
                                    end_ts=run[-1].end, text=text, words=run))
    return segments, language or info.language


def speaker_of(start: float, end: float, turns: list[SpeakerTurn]) -> str:
    """The speaker whose turn overlaps [start, end] most; else the nearest turn's."""
    best, best_overlap = None, 0.0
    for turn in turns:
        overlap = min(end, turn.end) - max(start, turn.start)
        if overlap > best_overlap:
            best, best_overlap = turn.speaker, overlap
    if best is not None:
        return best
    middle = (start + end) / 2
    nearest = min(turns, key=lambda t: 0.0 if t.start <= middle <= t.end
                  else min(abs(middle - t.start), abs(middle - t.end)))
    return nearest.speaker


def _runs_by_speaker(words: list[Word], turns: list[SpeakerTurn]) -> list[tuple[str, list[Word]]]:
    """Consecutive words of one speaker, split where the speaker changes, at a pause of
    MAX_PAUSE_S, or before a segment would exceed MAX_SEGMENT_S."""
    runs: list[tuple[str, list[Word]]] = []
    for word in words:
        speaker = speaker_of(word.start, word.end, turns)
        if runs and runs[-1][0] == speaker:
            run = runs[-1][1]
            if word.start - run[-1].end < MAX_PAUSE_S and word.end - run[0].start <= MAX_SEGMENT_S:
                run.append(word)
                continue
        runs.append((speaker, [word]))
    return runs
