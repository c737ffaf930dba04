"""How much each API key has had transcribed: GET /usage (the caller's own) and GET /admin/usage
(every key, for ADMIN_API_KEY). Read from the usage ledger, a line per job written when it ends
(common/migrations/018_usage.sql), so deleted jobs still count. README "`GET /usage`, `GET /admin/usage`"."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, date, datetime, timedelta
from typing import Annotated

from litestar import Request, get
from litestar.datastructures import State
from litestar.exceptions import HTTPException
from litestar.params import Parameter
from pydantic import BaseModel

from common import jobstore
from services.ingest.auth import admin_only, owner_of, request_owner
from services.ingest.errors import error_responses
from services.ingest.transcripts import as_utc

DEFAULT_DAYS = 30
EndedSince = Annotated[str | None, Parameter(
    description=f"Jobs that ended at or after: an ISO 8601 date or date and time (UTC if no offset); "
                f"default {DEFAULT_DAYS} days before until", max_length=64)]
EndedUntil = Annotated[str | None, Parameter(
    description="Jobs that ended before: an ISO 8601 date or date and time; default now", max_length=64)]


class UsageDay(BaseModel):
    day: date
    # Jobs that ended that day (UTC): done, and failed or cancelled.
    jobs: int
    done: int
    failed: int
    # Seconds of recording transcribed (jobs done).
    audio_s: float


class Usage(BaseModel):
    since: datetime
    until: datetime
    jobs: int = 0
    done: int = 0
    failed: int = 0
    audio_s: float = 0.0
    days: list[UsageDay] = []


class KeyUsage(Usage):
    # The key's last four characters; "none": jobs made while API keys were off; "a removed key #"
    # and the start of its hash (owner_of) for a key no longer in API_KEYS.
    key: str


class UsageByKey(BaseModel):
    since: datetime
    until: datetime
    keys: list[KeyUsage]


def period(since: str | None, until: str | None) -> tuple[datetime, datetime]:
    """[since, until): by default the last DEFAULT_DAYS days."""
    end = as_utc(until, "until") or datetime.now(UTC)
    try:
        start = as_utc(since, "since") or end - timedelta(days=DEFAULT_DAYS)
    except OverflowError as exc:  # until in the first days of year 1
        raise HTTPException(status_code=400, detail="until is out of range") from exc
    if start >= end:
        raise HTTPException(status_code=400, detail="since must be before until")
    return start, end


def summed(rows, since: datetime, until: datetime) -> Usage:
    """One line a day, whoever's the rows are."""
    by_day: dict = {}
    for r in rows:
        day = by_day.setdefault(r["day"], {"jobs": 0, "done": 0, "failed": 0, "audio_s": 0.0})
        for field in day:
            day[field] += r[field]
    days = [UsageDay(day=day, jobs=d["jobs"], done=d["done"], failed=d["failed"], audio_s=round(d["audio_s"], 3))
            for day, d in sorted(by_day.items())]
    return Usage(since=since, until=until, jobs=sum(d.jobs for d in days), done=sum(d.done for d in days),
                 failed=sum(d.failed for d in days), audio_s=round(sum(d.audio_s for d in days), 3), days=days)


@get("/usage", summary="What this API key has had transcribed, by day",
     responses=error_responses(400, 401, 403, 503))
async def own_usage(state: State, request: Request, since: EndedSince = None, until: EndedUntil = None) -> Usage:
    start, end = period(since, until)
    owner = request_owner(request)
    # Without API keys (no owner), every job: those made while keys were on included.
    return summed(await jobstore.usage_by_day(state.pool, owner, start, end, everyone=owner is None), start, end)


@get("/admin/usage", summary="What every API key has had transcribed, by day",
     responses=error_responses(400, 401, 403, 503))
async def usage_by_key(state: State, request: Request, since: EndedSince = None,
                       until: EndedUntil = None) -> UsageByKey:
    admin_only(state.settings, request, "see every key's usage")
    start, end = period(since, until)
    rows = await jobstore.usage_by_day(state.pool, None, start, end, everyone=True)
    names = key_names(state.settings.api_key_list)
    # Every key in API_KEYS, in its order (one without jobs in the period with zeros), then the
    # removed keys that had jobs, then the jobs without a key.
    by_owner: dict[str | None, list] = {owner: [] for owner in names}
    for row in sorted(rows, key=lambda row: row["owner"] is None):
        by_owner.setdefault(row["owner"], []).append(row)
    return UsageByKey(since=start, until=end, keys=[
        KeyUsage(key=_key_name(owner, names), **summed(owned, start, end).model_dump())
        for owner, owned in by_owner.items()])


# Of a removed key's hash (owner_of, itself no secret: SHA-256 of the key), what tells it apart
# from the others: whoever still has the key finds it with `printf %s KEY | sha256sum`.
REMOVED_KEY_HASH_CHARS = 8


# A key this short or shorter would be half shown by its last four characters.
SHORT_KEY_CHARS = 8


def key_names(keys: list[str]) -> dict[str, str]:
    """Each key's hash and how the admin's list names it: by its last four characters, with its
    hash's tag beside them where another key ends alike; a short key by the tag alone."""
    endings = Counter(key[-4:] for key in keys)

    def name(key: str) -> str:
        tag = f"#{owner_of(key)[:REMOVED_KEY_HASH_CHARS]}"
        if len(key) <= SHORT_KEY_CHARS:
            return f"a short key {tag}"
        return f"…{key[-4:]}" + (f" {tag}" if endings[key[-4:]] > 1 else "")

    return {owner_of(key): name(key) for key in keys}


def _key_name(owner: str | None, names: dict[str, str]) -> str:
    if owner is None:
        return "none"
    return names.get(owner) or f"a removed key #{owner[:REMOVED_KEY_HASH_CHARS]}"


USAGE_ROUTES = [own_usage, usage_by_key]
