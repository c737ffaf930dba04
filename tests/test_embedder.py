"""The embedder's backends against Ollama's HTTP API (the stand-in serves real vectors)."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time

import aio_pika
import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from litestar.exceptions import HTTPException

from common.failures import failure_category
from common.settings import Settings
from services.embedder.backends import OLLAMA_UNAVAILABLE, OllamaError, OllamaUnavailable, local_embed, make_embedder
from services.ingest.search import embed_query
from tests import fake_ollama
from tests.conftest import free_port


def chunk_saying(texts: list[str], job_id: int = 1, language: str | None = None):
    """One chunk of a job, one segment a second for each text, as the transcriber sends it."""
    from common.messages import ChunkTranscribed, Segment

    return ChunkTranscribed(job_id=job_id, chunk_index=0, chunk_count=1, duration=float(len(texts) + 1),
                            language=language, segments=[
                                Segment(index=i, speaker="spk_0", start_ts=i, end_ts=i + 1, text=text)
                                for i, text in enumerate(texts)])


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


@pytest.fixture
async def flaky_ollama():
    """Answers 503 to the first two calls, then like Ollama."""
    calls = {"n": 0}

    async def embed(request: web.Request) -> web.Response:
        calls["n"] += 1
        if calls["n"] <= 2:
            return web.Response(status=503, text="loading model")
        return await fake_ollama.embed(request)

    app = web.Application()
    app.router.add_post("/api/embed", embed)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield f"http://127.0.0.1:{server.port}", calls
    await server.close()


async def test_ollama_backend_retries_then_returns_one_vector_per_text(flaky_ollama):
    url, calls = flaky_ollama
    settings = Settings(ollama_url=url, model_name_embedded="all-minilm", ollama_retries=3, embed_batch_size=2)
    async with aiohttp.ClientSession() as session:
        embed, model = make_embedder(settings, session)
        texts = ["The meeting starts at noon.", "We meet at twelve o'clock.", "Bananas are yellow."]
        vectors = await embed(texts)
    assert model == "all-minilm" and calls["n"] == 4  # 2 failures, then 2 batches
    assert [len(v) for v in vectors] == [384, 384, 384]
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.3


async def test_unknown_ollama_model_fails_with_a_clear_reason(flaky_ollama):
    url, calls = flaky_ollama
    calls["n"] = 10  # healthy from now on
    settings = Settings(ollama_url=url, model_name_embedded="no-such-model", ollama_retries=3)
    async with aiohttp.ClientSession() as session:
        embed, _ = make_embedder(settings, session)
        with pytest.raises(OllamaError, match="no-such-model") as raised:
            await embed(["hello"])
    assert calls["n"] == 11  # not retried: pulling the model is an operator's job
    # What the failed job says: not that the service is away, when it answered.
    assert failure_category(raised.value).startswith("the embedding service refused the request (4")


@pytest.mark.parametrize("retries", [0, 1])
async def test_unreachable_ollama_raises_after_retries(retries):
    """A host that takes each connection and closes it unanswered: OLLAMA_RETRIES more tries after
    the first, then the connection error."""
    attempts = 0

    async def hang_up(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal attempts
        attempts += 1
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        settings = Settings(ollama_url=f"http://127.0.0.1:{port}", model_name_embedded="all-minilm",
                            ollama_retries=retries, ollama_timeout_s=2)
        async with aiohttp.ClientSession() as session:
            embed, _ = make_embedder(settings, session)
            with pytest.raises(aiohttp.ClientConnectionError):
                await embed(["hello"])
    finally:
        server.close()
        await server.wait_closed()
    assert attempts == retries + 1


async def test_an_ollama_host_that_drops_connection_attempts_is_an_outage():
    """A listening socket whose accept queue is full: the kernel drops further connection
    attempts, as a stopped VM or a firewall does. That is Ollama being away (waited out), not a
    failure of the job."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    try:
        for _ in range(3):  # fill the accept queue (nobody accepts)
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(listener.getsockname())
            fillers.append(filler)
        await asyncio.sleep(0.2)
        port = listener.getsockname()[1]
        settings = Settings(ollama_url=f"http://127.0.0.1:{port}", model_name_embedded="all-minilm",
                            ollama_retries=0, ollama_timeout_s=4)
        async with aiohttp.ClientSession() as session:
            embed, _ = make_embedder(settings, session)
            # Ended by the connect limit: the total limit (4 s) would raise a bare TimeoutError,
            # which is not one of these.
            with pytest.raises(OLLAMA_UNAVAILABLE):
                await embed(["hello"])
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def test_local_backend_gives_unit_vectors_that_rank_meaning():
    """Every paraphrase pair is nearer than any pair of unrelated sentences: what search relies on."""
    paraphrases = [("hello world", "Hello, world!"),
                   ("Revenue grew this quarter.", "This quarter the revenue went up."),
                   ("We will ship the release on Friday.", "The release goes out on Friday.")]
    vectors = local_embed([text for pair in paraphrases for text in pair])
    assert all(len(v) == 384 and abs(cosine(v, v) - 1) < 1e-4 for v in vectors)
    same = [cosine(vectors[2 * i], vectors[2 * i + 1]) for i in range(len(paraphrases))]
    unrelated = [cosine(vectors[i], vectors[j]) for i in range(len(vectors)) for j in range(i + 1, len(vectors))
                 if i // 2 != j // 2]
    assert min(same) > max(unrelated), (same, unrelated)


async def test_local_default_is_multilingual():
    """A Russian sentence lands nearer its English translation than unrelated English does."""
    settings = Settings(embedding_backend="local")
    embed, model = make_embedder(settings, None)
    english, russian, unrelated, other_russian = await embed([
        "Delivery costs almost doubled this quarter.", "Стоимость доставки в этом квартале выросла почти вдвое.",
        "The weather is lovely in the mountains.", "Мы обсудим сроки запуска нового продукта."])
    assert model == "universal-sentence-encoder-multilingual-3"
    assert all(len(v) == 512 and abs(cosine(v, v) - 1) < 1e-3 for v in (english, russian, unrelated))
    assert cosine(english, russian) > cosine(english, unrelated) + 0.3
    assert cosine(english, russian) > cosine(english, other_russian) + 0.3


def test_unknown_local_model_is_refused_at_start():
    with pytest.raises(SystemExit, match="LOCAL_EMBEDDING_MODEL"):
        make_embedder(Settings(embedding_backend="local", local_embedding_model="word2vec"), None)


@pytest.mark.parametrize("answer", [{"embeddings": [[]]}, {"embeddings": [[0.1, 0.2], [0.3]]}, {"error": "?"}, []])
async def test_an_ollama_answer_without_usable_vectors_is_an_ollama_error(answer):
    """An empty vector was stored as the model's and failed every try as a database error; a
    missing `embeddings` made search answer 500 instead of 503."""
    async def embed(_: web.Request) -> web.Response:
        return web.json_response(answer)

    app = web.Application()
    app.router.add_post("/api/embed", embed)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        settings = Settings(ollama_url=f"http://127.0.0.1:{server.port}", model_name_embedded="odd", ollama_retries=0)
        async with aiohttp.ClientSession() as session:
            embed_texts, _ = make_embedder(settings, session)
            texts = ["hello", "world"] if len(answer and answer.get("embeddings", [])) == 2 else ["hello"]
            with pytest.raises(OllamaError, match="Ollama returned"):
                await embed_texts(texts)
    finally:
        await server.close()


async def test_a_search_waits_for_its_query_vector_a_bounded_time():
    """Ollama that takes connections and never answers held a search for about 4 minutes (the
    embedder's 60 s per try, 4 tries); a person waiting gets the 503 after the request's bound."""
    async def never_answers(texts: list[str]) -> list[list[float]]:
        await asyncio.sleep(3600)
        return []

    started = time.monotonic()
    with pytest.raises(HTTPException) as refused:
        await embed_query(never_answers, "budget", timeout_s=0.5)
    assert refused.value.status_code == 503 and time.monotonic() - started < 5


def self_signed_context(tmp_path) -> ssl.SSLContext:
    """A server's TLS context with a certificate for 127.0.0.1 that nobody signed."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return context


@pytest.mark.parametrize("server", ["a certificate nobody signed", "plain HTTP"])
async def test_a_failed_tls_handshake_with_ollama_fails_the_job_saying_tls(server, tmp_path, caplog):
    """aiohttp's certificate and SSL errors are ClientConnectorErrors, which the embedder held as
    Ollama being away: a misconfigured https OLLAMA_URL held every chunk for ever. Waiting does not
    fix a setting: retried as any error, then the job fails, its reason naming TLS."""
    app = web.Application()
    app.router.add_post("/api/embed", fake_ollama.embed)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    tls = self_signed_context(tmp_path) if server == "a certificate nobody signed" else None
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=tls).start()
    try:
        settings = Settings(ollama_url=f"https://127.0.0.1:{port}", model_name_embedded="all-minilm",
                            ollama_retries=2, ollama_timeout_s=5)
        caplog.set_level(logging.WARNING, logger="services.embedder")
        async with aiohttp.ClientSession() as session:
            embed, _ = make_embedder(settings, session)
            with pytest.raises(Exception) as failed:  # noqa: PT011 (asserted below)
                await asyncio.wait_for(embed(["hello"]), 30)  # (a guard against a hang only)
        assert not isinstance(failed.value, OLLAMA_UNAVAILABLE), repr(failed.value)
        assert type(failed.value).__name__ == "OllamaTLSError", repr(failed.value)
        assert "TLS" in failure_category(failed.value), failure_category(failed.value)
        # No quick retries of a setting: one attempt, no "retrying in" from the backoff.
        retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
        assert retries == [], retries
    finally:
        await runner.cleanup()


async def test_the_start_up_check_says_when_ollamas_host_does_not_resolve(caplog):
    """A name that does not resolve is held like Ollama being down (DNS blips pass), so a mistyped
    one holds every chunk: the embedder says so at start, naming the host."""
    from services.embedder.__main__ import check_ollama

    settings = Settings(ollama_url="http://no-such-ollama.invalid:11434", model_name_embedded="all-minilm",
                        ollama_retries=0, ollama_timeout_s=5)
    caplog.set_level(logging.INFO, logger="services.embedder")
    async with aiohttp.ClientSession() as session:
        embed, _ = make_embedder(settings, session)
        with pytest.raises(OLLAMA_UNAVAILABLE):  # held, as before
            await embed(["hello"])
        await check_ollama(embed, settings)
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and r.name == "services.embedder"]
    assert len(said) == 1 and "'no-such-ollama.invalid'" in said[0] and "cannot be resolved" in said[0], said
    assert "ollama pull" not in said[0]


async def test_a_backend_giving_fewer_vectors_than_segments_fails_the_chunk():
    """The handler paired segments and vectors with zip, which stops at the shorter: the segments
    past the last vector were left out of chunk.embedded, and the persister, which stores a chunk
    from that message alone, would have deleted their text."""
    from services.embedder import handler

    async def one_short(texts: list[str]) -> list[list[float]]:
        return [[1.0, 0.0]] * (len(texts) - 1)

    message = chunk_saying([f"sentence {i}" for i in range(3)])
    with pytest.raises(Exception, match="2 vectors for 3 segments"):  # noqa: PT011
        _ = [produced async for produced in handler.handle(message, handler.Deps(embed=one_short, model_name="m"))]


@pytest.mark.parametrize("texts", [
    # Ollama answers 500 "json: unsupported value: NaN" for some texts (bge-m3): the chunk's whole
    # batch failed, and the job with it, while Ollama was up. Each text is then embedded alone.
    ["The budget is approved.", fake_ollama.NAN_TEXT, "We meet again on Monday."],
    # A short voice note whose only segment is "♪".
    [fake_ollama.NAN_TEXT],
    # The first three refused, a later one embeds.
    [fake_ollama.NAN_TEXT, fake_ollama.NAN_TEXT, fake_ollama.NAN_TEXT, "We meet again on Monday."],
])
async def test_a_text_ollama_cannot_embed_is_stored_without_a_vector_and_the_job_is_done(stack, texts, caplog):
    """A text counted as refused only once another text of its chunk had embedded: a chunk of only
    such texts, or whose first three were, failed the job as "embedding service unavailable" after
    minutes of retries, and every rerun, while Ollama was up. A probe text the service embeds now
    tells it from an outage: the job is done, each refused text stored and announced without a
    vector (marked with the model that refused it: a re-embedding with that model would only be
    refused again, one with another tries it), with a warning naming it, the others with theirs."""
    from common import searchstore
    from common.db import create_pool
    from services.embedder import handler
    from services.persister import handler as persister
    from tests.conftest import events_queue, job_events

    server = TestServer(fake_ollama.make_app(), host="127.0.0.1")
    await server.start_server()
    pool = await create_pool(Settings(_env_file=None, database_url=stack.database_url), max_size=2)
    connection = await aio_pika.connect(stack.amqp_url)
    job_id = await pool.fetchval("INSERT INTO transcripts (filename) VALUES ('music.wav') RETURNING id")
    try:
        queue = await events_queue(await connection.channel(), "segment.created")
        message = chunk_saying(texts, job_id, language="en")
        settings = Settings(ollama_url=f"http://127.0.0.1:{server.port}", model_name_embedded="all-minilm",
                            ollama_retries=0)
        caplog.set_level(logging.WARNING, logger="services.embedder")
        async with aiohttp.ClientSession() as session:
            embed, model = make_embedder(settings, session)
            [embedded] = [m async for m in handler.handle(message, handler.Deps(embed=embed, model_name=model))]
        has_vector = [text != fake_ollama.NAN_TEXT for text in texts]
        assert [s.embedding is not None for s in embedded.segments] == has_vector
        for index, up in enumerate(has_vector):
            said = [r.getMessage() for r in caplog.records if f"segment {index} of chunk 1/1" in r.getMessage()]
            assert len(said) == (0 if up else 1) and all("unsupported value: NaN" in line for line in said), said

        await persister.on_embedded(pool, embedded)
        if (building := searchstore._index_builds.get((model, 384))) is not None:
            await building
        assert await pool.fetchval("SELECT status FROM transcripts WHERE id = $1", job_id) == "done"
        stored = await pool.fetch("SELECT text, embedding IS NOT NULL AS has_vector, embedding_model FROM segments"
                                  " WHERE transcript_id = $1 ORDER BY index", job_id)
        assert [tuple(row) for row in stored] == [(text, up, model) for text, up in zip(texts, has_vector)]
        events = await job_events(queue, job_id, lambda bodies: len(bodies) == len(texts), timeout=60)
        assert sorted((e["index"], e["embedding"] is not None, e["embedding_model"]) for e in events) == [
            (i, up, model) for i, up in enumerate(has_vector)]
    finally:
        await connection.close()
        await pool.execute("DELETE FROM transcripts WHERE id = $1", job_id)
        await pool.close()
        await server.close()


@pytest.mark.parametrize("texts", [
    [fake_ollama.NAN_TEXT],
    [fake_ollama.NAN_TEXT, fake_ollama.NAN_TEXT, fake_ollama.NAN_TEXT, "We meet again on Monday."],
])
async def test_a_crashed_model_runner_still_fails_the_chunk_when_no_text_embedded(texts):
    """The probe that proves the service up fails too when its model runner has crashed (500 to
    every text): no text is stored as refused, the chunk fails with its batch's error."""
    async def crashed(_: web.Request) -> web.Response:
        return web.json_response({"error": "llama runner process has terminated: exit status 2"}, status=500)

    from services.embedder import handler

    app = web.Application()
    app.router.add_post("/api/embed", crashed)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        settings = Settings(ollama_url=f"http://127.0.0.1:{server.port}", model_name_embedded="all-minilm",
                            ollama_retries=0)
        message = chunk_saying(texts)
        async with aiohttp.ClientSession() as session:
            embed, model = make_embedder(settings, session)
            with pytest.raises(OllamaError, match="runner process has terminated") as raised:
                _ = [m async for m in handler.handle(message, handler.Deps(embed=embed, model_name=model))]
    finally:
        await server.close()
    assert failure_category(raised.value) == "embedding service unavailable"


@pytest.mark.parametrize("error", [OllamaError("Ollama answered 500: json: unsupported value: NaN"),
                                   OllamaUnavailable("Ollama answered 503: loading model"),
                                   OllamaError("Ollama answered 404 for model 'bge-m3'", 404)])
async def test_a_chunk_whose_texts_all_fail_fails_as_its_batch_did(error):
    """Texts tried alone only where one text may be the cause, and not all of them when the first
    few fail too and so does the probe text: an Ollama that fails every text fails the chunk with
    the batch's error, soon."""
    from services.embedder import handler

    calls: list[int] = []

    async def failing(texts: list[str]) -> list[list[float]]:
        calls.append(len(texts))
        raise error

    message = chunk_saying([f"sentence {i}" for i in range(10)])
    with pytest.raises(type(error)) as raised:
        _ = [m async for m in handler.handle(message, handler.Deps(embed=failing, model_name="m"))]
    assert raised.value is error
    alone = error.status is None and not isinstance(error, OllamaUnavailable)
    assert calls == ([10, 1, 1, 1, 1] if alone else [10]), calls  # three texts alone, then the probe


@pytest.mark.parametrize(("texts", "calls", "has_vector"), [
    # Three failing in a row, none embedded before: the probe text, embedded, proves the service
    # up, and the text after them is still tried.
    ([fake_ollama.NAN_TEXT, fake_ollama.NAN_TEXT, fake_ollama.NAN_TEXT, "We meet again on Monday."],
     [4, 1, 1, 1, 1, 1], [False, False, False, True]),
    # Every text fails: the probe text proves the service up. A chunk of one text is not sent again.
    ([fake_ollama.NAN_TEXT], [1, 1], [False]),
    ([fake_ollama.NAN_TEXT, fake_ollama.NAN_TEXT], [2, 1, 1, 1], [False, False]),
    # Three in a row after one embedded (alike lines, "♪"): that one, asked again, proves the service
    # up, and the three are refused without waiting for the rest.
    (["The budget is approved.", fake_ollama.NAN_TEXT, fake_ollama.NAN_TEXT, fake_ollama.NAN_TEXT,
      "We meet again on Monday."], [5, 1, 1, 1, 1, 1, 1], [True, False, False, False, True]),
    # The last fails with none after it: the first, asked again, proves the service up.
    (["The budget is approved.", fake_ollama.NAN_TEXT], [2, 1, 1, 1], [True, False]),
])
async def test_a_text_counts_as_refused_only_once_the_service_embeds_another_after_it(texts, calls, has_vector):
    """A crashed model runner answers 500 as a text it cannot embed does: a chunk whose first text
    was embedded before the outage left all the others without a vector for good."""
    from services.embedder import handler

    server = TestServer(fake_ollama.make_app(), host="127.0.0.1")
    await server.start_server()
    sent: list[int] = []
    try:
        settings = Settings(ollama_url=f"http://127.0.0.1:{server.port}", model_name_embedded="all-minilm",
                            ollama_retries=0)
        message = chunk_saying(texts)
        async with aiohttp.ClientSession() as session:
            embed, model = make_embedder(settings, session)

            async def counted(batch: list[str]) -> list[list[float]]:
                sent.append(len(batch))
                return await embed(batch)

            [embedded] = [m async for m in handler.handle(message, handler.Deps(embed=counted, model_name=model))]
            assert [s.embedding is not None for s in embedded.segments] == has_vector
    finally:
        await server.close()
    assert sent == calls


@pytest.mark.parametrize("texts", [5, 2])
async def test_texts_failing_after_the_first_through_an_outage_fail_the_chunk(texts):
    """The service goes down after embedding the chunk's first text: the texts after it are not
    refused texts: three fail in a row, or the last fail, and the first, asked again, fails too."""
    from services.embedder import handler

    sent: list[int] = []
    batch_error = OllamaError("Ollama answered 500: model runner has unexpectedly stopped")

    async def down_after_one_text(batch: list[str]) -> list[list[float]]:
        sent.append(len(batch))
        if len(sent) == 2:
            return [[1.0, 0.0]]
        raise batch_error if len(sent) == 1 else OllamaError("Ollama answered 500: model runner has stopped")

    message = chunk_saying([f"sentence {i}" for i in range(texts)])
    with pytest.raises(OllamaError) as raised:
        _ = [m async for m in handler.handle(message, handler.Deps(embed=down_after_one_text, model_name="m"))]
    assert raised.value is batch_error
    assert sent == ([5, 1, 1, 1, 1, 1] if texts == 5 else [2, 1, 1, 1])


async def test_a_text_embedded_alone_into_another_number_of_vectors_fails_the_chunk():
    from services.embedder import handler

    async def two_for_one(batch: list[str]) -> list[list[float]]:
        if len(batch) > 1:
            raise OllamaError("Ollama answered 400: input too long", 400)
        return [[1.0, 0.0], [0.0, 1.0]]

    message = chunk_saying([f"sentence {i}" for i in range(2)])
    with pytest.raises(handler.EmbeddingCountMismatch, match="2 vectors for 1 segment"):
        _ = [m async for m in handler.handle(message, handler.Deps(embed=two_for_one, model_name="m"))]
