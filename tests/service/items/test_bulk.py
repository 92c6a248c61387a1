"""Bulk indexing (`simclr-embed index`): a folder tree with a CSV sidecar and an .npz with a
JSON Lines sidecar, into the real store with the real ONNX encoder; re-runs skip, replace
and report vanished files; the running API serves the new items without a restart."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.cli import main as cli_main
from service.contract.imaging import decode_image
from service.contract.registry import ModelRegistry
from service.items.bulk import BulkIndexError, index_dataset
from service.items.reindex import load_encoder, open_store
from tests.service.conftest import MODEL_A, MODEL_B, make_settings, png


def picture(seed: int) -> bytes:
    return png(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for rel, seed in (("cats/a.png", 1), ("cats/b.png", 2), ("dogs/c.png", 3), ("top.png", 4)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(picture(seed))
    (root / "notes.txt").write_text("not an image")
    return root


def run_cli(monkeypatch: pytest.MonkeyPatch, data_dir: Path, capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    monkeypatch.setenv("SIMCLR_EMBED_DATA_DIR", str(data_dir))  # and SIMCLR_EMBED_STORE_URL, set by the test
    monkeypatch.setenv("SIMCLR_EMBED_ORT_INTRA_OP_THREADS", "1")
    assert cli_main(["index", *args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_folder_with_sidecar_is_indexed_once_and_kept_in_step(
    folder: Path,
    data_dir: Path,
    store_url: str | None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if store_url:
        monkeypatch.setenv("SIMCLR_EMBED_STORE_URL", store_url)
    sidecar = tmp_path / "meta.csv"
    sidecar.write_text("path,weight,name\ncats/a.png,2.5,tom\ntop.png,7,007x\n")
    report = run_cli(monkeypatch, data_dir, capsys, str(folder), "--folders-as", "kind", "--metadata", str(sidecar))
    assert (report["added"], report["replaced"], report["skipped"], report["vanished"]) == (4, 0, 0, [])

    settings = make_settings(data_dir, store_url=store_url)
    store, blobs = open_store(settings)
    assert store.get("cats/a.png").metadata == {"kind": "cats", "weight": 2.5, "name": "tom"}  # type: ignore[union-attr]
    assert store.get("top.png").metadata == {"weight": 7, "name": "007x"}  # type: ignore[union-attr]
    assert store.get("dogs/c.png").metadata == {"kind": "dogs"}  # type: ignore[union-attr]
    encoder = load_encoder(settings, ModelRegistry(settings.models_dir), MODEL_A)
    data = (folder / "dogs/c.png").read_bytes()
    expected = encoder.embed(encoder.policy.batch([decode_image(data)]))[0]
    np.testing.assert_allclose(store.vector("dogs/c.png", MODEL_A), expected, atol=1e-6)
    assert blobs.get(store.get("dogs/c.png").sha256) == data  # type: ignore[union-attr]

    again = run_cli(monkeypatch, data_dir, capsys, str(folder))
    assert (again["added"], again["replaced"], again["skipped"]) == (0, 0, 4)
    (folder / "cats/b.png").write_bytes(picture(20))
    (folder / "top.png").unlink()
    changed = run_cli(monkeypatch, data_dir, capsys, str(folder))
    assert (changed["added"], changed["replaced"], changed["skipped"]) == (0, 1, 2)
    assert changed["vanished"] == ["top.png"] and changed["deleted"] == 0
    assert store.get("top.png") is not None  # reported, not deleted
    pruned = run_cli(monkeypatch, data_dir, capsys, str(folder), "--delete-missing")
    assert pruned["vanished"] == ["top.png"] and pruned["deleted"] == 1
    assert store.get("top.png") is None and store.count() == 3
    assert store.state(MODEL_A).count == 3
    store.close()


def test_npz_with_jsonl_sidecar_reaches_the_running_api(
    client: TestClient, data_dir: Path, store_url: str | None, tmp_path: Path
) -> None:
    rng = np.random.default_rng(5)
    npz = tmp_path / "small.npz"
    np.savez(npz, x_train=rng.integers(0, 256, (6, 20, 20, 3), dtype=np.uint8), y_train=np.arange(6) % 3)
    sidecar = tmp_path / "meta.jsonl"
    sidecar.write_text(json.dumps({"path": "small-2", "tags": ["a", 1], "ok": True}) + "\n")
    started = time.monotonic()
    report = index_dataset(make_settings(data_dir, store_url=store_url), npz, sidecar=sidecar, batch_size=4)
    assert (report.added, report.failed) == (6, [])
    while True:  # the API follows the store's change log: no restart
        hits = client.post("/search", json={"item_id": "small-2", "k": 1})
        if hits.status_code == 200 and hits.json()["results"]:
            break
        assert time.monotonic() - started < 5
        time.sleep(0.05)
    top = hits.json()["results"][0]
    assert top["id"] == "small-2" and top["metadata"] == {"label": 2, "tags": ["a", 1], "ok": True}
    found = client.post("/search", json={"item_id": "small-0", "k": 6, "filter": {"label": 0}}).json()["results"]
    assert sorted(h["id"] for h in found) == ["small-0", "small-3"]
    with pytest.raises(BulkIndexError, match="expected a folder"):
        index_dataset(make_settings(data_dir, store_url=store_url), sidecar)


def test_ids_by_stem_with_a_prefix_and_clashing_stems(
    folder: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    report = run_cli(monkeypatch, data_dir, capsys, str(folder), "--ids", "stem", "--id-prefix", "shop1:")
    assert (report["total"], report["added"]) == (4, 4)
    store, _ = open_store(make_settings(data_dir))
    present = store.shas(["shop1:a", "shop1:b", "shop1:c", "shop1:top", "a", "cats/a.png", "shop1:cats/a.png"])
    assert sorted(present) == ["shop1:a", "shop1:b", "shop1:c", "shop1:top"]
    store.close()
    (folder / "dogs" / "a.png").write_bytes(picture(9))  # a second `a`
    with pytest.raises(BulkIndexError, match=r"file names repeat in the tree \(a\)"):
        index_dataset(make_settings(data_dir), folder, ids="stem")


def test_an_encoder_of_another_vector_space_is_refused(folder: Path, data_dir: Path) -> None:
    settings = make_settings(data_dir)
    registry = ModelRegistry(settings.models_dir)
    assert registry.active() == MODEL_A
    other = load_encoder(settings, registry, MODEL_B)  # a loaded session of the model not served
    with pytest.raises(ValueError, match=f"writes vector space '{MODEL_B}', not '{MODEL_A}'"):
        index_dataset(settings, folder, encoder=other)
    store, _ = open_store(settings)
    assert store.count() == 0  # refused before anything was written
    store.close()
