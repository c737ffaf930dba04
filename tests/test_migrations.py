"""The migration runner (common/db.py apply_migrations) and what the migrations' indexes are for:
migrations run outside a transaction (CREATE INDEX CONCURRENTLY), an index build cut short, the
queries over tables of a row per job ever reading only their window, a database's pgvector older
than its server's, and a statement_timeout set for the database. Each test on a scratch database
of the tests' PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace

import asyncpg
import pytest
from litestar import Request

from common import db, jobstore, speakerstore
from devstack import migrated_database
from services.ingest.webhooks import list_webhooks

NEW_INDEXES_MIGRATION = "032_usage_and_listing_indexes.sql"
NEW_INDEXES = ("job_usage_ended_idx", "transcripts_owner_created_idx", "transcripts_created_idx")


@pytest.fixture
async def database() -> AsyncIterator[str]:
    """The URL of a database of its own, every migration applied."""
    async with migrated_database("stt_migrations") as url:
        yield url


async def as_before_the_new_indexes(conn: asyncpg.Connection) -> None:
    """The database as the version before NEW_INDEXES_MIGRATION left it."""
    for index in NEW_INDEXES:
        await conn.execute(f"DROP INDEX {index}")
    assert await conn.execute("DELETE FROM schema_migrations WHERE name = $1", NEW_INDEXES_MIGRATION) == "DELETE 1"


async def index_valid(conn: asyncpg.Connection, name: str) -> bool | None:
    return await conn.fetchval("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)", name)


# ---- the queries read their window through an index -------------------------------------------

NOW = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
ROWS = 200_000

# A job a minute for ROWS minutes (about 139 days) up to NOW, ids in time order: 98 % of a key
# with many jobs ("big"), 1 % of a key with few ("small"), 1 % made without a key.
FILL = f"""
INSERT INTO transcripts (filename, owner, status, created_at, completed_at)
SELECT 'job' || g || '.wav', CASE g % 100 WHEN 0 THEN 'small' WHEN 1 THEN NULL ELSE 'big' END, 'done',
       $1::timestamptz - ({ROWS} - g) * interval '1 minute', $1::timestamptz - ({ROWS} - g) * interval '1 minute'
FROM generate_series(1, {ROWS}) g;
INSERT INTO job_usage (job_id, owner, ended_at, status, audio_s)
SELECT id, owner, completed_at, status, 60 FROM transcripts;
"""


class Explaining:
    """Stands for the pool in jobstore's functions: the statement one would run, with its
    arguments, is explained on the database instead (EXPLAIN (FORMAT JSON): the plan, not run)."""

    def __init__(self, conn: asyncpg.Connection):
        self.conn = conn
        self.plan: dict = {}

    async def fetch(self, sql: str, *args) -> list:
        explained = await self.conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args)
        self.plan = (json.loads(explained) if isinstance(explained, str) else explained)[0]["Plan"]
        return []

    async def fetchrow(self, sql: str, *args) -> None:
        await self.fetch(sql, *args)


def plan_nodes(plan: dict) -> Iterator[dict]:
    yield plan
    for child in plan.get("Plans", []):
        yield from plan_nodes(child)


INDEX_SCANS = {"Index Scan", "Index Only Scan", "Bitmap Index Scan"}


def read_through(plan: dict, table: str) -> list[dict]:
    """The index scans of a plan reading `table`, after checking it reads no table whole."""
    nodes = list(plan_nodes(plan))
    assert not [n for n in nodes if n["Node Type"] == "Seq Scan"], json.dumps(plan, indent=1)
    return [n for n in nodes if n["Node Type"] in INDEX_SCANS and n["Index Name"].startswith(table)]


async def test_usage_and_listing_read_only_their_window_through_an_index(database):
    """GET /usage, GET /admin/usage and GET /transcripts?since=&until= over tables of a row per job
    ever: each reads its window through an index (structurally, in its plan), where the usage
    summary read the whole ledger and a listing every job of the key newer than the window."""
    conn = await asyncpg.connect(database)
    try:
        await conn.execute(FILL.replace("$1::timestamptz", f"'{NOW.isoformat()}'::timestamptz"))
        await conn.execute("ANALYZE transcripts")
        await conn.execute("ANALYZE job_usage")
        explaining = Explaining(conn)

        async def usage(owner: str | None, since: dt.datetime, everyone: bool = False) -> list[dict]:
            await jobstore.usage_by_day(explaining, owner, since, NOW, everyone=everyone)
            return read_through(explaining.plan, "job_usage")

        async def listing(owner: str | None, since: dt.datetime, until: dt.datetime | None = None) -> list[dict]:
            await jobstore.list_jobs(explaining, owner=owner, status=None, filename=None, since=since, until=until,
                                     before_id=None, limit=50)
            return read_through(explaining.plan, "transcripts")

        # One key's usage, and that of the jobs without a key: the key is looked up in the index,
        # not checked on every row of the window (or of the ledger).
        for owner in ("small", None):
            scans = await usage(owner, NOW - 7 * DAY)
            assert [s["Index Name"] for s in scans] == ["job_usage_owner_ended"], (owner, explaining.plan)
            assert "owner" in scans[0]["Index Cond"] and "ended_at" in scans[0]["Index Cond"], explaining.plan
        # Everyone's (GET /admin/usage, and GET /usage without API keys).
        for days in (1, 7):
            scans = await usage(None, NOW - days * DAY, everyone=True)
            assert [s["Index Name"] for s in scans] == ["job_usage_ended_idx"], (days, explaining.plan)

        # A key with few jobs in a narrow window: its own jobs of the window, not all of its jobs.
        scans = await listing("small", NOW - DAY)
        assert [s["Index Name"] for s in scans] == ["transcripts_owner_created_idx"], explaining.plan
        assert "owner" in scans[0]["Index Cond"] and "created_at" in scans[0]["Index Cond"], explaining.plan
        # The key with most jobs, and everyone's: the window, not every job newer than its end.
        for owner, since, until in (("big", NOW - DAY, None), ("big", NOW - 101 * DAY, NOW - 100 * DAY),
                                    (None, NOW - DAY, None), (None, NOW - 101 * DAY, NOW - 100 * DAY)):
            scans = await listing(owner, since, until)
            used = [s["Index Name"] for s in scans]
            assert used in (["transcripts_owner_created_idx"], ["transcripts_created_idx"]), (owner, since, until, used)
            assert "created_at" in scans[0]["Index Cond"], explaining.plan
    finally:
        await conn.close()


# A few rows of key "small" and of no key among many of key "big".
WEBHOOKS_FILL = f"""
INSERT INTO webhooks (owner, url, events, secret, job_id)
SELECT CASE g % 1000 WHEN 0 THEN 'small' WHEN 1 THEN NULL ELSE 'big' END, 'https://example.com/' || g,
       '{{transcript.completed}}', 'secret', CASE WHEN g % 1000 > 1 THEN g END
FROM generate_series(1, {ROWS}) g;
"""
SPEAKERS_FILL = """
INSERT INTO speakers (owner, name)
SELECT CASE g % 1000 WHEN 0 THEN 'small' WHEN 1 THEN NULL ELSE 'big' END, 'person ' || g
FROM generate_series(1, 20000) g;
INSERT INTO voiceprints (speaker_id, embedding, embedding_model, source)
SELECT id, '[1, 0, 0]', 'model', 'sample' FROM speakers, generate_series(1, 2);
"""


def owner_looked_up_in(scans: list[dict], index: str) -> bool:
    return any(s["Index Name"] == index and "owner" in s.get("Index Cond", "") for s in scans)


async def test_a_keys_webhooks_are_listed_through_the_owner_index(database):
    """GET /webhooks of a key with a few endpoints, in a table with a row per job that gave a
    callback_url: the key is looked up in webhooks_owner_idx, where the listing read every row of
    the table (its owner filter was one no index serves)."""
    conn = await asyncpg.connect(database)
    try:
        await conn.execute(WEBHOOKS_FILL)
        await conn.execute("ANALYZE webhooks")
        explaining = Explaining(conn)
        for owner in ("small", None):
            request = Request(scope={"type": "http", "state": {"owner": owner}})
            await list_webhooks.fn(request, SimpleNamespace(pool=explaining), limit=100, cursor=None)
            scans = read_through(explaining.plan, "webhooks")
            assert owner_looked_up_in(scans, "webhooks_owner_idx"), (owner, explaining.plan)
    finally:
        await conn.close()


async def test_a_keys_people_are_read_through_the_speakers_index(database):
    """The owner's people, read for every stored chunk by the persister (its matching) and for
    every submission that expects some (their names): looked up in speakers_owner_name_idx, where
    each read the whole table of every key's people (their owner filter was one it cannot serve)."""
    conn = await asyncpg.connect(database)
    try:
        await conn.execute(SPEAKERS_FILL)
        await conn.execute("ANALYZE speakers")
        await conn.execute("ANALYZE voiceprints")
        explaining = Explaining(conn)
        reads = {
            "owner_profiles": lambda owner: speakerstore.owner_profiles(explaining, owner, "model"),
            "unknown_names": lambda owner: speakerstore.unknown_names(explaining, owner, ["person 1000", "nobody"]),
            "enrolled_ids": lambda owner: speakerstore.enrolled_ids(explaining, owner, ["person 1000", "nobody"]),
            "list_speakers": lambda owner: speakerstore.list_speakers(explaining, owner),
            "other_people_of_voice": lambda owner: speakerstore.other_people_of_voice(explaining, owner, 1000, "model"),
        }
        for owner in ("small", None):
            for what, read in reads.items():
                await read(owner)
                scans = read_through(explaining.plan, "speakers")
                assert owner_looked_up_in(scans, "speakers_owner_name_idx"), (what, owner, explaining.plan)
    finally:
        await conn.close()


async def test_every_migration_run_outside_a_transaction_bears_running_again(database):
    """A migration run a statement at a time and cut off (a pod killed, a lock_timeout) runs again
    from its first statement at the next start: each of them, run once more over what it made,
    succeeds and leaves the schema as it was."""
    again = [name for _, name, sql in db._migrations() if db._outside_transaction(sql)]
    schema = ("SELECT c.relname, c.relkind, pg_get_indexdef(c.oid), i.indisvalid,"
              " (SELECT array_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod) ORDER BY a.attnum)"
              "  FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped)"
              " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
              " LEFT JOIN pg_index i ON i.indexrelid = c.oid"
              " WHERE n.nspname = 'public' AND c.relkind IN ('r', 'i') ORDER BY c.relname")
    conn = await asyncpg.connect(database)
    pool = await asyncpg.create_pool(database, min_size=1, max_size=1)
    try:
        before = await conn.fetch(schema)
        await conn.execute("DELETE FROM schema_migrations WHERE name = ANY($1::text[])", again)
        assert await db.apply_migrations(pool) == again
        assert await conn.fetch(schema) == before
    finally:
        await pool.close()
        await conn.close()


# ---- migrations outside a transaction ---------------------------------------------------------

async def test_an_index_build_cut_short_is_built_again_by_the_next_start(database):
    """A CONCURRENTLY build interrupted or failed leaves its index INVALID (never used by a query,
    yet updated by every write), which CREATE INDEX CONCURRENTLY IF NOT EXISTS would keep: the
    next start drops it and builds it again, and only then counts the migration applied."""
    conn = await asyncpg.connect(database)
    pool = await asyncpg.create_pool(database, min_size=1, max_size=1)
    try:
        await as_before_the_new_indexes(conn)
        # The first build failed half way (as one cut short does, it leaves its index behind,
        # INVALID): here a unique index over two jobs of one key.
        await conn.execute("INSERT INTO transcripts (filename, owner) VALUES ('a.wav', 'key'), ('b.wav', 'key')")
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute("CREATE UNIQUE INDEX CONCURRENTLY transcripts_owner_created_idx ON transcripts (owner)")
        assert await index_valid(conn, "transcripts_owner_created_idx") is False
        # Another was built, the last never begun.
        await conn.execute("CREATE INDEX CONCURRENTLY job_usage_ended_idx ON job_usage (ended_at)")

        assert await db.apply_migrations(pool) == [NEW_INDEXES_MIGRATION]
        for index in NEW_INDEXES:
            assert await index_valid(conn, index) is True, index
        assert await conn.fetchval("SELECT pg_get_indexdef(to_regclass('transcripts_owner_created_idx'))") == (
            "CREATE INDEX transcripts_owner_created_idx ON public.transcripts USING btree (owner, created_at)")
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations WHERE name = $1", NEW_INDEXES_MIGRATION) == 1
        assert await db.apply_migrations(pool) == []
    finally:
        await pool.close()
        await conn.close()


async def test_start_ups_waiting_for_an_index_build_neither_fail_nor_fail_it(database):
    """Services starting together while one of them builds an index CONCURRENTLY. That build
    waits, before it ends, for every transaction older than it, and a start-up waiting inside
    pg_advisory_lock is one, waiting for the builder's lock: PostgreSQL called it a deadlock and
    failed one of them (the start-up, or the build)."""
    setup = await asyncpg.connect(database)
    pools = [await asyncpg.create_pool(database, min_size=1, max_size=1) for _ in range(3)]
    try:
        await as_before_the_new_indexes(setup)
        # All three wait for the lock, then one applies while the others still wait.
        await setup.execute("SELECT pg_advisory_lock($1)", db.LockKey.MIGRATIONS)
        starting = [asyncio.create_task(db.apply_migrations(pool)) for pool in pools]
        await asyncio.sleep(1)
        assert not any(task.done() for task in starting)
        await setup.execute("SELECT pg_advisory_unlock($1)", db.LockKey.MIGRATIONS)
        results = await asyncio.wait_for(asyncio.gather(*starting), 60)
        assert sorted(results) == [[], [], [NEW_INDEXES_MIGRATION]]
        for index in NEW_INDEXES:
            assert await index_valid(setup, index) is True, index
    finally:
        for pool in pools:
            await pool.close()
        await setup.close()


async def test_an_index_build_outlasts_the_command_timeout_and_the_lock_timeout(database, caplog):
    """A CONCURRENTLY build waits for every transaction older than it (a long one of a running
    replica, in a rolling upgrade): neither the pool's command timeout (DATABASE_COMMAND_TIMEOUT_S,
    1 s here) nor the migrations' lock_timeout (MIGRATION_LOCK_TIMEOUT_S) may cut it short. Cut
    short, the build is begun again from nothing (on a large table, it reads the whole table each
    time), and fails again for as long as some transaction is older than that."""
    caplog.set_level(logging.INFO, logger="common.db")
    setup = await asyncpg.connect(database)
    old_replica = await asyncpg.connect(database)
    pool = await asyncpg.create_pool(database, min_size=1, max_size=1, command_timeout=1)
    try:
        await as_before_the_new_indexes(setup)
        held_s = db.MIGRATION_LOCK_TIMEOUT_S + 2
        long_transaction = old_replica.transaction(isolation="repeatable_read")
        await long_transaction.start()
        await old_replica.fetchval("SELECT count(*) FROM transcripts")  # its snapshot, kept to its end
        started = time.monotonic()
        applying = asyncio.create_task(db.apply_migrations(pool))
        await asyncio.sleep(held_s)
        assert not applying.done(), applying
        await long_transaction.commit()
        assert await asyncio.wait_for(applying, 60) == [NEW_INDEXES_MIGRATION]
        assert time.monotonic() - started >= held_s
        # Built once: not given up on a lock_timeout and begun again, nor found half built.
        assert [r.getMessage() for r in caplog.records if r.name == "common.db" and r.levelno >= logging.WARNING] == []
        for index in NEW_INDEXES:
            assert await index_valid(setup, index) is True, index
    finally:
        await pool.close()
        await old_replica.close()
        await setup.close()


# ---- what the database's administrators left as it was ---------------------------------------

async def as_created_with_pgvector_0_7_4(conn: asyncpg.Connection) -> None:
    """This database's pgvector as a database created with pgvector 0.7.4 keeps it after the
    server's is upgraded: its SQL objects and version those of 0.7.4 until ALTER EXTENSION vector
    UPDATE runs. (Without the objects that 0.8.0 added, that update would fail making them again.)"""
    for from_type in ("integer[]", "real[]", "double precision[]", "numeric[]"):
        for member in (f"CAST ({from_type} AS sparsevec)",  # the cast first: it uses the function
                       f"FUNCTION array_to_sparsevec({from_type}, integer, boolean)"):
            await conn.execute(f"ALTER EXTENSION vector DROP {member}")
            await conn.execute(f"DROP {member}")
    await conn.execute("UPDATE pg_extension SET extversion = '0.7.4' WHERE extname = 'vector'")


async def test_a_database_whose_pgvector_predates_the_servers_is_brought_up_to_date(database, caplog):
    """A database created when pgvector 0.5 was enough, its server's pgvector since upgraded to 0.8:
    the start-up updates the database's extension, where it was refused for good, telling to
    install the pgvector that the server already has."""
    caplog.set_level(logging.INFO, logger="common.db")
    conn = await asyncpg.connect(database)
    pool = await asyncpg.create_pool(database, min_size=1, max_size=1)
    try:
        await as_created_with_pgvector_0_7_4(conn)
        assert await db.apply_migrations(pool) == []
        installed, available = (await conn.fetchrow(
            "SELECT extversion, default_version FROM pg_extension JOIN pg_available_extensions ON name = extname"
            " WHERE extname = 'vector'")).values()
        assert installed == available and not db.pgvector_too_old(installed)
        assert any("ALTER EXTENSION vector UPDATE" in r.getMessage() for r in caplog.records if r.name == "common.db")
    finally:
        await pool.close()
        await conn.close()


async def test_a_pgvector_the_service_may_not_update_is_refused_saying_what_to_run(database):
    """Where the service's role does not own the extension (nor is a superuser), it may not update
    it: refused, naming the statement its owner is to run rather than a pgvector to install."""
    admin = await asyncpg.connect(database)
    role, password = f"stt_not_owner_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    try:
        await as_created_with_pgvector_0_7_4(admin)
        pool = await asyncpg.create_pool(database, user=role, password=password, min_size=1, max_size=1)
        try:
            with pytest.raises(db.MissingPgvector, match=r"must be owner.*run `ALTER EXTENSION vector UPDATE`"):
                await db.apply_migrations(pool)
        finally:
            await pool.close()
        assert await admin.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'vector'") == "0.7.4"
    finally:
        await admin.execute(f"DROP ROLE {role}")
        await admin.close()


# (migration, what undoes it, what it runs, a check that it is applied): one run in a transaction,
# one outside (an index built CONCURRENTLY).
MIGRATIONS_WAITING_FOR_A_WRITER = [
    ("029_audio_redaction_due.sql", "ALTER TABLE transcripts DROP COLUMN audio_redaction_due",
     "ALTER TABLE transcripts ADD COLUMN audio_redaction_due",
     "SELECT count(*) = 1 FROM information_schema.columns WHERE table_name = 'transcripts'"
     " AND column_name = 'audio_redaction_due'"),
    ("019_reference.sql", "DROP INDEX transcripts_reference",
     "CREATE INDEX CONCURRENTLY IF NOT EXISTS transcripts_reference",
     "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass('transcripts_reference')"),
]


@pytest.mark.parametrize(("migration", "undo", "statement", "applied"), MIGRATIONS_WAITING_FOR_A_WRITER)
async def test_a_statement_timeout_of_the_database_or_role_does_not_cut_a_migration_short(
        database, migration, undo, statement, applied):
    """A statement_timeout set for the database or the service's role (ALTER ROLE ... SET
    statement_timeout, common on managed PostgreSQL) cancelled a migration that outlasted it,
    not tried again: every start failed. Here the migration waits for a transaction of a running
    replica that writes to its table (a table rewritten, an index built over a large one alike)."""
    setup = await asyncpg.connect(database)
    old_replica = await asyncpg.connect(database)
    try:
        await setup.execute(undo)
        assert await setup.execute("DELETE FROM schema_migrations WHERE name = $1", migration) == "DELETE 1"
        # Long enough that the few statements apply_migrations runs before its own SET LOCAL
        # statement_timeout = 0 (the advisory lock, the pgvector checks, schema_migrations) are not
        # cut by a stalled CPU; the wait below outlasts it six times.
        await setup.execute(f"ALTER DATABASE {await setup.fetchval('SELECT current_database()')}"
                            " SET statement_timeout = '250ms'")
        writing = old_replica.transaction()
        await writing.start()
        await old_replica.execute("INSERT INTO transcripts (filename) VALUES ('a.wav')")
        pool = await asyncpg.create_pool(database, min_size=1, max_size=1)
        try:
            assert await pool.fetchval("SHOW statement_timeout") == "250ms"
            applying = asyncio.create_task(db.apply_migrations(pool))

            async def waiting_for_the_replica() -> bool:
                return bool(await setup.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock' AND position($1 in query) > 0", statement))

            deadline = time.monotonic() + 30
            while not applying.done() and not await waiting_for_the_replica():
                assert time.monotonic() < deadline, "the migration never waited for the replica's transaction"
                await asyncio.sleep(0.01)
            assert db.MIGRATION_LOCK_TIMEOUT_S > 1.5
            await asyncio.sleep(1.5)  # 6 times the statement_timeout, within MIGRATION_LOCK_TIMEOUT_S
            assert not applying.done(), applying.exception() if applying.done() else None
            await writing.commit()
            assert await asyncio.wait_for(applying, 30) == [migration]
            assert await setup.fetchval(applied) is True
        finally:
            pool.terminate()  # a migration still waiting would keep close() waiting for ever
    finally:
        await old_replica.close()
        await setup.close()


def test_a_migration_is_split_into_its_statements_as_postgresql_reads_them():
    sql = """-- migrate: no-transaction
-- a comment; with a semicolon
CREATE INDEX CONCURRENTLY IF NOT EXISTS a_idx ON a (x); /* another; */
CREATE INDEX CONCURRENTLY "b;idx" ON b (x) WHERE y = 'it''s; here';
DO $body$ BEGIN PERFORM 1; END $body$;
SELECT $$;$$, 'x' -- trailing; comment
;
"""
    assert db._outside_transaction(sql)
    assert not db._outside_transaction("-- migrate: in a transaction\nSELECT 1;")
    assert db._statements(sql) == [
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS a_idx ON a (x)",
        "CREATE INDEX CONCURRENTLY \"b;idx\" ON b (x) WHERE y = 'it''s; here'",
        "DO $body$ BEGIN PERFORM 1; END $body$",
        "SELECT $$;$$, 'x'",
    ]
    assert [db._INDEX_BUILT.match(s).group(1) for s in db._statements(sql)[:2]] == ["a_idx", '"b;idx"']


# ---- migrations that lock no big table for long ------------------------------------------------

_TABLE_NAME = r'(?:"(?:[^"]|"")+"|[A-Za-z_][\w$]*)(?:\.(?:"(?:[^"]|"")+"|[A-Za-z_][\w$]*))?'
_TABLE_CREATED = re.compile(rf"^CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?({_TABLE_NAME})", re.IGNORECASE)
_INDEX_CREATED = re.compile(rf"^CREATE\s+(?:UNIQUE\s+)?INDEX\b.*?\bON\s+(?:ONLY\s+)?({_TABLE_NAME})",
                            re.IGNORECASE | re.DOTALL)
_INDEX_DROPPED = re.compile(r"^DROP\s+INDEX\b", re.IGNORECASE)


def locking_index_statements() -> list[tuple[str, str]]:
    """(migration, statement) of every index built on a table an earlier migration made, or
    dropped, other than CONCURRENTLY in a migration run outside a transaction."""
    found = []
    tables_before: set[str] = set()
    for _, name, sql in db._migrations():
        statements = db._statements(sql)
        created_here = {m.group(1).lower() for s in statements if (m := _TABLE_CREATED.match(s))}
        for statement in statements:
            built = _INDEX_CREATED.match(statement)
            if built and built.group(1).lower() in created_here:
                continue  # an empty table, no one reading it yet
            if built:
                assert built.group(1).lower() in tables_before, (name, statement)
            elif not _INDEX_DROPPED.match(statement):
                continue
            if not (db._outside_transaction(sql) and db._CONCURRENTLY.search(statement)):
                found.append((name, " ".join(statement.split())))
        tables_before |= created_here
    return found


def test_no_migration_blocks_a_table_that_existed_before_it_for_an_index_build():
    """An index built without CONCURRENTLY (or in a migration run in a transaction) holds off every
    write to its table for the whole build, and an ALTER TABLE in the same transaction every read
    as well: on a large database upgraded from an old version, the API and the persister queued
    behind it for as long as it read the table (the version before still serving, in a rolling
    upgrade). A table the migration itself makes is empty: its indexes may be built as it is."""
    assert locking_index_statements() == []


NFC_NAMES_MIGRATION = "034_person_names_nfc.sql"


@contextlib.asynccontextmanager
async def as_before(database: str, migration: str) -> AsyncIterator[tuple[asyncpg.Connection, asyncpg.Pool]]:
    """A connection and a pool to the database with `migration` counted not applied (its data
    migration then runs again at the next apply_migrations)."""
    conn = await asyncpg.connect(database)
    pool = await asyncpg.create_pool(database, min_size=1, max_size=1)
    try:
        assert await conn.execute("DELETE FROM schema_migrations WHERE name = $1", migration) == "DELETE 1"
        yield conn, pool
    finally:
        await pool.close()
        await conn.close()


async def test_names_stored_before_with_combining_accents_are_brought_to_nfc(database):
    """A name enrolled with a combining accent before names were kept in NFC is found by the same
    name typed with a precomposed letter; where the owner already has the NFC name, the other row
    keeps its own (the unique index allows one of them only)."""
    decomposed, precomposed = "Jose\u0301", "Jos\u00e9"
    async with as_before(database, NFC_NAMES_MIGRATION) as (conn, pool):
        await conn.execute("INSERT INTO speakers (owner, name) VALUES ('a', $1), ('b', $1), ('b', $2)",
                           decomposed, precomposed)
        job_id = await conn.fetchval("INSERT INTO transcripts (filename, owner) VALUES ('a.wav', 'a') RETURNING id")
        await conn.execute("INSERT INTO transcript_speakers (transcript_id, speaker, embedding, embedding_model, name)"
                           " VALUES ($1, 'spk_0', '[1]', 'm', $2)", job_id, decomposed)

        assert await db.apply_migrations(pool) == [NFC_NAMES_MIGRATION]

        assert await conn.fetch("SELECT owner, name FROM speakers ORDER BY owner, name") == [
            ("a", precomposed), ("b", decomposed), ("b", precomposed)]
        by_hand = await conn.fetchval("SELECT name FROM transcript_speakers WHERE transcript_id = $1", job_id)
        assert by_hand == precomposed


EXPECTED_NFC_MIGRATION = "035_expected_speakers_nfc.sql"


async def test_the_people_a_job_expects_are_brought_to_nfc_with_the_enrolled_names(database):
    """A job submitted expecting "José" typed with a combining accent, from before names were kept
    in NFC, still finds him once his enrolled name is NFC; a spelling one of the owner's speakers
    still has exactly (kept apart by 034) stays as written."""
    decomposed, precomposed = "Jose\u0301", "Jos\u00e9"
    async with as_before(database, EXPECTED_NFC_MIGRATION) as (conn, pool):
        await conn.execute("INSERT INTO speakers (owner, name) VALUES ('a', $1), ('b', $1), ('b', $2)",
                           precomposed, decomposed)
        jobs = {}
        for owner in ("a", "b"):
            jobs[owner] = await conn.fetchval(
                "INSERT INTO transcripts (filename, owner, options) VALUES ('x.wav', $1, $2::jsonb) RETURNING id",
                owner, json.dumps({"expected_speakers": [decomposed, "Anna"]}))
        untouched = await conn.fetchval("INSERT INTO transcripts (filename, owner, options) VALUES"
                                        " ('y.wav', 'a', '{\"language\": \"en\"}'::jsonb) RETURNING id")

        assert await db.apply_migrations(pool) == [EXPECTED_NFC_MIGRATION]

        async def expected(job_id: int) -> list[str] | None:
            return json.loads(await conn.fetchval("SELECT options FROM transcripts WHERE id = $1", job_id)).get(
                "expected_speakers")

        assert await expected(jobs["a"]) == [precomposed, "Anna"]
        assert await expected(jobs["b"]) == [decomposed, "Anna"]
        assert await expected(untouched) is None


REINDEX_BOUNDS_MIGRATION = "036_reindex_run_bounds.sql"


async def test_a_reindex_run_recorded_before_its_bounds_were_kept_reads_as_covering_every_job(database):
    """reindex_runs gains the newest job a run covers and whether it saw the embedder not switched:
    a run's row from before keeps its outcome, with no newest job (its counts cover every job) and
    the embedder not said to be unswitched."""
    async with as_before(database, REINDEX_BOUNDS_MIGRATION) as (conn, pool):
        await conn.execute("ALTER TABLE reindex_runs DROP COLUMN newest_job, DROP COLUMN embedder_not_switched")
        await conn.execute("INSERT INTO reindex_runs (model, ended_at, error) VALUES ('m', now(), 'why')")

        assert await db.apply_migrations(pool) == [REINDEX_BOUNDS_MIGRATION]

        row = await conn.fetchrow("SELECT error, newest_job, embedder_not_switched FROM reindex_runs")
        assert tuple(row) == ("why", None, False)
