"""The persister's handlers: every state change of a job after submission, and the events that
announce them. Each handler is one transaction, idempotent under redelivery; events go to the
outbox table in that same transaction and are published after commit (common.outbox)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import asyncpg
from pydantic import BaseModel

from common import jobstore, searchstore, speakerstore
from common.db import DATABASE_UNAVAILABLE
from common.logs import job_logged
from common.messages import (
    ChunkEmbedded,
    ChunkTranscribed,
    JobFailed,
    JobProgress,
    SegmentCreated,
)
from common.metrics import nothing_to_do
from common.outbox import add_to_outbox
from common.recent import Recent
from common.settings import get_settings

log = logging.getLogger(__name__)

# A failed job's failure is announced again at a late chunk at most this often by one persister:
# the chunks in flight as a job is cancelled (in every transcriber and embedder) all come late, and
# each would send the same transcript.failed again, which ingest acts on again (a bucket drop's
# results rewritten) and every subscriber gets. Once tells a stage that missed it.
FAILURE_ANNOUNCED_AGAIN_EVERY_S = 60.0
FAILURES_ANNOUNCED_AGAIN_KEPT = 10_000
_failures_announced_again: Recent[int, float] = Recent(FAILURES_ANNOUNCED_AGAIN_KEPT)

# How long a handler waits for a lock another transaction holds (an operator's open psql session
# on a job's row) before it gives up, hands its connection back to the pool, and the message is
# held and tried again (LockNotAvailableError, services.persister.__main__). Waited for up to
# DATABASE_COMMAND_TIMEOUT_S (300 s) instead, the messages of the locked job took every pooled
# connection, and the stall reaper's heartbeat, late behind them, recorded gaps in which no
# stalled job anywhere was failed while the lock lasted. Long enough that the persister's own
# handlers queued on one job's row (a burst of a long job's chunks, each a short transaction) never
# reach it.
LOCK_WAIT_S = 30.0


@contextlib.asynccontextmanager
async def _transaction(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection in a transaction whose every lock wait is bounded by LOCK_WAIT_S."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{int(LOCK_WAIT_S * 1000)}ms'")
        yield conn


def _failure_due_again(job_id: int) -> bool:
    """Whether a late chunk of this failed job should announce the failure again (and, if so,
    counted as announced now: the other late chunks of the job wait for the row lock its
    transaction holds, and find it counted; _failure_counted_once_committed takes it back if that
    transaction does not commit)."""
    now = time.monotonic()
    last = _failures_announced_again.peek(job_id)
    if last is not None and now - last < FAILURE_ANNOUNCED_AGAIN_EVERY_S:
        return False
    _failures_announced_again[job_id] = now
    return True


@contextlib.asynccontextmanager
async def _failure_counted_once_committed(job_id: int) -> AsyncIterator[None]:
    """Around a chunk's transaction: a failure announced again in it (_failure_due_again) stays
    counted only if the transaction commits. Kept when it was rolled back instead (an error at
    commit, a lost connection), the message's next try found the failure announced, ignored the
    chunk, and queued nothing: the stage that never heard of the failure was not told."""
    before = _failures_announced_again.peek(job_id)
    try:
        yield
    except BaseException:
        if _failures_announced_again.peek(job_id) != before:
            if before is None:
                _failures_announced_again.pop(job_id)
            else:
                _failures_announced_again[job_id] = before
        raise


class DeadLetter(BaseModel):
    """Any message the broker dead-lettered; only its job matters here."""

    job_id: int


async def _nothing_to_store(conn: asyncpg.Connection, job_id: int, row: asyncpg.Record | None) -> bool:
    """A chunk of a job that has ended (`row`) or is gone (None) is counted as skipped. One of a
    job that failed (or was cancelled) or was deleted comes from a stage that never heard so (a
    replica started after the announcement), and that works on through the job's other chunks:
    the failure or the deletion is announced again (the same event), so that the stages stop
    working on the job (a failure at most every FAILURE_ANNOUNCED_AGAIN_EVERY_S: the chunks in
    flight as it failed all come late). True when it was (events enqueued). A done job's is a copy delivered
    again (every chunk was stored): no stage has work of that job left to be told to stop."""
    nothing_to_do()
    if row is not None:
        if row["status"] == "error" and _failure_due_again(job_id) and await jobstore.announce_end_again(conn, job_id):
            log.info("message for a job that already failed ignored; its failure is announced again")
            return True
        log.info("job already %s; late message ignored", row["status"])
        return False
    if await jobstore.announce_deletion_again(conn, job_id):
        log.info("message for a deleted job ignored; its deletion is announced again")
        return True
    log.warning("message for unknown job; ignored")
    return False


async def _store_chunk(conn: asyncpg.Connection, job: asyncpg.Record, message: ChunkTranscribed | ChunkEmbedded,
                       embedding_model: str | None) -> bool:
    """The chunk's segments, turns and speakers (named when their voices are enrolled), and the
    job's stage and facts; True when names were announced (events enqueued)."""
    job_id = message.job_id
    await jobstore.record_chunk(conn, job_id, message.chunk_index, len(message.segments),
                                embedded=embedding_model is not None)
    await jobstore.store_segments(conn, job_id, message.chunk_index, message.segments, message.language,
                                  embedding_model, text_language=message.text_language)
    await jobstore.store_diarization(conn, job_id, message.chunk_index, message.turns, message.speakers)
    announced = False
    if message.speakers:
        settings = get_settings()
        # A recognised speaker's confidence counts as well: a voiceprint made between an
        # enrolment's commit and the matching of this recording changes only that, and
        # transcript.speakers_updated tells it (as ingest's matching does).
        renamed = await speakerstore.name_recording_speakers(
            conn, job_id, job["owner"], settings.speaker_match_threshold, settings.speaker_min_speech_s,
            counting_confidence=True)
        if renamed and await jobstore.other_chunks_stored(conn, job_id, message.chunk_index):
            # Someone was enrolled (or given a voiceprint) since an earlier chunk's segments went
            # out without the name or with another confidence (that enrolment's own pass may have
            # found nothing left to change here).
            await speakerstore.announce_speaker_names(conn, job_id)
            announced = True
    stage = await jobstore.stage_after_chunk(conn, job_id, message.chunk_count)
    await jobstore.advance(conn, job_id, stage, language=message.language, duration=message.duration,
                           chunk_count=message.chunk_count, first_chunk=message.chunk_index == 0)
    return announced


# The first progress report of every diarizer run, a delivery again included (services.diarizer.handler).
DIARIZER_RUN_BEGINS = "diarizing"


async def _run_began_after_the_end(conn: asyncpg.Connection, message: JobProgress) -> bool:
    """Whether the job had ended when the diarizer run reporting `message` began: its
    run_started_at (the diarizer's clock) after the job's completed_at (the database's; a run that
    did the job began a whole job's processing before its end). A report without the stamp (a
    diarizer of an earlier version) counts as a run begun after the end. False for a job still
    processing, or gone."""
    if message.run_started_at is None:
        return True
    return bool(await conn.fetchval("SELECT completed_at < $2 FROM transcripts WHERE id = $1",
                                    message.job_id, message.run_started_at))


async def on_progress(pool: asyncpg.Pool, message: JobProgress) -> bool:
    """The job's stage moves on. A diarizer run's first report (`diarizing`) from a run that began
    after the job had ended comes from a diarizer that never heard so: a replica started after the
    job was cancelled, or a second delivery of a job already done (the broker gave it again after a
    lost connection). The ending is announced again, so that the diarizer stops (or does not store
    the decoded audio), ingest removes what was stored, and the transcribers skip the chunks. Any
    other report on an ended job, the first report of the run that did the job included, is a late
    copy (held through a database outage and handed back behind the job's chunks, or tried again):
    announced again, it sent subscribers a second transcript.completed for nothing, and ingest ran
    the job's end again; a chunk of that run, if any, announces a failure again itself
    (_nothing_to_store). Progress of a job deleted since it ended announces its deletion again, to
    the same end. True when it was."""
    async with _transaction(pool) as conn:
        await jobstore.advance(conn, message.job_id, message.stage, duration=message.duration,
                               chunk_count=message.chunk_count)
        if (message.stage == DIARIZER_RUN_BEGINS and await _run_began_after_the_end(conn, message)
                and await jobstore.announce_end_again(conn, message.job_id)):
            log.info("%s reported after the job had ended; its ending is announced again", message.stage)
            return True
        if await jobstore.announce_deletion_again(conn, message.job_id):
            log.info("%s reported after the job was deleted; its deletion is announced again", message.stage)
            return True
    return False


async def on_transcribed(pool: asyncpg.Pool, message: ChunkTranscribed) -> bool:
    """Store the chunk's text ahead of its embeddings; returns True when events were enqueued
    (names recognised since an earlier chunk went out, announced). The first text stored of a
    chunk stays: a second chunk.transcribed of it (a transcriber stopped after publishing, before
    acking, and the chunk transcribed again by another replica) may read differently, and live
    streams have sent the first already. A failed try stores nothing (its transaction is rolled
    back), and a rerun is a job of its own: neither meets a chunk stored before."""
    async with _failure_counted_once_committed(message.job_id), _transaction(pool) as conn:
        job = await jobstore.lock_processing_job(conn, message.job_id)
        if job is None or job["status"] != "processing":
            return await _nothing_to_store(conn, message.job_id, job)
        if (stored := await jobstore.stored_chunk(conn, message.job_id, message.chunk_index)) is not None:
            nothing_to_do()
            if not stored["embedded"]:
                log.info("chunk %d/%d text already stored; this copy is left out", message.chunk_index + 1,
                         message.chunk_count)
            return False  # stored already: its text (the first), or in full by chunk.embedded
        announced = await _store_chunk(conn, job, message, embedding_model=None)
    log.info("stored chunk %d/%d text (%d segments)",
             message.chunk_index + 1, message.chunk_count, len(message.segments))
    return announced


async def on_embedded(pool: asyncpg.Pool, message: ChunkEmbedded) -> bool:
    """Store the chunk with its embeddings; returns True when events were enqueued."""
    dimensions = next((len(s.embedding) for s in message.segments if s.embedding), None)
    if dimensions:
        searchstore.build_vector_index_soon(pool, message.embedding_model, dimensions)
    async with _failure_counted_once_committed(message.job_id), _transaction(pool) as conn:
        job = await jobstore.lock_processing_job(conn, message.job_id)
        if job is None or job["status"] != "processing":
            return await _nothing_to_store(conn, message.job_id, job)
        stored = await jobstore.stored_chunk(conn, message.job_id, message.chunk_index)
        if stored is not None and stored["embedded"]:
            log.info("chunk %d already stored; duplicate ignored", message.chunk_index)
            nothing_to_do()
            return False
        if stored is not None and stored["texts"] != [s.text for s in message.segments]:
            # The embedding of another transcription of the chunk than the one whose text is stored
            # (and may have been streamed): the embedder embeds every copy of chunk.transcribed, so
            # the stored text's own chunk.embedded comes as well, and is the one stored.
            log.info("chunk %d embedded from another transcription than the stored one; left for the stored"
                     " one's", message.chunk_index)
            nothing_to_do()
            return False
        await _store_chunk(conn, job, message, embedding_model=message.embedding_model)
        names = await jobstore.speaker_names(conn, message.job_id)
        for segment in message.segments:
            await add_to_outbox(conn, SegmentCreated(
                message_id=f"segment.created:{message.job_id}:{message.chunk_index}:{segment.index}",
                job_id=message.job_id, transcript_id=message.job_id,
                chunk_index=message.chunk_index, index=segment.index, speaker=segment.speaker,
                speaker_name=names[segment.speaker].name if segment.speaker in names else None,
                speaker_confidence=names[segment.speaker].confidence if segment.speaker in names else None,
                start_ts=segment.start_ts, end_ts=segment.end_ts,
                text=segment.text,
                overlap=segment.overlap, embedding=segment.embedding, embedding_model=message.embedding_model,
                language=segment.language,
            ))
        embedded = await jobstore.embedded_chunks(conn, message.job_id)
        if embedded >= message.chunk_count:
            info = await jobstore.mark_done(conn, message.job_id)
            await add_to_outbox(conn, jobstore.completion(message.job_id, info))
            log.info("job done: %d chunks, %d segments", embedded, info["segment_count"])
        else:
            await jobstore.set_progress(conn, message.job_id, embedded / message.chunk_count)
            log.info("stored chunk %d/%d (%d of %d embedded)", message.chunk_index + 1,
                     message.chunk_count, embedded, message.chunk_count)
    return True


async def fail_job(pool: asyncpg.Pool, job_id: int, stage: str, reason: str,
                   still_for_s: float | None = None) -> bool:
    """Mark a processing job failed (the first reason wins); returns True if it changed.
    `stage` is the service that gave up; the job keeps the pipeline stage it failed in. With
    `still_for_s`, only if it has not moved for that long (checked as it is failed), and not
    while another transaction holds its row (that one is not waited for)."""
    async with _transaction(pool) as conn:
        if not await jobstore.fail(conn, job_id, reason, stage, still_for_s):
            return False
    log.warning("job failed in %s: %s", stage, reason)
    return True


# After the database is back, the messages held through its outage are stored at their next try
# (at most 30 s apart), and those handed back to stt.persister meanwhile once the queue reaches
# them: for this long after a gap (jobstore.stall_reaper_round), its jobs are not taken for
# stalled either.
OUTAGE_GRACE_S = 300.0
# Rounds of the stall reaper that no persister ran, for the time since the last to be a gap.
ROUNDS_MISSED_FOR_A_GAP = 2


def reaper_round_s(timeout_s: float) -> float:
    return min(30.0, max(1.0, timeout_s / 4))


class DatabaseMissed:
    """Whether this persister's stall reaper could not reach the database since its last round:
    that time is then a gap, however short it was (an outage every replica's reaper meets; one
    shorter than ROUNDS_MISSED_FOR_A_GAP rounds leaves the shared heartbeat's age short). Not set
    by a handler's miss, nor by a start: those are one replica's, while the others may store."""

    def __init__(self, since_last_round: bool = False) -> None:
        self.since_last_round = since_last_round


async def fail_stalled_jobs(pool: asyncpg.Pool, timeout_s: float, grace_s: float = OUTAGE_GRACE_S) -> list[int]:
    """Fail every processing job that has not moved for `timeout_s` (a message lost to an
    operator's purge, a stage that hangs): it must end, with a reason, and become deletable.
    Gaps in the stall reaper's heartbeat, and `grace_s` after each, are not counted."""
    failed = []
    for job_id in await jobstore.stalled_job_ids(pool, timeout_s, grace_s):
        with job_logged(job_id):
            reason = f"no progress for {timeout_s:g} s (JOB_STALL_TIMEOUT_S); processing was given up"
            # Checked again as it is failed: it may have moved since the list was read. A row
            # another transaction holds (an operator's open psql session) is skipped, not waited
            # for: waited for, each round outlasted ROUNDS_MISSED_FOR_A_GAP rounds, the next
            # heartbeat came late, and the gaps it recorded kept every other job from counting as
            # stalled while the lock lasted.
            try:
                if await fail_job(pool, job_id, "persister", reason, still_for_s=timeout_s):
                    failed.append(job_id)
                else:
                    log.debug("not failed as stalled: it moved meanwhile, or another transaction holds its row"
                              " (tried again next round)")
            except TimeoutError:
                # No answer within DATABASE_COMMAND_TIMEOUT_S (a half-open connection): the jobs
                # after it are still tried.
                log.warning("could not fail the stalled job: no answer within DATABASE_COMMAND_TIMEOUT_S;"
                            " trying again next round")
            except asyncpg.exceptions.LockNotAvailableError:
                log.warning("could not fail the stalled job: a lock it needs was held for over %g s (LOCK_WAIT_S);"
                            " trying again next round", LOCK_WAIT_S)
    return failed


async def reap_stalled_jobs(pool: asyncpg.Pool, timeout_s: float, missed: DatabaseMissed,
                            grace_s: float = OUTAGE_GRACE_S) -> list[int]:
    """One round of the stall reaper: its heartbeat, then the jobs it failed. A database it cannot
    reach is noted in `missed`. The heartbeat is in the database, so that an outage a persister
    restarted during, or another replica, still counts (README: no job fails because of one)."""
    # Taken before the heartbeat's await: a miss noted meanwhile is kept for the next round,
    # instead of being cleared once this round is recorded.
    missed_before, missed.since_last_round = missed.since_last_round, False
    recorded = False
    try:
        async with pool.acquire() as conn:
            await jobstore.stall_reaper_round(conn, ROUNDS_MISSED_FOR_A_GAP * reaper_round_s(timeout_s),
                                              missed_before, grace_s)
        recorded = True
        return await fail_stalled_jobs(pool, timeout_s, grace_s)
    except Exception as exc:
        if missed_before and not recorded:
            missed.since_last_round = True  # the gap is still to be recorded
        if not isinstance(exc, DATABASE_UNAVAILABLE):
            log.exception("looking for stalled jobs failed; will try again")
            return []
        if not missed_before:
            log.warning("looking for stalled jobs: the database is unreachable (%s: %s); the outage is not"
                        " counted as the jobs' lack of progress", type(exc).__name__, exc)
        missed.since_last_round = True
        return []


async def run_stall_reaper(pool: asyncpg.Pool, timeout_s: float, wake: asyncio.Event,
                           missed: DatabaseMissed) -> None:
    if timeout_s <= 0:
        return
    while True:
        await asyncio.sleep(reaper_round_s(timeout_s))
        if await reap_stalled_jobs(pool, timeout_s, missed):
            wake.set()


async def on_failed(pool: asyncpg.Pool, message: JobFailed) -> bool:
    failed = await fail_job(pool, message.job_id, message.stage, message.reason)
    if not failed:  # the job had ended already (another stage's failure came first, or a cancel)
        nothing_to_do()
    return failed


async def on_dead_letter(pool: asyncpg.Pool, message: DeadLetter) -> bool:
    failed = await fail_job(
        pool, message.job_id, "dead-letter",
        "processing stopped: a stage crashed on this job repeatedly (message dead-lettered)",
    )
    if not failed:
        nothing_to_do()
    return failed
