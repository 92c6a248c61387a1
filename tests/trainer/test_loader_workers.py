"""The training loader's default worker count follows this process's share of the CPUs."""

from __future__ import annotations

import os

import numpy as np
import pytest

from service.contract.train_config import TrainConfig
from trainer.data import open_dataset
from trainer.engine import loader_workers, training_loader


@pytest.mark.parametrize(
    ("cpus", "processes", "expected"),
    [(2, 1, 2), (1, 1, 1), (16, 1, 4), (8, 4, 2), (6, 4, 1), (2, 8, 1), (64, 2, 4)],
)
def test_default_is_the_share_of_cpus_between_1_and_4(cpus: int, processes: int, expected: int) -> None:
    assert loader_workers(None, processes, cpus=cpus) == expected


@pytest.mark.parametrize("requested", [0, 3, 12])
def test_an_explicit_count_is_kept(requested: int) -> None:
    assert loader_workers(requested, 1, cpus=2) == requested


def test_training_loader_takes_the_default_from_this_machine(tmp_path) -> None:
    path = tmp_path / "tiny.npz"
    np.savez(path, images=np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    dataset = open_dataset(path, 16)
    cpus = len(os.sched_getaffinity(0))
    loader, _ = training_loader(dataset, TrainConfig(image_size=16, batch_size=4))
    assert loader.num_workers == max(1, min(4, cpus))
    loader, _ = training_loader(dataset, TrainConfig(image_size=16, batch_size=4, num_workers=0))
    assert loader.num_workers == 0
