"""Checkpoints of a run directory: written atomically, read without unpickling code.

A checkpoint holds only tensors, numbers, strings, lists and dicts (see docs/architecture.md),
so `torch.load(..., weights_only=True)` reads it: loading a run never executes its content.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.contract.atomic import write_atomic
from service.contract.train_config import TrainConfig
from trainer.models import Encoder

CHECKPOINT = Path("checkpoints") / "last.pt"


def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT


def atomic_write_json(path: str | Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write `state` with torch.save, atomically."""
    write_atomic(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with `weights_only=True` (tensors and plain containers only)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def rng_state() -> dict[str, Any]:
    """Every random generator a run draws from (torch, CUDA, numpy's global, Python's), as
    plain lists and tensors so that a `weights_only` checkpoint holds it."""
    np_state: Any = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, in order (docs/architecture.md lists their kinds)."""
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def load_encoder(run_dir: str | Path) -> tuple[Encoder, TrainConfig, dict[str, Any]]:
    """The encoder f of a run's last checkpoint (eval mode), its resolved config, and facts about it.

    info: `step`, `epoch`, `completed` (result.json exists), `checkpoint` (path), and `dataset`
    (what config.json recorded about the training data, or {}).
    """
    run_dir = Path(run_dir)
    path = checkpoint_path(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no checkpoint ({CHECKPOINT}); train first")
    state = load_checkpoint(path)
    cfg = TrainConfig.model_validate(state["config"]).resolved()
    encoder = Encoder(cfg.backbone, bool(cfg.small_stem))
    encoder.load_state_dict(state["encoder"])
    encoder.eval()
    config_json = run_dir / "config.json"
    dataset = json.loads(config_json.read_text()).get("dataset", {}) if config_json.is_file() else {}
    info = {
        "step": int(state["step"]),
        "epoch": int(state["epoch"]),
        "completed": (run_dir / "result.json").is_file(),
        "checkpoint": str(path),
        "dataset": dataset,
    }
    return encoder, cfg, info
