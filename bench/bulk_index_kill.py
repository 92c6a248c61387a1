"""A bulk index job over the CIFAR-10 train JPEGs with its worker SIGKILLed mid-job, on the
real job stack: a private redis-server, `simclr-embed worker` subprocesses (Celery) and the API
under uvicorn (tests/integration/jobstack.py), over a data folder whose registry holds a
trained model (exported from `--run`, active).

1. `POST /index-jobs` over the folder (ids = relative paths, `class` from the sub-folders).
2. Once `--kill-at` of the images are indexed, the worker is SIGKILLed (no ack, no clean-up).
3. A new worker starts; the job is re-sent once its owner lock lapses and goes on.
4. At the end: the store holds each image exactly once (one item row and one vector each), the
   job's counts add up (skipped = what the first attempt committed), and the API serves the
   last image.

With `--save-embeddings FILE` the stored vectors are written to FILE (.npz: `vectors` float32
[N, D], `ids`, `labels`): the real embeddings that bench/ann_recall.py and
bench/million_items.py (`--like`) use.

    tar xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp/cifar10-jpeg
    .venv/bin/python bench/bulk_index_kill.py --images /tmp/cifar10-jpeg/train --run RUN_DIR \
        --save-embeddings /tmp/cifar10-train-embeddings.npz
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "integration")]

from jobstack import Stack  # the test stack's processes, started as the tests do

from service.contract.registry import ModelRegistry
from service.items.bulk import IMAGE_SUFFIXES
from service.items.store import ItemStore
from trainer.export import export_run


def job(stack: Stack, job_id: str) -> dict[str, Any]:
    answer = stack.http.get(f"/index-jobs/{job_id}")
    answer.raise_for_status()
    return answer.json()


def wait(stack: Stack, job_id: str, done: Any, timeout_s: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        record = job(stack, job_id)
        if record["state"] in ("failed", "cancelled"):
            raise SystemExit(f"job {job_id} ended {record['state']}: {record.get('error')}")
        if done(record):
            return record
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}: {record}")
        time.sleep(0.5)


def spaces(store: ItemStore) -> list[str]:
    """The vector spaces the store holds vectors of (one model and variant each)."""
    with store._read() as db:
        return [row[0] for row in db.execute("SELECT DISTINCT model_id FROM vectors").fetchall()]


def step(record: dict[str, Any]) -> int:
    return int((record.get("progress") or {}).get("step", 0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=Path, required=True, help="folder of class sub-folders of JPEGs")
    ap.add_argument("--run", type=Path, required=True, help="a trained run directory (exported here)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="the worker's ONNX Runtime intra-op threads")
    ap.add_argument("--kill-at", type=float, default=0.4, help="share of the images indexed when the worker dies")
    ap.add_argument("--save-embeddings", type=Path, default=None)
    args = ap.parse_args()
    total = sum(1 for p in args.images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)

    with tempfile.TemporaryDirectory(prefix="bulk-kill-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        card = export_run(args.run, ModelRegistry(data / "models"), activate=True, model_id="bench-trained")
        images = args.images.resolve()
        env = {"SIMCLR_EMBED_ORT_INTRA_OP_THREADS": str(args.threads), "SIMCLR_EMBED_DATASET_ROOTS": str(images.parent)}
        stack = Stack(Path(tmp), env)
        try:
            stack.start_worker()
            began = time.perf_counter()
            answer = stack.http.post(
                "/index-jobs", json={"dataset": images.name, "folders_as": "class", "batch_size": args.batch_size}
            )
            assert answer.status_code == 202, answer.text
            job_id = answer.json()["id"]
            at = int(args.kill_at * total)
            before = wait(stack, job_id, lambda r: step(r) >= at, 3600, f"{at} images indexed")
            (victim,) = stack.live_workers()
            stack.kill_worker(victim)
            killed = time.perf_counter()
            store = ItemStore(data / "items" / "items.sqlite3")
            committed = sum(store.state(space).count for space in spaces(store))
            store.close()
            print(
                f"SIGKILL at step {step(before):,} of {total:,} ({killed - began:.0f} s, "
                f"{step(before) / (killed - began):.1f} images/s); {committed:,} vectors committed",
                flush=True,
            )
            stack.start_worker()
            done = wait(stack, job_id, lambda r: r["state"] == "succeeded", 7200, "the job to finish")
            ended = time.perf_counter()
            counts = done["progress"]["index"]
            print(
                f"succeeded after {ended - began:.0f} s in all ({ended - killed:.0f} s after the kill), "
                f"attempts {done['attempts']}, counts {counts}",
                flush=True,
            )
            store = ItemStore(data / "items" / "items.sqlite3")
            try:
                (space,) = spaces(store)
                items, _ = store.page(0, total + 1000)
                ids = [item.id for item in items]
                pks, vectors, _ = store.vectors(space)  # [N], [N, D]
                once = len(ids) == len(set(ids)) == total and len(pks) == len(set(pks.tolist())) == total
                print(
                    f"store: {len(ids):,} items ({len(set(ids)):,} distinct ids), {len(pks):,} vectors "
                    f"({len(set(pks.tolist())):,} distinct items) in {space}: each image exactly once = {once}"
                )
                assert done["attempts"] == 2 and counts["skipped"] >= committed and counts["failed"] == 0
                assert counts["skipped"] + counts["added"] == total and once
                if args.save_embeddings:
                    by_pk = {item.pk: item for item in items}
                    labels = [str((by_pk[int(pk)].metadata or {}).get("class", "")) for pk in pks]
                    np.savez(
                        args.save_embeddings,
                        vectors=vectors.astype(np.float32),
                        ids=np.array([by_pk[int(pk)].id for pk in pks]),
                        labels=np.array(labels),
                        model=np.array(f"{card.model_id} ({space})"),
                    )
                    print(f"embeddings [{len(vectors)}, {vectors.shape[1]}] written to {args.save_embeddings}")
            finally:
                store.close()
            last = sorted(ids)[-1]
            hits = stack.http.post("/search", json={"item_id": last, "k": 1}).json()["results"]
            print(f"the API serves {last}: {hits[0]['id'] == last if hits else False}")
        finally:
            stack.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
