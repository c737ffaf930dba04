"""Search in PostgreSQL: every statement of the search over `segments` (by words, and by meaning
through pgvector's HNSW indexes, one per embedding model), the building of those indexes, and the
re-embedding of stored segments with another model. Plain async functions over an asyncpg
connection or pool, as in common.jobstore."""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import html
import logging
from collections.abc import Sequence
from datetime import datetime

import asyncpg

from common.db import LONG_STATEMENT_TIMEOUT_S, LockKey
from common.jobstore import SEGMENT_TEXT_LANGUAGE, SPEAKER_NAME_JOIN, Db, conditions_set

log = logging.getLogger(__name__)

# ---- search indexes (the persister, reindexing) ------------------------------------------------

_indexed: set[tuple[str, int]] = set()


# pgvector's HNSW indexes take vectors of up to 2,000 dimensions, half-precision ones up to 4,000.
# A model with more (qwen3-embedding:8b gives 4,096) is searched without an index.
HNSW_MAX_DIMENSIONS = {"vector": 2000, "halfvec": 4000}


def _indexed_as(dimensions: int) -> str | None:
    """The type a model's vectors are indexed (and compared) as, or None: too long to index."""
    return next((kind for kind, most in HNSW_MAX_DIMENSIONS.items() if dimensions <= most), None)


async def ensure_vector_index(pool: asyncpg.Pool, model: str, dimensions: int,
                              build_on: asyncpg.Connection | None = None) -> None:
    """An HNSW cosine index over the segments of one embedding model (vectors of one model all
    have its dimension; an index needs a fixed one). Built CONCURRENTLY: a plain build locks
    `segments` against writes while it reads the whole table (minutes on a large store), and
    every persister, correction and delete would wait. Run outside any transaction. `build_on`:
    a connection of the caller's own (a reindex's) to build on, instead of one of `pool`'s held
    for the whole build."""
    if (model, dimensions) in _indexed:
        return
    kind = _indexed_as(dimensions)
    if kind is None:
        log.warning("embedding model %s gives %d dimensions, more than pgvector can index (%d): semantic"
                    " search reads every segment of it", model, dimensions, HNSW_MAX_DIMENSIONS["halfvec"])
        _indexed.add((model, dimensions))
        return
    if build_on is not None:
        there = await _build_vector_index(build_on, model, dimensions, kind)
    else:
        async with pool.acquire() as conn:
            there = await _build_vector_index(conn, model, dimensions, kind)
    if there:
        _indexed.add((model, dimensions))


async def _build_vector_index(conn: asyncpg.Connection, model: str, dimensions: int, kind: str) -> bool:
    """ensure_vector_index's build on `conn`; whether the index is there now."""
    name = "segments_embedding_" + hashlib.sha256(f"{model}:{dimensions}".encode()).hexdigest()[:16]
    literal = model.replace("'", "''")
    # One builder at a time (among every process). The others do not wait for it: a concurrent
    # build takes in the rows written while it runs, so they store their vectors and look again
    # next time (waiting would hold their connections for the whole build).
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", LockKey.VECTOR_INDEX):
        return bool(await _index_valid(conn, name))
    try:
        valid = await _index_valid(conn, name)
        # A build over a large store, and the drop of one cut short (each waits for every older
        # transaction), outlast any statement_timeout set for the role's queries, and the
        # pool's DATABASE_COMMAND_TIMEOUT_S. (Put back after; the pool also resets the setting
        # when its connection goes back.)
        await conn.execute("SET statement_timeout = 0")
        if valid is False:  # a build cut short (a CONCURRENTLY build leaves its index invalid)
            log.warning("the index of %s was left half built: building it again", model)
            await conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}", timeout=LONG_STATEMENT_TIMEOUT_S)
        if not valid:
            log.info("building the search index of %s (%d dimensions)", model, dimensions)
            await conn.execute(
                f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON segments USING hnsw"
                f" ((embedding::{kind}({int(dimensions)})) {kind}_cosine_ops) WHERE embedding_model = '{literal}'",
                timeout=LONG_STATEMENT_TIMEOUT_S)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", LockKey.VECTOR_INDEX)
        await conn.execute("RESET statement_timeout")
    return True


_index_builds: dict[tuple[str, int], asyncio.Task] = {}


def build_vector_index_soon(pool: asyncpg.Pool, model: str, dimensions: int) -> None:
    """ensure_vector_index in the background: vectors are stored without the index, and a build
    takes minutes on a large store (waiting, too, for every transaction older than it), which a
    message being handled must not wait for. One that fails is logged and tried again next time."""
    key = (model, dimensions)
    if key in _indexed or (key in _index_builds and not _index_builds[key].done()):
        return

    async def build() -> None:
        try:
            await ensure_vector_index(pool, model, dimensions)
        except Exception:  # noqa: BLE001 (search works without the index, only slower)
            log.exception("could not build the search index of %s; it is tried again with the next vectors", model)

    # In a context of its own: a copy of the triggering message's would stamp that message's job on
    # every line of a build that outlives it and serves every job.
    _index_builds[key] = asyncio.create_task(build(), context=contextvars.Context())


async def _index_valid(conn: asyncpg.Connection, name: str) -> bool | None:
    """Whether the index `name` is usable, None when there is none."""
    return await conn.fetchval("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)", name)


# ---- search (ingest) --------------------------------------------------------------------------

# A query is matched in each language's stemming at once: a segment is indexed in its own language
# (its transcript's, unless the recording switches language), and the person searching need not say
# which that was.
_TEXT_QUERY = ("(websearch_to_tsquery('english', $1) || websearch_to_tsquery('russian', $1)"
               " || websearch_to_tsquery('simple', $1))")
_SEGMENT_TEXT_CONFIG = f"stt_text_config({SEGMENT_TEXT_LANGUAGE})"
_HIT_COLUMNS = ("s.transcript_id, s.chunk_index, s.index, t.filename, s.speaker, n.name AS speaker_name,"
                " s.start_ts, s.end_ts, s.text")


def _search_filters(args: list, *, owner: str | None, transcript_id: int | None, speaker: str | None,
                    language: str | None, since: datetime | None, until: datetime | None) -> str:
    conditions = conditions_set(args, {
        "t.owner = {}": owner, "s.transcript_id = {}": transcript_id, "s.speaker = {}": speaker,
        "COALESCE(s.language, t.language) = {}": language, "t.created_at >= {}": since, "t.created_at < {}": until})
    return "".join(f" AND {c}" for c in conditions)


# A search is a person waiting: one that runs longer (a common word over a large store, an exact
# ranking of many vectors) is cancelled, its connection freed, rather than left to run for minutes.
SEARCH_TIMEOUT_S = 15.0


async def _bounded(conn: asyncpg.Connection, timeout_s: float) -> None:
    """In the transaction: statements give up (QueryCanceledError) after `timeout_s`."""
    await conn.execute(f"SET LOCAL statement_timeout = {max(1, int(timeout_s * 1000))}")


async def search_text(pool: asyncpg.Pool, query: str, *, limit: int, timeout_s: float = SEARCH_TIMEOUT_S,
                      **filters) -> list[asyncpg.Record]:
    """Segments whose words match `query` (web-search syntax: words, "a phrase", -not, or), best
    first (ts_rank_cd). `highlighted` is left empty: mark only the hits shown (`highlights`)."""
    args: list = [query]
    where = _search_filters(args, **filters)
    args.append(limit)
    async with pool.acquire() as conn, conn.transaction():
        await _bounded(conn, timeout_s)
        return await conn.fetch(
            f"SELECT {_HIT_COLUMNS}, ts_rank_cd(s.search_text, q.query) AS score, NULL::text AS highlighted"
            f" FROM segments s JOIN transcripts t ON t.id = s.transcript_id {SPEAKER_NAME_JOIN},"
            f" (SELECT {_TEXT_QUERY} AS query) q"
            # The three languages' queries joined by OR find the candidates through the index; a
            # segment must also match in its own language, or "-word" would be ignored wherever one
            # stemming leaves the word out (`simple` keeps "meetings" where English indexed "meet").
            f" WHERE s.search_text @@ q.query"
            f" AND s.search_text @@ websearch_to_tsquery({_SEGMENT_TEXT_CONFIG}, $1){where}"
            # A total order: pages are fetches of growing size, and ties (one "Okay." said by both
            # parties of a call at the same moment) must come in the same order in each.
            f" ORDER BY score DESC, s.transcript_id DESC, s.start_ts, s.chunk_index, s.index LIMIT ${len(args)}",
            *args)


# ts_headline marks the matched words with these, and the text is HTML-escaped after: marking the
# raw text (as it was indexed) keeps the marks on the words the index matched, where escaping it
# first would have the parser read "&lt;", "&amp;" and what was a tag otherwise. These two
# characters in the text itself become spaces (blanks to the parser too): each one left is a mark.
_MARK_START, _MARK_END = "\x01", "\x02"


def _marked_html(headline: str) -> str:
    return html.escape(headline).replace(_MARK_START, "<mark>").replace(_MARK_END, "</mark>")


async def highlights(db: Db, query: str, keys: list[tuple[int, int, int]]) -> dict[tuple[int, int, int], str]:
    """The text of these segments (transcript_id, chunk_index, index) as HTML: escaped, with the
    words `query` matched, each in its segment's language, in <mark>...</mark>, its only markup."""
    if not keys:
        return {}
    rows = await db.fetch(
        "SELECT s.transcript_id, s.chunk_index, s.index,"
        f" ts_headline({_SEGMENT_TEXT_CONFIG}, translate(s.text, $5, '  '), q.query, $6) AS headline"
        f" FROM segments s JOIN transcripts t ON t.id = s.transcript_id, (SELECT {_TEXT_QUERY} AS query) q"
        " WHERE (s.transcript_id, s.chunk_index, s.index) IN"
        " (SELECT * FROM unnest($2::bigint[], $3::int[], $4::int[]))",
        query, [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys],
        _MARK_START + _MARK_END, f"StartSel={_MARK_START}, StopSel={_MARK_END}, HighlightAll=true")
    return {(r["transcript_id"], r["chunk_index"], r["index"]): _marked_html(r["headline"]) for r in rows}


async def search_semantic(pool: asyncpg.Pool, vector: list[float], model: str, *, limit: int,
                          timeout_s: float = SEARCH_TIMEOUT_S, **filters) -> list[asyncpg.Record]:
    """The segments of `model` nearest `vector` (cosine, through that model's HNSW index, which
    keeps scanning while filters reject rows); `score` is the cosine similarity."""
    dimensions = int(len(vector))
    args: list = [vector]
    where = _search_filters(args, **filters)
    args.append(limit)
    kind = _indexed_as(dimensions) or "vector"  # compared as indexed, so the index serves it
    distance = f"s.embedding::{kind}({dimensions}) <=> $1::real[]::{kind}({dimensions})"
    # The model as a literal, as in the partial index's predicate, so the planner can use it.
    model_literal = model.replace("'", "''")

    def nearest(order: str) -> str:
        return (f"SELECT {_HIT_COLUMNS}, 1 - ({distance}) AS score, NULL::text AS highlighted"
                f" FROM segments s JOIN transcripts t ON t.id = s.transcript_id {SPEAKER_NAME_JOIN}"
                f" WHERE s.embedding_model = '{model_literal}' AND s.embedding IS NOT NULL{where}"
                f" ORDER BY {order} LIMIT ${len(args)}")

    async with pool.acquire() as conn, conn.transaction():
        await _bounded(conn, timeout_s)
        await conn.execute("SET LOCAL hnsw.iterative_scan = strict_order")
        rows = await conn.fetch(nearest(distance), *args)
        if len(rows) < limit and where:
            # The index walk gives up after hnsw.max_scan_tuples (20,000) rows the filters reject: one
            # meeting's or one key's segments in a large store come back short. Short means the
            # filters keep few rows, so ranking all of them exactly is cheap; `+ 0` keeps the
            # planner off the HNSW index. Ties (one text said many times) in the text search's
            # order, so the same hits make the cut at every request.
            rows = await conn.fetch(nearest(f"({distance}) + 0, s.transcript_id DESC, s.start_ts, s.chunk_index,"
                                            " s.index"), *args)
        return rows


# ---- re-embedding (ingest) --------------------------------------------------------------------

# A whole long recording's segments updated with an index to keep, a count over every segment of
# a large store, and the look for the next job to re-embed (nothing indexes `embedding_model IS
# DISTINCT FROM`, so it reads past every segment already done): longer than
# DATABASE_COMMAND_TIMEOUT_S may rightly be, which would count them as the database being away
# (the reindex stopping at the same place every time).
BULK_STATEMENT_TIMEOUT_S = 3600.0


async def newest_job(db: Db) -> int:
    """The highest job id so far (0 with none)."""
    return await db.fetchval("SELECT coalesce(max(id), 0) FROM transcripts")


async def next_job_to_reindex(db: Db, model: str, after: int = 0, passed_over: Sequence[int] = (),
                              up_to: int | None = None) -> int | None:
    """The oldest ended job after job `after`, up to job `up_to` (any with None), and not in
    `passed_over`, with a segment not embedded with `model`."""
    return await db.fetchval(
        "SELECT s.transcript_id FROM segments s JOIN transcripts t ON t.id = s.transcript_id"
        " WHERE t.status <> 'processing' AND s.embedding_model IS DISTINCT FROM $1 AND s.transcript_id > $2"
        " AND s.transcript_id <> ALL($3::bigint[]) AND ($4::bigint IS NULL OR s.transcript_id <= $4)"
        " ORDER BY s.transcript_id LIMIT 1", model, after, list(passed_over), up_to,
        timeout=BULK_STATEMENT_TIMEOUT_S)


async def running_jobs_to_reindex(db: Db, model: str, up_to: int | None = None) -> list[int]:
    """Jobs still running, up to job `up_to` (any with None), with segments embedded with another
    model than `model` (the embedder's, before it was switched): they are re-embedded once they
    end. Segments not embedded yet are the embedder's to do, not counted."""
    rows = await db.fetch(
        "SELECT DISTINCT s.transcript_id FROM segments s JOIN transcripts t ON t.id = s.transcript_id"
        " WHERE t.status = 'processing' AND s.embedding_model <> $1"
        " AND ($2::bigint IS NULL OR s.transcript_id <= $2) ORDER BY 1", model, up_to)
    return [r["transcript_id"] for r in rows]


async def embedded_with_another_model_after(db: Db, model: str, after: int) -> asyncpg.Record | None:
    """A job after job `after` (one started since) with segments embedded with another model than
    `model`, and that model (transcript_id, embedding_model): the embedder still embeds with it."""
    return await db.fetchrow(
        "SELECT transcript_id, embedding_model FROM segments WHERE transcript_id > $2"
        " AND embedding_model <> $1 ORDER BY transcript_id LIMIT 1", model, after)


async def segments_to_reindex(db: Db, job_id: int, model: str) -> list[asyncpg.Record]:
    """chunk_index, index and text of the job's segments not embedded with `model`."""
    return await db.fetch(
        "SELECT chunk_index, index, text FROM segments WHERE transcript_id = $1"
        " AND embedding_model IS DISTINCT FROM $2 ORDER BY chunk_index, index", job_id, model)


async def corrected_segments_without_vector(db: Db, model: str, after: tuple[int, int, int],
                                            limit: int) -> list[asyncpg.Record]:
    """transcript_id, chunk_index, index and text of segments of ended jobs corrected by hand and
    left without a vector (the embedding service was away), in that order, after `after`. Not
    those whose text `model` refused: stored without a vector and marked with it (store_reindexed,
    as a reindex or the embedder stores them), they are not tried again with it."""
    return await db.fetch(
        "SELECT s.transcript_id, s.chunk_index, s.index, s.text FROM segments s"
        " JOIN transcripts t ON t.id = s.transcript_id"
        " WHERE s.embedding IS NULL AND s.edited_at IS NOT NULL AND t.status <> 'processing'"
        " AND s.embedding_model IS DISTINCT FROM $1"
        " AND (s.transcript_id, s.chunk_index, s.index) > ($2, $3, $4)"
        " ORDER BY s.transcript_id, s.chunk_index, s.index LIMIT $5", model, *after, limit)


async def store_reindexed(conn: asyncpg.Connection, job_id: int, model: str,
                          vectors: list[tuple[int, int, str, list[float] | None]]) -> None:
    """New embeddings, (chunk_index, index, the text embedded, vector), of one model for a job's
    segments (a vector of None: the text was refused, stored without one and marked with the
    model); a segment whose text was corrected meanwhile keeps waiting for its own."""
    await conn.executemany(
        "UPDATE segments SET embedding = $4::real[]::vector, embedding_model = $5"
        " WHERE transcript_id = $1 AND chunk_index = $2 AND index = $3 AND text = $6",
        [(job_id, chunk, index, vector, model, text) for chunk, index, text, vector in vectors],
        timeout=BULK_STATEMENT_TIMEOUT_S)


async def reindex_counts(db: Db, model: str, up_to: int | None = None) -> asyncpg.Record:
    """Over the jobs up to job `up_to` (a run's: those there as it began; every job with None):
    segments embedded with `model` (done); those still to do (pending): of ended jobs, every
    segment not embedded with it; of running jobs, those embedded with another model (re-embedded
    once their job ends; the embedder embeds the others); and how many running jobs have such
    segments (waiting_jobs)."""
    return await db.fetchrow(
        "SELECT count(*) FILTER (WHERE s.embedding_model = $1) AS done,"
        " count(*) FILTER (WHERE s.embedding_model IS DISTINCT FROM $1"
        " AND (t.status <> 'processing' OR s.embedding_model IS NOT NULL)) AS pending,"
        " count(DISTINCT s.transcript_id) FILTER (WHERE t.status = 'processing' AND s.embedding_model <> $1)"
        " AS waiting_jobs"
        " FROM segments s JOIN transcripts t ON t.id = s.transcript_id"
        " WHERE $2::bigint IS NULL OR s.transcript_id <= $2", model, up_to, timeout=BULK_STATEMENT_TIMEOUT_S)
