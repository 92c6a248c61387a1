"""Self-supervised methods; `build_method(cfg)` picks one by `cfg.method`.

To add a method, subclass `trainer.methods.base.Method` in its own module and add one line
to `METHODS` (name -> "module:Class"; imported lazily so one method's deps never load another's).
"""

from __future__ import annotations

import importlib

from service.contract.train_config import TrainConfig
from trainer.methods.base import Method

METHODS: dict[str, str] = {
    "simclr": "trainer.methods.simclr:SimCLR",
    "moco_v2": "trainer.methods.moco:MoCoV2",
    "byol": "trainer.methods.byol:BYOL",
}


def build_method(cfg: TrainConfig) -> Method:
    """A fresh method for the resolved `cfg`."""
    cfg = cfg.resolved()
    if cfg.method not in METHODS:
        raise ValueError(f"method {cfg.method!r} is not available; choose from {sorted(METHODS)}")
    module, _, name = METHODS[cfg.method].partition(":")
    return getattr(importlib.import_module(module), name)(cfg)


__all__ = ["METHODS", "Method", "build_method"]
