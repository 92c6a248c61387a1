"""Security properties, each tested by behaviour where it can be (SECURITY.md says how each is
implemented): API keys on every mutating route (the list derived from app.routes, so a new
route cannot slip through), key comparison, the streaming upload limit over a raw socket,
checkpoints read with weights_only=True, no deserialisation of client data, CORS closed by
default, secrets from the environment only.

Dataset confinement (`..`, absolute paths, symlinks out of the root) is tested in
tests/service/test_jobs_api.py; CORS with listed origins in tests/service/test_auth.py.
"""

from __future__ import annotations

import ast
import pickle
import re
import select
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.routing import BaseRoute

from service.app import create_app
from service.settings import Settings
from tests.hardening.conftest import API_KEY, hardened_settings, noise, png
from tests.service.conftest import live_server

REPO = Path(__file__).resolve().parents[2]
MUTATING = {"POST", "PUT", "PATCH", "DELETE"}
# POST routes that only read (they take a body, change nothing); any other POST must need a key.
READ_ONLY_POSTS = {"/embed", "/search", "/classifiers/{classifier_id}/predict"}
# Routes that never need a key: probes and the web page (the page asks for the key itself).
OPEN = {"/healthz", "/readyz", "/", "/static/{name}", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


def _walk(routes: list[BaseRoute]) -> Iterator[BaseRoute]:
    """Routes, descending into included routers (FastAPI keeps them as `_IncludedRouter` entries
    holding `original_router`; the routers here are included without a prefix)."""
    for route in routes:
        included = getattr(route, "original_router", None)
        yield from _walk(included.routes) if included is not None else [route]


def _routes(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path template) of every HTTP route the app serves, including undocumented ones."""
    out = []
    for route in _walk(app.routes):
        for method in sorted(getattr(route, "methods", None) or ()):
            if method != "HEAD":
                out.append((method, re.sub(r"\{(\w+)(:\w+)?\}", r"{\1}", route.path)))  # type: ignore[attr-defined]
    documented = {(m.upper(), p) for p, ops in app.openapi()["paths"].items() for m in ops}
    assert documented <= set(out), f"the route walk missed {documented - set(out)}"
    return out


def _url(path: str) -> str:
    return re.sub(r"\{\w+\}", "x", path)


@pytest.fixture(scope="module")
def keyed(hardened_dir: Path) -> Iterator[TestClient]:
    settings = hardened_settings(hardened_dir, api_keys=f"{API_KEY},second-key-abcdefghijklmnop")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def test_every_mutating_route_needs_a_key(keyed: TestClient) -> None:
    routes = _routes(keyed.app)
    mutating = [(m, p) for m, p in routes if m in MUTATING and p not in READ_ONLY_POSTS]
    assert len(mutating) >= 5, mutating  # items add/delete, model activation, job submit/cancel at least
    for method, path in mutating:
        for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer " + API_KEY[:-1]}):
            r = keyed.request(method, _url(path), headers=headers)
            assert r.status_code == 401, f"{method} {path} {headers}: {r.status_code} {r.text}"
            assert r.json()["error"]["code"] in {"missing_api_key", "invalid_api_key"}
            assert r.headers["www-authenticate"] == "Bearer"
    # with the key, the same requests get past authentication (whatever they then answer)
    for method, path in mutating:
        assert keyed.request(method, _url(path), headers={"X-API-Key": API_KEY}).status_code != 401


def test_with_keys_for_reads_every_route_but_probes_and_page_needs_a_key(hardened_dir: Path) -> None:
    settings = hardened_settings(hardened_dir, api_keys=API_KEY, require_key_for_reads=True)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        guarded = [(m, p) for m, p in _routes(client.app) if p not in OPEN and p != "/metrics"]
        assert ("GET", "/items") in guarded and ("POST", "/embed") in guarded
        unguarded = [(m, p) for m, p in guarded if client.request(m, _url(p)).status_code != 401]
        assert ("GET", "/train-jobs") in guarded and ("GET", "/train-jobs/{job_id}") in guarded
        assert unguarded == [], f"routes answering without a key: {unguarded}"


@pytest.mark.parametrize(
    "presented",
    [
        API_KEY + "x",
        API_KEY[:-1],
        API_KEY.upper(),
        "",
        " ",
        "x" * 10_000,
        "ключ",
        API_KEY + "\t",
    ],
)
def test_near_miss_keys_are_refused_and_never_crash(keyed: TestClient, presented: str) -> None:
    r = keyed.post("/models/tiny-b/activate", headers={"X-API-Key": presented.encode("utf-8")})
    assert r.status_code == 401, r.text


def test_either_configured_key_and_either_header_work(keyed: TestClient) -> None:
    for headers in (
        {"X-API-Key": API_KEY},
        {"Authorization": "Bearer second-key-abcdefghijklmnop"},
        {"Authorization": f"bearer  {API_KEY} "},
    ):
        assert keyed.post("/models/tiny-a/activate", headers=headers).status_code == 200, headers


@pytest.mark.integration
def test_streamed_body_over_the_limit_is_refused_before_it_is_all_sent(data_dir: Path) -> None:
    """A raw chunked upload without Content-Length: the 413 arrives (or the connection closes)
    while the client is still sending, long before the 8 MiB it intends to send."""
    limit, chunk, total = 64 * 1024, 16 * 1024, 8 * 1024 * 1024
    with live_server(data_dir, SIMCLR_EMBED_MAX_UPLOAD_BYTES=str(limit)) as server:
        port = int(server.url.rsplit(":", 1)[1])
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(
            b"POST /embed HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        sent, answer = 0, b""
        try:
            while sent < total:
                sock.sendall(b"%x\r\n" % chunk + b"x" * chunk + b"\r\n")
                sent += chunk
                if select.select([sock], [], [], 0.01)[0]:
                    answer = sock.recv(65536)
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.settimeout(10)
        try:
            while part := sock.recv(65536):  # the rest of the answer, until the server closes
                answer += part
        except (ConnectionResetError, TimeoutError):
            pass
        sock.close()
        assert sent < total // 4, f"the server read {sent} bytes before refusing"
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b"payload_too_large" in answer
        assert server.proc.poll() is None


def test_every_torch_load_passes_weights_only_true() -> None:
    calls = []
    for path in sorted((REPO / "trainer").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                flag = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
                calls.append((f"{path.name}:{node.lineno}", isinstance(flag, ast.Constant) and flag.value is True))
    assert calls, "no torch.load found: the scan is broken"
    assert all(ok for _, ok in calls), [c for c, ok in calls if not ok]


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, (f"touch {_Payload.marker}",))

    marker = ""


def test_a_pickle_bearing_checkpoint_is_refused(tmp_path: Path) -> None:
    from trainer.checkpoint import load_checkpoint

    _Payload.marker = str(tmp_path / "executed")
    path = tmp_path / "last.pt"
    torch.save({"encoder": {}, "step": 1, "evil": _Payload()}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path)
    assert not (tmp_path / "executed").exists()


DESERIALISERS = {"pickle", "marshal", "shelve", "dill", "cloudpickle", "joblib"}


def test_service_never_deserialises_client_data_unsafely() -> None:
    """No pickle-family import, eval/exec, yaml.load, or np.load(allow_pickle=True) in service/."""
    found = []
    for path in sorted((REPO / "service").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = {(node.module or "").split(".")[0]} if isinstance(node, ast.ImportFrom) else set()
                names |= {a.name.split(".")[0] for a in node.names} if isinstance(node, ast.Import) else set()
                found += [f"{where} imports {n}" for n in names & DESERIALISERS]
            elif isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if name in {"eval", "exec"} or (name == "load" and "yaml" in ast.unparse(node.func)):
                    found.append(f"{where} calls {ast.unparse(node.func)}")
                if any(
                    k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                    for k in node.keywords
                ):
                    found.append(f"{where} allows pickle")
    assert found == []


def test_the_broker_accepts_json_only() -> None:
    """Celery messages are the other way client data travels: JSON, never pickle."""
    from service.jobs.celery_app import create_celery

    conf = create_celery("redis://127.0.0.1:1/0").conf
    assert conf.task_serializer == "json" and conf.result_serializer == "json"
    assert list(conf.accept_content) == ["json"]


def test_cors_is_closed_by_default_on_every_route(keyed: TestClient) -> None:
    preflight = {
        "Origin": "https://evil.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "x-api-key",
    }
    for method, path in _routes(keyed.app):
        r = keyed.options(_url(path), headers=preflight)
        assert "access-control-allow-origin" not in r.headers, (method, path)
        plain = keyed.request(method, _url(path), headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in plain.headers, (method, path)


def test_secrets_come_from_the_environment_and_are_never_shown(
    monkeypatch: pytest.MonkeyPatch, hardened_dir: Path
) -> None:
    assert Settings.model_fields["api_keys"].get_default(call_default_factory=True) == []  # no built-in key
    monkeypatch.setenv("SIMCLR_EMBED_API_KEYS", f"{API_KEY},other-key-0987654321")
    monkeypatch.setenv("SIMCLR_EMBED_DATA_DIR", str(hardened_dir))
    settings = Settings()
    assert [k.get_secret_value() for k in settings.api_keys] == [API_KEY, "other-key-0987654321"]
    assert API_KEY not in repr(settings) and API_KEY not in str(settings.model_dump())
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        shown = [
            client.get("/openapi.json").text,
            client.get("/readyz").text,
            client.get("/metrics").text,
            client.post("/models/x/activate", headers={"X-API-Key": API_KEY + "!"}).text,
            client.post("/embed", files=[("files", ("a.png", png(noise(8, 8)), "image/png"))]).text,
        ]
        assert not any(API_KEY in text for text in shown)
    compose = (REPO / "docker-compose.yml").read_text()
    assert "SIMCLR_EMBED_API_KEYS: ${SIMCLR_EMBED_API_KEYS:?" in compose  # compose refuses to start without keys
