"""Shared pieces of the benchmarks: fixtures and their references, metrics (DER, WER, cpWER),
concatenated test audio, the pipeline's components run in-process, and plain-text tables."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import time
import unicodedata
import wave
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FIXTURES = Path(os.environ.get("STT_FIXTURES", ROOT.parent / "shared" / "fixtures"))
WHISPER_MODEL = ROOT / "models" / "whisper-base"
SAMPLE_RATE = 16_000

# Transcripts given in the fixtures' README (no file of their own).
TEXT_REFERENCES = {
    "jfk.flac": "And so my fellow Americans, ask not what your country can do for you, "
                "ask what you can do for your country.",
}
# Speaker counts known from the README for files without an .rttm.
SPEAKER_COUNTS = {"jfk.flac": 1}
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3")


# ---- references -----------------------------------------------------------------------------

@dataclass
class Utterance:
    speaker: str
    start: float
    end: float
    text: str


@dataclass
class Fixture:
    path: Path
    turns: list[tuple[str, float, float]] | None = None  # reference who-spoke-when (.rttm)
    utterances: list[Utterance] | None = None  # speaker-attributed transcript (.json)
    text: str | None = None  # plain transcript

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def stem(self) -> str:
        return self.path.stem

    @property
    def ref_speakers(self) -> int | None:
        if self.turns is not None:
            return len({t[0] for t in self.turns})
        if self.utterances is not None:
            return len({u.speaker for u in self.utterances})
        return SPEAKER_COUNTS.get(self.name)

    @property
    def has_reference(self) -> bool:
        return self.turns is not None or self.utterances is not None or self.text is not None


def read_rttm(path: Path) -> list[tuple[str, float, float]]:
    turns = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 8 and parts[0] == "SPEAKER":
            start, duration = float(parts[3]), float(parts[4])
            turns.append((parts[7], start, start + duration))
    return sorted(turns, key=lambda t: t[1])


def read_utterances(path: Path) -> list[Utterance]:
    return [Utterance(u["speaker"], float(u["start"]), float(u["end"]), u["text"])
            for u in json.loads(path.read_text())]


def load_fixture(path: Path) -> Fixture:
    fixture = Fixture(path=path)
    rttm, js = path.with_suffix(".rttm"), path.with_suffix(".json")
    if rttm.exists():
        fixture.turns = read_rttm(rttm)
    if js.exists():
        fixture.utterances = read_utterances(js)
        fixture.text = " ".join(u.text for u in sorted(fixture.utterances, key=lambda u: u.start))
    if path.name in TEXT_REFERENCES:
        fixture.text = TEXT_REFERENCES[path.name]
    return fixture


def load_fixtures(directory: Path) -> list[Fixture]:
    if not directory.is_dir():
        raise SystemExit(f"audio fixtures not found at {directory} (pass --fixtures or set STT_FIXTURES)")
    fixtures = [load_fixture(p) for p in sorted(directory.iterdir()) if p.suffix in AUDIO_SUFFIXES]
    return [f for f in fixtures if f.has_reference]


# ---- metrics --------------------------------------------------------------------------------

# Cardinal number words of the fixtures' languages (Russian in every gender of the nominative),
# so that "2 недели" and "две недели", or "25" and "twenty five", score as the same words: Whisper
# writes numbers either way depending on how it cut its decoding windows (word timestamps alone
# change "две" to "2" on ru_dialogue), and WER scoring conventionally normalises numerals.
_UNITS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
    "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19,
    "ноль": 0, "один": 1, "одна": 1, "одно": 1, "два": 2, "две": 2, "три": 3, "четыре": 4, "пять": 5,
    "шесть": 6, "семь": 7, "восемь": 8, "девять": 9, "десять": 10, "одиннадцать": 11, "двенадцать": 12,
    "тринадцать": 13, "четырнадцать": 14, "пятнадцать": 15, "шестнадцать": 16, "семнадцать": 17,
    "восемнадцать": 18, "девятнадцать": 19,
}
_TENS = {
    "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80,
    "ninety": 90, "двадцать": 20, "тридцать": 30, "сорок": 40, "пятьдесят": 50, "шестьдесят": 60,
    "семьдесят": 70, "восемьдесят": 80, "девяносто": 90,
}


def _numerals_as_digits(words: list[str]) -> list[str]:
    out: list[str] = []
    for word in words:
        if word in _TENS:
            out.append(str(_TENS[word]))
        elif word in _UNITS:
            value = _UNITS[word]
            if out and out[-1].isdigit() and int(out[-1]) in _TENS.values() and value < 10:
                out[-1] = str(int(out[-1]) + value)  # "twenty five" -> 25
            else:
                out.append(str(value))
        else:
            out.append(word)
    return out


# Signs Whisper writes where a reference spells the word out ("12%" for "twelve percent"), and the
# word's other forms, made one token, so that neither scores a missing word; a currency sign
# before an amount is said after it ("$5 million": "five million dollars").
_SIGN_WORDS = {"%": "percent", "$": "dollar", "€": "euro", "+": "plus"}
_SAME_WORDS = {
    "процент": "percent", "процента": "percent", "процентов": "percent", "dollars": "dollar",
    "доллар": "dollar", "доллара": "dollar", "долларов": "dollar", "euros": "euro", "евро": "euro",
    "плюс": "plus",
}
_SIGN_BEFORE_AMOUNT = re.compile(r"([$€])\s*(\d[\d.,]*(?:\s+(?:thousand|million|billion|trillion)\b)?)")


def normalize(text: str) -> str:
    """Lowercase, punctuation stripped (any script), whitespace collapsed, number words as digits,
    percent and currency signs as their words."""
    text = unicodedata.normalize("NFKC", text).lower().replace("ё", "е")
    text = re.sub(r"\bper cent\b", "percent", _SIGN_BEFORE_AMOUNT.sub(r"\2 \1", text))
    text = "".join(f" {_SIGN_WORDS[c]} " if c in _SIGN_WORDS
                   else " " if unicodedata.category(c).startswith(("P", "S")) else c for c in text)
    return " ".join(_numerals_as_digits([_SAME_WORDS.get(word, word) for word in text.split()]))


def wer(reference: str, hypothesis: str) -> float:
    import jiwer

    reference, hypothesis = normalize(reference), normalize(hypothesis)
    if not reference:
        return float("nan")
    if not hypothesis:
        return 1.0
    return jiwer.wer(reference, hypothesis)


def cpwer(reference: list[tuple[str, str]], hypothesis: list[tuple[str, str]]) -> float:
    """meeteval's cpWER: (speaker, text) pairs in time order, concatenated per speaker,
    scored after the best speaker mapping."""
    errors, length = cpwer_counts(reference, hypothesis)
    return errors / length if length else float("nan")


def cpwer_counts(reference: list[tuple[str, str]], hypothesis: list[tuple[str, str]]) -> tuple[int, int]:
    """cpWER's errors and reference length."""
    from meeteval.wer.wer.cp import cp_word_error_rate

    def per_speaker(pairs):
        out: dict[str, list[str]] = {}
        for speaker, text in pairs:
            words = normalize(text)
            if words:
                out.setdefault(speaker, []).append(words)
        return {s: " ".join(t) for s, t in out.items()}

    ref, hyp = per_speaker(reference), per_speaker(hypothesis)
    length = sum(len(t.split()) for t in ref.values())
    if not hyp:
        return length, length
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        result = cp_word_error_rate(ref, hyp)
    return int(result.errors), int(result.length)


def der_parts(reference: list[tuple[str, float, float]], hypothesis: list[tuple[str, float, float]],
              collar: float) -> dict[str, float]:
    """pyannote.metrics DER's parts in seconds: missed, false alarm, confusion and the scored
    reference total; overlap scored; `collar` is the total width (0.5 = +-0.25 s)."""
    import warnings

    from pyannote.core import Annotation, Segment
    from pyannote.metrics.diarization import DiarizationErrorRate

    def annotation(turns):
        a = Annotation()
        for i, (speaker, start, end) in enumerate(turns):
            if end > start:
                a[Segment(start, end), i] = speaker
        return a

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        details = DiarizationErrorRate(collar=collar, skip_overlap=False)(
            annotation(reference), annotation(hypothesis), detailed=True)
    return {"missed": details["missed detection"], "false_alarm": details["false alarm"],
            "confusion": details["confusion"], "total": details["total"]}


def der_counts(reference: list[tuple[str, float, float]], hypothesis: list[tuple[str, float, float]],
               collar: float) -> tuple[float, float]:
    """pyannote.metrics DER as (error seconds, reference seconds), overlap scored; `collar` is
    the total width (0.5 = +-0.25 s). Pool files by summing both."""
    return der_error(der_parts(reference, hypothesis, collar))


def der_error(parts: dict[str, float]) -> tuple[float, float]:
    """(error seconds, reference seconds) from `der_parts`' result."""
    return parts["missed"] + parts["false_alarm"] + parts["confusion"], parts["total"]


def missed_speech(reference: list[tuple[str, float, float]], hypothesis: list[tuple[str, float, float]],
                  frame_s: float = 0.01) -> dict[str, float]:
    """Where the reference's speaker time goes unheard, in seconds (no collar): under frames
    where the hypothesis has nobody talking (`silence`), or where it has fewer people than the
    reference (`overlap`); and `beyond_two`, the reference's speaker time beyond two people at
    once, which a model of at most two simultaneous speakers cannot give."""
    end = max([e for _, _, e in reference + hypothesis], default=0.0)
    frames = int(np.ceil(end / frame_s)) + 1

    def count(turns):
        c = np.zeros(frames, dtype=np.int64)
        for _, start, stop in turns:
            c[int(round(start / frame_s)):int(round(stop / frame_s))] += 1
        return c

    ref, hyp = count(reference), count(hypothesis)
    return {"silence": float(ref[hyp == 0].sum()) * frame_s,
            "overlap": float(np.clip(ref - hyp, 0, None)[hyp > 0].sum()) * frame_s,
            "beyond_two": float(np.clip(ref - 2, 0, None).sum()) * frame_s}


def pooled_rate(counts) -> float:
    """Total error / total reference over (error seconds, reference seconds) pairs; 0.0 when
    there is no reference."""
    counts = list(counts)
    total = sum(t for _, t in counts)
    return sum(e for e, _ in counts) / total if total else 0.0


def der(reference: list[tuple[str, float, float]], hypothesis: list[tuple[str, float, float]],
        collar: float) -> float:
    """pyannote.metrics DER of one file; `collar` is the total width (0.5 = +-0.25 s)."""
    return pooled_rate([der_counts(reference, hypothesis, collar)])


# ---- audio ----------------------------------------------------------------------------------

def write_wav(path: Path, audio: np.ndarray) -> None:
    pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())


@dataclass
class Concatenated:
    """Fixtures laid end to end with silence between them, and their references offset."""

    audio: np.ndarray
    turns: list[tuple[str, float, float]] = field(default_factory=list)
    utterances: list[Utterance] = field(default_factory=list)
    text_regions: list[tuple[float, float]] = field(default_factory=list)  # where utterances cover all speech
    pieces: list[tuple[str, float, float]] = field(default_factory=list)

    @property
    def duration(self) -> float:
        return self.audio.size / SAMPLE_RATE


def concatenate(fixtures: list[Fixture], seconds: float, gap_s: float = 1.0) -> Concatenated:
    """Cycle through `fixtures` until at least `seconds` of audio. Speakers are labelled
    `<file>:<speaker>` (a repeated file is the same people again)."""
    from common.audio import decode_audio

    decoded = {f.name: decode_audio(str(f.path)) for f in fixtures}
    gap = np.zeros(int(gap_s * SAMPLE_RATE), dtype=np.float32)
    parts: list[np.ndarray] = []
    out = Concatenated(audio=np.zeros(0, dtype=np.float32))
    t = 0.0
    while t < seconds:
        for f in fixtures:
            audio = decoded[f.name]
            length = audio.size / SAMPLE_RATE
            parts += [audio, gap]
            out.pieces.append((f.name, t, t + length))
            for speaker, start, end in f.turns or []:
                out.turns.append((f"{f.stem}:{speaker}", t + start, t + end))
            if f.utterances is not None:
                for u in f.utterances:
                    out.utterances.append(Utterance(f"{f.stem}:{u.speaker}", t + u.start, t + u.end, u.text))
                out.text_regions.append((t, t + length))
            elif f.text is not None and f.ref_speakers == 1:
                out.utterances.append(Utterance(f"{f.stem}:A", t, t + length, f.text))
                out.text_regions.append((t, t + length))
                if f.turns is None:
                    out.turns.append((f"{f.stem}:A", t, t + length))
            t += length + gap_s
            if t >= seconds:
                break
    out.audio = np.concatenate(parts)
    return out


def cpwer_in_regions(concat: Concatenated, segments: list[tuple[str, float, float, str]]) -> float | None:
    """cpWER over the parts of a concatenated file that have a speaker-attributed transcript;
    hypothesis segments count where their middle falls in such a part."""
    if not concat.utterances:
        return None

    def inside(start, end):
        middle = (start + end) / 2
        return any(a <= middle <= b for a, b in concat.text_regions)

    reference = [(u.speaker, u.text) for u in sorted(concat.utterances, key=lambda u: u.start)]
    hypothesis = [(s, text) for s, start, end, text in sorted(segments, key=lambda x: x[1])
                  if inside(start, end)]
    return cpwer(reference, hypothesis)


def cpwer_by_piece(concat: Concatenated, segments: list[tuple[str, float, float, str]]) -> dict[str, float]:
    """cpWER computed piece by piece (each fixture copy on its own, so the speaker mapping is
    per piece), errors and lengths summed per fixture and over all ("all")."""
    counts: dict[str, list[int]] = {}
    for name, start, end in concat.pieces:
        if not any(a == start for a, _ in concat.text_regions):
            continue
        reference = [(u.speaker, u.text) for u in sorted(concat.utterances, key=lambda u: u.start)
                     if start <= u.start < end]
        hypothesis = [(s, text) for s, a, b, text in sorted(segments, key=lambda x: x[1])
                      if start <= (a + b) / 2 <= end]
        errors, length = cpwer_counts(reference, hypothesis)
        for key in (Path(name).stem, "all"):
            c = counts.setdefault(key, [0, 0])
            c[0] += errors
            c[1] += length
    return {k: e / n for k, (e, n) in counts.items() if n}


# ---- the pipeline's components in-process ---------------------------------------------------

def bench_settings(**overrides):
    """The product's defaults, the benchmarks' few choices and `overrides`, as the stack they
    compare against runs with: nothing from a .env or from this shell's environment."""
    from devstack import settings_of

    values = {"diarization_backend": "offline", "hf_token": None,
              "whisper_model": str(WHISPER_MODEL), "log_level": "WARNING"}
    values.update(overrides)
    return settings_of(values)


def quiet_logs() -> None:
    import warnings

    warnings.filterwarnings("ignore", message=".*'uem' was approximated.*")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("preprocess").setLevel(logging.ERROR)  # meeteval's "Assuming sort=False"
    for name in ("faster_whisper", "services", "common", "sentence_transformers", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)


@dataclass
class PipelineResult:
    duration: float
    turns: list  # SpeakerTurn
    segments: list  # Segment
    language: str | None
    timings: dict[str, float]

    @property
    def speakers(self) -> int:
        return len({t.speaker for t in self.turns})

    def turn_tuples(self) -> list[tuple[str, float, float]]:
        return [(t.speaker, t.start, t.end) for t in self.turns]

    def segment_tuples(self) -> list[tuple[str, float, float, str]]:
        return [(s.speaker, s.start_ts, s.end_ts, s.text) for s in self.segments]


def run_pipeline(waveform: np.ndarray, diarize, model, settings, options=None,
                 speech: str = "diarizer", diarization=None) -> PipelineResult:
    """What the diarizer and transcriber handlers do for one job, in one process and with the
    PCM in memory instead of the object store: the diarizer's chunk messages
    (services.diarizer.handler.chunk_messages), then the transcriber's work on each
    (services.transcriber.handler.transcribe). `speech` chooses what Whisper hears; a
    `diarization` already made is reused; `options` are the job's (JobOptions)."""
    from common.audio import float_to_pcm16, pcm16_to_float
    from common.messages import JobDiarized, JobOptions, JobSubmitted
    from services.diarizer.handler import chunk_messages
    from services.transcriber import handler as transcriber

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    duration = round(waveform.size / SAMPLE_RATE, 3)
    pcm = pcm16_to_float(float_to_pcm16(waveform))  # what the transcriber reads: 16-bit samples
    options = options or JobOptions()
    if diarization is None:
        diarization = diarize(waveform, options)
    timings["diarize"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    job = JobSubmitted(job_id=1, audio_bucket="memory", audio_key="memory", filename="memory", options=options)
    chunks = [m for m in chunk_messages(job, duration, diarization, settings) if isinstance(m, JobDiarized)]

    def read_pcm(_bucket, _key, span):
        return pcm[max(0, int(span.start * SAMPLE_RATE)):int(span.end * SAMPLE_RATE)]

    deps = transcriber.Deps(model=model, read_pcm=read_pcm, beam_size=settings.whisper_beam_size,
                            batch_size=settings.whisper_batch_size)
    segments, language = [], options.language
    for chunk in chunks:
        transcribed = transcriber.transcribe(chunk, deps, speech)
        segments += transcribed.segments
        language = transcribed.language or language
    timings["transcribe"] = time.perf_counter() - t1
    return PipelineResult(duration, diarization.turns, segments, language, timings)


def load_components(settings):
    from services.diarizer.pipeline import make_diarizer
    from services.transcriber.whisper import load_model

    diarize, backend = make_diarizer(settings)
    model, _ = load_model(settings)
    return diarize, backend, model


def usable_cpus() -> int | None:
    """The CPUs this process may run on (a taskset or container's cpuset narrows them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def machine(settings, model) -> dict:
    """Where a run is measured: the CPUs it may use and the devices the diarizer (as
    make_diarizer picks it) and the loaded Whisper model run on."""
    from services.diarizer.pipeline import pick_device

    return {"cpus": usable_cpus(), "diarizer_device": pick_device(settings.diarizer_device),
            "whisper_device": getattr(getattr(model, "model", None), "device", None)}


def warm_up(diarize, model, settings, waveform: np.ndarray) -> None:
    """One untimed pass of every model over the first 20 s of `waveform`, so that no timed run
    pays for what a service does before it is ready (loading the embedding model, the first
    inference's allocations): the stack's services are measured warm."""
    from common.messages import JobOptions
    from services.embedder.backends import local_embedder
    from services.transcriber.whisper import transcribe_chunk

    piece = waveform[:20 * 16_000]
    turns = diarize(piece, JobOptions()).turns
    segments, _ = transcribe_chunk(model, piece, 0.0, turns, None, settings.whisper_beam_size)
    local_embedder(settings)([s.text for s in segments] or ["warm-up"])


# ---- output ---------------------------------------------------------------------------------

def fmt(value, kind: str = "pct") -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    if kind == "pct":
        return f"{100 * value:.1f}"
    if kind == "s":
        return f"{value:.1f}"
    if kind == "x":
        return f"{value:.2f}"
    return str(value)


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def at_most(value: float | None, bound: float | None) -> bool | None:
    """value <= bound; None (n/a) when either is unknown."""
    return None if value is None or bound is None else value <= bound


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("MET" if ok else "NOT MET")
