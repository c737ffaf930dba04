"""python -m services.transcriber: job.diarized chunk -> chunk.transcribed."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

import numpy as np

from common.audio import SAMPLE_RATE, pcm16_to_float
from common.broker import Bus, Route, connect, consume
from common.logs import setup_logging
from common.messages import ChunkTranscribed, JobDiarized, TimeSpan
from common.metrics import add_audio_seconds, serve_metrics
from common.runner import run_worker
from common.settings import get_settings
from common.storage import make_client, read_range
from services.transcriber.whisper import detect_language, load_model, transcribe_chunk

log = logging.getLogger("services.transcriber")

# Language per job, detected once on the job's first speech (the same probe in every chunk,
# so replicas agree without talking to each other).
_languages: OrderedDict[int, str | None] = OrderedDict()


def read_pcm(client, bucket: str, key: str, span: TimeSpan) -> np.ndarray:
    start = max(0, int(span.start * SAMPLE_RATE)) * 2
    end = int(span.end * SAMPLE_RATE) * 2
    if end <= start:
        return np.zeros(0, dtype=np.float32)
    return pcm16_to_float(read_range(client, bucket, key, start, end - start))


async def main() -> None:
    settings = get_settings()
    setup_logging(settings.log_level)
    serve_metrics(settings, "transcriber")
    model, _ = await asyncio.to_thread(load_model, settings)
    client = make_client(settings)

    def language_for(message: JobDiarized) -> str | None:
        if message.options.language:
            return message.options.language
        if message.job_id not in _languages:
            probe = [read_pcm(client, message.pcm_bucket, message.pcm_key, s) for s in message.language_probe]
            speech = np.concatenate(probe) if probe else np.zeros(0, dtype=np.float32)
            _languages[message.job_id] = detect_language(model, speech)
            while len(_languages) > 512:
                _languages.popitem(last=False)
        return _languages[message.job_id]

    def work(message: JobDiarized):
        if not message.turns:  # nobody talks in this chunk (a silent recording)
            return [], message.options.language
        language = language_for(message)
        audio = read_pcm(client, message.pcm_bucket, message.pcm_key, message.span)
        return transcribe_chunk(model, audio, message.span.start, message.turns, language,
                                settings.whisper_beam_size)

    async def handle(message: JobDiarized, bus: Bus) -> None:
        log.info("transcribing chunk %d/%d (%.1f-%.1f s, %d turns)", message.chunk_index + 1,
                 message.chunk_count, message.span.start, message.span.end, len(message.turns))
        segments, language = await asyncio.to_thread(work, message)
        add_audio_seconds(message.span.end - message.span.start)
        await bus.publish(ChunkTranscribed(
            message_id=f"chunk.transcribed:{message.job_id}:{message.chunk_index}",
            job_id=message.job_id, chunk_index=message.chunk_index,
            chunk_count=message.chunk_count, language=language, duration=message.duration,
            segments=segments, turns=message.turns, speakers=message.speakers,
        ))
        log.info("chunk %d/%d transcribed: %d segments, language %s",
                 message.chunk_index + 1, message.chunk_count, len(segments), language)

    connection = await connect(settings, "transcriber")
    log.info("transcriber ready")
    await consume(connection, settings, "transcriber", {"job.diarized": Route(JobDiarized, handle)})


if __name__ == "__main__":
    run_worker(main)
