"""The web page's route: `/` and `/static/<name>` from the package, content types, ETag
revalidation, nothing outside service/web/ reachable."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.routes.web import web_assets
from service.app import create_app
from service.settings import Settings

WEB = Path(__file__).resolve().parents[2] / "service" / "web"


@pytest.fixture
def web_client(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(data_dir=tmp_path)), raise_server_exceptions=False) as c:
        yield c


def test_index_page(web_client: TestClient) -> None:
    answer = web_client.get("/")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "text/html; charset=utf-8"
    assert answer.content == (WEB / "index.html").read_bytes()
    assert answer.headers["cache-control"] == "no-cache"
    assert "default-src 'self'" in answer.headers["content-security-policy"]
    again = web_client.get("/", headers={"If-None-Match": answer.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("app.js", "text/javascript; charset=utf-8"),
        ("style.css", "text/css; charset=utf-8"),
        ("icon.svg", "image/svg+xml"),
    ],
)
def test_static_files(web_client: TestClient, name: str, content_type: str) -> None:
    answer = web_client.get(f"/static/{name}")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == content_type
    assert answer.content == (WEB / name).read_bytes()
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert web_client.get(f"/static/{name}", headers={"If-None-Match": answer.headers["etag"]}).status_code == 304
    assert web_client.get(f"/static/{name}", headers={"If-None-Match": '"stale"'}).status_code == 200


def test_every_module_the_page_imports_is_served(web_client: TestClient) -> None:
    """Each `./x.js` import of each module resolves to a served file (no build step to catch a typo)."""
    import re

    for name in [n for n in web_assets() if n.endswith(".js")]:
        for imported in re.findall(r'from "\./([\w.-]+)"', web_client.get(f"/static/{name}").text):
            assert imported in web_assets(), f"{name} imports ./{imported}, which is not shipped"


@pytest.mark.parametrize(
    "path",
    [
        "/static/../settings.py",
        "/static/%2e%2e/app.py",
        "/static/nope.js",
        "/static/",
        "/static/index.html",
        "/static/..%2f..%2fpyproject.toml",
    ],
)
def test_nothing_else_is_served(web_client: TestClient, path: str) -> None:
    answer = web_client.get(path)
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "not_found"
