"""Property-based API fuzzing from the service's own OpenAPI schema (schemathesis).

Every operation in /openapi.json gets generated requests, valid and invalid, through the real
app in-process (its lifespan run: tiny published ONNX encoder, FAISS index with items, a
private Redis as broker). Binary and base64 fields draw from real small images as well as
random bytes, so /embed, /items and /search reach the encoder and the index, not only the
decoder's error path. Each response must be no 5xx, finish within the deadline, and conform
to the schema: documented status code, content type and body.

A longer run against a uvicorn subprocess is `bench/fuzz_long.py`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, assume, settings
from schemathesis.checks import allow_header_conformance, positive_data_acceptance, status_code_conformance
from schemathesis.python import asgi

from _procs import RedisServer
from service.app import create_app
from service.settings import Settings
from tests.hardening.conftest import hardened_settings, seed_items
from tests.hardening.fuzz_formats import IMAGES
from tests.service.conftest import MODEL_A

EXAMPLES = 25  # per operation: the suite's share; bench/fuzz_long.py runs many more

# Checks the schema cannot satisfy, everywhere:
# * positive_data_acceptance: the schema cannot say "bytes that decode as an image" or "a vector
#   of the served model's dimension", so a schema-valid blob is rightly refused with 415/422;
# * allow_header_conformance: Starlette answers 405 with `Allow` naming only the first route
#   that matched the path (GET /items/{id} vs DELETE /items/{id}); a framework limitation.
EXCLUDED = [positive_data_acceptance, allow_header_conformance]

# Status codes the routes return on purpose but do not declare yet (`responses=` missing in
# the route decorators; reported to their owners). For these operations the documented-status
# check is replaced by "documented or listed here"; every other check still runs.
UNDECLARED: dict[str, set[int]] = {
    "GET /items/{item_id}": {404},
    "GET /items/{item_id}/image": {404},
    "DELETE /items/{item_id}": {404},
    "POST /items": {409, 413, 415},
    "POST /search": {404, 413, 415, 422, 503},
    "POST /train-jobs": {400, 404, 503},
    "GET /train-jobs": {503},
    "GET /train-jobs/{job_id}": {404, 503},
    "DELETE /train-jobs/{job_id}": {404, 503},
}


def known_bug(case: schemathesis.Case) -> str | None:
    """Inputs that hit open bugs (pinned by the strict xfails below); kept out
    of the fuzzing so it keeps looking for new ones."""
    offset = (case.query or {}).get("offset")
    if case.path in ("/items", "/train-jobs") and isinstance(offset, int) and offset >= 2**63:
        return "offset beyond 64 bits"
    body = case.body if isinstance(case.body, dict) else {}
    dataset = str(body.get("dataset", ""))
    if case.path == "/train-jobs" and case.method == "POST" and ("\x00" in dataset or dataset.startswith("~")):
        return "NUL or ~user in dataset path"
    return None


# The schema is the app's own, built without starting it (the OpenAPI document needs no state);
# requests go to a started app through `fuzz_client`. (schemathesis' `from_fixture` loader does
# not run under pytest 9.)
schema = schemathesis.openapi.from_dict(create_app(Settings(data_dir=Path("unused"))).openapi())


@pytest.fixture(scope="module")
def fuzz_client(hardened_dir: Path, broker: RedisServer) -> Iterator[asgi.ASGIClient]:
    """The real app in-process, lifespan started, with items indexed."""
    with asgi.get_client(create_app(hardened_settings(hardened_dir, broker.url))) as client:
        seed_items(client.post)
        yield client
    asgi.shutdown_lifespans()


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_conforms_to_its_schema(case: schemathesis.Case, fuzz_client: asgi.ASGIClient) -> None:
    assume(known_bug(case) is None)
    label = f"{case.method} {case.path}"
    excluded = EXCLUDED + ([status_code_conformance] if label in UNDECLARED else [])
    response = case.call_and_validate(
        session=fuzz_client, base_url=fuzz_client.base_url, timeout=30, excluded_checks=excluded
    )
    assert response.status_code < 500, response.text
    if label in UNDECLARED:
        documented = {int(code) for code in case.operation.definition.raw.get("responses", {}) if code.isdigit()}
        assert response.status_code in documented | UNDECLARED[label], f"{label}: {response.status_code} {response.text}"
        if response.status_code >= 400:  # the one error shape
            assert set(response.json()["error"]) >= {"code", "message"}


@pytest.mark.xfail(strict=True, reason="bug: offset >= 2**63 reaches SQLite / Redis (routes need Query(le=...))")
@pytest.mark.parametrize("path", ["/items", "/train-jobs"])
def test_huge_offset_is_a_422_not_a_5xx(fuzz_client: asgi.ASGIClient, path: str) -> None:
    assert fuzz_client.get(path, params={"offset": 2**63}).status_code == 422


@pytest.mark.xfail(strict=True, reason="bug: resolve_dataset lets ValueError (NUL) and RuntimeError (~user) escape")
@pytest.mark.parametrize("dataset", ["a\x00b", "~no-such-user/x"])
def test_unresolvable_dataset_path_is_a_4xx(fuzz_client: asgi.ASGIClient, dataset: str) -> None:
    r = fuzz_client.post("/train-jobs", json={"dataset": dataset})
    assert 400 <= r.status_code < 500


def test_the_fuzzed_app_still_serves(fuzz_client: asgi.ASGIClient) -> None:
    """After all the fuzzing: health, a real embedding and a real search still work."""
    client = fuzz_client
    assert client.get("/healthz").status_code == 200
    r = client.post("/embed", files=[("files", ("a.png", IMAGES[0], "image/png"))])
    assert r.status_code == 200 and r.json()["model_id"] == MODEL_A
    hits = client.post("/search", json={"item_id": "seed-0", "k": 3})
    assert hits.status_code == 200 and hits.json()["results"][0]["id"] == "seed-0"
