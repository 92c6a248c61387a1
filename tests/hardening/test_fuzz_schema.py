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
from _procs import RedisServer
from hypothesis import HealthCheck, settings
from schemathesis.checks import allow_header_conformance, positive_data_acceptance
from schemathesis.python import asgi

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

# The schema is the app's own, built without starting it (the OpenAPI document needs no state);
# requests go to a started app through `fuzz_client`. (schemathesis' `from_fixture` loader does
# not run under pytest 9.)
schema = schemathesis.openapi.from_dict(create_app(Settings(data_dir=Path("unused"))).openapi())


@pytest.fixture(scope="module")
def fuzz_client(hardened_dir: Path, private_redis: RedisServer) -> Iterator[asgi.ASGIClient]:
    """The real app in-process, lifespan started, with items indexed."""
    with asgi.get_client(create_app(hardened_settings(hardened_dir, private_redis.url))) as client:
        seed_items(client.post)
        yield client
    asgi.shutdown_lifespans()


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_conforms_to_its_schema(case: schemathesis.Case, fuzz_client: asgi.ASGIClient) -> None:
    response = case.call_and_validate(
        session=fuzz_client, base_url=fuzz_client.base_url, timeout=30, excluded_checks=EXCLUDED
    )
    assert response.status_code < 500, response.text
    if response.status_code >= 400:  # the one error shape
        assert set(response.json()["error"]) >= {"code", "message"}


@pytest.mark.parametrize("path", ["/items", "/train-jobs"])
@pytest.mark.parametrize("offset", [2**63, 10**12 + 1])
def test_huge_offset_is_a_422_not_a_5xx(fuzz_client: asgi.ASGIClient, path: str, offset: int) -> None:
    r = fuzz_client.get(path, params={"offset": offset})
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "query.offset", r.text


@pytest.mark.parametrize(
    ("dataset", "status", "code"),
    [
        ("a\x00b", 400, "invalid_dataset_path"),
        ("~no-such-user/x", 404, "dataset_not_found"),  # no `~` expansion: a relative name under the first root
        ("~/../../..", 400, "dataset_outside_roots"),
    ],
)
def test_unresolvable_dataset_path_is_a_4xx(fuzz_client: asgi.ASGIClient, dataset: str, status: int, code: str) -> None:
    r = fuzz_client.post("/train-jobs", json={"dataset": dataset})
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text


def test_the_fuzzed_app_still_serves(fuzz_client: asgi.ASGIClient) -> None:
    """After all the fuzzing: health, a real embedding and a real search still work."""
    client = fuzz_client
    assert client.get("/healthz").status_code == 200
    r = client.post("/embed", files=[("files", ("a.png", IMAGES[0], "image/png"))])
    assert r.status_code == 200 and r.json()["model_id"] == MODEL_A
    hits = client.post("/search", json={"item_id": "seed-0", "k": 3})
    assert hits.status_code == 200 and hits.json()["results"][0]["id"] == "seed-0"
