"""A stand-in Ollama for tests and the local run: answers Ollama's HTTP embedding API
(`POST /api/embed`, `GET /api/tags`, `GET /api/version`) with real vectors from the bundled
all-MiniLM-L6-v2, which Ollama calls `all-minilm`.

    python -m tests.fake_ollama --port 11434
    python -m tests.fake_ollama --port 11434 --proxy-answering 503   # a proxy whose Ollama is away
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web

from services.embedder.backends import LOCAL_MODEL_NAME, load_local_model, local_embed

MODELS = {LOCAL_MODEL_NAME, f"{LOCAL_MODEL_NAME}:latest"}
# A text the model cannot embed: a batch holding it is answered as Ollama answers one whose vector
# has a NaN (bge-m3 for some inputs, ollama/ollama#15582).
NAN_TEXT = "<a text whose vector has a NaN>"


async def embed(request: web.Request) -> web.Response:
    body = await request.json()
    model = body.get("model")
    if model not in MODELS:
        return web.json_response({"error": f'model "{model}" not found, try pulling it first'}, status=404)
    texts = body.get("input")
    texts = [texts] if isinstance(texts, str) else list(texts or [])
    if NAN_TEXT in texts:
        return web.json_response({"error": "failed to encode response: json: unsupported value: NaN"}, status=500)
    vectors = await asyncio.to_thread(local_embed, texts) if texts else []
    return web.json_response({"model": model, "embeddings": vectors, "total_duration": 0,
                              "load_duration": 0, "prompt_eval_count": len(texts)})


async def tags(_: web.Request) -> web.Response:
    name = f"{LOCAL_MODEL_NAME}:latest"
    return web.json_response({"models": [{"name": name, "model": name}]})


async def version(_: web.Request) -> web.Response:
    return web.json_response({"version": "0.0.0-fake"})


def make_app() -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/api/embed", embed)
    app.router.add_get("/api/tags", tags)
    app.router.add_get("/api/version", version)
    return app


def proxy_without_ollama(status: int) -> web.Application:
    """A reverse proxy whose Ollama is away: every request answered `status` with its HTML page."""
    async def away(_: web.Request) -> web.Response:
        return web.Response(status=status, content_type="text/html",
                            text=f"<html><body><h1>{status}</h1>upstream unavailable</body></html>")

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", away)
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--proxy-answering", type=int, metavar="STATUS",
                        help="stand in for a proxy whose Ollama is away: answer everything with this status")
    args = parser.parse_args()
    if args.proxy_answering:
        web.run_app(proxy_without_ollama(args.proxy_answering), host=args.host, port=args.port, print=None)
    else:
        load_local_model()
        web.run_app(make_app(), host=args.host, port=args.port, print=None)
