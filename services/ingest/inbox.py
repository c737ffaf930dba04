"""Bucket drops: an object put into INBOX_BUCKET becomes exactly one job, found through
MinIO's AMQP bucket notifications and, for whatever those miss, a periodic listing. When the
job ends its status document is written to `<RESULTS_PREFIX><key>.json` in the inbox, and
once it is done its subtitles to `<RESULTS_PREFIX><key>.srt`. The same consumer of job endings
tidies every job's audio: a redacted recording is written (redacted_audio), the decoded PCM
removed."""

from __future__ import annotations

import asyncio
import contextlib
import email.errors
import email.header
import itertools
import logging
from collections.abc import Awaitable, Mapping
from urllib.parse import unquote_plus

import aio_pika
import aiormq
import asyncpg
from minio import Minio
from minio.commonconfig import CopySource
from minio.error import S3Error
from pydantic import BaseModel, Field, ValidationError

from common import jobstore, runner, speakerstore
from common.broker import (
    EVENTS_EXCHANGE,
    Bus,
    Route,
    consume,
    declare_queue,
    plain_channel,
    stage_queue_arguments,
)
from common.db import DATABASE_UNAVAILABLE, LockKey, every
from common.logs import job_logged
from common.messages import JobOptions, TranscriptCompleted, TranscriptFailed
from common.settings import Settings
from common.storage import (
    STORAGE_UNAVAILABLE,
    StoreCallTimedOut,
    call_in_transaction,
    is_missing,
    pcm_key,
    remove_objects,
    upload_bytes,
    upload_json,
)
from services.ingest.auth import owner_of
from services.ingest.jobs import BucketDrop, clean_filename, create_job, result_keys, status_document
from services.ingest.redacted_audio import redact_recording
from services.ingest.segments import transcript_segment
from services.ingest.speakers import unenrolled
from services.ingest.transcripts import to_srt

log = logging.getLogger(__name__)

INBOX_EVENTS_QUEUE = "stt.ingest.inbox-events"
RESULTS_QUEUE = "stt.ingest.results"
# Objects of the inbox listed and checked at a time by the scan.
SCAN_PAGE = 1000
# S3's longest key, in UTF-8 bytes: a drop whose result file's key is longer is refused, since
# that file could never be written (every scan would try again).
MAX_KEY_BYTES = 1024
# MinIO's longest name between two slashes of a key (its objects are files, under folders), in
# UTF-8 bytes: a longer one is refused likewise.
MAX_SEGMENT_BYTES = 255


# The S3 event document MinIO publishes (only the fields used here).
class S3Object(BaseModel):
    key: str
    eTag: str | None = None
    size: int | None = None


class S3Bucket(BaseModel):
    name: str


class S3Entity(BaseModel):
    bucket: S3Bucket
    object: S3Object


class S3Record(BaseModel):
    eventName: str = ""
    s3: S3Entity


class BucketEvent(BaseModel):
    Records: list[S3Record] = Field(default_factory=list)


def _clean_etag(etag: str | None) -> str:
    return (etag or "").strip('"')


def is_object_created(event_name: str) -> bool:
    """An object put, copied or uploaded in parts: `s3:ObjectCreated:*` (MinIO; S3 names them
    without `s3:`). Other events (`s3:ObjectRemoved:Delete`...) are no drop."""
    return event_name.removeprefix("s3:").startswith("ObjectCreated:")


USER_METADATA = "x-amz-meta-"


def metadata_text(value: str) -> str:
    """A user-metadata value as it was written. S3 returns non-ASCII values RFC 2047-encoded
    (`=?UTF-8?B?...?=`); MinIO returns raw UTF-8, which HTTP clients read as ISO-8859-1."""
    if value.startswith("=?") and value.rstrip().endswith("?="):
        try:
            return str(email.header.make_header(email.header.decode_header(value)))
        except (ValueError, LookupError, email.errors.HeaderParseError):
            return value
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:  # characters beyond ISO-8859-1 (decoded already), or not UTF-8 bytes
        return value


def drop_options(headers: Mapping[str, str]) -> JobOptions:
    """What a drop asks for in its S3 user metadata, named as POST /recognize's form fields:
    `x-amz-meta-language: ru`, `x-amz-meta-num-speakers: 2` (also min-/max-speakers; `-` or `_`).
    Other metadata is not ours and is ignored. Raises ValueError saying which value is wrong."""
    given = {}
    for header, value in headers.items():
        name = header.lower()
        field = name[len(USER_METADATA):].replace("-", "_") if name.startswith(USER_METADATA) else ""
        if field in JobOptions.model_fields:
            given[field] = metadata_text(value)
    try:
        return JobOptions(**given)
    except ValidationError as exc:
        raise ValueError("; ".join(
            f"{USER_METADATA}{str(e['loc'][0]).replace('_', '-')}: {e['msg']}" if e["loc"] else e["msg"]
            for e in exc.errors())) from exc


def loggable(text: object) -> str:
    """Text from a dropped object (its key, the store's error naming it) as logged: its line
    breaks, other unprintable characters and backslashes escaped as Python writes them. S3 takes a
    line break in a key (and an event's key is unquoted): logged as it was, it began a line of
    its own, as well formed as any service's, saying anything of any job. (clean_filename drops
    such characters: two keys that differ in them would read alike.)"""
    return "".join(c if c.isprintable() and c != "\\" else c.encode("unicode_escape").decode("ascii")
                   for c in str(text))


RESULTS_LOCK = "hashtextextended('stt.drop-results:' || $1 || '/' || $2, 0)"
# Why a drop key's old result files could not be taken down: logged, the drop's job goes on.
RESULTS_NOT_TAKEN_DOWN = (*STORAGE_UNAVAILABLE, S3Error, StoreCallTimedOut, *DATABASE_UNAVAILABLE)


async def lock_results_of(conn: asyncpg.Connection, bucket: str, key: str) -> None:
    """For the rest of the transaction: one writer of the drop key's result files at a time. An
    older job's upload, checked before a newer drop of the key was made, must not land after the
    newer drop took the old results down."""
    await conn.execute(f"SELECT pg_advisory_xact_lock({RESULTS_LOCK})", bucket, key)


async def try_lock_results_of(conn: asyncpg.Connection, bucket: str, key: str) -> bool:
    """lock_results_of unless another holds it (False)."""
    return await conn.fetchval(f"SELECT pg_try_advisory_xact_lock({RESULTS_LOCK})", bucket, key)


def drop_key_of_result(results_prefix: str, name: str) -> str | None:
    """The drop key whose result file `name` is (result_keys' inverse); None for another object."""
    if not name.startswith(results_prefix):
        return None
    for extension in ("json", "srt"):
        if name.endswith(f".{extension}"):
            return name[len(results_prefix):-len(extension) - 1]
    return None


def result_key_too_long(results_prefix: str, key: str) -> str | None:
    """Why the store would refuse one of the key's result file keys (None: it would not)."""
    keys = result_keys(results_prefix, key).values()
    longest = max(len(k.encode()) for k in keys)
    if longest > MAX_KEY_BYTES:
        return f"its result file's key would be {longest} bytes, over S3's {MAX_KEY_BYTES}"
    # MinIO takes a name between slashes of up to 255 bytes: `.json` makes a drop named with 251 to
    # 255 bytes too long. A drop with a longer name is in a store without that limit (AWS S3), which
    # takes its results too.
    segment = max(len(part.encode()) for k in keys for part in k.split("/"))
    within_minio = max(len(part.encode()) for part in key.split("/")) <= MAX_SEGMENT_BYTES
    if within_minio and segment > MAX_SEGMENT_BYTES:
        return (f"its result file's name would be {segment} bytes, over MinIO's {MAX_SEGMENT_BYTES} for a name"
                " between slashes")
    return None


async def declare_results_queue(connection: aio_pika.abc.AbstractRobustConnection,
                                channel: aio_pika.abc.AbstractChannel, settings: Settings) -> None:
    """stt.ingest.results, bound to the job endings on stt.events. Ingest's two queues (this and
    declare_inbox_events_queue's) have the stage queues' delivery limit and dead-letter exchange:
    a message the broker takes back more than DELIVERY_LIMIT times (its consumer crashing on it
    each time) is parked in stt.dead-letters with that reason, where RabbitMQ 4 would drop it at
    its default limit of 20. A queue an earlier version made without them is used as it is
    (common.broker.declare_queue). Declared and bound without aio-pika's restoring, as
    common.broker.declare_topology does (a queue deleted meanwhile would fail every
    reconnection); a consumer whose queue went declares them again when it starts again. Each
    consumer declares its own (Inbox._consume): the job ends' must not wait on MinIO's exchange."""
    await declare_queue(connection, RESULTS_QUEUE, stage_queue_arguments("ingest", settings))
    stt_events = await channel.get_exchange(EVENTS_EXCHANGE)
    results_queue = await channel.declare_queue(RESULTS_QUEUE, passive=True, robust=False)
    for routing_key in (TranscriptCompleted.ROUTING_KEY, TranscriptFailed.ROUTING_KEY):
        await results_queue.bind(stt_events, routing_key, robust=False)


# What RabbitMQ answers when MINIO_EVENTS_EXCHANGE cannot be declared as ingest declares it (it
# exists as another kind: MinIO made it first, not durable, or not a topic exchange; no configure
# permission on it; a reserved amq.* name RabbitMQ has no exchange of), or the inbox-events queue
# not bound to it.
MINIO_EXCHANGE_REFUSED = (aiormq.exceptions.ChannelPreconditionFailed, aiormq.exceptions.ChannelAccessRefused,
                          aiormq.exceptions.ChannelNotFoundEntity)
# How often the inbox-events consumer tries again to declare an exchange RabbitMQ refused.
MINIO_EXCHANGE_RETRY_S = 30.0


async def declare_inbox_events_queue(connection: aio_pika.abc.AbstractRobustConnection, settings: Settings) -> None:
    """stt.ingest.inbox-events, bound to MINIO_EVENTS_EXCHANGE (a durable topic exchange, declared
    unless it exists so: MinIO publishes to it). On a channel of its own, not restored by aio-pika
    (common.broker.plain_channel), since the broker closes the channel of a refused declaration
    (MINIO_EXCHANGE_REFUSED, raised)."""
    await declare_queue(connection, INBOX_EVENTS_QUEUE, stage_queue_arguments("ingest", settings))
    channel = await plain_channel(connection)
    try:
        minio_events = await channel.declare_exchange(settings.minio_events_exchange, aio_pika.ExchangeType.TOPIC,
                                                      durable=True)
        inbox_queue = await channel.declare_queue(INBOX_EVENTS_QUEUE, passive=True)
        await inbox_queue.bind(minio_events, settings.minio_events_routing_key)
    finally:
        if not channel.is_closed:
            await channel.close()


class Inbox:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, s3: Minio, outbox_wake: asyncio.Event,
                 s3_quick: Minio | None = None):
        self.settings, self.pool, self.s3, self.outbox_wake = settings, pool, s3, outbox_wake
        # For the result files, written while the job's row is locked (call_in_transaction).
        self.s3_quick = s3_quick or s3
        # With API keys on, bucket drops belong to INBOX_API_KEY's caller (else to nobody's key).
        inbox_key = settings.inbox_api_key.get_secret_value() if settings.inbox_api_key else None
        self.owner = owner_of(inbox_key) if settings.api_key_list and inbox_key else None

    def is_input(self, key: str) -> bool:
        return bool(key) and not key.endswith("/") and not key.startswith(self.settings.results_prefix)

    async def register(self, key: str, etag: str) -> int | None:
        """Make the object a job unless it already is one (bucket, key, ETag) or its job was
        deleted. Returns the job id when this call made it."""
        bucket = self.settings.inbox_bucket
        # Checking first keeps each scan from spending a sequence value on every object it lists.
        if await jobstore.drop_is_known(self.pool, bucket, key, etag):
            return None

        try:
            stat = await asyncio.to_thread(self.s3.stat_object, bucket, key)
        except S3Error as exc:
            if not is_missing(exc):
                raise
            log.info("bucket drop %s/%s was removed before it was taken; nothing to do", bucket, loggable(key))
            return None
        current = _clean_etag(stat.etag)
        if etag and current != etag:
            # Overwritten since it was announced or listed: the new content is a drop of its own,
            # taken by its own event or the scan. Judged here (its size, its metadata), it would
            # be refused or run under the old content's identity.
            log.info("bucket drop %s/%s changed before it was taken (ETag %s, now %s); nothing to do", bucket,
                     loggable(key), loggable(etag), loggable(current))
            return None
        if not etag:
            # Announced without one: the content there now is the drop.
            etag = current
            if await jobstore.drop_is_known(self.pool, bucket, key, etag):
                return None
        # As an upload's: the diarizer reads the whole recording to its /tmp.
        too_big = stat.size is not None and stat.size > self.settings.max_upload_bytes
        too_long = None if too_big else result_key_too_long(self.settings.results_prefix, key)
        refused = None
        if too_big:
            refused = f"the object exceeds MAX_UPLOAD_MB ({self.settings.max_upload_mb} MB)"
        elif too_long:
            refused = f"the object's key is too long: {too_long}"
        try:
            options = drop_options(stat.metadata)
        except ValueError as exc:
            # Still a job, so that the drop's result file and the job list say why it did not
            # run; its reference kept, so that the client finds it by that.
            try:
                reference = stat.metadata.get(f"{USER_METADATA}reference")
                options = JobOptions(reference=metadata_text(reference) if reference else None)
            except ValidationError:
                options = JobOptions()
            refused = refused or f"the object's metadata asks for something impossible: {exc}"
        expected = options.expected_speakers

        def unknown_speakers(unknown: list[str]) -> str:
            return ("the object's metadata asks for something impossible: "
                    + unenrolled(unknown, f"{USER_METADATA}expected-speakers"))

        if refused is None and (unknown := await speakerstore.unknown_names(self.pool, self.owner, expected)):
            refused = unknown_speakers(unknown)

        def copy(audio_key: str) -> None:
            if too_big or too_long:
                return  # not kept: a rerun of the job would run past the limit, or again with no result file
            # Only the version this job is made for: an object overwritten meanwhile is a new
            # drop (new ETag), not this job under the old identity.
            self.s3.copy_object(self.settings.audio_bucket, audio_key,
                                CopySource(bucket, key, match_etag=etag or None))

        try:
            job_id = await create_job(
                self.pool, self.s3, self.settings.audio_bucket, copy,
                filename=clean_filename(key.rsplit("/", 1)[-1]), options=options, owner=self.owner,
                outbox_wake=self.outbox_wake, drop=BucketDrop(bucket, key, etag), refused=refused,
                # A person forgotten while the object was copied: failed as if forgotten before.
                refuse_unknown_speakers=unknown_speakers)
        except S3Error as exc:
            if not (is_missing(exc) or exc.code == "PreconditionFailed"):
                raise
            # Removed, or overwritten (the new content is a drop of its own), since announced.
            log.info("bucket drop %s/%s changed before it was taken (%s); nothing to do", bucket, loggable(key),
                     loggable(exc.code))
            return None
        if job_id is not None and refused is None:
            # An earlier drop of this key left its result files: until this one's are written they
            # would be read as this recording's (the .json says the results are complete). A
            # refused drop's own are written at once, over them.
            try:
                await self._take_down_older_results(bucket, key)
            except Exception as exc:
                if not isinstance(exc, RESULTS_NOT_TAKEN_DOWN):
                    raise
                # The job is made: the drop is not taken again.
                with job_logged(job_id):
                    log.warning("the earlier results of %s/%s could not be removed (%s): the inbox scan tries"
                                " again", bucket, loggable(key), loggable(exc))
        if job_id is not None:
            with job_logged(job_id):
                if refused:
                    log.warning("bucket drop %s/%s became a job, failed: %s", bucket, loggable(key), loggable(refused))
                else:
                    log.info("bucket drop %s/%s became a job", bucket, loggable(key))
        return job_id

    async def on_event(self, event: BucketEvent) -> None:
        for record in event.Records:
            key = unquote_plus(record.s3.object.key)
            if record.s3.bucket.name != self.settings.inbox_bucket or not self.is_input(key):
                continue
            if not is_object_created(record.eventName):
                # A removal (which names no ETag) or a restore is no drop; the event is acked.
                log.info("bucket event %s of %s/%s is no new object; nothing to do",
                         loggable(record.eventName or "(unnamed)"), record.s3.bucket.name, loggable(key))
                continue
            await self.register(key, _clean_etag(record.s3.object.eTag))

    async def reconcile(self) -> None:
        """List the inbox for objects no event announced, and write missing result files."""
        bucket = self.settings.inbox_bucket
        listing = self.s3.list_objects(bucket, recursive=True)
        # A page at a time, each checked in one query: an inbox only grows (every drop and its
        # result files stay), and is never held whole nor asked about object by object.
        while page := await asyncio.to_thread(lambda: list(itertools.islice(listing, SCAN_PAGE))):
            drops = [(obj.object_name, _clean_etag(obj.etag)) for obj in page if self.is_input(obj.object_name)]
            new = await jobstore.unknown_drops(self.pool, bucket, drops) if drops else set()
            # An older drop's result files that the new drop's take-down missed (a store or
            # database failure, ingest stopped between the job and the take-down).
            keys_with_results = list({key for obj in page
                                      if (key := drop_key_of_result(self.settings.results_prefix, obj.object_name))})
            stale = (await jobstore.keys_whose_newest_drop_is_processing(self.pool, bucket, keys_with_results)
                     if keys_with_results else set())
            for key in stale:
                try:
                    await self._take_down_older_results(bucket, key)
                except Exception as exc:
                    if isinstance(exc, DATABASE_UNAVAILABLE):
                        raise
                    log.exception("the older results of %s/%s could not be taken down; tried again next scan",
                                  bucket, loggable(key))
            for key, etag in (drop for drop in drops if drop in new):
                try:
                    await self.register(key, etag)
                except Exception as exc:
                    if isinstance(exc, DATABASE_UNAVAILABLE):
                        raise  # everything would fail: the scan as a whole tries again
                    # One object that cannot be taken (gone since the listing, unreadable...) must
                    # not keep every object after it from being seen; it is tried again next scan.
                    log.exception("bucket drop %s could not be registered; skipped this scan", loggable(key))
        for job_id in await jobstore.ended_drops_without_result(self.pool):
            try:
                await self.write_result(job_id)
            except Exception as exc:  # likewise: one result that cannot be written holds up no other
                if isinstance(exc, DATABASE_UNAVAILABLE):
                    raise
                with job_logged(job_id):
                    log.exception("results could not be written; tried again next scan")

    async def write_result(self, job_id: int) -> None:
        with job_logged(job_id):
            await self._write_result(job_id)

    async def _write_result(self, job_id: int) -> None:
        # The row lock keeps a DELETE of this job from running between the write and its mark.
        async with self.pool.acquire() as conn, conn.transaction():
            row = await jobstore.lock_drop(conn, job_id)
            if row is None:
                return
            bucket, source_key = row["source_bucket"], row["source_key"]
            keys = result_keys(self.settings.results_prefix, source_key)
            if result_key_too_long(self.settings.results_prefix, source_key):
                # Refused as it was taken (register says why): S3 would refuse the file every scan.
                await jobstore.mark_result_written(conn, job_id)
                log.warning("results not written: the key of %s/%s is too long for a result file", bucket,
                            loggable(source_key))
                return
            if not await call_in_transaction(self.s3_quick.bucket_exists, bucket):
                # Removed with the drop in it (or INBOX_BUCKET moved on): tried again, the write
                # failed with a traceback every scan, for good.
                await jobstore.mark_result_written(conn, job_id)
                log.warning("results not written: the bucket %s is gone", bucket)
                return
            # Held over the upload, so that a newer drop of the key made meanwhile does not take
            # the old results down before these land: it leaves that to this writer, once done.
            await lock_results_of(conn, bucket, source_key)
            # The object was overwritten: the result files are the new content's, not this older
            # job's, also when its job was deleted since (its row gone) or is not made yet.
            dropped_again = await jobstore.newer_drop_of_the_same_key(
                conn, job_id, await self._etag_there(bucket, source_key))
            if not dropped_again:
                segments = await jobstore.job_segments(conn, job_id)
                document = await status_document(conn, job_id, rows=segments)
                if document.status == "done":
                    subtitles = await asyncio.to_thread(to_srt, [transcript_segment(r, with_words=True)
                                                                 for r in segments])
                    await call_in_transaction(upload_bytes, self.s3_quick, bucket, keys["srt"], subtitles.encode(),
                                              content_type="application/x-subrip")
                else:  # an earlier job's subtitles of this key are not this failed job's
                    # (remove_objects: some stores, Google's among them, answer 404 for a key not there)
                    await call_in_transaction(remove_objects, self.s3_quick, [(bucket, keys["srt"])])
                # The status document last: its presence says the results are complete.
                await call_in_transaction(upload_json, self.s3_quick, bucket, keys["json"],
                                          document.model_dump(mode="json", exclude_none=True))
            await jobstore.mark_result_written(conn, job_id)
        if dropped_again:
            log.info("results not written: %s/%s was dropped again since", bucket, loggable(source_key))
        else:
            log.info("results written to %s/%s", bucket, loggable(keys["json"] if document.status != "done"
                                                                  else f"{keys['json']} and .srt"))
        # Written or not: a drop made while the lock was held left its take-down to this writer,
        # and so did files of this job that an earlier try's upload landed after it was given up.
        await self._take_down_if_dropped_again(job_id, bucket, source_key)

    async def _etag_there(self, bucket: str, key: str) -> str | None:
        """The ETag of the object at the drop key now; None when it is gone (removed by its user
        once taken, its results are still this job's)."""
        try:
            stat = await call_in_transaction(self.s3_quick.stat_object, bucket, key)
        except S3Error as exc:
            if not is_missing(exc):
                raise
            return None
        return _clean_etag(stat.etag)

    async def _remove_results(self, bucket: str, key: str) -> None:
        """The drop key's result files, removed (within the caller's transaction's bound)."""
        keys = result_keys(self.settings.results_prefix, key)
        await call_in_transaction(remove_objects, self.s3_quick, [(bucket, keys["json"]), (bucket, keys["srt"])])

    async def _take_down_older_results(self, bucket: str, key: str) -> None:
        """The key's result files, removed while its newest drop has not written its own. Not
        waited for when another holds them: a writer holds them across store calls of up to 30 s
        each, and the inbox consumer and the scan would stall meanwhile. That writer takes them
        down once it sees the newer drop, or the next scan does."""
        async with self.pool.acquire() as conn, conn.transaction():
            if (await try_lock_results_of(conn, bucket, key)
                    and not await jobstore.newest_drop_wrote_its_results(conn, bucket, key)):
                await self._remove_results(bucket, key)

    async def _take_down_if_dropped_again(self, job_id: int, bucket: str, key: str) -> None:
        """A newer drop of the key made while these results were written found them locked and
        left them to this writer. Checked once the lock is released, so that no drop can be made
        unseen between the check and the release."""
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                if not await jobstore.newer_drop_of_the_same_key(conn, job_id):
                    return
                await lock_results_of(conn, bucket, key)
                # The newest job's own results (a refused drop's are written at once) are not
                # touched; any other's would be read as the newest recording's.
                if await jobstore.newest_drop_wrote_its_results(conn, bucket, key):
                    return
                await self._remove_results(bucket, key)
        except Exception as exc:
            if not isinstance(exc, RESULTS_NOT_TAKEN_DOWN):
                raise
            log.warning("%s/%s was dropped again while these results were written, and they could not be taken"
                        " down (%s): the inbox scan tries again", bucket, loggable(key), loggable(exc))
            return
        log.info("results taken down: %s/%s was dropped again while they were written", bucket, loggable(key))

    async def on_job_ended(self, event: TranscriptCompleted | TranscriptFailed) -> None:
        """Each of the three, whatever became of the others (a result file the inbox bucket
        refuses must not keep a recording unredacted), except that the decoded audio stays while
        the recording is not redacted: it is what redaction reads. An error is raised after the
        steps ran, so that the message is retried (each step does nothing a second time). Result
        files the store took too long to take (StoreCallTimedOut) are left to the scan, which
        writes every ended drop's that are missing: held or retried here, one always too large
        for that bound would hold the message for ever, or park it."""
        job_id = event.transcript_id
        steps = {
            "writing the result files": lambda: self.write_result(job_id),
            "redacting the recording": lambda: redact_recording(self.pool, self.s3, self.settings.audio_bucket,
                                                                job_id),
            # The decoded PCM is an intermediate of the stages: once the job has ended nothing
            # reads it. (Already gone is no error, on the stores that answer 404 for it too.)
            "removing the decoded audio": lambda: asyncio.to_thread(
                remove_objects, self.s3, [(self.settings.audio_bucket, pcm_key(job_id))]),
        }
        failed: dict[str, Exception] = {}
        for what, step in steps.items():
            if what == "removing the decoded audio" and "redacting the recording" in failed:
                continue  # kept for the retry's redaction
            try:
                await step()
            except Exception as exc:
                if isinstance(exc, (*DATABASE_UNAVAILABLE, *STORAGE_UNAVAILABLE)):
                    raise  # an outage: the consumer waits it out and runs them all again
                with job_logged(job_id):
                    log.warning("%s failed (%s: %s); the other steps go on", what, type(exc).__name__,
                                loggable(exc))
                failed[what] = exc
        if isinstance(failed.get("writing the result files"), StoreCallTimedOut):
            del failed["writing the result files"]  # the scan writes them (warned above)
        if failed:
            raise next(iter(failed.values()))

    async def run_scanner(self) -> None:
        """The scan, by one ingest replica at a time: each would list the whole inbox and copy
        every unannounced drop into the audio bucket, all but one copy then thrown away."""
        await every(self.settings.inbox_scan_interval_s, self.pool, LockKey.INBOX_SCAN, self.reconcile,
                    "the inbox scan")

    async def run_consumers(self, connection: aio_pika.abc.AbstractRobustConnection, bus: Bus) -> None:
        """Consume on `connection`, publish (retries, parked copies) on `bus`'s (common.broker)."""
        async with connection.channel() as channel:
            await self._consume(connection, channel, bus)

    async def _consume(self, connection: aio_pika.abc.AbstractRobustConnection,
                       channel: aio_pika.abc.AbstractChannel, bus: Bus) -> None:
        job_ended = [Route(TranscriptCompleted, self.on_job_ended), Route(TranscriptFailed, self.on_job_ended)]
        # Not MinIO's exchange: one RabbitMQ refuses must not keep job ends from being taken.
        await declare_results_queue(connection, channel, self.settings)
        # One stopping stops the other, so that both start again together (not a second copy of one).
        async with asyncio.TaskGroup() as group:
            group.create_task(cancelled_inside_as_an_error(self._consume_inbox_events(connection, bus)))
            # An ending's redaction and the decoded audio's removal are never tried again later
            # (the result files are, by the scan): through a database or object-store outage the
            # message waits for it.
            group.create_task(cancelled_inside_as_an_error(consume(
                connection, self.settings, "ingest", job_ended, bus=bus, queue_name=RESULTS_QUEUE,
                wait_on=(*DATABASE_UNAVAILABLE, *STORAGE_UNAVAILABLE))))

    async def _consume_inbox_events(self, connection: aio_pika.abc.AbstractRobustConnection, bus: Bus) -> None:
        """MinIO's bucket events, once their queue is bound to MINIO_EVENTS_EXCHANGE. While
        RabbitMQ refuses that exchange, an error every MINIO_EXCHANGE_RETRY_S says why, and the
        job ends are taken meanwhile (their consumer runs beside this); the scan finds the drops."""
        stopping = runner.stopping()
        while True:
            try:
                await declare_inbox_events_queue(connection, self.settings)
                break
            except MINIO_EXCHANGE_REFUSED as exc:
                log.error("bucket drops' events are not taken: RabbitMQ refused MINIO_EVENTS_EXCHANGE %r as a durable"
                          " topic exchange bound to %s (%s: %s). Make it one (MinIO's"
                          " MINIO_NOTIFY_AMQP_DURABLE=on, EXCHANGE_TYPE=topic; delete the exchange it made), or let"
                          " ingest's RabbitMQ user configure it; tried again in %g s. Job ends are taken meanwhile,"
                          " and the inbox scan finds new drops every %g s", self.settings.minio_events_exchange,
                          INBOX_EVENTS_QUEUE, type(exc).__name__, exc, MINIO_EXCHANGE_RETRY_S,
                          self.settings.inbox_scan_interval_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), MINIO_EXCHANGE_RETRY_S)
                return  # the process is stopping
        await consume(connection, self.settings, "ingest", [Route(BucketEvent, self.on_event, any_routing_key=True)],
                      bus=bus, queue_name=INBOX_EVENTS_QUEUE, wait_on=(*DATABASE_UNAVAILABLE, *STORAGE_UNAVAILABLE))


class CancelledInside(Exception):
    """A consumer ended with a CancelledError that was not its task's own cancellation."""


async def cancelled_inside_as_an_error(work: Awaitable[None]) -> None:
    """`work`, whose CancelledError from inside (aiormq fails the calls pending on a connection it
    drops with one) is raised as CancelledInside: a TaskGroup takes a child that ends cancelled
    for one it cancelled itself, and would run on with the other consumer alone."""
    try:
        await work
    except asyncio.CancelledError as exc:
        if asyncio.current_task().cancelling():
            raise
        raise CancelledInside("cancelled from inside (a broker connection dropped under it)") from exc
