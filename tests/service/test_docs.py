"""/docs and /redoc work offline: every script, style sheet and icon they reference is served
by the app itself (no CDN), and the schema they load is the app's own."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_reference_only_assets_the_server_serves(client: TestClient, page: str) -> None:
    answer = client.get(page)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
    html = answer.text
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
    refs += re.findall(r"""(?:url|openapi_url)\s*:\s*["']([^"']+)["']""", html)
    spec_urls = re.findall(r"""spec-url\s*=\s*["']([^"']+)["']""", html)
    external = [u for u in re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"'<>)]*", html) if "w3.org" not in u]
    assert not external, f"{page} references external URLs: {external}"
    assert "/openapi.json" in refs + spec_urls, (refs, spec_urls)
    assets = [u for u in refs if u != "/openapi.json"]
    assert any(u.endswith(".js") for u in assets), assets  # the page's script is among them
    for url in assets + ["/openapi.json"]:
        asset = client.get(url)
        assert asset.status_code == 200 and len(asset.content) > 100, (url, asset.status_code)
