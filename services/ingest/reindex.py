"""Re-embedding stored segments with the current embedding model (after EMBEDDING_BACKEND,
MODEL_NAME_EMBEDDED or LOCAL_EMBEDDING_MODEL changed), so search covers every transcript:
`POST /admin/reindex` starts it in the ingest process, `GET /admin/reindex` shows how far it is,
`stt reindex` does both. It goes job by job (ended jobs, oldest first), one transaction per job,
then waits for the jobs that were running as the model changed (with segments in the old one)
to end and does them too. Only jobs there when the run began: a job started since is the
embedder's, which embeds it with the new model once it was switched (one it embeds with another
model says it was not: a WARNING, the run leaves it, and its outcome says so). Its counts are of
its jobs only (a job started since and cancelled before it was embedded is none of its work).
What is left is whatever is not yet in the current model, so a restarted ingest resumes by asking
again. One run at a time across replicas, its outcome (and the newest job it covers) kept in
`reindex_runs`. With API keys on, only ADMIN_API_KEY may call it.

Apart from runs, `embed_corrections` gives a vector every minute to the segments corrected by
hand while the embedding service was away, so search by meaning finds them once it is back, and
announces each in a segment.updated carrying it (its correction's went out without one); a
text the service refuses is marked as a run marks it, and not tried again with that model."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable

import asyncpg
from litestar import Request, get, post
from litestar.datastructures import State
from pydantic import BaseModel

from common import jobstore, searchstore
from common.db import DATABASE_UNAVAILABLE, LockKey, connection_outside, every
from common.logs import job_logged
from services.embedder.backends import OLLAMA_UNAVAILABLE, EmbedFn, one_text_may_cause
from services.embedder.handler import embed_one_by_one
from services.ingest.auth import admin_only
from services.ingest.corrections import announce_segment
from services.ingest.errors import error_responses

log = logging.getLogger(__name__)

BATCH = 256  # texts per embedding call


class ReindexProgress(BaseModel):
    model: str
    running: bool
    # Of the run's jobs (those there as it began; every job where none ran yet): segments embedded
    # with `model`, and those still to do: of ended jobs, every other; of running ones, those
    # embedded with another model (the embedder's before the switch). Jobs started since are the
    # embedder's.
    done_segments: int
    pending_segments: int
    # Running jobs with segments embedded with another model: a run waits for them to end, then
    # re-embeds them, before it is done.
    waiting_jobs: int = 0
    error: str | None = None
    # The run, ended, saw a job started since it began embedded with another model: the embedder
    # was not switched, and the run left such jobs.
    embedder_not_switched: bool = False


# Jobs that fail one after another: the embedding service fails every text, or what it gives cannot
# be stored (a vector of another dimension than the model's), and every later job would fail the
# same. A text the service refuses fails no job: it is stored without a vector.
STOP_AFTER_FAILED_JOBS = 3
FAILED_JOBS_LISTED = 20
CORRECTIONS_INTERVAL_S = 60.0
COUNTS_FRESH_S = 10.0
INTERRUPTED = "interrupted (its ingest stopped midway); POST /admin/reindex again to resume"
LOCK_LOST = "stopped: its database session, which keeps other runs out, was lost; POST /admin/reindex again to resume"
# How often a run that has done every ended job looks whether the running jobs it waits for ended.
RUNNING_JOBS_CHECK_S = 10.0


class LockLost(Exception):
    """The session holding the run's advisory lock is gone: another replica may start a run."""


class Reindexer:
    """One run at a time across every ingest replica (an advisory lock); its end, and why it
    stopped, in `reindex_runs`, so any replica reports the same."""

    def __init__(self, pool: asyncpg.Pool, embed: EmbedFn, model: str):
        self.pool, self.embed, self.model = pool, embed, model
        # A text the service embedded in this run: asked again, it tells a service that is up
        # and refuses some texts from one that fails every text.
        self._embedded_text: str | None = None
        self.task: asyncio.Task | None = None
        # When the segments were last counted, whether a run was under way then, up to which job,
        # and the counts.
        self._counts: tuple[float, bool, int, asyncpg.Record] | None = None
        self._counting = asyncio.Lock()
        # The dimensions whose search index this run could not build: not tried again in the run.
        self._unindexed: set[int] = set()

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def start(self) -> None:
        if not self.running:
            self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        # A session lock, held while the run goes on (hours on a large store), on a connection of
        # its own, as `every` holds its locks, and the search index built on it too: one of the
        # requests' pool would be taken all that while. The lock goes if this replica dies.
        conn = await connection_outside(self.pool)
        try:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", LockKey.REINDEX):
                return  # another replica's run is under way
            try:
                # The jobs there as the run begins, the run's (its counts are theirs): those started
                # since are not waited for (the embedder does them; one not yet switched would keep
                # the run going for ever).
                newest = await searchstore.newest_job(self.pool)
                started_at = await self.pool.fetchval(
                    "INSERT INTO reindex_runs (model, newest_job, bounds_started_at) VALUES ($1, $2, now())"
                    " ON CONFLICT (model) DO UPDATE SET started_at = now(), ended_at = NULL, error = NULL,"
                    " newest_job = EXCLUDED.newest_job, embedder_not_switched = false, bounds_started_at = now()"
                    " RETURNING started_at",
                    self.model, newest)
                error, not_switched = await self._reindex_all(conn, newest)
                # On a connection of the pool's: the lock's own may have died with a restart. Only
                # this run's row: with its lock lost, another replica's run may have begun since.
                await self.pool.execute(
                    "UPDATE reindex_runs SET ended_at = now(), error = $2, embedder_not_switched = $4"
                    " WHERE model = $1 AND started_at = $3", self.model, error, started_at, not_switched)
            finally:
                # Before the close: a closed session's lock goes only once its backend has ended, a
                # moment later, and a replica asked meanwhile would still read the run as under way.
                with contextlib.suppress(Exception):  # a dead connection took the lock with it
                    await conn.execute("SELECT pg_advisory_unlock($1)", LockKey.REINDEX)
        finally:
            try:
                await conn.close(timeout=10)
            except Exception:
                conn.terminate()

    async def _reindex_all(self, lock_holder: asyncpg.Connection, newest: int) -> tuple[str | None, bool]:
        """Every ended job not yet in the model, oldest first; then, while jobs that were running
        as the model changed still run (their early segments in the old model), waits for them
        to end and re-embeds them too. Only the jobs there as the run began (up to job `newest`):
        it ends while new ones keep coming. None, or why some are left; and whether the embedder
        embedded a job started since with another model (embedder_not_switched). A text the service refuses is stored
        without a vector (so a resumed run does not stop again at the same jobs, which it does not
        remember); a job that fails anyway is passed over, and the run stops when several in a
        row fail. It stops too when `lock_holder`, the session holding the run's lock, is gone:
        every replica then reads the run as interrupted, and one POST there would start a second.
        Search indexes are built on `lock_holder` (a build takes minutes, hours on a large store)."""
        log.info("re-embedding stored segments with %s", self.model)
        jobs, failed, failed_in_a_row = 0, [], 0
        self._unindexed.clear()
        warned = False

        async def still_the_only_run() -> None:
            try:
                await lock_holder.fetchval("SELECT 1")
            except Exception as exc:
                raise LockLost(f"{type(exc).__name__}: {exc}") from exc

        async def reindex(job_id: int) -> None:
            nonlocal jobs, failed_in_a_row
            await still_the_only_run()
            try:
                await self._reindex_job(job_id, lock_holder)
            except Exception as exc:
                if isinstance(exc, DATABASE_UNAVAILABLE):
                    await still_the_only_run()  # the lock's session lost in an index build on it
                if isinstance(exc, (*DATABASE_UNAVAILABLE, *OLLAMA_UNAVAILABLE)):
                    raise  # the database or the embedding service away: no job of them would go
                with job_logged(job_id):
                    log.exception("could not re-embed this job; going on with the next")
                failed.append(job_id)
                failed_in_a_row += 1
                if failed_in_a_row >= STOP_AFTER_FAILED_JOBS:
                    raise
                return
            jobs += 1
            failed_in_a_row = 0

        async def embedder_not_switched() -> None:
            """Warns (once a run) where the embedder embeds jobs started since the run began with
            another model: it was not switched, and every new job stays to do."""
            nonlocal warned
            if warned:
                return
            if (seen := await searchstore.embedded_with_another_model_after(self.pool, self.model, newest)):
                warned = True
                log.warning("job %d, started after this run began, was embedded with %s, not %s: the embedder"
                            " was not switched to the new model (EMBEDDING_BACKEND, MODEL_NAME_EMBEDDED,"
                            " LOCAL_EMBEDDING_MODEL); this run leaves such jobs, POST /admin/reindex again"
                            " once it is", seen["transcript_id"], seen["embedding_model"], self.model)

        try:
            while True:
                after, found = 0, False
                while (job_id := await searchstore.next_job_to_reindex(self.pool, self.model, after,
                                                                       failed, newest)) is not None:
                    after, found = job_id, True
                    await reindex(job_id)
                waiting = set(await searchstore.running_jobs_to_reindex(self.pool, self.model, newest))
                await embedder_not_switched()
                if not waiting and not found:
                    break
                # Jobs that ran as the model changed, their first segments in the old one: once
                # they have ended, the next pass does them (and any job that ended during this one).
                told = 0
                while waiting:
                    if len(waiting) != told:
                        log.info("waiting for %d running jobs with segments embedded with another model to end",
                                 told := len(waiting))
                    await asyncio.sleep(RUNNING_JOBS_CHECK_S)
                    await still_the_only_run()
                    waiting = set(await searchstore.running_jobs_to_reindex(self.pool, self.model, newest))
                    await embedder_not_switched()
        except LockLost as exc:
            log.warning("re-embedding stopped after %d jobs: the database session holding the run's lock is gone"
                        " (%s)", jobs, exc)
            return LOCK_LOST, warned
        except Exception as exc:
            log.exception("re-embedding stopped after %d jobs", jobs)
            return f"{type(exc).__name__}: stopped; POST /admin/reindex again to resume", warned
        log.info("re-embedding done: %d jobs now embedded with %s, %d not", jobs, self.model, len(failed))
        if failed:
            listed = ", ".join(map(str, failed[:FAILED_JOBS_LISTED]))
            listed += ", ..." if len(failed) > FAILED_JOBS_LISTED else ""
            return (f"{len(failed)} jobs could not be embedded (ingest's log says why): {listed};"
                    " POST /admin/reindex again to try them again"), warned
        return None, warned

    async def _reindex_job(self, job_id: int, build_index_on: asyncpg.Connection | None = None) -> None:
        with job_logged(job_id):
            rows = await searchstore.segments_to_reindex(self.pool, job_id, self.model)
            vectors = []
            for i in range(0, len(rows), BATCH):
                batch = rows[i:i + BATCH]
                texts = [r["text"] for r in batch]
                try:
                    embedded: list[list[float] | None] = await self.embed(texts)
                    self._embedded_text = texts[0]
                except Exception as exc:
                    if not one_text_may_be_why(exc):
                        raise
                    log.warning("embedding %d segments failed (%s: %s); embedding them one by one", len(texts),
                                type(exc).__name__, str(exc)[:200])
                    embedded, refused, self._embedded_text = await embed_one_by_one(
                        self.embed, texts, exc, self._embedded_text, one_text_may_be_why)
                    for position, why in refused:
                        log.warning("segment %d/%d is refused by the embedding service (%s: %s); stored without"
                                    " a vector", batch[position]["chunk_index"], batch[position]["index"],
                                    type(why).__name__, str(why)[:200])
                vectors += [(r["chunk_index"], r["index"], r["text"], v) for r, v in zip(batch, embedded)]
        # The model's index serves every job, not this one: its lines (and its failure) name none.
        if (dimensions := next((len(v[3]) for v in vectors if v[3] is not None), None)) is not None:
            await self._ensure_index(dimensions, build_index_on)
        with job_logged(job_id):
            async with self.pool.acquire() as conn, conn.transaction():
                await searchstore.store_reindexed(conn, job_id, self.model, vectors)
            log.info("re-embedded %d segments with %s", len(vectors), self.model)

    async def _ensure_index(self, dimensions: int, build_on: asyncpg.Connection | None) -> None:
        """The model's search index, built once the first vectors of `dimensions` are in hand. A
        build that fails but for an outage (which stops the run) fails no job: search by meaning
        works without the index, only slower, and the vectors are stored all the same, as the
        persister stores them. It is logged once and not tried again in this run (a build reads
        every segment of the model); the embedder's next vectors, or the next run, try again."""
        if dimensions in self._unindexed:
            return
        try:
            await searchstore.ensure_vector_index(self.pool, self.model, dimensions, build_on)
        except Exception as exc:
            if isinstance(exc, DATABASE_UNAVAILABLE):
                raise
            self._unindexed.add(dimensions)
            log.exception("could not build the search index of %s (%d dimensions); storing its vectors without it,"
                          " search by meaning reads every segment of it meanwhile", self.model, dimensions)

    async def _segment_counts(self, running: bool, up_to: int, earlier_counts_will_do: bool = False) -> asyncpg.Record:
        """reindex_counts up to job `up_to`, read at most every COUNTS_FRESH_S while a run goes on:
        it reads every segment, and `stt reindex` asks every second for as long as a run lasts
        (hours on a large store). Once no run goes on, the counts are read again: they are the
        outcome. `earlier_counts_will_do`: counts read within COUNTS_FRESH_S before the run began
        are as good (the answer to the request that starts it)."""
        async with self._counting:
            if self._counts is not None and running:
                read_at, during_a_run, counted_up_to, counts = self._counts
                fresh = asyncio.get_running_loop().time() - read_at < COUNTS_FRESH_S
                if fresh and (during_a_run or earlier_counts_will_do) and counted_up_to == up_to:
                    return counts
            counts = await searchstore.reindex_counts(self.pool, self.model, up_to)
            # Dated once read: dated from the start, counts that took longer than COUNTS_FRESH_S to
            # read (a large store) were stale on arrival, and every poll read them all again.
            self._counts = asyncio.get_running_loop().time(), running, up_to, counts
            return counts

    async def _under_way_anywhere(self) -> bool:
        """Under way here or in another replica (pg_locks spells a bigint key as two halves)."""
        return self.running or await self.pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1"
            " AND classid::bigint = $1 AND objid::bigint = $2"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))",
            LockKey.REINDEX >> 32, LockKey.REINDEX & 0xFFFFFFFF)

    async def progress(self, earlier_counts_will_do: bool = False) -> ReindexProgress:
        running = await self._under_way_anywhere()
        run = await self.pool.fetchrow(
            # newest_job and embedder_not_switched are the run's own only where it wrote them: a run
            # begun by an ingest from before migration 036 (a rolling upgrade) leaves an earlier
            # run's there, and is read as one with no bounds (every job; not said unswitched).
            "SELECT ended_at, error, CASE WHEN bounds_started_at = started_at THEN newest_job END AS newest_job,"
            " bounds_started_at = started_at AND embedder_not_switched AS embedder_not_switched"
            " FROM reindex_runs WHERE model = $1", self.model)
        if not running and run is not None and run["ended_at"] is None:
            # Begun since the look above (it holds the lock before it marks its row), or cut short.
            running = await self._under_way_anywhere()
        error, not_switched = None, False
        if not running and run is not None:
            # A run cancelled as its ingest stops, or whose replica died, wrote no end.
            error = run["error"] if run["ended_at"] is not None else INTERRUPTED
            not_switched = bool(run["embedder_not_switched"])
        # The counts of the run's jobs, up to the newest there as it began: a job started since,
        # cancelled or failed before the embedder embedded it, is not the run's to do. A run under
        # way that has not marked its row yet (the row, if any, an earlier run's) takes every job
        # there now, as every job is where no run has been.
        newest = await searchstore.newest_job(self.pool)
        its_own_row = run is not None and not (running and run["ended_at"] is not None)
        up_to = newest if not its_own_row or run["newest_job"] is None else min(run["newest_job"], newest)
        counts = await self._segment_counts(running, up_to, earlier_counts_will_do)
        return ReindexProgress(model=self.model, running=running, done_segments=counts["done"],
                               pending_segments=counts["pending"], waiting_jobs=counts["waiting_jobs"], error=error,
                               embedder_not_switched=not_switched)


def one_text_may_be_why(exc: BaseException) -> bool:
    """The embedder's one_text_may_cause, less the database's outages, which stop the run."""
    return one_text_may_cause(exc) and not isinstance(exc, DATABASE_UNAVAILABLE)


async def embed_corrections(pool: asyncpg.Pool, embed: EmbedFn, model: str,
                            outbox_wake: asyncio.Event | None = None) -> int:
    """Vectors for the hand-corrected segments left without one; how many got one. Each is
    announced in a segment.updated carrying it (see _store_corrections), and `outbox_wake` set
    to publish them at once. While the embedding service is away they wait for the next turn.
    Where a batch fails in a way one text may cause, its texts are embedded one by one as in a
    run: a text still refused is stored without a vector, marked with the model (as a run marks
    it), and not tried again with it, so that refused texts hold up none after them, at this turn
    or any later one."""
    stored, after = 0, (0, -1, -1)
    embedded_text: str | None = None  # for embed_one_by_one: one the service embedded this turn
    while rows := await searchstore.corrected_segments_without_vector(pool, model, after, BATCH):
        after = (rows[-1]["transcript_id"], rows[-1]["chunk_index"], rows[-1]["index"])
        texts = [r["text"] for r in rows]
        try:
            vectors: list[list[float] | None] = await embed(texts)
            embedded_text = texts[0]
        except Exception as exc:
            try:
                if not one_text_may_be_why(exc):
                    raise
                vectors, refused, embedded_text = await embed_one_by_one(embed, texts, exc, embedded_text,
                                                                         one_text_may_be_why)
            except Exception as failing:
                log.warning("segments corrected by hand still have no vector (%s: %s); trying again in %.0f s",
                            type(failing).__name__, str(failing)[:200], CORRECTIONS_INTERVAL_S)
                return stored
            for position, why in refused:
                with job_logged(rows[position]["transcript_id"]):
                    log.warning("segment %d/%d, corrected by hand, is refused by the embedding service (%s: %s);"
                                " left without a vector, not tried again with %s", rows[position]["chunk_index"],
                                rows[position]["index"], type(why).__name__, str(why)[:200], model)
        given = await _store_corrections(pool, model, list(zip(rows, vectors)))
        if given and outbox_wake is not None:
            outbox_wake.set()
        stored += given
    return stored


async def _store_corrections(pool: asyncpg.Pool, model: str,
                             embedded: list[tuple[asyncpg.Record, list[float] | None]]) -> int:
    """Stores the vectors (None: refused, marked with the model); how many were stored. A segment
    given its vector is announced in the same transaction: a segment.updated carrying it, as a
    correction made with the service there carries it (its correction's went out without one,
    and subscribers keeping vectors from the events would keep the old text's, or none). One
    whose text was corrected again since it was read keeps waiting for its own, and is not told."""
    if (dimensions := next((len(v) for _, v in embedded if v is not None), None)) is not None:
        await searchstore.ensure_vector_index(pool, model, dimensions)
    stored = 0
    for job_id, group in itertools.groupby(embedded, key=lambda pair: pair[0]["transcript_id"]):
        group = list(group)
        async with pool.acquire() as conn, conn.transaction():
            # Locked before the vectors are stored: a correction made meanwhile then waits for this
            # transaction, and the segments whose text is still the one embedded are those stored.
            now = [await jobstore.lock_segment(conn, job_id, r["chunk_index"], r["index"]) for r, _ in group]
            await searchstore.store_reindexed(conn, job_id, model, [(r["chunk_index"], r["index"], r["text"], v)
                                                                 for r, v in group])
            given = [(r, v) for (r, v), segment in zip(group, now)
                     if v is not None and segment is not None and segment["text"] == r["text"]]
            for r, v in given:
                await announce_segment(conn, job_id, r["chunk_index"], r["index"], v, model)
        if given:
            with job_logged(job_id):
                log.info("%d segments corrected by hand embedded with %s", len(given), model)
        stored += len(given)
    return stored


def run_corrections_embedder(pool: asyncpg.Pool, embed: EmbedFn, model: str,
                             outbox_wake: asyncio.Event | None = None) -> Awaitable[None]:
    """`outbox_wake`: the outbox flusher's, set when segment.updated events were added (without
    it they go out at the flusher's next turn, every 2 s)."""
    return every(CORRECTIONS_INTERVAL_S, pool, LockKey.CORRECTIONS,
                 lambda: embed_corrections(pool, embed, model, outbox_wake), "embedding corrected segments")


@post("/admin/reindex", status_code=202, summary="Re-embed stored segments with the current model",
      responses=error_responses(401, 403, 503))
async def start_reindex(state: State, request: Request) -> ReindexProgress:
    admin_only(state.settings, request, "re-embed transcripts")
    state.reindexer.start()
    return await state.reindexer.progress(earlier_counts_will_do=True)


@get("/admin/reindex", summary="How far re-embedding is", responses=error_responses(401, 403, 503))
async def reindex_progress(state: State, request: Request) -> ReindexProgress:
    admin_only(state.settings, request, "re-embed transcripts")
    return await state.reindexer.progress()


REINDEX_ROUTES = [start_reindex, reindex_progress]
