"""At-least-once delivery: redelivered and out-of-order messages change nothing twice."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import aio_pika
import asyncpg
import pytest

from common.messages import (
    ChunkEmbedded,
    ChunkTranscribed,
    Contract,
    JobDiarized,
    JobFailed,
    JobSubmitted,
    Segment,
    SpeakerEmbedding,
    SpeakerTurn,
    TimeSpan,
)
from tests.conftest import (
    Stack,
    database_of_this_machines_postgres,
    events_queue,
    job_events,
    wait_deliveries_handled,
    wait_settled,
)


async def publish(stack: Stack, *messages: Contract) -> None:
    connection = await aio_pika.connect(stack.amqp_url)
    try:
        channel = await connection.channel()
        exchange = await channel.get_exchange("stt")
        for message in messages:
            await exchange.publish(
                aio_pika.Message(message.model_dump_json().encode(), content_type="application/json",
                                 delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=message.ROUTING_KEY, mandatory=True,
            )
    finally:
        await connection.close()


async def wait_status(conn: asyncpg.Connection, job_id: int, status: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while await conn.fetchval("SELECT status FROM transcripts WHERE id = $1", job_id) != status:
        assert time.monotonic() < deadline, f"job {job_id} never became {status}"
        await asyncio.sleep(0.2)


async def wait_texts(conn: asyncpg.Connection, job_id: int, texts: list[str], timeout: float = 60) -> None:
    """Until the job's stored segments are (at least) these texts."""
    deadline = time.monotonic() + timeout
    while not set(texts) <= {r["text"] for r in await conn.fetch("SELECT text FROM segments WHERE transcript_id = $1",
                                                                    job_id)}:
        assert time.monotonic() < deadline, f"job {job_id}: segments {texts} never stored"
        await asyncio.sleep(0.2)


STAGE_QUEUES = [f"stt.{stage}" for stage in ("diarizer", "transcriber", "embedder", "persister")]


def segment(index: int, start: float, text: str, speaker: str = "spk_0") -> Segment:
    return Segment(index=index, speaker=speaker, start_ts=start, end_ts=start + 1, text=text)


async def test_duplicates_and_out_of_order_chunks_store_each_segment_once(stack):
    conn = await asyncpg.connect(stack.database_url)
    events = await aio_pika.connect(stack.amqp_url)
    try:
        queue = await events_queue(await events.channel(), "transcript.*")

        job_id = await conn.fetchval("INSERT INTO transcripts (filename) VALUES ('handmade.wav') RETURNING id")
        chunk0 = [segment(0, 0.0, "first"), segment(1, 1.5, "second", "spk_1")]
        chunk1 = [segment(0, 10.0, "third")]
        common = {"job_id": job_id, "chunk_count": 2, "duration": 12.0, "language": "en"}
        embedded0 = ChunkEmbedded(chunk_index=0, embedding_model="all-minilm",
                                  segments=[s.model_copy(update={"embedding": [0.5] * 384}) for s in chunk0], **common)
        # chunk 0: chunk.embedded before chunk.transcribed, each delivered more than once (the
        # real embedder also embeds the late chunk.transcribed again: one more duplicate).
        await publish(stack, embedded0, embedded0, ChunkTranscribed(chunk_index=0, segments=chunk0, **common))
        await wait_texts(conn, job_id, ["first", "second"])
        await wait_settled(stack, STAGE_QUEUES, [job_id])  # the copies and the embedder's own chunk.embedded too
        assert await conn.fetchval("SELECT status FROM transcripts WHERE id = $1", job_id) == "processing"
        rows = await conn.fetch("SELECT text, embedding::real[] AS embedding FROM segments"
                                " WHERE transcript_id = $1", job_id)
        assert sorted(r["text"] for r in rows) == ["first", "second"]
        assert all(r["embedding"] == [0.5] * 384 for r in rows)  # the first stored copy stays
        # chunk 1: transcribed twice, so the real embedder embeds it twice
        transcribed1 = ChunkTranscribed(chunk_index=1, segments=chunk1, **common)
        await publish(stack, transcribed1, transcribed1)
        await wait_status(conn, job_id, "done")
        await wait_settled(stack, STAGE_QUEUES, [job_id])  # the second copy's chunk.embedded, and every event sent

        rows = await conn.fetch("SELECT chunk_index, index, text, embedding::real[] AS embedding FROM segments"
                                " WHERE transcript_id = $1 ORDER BY start_ts", job_id)
        assert [r["text"] for r in rows] == ["first", "second", "third"]
        assert all(r["embedding"] is not None for r in rows)
        completed = []
        while (message := await queue.get(fail=False)) is not None:
            await message.ack()
            body = json.loads(message.body)
            if body["transcript_id"] == job_id:
                completed.append(message.routing_key)
        assert completed == ["transcript.completed"]
    finally:
        await events.close()
        await conn.close()


async def test_job_submitted_delivered_three_times_gives_one_transcript(stack, fixtures_dir):
    """What a subscriber sees too: each segment announced once, and one completion."""
    events = await aio_pika.connect(stack.amqp_url)
    try:
        queue = await events_queue(await events.channel(), "segment.created", "transcript.completed")
        response = await asyncio.to_thread(stack.submit, fixtures_dir / "en_dialogue.wav")
        job_id = response.json()["id"]
        again = JobSubmitted(job_id=job_id, audio_bucket="audio", audio_key=f"uploads/{job_id}",
                             filename="en_dialogue.wav")
        await publish(stack, again, again)
        document = await asyncio.to_thread(stack.wait_finished, job_id)
        assert document["status"] == "done"
        # the duplicate runs finish too: the diarizer ends all three deliveries, what they sent on is handled
        await asyncio.to_thread(wait_deliveries_handled, stack, job_id, 3)
        bodies = await job_events(queue, job_id, lambda got: any("segment_count" in b for b in got), 30)
        while (message := await queue.get(fail=False)) is not None:  # and whatever came after
            await message.ack()
            if (body := json.loads(message.body))["transcript_id"] == job_id:
                bodies.append(body)
    finally:
        await events.close()
    conn = await asyncpg.connect(stack.database_url)
    try:
        rows = await conn.fetch("SELECT speaker, start_ts, text FROM segments WHERE transcript_id = $1", job_id)
    finally:
        await conn.close()
    assert rows
    assert len({(r["start_ts"], r["text"]) for r in rows}) == len(rows)
    assert len(rows) == len(document["segments"])
    # Events are at-least-once, deduplicated on message_id (README): a copy of one is not a second
    # announcement, another message for the same segment or a second completion is. A copy comes
    # from the persister announcing an ended job's completion again when a late duplicate's
    # progress reaches it (a stage still working is told so): the same body under the same id.
    for message_id in {b["message_id"] for b in bodies}:
        copies = [b for b in bodies if b["message_id"] == message_id]
        assert all(copy == copies[0] for copy in copies), copies
    assert {b["message_id"] for b in bodies if "segment_count" in b} == {f"transcript.completed:{job_id}"}
    bodies = list({b["message_id"]: b for b in bodies}.values())
    announced = [(b["chunk_index"], b["index"]) for b in bodies if "index" in b]
    assert sorted(announced) == sorted({(s["chunk_index"], s["index"]) for s in document["segments"]})
    assert sum("segment_count" in b for b in bodies) == 1


async def test_a_failing_message_is_retried_then_fails_the_job_with_the_reason(stack):
    """A chunk whose audio's bucket is missing from the store (a missing object fails at once):
    retried after each RETRY_DELAYS_S delay, then the job fails with the error and the message
    waits in stt.dead-letters."""
    conn = await asyncpg.connect(stack.database_url)
    try:
        job_id = await conn.fetchval("INSERT INTO transcripts (filename) VALUES ('lost.wav') RETURNING id")
        await publish(stack, JobDiarized(
            job_id=job_id, chunk_index=0, chunk_count=1, pcm_bucket="no-such-bucket",
            pcm_key=f"pcm/{job_id}-missing.s16le", duration=5.0, span=TimeSpan(start=0, end=5),
            turns=[SpeakerTurn(speaker="spk_0", start=0.5, end=4.5)],
        ))
        started = time.monotonic()
        await wait_status(conn, job_id, "error", timeout=60)
        elapsed = time.monotonic() - started
        error = await conn.fetchval("SELECT error FROM transcripts WHERE id = $1", job_id)
    finally:
        await conn.close()
    # The client is told what kind of failure it was; the object key and S3's answer stay in the log.
    assert error == "transcriber failed after 3 attempts: the stored audio is missing, retries exhausted", error
    assert elapsed >= 3.0  # waited 1 s and 2 s between the attempts (RETRY_DELAYS_S=1,2)
    connection = await aio_pika.connect(stack.amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue("stt.dead-letters", passive=True)
        parked = []
        while (message := await queue.get(fail=False)) is not None:
            parked.append((json.loads(message.body), message.headers))
            await message.ack()
        [headers] = [h for body, h in parked if body.get("job_id") == job_id]
        # What operators read there: the exception itself, which the job's reason leaves out.
        assert "S3Error" in headers["x-last-error"] and "no-such-bucket" in headers["x-last-error"], headers
    finally:
        await connection.close()


async def test_concurrent_start_ups_apply_migrations_once(stack):
    from common.db import _migrations, apply_migrations
    from devstack import with_database

    versions = len(_migrations())

    name = f"stt_migrate_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(stack.database_url)
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        url = with_database(stack.database_url, name)
        pools = [await asyncpg.create_pool(url, min_size=1, max_size=1) for _ in range(5)]
        results = await asyncio.gather(*(apply_migrations(p) for p in pools))
        assert versions >= 2 and sorted(len(r) for r in results) == [0, 0, 0, 0, versions]  # one applier
        async with pools[0].acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == versions
            assert await conn.fetchval("SELECT to_regclass('segments') IS NOT NULL")
        for pool in pools:
            await pool.close()
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


async def applied_by_hand(conn: asyncpg.Connection, version: int, migration: str, sql: str) -> None:
    """A migration applied as the runner would, its statements one at a time where it is marked
    to run outside a transaction (CREATE INDEX CONCURRENTLY cannot run in the implicit one of a
    multi-statement string), and recorded as applied."""
    from common.db import NO_TRANSACTION_MARK, _statements

    for statement in _statements(sql) if sql.startswith(NO_TRANSACTION_MARK) else [sql]:
        await conn.execute(statement)
    await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, migration)


async def test_a_migration_waiting_for_a_busy_table_lets_the_running_services_through(stack):
    """A rolling upgrade: an old replica's transaction writing transcripts is open when the new
    version's migration wants to index that table. The migration waits; the old replicas' writes
    must not queue behind it all that time."""
    from common.db import MIGRATION_LOCK_TIMEOUT_S, _migrations, apply_migrations
    from devstack import with_database

    name = f"stt_busy_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(stack.database_url)
    await admin.execute(f"CREATE DATABASE {name}")
    url = with_database(stack.database_url, name)
    try:
        # 028 indexes `transcripts`: what a rolling upgrade's migration waits for.
        *earlier, (last, last_name, _) = [m for m in _migrations() if m[0] <= 28]
        setup = await asyncpg.connect(url)
        await setup.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
                            " applied_at timestamptz NOT NULL DEFAULT now())")
        for version, migration, sql in earlier:
            await applied_by_hand(setup, version, migration, sql)
        await setup.close()
        old_replica, other_write = await asyncpg.connect(url), await asyncpg.connect(url)
        pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
        try:
            long_transaction = old_replica.transaction()
            await long_transaction.start()
            await old_replica.execute("INSERT INTO transcripts (filename) VALUES ('being written.wav')")
            migrating = asyncio.create_task(apply_migrations(pool))
            await asyncio.sleep(1)
            assert not migrating.done()
            # Another write of the old version goes through while the migration waits.
            await asyncio.wait_for(other_write.execute("INSERT INTO transcripts (filename) VALUES ('meanwhile.wav')"),
                                   3 * MIGRATION_LOCK_TIMEOUT_S)
            assert not migrating.done()
            await long_transaction.commit()
            assert last_name in await asyncio.wait_for(migrating, 60)
            assert await pool.fetchval("SELECT count(*) FROM schema_migrations WHERE version = $1", last) == 1
        finally:
            await old_replica.close()
            await other_write.close()
            await pool.close()
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


async def test_stored_real_array_embeddings_become_vectors(stack):
    """A database from before pgvector: the migration converts its embeddings in place."""
    from common.db import _migrations, apply_migrations
    from devstack import with_database

    name = f"stt_upgrade_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(stack.database_url)
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        conn = await asyncpg.connect(with_database(stack.database_url, name))
        await conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
                           " applied_at timestamptz NOT NULL DEFAULT now())")
        for version, migration, sql in _migrations():
            if version < 7:
                await applied_by_hand(conn, version, migration, sql)
        await conn.execute("INSERT INTO transcripts (id, filename) VALUES (1, 'old.wav')")
        await conn.execute("INSERT INTO segments (transcript_id, chunk_index, index, speaker, start_ts, end_ts, text,"
                           " embedding, embedding_model) VALUES (1, 0, 0, 'spk_0', 0, 1, 'hello', $1, 'all-minilm')",
                           [0.6, 0.8, 0.0])
        await conn.close()
        pool = await asyncpg.create_pool(with_database(stack.database_url, name), min_size=1, max_size=1)
        try:
            assert [m for m in await apply_migrations(pool) if m.startswith("007")] == ["007_pgvector.sql"]
            row = await pool.fetchrow("SELECT pg_typeof(embedding)::text AS type, embedding::real[] AS values,"
                                      " embedding <=> '[0.6, 0.8, 0]'::vector AS distance FROM segments")
            assert row["type"] == "vector" and row["values"] == pytest.approx([0.6, 0.8, 0.0])
            assert row["distance"] == pytest.approx(0.0, abs=1e-6)
        finally:
            await pool.close()
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


def test_the_embedded_database_keeps_its_data_when_restarted(tmp_path):
    """What `make run` does without DATABASE_URL: its data directory outlives the server."""
    from devstack import admin_sql, embedded_postgres, stop_embedded_postgres

    data = tmp_path / "pg"
    url = embedded_postgres(data)
    admin_sql("CREATE TABLE kept (said text); INSERT INTO kept VALUES ('still here')", url)
    stop_embedded_postgres(data)
    with pytest.raises((OSError, asyncpg.PostgresError)):
        admin_sql("SELECT 1", url)
    again = embedded_postgres(data, fresh_handle=True)

    async def read() -> list:
        conn = await asyncpg.connect(again)
        try:
            return [r["said"] for r in await conn.fetch("SELECT said FROM kept")]
        finally:
            await conn.close()

    try:
        assert asyncio.run(read()) == ["still here"]
    finally:
        stop_embedded_postgres(data)


async def test_a_database_without_pgvector_is_refused_with_what_to_install():
    """This machine's own PostgreSQL 15 has no pgvector (the embedded one the tests use has)."""
    from common.db import MissingPgvector, apply_migrations

    async with database_of_this_machines_postgres("stt_novector") as (admin, url):
        if await admin.fetchval("SELECT count(*) FROM pg_available_extensions WHERE name = 'vector'"):
            pytest.skip("that PostgreSQL has pgvector")
        pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
        try:
            with pytest.raises(MissingPgvector, match="apt install postgresql-<version>-pgvector"):
                await apply_migrations(pool)
        finally:
            await pool.close()


async def test_an_event_that_cannot_be_published_is_set_aside_and_later_ones_flow(stack, fixtures_dir):
    connection = await aio_pika.connect(stack.amqp_url)
    try:
        queue = await events_queue(await connection.channel(), "transcript.completed")
        # Two rows no subscriber could be given: bodies that are not messages (no message_id).
        bad_ids = [r["id"] for r in stack.query(
            "INSERT INTO outbox (routing_key, body) VALUES ('transcript.exploded', '{}'::jsonb),"
            " ('transcript.completed', '{\"transcript_id\": \"not a number\"}'::jsonb) RETURNING id")]
        job_id = stack.submit(fixtures_dir / "jfk.flac").json()["id"]
        assert (await asyncio.to_thread(stack.wait_finished, job_id))["status"] == "done"
        await job_events(queue, job_id, lambda bodies: bodies, timeout=30)  # the job's completion came out
    finally:
        await connection.close()
    dead = stack.query("SELECT id, routing_key, error FROM outbox_dead WHERE id = ANY($1::bigint[]) ORDER BY id",
                       bad_ids)
    assert [(r["id"], r["routing_key"]) for r in dead] == [(bad_ids[0], "transcript.exploded"),
                                                           (bad_ids[1], "transcript.completed")]
    # Neither is a message at all (no message_id to deduplicate on); a known-shaped body of an
    # unknown kind would stay for a newer version (test_broker_outages).
    assert all("ValidationError" in row["error"] for row in dead)
    assert stack.value("SELECT count(*) FROM outbox WHERE id = ANY($1::bigint[])", bad_ids) == 0


async def test_a_subscriber_queue_that_refuses_events_holds_back_nothing(stack, fixtures_dir):
    """A subscriber's queue full and set to reject-publish makes the broker refuse every event
    routed to it. The outbox carries jobs' work messages and everyone's events in one order: an
    event sent again and again until that queue has room held back every job behind it. Now an
    event refused for EVENT_REFUSED_FOR_S (a broker failure of our own queues passes sooner) is
    not sent again. The stack's EVENT_REFUSED_FOR_S is short (devstack.TEST_ENV)."""
    refused_for_s = float(stack.env["EVENT_REFUSED_FOR_S"])
    connection = await aio_pika.connect(stack.amqp_url)
    try:
        channel = await connection.channel()
        exchange = await channel.get_exchange("stt.events")
        full = await channel.declare_queue(f"sub.full-{uuid.uuid4().hex[:8]}", exclusive=True,
                                           arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
        await full.bind(exchange, "#")
        queue = await events_queue(channel, "transcript.completed")
        job_id = stack.submit(fixtures_dir / "jfk.flac").json()["id"]
        assert (await asyncio.to_thread(stack.wait_finished, job_id))["status"] == "done"
        # The others still get theirs: each kind of event this queue refuses waits
        # EVENT_REFUSED_FOR_S once, then goes.
        await job_events(queue, job_id, lambda bodies: bodies, timeout=4 * refused_for_s + 15)
        deadline = time.monotonic() + 4 * refused_for_s + 15
        while stack.value("SELECT count(*) FROM outbox WHERE body->>'job_id' = $1", str(job_id)):
            assert time.monotonic() < deadline, "the refused events still hold the outbox"
            await asyncio.sleep(1)
        # A later job's events, refused again, leave the outbox: at once by the flusher that saw
        # the refusals, after one more EVENT_REFUSED_FOR_S by another process's flusher (each
        # counts its own), never held for good.
        later = stack.submit(fixtures_dir / "jfk.flac").json()["id"]
        assert (await asyncio.to_thread(stack.wait_finished, later, 90))["status"] == "done"
        await job_events(queue, later, lambda bodies: bodies, timeout=15)
        deadline = time.monotonic() + refused_for_s + 15
        while stack.value("SELECT count(*) FROM outbox WHERE body->>'job_id' = $1", str(later)):
            assert time.monotonic() < deadline, "a later job's refused events still hold the outbox"
            await asyncio.sleep(1)
    finally:
        await connection.close()


def test_a_kind_of_event_dropped_for_a_slow_subscriber_stays_dropped_while_the_refusals_go_on(monkeypatch):
    """A subscriber's bounded queue whose consumer is slower than the events has room for one now
    and then: that one went through, the kind's refusals were forgotten, and the next refusal
    began another EVENT_REFUSED_FOR_S of sending the head row again, with everything behind it
    (every job's job.submitted) moving at the subscriber's pace and the other queues given the
    event at each try. Now a kind once dropped is dropped at its first refusal while refusals
    keep coming within EVENT_REFUSED_FOR_S of each other, one going through in between or not."""
    from aio_pika.exceptions import DeliveryError

    from common import outbox

    now = [1000.0]
    monkeypatch.setattr(outbox.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(outbox, "_events_refused_since", {})
    refused, limit, key = DeliveryError(None, None), 5.0, "segment.created"
    assert not outbox.refused_too_long(key, refused, limit)
    now[0] += limit - 1
    assert not outbox.refused_too_long(key, refused, limit)
    now[0] += 1
    assert outbox.refused_too_long(key, refused, limit)  # refused for the limit: dropped
    for _ in range(3):  # the subscriber takes one now and then
        now[0] += 1
        outbox._event_went_through(key)
        now[0] += 0.5
        assert outbox.refused_too_long(key, refused, limit)  # dropped at once, no new wait
    # Another kind is not: its refusals count on their own.
    assert not outbox.refused_too_long("transcript.completed", refused, limit)
    # No refusal for the limit (the subscriber caught up, or its queue went): the next one waits again.
    now[0] += limit
    outbox._event_went_through(key)
    assert not outbox.refused_too_long(key, refused, limit)
    now[0] += limit - 1
    assert not outbox.refused_too_long(key, refused, limit)
    now[0] += 1
    assert outbox.refused_too_long(key, refused, limit)
    # A kind that went through before it was ever dropped starts its wait again, as before.
    now[0] += 1
    outbox._event_went_through("transcript.completed")
    now[0] += limit
    assert not outbox.refused_too_long("transcript.completed", refused, limit)
    # The broker gone ends the dropping: the first refusal after it may be its failure's.
    assert not outbox.refused_too_long(key, ConnectionError("broker gone"), limit)
    assert not outbox.refused_too_long(key, refused, limit)
    # Without a limit given, EVENT_REFUSED_FOR_S.
    now[0] += limit
    assert not outbox.refused_too_long(key, refused)
    now[0] += outbox.EVENT_REFUSED_FOR_S - limit
    assert outbox.refused_too_long(key, refused)


async def test_database_errors_are_told_apart_by_sqlstate(stack):
    """What PostgreSQL itself raises is classified by its sqlstate: a read-only database (a standby
    mid-failover) counts as unavailable, which the persister's consumer waits out without spending
    a retry (test_faults' PostgreSQL restart shows the waiting); a statement timeout does not, so
    it is this job's error, retried and then failing the job as any other error does."""
    from common.db import DATABASE_UNAVAILABLE

    conn = await asyncpg.connect(stack.database_url)
    try:
        raised = {}
        await conn.execute("SET statement_timeout = 50")
        try:
            await conn.execute("SELECT pg_sleep(2)")
        except asyncpg.PostgresError as exc:
            raised["statement timeout"] = exc
        await conn.execute("RESET statement_timeout")
        await conn.execute("SET default_transaction_read_only = on")  # as on a standby mid-failover
        try:
            await conn.execute("INSERT INTO transcripts (filename) VALUES ('read-only.wav')")
        except asyncpg.PostgresError as exc:
            raised["read-only"] = exc
    finally:
        await conn.close()
    assert {name: exc.sqlstate for name, exc in raised.items()} == {"statement timeout": "57014", "read-only": "25006"}
    assert not isinstance(raised["statement timeout"], DATABASE_UNAVAILABLE)
    assert isinstance(raised["read-only"], DATABASE_UNAVAILABLE)


async def test_a_submission_that_fails_after_its_row_is_written_leaves_no_audio(stack):
    """The job's transaction fails after the insert (here its callback URL cannot be stored):
    the client is told, and neither the row nor the uploaded recording is left behind."""
    from common.db import create_pool
    from common.messages import JobOptions
    from common.storage import object_exists, upload_bytes
    from services.ingest.jobs import create_job

    settings = stack.settings()
    s3 = stack.s3()
    stored: list[str] = []

    def put_audio(key: str) -> None:
        upload_bytes(s3, settings.audio_bucket, key, b"RIFF-not-really-audio")
        stored.append(key)

    async def callback_that_fails(conn: asyncpg.Connection, job_id: int) -> None:
        raise RuntimeError("the callback could not be stored")

    pool = await create_pool(settings)
    try:
        with pytest.raises(RuntimeError, match="callback"):
            await create_job(pool, s3, settings.audio_bucket, put_audio, filename="lost.wav", options=JobOptions(),
                             owner=None, outbox_wake=asyncio.Event(), also=callback_that_fails)
        job_id = int(stored[0].rsplit("/", 1)[1])
        assert await pool.fetchval("SELECT count(*) FROM transcripts WHERE id = $1", job_id) == 0
    finally:
        await pool.close()
    assert not object_exists(s3, settings.audio_bucket, stored[0])


async def test_a_job_deleted_as_soon_as_it_ends_is_still_counted_and_announced(stack):
    """Usage is recorded in the transaction that ends the job, and the owner's webhooks still get
    its end: a client that deletes a job the moment it is done loses neither."""
    from common import jobstore
    from common.db import create_pool
    from common.messages import TranscriptCompleted
    from services.notifier.handler import fan_out

    owner, stranger = f"owner-{uuid.uuid4().hex[:12]}", f"stranger-{uuid.uuid4().hex[:12]}"
    pool = await create_pool(stack.settings())
    hooks: list[int] = []
    try:
        async with pool.acquire() as conn:
            job_id = await conn.fetchval("INSERT INTO transcripts (filename, owner, duration)"
                                         " VALUES ('gone.wav', $1, 12.5) RETURNING id", owner)
            # Another key's endpoint for the same event: the owner's job is none of its business.
            for who in (owner, stranger):
                hooks.append(await conn.fetchval("INSERT INTO webhooks (owner, url, events, secret) VALUES"
                                                 " ($1, 'http://127.0.0.1:9/', $2, 'x') RETURNING id", who,
                                                 ["transcript.completed"]))
            hook = hooks[0]
            async with conn.transaction():
                await jobstore.mark_done(conn, job_id)
            await conn.execute("DELETE FROM transcripts WHERE id = $1", job_id)
            usage = await conn.fetchrow("SELECT owner, status, audio_s FROM job_usage WHERE job_id = $1", job_id)
        assert (usage["owner"], usage["status"], usage["audio_s"]) == (owner, "done", 12.5)
        ended = TranscriptCompleted(job_id=job_id, transcript_id=job_id, filename="gone.wav", language="en",
                                    duration=12.5, segment_count=0)
        assert [due.webhook_id async for due in fan_out(pool, ended)] == [hook]
    finally:
        await pool.execute("DELETE FROM webhooks WHERE id = ANY($1::bigint[])", hooks)
        await pool.close()


async def progress_of_an_ended_job(stack: Stack, columns: str, values: str, event: str) -> tuple[dict, asyncpg.Record]:
    """Make an ended job (`columns` and `values` of its row), report progress on it as a diarizer
    does, and return the `event` that goes out for the job and its row afterwards."""
    from common.messages import JobProgress

    conn = await asyncpg.connect(stack.database_url)
    try:
        job_id = await conn.fetchval(f"INSERT INTO transcripts ({columns}) VALUES ({values}) RETURNING id")
        connection = await aio_pika.connect(stack.amqp_url)
        async with connection:
            queue = await events_queue(await connection.channel(), event)
            await publish(stack, JobProgress(job_id=job_id, stage="diarizing"))
            [announced] = await job_events(queue, job_id, lambda bodies: bodies, timeout=30)
        return announced, await conn.fetchrow("SELECT id, status, stage FROM transcripts WHERE id = $1", job_id)
    finally:
        await conn.close()


async def test_progress_of_a_job_that_already_failed_announces_the_failure_again(stack):
    """A diarizer replica started after a job was cancelled never heard transcript.failed and
    takes the job: its first progress report makes the failure go out again (the same event), so
    that it stops, ingest removes the decoded audio and the transcribers skip the chunks."""
    failed, job = await progress_of_an_ended_job(stack, "filename, status, error, completed_at",
                                                 "'cancelled.wav', 'error', 'cancelled', now()", "transcript.failed")
    assert (failed["message_id"], failed["reason"], failed["filename"]) == (
        f"transcript.failed:{job['id']}", "cancelled", "cancelled.wav")
    assert job["stage"] != "diarizing"  # an ended job's stage does not move


async def test_a_job_done_and_delivered_again_announces_its_completion_again(stack):
    """The broker gives a job.submitted again after a lost connection although the job got done
    meanwhile: the second diarization's first progress report makes the completion go out again
    (the same event), so that the diarizer stops and the transcribers skip its chunks."""
    completed, job = await progress_of_an_ended_job(
        stack, "filename, status, stage, progress, language, completed_at",
        "'twice.wav', 'done', 'done', 1, 'en', now()", "transcript.completed")
    assert (completed["message_id"], completed["filename"], completed["language"]) == (
        f"transcript.completed:{job['id']}", "twice.wav", "en")
    assert (job["status"], job["stage"]) == ("done", "done")


async def test_a_late_progress_report_of_a_done_job_does_not_announce_its_completion_again():
    """A job's own job.progress(transcribing), held through a database outage and handed back
    behind the job's chunks (or tried again), reaches the persister after the job is done: it sent
    subscribers a second transcript.completed. Only a diarizer run's first report (diarizing: a
    delivery again) announces the end again."""
    from common import db
    from common.messages import JobProgress
    from common.settings import Settings
    from devstack import migrated_database
    from services.persister import handler

    async with migrated_database("stt_late_progress") as url:
        pool = await db.create_pool(Settings(_env_file=None, database_url=url), max_size=2)
        try:
            job_id = await pool.fetchval("INSERT INTO transcripts (filename, status, stage, progress, language,"
                                         " completed_at) VALUES ('late.wav', 'done', 'done', 1, 'en', now())"
                                         " RETURNING id")

            async def queued() -> list[str]:
                return [r["message_id"] for r in await pool.fetch(
                    "SELECT body->>'message_id' AS message_id FROM outbox WHERE body->>'job_id' = $1 ORDER BY id",
                    str(job_id))]

            late = JobProgress(job_id=job_id, stage="transcribing", duration=12.0, chunk_count=2)
            assert not await handler.on_progress(pool, late)
            assert await queued() == [], "a late progress report announced the completion again"
            assert await handler.on_progress(pool, JobProgress(job_id=job_id, stage="diarizing"))
            assert await queued() == [f"transcript.completed:{job_id}"]
            assert await pool.fetchval("SELECT stage FROM transcripts WHERE id = $1", job_id) == "done"
        finally:
            await pool.close()


async def test_progress_racing_the_jobs_deletion_announces_the_deletion_not_the_end():
    """A diarizer's progress on an ended job reaches the persister while DELETE /transcripts/{id}
    commits: the job's end was read without a lock, found, and queued after the deletion's
    transcript.deleted, so subscribers heard of the job ending after they heard it was gone. Now
    the read waits for the deletion, finds nothing, and the deletion is announced again."""
    from common import db, jobstore
    from common.messages import JobProgress
    from common.settings import Settings
    from devstack import migrated_database
    from services.persister import handler

    async with migrated_database("stt_end_or_deleted") as url:
        pool = await db.create_pool(Settings(_env_file=None, database_url=url), max_size=2)
        deleter = await pool.acquire()
        try:
            job_id = await deleter.fetchval("INSERT INTO transcripts (filename, status, stage, completed_at)"
                                            " VALUES ('racing.wav', 'done', 'done', now()) RETURNING id")
            await jobstore.record_usage(deleter, job_id)
            deleting = deleter.transaction()
            await deleting.start()
            await jobstore.delete_job(deleter, job_id)
            progress = asyncio.ensure_future(handler.on_progress(pool, JobProgress(job_id=job_id, stage="diarizing")))
            async def one_waits_for_a_lock() -> bool:
                # Inside a transaction pg_stat_activity is read once and kept: cleared for each look.
                await deleter.execute("SELECT pg_stat_clear_snapshot()")
                return await deleter.fetchval("SELECT count(*) > 0 FROM pg_stat_activity"
                                              " WHERE datname = current_database() AND wait_event_type = 'Lock'")

            # Until it waits for the deletion (or, reading without a lock, is done at once).
            deadline = time.monotonic() + 10
            while not progress.done() and not await one_waits_for_a_lock():
                assert time.monotonic() < deadline, "the progress neither ended nor waited for the deletion"
                await asyncio.sleep(0.05)
            waited = not progress.done()
            await deleting.commit()
            assert await asyncio.wait_for(progress, 30)
            queued = await deleter.fetch("SELECT routing_key, body->>'message_id' AS message_id FROM outbox"
                                         " WHERE body->>'job_id' = $1 ORDER BY id", str(job_id))
            assert [(r["routing_key"], r["message_id"]) for r in queued] == [
                ("transcript.deleted", f"transcript.deleted:{job_id}")] * 2
            assert waited  # the race was run: the deletion was not committed yet when the end was read
        finally:
            await pool.release(deleter)
            await pool.close()


async def test_a_chunk_of_a_job_that_already_failed_announces_the_failure_again(stack):
    """A transcriber (or embedder) replica started after a job was cancelled never heard
    transcript.failed and works through the job's chunks: the first that reaches the persister
    makes the failure go out again (the same event), so that it skips the rest. Nothing of the
    chunk is stored."""
    conn = await asyncpg.connect(stack.database_url)
    try:
        job_id = await conn.fetchval("INSERT INTO transcripts (filename, status, error, completed_at, chunk_count)"
                                     " VALUES ('cancelled late.wav', 'error', 'cancelled', now(), 2) RETURNING id")
        connection = await aio_pika.connect(stack.amqp_url)
        async with connection:
            queue = await events_queue(await connection.channel(), "transcript.failed")
            # The chunks in flight as it was cancelled all come late: told once, not at each.
            for index in (1, 0, 1):
                await publish(stack, ChunkTranscribed(job_id=job_id, chunk_index=index, chunk_count=2, duration=2.0,
                                                      segments=[segment(0, 1.0, "after the cancel")]))
            [failed] = await job_events(queue, job_id, lambda bodies: bodies, timeout=30)
            # The other two handled too (by the embedder as well), and whatever they announced sent.
            await wait_settled(stack, [*STAGE_QUEUES, "stt.persister.dead"], [job_id])
            assert await queue.get(fail=False) is None
        assert (failed["message_id"], failed["reason"], failed["filename"]) == (
            f"transcript.failed:{job_id}", "cancelled", "cancelled late.wav")
        assert await conn.fetchval("SELECT count(*) FROM segments WHERE transcript_id = $1", job_id) == 0
        assert await conn.fetchval("SELECT status FROM transcripts WHERE id = $1", job_id) == "error"
        await conn.execute("DELETE FROM transcripts WHERE id = $1", job_id)  # the stack is shared
    finally:
        await conn.close()


async def test_an_event_the_notifier_cannot_handle_is_parked_and_the_job_goes_on(stack):
    """Webhooks act on jobs' events; an event they cannot handle must not fail the transcription."""
    conn = await asyncpg.connect(stack.database_url)
    connection = await aio_pika.connect(stack.amqp_url)
    try:
        job_id = await conn.fetchval("INSERT INTO transcripts (filename) VALUES ('still going.wav') RETURNING id")
        channel = await connection.channel()
        # The consumer publishes a job.failed (confirmed) before it parks the message.
        failures = await channel.declare_queue(exclusive=True)
        await failures.bind(await channel.get_exchange("stt"), JobFailed.ROUTING_KEY)
        events = await channel.get_exchange("stt.events")
        await events.publish(aio_pika.Message(json.dumps({"job_id": job_id, "v": 1}).encode(),
                                              content_type="application/json"), routing_key="segment.created")
        dead_letters = await channel.declare_queue("stt.dead-letters", passive=True)
        deadline = time.monotonic() + 60
        parked = False
        while not parked:
            assert time.monotonic() < deadline, "the notifier never parked the event"
            message = await dead_letters.get(fail=False)
            if message is None:
                await asyncio.sleep(0.2)
                continue
            await message.ack()
            parked = json.loads(message.body).get("job_id") == job_id
        published = []
        while (failure := await failures.get(fail=False)) is not None:
            await failure.ack()
            published.append(json.loads(failure.body))
        assert [body for body in published if body.get("job_id") == job_id] == []
        assert await conn.fetchval("SELECT status FROM transcripts WHERE id = $1", job_id) == "processing"
        await conn.execute("DELETE FROM transcripts WHERE id = $1", job_id)  # the stack is shared
    finally:
        await connection.close()
        await conn.close()


# Digits of other scripts and superscripts, and a number past bigint.
STRAY_NAMES = ("\u00b2", "\u0661\u0662", "99999999999999999999")


async def test_an_upload_left_without_a_job_is_removed_and_a_jobs_upload_kept(stack):
    """An ingest killed between storing a recording and committing its job leaves the upload
    with no row; the hourly look removes such uploads once they are old enough, and no other."""
    import io

    from common.storage import object_exists
    from services.ingest.orphans import remove_orphan_uploads

    conn = await asyncpg.connect(stack.database_url)
    pool = await asyncpg.create_pool(stack.database_url, min_size=1, max_size=2)
    stray_names = STRAY_NAMES
    try:
        kept = await conn.fetchval("INSERT INTO transcripts (filename) VALUES ('kept.wav') RETURNING id")
        orphan = await conn.fetchval("SELECT nextval(pg_get_serial_sequence('transcripts', 'id'))")
        s3 = stack.s3()
        for job_id in (kept, orphan):
            s3.put_object("audio", f"uploads/{job_id}", io.BytesIO(b"RIFF"), 4)
        # Objects no upload of ingest's is named like (put there by hand) are left alone, and stop
        # nothing: a name str.isdigit() takes for a number that int() refuses, one past bigint.
        # Nor one of a missing job's id with a leading zero, which no id is written with.
        ghost = await conn.fetchval("SELECT nextval(pg_get_serial_sequence('transcripts', 'id'))")
        stray_names = (*STRAY_NAMES, f"0{ghost}")
        for name in stray_names:
            s3.put_object("audio", f"uploads/{name}", io.BytesIO(b"RIFF"), 4)
        assert await remove_orphan_uploads(pool, s3, "audio", age_s=3600) == 0  # too new to tell
        assert await remove_orphan_uploads(pool, s3, "audio", age_s=0) >= 1
        assert not object_exists(s3, "audio", f"uploads/{orphan}")
        assert object_exists(s3, "audio", f"uploads/{kept}")
        assert [name for name in stray_names if not object_exists(s3, "audio", f"uploads/{name}")] == []
        await conn.execute("DELETE FROM transcripts WHERE id = $1", kept)  # the stack is shared
        s3.remove_object("audio", f"uploads/{kept}")
    finally:
        for name in stray_names:
            stack.s3().remove_object("audio", f"uploads/{name}")
        await pool.close()
        await conn.close()


async def test_decoded_audio_left_after_its_job_ended_is_removed_and_a_running_jobs_kept(stack):
    """A second run of a job stored its decoded audio after the job's end had removed it, then
    stopped: nothing else would remove it. Audio of jobs running, or just ended (redaction may
    still read it), stays."""
    import io

    from common.storage import object_exists, pcm_key
    from services.ingest.orphans import remove_leftover_pcm

    conn = await asyncpg.connect(stack.database_url)
    pool = await asyncpg.create_pool(stack.database_url, min_size=1, max_size=2)
    s3 = stack.s3()
    jobs = {}
    try:
        for name, status, ended_days_ago, options in (
                ("running", "processing", None, {}), ("just ended", "done", 0, {}),
                ("ended long ago", "done", 2, {}), ("failed long ago", "error", 3, {}),
                # its redaction failed, and is retried from the PCM whenever it is
                ("redaction to do", "done", 2, {"redact": ["email"]})):
            jobs[name] = await conn.fetchval(
                "INSERT INTO transcripts (filename, status, completed_at, options, audio_redaction_due)"
                " VALUES ($1, $2, now() - make_interval(days => $3), $4::jsonb, $5) RETURNING id", name, status,
                ended_days_ago, json.dumps(options), name == "redaction to do")
        jobs["deleted"] = await conn.fetchval("SELECT nextval(pg_get_serial_sequence('transcripts', 'id'))")
        for job_id in jobs.values():
            s3.put_object("audio", pcm_key(job_id), io.BytesIO(b"\0\0"), 2)
        for name in STRAY_NAMES:  # left alone, and stop nothing
            s3.put_object("audio", f"pcm/{name}.s16le", io.BytesIO(b"\0\0"), 2)
        await remove_leftover_pcm(pool, s3, "audio")  # too new to tell
        assert all(object_exists(s3, "audio", pcm_key(job_id)) for job_id in jobs.values())
        assert await remove_leftover_pcm(pool, s3, "audio", age_s=0) >= 3
        assert {name for name, job_id in jobs.items() if object_exists(s3, "audio", pcm_key(job_id))} == {
            "running", "just ended", "redaction to do"}
        assert all(object_exists(s3, "audio", f"pcm/{name}.s16le") for name in STRAY_NAMES)
    finally:
        await conn.execute("DELETE FROM transcripts WHERE id = ANY($1::bigint[])", list(jobs.values()))
        for job_id in jobs.values():
            s3.remove_object("audio", pcm_key(job_id))
        for name in STRAY_NAMES:
            s3.remove_object("audio", f"pcm/{name}.s16le")
        await pool.close()
        await conn.close()


async def test_a_webhook_delivery_dead_lettered_fails_no_job_and_a_stages_message_does(stack):
    """RabbitMQ dead-letters a message its worker crashed on DELIVERY_LIMIT times. A chunk's
    fails its job; a webhook delivery's is the notifier's problem, not the transcription's."""
    conn = await asyncpg.connect(stack.database_url)
    connection = await aio_pika.connect(stack.amqp_url)
    try:
        webhook_job, chunk_job = [await conn.fetchval("INSERT INTO transcripts (filename) VALUES ($1) RETURNING id",
                                                      name) for name in ("hooked.wav", "crashed.wav")]
        dead = await (await connection.channel()).get_exchange("stt.dead")
        for routing_key, body in (("webhook.due", {"v": 1, "job_id": webhook_job, "webhook_id": 1}),
                                  ("job.diarized", {"v": 1, "job_id": chunk_job})):
            await dead.publish(aio_pika.Message(json.dumps(body).encode(), content_type="application/json"),
                               routing_key=routing_key)
        await wait_status(conn, chunk_job, "error", timeout=30)
        # The other handled too: taken from the persister's dead queue, and whatever it made sent.
        await wait_settled(stack, [*STAGE_QUEUES, "stt.persister.dead"], [webhook_job])
        assert await conn.fetchval("SELECT status FROM transcripts WHERE id = $1", webhook_job) == "processing"
        await conn.execute("DELETE FROM transcripts WHERE id = $1", webhook_job)  # the stack is shared
    finally:
        await connection.close()
        await conn.close()


async def test_a_speaker_enrolled_while_a_job_runs_is_announced_for_the_segments_already_out(stack):
    """Chunk 0's segments went out unnamed; then the person is enrolled, and chunk 1 names them.
    The enrolment's own pass over past recordings may find nothing left to change in this job,
    so the persister announces the new name: subscribers must not keep chunk 0 unnamed."""
    conn = await asyncpg.connect(stack.database_url)
    events = await aio_pika.connect(stack.amqp_url)
    voice = [0.0] * 192
    voice[7] = 1.0  # like no other voice in the stack
    model = "campplus_sv_zh_en_16k-common_advanced"
    speaker_id = None
    try:
        queue = await events_queue(await events.channel(), "transcript.speakers_updated", "segment.created")
        job_id = await conn.fetchval("INSERT INTO transcripts (filename) VALUES ('enrolled-late.wav') RETURNING id")
        heard = [SpeakerEmbedding(speaker="spk_0", embedding=voice, model=model, speech_s=20.0)]
        common = {"job_id": job_id, "chunk_count": 2, "duration": 20.0, "language": "en", "speakers": heard}
        await publish(stack, ChunkTranscribed(chunk_index=0, segments=[segment(0, 0.0, "first")], **common))
        first = await job_events(queue, job_id, lambda bodies: bodies, 30)
        assert first[0]["speaker_name"] is None
        speaker_id = await conn.fetchval("INSERT INTO speakers (name) VALUES ('Anna Enrolled-Late') RETURNING id")
        await conn.execute("INSERT INTO voiceprints (speaker_id, embedding, embedding_model, speech_s, source)"
                           " VALUES ($1, $2::real[]::vector, $3, 20, 'sample')", speaker_id, voice, model)
        await publish(stack, ChunkTranscribed(chunk_index=1, segments=[segment(0, 10.0, "second")], **common))
        later = await job_events(queue, job_id, lambda bodies: any("speakers" in b for b in bodies), 30)
        [update] = [b for b in later if "speakers" in b]
        assert update["speakers"]["spk_0"]["name"] == "Anna Enrolled-Late"
    finally:
        if speaker_id is not None:
            await conn.execute("DELETE FROM speakers WHERE id = $1", speaker_id)
        await conn.execute("DELETE FROM transcripts WHERE filename = 'enrolled-late.wav'")
        await events.close()
        await conn.close()


async def test_a_voiceprint_made_while_a_job_runs_announces_the_new_confidence_for_the_segments_already_out():
    """Chunk 0 named its speaker with the confidence of the one voiceprint there was; then a
    closer voiceprint of the same person was made (between an enrolment's commit and ingest's
    matching of this recording, which found nothing left to change here). Chunk 1 then changed only
    the confidence: it was written silently, and the subscribers kept chunk 0's."""
    from common import db
    from common.settings import Settings
    from devstack import migrated_database
    from services.persister import handler

    model = "campplus_sv_zh_en_16k-common_advanced"
    voice = [0.0] * 192
    voice[7] = 1.0
    near = [0.0] * 192
    near[7], near[8] = 0.8, 0.6  # cosine 0.8 to the voice: the same person, less sure
    async with migrated_database("stt_confidence") as url:
        pool = await db.create_pool(Settings(_env_file=None, database_url=url), max_size=2)
        try:
            job_id = await pool.fetchval("INSERT INTO transcripts (filename) VALUES ('closer.wav') RETURNING id")
            speaker_id = await pool.fetchval("INSERT INTO speakers (name) VALUES ('Anna') RETURNING id")

            async def voiceprint(embedding: list[float]) -> None:
                await pool.execute("INSERT INTO voiceprints (speaker_id, embedding, embedding_model, speech_s, source)"
                                   " VALUES ($1, $2::real[]::vector, $3, 20, 'sample')", speaker_id, embedding, model)

            heard = [SpeakerEmbedding(speaker="spk_0", embedding=voice, model=model, speech_s=20.0)]
            common = {"job_id": job_id, "chunk_count": 2, "duration": 20.0, "language": "en", "speakers": heard}
            await voiceprint(near)
            assert not await handler.on_transcribed(pool, ChunkTranscribed(
                chunk_index=0, segments=[segment(0, 0.0, "first")], **common))
            assert await pool.fetchval("SELECT confidence FROM transcript_speakers WHERE transcript_id = $1",
                                       job_id) == pytest.approx(0.8)
            await voiceprint(voice)
            assert await handler.on_transcribed(pool, ChunkTranscribed(
                chunk_index=1, segments=[segment(0, 10.0, "second")], **common))
            [update] = await pool.fetch("SELECT body FROM outbox WHERE routing_key = 'transcript.speakers_updated'"
                                        " AND body->>'job_id' = $1", str(job_id))
            told = update["body"]["speakers"]["spk_0"]
            assert (told["name"], told["confidence"]) == ("Anna", pytest.approx(1.0))
        finally:
            await pool.close()


async def test_a_chunk_transcribed_twice_keeps_its_first_text_through_its_embedding():
    """A transcriber stopped after publishing a chunk's text, before acking; another replica
    transcribed the chunk again, and read it differently. The second text replaced the first,
    which live streams had sent already, and the chunk.embedded of either could come first: the
    transcript ended up mixed. Now the first text stored stays, and so does its own embedding."""
    from common import db
    from common.settings import Settings
    from devstack import migrated_database
    from services.persister import handler

    async with migrated_database("stt_first_text") as url:
        pool = await db.create_pool(Settings(_env_file=None, database_url=url), max_size=2)
        try:
            job_id = await pool.fetchval("INSERT INTO transcripts (filename) VALUES ('twice.wav') RETURNING id")
            common = {"job_id": job_id, "chunk_index": 0, "chunk_count": 2, "duration": 20.0, "language": "en"}
            first = [segment(0, 0.0, "we meet on monday"), segment(1, 2.0, "at noon", "spk_1")]
            second = [segment(0, 0.0, "we meet on sunday")]

            async def stored() -> list[tuple[str, bool]]:
                return [tuple(r) for r in await pool.fetch(
                    "SELECT text, embedding IS NOT NULL FROM segments WHERE transcript_id = $1 ORDER BY index", job_id)]

            await handler.on_transcribed(pool, ChunkTranscribed(segments=first, **common))
            await handler.on_transcribed(pool, ChunkTranscribed(segments=second, **common))
            assert await stored() == [("we meet on monday", False), ("at noon", False)]

            def embedded(segments: list[Segment]) -> ChunkEmbedded:
                return ChunkEmbedded(embedding_model="all-minilm", **common,
                                     segments=[s.model_copy(update={"embedding": [0.5] * 384}) for s in segments])

            await handler.on_embedded(pool, embedded(second))  # the second text's embedding came first
            assert await stored() == [("we meet on monday", False), ("at noon", False)]
            await handler.on_embedded(pool, embedded(first))
            assert await stored() == [("we meet on monday", True), ("at noon", True)]
            assert await pool.fetchval("SELECT count(*) FROM outbox WHERE routing_key = 'segment.created'"
                                       " AND body->>'job_id' = $1", str(job_id)) == 2
        finally:
            await pool.close()


async def test_the_stall_reaper_spares_a_job_that_moved_after_it_was_listed(stack):
    """The reaper lists jobs with no progress for JOB_STALL_TIMEOUT_S, then fails them one by one;
    a job that a chunk moved meanwhile (a stage back after an outage) must not be failed."""
    from common.db import create_pool
    from services.persister.handler import fail_job

    conn = await asyncpg.connect(stack.database_url)
    pool = await create_pool(stack.settings(), max_size=2)
    moved = stalled = None
    try:
        moved = await conn.fetchval("INSERT INTO transcripts (filename, updated_at) VALUES"
                                    " ('moved.wav', now()) RETURNING id")
        # Stalled for this test's 1 h, not for the stack's own reaper's 6 h.
        stalled = await conn.fetchval("INSERT INTO transcripts (filename, updated_at) VALUES"
                                      " ('stalled.wav', now() - interval '2 hours') RETURNING id")
        reason = "no progress (test)"
        assert not await fail_job(pool, moved, "persister", reason, still_for_s=3600)
        assert await fail_job(pool, stalled, "persister", reason, still_for_s=3600)
        statuses = {r["id"]: r["status"] for r in await conn.fetch(
            "SELECT id, status FROM transcripts WHERE id = ANY($1)", [moved, stalled])}
        assert statuses == {moved: "processing", stalled: "error"}
    finally:
        await conn.execute("DELETE FROM transcripts WHERE filename IN ('moved.wav', 'stalled.wav')")
        await conn.execute("DELETE FROM job_usage WHERE job_id = $1", stalled)
        await pool.close()
        await conn.close()


async def test_the_stall_reaper_does_not_count_a_database_outage_even_after_a_restart(stack):
    """Through a PostgreSQL outage no job moves while its messages wait in stt.persister (README:
    none fails). A persister restarted during the outage (a crash loop, a redeploy), or another
    replica, knew nothing of it and failed, at its first round, every job whose last progress was
    older than the timeout only because of the outage. It is spared while its messages land; with
    the database up for the timeout, it is failed; one stalled before the outage is failed at once."""
    from pydantic import SecretStr

    from common.db import apply_migrations, create_pool
    from devstack import with_database
    from services.persister.handler import DatabaseMissed, reap_stalled_jobs
    from tests.conftest import free_port

    timeout_s, grace_s = 4.0, 1.0
    name = f"stt_reaper_{uuid.uuid4().hex[:8]}"  # a database of its own: no other persister beats here
    admin = await asyncpg.connect(stack.database_url)
    await admin.execute(f"CREATE DATABASE {name}")
    url = with_database(stack.database_url, name)
    settings = stack.settings().model_copy(update={"database_url": SecretStr(url)})
    pool = await create_pool(settings, max_size=2)
    # The database as the reaper sees it during the outage: nothing answers there.
    away = await asyncpg.create_pool(f"postgresql://postgres@127.0.0.1:{free_port()}/stt", min_size=0, max_size=1)
    try:
        await apply_migrations(pool)
        before_restart = DatabaseMissed()
        assert await reap_stalled_jobs(pool, timeout_s, before_restart, grace_s) == []
        held = await pool.fetchval("INSERT INTO transcripts (filename, updated_at) VALUES"
                                   " ('held through an outage.wav', now()) RETURNING id")
        stalled = await pool.fetchval("INSERT INTO transcripts (filename, updated_at) VALUES"
                                      " ('stalled before it.wav', now() - interval '1 hour') RETURNING id")
        outage_ends = time.monotonic() + timeout_s + 1
        while time.monotonic() < outage_ends:
            assert await reap_stalled_jobs(away, timeout_s, before_restart, grace_s) == []
            await asyncio.sleep(0.5)
        assert await pool.fetchval("SELECT updated_at < now() - make_interval(secs => $2) FROM transcripts"
                                   " WHERE id = $1", held, timeout_s)

        restarted = DatabaseMissed(since_last_round=False)  # a process that never saw the outage
        assert await reap_stalled_jobs(pool, timeout_s, restarted, grace_s) == [stalled]
        assert await pool.fetchval("SELECT status FROM transcripts WHERE id = $1", held) == "processing"
        spared_until = time.monotonic() + timeout_s - 1  # the database up, the grace after the outage
        while time.monotonic() < spared_until:
            assert await reap_stalled_jobs(pool, timeout_s, restarted, grace_s) == []
            await asyncio.sleep(0.5)
        deadline = time.monotonic() + 10
        while not await reap_stalled_jobs(pool, timeout_s, restarted, grace_s):
            assert time.monotonic() < deadline, "the job was never failed once the database was back"
            await asyncio.sleep(0.5)
        assert await pool.fetchval("SELECT status FROM transcripts WHERE id = $1", held) == "error"
    finally:
        await away.close()
        await pool.close()
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


@pytest.fixture
def own_database_url():
    """A database of its own, no services: no other persister beats there."""
    from devstack import scratch_database

    with scratch_database("stt_reaper") as url:
        yield url


async def test_a_database_miss_noted_during_the_stall_reapers_heartbeat_is_kept_for_its_next_round(own_database_url):
    """A database miss noted (DatabaseMissed) while the stall reaper's heartbeat is being written:
    the reaper cleared the note once its write returned, so that outage was never recorded as a
    gap, and the jobs held through it could be failed as stalled. The note is kept, and the next
    round records the gap."""
    from common.db import apply_migrations, create_pool
    from common.settings import Settings
    from services.persister.handler import DatabaseMissed, reap_stalled_jobs

    pool = await create_pool(Settings(_env_file=None, database_url=own_database_url), max_size=2)
    holder = await asyncpg.connect(own_database_url)
    try:
        await apply_migrations(pool)
        missed = DatabaseMissed(since_last_round=False)
        assert await reap_stalled_jobs(pool, 60, missed, 60) == []
        # The heartbeat's row held by another transaction: the reaper's write waits on it.
        holding = holder.transaction()
        await holding.start()
        await holder.execute("SELECT 1 FROM stall_reaper_heartbeat FOR UPDATE")
        beating = asyncio.create_task(reap_stalled_jobs(pool, 60, missed, 60))
        deadline = time.monotonic() + 10
        while not await holder.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                                        " AND wait_event_type = 'Lock'"):
            assert time.monotonic() < deadline and not beating.done(), "the heartbeat never waited on the row"
            await asyncio.sleep(0.05)
        missed.since_last_round = True  # a miss noted meanwhile
        await holding.rollback()
        assert await asyncio.wait_for(beating, 10) == []
        assert missed.since_last_round, "the miss noted during the heartbeat was cleared"
        next_round_at = await pool.fetchval("SELECT now()")
        assert await reap_stalled_jobs(pool, 60, missed, 60) == []
        assert not missed.since_last_round
        assert await pool.fetchval("SELECT max(until) FROM stall_reaper_gaps") >= next_round_at, "no gap recorded"
    finally:
        await holder.close()
        await pool.close()


async def test_work_on_a_deleted_job_announces_the_deletion_again_and_the_stages_stop(stack):
    """A job.submitted delivered again after its job ended and was deleted reaches a diarizer that
    never heard of the deletion (a replica started after it). Its progress report makes the
    persister announce transcript.deleted again (the same event), so the diarizer skips the job's
    next delivery instead of retrying the download of a recording that is gone until the message
    is parked in stt.dead-letters; a chunk of the job (a transcriber that never heard) does the same."""
    import re

    from common import jobstore

    conn = await asyncpg.connect(stack.database_url)
    connection = await aio_pika.connect(stack.amqp_url)
    try:
        job_id = await conn.fetchval("INSERT INTO transcripts (filename, status, stage, completed_at)"
                                     " VALUES ('deleted before.wav', 'done', 'done', now()) RETURNING id")
        await jobstore.record_usage(conn, job_id)
        # Deleted before the stages' time: none of them heard of it.
        await conn.execute("DELETE FROM transcripts WHERE id = $1", job_id)
        queue = await events_queue(await connection.channel(), "transcript.deleted")
        await publish(stack, JobSubmitted(job_id=job_id, audio_bucket="audio", audio_key=f"uploads/{job_id}",
                                          filename="deleted before.wav"))
        [announced] = await job_events(queue, job_id, lambda bodies: bodies, timeout=30)
        assert (announced["message_id"], announced["job_id"]) == (f"transcript.deleted:{job_id}", job_id)

        skipped = re.compile(rf"job={job_id} .*job\.submitted skipped")
        deadline = time.monotonic() + 30
        while not skipped.search(stack.log_text("diarizer")):
            assert time.monotonic() < deadline, "the diarizer never skipped the deleted job's delivery"
            await asyncio.sleep(0.2)
        assert not re.search(rf"job={job_id} .*failed after \d+ attempts", stack.log_text("diarizer"))

        await asyncio.sleep(1)
        while (message := await queue.get(fail=False)) is not None:  # one per attempt that reported
            await message.ack()
        await publish(stack, ChunkTranscribed(job_id=job_id, chunk_index=0, chunk_count=1, duration=1.0,
                                              segments=[segment(0, 0.0, "late")]))
        [again] = await job_events(queue, job_id, lambda bodies: bodies, timeout=30)
        assert again["message_id"] == announced["message_id"]
    finally:
        await connection.close()
        await conn.close()


@pytest.mark.parametrize("kind", ["chunk.transcribed", "chunk.embedded"])
async def test_a_failure_announced_again_whose_commit_fails_is_announced_at_the_next_try(kind, monkeypatch):
    """A late chunk of a failed job (from a stage that never heard of the failure) queues
    transcript.failed again, and the persister counts the failure as announced, for a minute. It
    was counted before the transaction committed: where the commit failed, the next try of the
    message found it announced, ignored the chunk, and no transcript.failed went out. Here the
    commit fails for real, on a deferred constraint trigger of the outbox."""
    from common import db
    from common.recent import Recent
    from common.settings import Settings
    from devstack import migrated_database
    from services.persister import handler

    # This process's count of announcements, of no other test's job of the same id.
    monkeypatch.setattr(handler, "_failures_announced_again", Recent(handler.FAILURES_ANNOUNCED_AGAIN_KEPT))
    async with migrated_database("stt_failure_again") as url:
        pool = await db.create_pool(Settings(_env_file=None, database_url=url), max_size=2)
        try:
            job_id = await pool.fetchval("INSERT INTO transcripts (filename, status, error, completed_at, chunk_count)"
                                         " VALUES ('cancelled.wav', 'error', 'cancelled', now(), 2) RETURNING id")
            await pool.execute("""
                CREATE FUNCTION refuse_commit() RETURNS trigger LANGUAGE plpgsql AS
                $$ BEGIN RAISE EXCEPTION 'commit refused'; END $$;
                CREATE CONSTRAINT TRIGGER refuse_commit AFTER INSERT ON outbox
                    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_commit();
            """)
            late = ChunkTranscribed(job_id=job_id, chunk_index=1, chunk_count=2, duration=2.0,
                                    segments=[segment(0, 1.0, "after the cancel")])
            if kind == "chunk.embedded":
                late = ChunkEmbedded(**late.model_dump(), embedding_model="test-model")
            handle = handler.on_embedded if kind == "chunk.embedded" else handler.on_transcribed

            with pytest.raises(asyncpg.exceptions.RaiseError, match="commit refused"):
                await handle(pool, late)
            assert await pool.fetchval("SELECT count(*) FROM outbox") == 0
            await pool.execute("DROP TRIGGER refuse_commit ON outbox")

            assert await handle(pool, late), "the next try queued no transcript.failed"
            assert [r["message_id"] for r in await pool.fetch("SELECT body->>'message_id' AS message_id FROM outbox")] \
                == [f"transcript.failed:{job_id}"]
            assert not await handle(pool, late)  # and then once a minute, as before
        finally:
            await pool.close()


async def test_a_late_copy_of_the_diarizers_first_report_does_not_announce_the_end_again():
    """The first progress report (diarizing) of the diarizer run that did a job, held through a
    database outage and handed back behind the job's chunks, reached the persister after the job
    was done: taken for a run begun after the end, it sent subscribers a second
    transcript.completed, and ingest ran the job's end again. The diarizer stamps when its run
    began; a run begun after the job ended (a delivery again, a replica started after a cancel)
    still announces the end again."""
    from common import db
    from common.settings import Settings
    from devstack import migrated_database
    from services.diarizer.handler import handle
    from services.persister import handler

    async def diarizer_begins(job_id: int):
        """The first report of a diarizer run of the job, as the diarizer makes it."""
        run = handle(JobSubmitted(job_id=job_id, audio_bucket="audio", audio_key=f"uploads/{job_id}",
                                  filename="late.wav"), None)
        try:
            return await anext(run)
        finally:
            await run.aclose()

    async with migrated_database("stt_late_first_report") as url:
        pool = await db.create_pool(Settings(_env_file=None, database_url=url), max_size=2)
        try:
            async def queued(job_id: int) -> list[str]:
                return [r["message_id"] for r in await pool.fetch(
                    "SELECT body->>'message_id' AS message_id FROM outbox WHERE body->>'job_id' = $1 ORDER BY id",
                    str(job_id))]

            job_id = await pool.fetchval("INSERT INTO transcripts (filename) VALUES ('late.wav') RETURNING id")
            first = await diarizer_begins(job_id)
            assert first.stage == handler.DIARIZER_RUN_BEGINS and first.run_started_at is not None
            await asyncio.sleep(0.05)
            await pool.execute("UPDATE transcripts SET status = 'done', stage = 'done', progress = 1,"
                               " completed_at = now() WHERE id = $1", job_id)

            assert not await handler.on_progress(pool, first)
            assert await queued(job_id) == [], "a late copy of the run's first report announced the completion again"

            assert await handler.on_progress(pool, await diarizer_begins(job_id))  # a delivery again
            assert await queued(job_id) == [f"transcript.completed:{job_id}"]

            cancelled = await pool.fetchval("INSERT INTO transcripts (filename, status, error, completed_at)"
                                            " VALUES ('cancelled.wav', 'error', 'cancelled', now()) RETURNING id")
            await asyncio.sleep(0.05)
            assert await handler.on_progress(pool, await diarizer_begins(cancelled))  # a replica started after
            assert await queued(cancelled) == [f"transcript.failed:{cancelled}"]
        finally:
            await pool.close()
