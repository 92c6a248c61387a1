"""Routes: the web page (`/`) and its static files (`/static/<name>`), shipped as package data.

The page is plain HTML, CSS and JavaScript modules under `service/web/` (no build step). Files
are read once from the installed package; only names found there are served, so no path in a
URL can reach outside it. Caching: every answer carries a strong ETag and `no-cache`, so a
browser revalidates (a cheap 304) and never runs a stale script after an upgrade. The page's
Content-Security-Policy allows nothing but this origin: the page fetches nothing from the
internet.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from importlib.resources.abc import Traversable

from fastapi import APIRouter, Request, Response

from service.api.errors import ApiError

router = APIRouter(tags=["web"], include_in_schema=False)

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def _walk(folder: Traversable, prefix: str = "") -> dict[str, Asset]:
    assets: dict[str, Asset] = {}
    for entry in folder.iterdir():
        name = prefix + entry.name
        if entry.is_dir():
            assets.update(_walk(entry, name + "/"))
            continue
        suffix = "." + entry.name.rpartition(".")[2]
        if suffix in _CONTENT_TYPES:
            body = entry.read_bytes()
            assets[name] = Asset(body, _CONTENT_TYPES[suffix], '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
    return assets


@cache
def web_assets() -> dict[str, Asset]:
    """Every servable file of `service/web/`, by its path relative to that folder."""
    return _walk(files("service") / "web")


def _answer(request: Request, asset: Asset, extra: dict[str, str] | None = None) -> Response:
    headers = {"ETag": asset.etag, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", **(extra or {})}
    if asset.etag in {tag.strip() for tag in request.headers.get("if-none-match", "").split(",")}:
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.content_type, headers=headers)  # the server drops it for HEAD


@router.api_route("/", methods=["GET", "HEAD"])
def index(request: Request) -> Response:
    """The single page: Search, Jobs and Models as hash-routed tabs."""
    return _answer(
        request, web_assets()["index.html"], {"Content-Security-Policy": _CSP, "Referrer-Policy": "no-referrer"}
    )


@router.api_route("/static/{name:path}", methods=["GET", "HEAD"])
def static(name: str, request: Request) -> Response:
    asset = web_assets().get(name)
    if asset is None or name == "index.html":
        raise ApiError(404, "not_found", f"no static file {name!r}")
    return _answer(request, asset)
