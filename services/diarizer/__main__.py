"""python -m services.diarizer: job.submitted -> job.diarized (one message per chunk)."""

from __future__ import annotations

import asyncio
import logging
import tempfile

from common.audio import AudioTooLong, UndecodableAudio, decode_audio, float_to_pcm16
from common.broker import Bus, PermanentError, Route, connect, consume
from common.logs import setup_logging
from common.messages import JobDiarized, JobProgress, JobSubmitted
from common.metrics import add_audio_seconds, serve_metrics
from common.runner import run_worker
from common.settings import get_settings
from common.storage import download_to, make_client, pcm_key, upload_bytes
from services.diarizer.pipeline import language_probe, make_diarizer, plan_chunks

log = logging.getLogger("services.diarizer")


async def main() -> None:
    settings = get_settings()
    setup_logging(settings.log_level)
    serve_metrics(settings, "diarizer")
    diarize, backend = await asyncio.to_thread(make_diarizer, settings)
    log.info("diarization backend: %s", backend)
    client = make_client(settings)

    def decode(message: JobSubmitted):
        with tempfile.SpooledTemporaryFile(max_size=32 * 1024 * 1024) as spool:
            download_to(client, message.audio_bucket, message.audio_key, spool)
            try:
                return decode_audio(spool, max_seconds=settings.max_audio_hours * 3600)
            except (UndecodableAudio, AudioTooLong) as exc:
                raise PermanentError(str(exc)) from exc

    async def handle(message: JobSubmitted, bus: Bus) -> None:
        await bus.publish(JobProgress(job_id=message.job_id, stage="diarizing"))
        waveform = await asyncio.to_thread(decode, message)
        duration = round(waveform.size / 16_000, 3)
        log.info("decoded %s: %.1f s", message.filename, duration)
        add_audio_seconds(duration)
        await asyncio.to_thread(upload_bytes, client, settings.audio_bucket,
                                pcm_key(message.job_id), float_to_pcm16(waveform))
        diarization = await asyncio.to_thread(diarize, waveform, message.options)
        turns = diarization.turns
        if not turns:
            # Silence is a result, not a failure: one empty chunk carries the job to `done`.
            log.info("no speech in %.1f s of audio", duration)
        chunks = plan_chunks(turns, duration, settings.chunk_max_speech_s)
        probe = language_probe(turns)
        speakers = len({t.speaker for t in turns})
        log.info("%d turns, %d speakers, %d chunks", len(turns), speakers, len(chunks))
        await bus.publish(JobProgress(job_id=message.job_id, stage="transcribing",
                                      duration=duration, chunk_count=len(chunks)))
        for index, (span, chunk_turns) in enumerate(chunks):
            await bus.publish(JobDiarized(
                message_id=f"job.diarized:{message.job_id}:{index}",
                job_id=message.job_id, chunk_index=index, chunk_count=len(chunks),
                pcm_bucket=settings.audio_bucket, pcm_key=pcm_key(message.job_id),
                duration=duration, span=span, turns=chunk_turns, language_probe=probe,
                options=message.options, speakers=diarization.speakers,
            ))

    connection = await connect(settings, "diarizer")
    log.info("diarizer ready")
    await consume(connection, settings, "diarizer", {"job.submitted": Route(JobSubmitted, handle)})


if __name__ == "__main__":
    run_worker(main)
