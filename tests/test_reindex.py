"""Re-embedding stored transcripts after the embedding model changed (`stt reindex`,
/admin/reindex), and usage per API key (`stt usage`, /usage, /admin/usage): the admin's
endpoints, on one real stack with an admin key and a user key."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import running_stack

ADMIN, USER = "reindex-admin-key-01", "reindex-user-key-02"
USE = "universal-sentence-encoder-multilingual-3"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, fixtures_dir):
    """A stack with an admin key and a user key, and two finished jobs of the user's."""
    with running_stack(tmp_path_factory, API_KEYS=f"{ADMIN},{USER}", ADMIN_API_KEY=ADMIN) as stack:
        user = httpx.Client(headers={"X-API-Key": USER}, timeout=60)
        jobs = [stack.submit_job(fixtures_dir / name, client=user) for name in ("en_dialogue.wav", "jfk.flac")]
        assert {stack.wait_finished(job, 300, user)["status"] for job in jobs} == {"done"}
        yield stack, user, jobs
        user.close()


def stt(stack, key: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "STT_API_URL": stack.api, "STT_API_KEY": key}
    return subprocess.run([str(Path(sys.executable).parent / "stt"), *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_usage_counts_each_keys_audio_and_outlives_deleted_jobs(keyed):
    stack, user, jobs = keyed
    admin = httpx.Client(headers={"X-API-Key": ADMIN}, timeout=60)
    seconds = sum(stack.value("SELECT duration FROM transcripts WHERE id = $1", job) for job in jobs)
    own = user.get(f"{stack.api}/usage").json()
    assert (own["jobs"], own["done"], own["failed"]) == (2, 2, 0) and abs(own["audio_s"] - seconds) < 0.01, own
    assert [day["jobs"] for day in own["days"]] == [2]
    assert admin.get(f"{stack.api}/usage").json()["jobs"] == 0  # the admin key made none

    # Deleting a job does not take back what was processed.
    assert user.delete(f"{stack.api}/transcripts/{jobs[1]}").status_code == 204
    assert user.get(f"{stack.api}/usage").json()["jobs"] == 2
    assert user.get(f"{stack.api}/usage", params={"until": "2020-01-01"}).json()["jobs"] == 0
    assert user.get(f"{stack.api}/usage", params={"since": "2020-01-02", "until": "2020-01-01"}).status_code == 400

    assert user.get(f"{stack.api}/admin/usage").status_code == 403
    # Every key in API_KEYS, the admin's (no jobs) too.
    admins, users = admin.get(f"{stack.api}/admin/usage").json()["keys"]
    assert (admins["key"], admins["jobs"], admins["days"]) == ("…" + ADMIN[-4:], 0, []), admins
    assert users["key"] == "…" + USER[-4:] and users["jobs"] == 2, users
    printed = stt(stack, USER, "usage")
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.splitlines()[-1].split("\t")[:4] == ["total", "2", "2", "0"], printed.stdout
    by_keys = stt(stack, ADMIN, "usage", "--all-keys").stdout.splitlines()
    assert by_keys[0] == f"…{ADMIN[-4:]}\t0\t0\t0\t00:00.0" and by_keys[1].startswith(f"…{USER[-4:]}\t2\t2\t0\t")
    admin.close()


def test_the_admins_usage_tells_apart_keys_that_end_alike_and_does_not_show_short_keys():
    """Keys named by their last four characters alone: alice-key-2026 and bob-key-2026 were two lines
    "…2026" nobody could tell apart, and a key "abcd" was shown whole."""
    from services.ingest.auth import owner_of
    from services.ingest.usage import key_names

    names = key_names(["alice-key-2026", "bob-key-2026", "abcd", "team-key-02"])
    assert list(names) == [owner_of(key) for key in ("alice-key-2026", "bob-key-2026", "abcd", "team-key-02")]
    alice, bob, short, team = names.values()
    assert alice == f"…2026 #{owner_of('alice-key-2026')[:8]}" and bob == f"…2026 #{owner_of('bob-key-2026')[:8]}"
    assert short == f"a short key #{owner_of('abcd')[:8]}" and "abcd" not in short
    assert team == "…y-02"


def test_usage_tells_removed_keys_apart_and_lists_keys_without_jobs(keyed):
    """Every key no longer in API_KEYS read "a removed key" (two of them: two lines alike), and a
    key without jobs in the period was left out, where the README says every key is listed."""
    from services.ingest.auth import owner_of

    stack, _, _ = keyed
    gone = ["removed-key-one-7777", "removed-key-two-7777"]  # (the same last four characters)
    made = [stack.value("INSERT INTO job_usage (job_id, owner, ended_at, status, audio_s) VALUES"
                        " (-1 - $2::bigint, $1, now(), 'done', 10) RETURNING job_id", owner_of(key), jobs)
            for key, jobs in ((gone[0], 0), (gone[1], 1), (gone[1], 2))]
    try:
        keys = httpx.get(f"{stack.api}/admin/usage", headers={"X-API-Key": ADMIN}, timeout=60).json()["keys"]
    finally:
        stack.query("DELETE FROM job_usage WHERE job_id = ANY($1)", made)
    named = {k["key"]: k["jobs"] for k in keys}
    assert named["…" + ADMIN[-4:]] == 0, keys  # no jobs, listed
    removed = {name: jobs for name, jobs in named.items() if name.startswith("a removed key")}
    # Each by the start of its hash, which whoever has the key can work out; never by the key.
    assert removed == {f"a removed key #{owner_of(gone[0])[:8]}": 1, f"a removed key #{owner_of(gone[1])[:8]}": 2}
    assert not any(key[-4:] in name for key in gone for name in removed), removed


async def test_a_segment_corrected_while_ollama_is_away_is_found_by_meaning_once_it_is_back(keyed):
    """Before the model changes (the next test): ingest's query model is the stored one."""
    import aiohttp

    from common.db import LockKey
    from services.embedder.backends import make_embedder
    from services.ingest.reindex import embed_corrections
    from tests.conftest import wait_for_port

    stack, user, jobs = keyed
    segment = user.get(f"{stack.api}/transcripts/{jobs[0]}").json()["segments"][-1]
    where = f"{stack.api}/transcripts/{jobs[0]}/segments/{segment['chunk_index']}/{segment['index']}"
    said = "The giraffes at the zoo were fed fresh leaves this morning."
    ollama_port = stack.env["OLLAMA_URL"].rsplit(":", 1)[1]

    def top_hit() -> tuple[int, str]:
        hits = user.get(f"{stack.api}/search", params={"q": "animals eating", "mode": "semantic"}).json()["items"]
        return (hits[0]["transcript_id"], hits[0]["text"]) if hits else None

    # Ingest's own turn, every minute, is held off by holding its lock throughout; this test
    # takes that turn itself, at once.
    from common.db import create_pool

    pool = await create_pool(stack.settings(), min_size=2, max_size=3)  # ingest's codecs (the outbox's jsonb)
    try:
        async with pool.acquire() as lock, aiohttp.ClientSession() as http:
            while not await lock.fetchval("SELECT pg_try_advisory_lock($1)", LockKey.CORRECTIONS):
                await asyncio.sleep(0.2)  # ingest's turn is under way
            stack.stop("ollama")
            try:
                corrected = await asyncio.to_thread(user.patch, where, json={"text": said})
                assert corrected.status_code == 200, corrected.text  # the words are kept without their vector
                assert await embed_corrections(pool, *make_embedder(stack.settings(), http)) == 0  # still away
            finally:
                stack.start("ollama", "-m", "tests.fake_ollama", "--port", ollama_port)
                wait_for_port(int(ollama_port), timeout=120)
            assert await pool.fetchval("SELECT embedding_model FROM segments WHERE transcript_id = $1"
                                       " AND chunk_index = $2 AND index = $3",
                                       jobs[0], segment["chunk_index"], segment["index"]) is None
            assert await asyncio.to_thread(top_hit) != (jobs[0], said)
            assert await embed_corrections(pool, *make_embedder(stack.settings(), http)) == 1
            assert await embed_corrections(pool, *make_embedder(stack.settings(), http)) == 0
    finally:
        await pool.close()
    assert await asyncio.to_thread(top_hit) == (jobs[0], said)


def test_a_correction_refused_answers_at_once_without_asking_the_embedding_service(keyed):
    """The new text was embedded before anything was checked: a correction of a job still
    processing (409), of a segment there is not (404) or of a recording being redacted (409), or
    one that changes nothing, waited for the embedding service (up to REQUEST_EMBED_TIMEOUT_S, 15 s,
    against a slow one) before its answer. Here the service takes requests and never answers."""
    from services.ingest.auth import owner_of
    from tests.conftest import wait_for_port

    stack, user, jobs = keyed
    segment = user.get(f"{stack.api}/transcripts/{jobs[0]}").json()["segments"][0]
    made = [stack.value("INSERT INTO transcripts (filename, owner, status, completed_at, audio_redaction_due)"
                        " VALUES ('held.wav', $1, $2, CASE WHEN $2 = 'done' THEN now() END, $3) RETURNING id",
                        owner_of(USER), status, due) for status, due in (("processing", False), ("done", True))]
    for job_id in made:
        stack.query("INSERT INTO segments (transcript_id, chunk_index, index, speaker, start_ts, end_ts, text, words)"
                    " VALUES ($1, 0, 0, 'spk_0', 0, 1, 'as it was', '[]'::jsonb)", job_id)
    ollama_port = int(stack.env["OLLAMA_URL"].rsplit(":", 1)[1])
    received: list[bytes] = []

    def silent(connection: socket.socket) -> None:
        with connection, contextlib.suppress(OSError):
            while data := connection.recv(65536):
                received.append(data)

    def accept(listener: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                threading.Thread(target=silent, args=(listener.accept()[0],), daemon=True).start()

    stack.stop("ollama")
    listener = socket.create_server(("127.0.0.1", ollama_port))
    threading.Thread(target=accept, args=(listener,), daemon=True).start()
    try:
        asked = {f"{stack.api}/transcripts/{made[0]}/segments/0/0": "words of a job processing",
                 f"{stack.api}/transcripts/{jobs[0]}/segments/999/0": "words of no segment",
                 f"{stack.api}/transcripts/{made[1]}/segments/0/0": "words of a recording being redacted",
                 f"{stack.api}/transcripts/{jobs[0]}/segments/{segment['chunk_index']}/{segment['index']}":
                     f"  {segment['text']} "}
        started = time.monotonic()
        answers = [user.patch(url, json={"text": text}) for url, text in asked.items()]
        took = time.monotonic() - started
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        stack.start("ollama", "-m", "tests.fake_ollama", "--port", str(ollama_port))
        wait_for_port(ollama_port, timeout=120)
        stack.query("DELETE FROM transcripts WHERE id = ANY($1)", made)
    assert [a.status_code for a in answers] == [409, 404, 409, 200], [a.text for a in answers]
    assert answers[3].json()["edited"] == segment["edited"]  # nothing changed
    sent = b"".join(received)
    assert not [text for text in asked.values() if text.strip().encode() in sent], sent
    assert took < 5, f"{took:.1f} s for four refused or empty corrections"


def test_a_new_embedding_model_reembeds_every_stored_segment(keyed):
    stack, user, jobs = keyed
    models = {r["embedding_model"] for r in stack.query("SELECT embedding_model FROM segments")}
    assert models == {"all-minilm"}

    # The operator switches the embedder (and so ingest's query embedding) to another model.
    stack.env["EMBEDDING_BACKEND"] = "local"
    stack.stop("ingest")
    stack.start_service("ingest")
    stack.wait_ready(timeout=120)
    assert user.post(f"{stack.api}/admin/reindex").status_code == 403
    assert user.get(f"{stack.api}/search", params={"q": "sales", "mode": "semantic"}).json()["items"] == []

    result = stt(stack, ADMIN, "reindex")
    assert result.returncode == 0, result.stdout + result.stderr
    segments = stack.value("SELECT count(*) FROM segments")
    assert result.stdout.strip() == f"{segments} segments embedded with {USE}, 0 to do (done)"
    rows = stack.query("SELECT embedding_model, vector_dims(embedding) AS dims FROM segments")
    assert {(r["embedding_model"], r["dims"]) for r in rows} == {(USE, 512)}
    hits = user.get(f"{stack.api}/search", params={"q": "sales figures", "mode": "semantic"}).json()
    assert hits["embedding_model"] == USE and hits["items"][0]["transcript_id"] == jobs[0]
    again = stt(stack, ADMIN, "reindex")
    assert again.stdout.strip() == f"{segments} segments embedded with {USE}, 0 to do (done)"


async def test_a_segment_corrected_while_it_is_reembedded_is_not_given_its_old_texts_vector(keyed):
    """A correction clears the segment's vector for the next re-embedding; one under way, which
    embedded the old text, must not store that vector over it as if it were the new text's."""
    import asyncpg

    from services.ingest.reindex import Reindexer

    stack, _, jobs = keyed
    pool = await asyncpg.create_pool(stack.database_url, min_size=1, max_size=2)
    corrected = []

    async def embed(texts: list[str]) -> list[list[float]]:
        if not corrected:  # the owner corrects the first segment while its old text is embedded
            corrected.append(await pool.execute(
                "UPDATE segments SET text = 'Corrected by hand.', embedding_model = NULL"
                " WHERE transcript_id = $1 AND chunk_index = 0 AND index = 0", jobs[0]))
        return [[1.0] + [0.0] * 511 for _ in texts]

    try:
        await Reindexer(pool, embed, "race-test-model")._reindex_job(jobs[0])
        rows = await pool.fetch("SELECT chunk_index, index, embedding_model FROM segments WHERE transcript_id = $1"
                                " ORDER BY chunk_index, index", jobs[0])
    finally:
        await pool.close()
    assert corrected == ["UPDATE 1"]
    assert rows[0]["embedding_model"] is None  # waits for the next run, which embeds the corrected text
    assert {r["embedding_model"] for r in rows[1:]} == {"race-test-model"}


async def test_one_run_across_replicas_that_stores_a_refused_text_without_a_vector(keyed):
    """Two ingest replicas (k8s runs two): a run started through one is reported, and not run
    again, by the other; a text the embedding service refuses (while it embeds others) is stored
    without a vector, marked with the model, and the jobs after it are still embedded."""
    import asyncpg

    from services.embedder.backends import OllamaError
    from services.ingest.reindex import Reindexer

    stack, _, jobs = keyed
    model = "replicas-test-model"
    pool = await asyncpg.create_pool(stack.database_url, min_size=1, max_size=4)
    # The run re-embeds the module's other jobs too: put their vectors back afterwards.
    kept = await pool.fetch("SELECT transcript_id, chunk_index, index, embedding::real[] AS embedding,"
                            " embedding_model FROM segments")
    refused_job = await pool.fetchval("INSERT INTO transcripts (filename, status) VALUES ('refused.wav', 'done')"
                                      " RETURNING id")
    later_job = await pool.fetchval("INSERT INTO transcripts (filename, status) VALUES ('later.wav', 'done')"
                                    " RETURNING id")
    for job_id, text in ((refused_job, "a text the service refuses"), (later_job, "an ordinary text")):
        await pool.execute("INSERT INTO segments (transcript_id, chunk_index, index, speaker, start_ts, end_ts, text)"
                           " VALUES ($1, 0, 0, 'spk_0', 0, 1, $2)", job_id, text)
    underway, go_on, calls = asyncio.Event(), asyncio.Event(), {"first": 0, "second": 0}

    def embedder(replica: str):
        async def embed(texts: list[str]) -> list[list[float]]:
            calls[replica] += 1
            underway.set()
            await go_on.wait()
            if any("refuses" in t for t in texts):
                raise OllamaError("Ollama answered 500: json: unsupported value: NaN")
            return [[1.0] + [0.0] * 7 for _ in texts]
        return embed

    first, second = Reindexer(pool, embedder("first"), model), Reindexer(pool, embedder("second"), model)
    try:
        first.start()
        await asyncio.wait_for(underway.wait(), 30)
        second.start()  # asked through the other replica while the run is under way
        assert (await second.progress()).running
        go_on.set()
        await asyncio.wait_for(first.task, 120)
        await asyncio.wait_for(second.task, 30)
        seen_elsewhere = await second.progress()
        embedded = {r["transcript_id"]: (r["embedding_model"], r["has_vector"]) for r in await pool.fetch(
            "SELECT transcript_id, embedding_model, embedding IS NOT NULL AS has_vector FROM segments"
            " WHERE transcript_id = ANY($1)", [refused_job, later_job])}
    finally:
        await pool.execute("DELETE FROM transcripts WHERE id = ANY($1)", [refused_job, later_job])
        await pool.executemany(
            "UPDATE segments SET embedding = $4::real[]::vector, embedding_model = $5"
            " WHERE transcript_id = $1 AND chunk_index = $2 AND index = $3", [tuple(r) for r in kept])
        await pool.execute("DELETE FROM reindex_runs WHERE model = $1", model)
        await pool.close()
    assert calls["second"] == 0  # no second run over the same jobs
    assert not seen_elsewhere.running and seen_elsewhere.error is None, seen_elsewhere
    assert embedded == {refused_job: (model, False), later_job: (model, True)}


async def test_a_job_running_as_the_model_changed_is_reembedded_once_it_ends(keyed, monkeypatch):
    """A long job running while the model is switched has its early chunks embedded with the old
    model (by the embedder, before its restart): the run counts them as still to do, is not done
    while the job runs, and re-embeds them once it ends."""
    import asyncpg

    from services.ingest import reindex
    from services.ingest.reindex import Reindexer

    monkeypatch.setattr(reindex, "RUNNING_JOBS_CHECK_S", 0.5, raising=False)
    stack, _, _ = keyed
    model = "switched-test-model"
    pool = await asyncpg.create_pool(stack.database_url, min_size=1, max_size=4)
    # The run re-embeds the module's other jobs too: put their vectors back afterwards.
    kept = await pool.fetch("SELECT transcript_id, chunk_index, index, embedding::real[] AS embedding,"
                            " embedding_model FROM segments")
    job = await pool.fetchval("INSERT INTO transcripts (filename, status, stage) VALUES ('long-meeting.wav',"
                              " 'processing', 'transcribing') RETURNING id")
    # Chunk 0 embedded before the switch; chunk 1's text stored, its embedding (the embedder's, with
    # the new model) still to come.
    for chunk, index, text, embedded_with in ((0, 0, "Good morning, everyone.", "model-before-the-switch"),
                                              (0, 1, "Let us look at the figures.", "model-before-the-switch"),
                                              (1, 0, "Sales grew in the spring.", None)):
        await pool.execute("INSERT INTO segments (transcript_id, chunk_index, index, speaker, start_ts, end_ts, text,"
                           " embedding_model) VALUES ($1, $2, $3, 'spk_0', 0, 1, $4, $5)",
                           job, chunk, index, text, embedded_with)

    async def embed(texts: list[str]) -> list[list[float]]:
        return [[1.0] + [0.0] * 7 for _ in texts]

    async def models() -> dict[tuple[int, int], str | None]:
        return {(r["chunk_index"], r["index"]): r["embedding_model"] for r in await pool.fetch(
            "SELECT chunk_index, index, embedding_model FROM segments WHERE transcript_id = $1", job)}

    reindexer = Reindexer(pool, embed, model)
    try:
        reindexer.start()
        deadline = asyncio.get_running_loop().time() + 120
        # Every ended job done, the running one left for its end, and the run still on.
        while await pool.fetchval("SELECT count(*) FROM segments s JOIN transcripts t ON t.id = s.transcript_id"
                                  " WHERE t.status <> 'processing' AND s.embedding_model IS DISTINCT FROM $1", model):
            assert asyncio.get_running_loop().time() < deadline and not reindexer.task.done()
            await asyncio.sleep(0.2)
        await asyncio.sleep(2)
        while_running = await reindexer.progress()
        untouched = await models()
        await pool.execute("UPDATE transcripts SET status = 'done', stage = 'done', completed_at = now()"
                           " WHERE id = $1", job)
        await asyncio.wait_for(reindexer.task, 60)
        after = await reindexer.progress()
        embedded = set((await models()).values())
    finally:
        if reindexer.task is not None and not reindexer.task.done():
            reindexer.task.cancel()
            await asyncio.gather(reindexer.task, return_exceptions=True)
        await pool.execute("DELETE FROM transcripts WHERE id = $1", job)
        await pool.executemany(
            "UPDATE segments SET embedding = $4::real[]::vector, embedding_model = $5"
            " WHERE transcript_id = $1 AND chunk_index = $2 AND index = $3", [tuple(r) for r in kept])
        await pool.execute("DELETE FROM reindex_runs WHERE model = $1", model)
        await pool.close()
    assert untouched == {(0, 0): "model-before-the-switch", (0, 1): "model-before-the-switch", (1, 0): None}
    # Its two old segments are still to do, and the run says so: not done.
    assert (while_running.running, while_running.pending_segments, getattr(while_running, "waiting_jobs", None)) \
        == (True, 2, 1), while_running
    assert embedded == {model}
    assert (after.running, after.pending_segments, after.waiting_jobs, after.error) == (False, 0, 0, None), after


def test_a_run_its_ingest_stopped_midway_is_reported_as_interrupted(keyed):
    """A run cancelled as its ingest stops (a restart, a deploy), or whose replica died, leaves
    no end behind: it read as not running with no error, and `stt reindex`, following it, said
    "stopped" and exited 0 with work left. It says the run was interrupted, and how to go on."""
    stack, _, _ = keyed
    admin = httpx.Client(headers={"X-API-Key": ADMIN}, timeout=60)
    model = admin.get(f"{stack.api}/admin/reindex").json()["model"]
    # A job running as the model changed, its segment in the old model: the run waits for its end.
    job = stack.value("INSERT INTO transcripts (filename, status, stage) VALUES ('long-meeting.wav', 'processing',"
                      " 'transcribing') RETURNING id")
    stack.query("INSERT INTO segments (transcript_id, chunk_index, index, speaker, start_ts, end_ts, text,"
                " embedding_model) VALUES ($1, 0, 0, 'spk_0', 0, 1, 'Good morning.', 'model-before-the-switch')", job)
    following = None
    try:
        following = stt_reindex_under_way(stack, admin)
        stack.stop("ingest")
        stack.start_service("ingest")
        stack.wait_ready(timeout=120)
        out, err = following.communicate(timeout=120)
        progress = admin.get(f"{stack.api}/admin/reindex").json()
    finally:
        if following is not None and following.poll() is None:
            following.kill()
            following.communicate()
        stack.query("DELETE FROM transcripts WHERE id = $1", job)
        stack.query("DELETE FROM reindex_runs WHERE model = $1", model)
        admin.close()
    interrupted = "interrupted (its ingest stopped midway); POST /admin/reindex again to resume"
    assert (progress["running"], progress.get("error")) == (False, interrupted), progress
    assert progress["pending_segments"] >= 1, progress
    assert following.returncode == 1 and interrupted in " ".join(err.split()), (following.returncode, out, err)


def stt_reindex_under_way(stack, admin: httpx.Client) -> subprocess.Popen:
    """`stt reindex` as the admin, once the run it started is under way and has recorded the jobs
    it covers."""
    env = {**os.environ, "STT_API_URL": stack.api, "STT_API_KEY": ADMIN}
    following = subprocess.Popen([str(Path(sys.executable).parent / "stt"), "reindex"], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    # Running, and its row written: the jobs it covers are fixed then (a job made after is not its).
    while not ((progress := admin.get(f"{stack.api}/admin/reindex").json())["running"] and stack.value(
            "SELECT bounds_started_at = started_at AND ended_at IS NULL FROM reindex_runs WHERE model = $1",
            progress["model"])):
        if time.monotonic() > deadline or following.poll() is not None:
            following.kill()
            raise AssertionError((progress, following.communicate()))
        time.sleep(0.2)
    return following


def test_jobs_ended_after_the_run_began_do_not_make_it_look_unfinished(keyed):
    """A job cancelled (or failed) while a run goes on keeps its segments stored from
    chunk.transcribed, never embedded (no model): started after the run began, it is not the
    run's, which still said "(stopped)", exited 1 and told the operator to switch an embedder that
    was switched. The counts cover the run's jobs: it is done. Only a job started since that the
    embedder embedded with another model gets the advice to switch it."""
    stack, _, _ = keyed
    admin = httpx.Client(headers={"X-API-Key": ADMIN}, timeout=60)
    model = admin.get(f"{stack.api}/admin/reindex").json()["model"]
    made = []

    def job(status: str, embedded_with: str | None) -> int:
        job_id = stack.value("INSERT INTO transcripts (filename, status, stage, error) VALUES ('a.wav', $1, $2, $3)"
                             " RETURNING id", status, "transcribing" if status == "processing" else status,
                             "cancelled" if status == "error" else None)
        stack.query("INSERT INTO segments (transcript_id, chunk_index, index, speaker, start_ts, end_ts, text,"
                    " embedding_model) VALUES ($1, 0, 0, 'spk_0', 0, 1, 'Good morning.', $2)", job_id, embedded_with)
        made.append(job_id)
        return job_id

    def run_while(started_since: tuple[str, str | None]) -> subprocess.CompletedProcess:
        """`stt reindex` over a job running as the model changed (the run waits for its end); once
        the run is under way, a job in `started_since` (status, model) begins and ends."""
        running = job("processing", "model-before-the-switch")
        following = stt_reindex_under_way(stack, admin)
        try:
            job(*started_since)
            stack.query("UPDATE transcripts SET status = 'done', stage = 'done', completed_at = now() WHERE id = $1",
                        running)
            out, err = following.communicate(timeout=120)
        finally:
            if following.poll() is None:
                following.kill()
                following.communicate()
        return subprocess.CompletedProcess(following.args, following.returncode, out, err)

    try:
        cancelled = run_while(("error", None))
        progress = admin.get(f"{stack.api}/admin/reindex").json()
        not_switched = run_while(("done", "model-before-the-switch"))
    finally:
        stack.query("DELETE FROM transcripts WHERE id = ANY($1)", made)
        stack.query("DELETE FROM reindex_runs WHERE model = $1", model)
        admin.close()
    said = cancelled.stdout + cancelled.stderr
    assert cancelled.returncode == 0 and "0 to do (done)" in cancelled.stdout and "switch" not in said, said
    assert (progress["running"], progress["pending_segments"], progress["waiting_jobs"], progress.get("error")) \
        == (False, 0, 0, None), progress
    said = " ".join((not_switched.stdout + not_switched.stderr).split())
    assert not_switched.returncode == 1 and "(stopped)" in said and "switch it" in said, said


@pytest.fixture
async def own_database_url():
    """A database of its own, every migration applied: no stack."""
    from devstack import migrated_database

    async with migrated_database("stt_reindex") as url:
        yield url


@pytest.fixture
async def own_database(own_database_url):
    """A pool on a database of its own."""

    from common.db import create_pool
    from common.settings import Settings

    pool = await create_pool(Settings(_env_file=None, database_url=own_database_url), min_size=1, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()


async def corrected_job(pool, texts: list[str]) -> int:
    """A done job whose segments, one per text in that order, were corrected by hand while the
    embedding service was away (no vector)."""
    job_id = await pool.fetchval("INSERT INTO transcripts (filename, status) VALUES ('a.wav', 'done') RETURNING id")
    await pool.executemany("INSERT INTO segments (transcript_id, chunk_index, index, speaker, start_ts, end_ts, text,"
                           " edited_at) VALUES ($1, 0, $2, 'spk_0', 0, 1, $3, now())",
                           [(job_id, index, text) for index, text in enumerate(texts)])
    return job_id


async def vectors_by_index(pool, job_id: int) -> list[tuple[int, str | None, bool]]:
    return [tuple(r) for r in await pool.fetch(
        "SELECT index, embedding_model, embedding IS NOT NULL FROM segments WHERE transcript_id = $1 ORDER BY index",
        job_id)]


async def test_a_correction_the_embedding_service_refuses_holds_up_no_other(own_database):
    """One text the service cannot take (Ollama answered 500 to some models' NaN): stored without
    a vector, marked with the model, and not asked again; the others are embedded; while the
    service is simply away, nothing is marked."""
    from services.embedder.backends import OllamaError
    from services.ingest.reindex import embed_corrections

    pool, model = own_database, "all-minilm"
    asked: list[list[str]] = []

    async def refusing(texts: list[str]) -> list[list[float]]:
        asked.append(texts)
        if any("POISON" in text for text in texts):
            raise OllamaError("Ollama answered 500: json: unsupported value: NaN")
        return [[1.0] + [0.0] * 383 for _ in texts]

    async def away(texts: list[str]) -> list[list[float]]:
        raise OllamaError("cannot reach Ollama at http://ollama:11434")

    job_id = await corrected_job(pool, ["Hello there.", "POISON of a text.", "See you soon."])
    assert await embed_corrections(pool, away, model) == 0
    assert await vectors_by_index(pool, job_id) == [(0, None, False), (1, None, False), (2, None, False)]
    assert await embed_corrections(pool, refusing, model) == 2
    asked.clear()
    assert await embed_corrections(pool, refusing, model) == 0 and asked == []
    assert await vectors_by_index(pool, job_id) == [(0, model, True), (1, model, False), (2, model, True)]


async def test_corrections_the_service_refuses_three_in_a_row_hold_up_none_after_them(own_database):
    """Three corrected texts in a row that the model refuses (Ollama's 500 for a NaN vector): the
    turn ended at the third, and every turn began again at the first, so no corrected segment after
    them ever got its vector; the refused ones, remembered only in memory, were asked again at
    every turn after a restart. Now they are marked with the model, as a reindex marks them, and
    the next turns neither stop at them nor ask for them again."""
    from aiohttp import ClientSession
    from aiohttp.test_utils import TestServer

    from common.settings import Settings
    from services.embedder.backends import make_embedder
    from services.ingest.reindex import embed_corrections
    from tests import fake_ollama

    pool = own_database
    refused_first = await corrected_job(pool, [fake_ollama.NAN_TEXT] * 3 + ["The budget is approved."])
    later = await corrected_job(pool, ["We meet again on Monday."])
    await asyncio.to_thread(fake_ollama.load_local_model)  # as the stand-in loads it before it serves
    server = TestServer(fake_ollama.make_app(), host="127.0.0.1")
    await server.start_server()
    asked: list[list[str]] = []
    try:
        settings = Settings(_env_file=None, ollama_url=f"http://127.0.0.1:{server.port}",
                            model_name_embedded="all-minilm", ollama_retries=0)
        async with ClientSession() as session:
            embed, model = make_embedder(settings, session)

            async def counted(texts: list[str]) -> list[list[float]]:
                asked.append(texts)
                return await embed(texts)

            first_turn = await embed_corrections(pool, counted, model)
            asked.clear()
            next_turn = await embed_corrections(pool, counted, model)
    finally:
        await server.close()
    assert first_turn == 2
    assert await vectors_by_index(pool, refused_first) == [(0, model, False), (1, model, False), (2, model, False),
                                                           (3, model, True)]
    assert await vectors_by_index(pool, later) == [(0, model, True)]
    assert (next_turn, asked) == (0, [])


async def test_a_reindex_keeps_none_of_the_requests_pool_connections(own_database_url, monkeypatch):
    """A run held its advisory lock on a connection of the requests' pool for as long as it went
    on (hours on a large store, or waiting for a running job to end), and built the search index
    on another: the requests had two connections fewer. Now the lock and the build are on a
    connection of its own, as `every` holds its locks: here, while the build waits (behind a
    transaction writing to `segments`) and while the run waits for a running job, every one of the
    pool's connections can be taken at once."""
    import asyncpg

    from common.db import LockKey
    from services.ingest import reindex
    from services.ingest.reindex import Reindexer

    monkeypatch.setattr(reindex, "RUNNING_JOBS_CHECK_S", 0.2)
    model, old, pool_size = "own-connection-model", "old-test-model", 3
    pool = await asyncpg.create_pool(own_database_url, min_size=1, max_size=pool_size)
    writer = await asyncpg.connect(own_database_url)
    lock_held = ("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1"
                 " AND classid::bigint = $1 AND objid::bigint = $2")
    lock_key = LockKey.REINDEX >> 32, LockKey.REINDEX & 0xFFFFFFFF

    async def job(status: str) -> int:
        job_id = await pool.fetchval("INSERT INTO transcripts (filename, status, stage) VALUES ('a.wav', $1, $2)"
                                     " RETURNING id", status, "transcribing" if status == "processing" else "done")
        await pool.execute("INSERT INTO segments (transcript_id, chunk_index, index, speaker, start_ts, end_ts, text,"
                           " embedding_model) VALUES ($1, 0, 0, 'spk_0', 0, 1, 'Hello.', $2)", job_id, old)
        return job_id

    async def embed(texts: list[str]) -> list[list[float]]:
        return [[1.0, 0.0] for _ in texts]

    async def every_connection_free() -> bool:
        """All the pool's connections taken at once (none waits for one the run holds), and the
        run's lock on none of them."""
        taken = []
        try:
            while len(taken) < pool_size:
                taken.append(await pool.acquire(timeout=5))
            pids = {conn.get_server_pid() for conn in taken}
            return not pids & {r["pid"] for r in await taken[0].fetch(lock_held, *lock_key)}
        except TimeoutError:
            return False
        finally:
            for conn in taken:
                await pool.release(conn)

    async def until(what: str, *args) -> None:
        deadline = asyncio.get_running_loop().time() + 30
        while not await pool.fetchval(what, *args):
            assert asyncio.get_running_loop().time() < deadline, what
            await asyncio.sleep(0.1)

    ended, running = await job("done"), await job("processing")
    reindexer = Reindexer(pool, embed, model)
    try:
        async with writer.transaction():
            await writer.execute("LOCK TABLE segments IN ROW EXCLUSIVE MODE")  # the build waits for it to end
            reindexer.start()
            await until("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE query LIKE 'CREATE INDEX CONCURRENTLY%'"
                        " AND wait_event_type = 'Lock')")
            free_while_building = await every_connection_free()
        await until("SELECT embedding_model = $2 FROM segments WHERE transcript_id = $1", ended, model)
        free_while_waiting = await every_connection_free()
        assert not reindexer.task.done()  # waiting for the running job
        await pool.execute("UPDATE transcripts SET status = 'done', stage = 'done', completed_at = now()"
                           " WHERE id = $1", running)
        await asyncio.wait_for(reindexer.task, 30)
        error = await pool.fetchval("SELECT error FROM reindex_runs WHERE model = $1", model)
    finally:
        if reindexer.task is not None and not reindexer.task.done():
            reindexer.task.cancel()
            await asyncio.gather(reindexer.task, return_exceptions=True)
        await writer.close()
        await pool.close()
    assert (free_while_building, free_while_waiting, error) == (True, True, None)


async def test_a_job_started_after_the_run_began_does_not_keep_it_going(own_database, monkeypatch, caplog):
    """The embedder not switched to the new model while jobs keep coming: each new job has
    segments in the old model. The run waits only for the jobs running when it began, ends, and
    says (once) that the embedder still embeds with another model."""
    from services.ingest import reindex
    from services.ingest.reindex import Reindexer

    monkeypatch.setattr(reindex, "RUNNING_JOBS_CHECK_S", 0.2)
    pool, model, old = own_database, "new-test-model", "old-test-model"

    async def job(status: str, text: str) -> int:
        job_id = await pool.fetchval("INSERT INTO transcripts (filename, status, stage) VALUES ($1, $2, $3)"
                                     " RETURNING id", f"{text}.wav", status,
                                     "transcribing" if status == "processing" else "done")
        await pool.execute("INSERT INTO segments (transcript_id, chunk_index, index, speaker, start_ts, end_ts, text,"
                           " embedding_model) VALUES ($1, 0, 0, 'spk_0', 0, 1, $2, $3)", job_id, text, old)
        return job_id

    async def embed(texts: list[str]) -> list[list[float]]:
        return [[1.0] + [0.0] * 7 for _ in texts]

    async def models(job_id: int) -> set[str | None]:
        return {r["embedding_model"] for r in await pool.fetch(
            "SELECT embedding_model FROM segments WHERE transcript_id = $1", job_id)}

    ended, running = await job("done", "ended before"), await job("processing", "running as it began")
    reindexer = Reindexer(pool, embed, model)
    caplog.set_level("INFO", logger="services.ingest.reindex")
    try:
        reindexer.start()
        deadline = asyncio.get_running_loop().time() + 30
        while await models(ended) != {model}:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.1)
        late = await job("processing", "started after it began")  # embedded by the old model
        await asyncio.sleep(1)  # several looks at the running jobs
        assert not reindexer.task.done()  # still waiting for the job running as it began
        await pool.execute("UPDATE transcripts SET status = 'done', stage = 'done', completed_at = now()"
                           " WHERE id = $1", running)
        await asyncio.wait_for(reindexer.task, 15)
        error = await pool.fetchval("SELECT error FROM reindex_runs WHERE model = $1", model)
        outcome = await reindexer.progress()
    finally:
        if reindexer.task is not None and not reindexer.task.done():
            reindexer.task.cancel()
            await asyncio.gather(reindexer.task, return_exceptions=True)
    assert error is None
    assert (await models(running), await models(late)) == ({model}, {old})
    # Its own jobs done; the one it left is the embedder's, which it says was not switched.
    assert (outcome.done_segments, outcome.pending_segments, outcome.embedder_not_switched) == (2, 0, True), outcome
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and f"job {late}" in warnings[0] and old in warnings[0], warnings

    # A run begun and ended by an ingest from before migration 036 (a rolling upgrade) writes only
    # its times and error: the earlier run's bounds and "not switched" are not taken for its own.
    await pool.execute("UPDATE reindex_runs SET started_at = now(), ended_at = NULL, error = NULL WHERE model = $1",
                       model)
    await pool.execute("UPDATE reindex_runs SET ended_at = now(), error = NULL WHERE model = $1", model)
    older_ingests = await reindexer.progress()
    assert (older_ingests.embedder_not_switched, older_ingests.pending_segments) == (False, 1), older_ingests


@pytest.mark.parametrize("raised, stops", [
    # This machine's disk (a local model's cache): that job's failure, passed over and named.
    (OSError(errno.ENOSPC, "No space left on device", "/root/.cache/model.bin"), False),
    # The database's connection closed under the run: an outage, the run stops to be resumed.
    ("closed", True),
])
async def test_a_run_stops_for_an_outage_and_passes_over_a_jobs_own_error(own_database, raised, stops):
    """What stops a run is what the services wait out (DATABASE_UNAVAILABLE, OLLAMA_UNAVAILABLE):
    a closed connection does, a full local disk is one job's failure."""
    import asyncpg

    from services.ingest.reindex import Reindexer

    pool, model = own_database, "outage-test-model"
    job_id = await pool.fetchval("INSERT INTO transcripts (filename, status) VALUES ('a.wav', 'done') RETURNING id")
    await pool.execute("INSERT INTO segments (transcript_id, chunk_index, index, speaker, start_ts, end_ts, text)"
                       " VALUES ($1, 0, 0, 'spk_0', 0, 1, 'Hello.')", job_id)
    error = asyncpg.InterfaceError("cannot call Connection.fetch(): connection is closed") \
        if raised == "closed" else raised

    async def embed(texts: list[str]) -> list[list[float]]:
        raise error

    reindexer = Reindexer(pool, embed, model)
    reindexer.start()
    await asyncio.wait_for(reindexer.task, 15)
    said = await pool.fetchval("SELECT error FROM reindex_runs WHERE model = $1", model)
    if stops:
        assert said == "InterfaceError: stopped; POST /admin/reindex again to resume", said
    else:
        assert said.startswith("1 jobs could not be embedded") and f": {job_id};" in said, said


async def test_texts_the_service_refuses_fail_no_job_and_a_resumed_run_goes_past_them(own_database):
    """Ollama answers a batch holding some texts with 500 "json: unsupported value: NaN" (bge-m3):
    each text is then embedded alone, the refused ones stored without a vector and marked with the
    model (as the embedder stores them), the others with theirs, and the jobs are done. Three such
    jobs in a row stopped the run, and every resumed run, at the same place, before the later ones."""
    from aiohttp import ClientSession
    from aiohttp.test_utils import TestServer

    from common.settings import Settings
    from services.embedder.backends import make_embedder
    from services.ingest.reindex import Reindexer
    from tests import fake_ollama

    pool, old = own_database, "old-test-model"
    texts_by_job = [["The budget is approved.", fake_ollama.NAN_TEXT],
                    [fake_ollama.NAN_TEXT, "We meet again on Monday."],
                    [fake_ollama.NAN_TEXT],
                    ["Sales grew in the spring."]]
    jobs = []
    for texts in texts_by_job:
        job_id = await pool.fetchval("INSERT INTO transcripts (filename, status) VALUES ('a.wav', 'done') RETURNING id")
        await pool.executemany("INSERT INTO segments (transcript_id, chunk_index, index, speaker, start_ts, end_ts,"
                               " text, embedding_model) VALUES ($1, 0, $2, 'spk_0', 0, 1, $3, $4)",
                               [(job_id, index, text, old) for index, text in enumerate(texts)])
        jobs.append(job_id)
    await asyncio.to_thread(fake_ollama.load_local_model)  # as the stand-in loads it before it serves
    server = TestServer(fake_ollama.make_app(), host="127.0.0.1")
    await server.start_server()
    try:
        settings = Settings(_env_file=None, ollama_url=f"http://127.0.0.1:{server.port}",
                            model_name_embedded="all-minilm", ollama_retries=0)
        async with ClientSession() as session:
            embed, model = make_embedder(settings, session)
            reindexer = Reindexer(pool, embed, model)
            reindexer.start()
            await asyncio.wait_for(reindexer.task, 120)
            progress = await reindexer.progress()
    finally:
        await server.close()
    stored = await pool.fetch("SELECT transcript_id, text, embedding IS NOT NULL AS has_vector, embedding_model"
                              " FROM segments ORDER BY transcript_id, index")
    assert progress.error is None, progress
    assert (progress.done_segments, progress.pending_segments) == (6, 0), progress
    assert [tuple(row) for row in stored] == [
        (job_id, text, text != fake_ollama.NAN_TEXT, model)
        for job_id, texts in zip(jobs, texts_by_job) for text in texts]


async def add_done_jobs(pool, texts: list[str]) -> None:
    """A done job of one segment per text, in that order."""
    for text in texts:
        job_id = await pool.fetchval("INSERT INTO transcripts (filename, status) VALUES ('a.wav', 'done') RETURNING id")
        await pool.execute("INSERT INTO segments (transcript_id, chunk_index, index, speaker, start_ts, end_ts, text)"
                           " VALUES ($1, 0, 0, 'spk_0', 0, 1, $2)", job_id, text)


async def test_a_service_failing_every_text_alone_still_stops_the_run(own_database):
    """A crashed model runner answers 500 to every text, as it does to a text it refuses: no text
    is stored as refused, and three such jobs in a row stop the run, to be resumed."""
    from services.embedder.backends import OllamaError
    from services.ingest.reindex import Reindexer

    pool, model = own_database, "crashed-runner-model"
    await add_done_jobs(pool, ["One.", "Two.", "Three.", "Four."])
    asked: list[list[str]] = []

    async def crashed(texts: list[str]) -> list[list[float]]:
        asked.append(texts)
        if texts == ["One."] and len(asked) == 1:
            return [[1.0, 0.0]]
        raise OllamaError("Ollama answered 500: model runner has unexpectedly stopped")

    reindexer = Reindexer(pool, crashed, model)
    reindexer.start()
    await asyncio.wait_for(reindexer.task, 30)
    error = await pool.fetchval("SELECT error FROM reindex_runs WHERE model = $1", model)
    assert error == "EmbeddingServiceFailing: stopped; POST /admin/reindex again to resume", error
    models = [r["embedding_model"] for r in await pool.fetch("SELECT embedding_model FROM segments"
                                                             " ORDER BY transcript_id")]
    assert models == [model, None, None, None]


async def test_jobs_whose_vectors_cannot_be_stored_stop_the_run(own_database):
    """The service answers vectors of another dimension than those stored for the model (a model
    pulled again under the same name): every job fails in the database, not in the service. Such
    failures did not count toward the stop, so the run embedded the whole store and threw every
    vector away; now STOP_AFTER_FAILED_JOBS of them in a row stop it, to be resumed once fixed."""
    from common import searchstore
    from services.ingest.reindex import STOP_AFTER_FAILED_JOBS, Reindexer

    pool, model = own_database, "redimensioned-model"
    done = await pool.fetchval("INSERT INTO transcripts (filename, status) VALUES ('a.wav', 'done') RETURNING id")
    await pool.execute("INSERT INTO segments (transcript_id, chunk_index, index, speaker, start_ts, end_ts, text,"
                       " embedding, embedding_model) VALUES ($1, 0, 0, 'spk_0', 0, 1, 'Zero.', '[1,0]', $2)",
                       done, model)
    await searchstore.ensure_vector_index(pool, model, 2)
    await add_done_jobs(pool, ["One.", "Two.", "Three.", "Four.", "Five.", "Six."])
    asked: list[list[str]] = []

    async def redimensioned(texts: list[str]) -> list[list[float]]:
        asked.append(texts)
        return [[1.0, 0.0, 0.0] for _ in texts]

    reindexer = Reindexer(pool, redimensioned, model)
    reindexer.start()
    await asyncio.wait_for(reindexer.task, 60)
    error = await pool.fetchval("SELECT error FROM reindex_runs WHERE model = $1", model)
    assert error == "DataError: stopped; POST /admin/reindex again to resume", error
    assert asked == [["One."], ["Two."], ["Three."]][:STOP_AFTER_FAILED_JOBS], asked
    assert await pool.fetchval("SELECT count(*) FROM segments WHERE embedding_model = $1", model) == 1


async def test_a_look_for_the_next_job_slower_than_the_command_timeout_does_not_stop_the_run(own_database_url):
    """Which job is next reads every segment of a large store (nothing indexes `embedding_model IS
    DISTINCT FROM`): given only DATABASE_COMMAND_TIMEOUT_S, it ended every run with TimeoutError.
    Here a lock holds the look up, as such a read does, past a command timeout of two seconds."""
    import asyncpg

    from services.ingest.reindex import Reindexer

    model = "slow-look-model"
    pool = await asyncpg.create_pool(own_database_url, min_size=1, max_size=4, command_timeout=2)
    holder = await asyncpg.connect(own_database_url)

    async def embed(texts: list[str]) -> list[list[float]]:
        return [[1.0, 0.0] for _ in texts]

    try:
        await add_done_jobs(pool, ["One."])
        reindexer = Reindexer(pool, embed, model)
        async with holder.transaction():
            await holder.execute("LOCK TABLE segments IN ACCESS EXCLUSIVE MODE")
            reindexer.start()
            deadline = asyncio.get_running_loop().time() + 30
            while not await holder.fetchval("SELECT count(*) FROM pg_locks WHERE NOT granted"
                                            " AND relation = 'segments'::regclass"):
                assert asyncio.get_running_loop().time() < deadline and not reindexer.task.done()
                await asyncio.sleep(0.1)
            await asyncio.sleep(4)  # twice the command timeout
        await asyncio.wait_for(reindexer.task, 30)
        error = await pool.fetchval("SELECT error FROM reindex_runs WHERE model = $1", model)
        models = {r["embedding_model"] for r in await pool.fetch("SELECT embedding_model FROM segments")}
    finally:
        await holder.close()
        await pool.close()
    assert error is None
    assert models == {model}


async def slow_to_count(pool, ask, held_s: float = 4.0) -> float:
    """Seconds `ask()` takes while a lock holds every read of `segments` up for `held_s`, as a
    count over a large store takes long."""
    loop = asyncio.get_running_loop()

    async def timed() -> float:
        started = loop.time()
        await ask()
        return loop.time() - started

    async with pool.acquire() as holder, holder.transaction():
        await holder.execute("LOCK TABLE segments IN ACCESS EXCLUSIVE MODE")
        asking = asyncio.create_task(timed())
        await asyncio.wait({asking}, timeout=held_s)
    return await asking


async def test_counts_slow_to_read_serve_the_polls_after_them_and_the_post_that_starts_a_run(own_database,
                                                                                            monkeypatch):
    """`stt reindex` asks how far a run is every second, and the counts read every segment
    (minutes on a large store). Dated from before they were read, counts slower than
    COUNTS_FRESH_S were stale on arrival: each poll read every segment again, back to back. And
    POST /admin/reindex read them all again even just after they were read."""
    from litestar import Litestar
    from litestar.datastructures import State

    from common.settings import Settings
    from services.ingest import reindex
    from services.ingest.reindex import REINDEX_ROUTES, Reindexer

    monkeypatch.setattr(reindex, "COUNTS_FRESH_S", 3.0)
    pool, model = own_database, "polled-model"
    await add_done_jobs(pool, ["One."])
    underway, go_on = asyncio.Event(), asyncio.Event()

    async def embed(texts: list[str]) -> list[list[float]]:
        underway.set()
        await go_on.wait()
        return [[1.0, 0.0] for _ in texts]

    reindexer = Reindexer(pool, embed, model)
    app = Litestar(route_handlers=REINDEX_ROUTES, state=State({"reindexer": reindexer,
                                                                "settings": Settings(_env_file=None)}))
    # On this event loop, as the run and the pool (litestar's test clients serve from another).
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingest") as client:
        reindexer.start()
        await asyncio.wait_for(underway.wait(), 30)
        first = await slow_to_count(pool, lambda: client.get("/admin/reindex"))
        polled = await slow_to_count(pool, lambda: client.get("/admin/reindex"))
        go_on.set()
        await asyncio.wait_for(reindexer.task, 30)
        outcome = (await client.get("/admin/reindex")).json()
        started = None

        async def start() -> None:
            nonlocal started
            started = await client.post("/admin/reindex")

        posted = await slow_to_count(pool, start)
        await asyncio.wait_for(reindexer.task, 30)
    assert first > 3  # the count itself took longer than COUNTS_FRESH_S
    assert polled < 1, polled
    assert (outcome["running"], outcome["done_segments"], outcome["pending_segments"]) == (False, 1, 0), outcome
    assert started.status_code == 202 and posted < 1, (posted, started.text)
    # The counts read just before, as the run begins (the store is as it was).
    assert started.json() | {"running": None} == outcome | {"running": None}, started.json()


async def test_a_run_cut_short_by_its_ingest_stopping_reads_as_interrupted_on_every_replica(own_database):
    """An ingest stopping cancels its run, which writes no end; another replica (or the same one
    once restarted) said it was not running, with no error, and work left."""
    from services.ingest.reindex import Reindexer

    pool, model = own_database, "interrupted-model"
    await add_done_jobs(pool, ["One.", "Two."])
    underway = asyncio.Event()

    async def stuck(texts: list[str]) -> list[list[float]]:
        underway.set()
        await asyncio.Event().wait()

    async def embed(texts: list[str]) -> list[list[float]]:
        return [[1.0, 0.0] for _ in texts]

    stopping, other = Reindexer(pool, stuck, model), Reindexer(pool, embed, model)
    stopping.start()
    await asyncio.wait_for(underway.wait(), 30)
    assert (await other.progress()).running
    stopping.task.cancel()  # as ingest's shutdown does
    await asyncio.gather(stopping.task, return_exceptions=True)
    seen = await other.progress()
    other.start()  # resumed
    await asyncio.wait_for(other.task, 30)
    resumed = await other.progress()
    assert (seen.running, seen.pending_segments) == (False, 2), seen
    assert seen.error == "interrupted (its ingest stopped midway); POST /admin/reindex again to resume", seen
    assert (resumed.running, resumed.pending_segments, resumed.error) == (False, 0, None), resumed


async def test_a_run_whose_lock_session_died_stops_instead_of_running_beside_a_second(own_database):
    """The run's lock is its own session's: with that session gone (a proxy's idle cut, a
    terminated backend) the run went on over the pool's connections while every replica read it
    as interrupted, and a POST there started a second run beside it. Now it stops, resumable."""
    from common import searchstore
    from common.db import LockKey
    from services.ingest.reindex import LOCK_LOST, Reindexer

    pool, model = own_database, "lock-lost-model"
    await add_done_jobs(pool, ["One.", "Two.", "Three."])
    # Its search index there already: a run builds one on its lock's session, and a build on the
    # lost session fails, the job under way with it (the run stops the same).
    await searchstore.ensure_vector_index(pool, model, 2)
    embedding, go_on = asyncio.Event(), asyncio.Event()

    async def embed(texts: list[str]) -> list[list[float]]:
        embedding.set()
        await go_on.wait()
        return [[1.0, 0.0] for _ in texts]

    reindexer = Reindexer(pool, embed, model)
    reindexer.start()
    await asyncio.wait_for(embedding.wait(), 30)
    terminated = await pool.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND objsubid = 1 AND classid::bigint = $1 AND objid::bigint = $2",
        LockKey.REINDEX >> 32, LockKey.REINDEX & 0xFFFFFFFF)
    go_on.set()
    await asyncio.wait_for(reindexer.task, 30)
    seen = await Reindexer(pool, embed, model).progress()
    assert terminated == 1
    assert (seen.running, seen.error) == (False, LOCK_LOST), seen
    assert seen.pending_segments == 2, seen  # the job under way was stored; the rest wait for the next run


async def test_a_run_that_lost_its_lock_writes_its_end_only_on_its_own_row(own_database, caplog):
    """A run's lock session dies while it embeds; a run through another replica begins, does every
    job but one it cannot embed, and ends saying so. The first run, finding that job next, sees its
    lock gone and ends: its end (LOCK_LOST) was written over the later run's row, and every replica
    then read the later run's outcome as "stopped, POST again", the job it could not embed unnamed."""
    from common.db import LockKey
    from services.embedder.backends import OllamaError
    from services.ingest.reindex import Reindexer

    pool, model = own_database, "overtaken-model"
    await add_done_jobs(pool, ["One.", "Two."])
    not_embedded = await pool.fetchval("SELECT transcript_id FROM segments WHERE text = 'Two.'")
    embedding, go_on = asyncio.Event(), asyncio.Event()

    async def held(texts: list[str]) -> list[list[float]]:
        embedding.set()
        await go_on.wait()
        return [[1.0, 0.0] for _ in texts]

    async def failing_on_two(texts: list[str]) -> list[list[float]]:
        if "Two." in texts:
            raise OllamaError("Ollama answered 404: model not found", status=404)  # no one text's doing
        return [[1.0, 0.0] for _ in texts]

    lock_held = ("FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1"
                 " AND classid::bigint = $1 AND objid::bigint = $2")
    lock_key = LockKey.REINDEX >> 32, LockKey.REINDEX & 0xFFFFFFFF
    first = Reindexer(pool, held, model)
    first.start()
    await asyncio.wait_for(embedding.wait(), 30)
    await pool.fetchval(f"SELECT count(pg_terminate_backend(pid)) {lock_held}", *lock_key)
    deadline = asyncio.get_running_loop().time() + 30
    while await pool.fetchval(f"SELECT count(*) {lock_held}", *lock_key):  # the session goes a moment later
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.1)
    later = Reindexer(pool, failing_on_two, model)
    later.start()
    await asyncio.wait_for(later.task, 30)
    later_end = await pool.fetchrow("SELECT started_at, ended_at, error FROM reindex_runs WHERE model = $1", model)
    go_on.set()
    await asyncio.wait_for(first.task, 30)
    row = await pool.fetchrow("SELECT started_at, ended_at, error FROM reindex_runs WHERE model = $1", model)
    seen = await later.progress()
    assert later_end["ended_at"] is not None, later_end  # the later run got the lock and ended
    assert later_end["error"].startswith("1 jobs could not be embedded") and f": {not_embedded};" in later_end["error"]
    assert any("lock is gone" in r.getMessage() for r in caplog.records), "the first run did not see its lock lost"
    assert dict(row) == dict(later_end), row
    assert (seen.running, seen.error) == (False, later_end["error"]), seen


async def test_a_search_index_that_cannot_be_built_fails_no_job_and_names_none(own_database, caplog):
    """The model's search index was built inside the job under way: its lines carried that job's
    id, and a build that failed (here a segment of the model stored with vectors of another
    dimension, which the index's cast refuses) failed the job though its vectors were good, three
    in a row stopping the run ("could not be embedded"). The persister stores vectors without the
    index all the same: so does a run now, the build's failure logged once, naming no job."""
    import logging

    from common.logs import _JobIdFilter
    from services.ingest.reindex import STOP_AFTER_FAILED_JOBS, Reindexer

    pool, model = own_database, "unindexable-model"
    old = await pool.fetchval("INSERT INTO transcripts (filename, status) VALUES ('a.wav', 'done') RETURNING id")
    await pool.execute("INSERT INTO segments (transcript_id, chunk_index, index, speaker, start_ts, end_ts, text,"
                       " embedding, embedding_model) VALUES ($1, 0, 0, 'spk_0', 0, 1, 'Zero.', '[1,0]', $2)",
                       old, model)
    texts = ["One.", "Two.", "Three.", "Four."][:STOP_AFTER_FAILED_JOBS + 1]
    await add_done_jobs(pool, texts)

    async def embed(batch: list[str]) -> list[list[float]]:
        return [[1.0, 0.0, 0.0] for _ in batch]

    class Lines(logging.Handler):  # the lines as the services log them, `job=` and all
        def __init__(self) -> None:
            super().__init__(logging.INFO)
            self.addFilter(_JobIdFilter())
            self.lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(record.getMessage())

    lines = Lines()
    loggers = [logging.getLogger(name) for name in ("common.searchstore", "services.ingest.reindex")]
    for logger in loggers:
        caplog.set_level(logging.INFO, logger=logger.name)
        logger.addHandler(lines)
    try:
        reindexer = Reindexer(pool, embed, model)
        reindexer.start()
        await asyncio.wait_for(reindexer.task, 60)
    finally:
        for logger in loggers:
            logger.removeHandler(lines)
    error = await pool.fetchval("SELECT error FROM reindex_runs WHERE model = $1", model)
    assert error is None, error
    stored = await pool.fetch("SELECT text FROM segments WHERE embedding_model = $1 AND embedding IS NOT NULL"
                              " AND transcript_id <> $2 ORDER BY transcript_id", model, old)
    assert [r["text"] for r in stored] == texts
    index_lines = [line for line in lines.lines if "search index" in line]
    assert index_lines and not any(line.startswith("job=") for line in index_lines), index_lines
    failed = [line for line in lines.lines if "could not build the search index" in line]
    assert len(failed) == 1, lines.lines
    assert not any("could not re-embed" in line for line in lines.lines), lines.lines


async def test_each_correction_given_its_vector_later_is_announced_with_it(own_database_url):
    """The corrections embedder stored the vectors and told nobody: segment.updated had gone out
    without one, and subscribers keeping vectors from the events kept the old text's (or none).
    Now each segment it gives a vector is announced, in the same transaction, by a segment.updated
    carrying it; a text the service refuses (stored without one) is not, and the flusher is woken."""
    from common.db import create_pool
    from common.settings import Settings
    from services.embedder.backends import OllamaError
    from services.ingest.reindex import embed_corrections

    model = "all-minilm"

    async def refusing(texts: list[str]) -> list[list[float]]:
        if any("POISON" in text for text in texts):
            raise OllamaError("Ollama answered 500: json: unsupported value: NaN")
        return [[float(len(text))] + [0.0] * 383 for text in texts]

    pool = await create_pool(Settings(_env_file=None, database_url=own_database_url), max_size=2)  # ingest's codecs
    try:
        job_id = await corrected_job(pool, ["Hello there.", "POISON of a text.", "See you soon."])
        wake = asyncio.Event()
        assert await embed_corrections(pool, refusing, model, wake) == 2 and wake.is_set()
        events = [row["body"] for row in await pool.fetch(
            "SELECT body FROM outbox WHERE routing_key = 'segment.updated' ORDER BY id")]
        assert [(e["transcript_id"], e["index"], e["text"], e["embedding_model"], e["embedding"][:2])
                for e in events] == [(job_id, 0, "Hello there.", model, [12.0, 0.0]),
                                     (job_id, 2, "See you soon.", model, [13.0, 0.0])], events
        wake.clear()
        assert await embed_corrections(pool, refusing, model, wake) == 0 and not wake.is_set()
        assert await pool.fetchval("SELECT count(*) FROM outbox") == 2
    finally:
        await pool.close()
