"""Creating jobs and reading their state: the ingest side of the `transcripts` table."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import asyncpg
from litestar.exceptions import HTTPException
from minio import Minio
from pydantic import BaseModel, Field

from common import jobstore, speakerstore
from common.logs import job_logged
from common.messages import STAGE_OF_SERVICE, STAGES, JobFailed, JobOptions, JobSubmitted, Stage
from common.outbox import add_to_outbox
from common.storage import remove_objects
from services.ingest.segments import TranscriptSegment, transcript_segment
from services.ingest.speakers import unenrolled

log = logging.getLogger(__name__)


UPLOAD_PREFIX = "uploads/"


def upload_key(job_id: int) -> str:
    """Server-chosen object key: client text never becomes part of a path."""
    return f"{UPLOAD_PREFIX}{job_id}"


def result_keys(results_prefix: str, source_key: str) -> dict[str, str]:
    """A bucket drop's result files beside it in the inbox, by format: the status document
    (`results/calls/monday.wav.json`) and subtitles (`results/calls/monday.wav.srt`)."""
    return {extension: f"{results_prefix}{source_key}.{extension}" for extension in ("json", "srt")}


MAX_FILENAME_CHARS = 255


def clean_filename(name: str | None) -> str:
    """The original name, kept as data (never a path): control characters dropped, at most
    MAX_FILENAME_CHARS characters with the extension kept."""
    name = "".join(c for c in (name or "") if c.isprintable()).strip() or "audio"
    if len(name) > MAX_FILENAME_CHARS:
        stem, dot, extension = name.rpartition(".")
        extension = extension[:16] if dot and stem else ""
        name = name[: MAX_FILENAME_CHARS - len(extension) - 2] + "…" + (f".{extension}" if extension else "")
    return name


IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


@dataclass(frozen=True)
class Idempotency:
    """A request's Idempotency-Key header, with a hash of what the request asked for (the key
    None: the hash alone, to find the same request while its job runs)."""

    key: str | None
    request_hash: str


def checked_idempotency_key(key: str | None) -> str | None:
    """The Idempotency-Key header as given; 400 when it is not 1-255 visible ASCII characters."""
    if key is not None and not IDEMPOTENCY_KEY.match(key):
        raise HTTPException(status_code=400, detail="Idempotency-Key: 1-255 visible ASCII characters (a UUID will do)")
    return key


def idempotency(key: str | None, *asked: object) -> Idempotency | None:
    """A request's Idempotency-Key (400 when malformed) with the hash of `asked`; None without one."""
    if checked_idempotency_key(key) is None:
        return None
    asked_json = json.dumps(asked, sort_keys=True, separators=(",", ":"), default=str)
    return Idempotency(key=key, request_hash=hashlib.sha256(asked_json.encode()).hexdigest())


async def earlier_job(pool: asyncpg.Pool, owner: str | None, asked: Idempotency | None) -> asyncpg.Record | None:
    """The job an earlier request with the same Idempotency-Key made (id, filename,
    callback_secret); 422 when that request asked for something else."""
    if asked is None or asked.key is None:
        return None
    job = await jobstore.job_by_idempotency_key(pool, owner, asked.key)
    if job is not None and job["request_hash"] != asked.request_hash:
        raise HTTPException(status_code=422, detail=f"this Idempotency-Key was used for another request (job"
                                                    f" {job['id']}): send a new key with a new request")
    return job


# How long create_job looks for its row after its transaction failed past the insert (the COMMIT's
# answer lost as PostgreSQL went down, or restarted): told "nothing was created" while the job was
# committed and runs, a client sends the recording again and gets a second job.
ROW_CHECK_S = 10.0


class JobMaybeCreated(Exception):
    """create_job's transaction failed past the insert, and whether it was committed anyway could
    not be told within ROW_CHECK_S: job `job_id` may exist, and then runs (raised from the error)."""

    def __init__(self, job_id: int) -> None:
        super().__init__(f"whether job {job_id} was committed could not be told")
        self.job_id = job_id


@dataclass(frozen=True)
class BucketDrop:
    """The inbox object a job was made from: one job per (bucket, key, ETag)."""

    bucket: str
    key: str
    etag: str


async def create_job(pool: asyncpg.Pool, s3: Minio, audio_bucket: str, put_audio: Callable[[str], object],
                     *, filename: str, options: JobOptions, owner: str | None, outbox_wake: asyncio.Event,
                     drop: BucketDrop | None = None, refused: str | None = None,
                     idempotency: Idempotency | None = None,
                     also: Callable[[asyncpg.Connection, int], Awaitable[object]] | None = None,
                     refuse_unknown_speakers: Callable[[list[str]], str] | None = None,
                     keep_unknown_speakers: bool = False, speakers_field: str = "expected_speakers",
                     tell_maybe_created: bool = False) -> int | None:
    """The one way a job comes to exist, for uploads and bucket drops alike.

    An id is reserved, `put_audio(key)` stores the audio at `uploads/{id}`, then the
    `transcripts` row and its `job.submitted` are committed in one transaction: the outbox
    publishes the message (now, or after a broker outage or a crash of this process), so a
    committed job always runs. Anything that fails before the commit leaves no row and no object
    behind; a commit whose answer was lost, its row found after all, returns the job as if
    answered; one that cannot be told (the database away for ROW_CHECK_S) raises the error, or
    with `tell_maybe_created` JobMaybeCreated from it (a request's answer names the job to look
    up before sending again). Returns None when `drop` already is a job (another process made it
    first) or was deleted by its owner, or when a request with the same `idempotency` key made its
    job first. `also(conn, job_id)` runs in the job's transaction (a callback URL).
    With `refused` (a request that cannot be honoured, found after the audio was taken) the job
    is failed with that reason instead of submitted, through the same outbox.

    The options' `expected_speakers` are the owner's people as they are when the job commits
    (the upload can take minutes, and the callers checked them before it): one renamed meanwhile
    is expected by the new name, one forgotten meanwhile is refused as an unknown name is, with
    400 (`require_enrolled`'s answer, naming them `speakers_field`), or, with
    `refuse_unknown_speakers(names)`, by failing the job with the reason it gives (a bucket
    drop); `keep_unknown_speakers` keeps such names as they are (a rerun's, kept from its
    original job, which may name people forgotten since)."""
    job_id = await jobstore.reserve_job_id(pool)
    key = upload_key(job_id)
    expected = options.expected_speakers if refused is None else []
    with job_logged(job_id):
        # Who they are now, to be found again at the insert, renamed or not.
        speaker_ids = await speakerstore.enrolled_ids(pool, owner, expected)
        refused = _unknown_speakers(expected, speaker_ids, refuse_unknown_speakers, keep_unknown_speakers,
                                    speakers_field) or refused
        created = None
        try:
            await asyncio.to_thread(put_audio, key)
            async with pool.acquire() as conn, conn.transaction():
                if expected and refused is None:
                    # From here until the commit no rename or forgetting of the owner's people
                    # runs: either it ran before and is read here, or it runs after and finds this job.
                    now = await speakerstore.expected_names_now(conn, owner, expected, speaker_ids)
                    refused = _unknown_speakers(expected, now, refuse_unknown_speakers, keep_unknown_speakers,
                                                speakers_field)
                    options = options.model_copy(update={"expected_speakers": [
                        name if name is not None else given for given, name in zip(expected, now, strict=True)]})
                created = await jobstore.insert_job(
                    conn, job_id, filename=filename, audio_key=key, options=options.model_dump(exclude_none=True),
                    owner=owner, drop=(drop.bucket, drop.key, drop.etag) if drop else None,
                    idempotency=(idempotency.key, idempotency.request_hash) if idempotency else None)
                if created is not None and also is not None:
                    await also(conn, job_id)
                if created is not None:
                    await add_to_outbox(conn, JobFailed(
                        message_id=f"job.failed:{job_id}", job_id=job_id, stage="ingest", reason=refused,
                    ) if refused is not None else JobSubmitted(
                        message_id=f"job.submitted:{job_id}", job_id=job_id, audio_bucket=audio_bucket,
                        audio_key=key, filename=filename, options=options))
        except BaseException as exc:
            # Not waited for when the request was cancelled: only a failure is looked into.
            row_there = await _row_exists_after_all(pool, job_id, created,
                                                    ROW_CHECK_S if isinstance(exc, Exception) else 0)
            if row_there is False:  # an object left over is better than a job without its audio
                await asyncio.to_thread(_remove_quietly, s3, audio_bucket, key)
            # The COMMIT's answer lost (the connection dropped as it came) though the row and its
            # outbox message were committed: the job runs, and is the request's answer. Told "nothing
            # was created", a client would send the recording again and get a second job.
            if row_there is None and tell_maybe_created and isinstance(exc, Exception):
                log.warning("the job's transaction failed as seen from here (%s), and whether its row was"
                            " committed could not be told", type(exc).__name__)
                raise JobMaybeCreated(job_id) from exc
            if row_there is not True or not isinstance(exc, Exception):
                raise
            log.warning("the job's transaction failed as seen from here (%s), yet its row was committed: the job"
                        " runs", type(exc).__name__)
        if created is None:  # another request's job, or a drop already known: this upload is not needed
            await asyncio.to_thread(_remove_quietly, s3, audio_bucket, key)
        else:
            outbox_wake.set()
        return created


def _unknown_speakers(names: list[str], found: list[object | None], refused_by: Callable[[list[str]], str] | None,
                      keep: bool, field: str) -> str | None:
    """For create_job: the reason to fail the job with when some of a job's expected `names` are
    nobody's (`found` None for them), by `refused_by`; without it, 400 as require_enrolled answers
    an unknown name. None when they all are someone's, or are to be kept as they are."""
    unknown = [name for name, person in zip(names, found, strict=True) if person is None]
    if not unknown or keep:
        return None
    if refused_by is not None:
        return refused_by(unknown)
    raise HTTPException(status_code=400, detail=unenrolled(unknown, field))


async def _row_exists_after_all(pool: asyncpg.Pool, job_id: int, inserted: int | None,
                                 wait_s: float = 0) -> bool | None:
    """After a failure past the insert (a later statement, or the COMMIT itself, whose answer can
    be lost), whether the job's row was committed anyway: asked again, a little later each time,
    for `wait_s` while the database does not answer (the failure is often its going down); None
    when that cannot be told."""
    if inserted is None:
        return False
    deadline, pause = time.monotonic() + wait_s, 0.2
    while True:
        try:
            # A connection is waited for (made anew, the old one dropped) only until the deadline.
            async with pool.acquire(timeout=max(deadline - time.monotonic(), 1.0)) as conn:
                return await jobstore.job(conn, job_id) is not None
        except Exception as exc:
            if time.monotonic() + pause > deadline:
                with job_logged(job_id):
                    log.warning("whether the job's row was committed could not be told (%s)", type(exc).__name__)
                return None
        await asyncio.sleep(pause)
        pause = min(pause * 2, 2.0)


SPEAKER_COUNTS = {"num_speakers", "min_speakers", "max_speakers"}


def rerun_options(original: dict, changes: JobOptions) -> JobOptions:
    """A rerun's options: the original job's, with the fields `changes` was given replaced. The
    speaker counts go together: giving one drops the original's others (num_speakers=4 after
    min_speakers=2). Raises pydantic's ValidationError for a combination that cannot run."""
    given = changes.model_dump(include=changes.model_fields_set)
    kept = JobOptions.model_validate(original).model_dump(
        exclude=SPEAKER_COUNTS if given.keys() & SPEAKER_COUNTS else set())
    return JobOptions.model_validate({**kept, **given})


def _remove_quietly(s3: Minio, bucket: str, key: str) -> None:
    try:
        remove_objects(s3, [(bucket, key)])
    except Exception:
        log.warning("could not remove %s/%s of a submission that did not complete", bucket, key)


def percent_done(status: str, progress: float) -> int:
    """Chunks stored / chunks, 0-100; 100 only once the job is done."""
    if status == "done":
        return 100
    return min(99, max(0, round(progress * 100)))


def public_stage(stage: str) -> str:
    """One of STAGES. Rows failed before failures kept their pipeline stage name a service."""
    return stage if stage in STAGES else STAGE_OF_SERVICE.get(stage, "submitted")


class JobStatus(BaseModel):
    status: Literal["processing", "done", "error"]
    # The step the job is in (on error: the step it failed in); percent = chunks done / chunks.
    stage: Stage
    percent: int = Field(ge=0, le=100)
    # Left out with ?segments=false (a client following progress).
    segments: list[TranscriptSegment] | None = None
    # True when the job is done and nobody talks in the recording (no segments, no turns).
    no_speech: bool = False
    error: str | None = None


async def status_document(pool: asyncpg.Pool | asyncpg.Connection, job_id: int,
                          owner: str | None = None, rows: list[asyncpg.Record] | None = None,
                          with_segments: bool = True) -> JobStatus | None:
    """What GET /status/{id} returns (and the result file of a bucket drop). With `owner`
    (API keys on), another key's job is None, as if it did not exist. `rows`: the job's
    segments (jobstore.job_segments) when the caller has read them already."""
    job = await jobstore.job(pool, job_id)
    if job is None or (owner is not None and job["owner"] != owner):
        return None
    if rows is None and with_segments:
        rows = await jobstore.job_segments(pool, job_id)
    return JobStatus(
        status=job["status"], stage=public_stage(job["stage"]),
        percent=percent_done(job["status"], job["progress"]),
        # As GET /transcripts/{id} shows them, without words.
        segments=[transcript_segment(r) for r in rows] if with_segments else None,
        # Done with nobody talking: a silent recording is a result (as hosted APIs report it).
        no_speech=job["no_speech"],
        error=job["error"] if job["status"] == "error" else None)
