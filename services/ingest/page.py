"""The web page: static files (no build step, nothing fetched from elsewhere) served at `/` and
`/ui/`. It talks to the same HTTP API as any client; with API keys, the key is typed into the
page once and kept in the browser's session storage."""

from __future__ import annotations

from pathlib import Path

from litestar import get, head
from litestar.datastructures import CacheControlHeader
from litestar.response import File
from litestar.static_files import create_static_files_router

STATIC = Path(__file__).parent / "static"


def _page() -> File:
    # Litestar adds "; charset=utf-8" to a text/* type itself.
    return File(STATIC / "index.html", media_type="text/html", content_disposition_type="inline",
                headers={"Cache-Control": "no-cache"})


@get("/", include_in_schema=False)
async def index() -> File:
    return _page()


# HEAD wherever GET works (RFC 9110, 9.1: curl -I, download tools): the same headers, and the
# server (uvicorn) sends no body.
@head("/", include_in_schema=False, name="index/head")
async def index_head() -> File:
    return _page()


# Revalidated on every load like the page itself: after an upgrade a browser would otherwise run
# the new page with the script and styles it cached from the old one.
PAGE_ROUTES = [index, index_head,
               create_static_files_router(path="/ui", directories=[STATIC], name="ui",
                                          cache_control=CacheControlHeader(no_cache=True))]
