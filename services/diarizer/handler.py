"""The diarizer's handler: job.submitted -> job.progress, then one job.diarized per chunk.

`handle` is what the broker runs (common.broker.consume publishes each message it yields, in
order, and acks once all are confirmed); `chunk_messages` is the part without I/O, which the
benchmarks call too."""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
from minio import Minio

from common.audio import SAMPLE_RATE, AudioTooLong, UndecodableAudio, decode_audio, float_to_pcm16
from common.broker import PermanentError
from common.messages import Contract, JobDiarized, JobProgress, JobSubmitted
from common.metrics import add_audio_seconds
from common.settings import Settings
from common.storage import download_to, pcm_key, upload_bytes
from services.diarizer.offline import Diarization
from services.diarizer.pipeline import DiarizeFn, language_probe, plan_chunks

log = logging.getLogger(__name__)


@dataclass
class Deps:
    settings: Settings
    storage: Minio
    diarize: DiarizeFn


def decode(message: JobSubmitted, deps: Deps) -> np.ndarray:
    """The uploaded file as 16 kHz mono float32; bad input fails the job at once."""
    with tempfile.SpooledTemporaryFile(max_size=32 * 1024 * 1024) as spool:
        download_to(deps.storage, message.audio_bucket, message.audio_key, spool)
        try:
            return decode_audio(spool, max_seconds=deps.settings.max_audio_hours * 3600)
        except (UndecodableAudio, AudioTooLong) as exc:
            raise PermanentError(str(exc)) from exc


def chunk_messages(message: JobSubmitted, duration: float, diarization: Diarization,
                   settings: Settings) -> list[Contract]:
    """job.progress (transcribing, with the chunk count), then the chunks: runs of speaker turns
    cut only in silence or at a hand-over, each carrying its turns and the job's voices."""
    turns = diarization.turns
    if not turns:
        # Silence is a result, not a failure: one empty chunk carries the job to `done`.
        log.info("no speech in %.1f s of audio", duration)
    chunks = plan_chunks(turns, duration, settings.chunk_max_speech_s)
    probe = language_probe(turns)
    log.info("%d turns, %d speakers, %d chunks", len(turns), len({t.speaker for t in turns}), len(chunks))
    out: list[Contract] = [JobProgress(job_id=message.job_id, stage="transcribing", duration=duration,
                                       chunk_count=len(chunks))]
    for index, (span, chunk_turns) in enumerate(chunks):
        out.append(JobDiarized(
            message_id=f"job.diarized:{message.job_id}:{index}",
            job_id=message.job_id, chunk_index=index, chunk_count=len(chunks),
            pcm_bucket=settings.audio_bucket, pcm_key=pcm_key(message.job_id),
            duration=duration, span=span, turns=chunk_turns, language_probe=probe,
            options=message.options, speakers=diarization.speakers,
        ))
    return out


async def handle(message: JobSubmitted, deps: Deps) -> AsyncIterator[Contract]:
    yield JobProgress(job_id=message.job_id, stage="diarizing")
    waveform = await asyncio.to_thread(decode, message, deps)
    duration = round(waveform.size / SAMPLE_RATE, 3)
    log.info("decoded %s: %.1f s", message.filename, duration)
    add_audio_seconds(duration)
    # The stages after this one read their chunk's samples from here (16-bit PCM, ranged GETs).
    await asyncio.to_thread(upload_bytes, deps.storage, deps.settings.audio_bucket,
                            pcm_key(message.job_id), float_to_pcm16(waveform))
    diarization = await asyncio.to_thread(deps.diarize, waveform, message.options)
    for out in chunk_messages(message, duration, diarization, deps.settings):
        yield out
