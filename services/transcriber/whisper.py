"""The transcriber's logic: faster-whisper over one chunk of speaker turns.

A chunk is transcribed in one pass with word timestamps, and each word is given to the speaker
whose turn overlaps it most (the WhisperX way): one encoder pass per 30 s of audio instead of one
per turn, and no words lost at turn cuts. Turns may overlap: a segment whose words another
speaker talks over is marked `overlap`.

What Whisper listens to: by default the diarizer's speech regions (padded, laid end to end, as
faster-whisper's own VAD filter does with silero's regions). The segmentation model finds far
more of the quiet far-field speech than silero does, and Whisper never hears long silences,
where it would invent text. `speech="whisper-vad"` uses faster-whisper's VAD filter instead;
bench/accuracy.py prints both."""

from __future__ import annotations

import importlib
import logging
import re
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from faster_whisper import BatchedInferencePipeline, WhisperModel
from faster_whisper.utils import download_model
from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import LocalEntryNotFoundError

from common.audio import SAMPLE_RATE
from common.broker import PermanentError
from common.messages import Segment, SpeakerTurn, TimeSpan, Word
from common.settings import Settings
from common.turns import speech_regions
from services.transcriber.languages import identify, language_spans, passages

log = logging.getLogger(__name__)

# A segment is one speaker's words without a long pause, at most this long (subtitle-sized).
MAX_PAUSE_S = 1.0
MAX_SEGMENT_S = 30.0
# Around each of the diarizer's speech regions Whisper also hears this much (word onsets and
# trailing consonants), and regions closer than REGION_BRIDGE_S are heard as one.
REGION_PAD_S = 0.3
REGION_BRIDGE_S = 1.0
# Where a chunk's speech reaches its cut (a cut inside talk, or in a pause too short for the
# padding), Whisper hears this much past the cut: it times the first word it hears from where the
# audio starts, so with only the padding the first word after the cut had its middle pulled before
# the cut and neither chunk wrote it. With more before it, that stretch falls on a word the chunk
# before owns.
CUT_CONTEXT_S = 2.0
# A word is talked over when another speaker's turn covers this much of it.
OVERLAP_MIN_S = 0.1
# Whisper's window: with WHISPER_BATCH_SIZE, the speech heard is cut into clips of at most this.
CLIP_MAX_S = 30.0
# ...and of at least this: Whisper's time step (one timestamp token, one encoder frame). A shorter
# clip holds no word Whisper could time, and one under a sample long crashes faster-whisper's
# word alignment (a clip of 0 frames).
CLIP_MIN_S = 0.02
# faster-whisper's defaults for a window it takes for silence (no_speech_threshold, log_prob_threshold).
NO_SPEECH_PROB = 0.6
LOW_LOGPROB = -1.0


# WHISPER_COMPUTE_TYPE=auto on CUDA: the first of these the GPU computes efficiently. Before compute
# capability 7 a GPU has no efficient float16 (nor int8_float16), and CTranslate2 refuses to load a
# model in a type the device lacks.
CUDA_COMPUTE_TYPES = ("float16", "int8_float16", "float32")


def auto_compute_type(device: str, supported: set[str]) -> str:
    """The compute type `auto` stands for on `device`, given the types it supports
    (ctranslate2.get_supported_compute_types)."""
    if device != "cuda":
        return "int8"
    return next((kind for kind in CUDA_COMPUTE_TYPES if kind in supported), "float32")


def pick_device(settings: Settings) -> tuple[str, str]:
    import ctranslate2

    device = settings.whisper_device
    if device == "auto":
        device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    return device, compute_type_on(device, settings)


# The compute types CTranslate2 computes on some devices and not on others. The CPU lacking the
# one set (float16 from an .env shared with a CUDA transcriber, with WHISPER_DEVICE=auto on a host
# without a usable GPU) failed every load, and the transcriber restarted without end: the CPU takes
# int8 instead. Any other name (`default`, `float`, a mistake) is CTranslate2's to take or refuse.
DEVICE_COMPUTE_TYPES = ("int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16", "bfloat16",
                        "float32")


def compute_type_on(device: str, settings: Settings) -> str:
    """WHISPER_COMPUTE_TYPE, `auto` made the type it stands for on `device`, and on the CPU one it
    lacks made int8, with a warning. CTranslate2 raises a RuntimeError where it cannot reach CUDA on
    a host without a usable GPU (or driver)."""
    import ctranslate2

    configured = settings.whisper_compute_type
    if configured == "auto":
        return auto_compute_type(device, ctranslate2.get_supported_compute_types(device))
    if device != "cpu" or configured not in DEVICE_COMPUTE_TYPES:
        return configured
    supported = ctranslate2.get_supported_compute_types("cpu")
    if configured in supported:
        return configured
    replacement = "int8" if "int8" in supported else "float32"
    log.warning("WHISPER_COMPUTE_TYPE=%s: CTranslate2 cannot compute it on the CPU (only %s), so the Whisper model"
                " runs on the CPU in %s instead. Set WHISPER_COMPUTE_TYPE=auto (or one of those) where Whisper runs on"
                " the CPU", configured, ", ".join(sorted(supported)), replacement)
    return replacement


class ModelNotLoaded(RuntimeError):
    """WHISPER_MODEL cannot be loaded for another reason than a download that cannot be made: the
    transcriber does not start, rather than serve another model than the one configured."""


def _fetch_failures() -> tuple[type[BaseException], ...]:
    """What a download raises where the Hub cannot be reached: nothing cached (LocalEntryNotFoundError,
    which huggingface_hub raises for a connection it could not make), and what it lets through
    itself: a proxy's refusal, and on huggingface_hub 0.x a TLS failure, as the HTTP client of its
    version raises them (requests on 0.x, httpx on 1.x, httpx2 on 2.x), or as the socket does. Not
    a name the Hub does not know, nor an answer it gives."""
    failures: list[type[BaseException]] = [LocalEntryNotFoundError, ConnectionError, TimeoutError, ssl.SSLError,
                                           socket.gaierror]
    for module, names in (("requests.exceptions", ("ConnectionError", "Timeout")), ("httpx", ("TransportError",)),
                          ("httpx2", ("TransportError",))):
        try:
            client = importlib.import_module(module)
        except ImportError:
            continue
        failures += [getattr(client, name) for name in names if hasattr(client, name)]
    return tuple(failures)


# A fetch that fails for the network (a connection reset partway through large-v3's 3 GB that
# huggingface_hub's own quick resumes do not get past, the Hub down for a moment) is tried again
# after each of these pauses before the bundled model is served, which it then is for the
# transcriber's whole life. Files already fetched are kept; the one broken off starts again.
FETCH_RETRY_DELAYS_S = (5.0, 20.0)


def _model_files(name: str) -> str:
    """The directory of model `name`: itself if it is one, else faster-whisper's download (or the
    Hugging Face cache's copy). One of _fetch_failures() when it is neither cached nor reachable."""
    return name if Path(name).is_dir() else download_model(name)


def _fetched_model_files(name: str) -> str:
    """_model_files, tried again after each of FETCH_RETRY_DELAYS_S where the fetch fails, except
    with HF_HUB_OFFLINE set, where nothing is fetched however often it is tried."""
    for delay in FETCH_RETRY_DELAYS_S:
        try:
            return _model_files(name)
        except _fetch_failures() as exc:
            if hub_constants.HF_HUB_OFFLINE:
                raise
            log.warning("cannot fetch Whisper model %r (%s: %s); trying again in %.0f s", name, type(exc).__name__,
                        str(exc)[:200], delay)
            time.sleep(delay)
    return _model_files(name)


def warm_up(model: WhisperModel) -> None:
    """A second of silence transcribed (one window encoded, one token decoded): CTranslate2 loads
    a GPU's cuBLAS and cuDNN only when it first computes, so a model that loads on a GPU whose
    libraries are missing (`Library libcublas.so.12 is not found or cannot be loaded`) failed at
    every job's first word instead of at start-up."""
    segments, _ = model.transcribe(np.zeros(SAMPLE_RATE, dtype=np.float32), language="en", beam_size=1,
                                   temperature=0.0, condition_on_previous_text=False, without_timestamps=True,
                                   max_new_tokens=1)
    for _ in segments:
        pass


def load_model(settings: Settings) -> tuple[WhisperModel, str]:
    """WHISPER_MODEL (a size name or a model directory); if it cannot be fetched (no network, and
    not in the cache) after FETCH_RETRY_DELAYS_S, the bundled fallback with a warning. Any other
    failure (a name that is no model, a device out of memory, a compute type the GPU lacks, a device
    CTranslate2 cannot reach, a model that loads but cannot transcribe there) is ModelNotLoaded,
    except that with WHISPER_DEVICE=auto a GPU on which it loads but cannot transcribe (its CUDA
    libraries missing) gives way to the CPU, with a warning. On the CPU, a compute type only a GPU
    computes gives way to int8 (compute_type_on). Returns the model and its name."""
    name = settings.whisper_model
    try:
        device, compute_type = pick_device(settings)
    except Exception as exc:
        raise ModelNotLoaded(f"cannot load Whisper model {name!r} on {settings.whisper_device} (WHISPER_DEVICE) with"
                             f" compute type {settings.whisper_compute_type} (WHISPER_COMPUTE_TYPE): {exc}") from exc
    options = {"device": device, "compute_type": compute_type, "cpu_threads": settings.whisper_cpu_threads}
    try:
        path = _fetched_model_files(name)
    except _fetch_failures() as exc:
        fallback = settings.whisper_fallback_model
        if not fallback or fallback == name or not Path(fallback).is_dir():
            raise ModelNotLoaded(f"cannot fetch Whisper model {name!r} (WHISPER_MODEL): {exc}") from exc
        log.warning("cannot fetch Whisper model %r (no network, and not in the cache: %s: %s); serving the bundled"
                    " model at %s instead until the transcriber is restarted: restart it once the Hugging Face Hub"
                    " can be reached to serve %r", name, type(exc).__name__, str(exc)[:200], fallback, name)
        path = name = fallback
    except Exception as exc:
        raise ModelNotLoaded(f"cannot load Whisper model {name!r} (WHISPER_MODEL): {exc}") from exc
    try:
        model = WhisperModel(path, **options)
    except Exception as exc:
        raise ModelNotLoaded(f"cannot load Whisper model {name!r} on {device} with compute type {compute_type}:"
                             f" {exc}") from exc
    try:
        if device == "cuda":  # on the CPU, CTranslate2 loads nothing when it first computes
            warm_up(model)
    except Exception as exc:
        if settings.whisper_device != "auto":
            raise ModelNotLoaded(f"Whisper model {name!r} loads on {device} with compute type {compute_type} but"
                                 f" cannot transcribe there: {exc}") from exc
        del model
        device, compute_type = "cpu", compute_type_on("cpu", settings)
        log.error("Whisper model %r loads on the GPU but cannot transcribe there (%s: %s): WHISPER_DEVICE=auto,"
                  " so it runs on the CPU instead (%s), many times slower. Make CTranslate2's CUDA libraries (cuBLAS"
                  " 12, cuDNN 9) loadable, or set WHISPER_DEVICE=cpu", name, type(exc).__name__, str(exc)[:300],
                  compute_type)
        try:
            model = WhisperModel(path, **{**options, "device": device, "compute_type": compute_type})
        except Exception as cpu_exc:
            raise ModelNotLoaded(f"cannot load Whisper model {name!r} on the GPU ({exc}) nor on the CPU with compute"
                                 f" type {compute_type}: {cpu_exc}") from cpu_exc
    log.info("Whisper model %s on %s (%s)", name, device, compute_type)
    return model, name


def _regions_in_chunk(turns: list[SpeakerTurn], offset: float, length_s: float,
                      keep: TimeSpan | None = None) -> list[TimeSpan]:
    """The padded speech regions, in chunk time; with `keep` (the chunk's own span, job time), a
    first or last region that reaches past its cut reaches CUT_CONTEXT_S past it."""
    spans = []
    for region in speech_regions(turns, REGION_BRIDGE_S + 2 * REGION_PAD_S):
        start = max(0.0, region.start - offset - REGION_PAD_S)
        end = min(length_s, region.end - offset + REGION_PAD_S)
        if end > start:
            spans.append(TimeSpan(start=start, end=end))
    if keep is not None and spans:
        cut_before, cut_after = keep.start - offset, keep.end - offset
        if spans[0].start <= cut_before:
            spans[0] = TimeSpan(start=max(0.0, cut_before - CUT_CONTEXT_S), end=spans[0].end)
        if spans[-1].end >= cut_after:
            spans[-1] = TimeSpan(start=spans[-1].start, end=min(length_s, cut_after + CUT_CONTEXT_S))
    return spans


def heard_spans(turns: list[SpeakerTurn], offset: float, length_s: float, speech: str = "diarizer",
                keep: TimeSpan | None = None) -> list[TimeSpan]:
    """What transcribe_chunk listens to of a chunk `length_s` long starting at `offset` in the
    job, in the chunk's own time: the padded speech regions (with `keep`, the chunk's own span,
    reaching CUT_CONTEXT_S past a cut inside talk), or all of it with `speech="whisper-vad"`."""
    if speech == "whisper-vad":
        return [TimeSpan(start=0.0, end=length_s)]
    return _regions_in_chunk(turns, offset, length_s, keep)


@dataclass
class HeardAudio:
    """A chunk's audio as read: the samples of `spans` (the chunk's time) only, the chunk being
    `length_s` long. A chunk holds at most CHUNK_MAX_SPEECH_S of speech but may span hours of
    silence around it, which is not held (and little of it read: the handler's read_groups)."""
    length_s: float
    spans: list[TimeSpan]
    pieces: list[np.ndarray]

    @classmethod
    def whole(cls, audio: np.ndarray) -> HeardAudio:
        length_s = audio.size / SAMPLE_RATE
        return cls(length_s, [TimeSpan(start=0.0, end=length_s)], [audio])

    def empty(self) -> bool:
        return not any(piece.size for piece in self.pieces)

    def samples(self, start: float, end: float) -> np.ndarray:
        """The samples from `start` to `end` (seconds); silence where nothing was read."""
        first, last = round(start * SAMPLE_RATE), round(end * SAMPLE_RATE)
        out = None
        for span, piece in zip(self.spans, self.pieces):
            at = round(span.start * SAMPLE_RATE)
            if at <= first and last <= at + piece.size:
                return piece[first - at:last - at]
            a, b = max(first, at), min(last, at + piece.size)
            if b > a:
                out = np.zeros(max(0, last - first), dtype=np.float32) if out is None else out
                out[a - first:b - first] = piece[a - at:b - at]
        return out if out is not None else np.zeros(max(0, last - first), dtype=np.float32)


def model_language(model, language: str | None) -> str | None:
    """The language code to give `model` for a job's `language`. Whisper before large-v3 (the
    bundled base, the default medium) has no <|yue|>, and writes Cantonese as Chinese: a job in
    Cantonese is transcribed as zh there (given a code it lacks, faster-whisper decodes with no
    language at all). Any other code the model lacks fails the job, as does any language but
    English on an English-only model (`medium.en`), which would write English whatever was said
    and the job would be labelled (and searched) as the language asked for."""
    if language not in (None, "en") and not getattr(getattr(model, "model", None), "is_multilingual", True):
        raise PermanentError(f"the Whisper model in use transcribes English only, not language {language!r}")
    tokenizer = getattr(model, "hf_tokenizer", None)
    if (language is None or tokenizer is None or not model.model.is_multilingual
            or tokenizer.token_to_id(f"<|{language}|>") is not None):
        return language
    if language == "yue":
        log.info("Cantonese (yue) asked for, which this Whisper model does not know (large-v3 does): transcribed"
                 " as Chinese (zh)")
        return "zh"
    raise PermanentError(f"the Whisper model in use cannot transcribe language {language!r}")


def _heard_times(spans: list[TimeSpan]):
    """Maps a word's (start, end) in the concatenated regions back to the chunk's own time,
    through the region that holds the end of the word, its ends kept inside that region: a word
    Whisper times a little across a junction is not stretched over the silence between. By its
    end, not its middle: Whisper times the first word after a pause from early, often from
    inside the region before (the silence between goes to the word after it), and its end
    where it is; by its middle, a region's first word went to the region before, under that
    region's speaker."""
    lengths = np.array([s.end - s.start for s in spans])
    joined_starts = np.concatenate([[0.0], np.cumsum(lengths)[:-1]])

    def to_chunk(start: float, end: float) -> tuple[float, float]:
        i = max(0, int(np.searchsorted(joined_starts, end, side="left")) - 1)
        first, length = float(joined_starts[i]), float(lengths[i])
        return tuple(spans[i].start + min(max(t - first, 0.0), length) for t in (start, end))

    return to_chunk


# faster-whisper keeps this many of the hotwords' tokens and cuts the rest off unsaid, wherever
# that falls (inside a term, inside a character's bytes): get_prompt keeps max_length // 2 - 1 of
# them, Whisper's 448-token context halved. The job's VOCABULARY_MAX_CHARS is 150 characters, about
# 50 tokens in English, but one token a character and more in Chinese, Hindi or Georgian.
HOTWORDS_MAX_TOKENS = 448 // 2 - 1


def hotwords_that_fit(tokenizer, hotwords: str, max_tokens: int = HOTWORDS_MAX_TOKENS) -> tuple[str, str]:
    """`hotwords` cut after its last whole term (at a comma: ", ", or Chinese and Japanese "，"
    and "、"; at a space only where no term fits whole) that keeps what faster-whisper encodes
    (with a space before) within `max_tokens` of `tokenizer`'s tokens, and the rest."""
    def fits(text: str) -> bool:
        return len(tokenizer.encode(" " + text, add_special_tokens=False).ids) <= max_tokens
    if fits(hotwords):
        return hotwords, ""
    for boundary in (r"\s*[,，、]\s*", r"\s+"):
        for cut in reversed(list(re.finditer(boundary, hotwords))):
            if fits(hotwords[:cut.start()]):
                return hotwords[:cut.start()], hotwords[cut.end():]
    return "", hotwords


def _hotwords(model, vocabulary: list[str] | None) -> str | None:
    """The job's vocabulary as Whisper's hotwords: whole terms only, those past what faster-whisper
    keeps of them left out with a warning (the log line names the job) instead of cut off unsaid."""
    hotwords = ", ".join(vocabulary or [])
    tokenizer = getattr(model, "hf_tokenizer", None)
    if hotwords and tokenizer is not None:
        hotwords, dropped = hotwords_that_fit(tokenizer, hotwords)
        if dropped:
            log.warning("vocabulary is longer than the %d tokens Whisper is told: left out: %s", HOTWORDS_MAX_TOKENS,
                        dropped)
    return hotwords or None


def transcribe_chunk(model: WhisperModel, audio: np.ndarray | HeardAudio, offset: float,
                     turns: list[SpeakerTurn], language: str | None,
                     beam_size: int = 5, speech: str = "diarizer",
                     other_talk: list[SpeakerTurn] | None = None,
                     vocabulary: list[str] | None = None,
                     task: str = "transcribe",
                     among: list[str] | None = None,
                     keep: TimeSpan | None = None,
                     batch_size: int = 0) -> tuple[list[Segment], str | None]:
    """Transcribe `audio` (which starts at `offset` seconds into the job) and split the text
    into speaker-labelled segments. Returns the segments and the language used. `other_talk`
    (other channels' turns) only marks segments talked over; `vocabulary` (names and terms to
    expect) is put before every 30 s window Whisper decodes; `task="translate"` gives English
    text (the language returned is still the one spoken). With `among` (the languages a
    recording switches among), each speaker's passage is transcribed in its own language, the
    segments say which, and the language returned is the one most spoken. With `keep` (job time),
    only the words whose middle falls within it are kept: the audio may reach past the chunk's
    own span on either side (by CUT_CONTEXT_S where its speech reaches a cut: `keep` says where
    the cuts are), and what is there belongs to the chunk next to it. With
    `batch_size` over 1, the speech heard is cut into clips of up to 30 s where regions join or
    in pauses and decoded that many at once (faster-whisper's batched pipeline) instead of one
    window after another. `audio` is the whole chunk, or what was read of it (HeardAudio: at
    least heard_spans)."""
    heard_audio = audio if isinstance(audio, HeardAudio) else HeardAudio.whole(audio)
    if not turns or heard_audio.empty():
        return [], language
    # Whisper's `hotwords`, not its `initial_prompt`: without conditioning on the previous text
    # the initial prompt reaches only the first window.
    options = dict(task=task, beam_size=beam_size, word_timestamps=True,
                   condition_on_previous_text=False, hotwords=_hotwords(model, vocabulary))
    length_s = heard_audio.length_s
    if speech == "whisper-vad":
        pieces, info = model.transcribe(heard_audio.samples(0.0, length_s), vad_filter=True,
                                        language=model_language(model, language), **options)
        words = [_word(w, offset, _as_heard) for piece in pieces for w in (piece.words or [])]
        spoken = [language or info.language] * len(words)
    else:
        if among:
            runs = passages(turns, offset, length_s)
            identify(model, heard_audio.samples, runs, among, fallback=language)
            parts = language_spans(runs, length_s, margin_s=REGION_PAD_S)
        else:
            parts = [(TimeSpan(start=0.0, end=length_s), language)]
        regions = _regions_in_chunk(turns, offset, length_s, keep)
        # Where a batched clip may end besides the regions' joins: between the unbridged regions.
        own_regions = speech_regions(turns) if batch_size > 1 else []
        pauses = [(a.end + b.start) / 2 - offset for a, b in zip(own_regions, own_regions[1:])]
        words, spoken, info = [], [], None
        for part, part_language in parts:
            spans = [TimeSpan(start=max(r.start, part.start), end=min(r.end, part.end))
                     for r in regions if min(r.end, part.end) > max(r.start, part.start)]
            if not spans:
                continue
            heard = np.concatenate([heard_audio.samples(s.start, s.end) for s in spans])
            if batch_size > 1:
                clips = _clips(spans, pauses)
                if not clips:  # under CLIP_MIN_S in all: nothing Whisper could time a word in
                    continue
                pieces, info = BatchedInferencePipeline(model).transcribe(
                    heard, vad_filter=False, clip_timestamps=clips, batch_size=batch_size,
                    language=model_language(model, part_language), **options)
                # The batched pipeline skips no window as silent (nor retries one at a higher
                # temperature): what one window after another would have dropped is dropped here.
                pieces = [p for p in pieces if not (p.no_speech_prob > NO_SPEECH_PROB and p.avg_logprob < LOW_LOGPROB)]
            else:
                pieces, info = model.transcribe(heard, vad_filter=False, language=model_language(model, part_language),
                                                **options)
            to_chunk = _heard_times(spans)
            found = [_word(w, offset, to_chunk) for piece in pieces for w in (piece.words or [])]
            words += found
            spoken += [part_language or info.language] * len(found)
    if keep is not None:
        kept = [keep.start <= (w.start + w.end) / 2 < keep.end for w in words]
        words = [w for w, k in zip(words, kept) if k]
        spoken = [s for s, k in zip(spoken, kept) if k]
    if not words:
        return [], language or (info.language if info else None)
    segments: list[Segment] = []
    everyone = turns + (other_talk or [])
    for speaker, run, run_language in _runs_by_speaker(words, spoken, turns):
        text = "".join(w.word for w in run).strip()
        if text:
            segments.append(Segment(index=len(segments), speaker=speaker, start_ts=run[0].start,
                                    end_ts=run[-1].end, text=text, words=run,
                                    overlap=any(_talked_over(w, speaker, everyone) for w in run),
                                    language=run_language if among else None))
    return segments, _most_spoken(words, spoken)


def _clips(spans: list[TimeSpan], pauses: list[float]) -> list[dict[str, float]]:
    """The spans laid end to end, cut into clips of CLIP_MIN_S to CLIP_MAX_S, in the joined
    audio's seconds: each as long as it can be while it ends where one span ends and the next
    begins, or at one of `pauses` (chunk times between two people's turns or in one's silence)
    inside a span; only talk with no pause for CLIP_MAX_S is cut where the window is full. A
    pause or join less than CLIP_MIN_S from the clip's start or the end of all is no place to cut
    (a language part cut in a pause starts there, give or take a float's rounding). None where
    all of it is shorter than CLIP_MIN_S."""
    joined, bounds = 0.0, []
    for span in spans:
        bounds += [joined + t - span.start for t in pauses if span.start < t < span.end]
        joined += span.end - span.start
        bounds.append(joined)
    clips, start = [], 0.0
    while joined - start >= CLIP_MIN_S:
        fitting = [b for b in bounds if start + CLIP_MIN_S <= b <= start + CLIP_MAX_S
                   and (b >= joined or joined - b >= CLIP_MIN_S)]
        if fitting:
            end = max(fitting)
        elif joined - start <= CLIP_MAX_S:
            end = joined
        else:  # cut where the window is full, unless that leaves too little after it to hear
            end = min(start + CLIP_MAX_S, joined - 2 * CLIP_MIN_S)
        clips.append({"start": start, "end": end})
        start = end
    return clips


def _as_heard(start: float, end: float) -> tuple[float, float]:
    """The chunk's own times, where Whisper heard the chunk whole."""
    return float(start), float(end)


def _word(word, offset: float, to_chunk) -> Word:
    start, end = to_chunk(word.start, word.end)
    return Word(word=word.word, start=round(offset + start, 3), end=round(offset + end, 3),
                probability=round(word.probability, 3))


def _most_spoken(words: list[Word], spoken: list[str | None]) -> str | None:
    seconds: dict[str | None, float] = {}
    for word, language in zip(words, spoken):
        seconds[language] = seconds.get(language, 0.0) + word.end - word.start
    return max(seconds, key=seconds.__getitem__)


def _talked_over(word: Word, speaker: str, turns: list[SpeakerTurn]) -> bool:
    """Whether, inside the word, another speaker's turn runs at the same time as one of its own
    speaker's. Not merely another turn under the word: word times are often a little off the
    turns', and a word across a hand-over is no one talking over anyone."""
    needed = max(1e-3, min(OVERLAP_MIN_S, (word.end - word.start) / 2))
    own = [(max(word.start, t.start), min(word.end, t.end)) for t in turns
           if t.speaker == speaker and min(word.end, t.end) > max(word.start, t.start)]
    # No turn of its own speaker under the word (given by the nearest turn: another channel's
    # talk, or speech the diarizer missed): the word's own time counts.
    own = own or [(word.start, word.end)]
    return any(t.speaker != speaker and min(end, t.end) - max(start, t.start) >= needed
               for t in turns for start, end in own)


def speaker_of(start: float, end: float, turns: list[SpeakerTurn]) -> str:
    """The speaker whose turns overlap [start, end] most, all of one speaker's turns summed (the
    WhisperX way: a word across a short pause of one speaker, with another's short turn in it,
    stays with the one who says most of it); a tie goes to the speaker of the earlier turn. With
    no turn overlapping, the nearest turn's."""
    overlaps: dict[str, float] = {}
    for turn in turns:
        overlap = min(end, turn.end) - max(start, turn.start)
        if overlap > 0:
            overlaps[turn.speaker] = overlaps.get(turn.speaker, 0.0) + overlap
    if overlaps:
        return max(overlaps, key=overlaps.__getitem__)  # the first of equals: the earlier turn's
    middle = (start + end) / 2
    nearest = min(turns, key=lambda t: 0.0 if t.start <= middle <= t.end
                  else min(abs(middle - t.start), abs(middle - t.end)))
    return nearest.speaker


def _runs_by_speaker(words: list[Word], spoken: list[str | None],
                     turns: list[SpeakerTurn]) -> list[tuple[str, list[Word], str | None]]:
    """Consecutive words of one speaker in one language, split where the speaker or the
    language changes, at a pause of MAX_PAUSE_S, or before a segment would exceed MAX_SEGMENT_S."""
    runs: list[tuple[str, list[Word], str | None]] = []
    for word, language in zip(words, spoken):
        speaker = speaker_of(word.start, word.end, turns)
        if runs and runs[-1][0] == speaker and runs[-1][2] == language:
            run = runs[-1][1]
            if word.start - run[-1].end < MAX_PAUSE_S and word.end - run[0].start <= MAX_SEGMENT_S:
                run.append(word)
                continue
        runs.append((speaker, [word], language))
    return runs
