"""The diarizer's handler: job.submitted -> job.progress, then one job.diarized per chunk.

`handle` is what the broker runs (common.broker.consume publishes each message it yields, in
order, and acks once all are confirmed); `chunk_messages` is the part without I/O, which the
benchmarks call too."""

from __future__ import annotations

import asyncio
import logging
import tempfile
import threading
from collections.abc import AsyncIterator, Container
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
from minio import Minio

from common.audio import SAMPLE_RATE, AudioTooLong, UndecodableAudio, decode_audio, float_to_pcm16
from common.broker import PermanentError
from common.messages import Contract, JobDiarized, JobProgress, JobSubmitted, TimeSpan
from common.metrics import add_audio_seconds, nothing_to_do
from common.settings import Settings
from common.storage import download_to, pcm_key, stored_size, upload_bytes
from services.diarizer.offline import Diarization, DiarizationStopped
from services.diarizer.pipeline import DiarizeFn, language_probe, plan_chunks, quietest_instant

log = logging.getLogger(__name__)


@dataclass
class Deps:
    settings: Settings
    storage: Minio
    diarize: DiarizeFn
    # Jobs that ended (common.broker.EndedJobs): a file that takes minutes to diarize is dropped as
    # soon as it is known to be unwanted (failed, cancelled, or done by a delivery before this one).
    ended: Container[int] = ()


def decode(message: JobSubmitted, deps: Deps) -> np.ndarray:
    """The uploaded file as 16 kHz float32: mono, or with multichannel one row per channel.
    Bad input fails the job at once."""
    with tempfile.SpooledTemporaryFile(max_size=32 * 1024 * 1024) as spool:
        download_to(deps.storage, message.audio_bucket, message.audio_key, spool)
        try:
            return decode_audio(spool, max_seconds=deps.settings.max_audio_hours * 3600,
                                separate_channels=message.options.multichannel)
        except (UndecodableAudio, AudioTooLong) as exc:
            raise PermanentError(str(exc)) from exc


def chunk_messages(message: JobSubmitted, duration: float, diarization: Diarization,
                   settings: Settings, channels: list[Diarization] | None = None,
                   waveform: np.ndarray | None = None) -> list[Contract]:
    """job.progress (transcribing, with the chunk count), then the chunks: runs of speaker turns
    cut only in silence or at a hand-over, each carrying its turns and the job's voices. With
    `channels` (multichannel: each channel's own diarization, `diarization` their union), each
    channel is cut on its own and its chunks read that channel's part of the PCM. With the
    `waveform` (a row per channel with `channels`), talk too long for one chunk with no hand-over
    near where it is cut is cut at its quietest instant there (pipeline.plan_chunks)."""
    turns = diarization.turns
    if not turns:
        # Silence is a result, not a failure: one empty chunk carries the job to `done`.
        log.info("no speech in %.1f s of audio", duration)
    # (where in the PCM, diarization) of each channel with speech; all silent: one silent whole.
    per_channel = [(index * duration, channel) for index, channel in enumerate(channels or []) if channel.turns]
    per_channel = per_channel or [(0.0, diarization)]

    def quietest(offset: float):  # where the audio of the channel at `offset` (or the mono file) is quietest
        if waveform is None:
            return None
        if waveform.ndim == 1:
            return quietest_instant(waveform)
        return quietest_instant(waveform[round(offset / duration) if duration else 0])

    chunks = [(offset, span, chunk_turns) for offset, channel in per_channel
              for span, chunk_turns in plan_chunks(channel.turns, duration, settings.chunk_max_speech_s,
                                                   quietest(offset))]
    # The language is heard on the channel that talks most, where it lies in the PCM.
    offset, talker = max(per_channel, key=lambda c: sum(t.end - t.start for t in c[1].turns))
    probe = [TimeSpan(start=s.start + offset, end=s.end + offset) for s in language_probe(talker.turns)]
    log.info("%d turns, %d speakers, %d chunks%s", len(turns), len({t.speaker for t in turns}), len(chunks),
             f", {len(channels)} channels" if channels else "")
    out: list[Contract] = [JobProgress(job_id=message.job_id, stage="transcribing", duration=duration,
                                       chunk_count=len(chunks))]
    for index, (offset, span, chunk_turns) in enumerate(chunks):
        others = [t for o, channel in per_channel if o != offset for t in channel.turns
                  if t.end > span.start and t.start < span.end]
        out.append(JobDiarized(
            message_id=f"job.diarized:{message.job_id}:{index}",
            job_id=message.job_id, chunk_index=index, chunk_count=len(chunks),
            pcm_bucket=settings.audio_bucket, pcm_key=pcm_key(message.job_id), pcm_offset_s=offset,
            duration=duration, span=span, turns=chunk_turns, other_channels=others, language_probe=probe,
            options=message.options, speakers=diarization.speakers,
        ))
    return out


def numbered_across(channels: list[Diarization]) -> list[Diarization]:
    """The channels' diarizations with their speakers numbered on from channel to channel
    (channel 0's spk_0, spk_1, then channel 1's ...), so no two channels share a label."""
    numbered, count = [], 0
    for channel in channels:
        labels: dict[str, str] = {}
        for turn in channel.turns:
            labels.setdefault(turn.speaker, f"spk_{count + len(labels)}")
        count += len(labels)
        numbered.append(Diarization(
            turns=[t.model_copy(update={"speaker": labels[t.speaker]}) for t in channel.turns],
            speakers=[s.model_copy(update={"speaker": labels[s.speaker]}) for s in channel.speakers
                      if s.speaker in labels]))
    return numbered


def all_channels(channels: list[Diarization]) -> Diarization:
    """The job's diarization: every channel's turns, in time order, and every channel's voices."""
    return Diarization(turns=sorted((t for c in channels for t in c.turns), key=lambda t: (t.start, t.end, t.speaker)),
                       speakers=[s for c in channels for s in c.speakers])


async def handle(message: JobSubmitted, deps: Deps) -> AsyncIterator[Contract]:
    yield JobProgress(job_id=message.job_id, stage="diarizing", run_started_at=datetime.now(UTC))
    waveform = await asyncio.to_thread(decode, message, deps)
    if waveform.ndim == 2 and len(waveform) == 1:
        waveform = waveform[0]  # multichannel asked for, one channel given: an ordinary job
    duration = round(waveform.shape[-1] / SAMPLE_RATE, 3)
    log.info("decoded %s: %.1f s%s", message.filename, duration,
             f", {len(waveform)} channels kept apart" if waveform.ndim == 2 else "")
    if message.job_id in deps.ended:
        log.info("the job has ended (done, failed or cancelled) while it was decoded; not diarized")
        nothing_to_do()
        return
    # The stages after this one read their chunk's samples from here (16-bit PCM, ranged GETs;
    # channels one after another). A delivery again (its first run cut off after storing it) finds
    # the same samples there: that copy is the job's, which ingest reads to redact the recording
    # when the job is done, so this run neither writes it again nor removes it. (One of another
    # length is not this recording's: a job of the same id before the database was reset.)
    bucket, pcm = deps.settings.audio_bucket, pcm_key(message.job_id)
    stored_here = await asyncio.to_thread(stored_size, deps.storage, bucket, pcm) != waveform.size * 2
    if stored_here:
        await asyncio.to_thread(upload_bytes, deps.storage, bucket, pcm, float_to_pcm16(waveform.reshape(-1)))
    # Set when this delivery is gone (its channel closed: the broker restarted, or its consumer
    # timeout passed). Cancelling the task does not stop its thread, which would go on diarizing
    # beside the copy the broker delivers again, twice the memory and half the CPU each.
    delivery_gone = threading.Event()

    def ended() -> bool:  # asked by the backend between batches of windows
        return message.job_id in deps.ended or delivery_gone.is_set()

    stopped = False
    try:
        if waveform.ndim == 1:
            diarization = await asyncio.to_thread(deps.diarize, waveform, message.options, ended)
            channels = None
        else:
            channels = numbered_across(
                [await asyncio.to_thread(deps.diarize, channel, message.options, ended) for channel in waveform])
            diarization = all_channels(channels)
    except DiarizationStopped:
        stopped = True
    except asyncio.CancelledError:
        delivery_gone.set()
        raise
    if stopped or ended():
        if stored_here:
            # Stored for the chunks of a job that ended meanwhile: ingest's removal at the job's
            # end (or a delete) may have come before it.
            await asyncio.to_thread(deps.storage.remove_object, bucket, pcm)
        log.info("the job has ended (done, failed or cancelled) while it was diarized; diarizing stopped,"
                 " no chunk sent")
        nothing_to_do()
        return
    add_audio_seconds(waveform.size / SAMPLE_RATE)  # every channel diarized, as the transcriber counts
    for out in chunk_messages(message, duration, diarization, deps.settings, channels, waveform):
        yield out
