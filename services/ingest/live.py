"""Server-sent events for browsers and other clients that cannot hold an AMQP connection:
`GET /transcripts/{id}/events` (one job: its segments so far, then each new one, its progress,
and how it ended) and `GET /events` (every job of the caller: status, stage and percent as they
change).

What is streamed is read from PostgreSQL, so a stream always starts from the stored state and
a reconnect with `Last-Event-ID` resumes exactly after the last segment the client saw. Ingest's
own exclusive queues on `stt.events` wake the streams of the job an event is about, and the
streams of all jobs when a job ends (with a poll every POLL_S for what has no event: a new job,
a change of stage or percent). A job's segments are sent chunk by
chunk in chunk order (a chunk only once every chunk before it is stored), so "after segment
(chunk, index)" is a position that never moves back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Literal

import asyncpg
from aio_pika.abc import AbstractRobustConnection
from litestar import Request, Response, get
from litestar.datastructures import State
from litestar.exceptions import NotFoundException
from litestar.response import ServerSentEvent
from litestar.response.sse import ServerSentEventMessage
from pydantic import BaseModel

from common import jobstore
from common.broker import watch_job_events
from common.db import DATABASE_UNAVAILABLE
from common.logs import job_logged
from common.messages import TranscriptCompleted, TranscriptFailed
from services.ingest.auth import request_owner
from services.ingest.errors import error_responses
from services.ingest.jobs import percent_done, public_stage
from services.ingest.segments import TranscriptSegment, transcript_segment
from services.ingest.transcripts import JobId, visible

log = logging.getLogger(__name__)

POLL_S = 1.0
# A comment line this often keeps proxies from closing a quiet stream.
KEEPALIVE_S = 15.0
# Clients reconnect by themselves (EventSource waits `retry` ms); the stream then resumes.
RETRY_MS = 2000
END_ID = "end"


class Wakeups:
    """Who waits for news of which job (None: of any job); fed by exclusive queues on stt.events."""

    def __init__(self) -> None:
        self._waiting: dict[int | None, set[asyncio.Event]] = defaultdict(set)

    @contextlib.contextmanager
    def listen(self, job_id: int | None) -> Iterator[asyncio.Event]:
        """An event set whenever something happens to `job_id` (None: whenever a job ends)."""
        event = asyncio.Event()
        self._waiting[job_id].add(event)
        try:
            yield event
        finally:
            self._waiting[job_id].discard(event)
            if not self._waiting[job_id]:
                del self._waiting[job_id]

    def _wake(self, key: int | None) -> None:
        for event in self._waiting.get(key, ()):
            event.set()

    def _wake_job(self, job_id: int | None) -> None:
        if job_id is not None:
            self._wake(job_id)

    def _wake_all_jobs(self, _job_id: int | None) -> None:
        self._wake(None)

    async def run(self, connection: AbstractRobustConnection) -> None:
        """Wake the streams of every job that an event on stt.events is about, and the streams of
        all jobs at each job's end, until cancelled. Not those at each segment: they show status,
        stage and percent only, which their poll finds, and a busy server sends many segments a
        second to each of them."""
        channels = []
        try:
            channels.append(await watch_job_events(connection, "stt.ingest.live", ["#"], self._wake_job))
            channels.append(await watch_job_events(
                connection, "stt.ingest.live-ends", [TranscriptCompleted.ROUTING_KEY, TranscriptFailed.ROUTING_KEY],
                self._wake_all_jobs))
            await asyncio.Future()
        finally:  # stopped, or started again after a failure: no watch left running twice
            for channel in channels:
                with contextlib.suppress(Exception):
                    await channel.close()


def _opening(stream: str) -> ServerSentEventMessage:
    """What a stream begins with: which one it is, and how long an EventSource waits to reconnect."""
    return ServerSentEventMessage(data=None, comment=stream, retry=RETRY_MS, sep="\n")


async def _opening_only(stream: str) -> AsyncIterator[ServerSentEventMessage]:
    """A stream whose first read found PostgreSQL away: the opening, and the end. An EventSource
    reconnects after its `retry` and is answered in full once PostgreSQL is back."""
    yield _opening(stream)


def _event_stream(messages: AsyncIterator[ServerSentEventMessage]) -> ServerSentEvent:
    return ServerSentEvent(messages, headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


def _message(event: str, data: BaseModel, event_id: str | None = None) -> ServerSentEventMessage:
    return ServerSentEventMessage(data=data.model_dump_json(exclude_none=True), event=event, id=event_id, sep="\n")


def _position(last_event_id: str | None) -> tuple[int, int] | str | None:
    """Where a reconnecting client was: after segment (chunk, index), at the end, or nowhere."""
    if not last_event_id:
        return None
    if last_event_id == END_ID:
        return END_ID
    try:
        chunk, index = (int(part) for part in last_event_id.split(":"))
    except ValueError:
        return None
    # Not one this stream sent (PostgreSQL's integers end at 2**31): from the start, as for none.
    return (chunk, index) if 0 <= chunk < 2**31 and 0 <= index < 2**31 else None


class JobProgressEvent(BaseModel):
    """`job` on /events, `progress` on a job's stream."""

    id: int
    filename: str
    status: str
    stage: str
    percent: int


class SegmentEvent(TranscriptSegment):
    """`segment.created`: the segment as in /status, and whose it is."""

    transcript_id: int


class JobEndedEvent(JobProgressEvent):
    """`transcript.completed` (with `language`) or `transcript.failed` (with `reason`)."""

    transcript_id: int
    language: str | None = None
    reason: str | None = None
    reference: str | None = None


class JobGoneEvent(BaseModel):
    """`job.deleted` on /events: a job the stream had shown was deleted."""

    id: int


class JobDeletedEvent(BaseModel):
    """`transcript.deleted`: the job was deleted while its stream was open."""

    transcript_id: int


def _progress(job: asyncpg.Record) -> JobProgressEvent:
    return JobProgressEvent(id=job["id"], filename=job["filename"], status=job["status"],
                            stage=public_stage(job["stage"]), percent=percent_done(job["status"], job["progress"]))


# /events streams are woken by every job's end in the deployment, whoever owns it: at 5 ends a
# second, 500 open pages read PostgreSQL 2,500 times a second. A stream reads again no sooner than
# this after its last read, the wakes meanwhile taken together.
MIN_POLL_GAP_S = 0.25


async def _wait(wake: asyncio.Event, timeout: float) -> float:
    """Until woken (but MIN_POLL_GAP_S at least) or `timeout`; the seconds waited."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(wake.wait(), timeout)
    if (waited := loop.time() - started) < MIN_POLL_GAP_S:
        await asyncio.sleep(MIN_POLL_GAP_S - waited)
    wake.clear()
    return loop.time() - started


def _database_away(exc: Exception, stream: str, job_id: int | None = None) -> bool:
    """Whether `exc`, raised by a stream's read, is PostgreSQL being away; logged once if so. The
    stream then ends as a finished body: raised there, the error would reach the server after the
    response started ("Exception caught after response started", a traceback a second per open
    page). The client reconnects (EventSource after `retry`), and while the outage lasts each
    stream, a job's or the list's, is answered with its opening alone and ended at once (an
    EventSource given a 503 would stop for good)."""
    if not isinstance(exc, DATABASE_UNAVAILABLE):
        return False
    with job_logged(job_id):
        log.warning("%s ended: PostgreSQL is unavailable (%s)", stream, type(exc).__name__)
    return True


# What job_updates yields: a segment (where it is kept, and the segment), a change of progress,
# the job's end (its row), its deletion, or a quiet while in which nothing happened.
Segment = tuple[Literal["segment"], tuple[int, int], TranscriptSegment]
Progress = tuple[Literal["progress"], JobProgressEvent]
Ended = tuple[Literal["ended"], asyncpg.Record]
Deleted = tuple[Literal["deleted"]]
Quiet = tuple[Literal["quiet"]]


async def job_updates(pool: asyncpg.Pool, wakeups: Wakeups, job_id: int, after: tuple[int, int],
                      exiting: Callable[[], bool]) -> AsyncIterator[Segment | Progress | Ended | Deleted | Quiet]:
    """A job's segments after `after` in order as they are stored, its progress when it changes,
    then its end or deletion (the last update); a quiet every KEEPALIVE_S without news. PostgreSQL
    going away ends the updates too, with no last one (logged once, see _database_away)."""
    sent_progress = None
    quiet_s = 0.0
    with wakeups.listen(job_id) as wake:
        while not exiting():
            try:
                job = await jobstore.job(pool, job_id)
                # Read before the segments: a job seen ended has every segment it will have stored.
                # While it runs, segments go out in order, up to the first chunk still missing; once
                # it has ended (failed or cancelled with a chunk missing too) nothing more comes: all.
                ended = job is not None and job["status"] in ("done", "error")
                up_to_chunk = None if ended or job is None else await jobstore.stored_chunk_prefix(pool, job_id)
                rows = [] if job is None else await jobstore.segments_after(pool, job_id, after, up_to_chunk)
            except Exception as exc:
                if _database_away(exc, f"the event stream of job {job_id}", job_id):
                    return
                raise
            if job is None:
                yield ("deleted",)
                return
            for row in rows:
                after = (row["chunk_index"], row["index"])
                yield "segment", after, transcript_segment(row)
                quiet_s = 0.0
            progress = _progress(job)
            if progress != sent_progress:
                sent_progress = progress
                yield "progress", progress
                quiet_s = 0.0
            if ended:
                yield "ended", job
                return
            quiet_s += await _wait(wake, POLL_S)
            if quiet_s >= KEEPALIVE_S:
                quiet_s = 0.0
                yield ("quiet",)


def _job_stream_name(job_id: int) -> str:
    return f"stream of job {job_id}"


async def job_stream(pool: asyncpg.Pool, wakeups: Wakeups, job_id: int, last_event_id: str | None,
                     exiting: Callable[[], bool]) -> AsyncIterator[ServerSentEventMessage]:
    position = _position(last_event_id)
    if position == END_ID:
        return
    yield _opening(_job_stream_name(job_id))
    async for update in job_updates(pool, wakeups, job_id, position if isinstance(position, tuple) else (-1, -1),
                                    exiting):
        match update:
            case ("segment", (chunk, index), segment):
                yield _message("segment.created", SegmentEvent(transcript_id=job_id, **dict(segment)),
                               f"{chunk}:{index}")
            case ("progress", progress):
                yield _message("progress", progress)
            case ("ended", job):
                done = job["status"] == "done"
                yield _message("transcript.completed" if done else "transcript.failed", JobEndedEvent(
                    **dict(_progress(job)), transcript_id=job_id, reference=job["reference"],
                    language=job["language"] if done else None, reason=None if done else job["error"]), END_ID)
            case ("deleted",):
                yield _message("transcript.deleted", JobDeletedEvent(transcript_id=job_id), END_ID)
            case ("quiet",):
                yield ServerSentEventMessage(data=None, comment="keep-alive", sep="\n")


async def jobs_stream(pool: asyncpg.Pool, wakeups: Wakeups, owner: str | None,
                      exiting: Callable[[], bool]) -> AsyncIterator[ServerSentEventMessage]:
    """`job` events: every recent job of the owner once (the 100 newest), then each change. A job
    sent while it was processing is followed until it ends, also once newer ones push it out of
    the 100 (a batch of 150 uploads). A job sent that is then deleted gets a `job.deleted`.
    PostgreSQL going away ends the stream (logged once, see _database_away): an EventSource
    reconnects after the `retry` the stream begins with, and is answered again once it is back
    (a 503 would stop it for good)."""
    sent: dict[int, JobProgressEvent] = {}
    quiet_s = 0.0
    yield _opening("stream of jobs")
    with wakeups.listen(None) as wake:
        while not exiting():
            try:
                recent = await jobstore.recent_jobs(pool, owner)
                in_view = {row["id"] for row in recent}
                outside = [job_id for job_id in sent if job_id not in in_view]
                still_there = ({row["id"]: row for row in await jobstore.jobs_progress(pool, outside)}
                               if outside else {})
            except Exception as exc:
                if _database_away(exc, "an event stream of jobs"):
                    return
                raise
            earlier = []
            for job_id in outside:
                if job_id not in still_there:
                    # Deleted (in another tab, from the CLI): a list showing it says so.
                    del sent[job_id]
                    yield _message("job.deleted", JobGoneEvent(id=job_id))
                    quiet_s = 0.0
                elif sent[job_id].status == "processing":
                    earlier.append(still_there[job_id])  # followed to its end
                else:
                    del sent[job_id]  # its end was sent: nothing more to tell
            for row in [*earlier, *reversed(recent)]:
                progress = _progress(row)
                if sent.get(row["id"]) != progress:
                    sent[row["id"]] = progress
                    yield _message("job", progress)
                    quiet_s = 0.0
            quiet_s += await _wait(wake, POLL_S)
            if quiet_s >= KEEPALIVE_S:
                quiet_s = 0.0
                yield ServerSentEventMessage(data=None, comment="keep-alive", sep="\n")


def server_exiting(state: State) -> Callable[[], bool]:
    """Asked by a stream between waits: true once the server is shutting down."""
    return getattr(state, "exiting", None) or (lambda: False)


@get("/transcripts/{job_id:int}/events", summary="A job's events as they happen (text/event-stream)",
     responses=error_responses(400, 401, 403, 404, 503), media_type="text/event-stream")
async def job_events(job_id: JobId, state: State, request: Request) -> ServerSentEvent | Response:
    """`segment.created` for each segment stored so far and each new one (id `chunk:index`), `progress`
    (status, stage, percent) when it changes, then `transcript.completed` or `transcript.failed`
    (id `end`), and the stream ends. Reconnect with `Last-Event-ID` to resume after the last
    segment received; after the end (`Last-Event-ID: end`) the answer is 204, which stops an
    EventSource from reconnecting. While PostgreSQL is away the stream is its opening alone, as
    /events's is, for any id (it tells nothing): a 503 would stop an EventSource for good, and one
    reconnecting after `retry` gets the 404, or the rest of the job, once PostgreSQL is back."""
    if _position(request.headers.get("last-event-id")) == END_ID:
        return Response(content=None, status_code=204)
    try:
        job = await jobstore.job(state.pool, job_id)
    except Exception as exc:
        if _database_away(exc, f"the event stream of job {job_id}", job_id):
            return _event_stream(_opening_only(_job_stream_name(job_id)))
        raise
    if not visible(job, request_owner(request)):
        raise NotFoundException(detail=f"no job with id {job_id}")
    return _event_stream(job_stream(state.pool, state.wakeups, job_id, request.headers.get("last-event-id"),
                                    server_exiting(state)))


@get("/events", summary="Status, stage and percent of all your jobs as they change (text/event-stream)",
     responses=error_responses(401, 403, 503), media_type="text/event-stream")
async def all_events(state: State, request: Request) -> ServerSentEvent:
    """A `job` event ({id, filename, status, stage, percent}) for each recent job at first (the
    processing ones and those that changed in the last hour, 100 at most), then one whenever a
    job of yours is created or moves on; `job.deleted` ({id}) when one of those sent is deleted."""
    return _event_stream(jobs_stream(state.pool, state.wakeups, request_owner(request), server_exiting(state)))


LIVE_ROUTES = [job_events, all_events]
