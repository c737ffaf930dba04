"""The transcriber's handler: one job.diarized chunk -> chunk.transcribed.

`transcribe` is the work without the broker (the benchmarks call it with PCM read from memory);
`handle` is what the broker runs."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import numpy as np
from minio.error import S3Error

from common.audio import SAMPLE_RATE, pcm16_to_float
from common.broker import PermanentError
from common.messages import ChunkTranscribed, Contract, JobDiarized, TimeSpan, language_choices
from common.metrics import add_audio_seconds
from common.recent import Recent
from common.storage import is_missing, read_range
from services.transcriber.languages import detect_language
from services.transcriber.redaction import redact
from services.transcriber.spelling import respell
from services.transcriber.whisper import CUT_CONTEXT_S, HeardAudio, heard_spans, transcribe_chunk

log = logging.getLogger(__name__)

# (bucket, key, span) -> the samples of that span: 16-bit as stored (pcm_reader), or float32 in
# [-1, 1] (the benchmarks and tests read from memory).
ReadPcm = Callable[[str, str, TimeSpan], np.ndarray]
LANGUAGES_KEPT = 512
# Speech regions of a chunk less than READ_BRIDGE_S apart are read in one ranged GET: a little
# silence between them is cheap to read, a GET for each region of a chatty chunk (dozens) is not.
# One GET takes at most READ_MAX_BRIDGED_S of silence in all (3.8 MB): sparse talk (a few seconds
# every 20 s, over half an hour) would otherwise be fetched whole. Only the speech is kept.
READ_BRIDGE_S = 30.0
READ_MAX_BRIDGED_S = 120.0


@dataclass
class Deps:
    model: object  # faster_whisper.WhisperModel
    read_pcm: ReadPcm
    beam_size: int = 5
    # Windows decoded at once (WHISPER_BATCH_SIZE); 0 or 1: one after another.
    batch_size: int = 0
    # Redacted in every job, besides what each job asks for (the REDACT setting).
    redact: list[str] = field(default_factory=list)
    # Language per job, detected once on the job's first speech (the same probe in every chunk,
    # so replicas agree without talking to each other).
    languages: Recent[int, str | None] = field(default_factory=lambda: Recent(LANGUAGES_KEPT))


def pcm_reader(client) -> ReadPcm:
    """Spans of the diarizer's 16-bit PCM in the object store, by ranged GET. PCM that is not
    there fails the job at once: it is removed when the job ends (cancelled, deleted, or failed
    meanwhile), and no retry brings it back."""
    def read(bucket: str, key: str, span: TimeSpan) -> np.ndarray:
        start, end = _sample(span.start) * 2, _sample(span.end) * 2
        if end <= start:
            return np.zeros(0, dtype="<i2")
        try:
            return np.frombuffer(read_range(client, bucket, key, start, end - start), dtype="<i2")
        except S3Error as exc:
            if is_missing(exc):
                raise PermanentError("the job's decoded audio is gone") from exc
            raise
    return read


def _sample(t: float) -> int:
    """The PCM's sample at `t` seconds, as pcm_reader counts."""
    return max(0, int(t * SAMPLE_RATE))


def _as_float(samples: np.ndarray) -> np.ndarray:
    return samples if samples.dtype == np.float32 else pcm16_to_float(samples)


def read_groups(spans: list[TimeSpan]) -> list[range]:
    """Which of `spans` (in order) are read together, one GET for each group: the next span
    joins the group while the silence before it is under READ_BRIDGE_S and the group's silence
    stays within READ_MAX_BRIDGED_S."""
    groups: list[range] = []
    first, bridged = 0, 0.0
    for i in range(1, len(spans)):
        gap = max(0.0, spans[i].start - spans[i - 1].end)
        if gap < READ_BRIDGE_S and bridged + gap <= READ_MAX_BRIDGED_S:
            bridged += gap
        else:
            groups.append(range(first, i))
            first, bridged = i, 0.0
    if spans:
        groups.append(range(first, len(spans)))
    return groups


def _read_heard(message: JobDiarized, deps: Deps, at: float, spans: list[TimeSpan]) -> list[np.ndarray]:
    """The float32 samples of each of `spans` (the chunk's time; the chunk is `at` s into the
    PCM), as reading each alone gives them, each in an array of its own: the silence read
    between spans of one GET (read_groups) is dropped with the GET's bytes, never converted."""
    pieces: list[np.ndarray] = []
    for group in read_groups(spans):
        read = TimeSpan(start=at + spans[group[0]].start, end=at + spans[group[-1]].end)
        samples, read_from = deps.read_pcm(message.pcm_bucket, message.pcm_key, read), _sample(read.start)
        for span in (spans[i] for i in group):
            a, b = _sample(at + span.start) - read_from, _sample(at + span.end) - read_from
            piece = samples[a:max(a, b)]
            if piece.dtype == np.float32 and piece.size < samples.size:
                piece = piece.copy()
            pieces.append(_as_float(piece))
    return pieces


def language_for(message: JobDiarized, deps: Deps) -> str | None:
    """The job's language: the one asked for, else detected on the job's first speech (among
    the languages asked for, when the recording switches among several)."""
    among = language_choices(message.options.language)
    if message.options.language and among is None:
        return message.options.language
    if message.job_id not in deps.languages:
        probe = [_as_float(deps.read_pcm(message.pcm_bucket, message.pcm_key, s)) for s in message.language_probe]
        speech = np.concatenate(probe) if probe else np.zeros(0, dtype=np.float32)
        language = detect_language(deps.model, speech, among)
        deps.languages[message.job_id] = language
        log.info("detected language %s on %.1f s of speech", language, speech.size / SAMPLE_RATE)
    return deps.languages.peek(message.job_id)


class TranscriptionStopped(Exception):
    """The chunk's delivery is gone: its transcription stopped between two Whisper segments."""


class _Stoppable:
    """The Whisper model, for one chunk: once `stop` is set, asking it for the next segment (or,
    batched, the next batch) raises TranscriptionStopped. faster-whisper decodes a window only
    when its segments are asked for."""

    def __init__(self, model, stop: threading.Event) -> None:
        self._model, self._stop = model, stop

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def _check(self) -> None:
        if self._stop.is_set():
            raise TranscriptionStopped

    def transcribe(self, *args, **kwargs):
        segments, info = self._model.transcribe(*args, **kwargs)

        def until_stopped():
            for segment in segments:
                yield segment
                self._check()

        return until_stopped(), info

    def get_prompt(self, *args, **kwargs):  # what BatchedInferencePipeline asks before each batch
        self._check()
        return self._model.get_prompt(*args, **kwargs)


def transcribe(message: JobDiarized, deps: Deps, speech: str = "diarizer",
               stop: threading.Event | None = None) -> ChunkTranscribed:
    """Whisper over the chunk, each word given to the speaker most active under it, spelled as
    the job asked and with what it asked to have redacted replaced. Once `stop` is set, it
    raises TranscriptionStopped at the next Whisper segment."""
    among = language_choices(message.options.language)
    if message.turns:
        offset = message.pcm_offset_s  # the chunk's channel, with multichannel
        # Some of the audio on either side too: a chunk may be cut inside talk, or where one
        # person hands over to the next with hardly a pause, and the word there must be heard
        # whole, with enough before it that Whisper times it right (heard_spans: CUT_CONTEXT_S).
        # Words are kept by where their middle falls (transcribe_chunk's `keep`), so none is
        # written twice.
        heard = TimeSpan(start=max(0.0, message.span.start - CUT_CONTEXT_S),
                         end=min(message.duration, message.span.end + CUT_CONTEXT_S))
        # Only what Whisper hears is read: a chunk holds at most CHUNK_MAX_SPEECH_S of speech, but
        # from cut to cut it may span hours of silence (hundreds of MB of PCM). Regions close
        # together are read at once (read_groups).
        length_s = heard.end - heard.start
        spans = heard_spans(message.turns, heard.start, length_s, speech, keep=message.span)
        audio = HeardAudio(length_s, spans, _read_heard(message, deps, heard.start + offset, spans))
        model = deps.model if stop is None else _Stoppable(deps.model, stop)
        segments, language = transcribe_chunk(model, audio, heard.start, message.turns,
                                              language_for(message, deps), deps.beam_size, speech,
                                              other_talk=message.other_channels,
                                              vocabulary=message.options.vocabulary, task=message.options.task,
                                              among=among, keep=message.span, batch_size=deps.batch_size)
        segments = redact(respell(segments, message.options.spelling), [*message.options.redact, *deps.redact])
    else:  # nobody talks in this chunk (a silent recording)
        segments, language = [], None if among else message.options.language
    return ChunkTranscribed(
        message_id=f"chunk.transcribed:{message.job_id}:{message.chunk_index}",
        job_id=message.job_id, chunk_index=message.chunk_index,
        chunk_count=message.chunk_count, language=language, duration=message.duration,
        text_language="en" if message.options.task == "translate" else None, segments=segments,
        turns=message.turns, speakers=message.speakers,
    )


async def handle(message: JobDiarized, deps: Deps) -> AsyncIterator[Contract]:
    log.info("transcribing chunk %d/%d (%.1f-%.1f s, %d turns)", message.chunk_index + 1,
             message.chunk_count, message.span.start, message.span.end, len(message.turns))
    # Set when this delivery is gone (its channel closed: the broker restarted, or its consumer
    # timeout passed). Cancelling the task does not stop its thread, which would go on
    # transcribing while the copy the broker delivers again waits behind it.
    delivery_gone = threading.Event()
    try:
        transcribed = await asyncio.to_thread(transcribe, message, deps, stop=delivery_gone)
    except asyncio.CancelledError:
        delivery_gone.set()
        raise
    add_audio_seconds(message.span.end - message.span.start)
    log.info("chunk %d/%d transcribed: %d segments, language %s", message.chunk_index + 1,
             message.chunk_count, len(transcribed.segments), transcribed.language)
    yield transcribed
