"""The demo job under bf16: skipped steps, final loss and speed, stock convolution against the
encoder's centre-tap convolution on 1x1 inputs (trainer/models.py, Conv2d), side by side.

`make up`'s demo (service/up.py, DEMO_JOB: SimCLR on scikit-learn's digits at 16 px with the
standard stem, batch 64, 280 steps) runs twice in one process, `precision: bf16` both times:
once with the centre tap switched off (every convolution the stock oneDNN one), once as
shipped. On a CPU with AMX the stock run has non-finite gradients that the trainer skips.

    PYTHONPATH=$PWD .venv/bin/python bench/demo_bf16.py --threads 2 --json /tmp/demo_bf16.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.contract.train_config import TrainConfig
from service.settings import Settings
from service.up import DEMO_JOB, demo_dataset
from trainer import models
from trainer.engine import train


def _run(cfg: TrainConfig, data: Path, run_dir: Path, centre_tap: bool) -> dict[str, Any]:
    stock = models.Conv2d._centre_tap_applies
    if not centre_tap:
        models.Conv2d._centre_tap_applies = lambda self, x: False  # type: ignore[method-assign]
    try:
        result = train(cfg, data, run_dir, resume=False)
    finally:
        models.Conv2d._centre_tap_applies = stock  # type: ignore[method-assign]
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    return {
        "convolution": "centre tap on 1x1 inputs" if centre_tap else "stock",
        "steps": result.step,
        "skipped_steps": last["skipped_steps"],
        "final_loss": round(last["loss"], 4),
        "images_per_s": round(result.images_per_s or 0.0, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fields = {k: v for k, v in DEMO_JOB.items() if k in TrainConfig.model_fields}
    cfg = TrainConfig.model_validate({**fields, "precision": "bf16"})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = demo_dataset(Settings(data_dir=Path(tmp)))  # the digits file `make up` writes
        if data is None:
            raise SystemExit("scikit-learn, which ships the digits, is not installed")
        for centre_tap in (False, True):
            rows.append(_run(cfg, data, Path(tmp) / f"run-{centre_tap}", centre_tap))
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
