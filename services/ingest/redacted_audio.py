"""A job that asked for redaction keeps no recording of what was redacted: once it is done, its
stored recording is replaced by the decoded audio (a 16 kHz, 16-bit WAV) in which every redacted
word's time is silent (README "Redaction"). The decoded PCM, still stored when the job ends, is
the source: no second decode, read and written a piece at a time."""

from __future__ import annotations

import asyncio
import logging
import tempfile
import wave

import asyncpg
import numpy as np
from minio import Minio
from minio.error import S3Error

from common import jobstore
from common.audio import PCM_BYTES_PER_SECOND, SAMPLE_RATE
from common.logs import job_logged
from common.messages import JobOptions
from common.storage import is_missing, pcm_key, read_range, remove_objects

log = logging.getLogger(__name__)

# Word times are Whisper's estimates: the silence reaches this far past each end.
MARGIN_S = 0.2
# Retry-After of what a done job's recording still to be redacted holds back (playback's 503, a
# correction's or a rerun's 409): this step runs within seconds of the job's end.
REDACTION_RETRY_AFTER_S = 5
# Retry-After of a rerun of a job still processing that asked for redaction.
PROCESSING_RETRY_AFTER_S = 30
PIECE_SAMPLES = 60 * SAMPLE_RATE


def silenced(block: np.ndarray, first_sample: int, spans: list[tuple[float, float]]) -> np.ndarray:
    """`block` (samples x channels, starting at `first_sample`) with the spans' samples zeroed."""
    for start, end in spans:
        a = max(0, round((start - MARGIN_S) * SAMPLE_RATE) - first_sample)
        b = min(len(block), round((end + MARGIN_S) * SAMPLE_RATE) - first_sample)
        if b > a:
            block[a:b] = 0
    return block


def write_redacted(s3: Minio, bucket: str, audio_key: str, pcm: str, channels: int,
                   spans: list[tuple[float, float]], size: int | None = None) -> None:
    """The PCM (`channels` one after another; `size` bytes, asked of the store when not given)
    as an interleaved WAV with `spans` silent, stored over `audio_key`."""
    samples = (s3.stat_object(bucket, pcm).size if size is None else size) // 2 // channels
    with tempfile.TemporaryFile() as spool:
        with wave.open(spool, "wb") as out:
            out.setnchannels(channels)
            out.setsampwidth(2)
            out.setframerate(SAMPLE_RATE)
            for first in range(0, samples, PIECE_SAMPLES):
                count = min(PIECE_SAMPLES, samples - first)
                block = np.stack([np.frombuffer(read_range(s3, bucket, pcm, (channel * samples + first) * 2, count * 2),
                                                dtype="<i2") for channel in range(channels)], axis=1)
                out.writeframes(silenced(block.copy(), first, spans).tobytes())
        length = spool.tell()
        spool.seek(0)
        s3.put_object(bucket, audio_key, spool, length=length, content_type="audio/wav")


async def redact_recording(pool: asyncpg.Pool, s3: Minio, bucket: str, job_id: int) -> None:
    """For a done job marked, as it ended, with its recording still to redact (it asked for
    redaction, or the transcriber's REDACT replaced words of it): its recording rewritten with
    those words silent, once. Called when the job ends, before its PCM is removed. Either way the
    job ends no longer held back as being redacted (audio_redaction_due cleared): redacted, or,
    its decoded audio gone, stored as uploaded."""
    job = await jobstore.job_audio(pool, job_id)
    if job is None:
        return
    if job["audio_removed_at"]:
        if job["audio_key"]:
            # A run stopped between writing its copy and removing it (below) left the copy stored
            # over a recording retention had removed, and marked its objects removed: the retry is
            # the only step that still looks. Already gone is no error.
            with job_logged(job_id):
                await asyncio.to_thread(remove_objects, s3, [(bucket, job["audio_key"])])
                log.info("its recording was removed; any redacted copy written meanwhile is removed too")
        return
    if job["status"] != "done" or job["audio_redacted_at"]:
        return
    options = JobOptions.model_validate(job["options"] or {})
    # The mark set as the job ended is followed, not the words as they are now: corrections are
    # allowed without it, and a label typed in one ("call me at [PHONE]") is no redaction. A job
    # ended before the mark came in (migration 029) that asked for redaction is still redacted.
    if not job["audio_redaction_due"] and not options.redact:
        return
    spans = await jobstore.redacted_word_times(pool, job_id)
    if not spans and not options.redact:
        if job["audio_redaction_due"]:  # nothing to silence: not held back for good
            await jobstore.clear_redaction_due(pool, job_id)
        return
    with job_logged(job_id):
        try:
            size = (await asyncio.to_thread(s3.stat_object, bucket, pcm_key(job_id))).size
        except S3Error as exc:
            if not is_missing(exc):
                raise
            # Nothing can make the redacted copy any more: the job is not held back as being
            # redacted for ever (its recording is played, copied and corrected as uploaded).
            if await jobstore.clear_redaction_due(pool, job_id):
                log.warning("the recording could not be redacted, its decoded audio is gone: it stays as"
                            " uploaded, with what was redacted audible")  # stamped job=N (job_logged)
            return
        per_channel = (job["duration"] or 0) * PCM_BYTES_PER_SECOND
        channels = max(1, round(size / per_channel)) if options.multichannel and per_channel else 1
        await asyncio.to_thread(write_redacted, s3, bucket, job["audio_key"], pcm_key(job_id), channels, spans, size)
        async with pool.acquire() as conn, conn.transaction():
            locked = await jobstore.lock_job(conn, job_id)
            if locked is not None and not locked["audio_removed_at"]:
                await jobstore.mark_audio_redacted(conn, job_id)
        if locked is None or locked["audio_removed_at"]:
            # Deleted, or its recording removed by AUDIO_RETENTION_DAYS, while the recording was
            # rewritten: the rewrite must not outlive either. Removed after the transaction: a
            # store that does not answer must not hold the job's lock and a pooled connection.
            await asyncio.to_thread(remove_objects, s3, [(bucket, job["audio_key"])])
            log.info("%s while its recording was redacted; the redacted copy is removed too",
                     "deleted" if locked is None else "its recording was removed")
            return
        log.info("recording redacted: %d spans silent", len(spans))
