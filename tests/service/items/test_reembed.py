"""Re-embedding runs once per activation: the API's thread and the worker's task may both
ask; the store's claim lets one embed while the other returns at once."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from service.contract.registry import ModelRegistry
from service.items.backend import NewItem
from service.items.reindex import open_store, reembed_all
from tests.service.conftest import MODEL_A, MODEL_B, make_settings, png


def test_two_concurrent_reembeddings_embed_each_item_once(data_dir: Path, store_url: str | None) -> None:
    settings = make_settings(data_dir, store_url=store_url)
    store, blobs = open_store(settings)
    rng = np.random.default_rng(0)
    n = 150
    new = []
    for i in range(n):
        sha = blobs.put(png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)))
        new.append(NewItem(f"r{i}", sha, "image/png", None))
    store.add(new, {MODEL_A: np.eye(1, 24, dtype=np.float32).repeat(n, axis=0)})
    registry = ModelRegistry(settings.models_dir)
    written: list[int] = []
    start = threading.Barrier(2)

    def run() -> None:
        start.wait()
        written.append(reembed_all(settings, registry, MODEL_B, batch_size=16))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(written) == [0, n]  # one embedded everything, the other left at once
    state = store.state(MODEL_B)
    assert state.complete and state.count == n and state.changes == n  # each item's vector logged once
    progress = store.reembed_progress(MODEL_B)
    assert progress is not None and (progress.state, progress.done, progress.total) == ("succeeded", n, n)
    assert reembed_all(settings, registry, MODEL_B) == 0  # a late asker finds the space complete
    store.close()
