"""Re-embedding stored segments with the current embedding model (after EMBEDDING_BACKEND,
MODEL_NAME_EMBEDDED or LOCAL_EMBEDDING_MODEL changed), so search covers every transcript:
`POST /admin/reindex` starts it in the ingest process, `GET /admin/reindex` shows how far it is,
`stt reindex` does both. It goes job by job (ended jobs, oldest first), one transaction per job,
and keeps no state of its own: what is left is whatever is not yet in the current model, so a
restarted ingest resumes by asking again. With API keys on, only ADMIN_API_KEY may call it."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
from litestar import Request, get, post
from litestar.datastructures import State
from pydantic import BaseModel

from common import jobstore
from common.logs import job_logged
from services.embedder.backends import EmbedFn
from services.ingest.auth import admin_only
from services.ingest.errors import error_responses

log = logging.getLogger(__name__)

BATCH = 256  # texts per embedding call


class ReindexProgress(BaseModel):
    model: str
    running: bool
    # Segments of ended jobs embedded with `model`, and those still to do.
    done_segments: int
    pending_segments: int
    error: str | None = None


class Reindexer:
    """At most one run at a time per ingest process."""

    def __init__(self, pool: asyncpg.Pool, embed: EmbedFn, model: str):
        self.pool, self.embed, self.model = pool, embed, model
        self.task: asyncio.Task | None = None
        self.error: str | None = None

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def start(self) -> None:
        if not self.running:
            self.error = None
            self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        log.info("re-embedding stored segments with %s", self.model)
        jobs = 0
        try:
            while (job_id := await jobstore.next_job_to_reindex(self.pool, self.model)) is not None:
                await self._reindex_job(job_id)
                jobs += 1
        except Exception as exc:
            self.error = f"{type(exc).__name__}: stopped; POST /admin/reindex again to resume"
            log.exception("re-embedding stopped after %d jobs", jobs)
            return
        log.info("re-embedding done: %d jobs now embedded with %s", jobs, self.model)

    async def _reindex_job(self, job_id: int) -> None:
        with job_logged(job_id):
            rows = await jobstore.segments_to_reindex(self.pool, job_id, self.model)
            vectors = []
            for i in range(0, len(rows), BATCH):
                batch = rows[i:i + BATCH]
                embedded = await self.embed([r["text"] for r in batch])
                vectors += [(r["chunk_index"], r["index"], r["text"], v) for r, v in zip(batch, embedded)]
            if vectors:
                await jobstore.ensure_vector_index(self.pool, self.model, len(vectors[0][3]))
            async with self.pool.acquire() as conn, conn.transaction():
                await jobstore.store_reindexed(conn, job_id, self.model, vectors)
            log.info("re-embedded %d segments with %s", len(vectors), self.model)

    async def progress(self) -> ReindexProgress:
        counts = await jobstore.reindex_counts(self.pool, self.model)
        return ReindexProgress(model=self.model, running=self.running, done_segments=counts["done"],
                               pending_segments=counts["pending"], error=self.error)


@post("/admin/reindex", status_code=202, summary="Re-embed stored segments with the current model",
      responses=error_responses(401, 403, 503))
async def start_reindex(state: State, request: Request) -> ReindexProgress:
    admin_only(state.settings, request, "re-embed transcripts")
    state.reindexer.start()
    return await state.reindexer.progress()


@get("/admin/reindex", summary="How far re-embedding is", responses=error_responses(401, 403, 503))
async def reindex_progress(state: State, request: Request) -> ReindexProgress:
    admin_only(state.settings, request, "re-embed transcripts")
    return await state.reindexer.progress()


REINDEX_ROUTES = [start_reindex, reindex_progress]
