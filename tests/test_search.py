"""GET /search on the real stack: the default (multilingual) local embedder, the embedded
PostgreSQL's pgvector and full-text search, and API keys."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aio_pika
import asyncpg
import httpx
import numpy as np
import pytest

from common import searchstore
from common.audio import SAMPLE_RATE, decode_audio
from common.db import LockKey
from tests.audio_files import wav
from tests.conftest import Stack, events_queue, free_port, job_events, running_stack, through_another_ingest

OWNER, OTHER = "search-key-owner-0001", "search-key-other-0002"
TRANSLATOR = "search-key-translator-0003"  # its one job stays out of the other tests' results
SWITCHER = "search-key-switcher-0004"  # likewise
NAMER = "search-key-namer-0005"  # likewise


@pytest.fixture(scope="module")
def searched(tmp_path_factory, fixtures_dir):
    """A stack with API keys and the local default embedder, and three finished jobs of OWNER."""
    with running_stack(tmp_path_factory, EMBEDDING_BACKEND="local",
                       API_KEYS=f"{OWNER},{OTHER},{TRANSLATOR},{SWITCHER},{NAMER}") as stack:
        owner = httpx.Client(headers={"X-API-Key": OWNER}, timeout=60)
        jobs = {name: stack.submit_job(fixtures_dir / name, client=owner)
                for name in ("en_dialogue.wav", "ru_dialogue.wav", "jfk.flac")}
        assert {stack.wait_finished(i, 400, owner)["status"] for i in jobs.values()} == {"done"}
        yield stack, owner, jobs
        owner.close()


def search(stack: Stack, client: httpx.Client, **params) -> httpx.Response:
    return client.get(f"{stack.api}/search", params=params)


def test_an_english_question_finds_the_russian_answer(searched):
    stack, owner, jobs = searched
    page = search(stack, owner, q="how long will the testing take?", mode="semantic", limit=3).json()
    assert page["embedding_model"] == "universal-sentence-encoder-multilingual-3"
    assert [hit["transcript_id"] for hit in page["items"]][0] == jobs["ru_dialogue.wav"], page
    assert any(re.search(r"т[еи]стир|недел", hit["text"]) for hit in page["items"]
               if hit["transcript_id"] == jobs["ru_dialogue.wav"]), page
    assert all(hit["found_by"] == ["semantic"] and -1 <= hit["score"] <= 1 for hit in page["items"])


def test_a_word_is_found_and_marked_in_its_own_language(searched):
    stack, owner, jobs = searched
    [hit, *_] = search(stack, owner, q="sales", mode="text").json()["items"]
    assert hit["transcript_id"] == jobs["en_dialogue.wav"] and "<mark>sales</mark>" in hit["highlighted"].lower()
    # Russian stemming: another case form of the word that was said finds it.
    russian = search(stack, owner, q="совещания", mode="text").json()["items"]
    assert [h["transcript_id"] for h in russian] == [jobs["ru_dialogue.wav"]], russian
    assert "<mark>" in russian[0]["highlighted"] and "совещани" in russian[0]["highlighted"].lower()
    assert search(stack, owner, q="zebra", mode="text").json()["items"] == []
    # A word left out with "-" is left out, though another language's stemming keeps it ("sales"
    # stays whole without stemming, where English indexed "sale"), and the other word still counts.
    stored = [(job, s["start_ts"], s["text"]) for job in jobs.values() for s in stack.status(job, owner)["segments"]]

    def saying(word: str) -> set[tuple[int, float, str]]:
        return {segment for segment in stored if re.search(rf"\b{word}\b", segment[2], re.IGNORECASE)}

    def found(q: str) -> set[tuple[int, float, str]]:
        return {(h["transcript_id"], h["start_ts"], h["text"]) for h in search(stack, owner, q=q, mode="text").json()[
            "items"]}

    # The one segment saying "grew" says "sales" too (A's "Yes, sales grew by twelve percent...");
    # B's "...the sales numbers?" says only "sales".
    assert saying("grew") and saying("grew") <= saying("sales") and saying("sales") - saying("grew"), stored
    assert found("grew") == saying("grew")
    assert found("grew -sales") == set()
    assert found("sales -grew") == saying("sales") - saying("grew")


def test_hybrid_fuses_both_and_says_which_found_each_hit(searched):
    stack, owner, jobs = searched
    page = search(stack, owner, q="sales numbers").json()
    assert page["mode"] == "hybrid" and page["items"]
    top = page["items"][0]
    assert top["transcript_id"] == jobs["en_dialogue.wav"] and sorted(top["found_by"]) == ["semantic", "text"]
    scores = [hit["score"] for hit in page["items"]]
    assert scores == sorted(scores, reverse=True)


def test_filters_narrow_and_pages_follow_each_other(searched):
    stack, owner, jobs = searched
    everything = search(stack, owner, q="what was said", mode="semantic", limit=100).json()["items"]
    assert {hit["transcript_id"] for hit in everything} == set(jobs.values())
    only_ru = search(stack, owner, q="what was said", mode="semantic", limit=100,
                     transcript_id=jobs["ru_dialogue.wav"]).json()["items"]
    assert only_ru and {hit["transcript_id"] for hit in only_ru} == {jobs["ru_dialogue.wav"]}
    speaker = search(stack, owner, q="what was said", mode="semantic", limit=100, speaker="spk_1").json()["items"]
    assert speaker and {hit["speaker"] for hit in speaker} == {"spk_1"} and len(speaker) < len(everything)
    in_russian = search(stack, owner, q="what was said", mode="semantic", language="ru").json()["items"]
    assert {hit["transcript_id"] for hit in in_russian} == {jobs["ru_dialogue.wav"]}
    assert search(stack, owner, q="what was said", since="2100-01-01T00:00:00Z").json()["items"] == []
    first = search(stack, owner, q="what was said", mode="semantic", limit=2).json()
    second = search(stack, owner, q="what was said", mode="semantic", limit=2, cursor=first["next_cursor"]).json()
    key = lambda hit: (hit["transcript_id"], hit["start_ts"])  # noqa: E731
    assert [key(h) for h in first["items"] + second["items"]] == [key(h) for h in everything[:4]]


def test_another_key_finds_nothing_and_no_key_is_refused(searched):
    stack, _, _ = searched
    with httpx.Client(headers={"X-API-Key": OTHER}, timeout=60) as other:
        for mode in ("text", "semantic", "hybrid"):
            assert search(stack, other, q="sales", mode=mode).json()["items"] == []
    assert httpx.get(f"{stack.api}/search", params={"q": "sales"}, timeout=60).status_code == 401


def test_a_translated_recording_is_english_and_searched_as_english(searched, fixtures_dir, tmp_path):
    """The German half of multilingual.mp3 with task=translate. German text would be indexed
    without stemming; its English translation is indexed as English."""
    stack, _, _ = searched
    german = tmp_path / "german.wav"
    german.write_bytes(wav(decode_audio(str(fixtures_dir / "multilingual.mp3"))[
        round(30.5 * SAMPLE_RATE):round(50 * SAMPLE_RATE)]))
    with httpx.Client(headers={"X-API-Key": TRANSLATOR}, timeout=60) as client:
        job = stack.submit_job(german, data={"task": "translate"}, client=client)
        assert stack.wait_finished(job, 400, client)["status"] == "done"
        document = client.get(f"{stack.api}/transcripts/{job}").json()
        said = " ".join(segment["text"] for segment in document["segments"]).lower()
        assert document["language"] == "de" and "software" in said and "modify" in said, document
        assert document["options"]["task"] == "translate", document
        assert not {"und", "die", "der", "das"} & set(re.findall(r"\w+", said)), said
        # Another form of a word that was written finds it.
        hits = search(stack, client, q="modified", mode="text").json()["items"]
        assert hits and {hit["transcript_id"] for hit in hits} == {job}, hits  # Whisper may repeat "to modify"
        assert all("<mark>" in hit["highlighted"] for hit in hits), hits  # marked as English too
        # A corrected segment is indexed again as English, not as the German spoken.
        first = document["segments"][0]
        corrected = client.patch(f"{stack.api}/transcripts/{job}/segments/{first['chunk_index']}/{first['index']}",
                                 json={"text": first["text"] + " Extensions follow."})
        assert corrected.status_code == 200, corrected.text
        extended = search(stack, client, q="extension", mode="text").json()["items"]
        assert [(h["transcript_id"], h["start_ts"]) for h in extended] == [(job, first["start_ts"])], extended


def test_a_recording_that_switches_language_is_written_and_searched_in_each(searched, fixtures_dir, tmp_path):
    """The English dialogue, then the Russian one, submitted with language=multi: each speaker's
    words in the language spoken, each segment indexed in its own. Detected once, one half came
    out in the other half's language and was indexed in it, so Russian stemming missed it."""
    stack, _, _ = searched
    meeting = tmp_path / "two languages.wav"
    meeting.write_bytes(wav(np.concatenate([decode_audio(str(fixtures_dir / n))
                                            for n in ("en_dialogue.wav", "ru_dialogue.wav")])))
    with httpx.Client(headers={"X-API-Key": SWITCHER}, timeout=60) as client:
        job = stack.submit_job(meeting, data={"language": "multi"}, client=client)
        assert stack.wait_finished(job, 400, client)["status"] == "done"
        document = client.get(f"{stack.api}/transcripts/{job}").json()
        assert document["options"]["language"] == "multi" and document["language"] in ("en", "ru"), document
        segments = document["segments"]
        assert {s["language"] for s in segments} == {"en", "ru"}, segments
        for segment in segments:
            cyrillic = bool(re.search("[а-яё]", segment["text"].lower()))
            assert cyrillic == (segment["language"] == "ru"), segment
        english = " ".join(s["text"] for s in segments if s["language"] == "en").lower()
        assert "sales" in english and "quarter" in english, english
        # "совещания" finds "совещание" only where the text was indexed with Russian stemming
        hits = search(stack, client, q="совещания", mode="text").json()["items"]
        assert {hit["transcript_id"] for hit in hits} == {job}, hits
        assert any("совещание" in hit["text"].lower() for hit in hits), hits
        assert {h["transcript_id"] for h in search(stack, client, q="sales", mode="text", language="en").json()[
            "items"]} == {job}
        assert search(stack, client, q="sales", mode="text", language="ru").json()["items"] == []


@pytest.mark.parametrize("params, says", [
    ({"q": "   "}, "q must hold"),
    ({}, "q"),
    ({"q": "x", "limit": "101"}, "limit"),
    ({"q": "x", "mode": "fuzzy"}, "mode"),
    ({"q": "x", "cursor": "not-a-cursor"}, "cursor"),
    ({"q": "x", "since": "yesterday"}, "since"),
])
def test_bad_queries_are_400_with_a_reason(searched, params, says):
    stack, owner, _ = searched
    response = search(stack, owner, **params)
    assert response.status_code == 400, response.text
    assert says in response.text


def test_stt_search_prints_hits_and_json(searched):
    stack, _, jobs = searched
    env = {**os.environ, "STT_API_URL": stack.api, "STT_API_KEY": OWNER, "COLUMNS": "200"}
    stt = str(Path(sys.executable).parent / "stt")
    result = subprocess.run([stt, "search", "sales", "--mode", "text"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert re.search(rf"^job {jobs['en_dialogue.wav']} \[\d\d:\d\d\.\d\] spk_\d+: .*sales", result.stdout,
                     re.M | re.I), result.stdout
    result = subprocess.run([stt, "search", "how long will the testing take?", "--mode", "semantic", "--json",
                             "--limit", "1"], env=env, capture_output=True, text=True, timeout=60)
    assert json.loads(result.stdout)["items"][0]["transcript_id"] == jobs["ru_dialogue.wav"]
    # hybrid (the default) also prints the hits only the meaning found, which have nothing marked
    result = subprocess.run([stt, "search", "how long will the testing take?"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert re.search(rf"^job {jobs['ru_dialogue.wav']} \[", result.stdout, re.M), result.stdout
    nothing = subprocess.run([stt, "search", "zebra", "--mode", "text"], env=env, capture_output=True, text=True,
                             timeout=60)
    assert nothing.returncode == 0 and nothing.stdout == "" and "nothing found" in nothing.stderr
    # Dates: every job here was made before tomorrow and none after it.
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    for flag, found in (("--until", True), ("--since", False)):
        dated = subprocess.run([stt, "search", "sales", "--mode", "text", flag, tomorrow], env=env,
                               capture_output=True, text=True, timeout=60)
        assert dated.returncode == 0 and bool(dated.stdout) == found, (flag, dated.stdout, dated.stderr)


def test_named_speakers_show_in_every_format_and_in_search(searched):
    stack, owner, jobs = searched
    job = jobs["en_dialogue.wav"]
    url = f"{stack.api}/transcripts/{job}/speakers"
    named = owner.patch(url, json={"spk_0": "  Anna\tPetrova "})
    try:
        assert named.status_code == 200, named.text
        assert named.json()["speakers"] == {"spk_0": "Anna Petrova", "spk_1": None}
        srt = owner.get(f"{stack.api}/transcripts/{job}", params={"format": "srt"}).text
        assert "Anna Petrova: " in srt and "spk_0:" not in srt and "spk_1: " in srt
        assert "<v Anna Petrova>" in owner.get(f"{stack.api}/transcripts/{job}", params={"format": "vtt"}).text
        assert " Anna_Petrova " in owner.get(f"{stack.api}/transcripts/{job}", params={"format": "rttm"}).text
        segments = stack.status(job, owner)["segments"]
        assert {s.get("speaker_name") for s in segments if s["speaker"] == "spk_0"} == {"Anna Petrova"}
        assert all("speaker_name" not in s for s in segments if s["speaker"] == "spk_1")
        hits = search(stack, owner, q="sales", mode="text", transcript_id=job).json()["items"]
        assert {h.get("speaker_name") for h in hits if h["speaker"] == "spk_0"} == {"Anna Petrova"}
        env = {**os.environ, "STT_API_URL": stack.api, "STT_API_KEY": OWNER, "COLUMNS": "200"}
        printed = subprocess.run([str(Path(sys.executable).parent / "stt"), "search", "sales", "--job", str(job)],
                                 env=env, capture_output=True, text=True, timeout=60)
        assert re.search(rf"^job {job} \[.*\] Anna Petrova: ", printed.stdout, re.M), printed.stdout + printed.stderr
        # null removes a name; other keys, unknown speakers and empty names are refused
        assert owner.patch(url, json={"spk_0": None}).json()["speakers"]["spk_0"] is None
    finally:  # the other tests read this job's speakers unnamed, whatever failed above
        owner.patch(url, json={"spk_0": None})
    assert "speaker_name" not in stack.status(job, owner)["segments"][0]
    with httpx.Client(headers={"X-API-Key": OTHER}, timeout=60) as other:
        assert other.patch(url, json={"spk_0": "Mallory"}).status_code == 404
    assert owner.patch(url, json={"spk_7": "Nobody"}).status_code == 400
    assert owner.patch(url, json={"spk_0": " \t"}).status_code == 400
    assert owner.patch(url, json={}).status_code == 400


async def test_a_speaker_named_while_the_job_runs_is_named_in_its_events(searched, fixtures_dir):
    """Under a key of its own: OWNER's hits come from the module's three jobs only."""
    stack, _, _ = searched
    connection = await aio_pika.connect(stack.amqp_url)
    try:
        with httpx.Client(headers={"X-API-Key": NAMER}, timeout=60) as namer:
            queue = await events_queue(await connection.channel(), "segment.created")
            job = stack.submit_job(fixtures_dir / "jfk.flac", client=namer)
            named = namer.patch(f"{stack.api}/transcripts/{job}/speakers", json={"spk_0": "John F. Kennedy"})
            assert named.status_code == 200, named.text
            events = await job_events(
                queue, job, lambda bodies: bodies and stack.status(job, namer)["status"] != "processing", timeout=300)
    finally:
        await connection.close()
    assert {e["speaker"] for e in events} == {"spk_0"}
    assert {e["speaker_name"] for e in events} == {"John F. Kennedy"}


@pytest.mark.parametrize("mode", ["semantic", "text", "hybrid"])
def test_pages_of_hits_that_tie_hold_each_hit_once(stack: Stack, mode):
    """Segments that say the same ("Okay.") at the same moment (both parties of a call recorded
    one per channel) have the same vector and rank and tie; each page was a fetch of another size,
    which may order ties otherwise, so a hit could come twice and another never. Every mode
    orders them alike (newest job first, then by time, chunk and index): hybrid fused the
    semantic search's ties in the order the database met them."""
    from services.embedder.backends import local_embed

    [vector] = local_embed(["Okay."])
    job_id = stack.value("INSERT INTO transcripts (filename, status) VALUES ('ties.wav', 'done') RETURNING id")
    try:
        for i in range(9):
            stack.query("INSERT INTO segments (transcript_id, chunk_index, index, speaker, start_ts, end_ts, text,"
                        " embedding, embedding_model, search_text) VALUES ($1, $2 % 3, $2, 'spk_0', 0, $2 + 1,"
                        " 'Okay.', $3::real[]::vector, $4, to_tsvector('english', 'Okay.'))",
                        job_id, i, vector, stack.settings().model_name_embedded)
        seen, cursor = [], None
        with httpx.Client(timeout=60) as client:
            while True:
                page = search(stack, client, q="Okay.", mode=mode, transcript_id=job_id, limit=2,
                              **({"cursor": cursor} if cursor else {})).json()
                seen += [hit["end_ts"] for hit in page["items"]]
                if not (cursor := page.get("next_cursor")):
                    break
        assert sorted(seen) == list(range(1, 10)), seen
        # Indexes 0-8 in chunks i % 3, all at 0 s: chunk 0's (0, 3, 6), then chunk 1's, chunk 2's.
        assert seen == [1, 4, 7, 2, 5, 8, 3, 6, 9], seen
    finally:
        stack.query("DELETE FROM transcripts WHERE id = $1", job_id)


def test_the_marked_text_is_escaped_html_whose_only_markup_is_the_marks(stack: Stack):
    """`highlighted` was the text as said with <mark> tags added: a "<mark>" typed in a correction
    was shown as a highlight, and a client showing `highlighted` as HTML showed any markup a
    transcript held. Now everything the text says is escaped; the matched words alone are marked."""
    said = 'Type <mark>this</mark> & <b>bold</b> "quoted"\x01tariffs.'  # \x01: what ts_headline marks with
    job_id = stack.value("INSERT INTO transcripts (filename, status, language) VALUES ('markup.wav', 'done', 'en')"
                         " RETURNING id")
    try:
        stack.query("INSERT INTO segments (transcript_id, chunk_index, index, speaker, start_ts, end_ts, text,"
                    " search_text) VALUES ($1, 0, 0, 'spk_0', 0, 1, $2, to_tsvector('english', $2))", job_id, said)
        escaped = "Type &lt;mark&gt;this&lt;/mark&gt; &amp; &lt;b&gt;{}&lt;/b&gt; &quot;quoted&quot; {}."
        with httpx.Client(timeout=60) as client:
            for query, marked in (("tariffs", escaped.format("bold", "<mark>tariffs</mark>")),
                                  ("bold", escaped.format("<mark>bold</mark>", "tariffs"))):
                hits = search(stack, client, q=query, mode="text", transcript_id=job_id).json()["items"]
                assert [(hit["text"], hit["highlighted"]) for hit in hits] == [(said, marked)], hits
    finally:
        stack.query("DELETE FROM transcripts WHERE id = $1", job_id)


async def short_walk_pool(stack: Stack) -> asyncpg.Pool:
    """A connection whose HNSW index walks come back short (one row rejected by the filters ends
    it), and which never plans a search without the index: a crowded store in miniature."""
    return await asyncpg.create_pool(stack.database_url, min_size=1, max_size=1, server_settings={
        "hnsw.ef_search": "1", "hnsw.max_scan_tuples": "1", "enable_seqscan": "off",
        "enable_bitmapscan": "off", "enable_sort": "off"})


def segment_insert(text: str) -> str:
    """Stores a segment saying `text`: ($1 job, $2 index, $3 speaker, $4 start, $5 vector, $6 model)."""
    return ("INSERT INTO segments (transcript_id, chunk_index, index, speaker, start_ts, end_ts, text,"
            f" embedding, embedding_model) VALUES ($1, 0, $2, $3, $4, $4::float8 + 1, '{text}',"
            " $5::real[]::vector, $6)")


async def test_the_nearest_ties_that_make_the_cut_are_the_same_at_every_request(stack: Stack):
    """A filtered search whose index walk comes back short is ranked exactly over every row the
    filters keep: with more ties (one text said many times) than the limit takes, which make the
    cut was left to the sort, and a page's hits could change between requests. They are the
    first in the text search's order: newest job first, then by time. As in the crowded store's
    test, hnsw.max_scan_tuples = 1 makes the walk come back short."""
    model, dimensions = "test-model-ties", 8
    rng = np.random.default_rng(9)
    query = np.ones(dimensions, dtype=np.float32)
    others = query + 0.05 * rng.standard_normal((200, dimensions)).astype(np.float32)
    pool = await short_walk_pool(stack)
    try:
        job_id = await pool.fetchval(
            "INSERT INTO transcripts (filename, status) VALUES ('ties-cut.wav', 'done') RETURNING id")
        await searchstore.ensure_vector_index(pool, model, dimensions)
        # spk_1's "Okay." 30 times, stored latest first: the order the rows lie in is not the order
        # asked for.
        rows = [(i, "spk_0", 1000.0 + i, v.tolist()) for i, v in enumerate(others)]
        rows += [(1000 + i, "spk_1", float(30 - i), (-query).tolist()) for i in range(30)]
        await pool.executemany(segment_insert("Okay."),
                               [(job_id, i, who, start, v, model) for i, who, start, v in rows])
        await pool.execute("ANALYZE segments")
        hits = await searchstore.search_semantic(pool, query.tolist(), model, limit=5, owner=None,
                                              transcript_id=None, speaker="spk_1", language=None,
                                              since=None, until=None)
        assert [hit["start_ts"] for hit in hits] == [1.0, 2.0, 3.0, 4.0, 5.0], [tuple(hit) for hit in hits]
    finally:
        await forget_test_model(pool, model, dimensions, "ties-cut.wav")
        await pool.close()


async def forget_test_model(pool: asyncpg.Pool, model: str, dimensions: int, filename: str | None = None) -> None:
    """A test's embedding model leaves nothing behind: its job (by filename), its search indexes,
    and what this process remembers of them."""
    if filename is not None:
        await pool.execute("DELETE FROM transcripts WHERE filename = $1", filename)
    for (index,) in await pool.fetch("SELECT indexname FROM pg_indexes WHERE tablename = 'segments'"
                                     " AND indexdef LIKE $1", f"%{model}%"):
        await pool.execute(f"DROP INDEX {index}")
    searchstore._indexed.discard((model, dimensions))


async def test_a_search_index_left_half_built_is_built_again(stack: Stack):
    """Indexes are built CONCURRENTLY, so that writes to segments go on meanwhile; a build cut
    short (a persister killed during it) leaves an invalid index, which PostgreSQL keeps up to
    date on every write but never searches with. The next process to store that model's vectors
    builds it again."""
    model, dimensions = "half-built-model", 8
    pool = await asyncpg.create_pool(stack.database_url, min_size=1, max_size=2)
    try:
        await searchstore.ensure_vector_index(pool, model, dimensions)
        [name] = [r["indexname"] for r in await pool.fetch(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'segments' AND indexdef LIKE $1", f"%{model}%")]
        await pool.execute("UPDATE pg_index SET indisvalid = false WHERE indexrelid = to_regclass($1)", name)
        searchstore._indexed.discard((model, dimensions))  # as in a process started afterwards
        await asyncio.wait_for(searchstore.ensure_vector_index(pool, model, dimensions), 60)
        assert await pool.fetchval("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)", name)
        # While another process builds, one that needs the index neither builds it too nor waits
        # (holding its connection for the whole build): it looks again next time.
        searchstore._indexed.discard((model, dimensions))
        await pool.execute("DROP INDEX " + name)
        async with pool.acquire() as holder:
            await holder.execute("SELECT pg_advisory_lock($1)", LockKey.VECTOR_INDEX)
            await asyncio.wait_for(searchstore.ensure_vector_index(pool, model, dimensions), 5)
            assert (model, dimensions) not in searchstore._indexed
            assert await pool.fetchval("SELECT to_regclass($1)", name) is None
            await holder.execute("SELECT pg_advisory_unlock($1)", LockKey.VECTOR_INDEX)
        await searchstore.ensure_vector_index(pool, model, dimensions)
        assert await pool.fetchval("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)", name)
    finally:
        await forget_test_model(pool, model, dimensions)
        await pool.close()


@pytest.mark.parametrize("dimensions", [2048, 4096])
async def test_a_model_with_more_dimensions_than_pgvector_indexes_is_stored_and_searched(stack: Stack, dimensions):
    """Ollama models such as qwen3-embedding:4b/8b give 2,560/4,096 numbers; pgvector's HNSW takes
    vectors of up to 2,000 (half-precision ones up to 4,000). Every job failed on such a model."""
    model = f"test-model-{dimensions}"
    rng = np.random.default_rng(dimensions)
    vectors = rng.standard_normal((3, dimensions)).astype(np.float32)
    pool = await asyncpg.create_pool(stack.database_url, min_size=1, max_size=2)
    try:
        job_id = await pool.fetchval("INSERT INTO transcripts (filename, status) VALUES ('wide.wav', 'done')"
                                     " RETURNING id")
        await searchstore.ensure_vector_index(pool, model, dimensions)
        await pool.executemany(
            "INSERT INTO segments (transcript_id, chunk_index, index, speaker, start_ts, end_ts, text,"
            " embedding, embedding_model) VALUES ($1, 0, $2, 'spk_0', $3, $3::float8 + 1, $4, $5::real[]::vector, $6)",
            [(job_id, i, float(i), f"segment {i}", vector.tolist(), model) for i, vector in enumerate(vectors)])
        hits = await searchstore.search_semantic(pool, vectors[1].tolist(), model, limit=2, owner=None,
                                              transcript_id=job_id, speaker=None, language=None,
                                              since=None, until=None)
        assert [hit["index"] for hit in hits][:1] == [1] and hits[0]["score"] > 0.99
        indexes = await pool.fetchval("SELECT count(*) FROM pg_indexes WHERE tablename = 'segments'"
                                      " AND indexdef LIKE $1", f"%{model}%")
        assert indexes == (1 if dimensions <= 4000 else 0)
    finally:
        await forget_test_model(pool, model, dimensions, "wide.wav")
        await pool.close()


async def test_a_narrow_filters_nearest_segments_are_all_found_in_a_crowded_store(stack: Stack):
    """The HNSW walk stops after hnsw.max_scan_tuples rows its filters reject (20,000 by default):
    searching one speaker, one key's meetings or one meeting of a large store came back with fewer
    hits than there are. A store too small to reach that limit stands in, with the limit set to 1."""
    model, dimensions = "test-model-crowded", 8
    rng = np.random.default_rng(8)
    query = np.ones(dimensions, dtype=np.float32)
    others = query + 0.05 * rng.standard_normal((200, dimensions)).astype(np.float32)
    speaker = -query + 0.05 * rng.standard_normal((5, dimensions)).astype(np.float32)
    pool = await short_walk_pool(stack)
    try:
        job_id = await pool.fetchval(
            "INSERT INTO transcripts (filename, status) VALUES ('crowded.wav', 'done') RETURNING id")
        await searchstore.ensure_vector_index(pool, model, dimensions)
        rows = [(i, "spk_0", v) for i, v in enumerate(others)] + [(1000 + i, "spk_1", v) for i, v in enumerate(speaker)]
        await pool.executemany(segment_insert("words"),
                               [(job_id, i, who, float(i), v.tolist(), model) for i, who, v in rows])
        await pool.execute("ANALYZE segments")
        hits = await searchstore.search_semantic(pool, query.tolist(), model, limit=10, owner=None,
                                              transcript_id=None, speaker="spk_1", language=None,
                                              since=None, until=None)
        assert sorted(hit["index"] for hit in hits) == [1000, 1001, 1002, 1003, 1004]
        assert [hit["score"] for hit in hits] == sorted((hit["score"] for hit in hits), reverse=True)
    finally:
        await forget_test_model(pool, model, dimensions, "crowded.wav")
        await pool.close()


async def test_a_chunk_of_a_new_embedding_model_is_stored_while_its_index_cannot_be_built_yet(stack: Stack):
    """A concurrent index build waits for every transaction older than it (a long report, a
    pg_dump) and takes minutes on a large store: the persister built it before storing the chunk,
    holding the message (and the job) for all that time."""
    from common.db import create_pool
    from common.messages import ChunkEmbedded, Segment
    from common.settings import Settings
    from services.persister import handler as persister

    model, dimensions = "test-model-late-index", 8
    name = "segments_embedding_" + hashlib.sha256(f"{model}:{dimensions}".encode()).hexdigest()[:16]
    pool = await create_pool(Settings(_env_file=None, database_url=stack.database_url), max_size=4)
    reader = await asyncpg.connect(stack.database_url)
    try:
        job_id = await pool.fetchval("INSERT INTO transcripts (filename) VALUES ('late-index.wav') RETURNING id")
        old_snapshot = reader.transaction(isolation="repeatable_read")
        await old_snapshot.start()
        await reader.fetchval("SELECT count(*) FROM segments")
        message = ChunkEmbedded(job_id=job_id, chunk_index=0, chunk_count=2, duration=2.0, embedding_model=model,
                                segments=[Segment(index=0, speaker="spk_0", start_ts=0.0, end_ts=1.0, text="words",
                                                  embedding=[1.0] * dimensions)])
        await asyncio.wait_for(persister.on_embedded(pool, message), 15)
        assert await pool.fetchval("SELECT embedding_model FROM segments WHERE transcript_id = $1", job_id) == model
        await old_snapshot.rollback()
        for _ in range(100):  # the build goes on once the old transaction is over
            if await pool.fetchval("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)", name):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the index was never built")
    finally:
        await reader.close()
        await forget_test_model(pool, model, dimensions, "late-index.wav")
        await pool.close()


async def test_a_search_that_runs_too_long_is_stopped_and_frees_its_connection(stack: Stack):
    """A common word over a large store ranked every match for as long as that took, holding a
    connection; a search is now stopped after SEARCH_TIMEOUT_S. A store of 30,000 segments and a
    limit of a millisecond stand in."""
    pool = await asyncpg.create_pool(stack.database_url, min_size=1, max_size=1)
    try:
        job_id = await pool.fetchval("INSERT INTO transcripts (filename, status) VALUES ('long-search.wav', 'done')"
                                     " RETURNING id")
        await pool.execute(
            "INSERT INTO segments (transcript_id, chunk_index, index, speaker, start_ts, end_ts, text, search_text)"
            " SELECT $1, 0, i, 'spk_0', i, i + 1, 'the budget of the year ' || i,"
            " to_tsvector('english', 'the budget of the year ' || i) FROM generate_series(0, 29999) i", job_id)
        filters = {"owner": None, "transcript_id": job_id, "speaker": None, "language": None, "since": None,
                   "until": None}
        with pytest.raises(asyncpg.exceptions.QueryCanceledError):
            await searchstore.search_text(pool, "budget", limit=100, timeout_s=0.001, **filters)
        hits = await searchstore.search_text(pool, "budget", limit=100, **filters)
        assert len(hits) == 100  # the connection is free, and an ordinary search runs
    finally:
        await pool.execute("DELETE FROM transcripts WHERE filename = 'long-search.wav'")
        await pool.close()


# A statement of a search by words (also of the marking of its hits), or by meaning.
SEARCH_STATEMENTS = ("SELECT pid, query FROM pg_stat_activity WHERE datname = current_database()"
                     " AND pid <> pg_backend_pid() AND state = 'active'"
                     " AND (query LIKE '%websearch_to_tsquery%' OR query LIKE '%<=>%')")


async def searches_running(watcher: asyncpg.Connection, count: int, within_s: float = 30) -> list[asyncpg.Record]:
    """Once `count` search statements run (AssertionError after `within_s`): each pid and query."""
    for _ in range(int(within_s * 10)):
        if len(running := await watcher.fetch(SEARCH_STATEMENTS)) >= count:
            return running
        await asyncio.sleep(0.1)
    raise AssertionError(f"{count} search statements never ran at once: {running}")


async def no_search_runs_after_the_answer(watcher: asyncpg.Connection) -> None:
    """For 2 s, no search statement runs: one left running would wait for the test's lock on
    segments all that time. (Each look from a transaction of its own: pg_stat_activity is read once
    per transaction.)"""
    for _ in range(20):
        assert await watcher.fetch(SEARCH_STATEMENTS) == [], "a search still runs after its answer came"
        await asyncio.sleep(0.1)


async def test_a_hybrid_search_whose_query_cannot_be_embedded_leaves_nothing_running(stack: Stack):
    """The two halves of a hybrid search run at once. When the embedding service refused the query
    (a 503 at once), the search by words went on, holding a connection of ingest's pool for up to
    SEARCH_TIMEOUT_S; it is now stopped, and waited for, before the answer. Here it could never
    end by itself: the test holds a lock on segments that it waits for. The 503 says what it is
    (extra.code), for a client to search by words only then."""
    watcher = await asyncpg.connect(stack.database_url)
    locker = await asyncpg.connect(stack.database_url)
    try:
        with through_another_ingest(stack, "ingest-embedder-away", OLLAMA_URL=f"http://127.0.0.1:{free_port()}",
                                    OLLAMA_RETRIES="0") as away:
            async with locker.transaction(), httpx.AsyncClient(timeout=60) as client:
                await locker.execute("LOCK TABLE segments IN ACCESS EXCLUSIVE MODE")
                refused = await client.get(f"{away.api}/search", params={"q": "budget"})
                assert refused.status_code == 503, refused.text
                assert refused.json()["extra"] == {"code": "embedding_unavailable"}, refused.text
                assert refused.headers["retry-after"] == "5"
                await no_search_runs_after_the_answer(watcher)
    finally:
        await locker.close()
        await watcher.close()


@pytest.mark.parametrize("stop, answer", [
    ("pg_cancel_backend", "the search took over 15 s and was stopped"),  # as statement_timeout cancels it
    ("pg_terminate_backend", "a backing service is unavailable"),  # its connection lost: the database away
])
async def test_a_search_by_words_that_fails_stops_the_search_by_meaning(stack: Stack, stop, answer):
    """The other way round: the search by words fails while the search by meaning runs (each waits
    for the test's lock on segments), and the search by meaning is stopped before the answer. Its
    503 is not the embedding service's (no extra.code): searching by words would not help."""
    watcher = await asyncpg.connect(stack.database_url)
    locker = await asyncpg.connect(stack.database_url)
    try:
        async with locker.transaction(), httpx.AsyncClient(timeout=60) as client:
            await locker.execute("LOCK TABLE segments IN ACCESS EXCLUSIVE MODE")
            searching = asyncio.create_task(client.get(f"{stack.api}/search", params={"q": "budget"}))
            running = await searches_running(watcher, 2)
            [by_words] = [row["pid"] for row in running if "websearch_to_tsquery" in row["query"]]
            assert await watcher.fetchval(f"SELECT {stop}($1)", by_words)
            refused = await asyncio.wait_for(searching, 30)
            assert refused.status_code == 503 and answer in refused.json()["detail"], refused.text
            assert "extra" not in refused.json(), refused.text
            await no_search_runs_after_the_answer(watcher)
    finally:
        await locker.close()
        await watcher.close()
