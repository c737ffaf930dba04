"""GET /search: find what anyone said, by words (PostgreSQL full-text search), by meaning
(pgvector nearest neighbours of the query's embedding, in any of the embedding model's
languages), or both fused by reciprocal rank."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import Awaitable
from typing import Annotated, Literal

import aiohttp
import asyncpg
from litestar import Request, get
from litestar.datastructures import State
from litestar.exceptions import HTTPException
from litestar.params import QueryParameter
from pydantic import BaseModel

from common import searchstore
from services.embedder.backends import EmbedFn, OllamaError
from services.ingest.auth import request_owner
from services.ingest.errors import MAX_ID, error_responses
from services.ingest.transcripts import SinceQuery, UntilQuery, as_utc

log = logging.getLogger(__name__)

SearchMode = Literal["hybrid", "semantic", "text"]
# Reciprocal-rank fusion: a hit's score is the sum over the lists that found it of 1 / (K + rank);
# K = 60 is the constant of the method's paper (Cormack et al., 2009) and what most engines use.
RRF_K = 60
# Each list contributes this many candidates to the fusion, and no page reaches past it.
CANDIDATES = 100
MAX_QUERY_CHARS = 1000


class SearchHit(BaseModel):
    transcript_id: int
    filename: str
    speaker: str
    # The speaker's name, when one was given.
    speaker_name: str | None = None
    start_ts: float
    end_ts: float
    text: str
    # The text with the words the query matched in <mark>...</mark> (for hits found by words).
    highlighted: str | None = None
    # text: ts_rank_cd; semantic: cosine similarity; hybrid: the reciprocal-rank-fusion score.
    score: float
    found_by: list[Literal["text", "semantic"]]


class SearchPage(BaseModel):
    mode: SearchMode
    # The model the query was embedded with and whose vectors were searched (semantic, hybrid).
    embedding_model: str | None = None
    items: list[SearchHit]
    next_cursor: str | None = None


QueryText = Annotated[str, QueryParameter(min_length=1, max_length=MAX_QUERY_CHARS,
                                          description="What to look for: words, \"a phrase\", -without, or a question")]
ModeQuery = Annotated[SearchMode, QueryParameter(description="hybrid (both, fused by rank), semantic (by meaning,"
                                                              " across languages) or text (by words)")]
TranscriptQuery = Annotated[int | None, QueryParameter(ge=1, le=MAX_ID, description="Only this job's segments")]
SpeakerQuery = Annotated[str | None, QueryParameter(min_length=1, max_length=100,
                                                    description="Only this speaker (spk_0...)")]
LanguageQuery = Annotated[str | None, QueryParameter(pattern=r"^[a-z]{2,3}$",
                                                     description="Only what was said in this language (en, ru...)")]
SearchLimitQuery = Annotated[int, QueryParameter(ge=1, le=100, description="Hits per page")]
SearchCursorQuery = Annotated[str | None, QueryParameter(max_length=64, description="next_cursor of the previous page")]


def _cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(f"o{offset}".encode()).decode().rstrip("=")


def _offset(cursor: str | None) -> int:
    if cursor is None:
        return 0
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        offset = int(text[1:]) if text.startswith("o") else -1
    except (binascii.Error, UnicodeDecodeError, ValueError):
        offset = -1
    if not 0 < offset < CANDIDATES:
        raise HTTPException(status_code=400, detail="cursor is not one this endpoint returned")
    return offset


async def _nothing() -> list:
    return []


async def both(first: Awaitable[list], second: Awaitable[list]) -> tuple[list, list]:
    """The results of `first` and `second`, run at once. When one fails, the other is cancelled and
    waited for (its statement stopped, its connection back in the pool) and the first failure is
    raised as it is: with asyncio.gather, a search by words went on after the embedding service
    refused the query, holding a connection of the pool for up to SEARCH_TIMEOUT_S."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = group.create_task(first), group.create_task(second)
    except BaseExceptionGroup as failed:
        first_failure = failed.exceptions[0]
    else:
        return tasks[0].result(), tasks[1].result()
    # Raised outside the except clause: its own cause and context stay, not the group's.
    raise first_failure


def _key(row) -> tuple[int, int, int]:
    return row["transcript_id"], row["chunk_index"], row["index"]


def _hit(row, found_by: list[str], score: float) -> SearchHit:
    return SearchHit(transcript_id=row["transcript_id"], filename=row["filename"], speaker=row["speaker"],
                     speaker_name=row["speaker_name"], start_ts=round(row["start_ts"], 3),
                     end_ts=round(row["end_ts"], 3), text=row["text"],
                     highlighted=row["highlighted"], score=round(float(score), 6), found_by=found_by)


def fuse(text_rows: list, semantic_rows: list) -> list[tuple[tuple[int, int, int], SearchHit]]:
    """Reciprocal-rank fusion of the two ranked lists (each a list of segment rows)."""
    fused: dict[tuple, dict] = {}
    for source, rows in (("text", text_rows), ("semantic", semantic_rows)):
        for rank, row in enumerate(rows, start=1):
            entry = fused.setdefault(_key(row), {"row": row, "score": 0.0, "found_by": []})
            entry["score"] += 1.0 / (RRF_K + rank)
            entry["found_by"].append(source)
    ranked = sorted(fused.values(),
                    key=lambda e: (-e["score"], -e["row"]["transcript_id"], e["row"]["start_ts"], _key(e["row"])))
    return [(_key(e["row"]), _hit(e["row"], e["found_by"], e["score"])) for e in ranked]


# How long a request waits for its text's vector. The embedder's own calls wait longer and are
# retried (OLLAMA_TIMEOUT_S, OLLAMA_RETRIES: about 4 minutes in all), which suits a queue, not a
# person waiting on a search.
REQUEST_EMBED_TIMEOUT_S = 15.0
# `extra.code` of the 503 for a query that could not be embedded: only that one is worth asking
# again with mode=text. A search over its time limit, or the database away, is a 503 too.
EMBEDDING_UNAVAILABLE = "embedding_unavailable"


async def embed_for_request(embed: EmbedFn, text: str, timeout_s: float = REQUEST_EMBED_TIMEOUT_S) -> list[float]:
    """`text`'s vector, for an HTTP request: TimeoutError after `timeout_s`."""
    async with asyncio.timeout(timeout_s):
        [vector] = await embed([text])
    return vector


async def embed_query(embed: EmbedFn, query: str, timeout_s: float = REQUEST_EMBED_TIMEOUT_S) -> list[float]:
    try:
        vector = await embed_for_request(embed, query, timeout_s)
    except (OllamaError, aiohttp.ClientError, TimeoutError) as exc:
        log.warning("could not embed a search query: %s", exc or type(exc).__name__)
        raise HTTPException(status_code=503, detail="embedding service unavailable: semantic search cannot run;"
                                                    " mode=text still works", headers={"Retry-After": "5"},
                            extra={"code": EMBEDDING_UNAVAILABLE}) from exc
    return vector


@get("/search", summary="Find what was said: by words, by meaning, or both",
     responses=error_responses(400, 401, 403, 503, e503=(
         f"The embedding service is unavailable (extra.code {EMBEDDING_UNAVAILABLE!r}: mode=text still works),"
         " the search ran over its time limit, or the database is unavailable")))
async def search(
    state: State, request: Request, q: QueryText, mode: ModeQuery = "hybrid",
    transcript_id: TranscriptQuery = None, speaker: SpeakerQuery = None, language: LanguageQuery = None,
    since: SinceQuery = None, until: UntilQuery = None, limit: SearchLimitQuery = 20,
    cursor: SearchCursorQuery = None,
) -> SearchPage:
    query = q.strip()
    if not query or "\x00" in query:
        raise HTTPException(status_code=400, detail="q must hold something to search for")
    if speaker is not None and "\x00" in speaker:
        raise HTTPException(status_code=400, detail="speaker cannot hold a NUL character")
    offset = _offset(cursor)
    filters = {"owner": request_owner(request), "transcript_id": transcript_id, "speaker": speaker,
               "language": language, "since": as_utc(since, "since"), "until": as_utc(until, "until")}
    wanted = min(CANDIDATES, offset + limit + 1)
    embed, model = state.query_embedder
    # Semantic pages are cut from one fetch of the same size each time: segments with the same
    # vector ("Okay.") tie, and a fetch of another size may order them otherwise.
    candidates = wanted if mode == "text" else CANDIDATES

    async def by_words() -> list:
        return await searchstore.search_text(state.pool, query, limit=candidates, **filters)

    async def by_meaning() -> list:
        vector = await embed_query(embed, query)
        return await searchstore.search_semantic(state.pool, vector, model, limit=candidates, **filters)

    # Hybrid runs both searches at once, on two connections: its latency is the slower one's.
    try:
        text_rows, semantic_rows = await both(
            by_words() if mode in ("text", "hybrid") else _nothing(),
            by_meaning() if mode in ("semantic", "hybrid") else _nothing())
    except asyncpg.exceptions.QueryCanceledError as exc:
        raise HTTPException(status_code=503, detail=f"the search took over {searchstore.SEARCH_TIMEOUT_S:g} s and was"
                                                    " stopped: narrow it with transcript_id, speaker, language,"
                                                    " since or until") from exc
    # The index walk orders ties (one text said many times) as it meets them: ranked, and fused,
    # in the text search's order, or a tie could change places between two pages' requests.
    semantic_rows = sorted(semantic_rows, key=lambda r: (-r["score"], -r["transcript_id"], r["start_ts"], _key(r)))
    if mode == "hybrid":
        hits = fuse(text_rows, semantic_rows)
    elif mode == "text":
        hits = [(_key(r), _hit(r, ["text"], r["score"])) for r in text_rows]
    else:
        hits = [(_key(r), _hit(r, ["semantic"], r["score"])) for r in semantic_rows]
    page = hits[offset:offset + limit]
    # Marking the matched words is the costly part of a text search: only for the hits shown.
    marked = await searchstore.highlights(state.pool, query, [key for key, hit in page if "text" in hit.found_by])
    for key, hit in page:
        hit.highlighted = marked.get(key)
    more = len(hits) > offset + limit and offset + limit < CANDIDATES
    return SearchPage(mode=mode, embedding_model=None if mode == "text" else model, items=[hit for _, hit in page],
                      next_cursor=_cursor(offset + limit) if more else None)


SEARCH_ROUTES = [search]
