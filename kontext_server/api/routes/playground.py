"""The playground page: GET /ui (and / redirecting to it), plain HTML + JavaScript + CSS from the package's data
(kontext_server/api/playground/), no build step and nothing from a CDN, so it works offline.

The page and its two assets are open (OPEN_PATHS in app.py): they hold no data. Everything the page does goes
through the API routes, which need a key when the server has keys: the page sends the key the user types
(kept in the tab's sessionStorage) as `Authorization: Bearer`."""
from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

router = APIRouter(include_in_schema=False)
ASSETS = {"index.html": "text/html; charset=utf-8", "playground.js": "text/javascript; charset=utf-8",
          "playground.css": "text/css; charset=utf-8"}
PATHS = frozenset({"/", "/ui", "/ui/playground.js", "/ui/playground.css"})


def _asset(name: str) -> Response:
    data = resources.files("kontext_server.api").joinpath("playground", name).read_bytes()
    return Response(data, media_type=ASSETS[name], headers={"Cache-Control": "no-cache"})


@router.get("/")
async def root():
    return RedirectResponse("/ui", status_code=307)


@router.get("/ui")
async def page():
    return _asset("index.html")


@router.get("/ui/playground.js")
async def script():
    return _asset("playground.js")


@router.get("/ui/playground.css")
async def style():
    return _asset("playground.css")
