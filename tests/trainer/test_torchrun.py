"""`simclr-embed train` under torchrun: the engine joins torchrun's group instead of spawning.

The command is deploy/torchrun-multinode.sh itself (one node, two gloo processes on CPU, c10d
rendezvous on 127.0.0.1), so the deploy file is checked by running it, not by reading it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from test_engine import CLI_ARGS, REPO, TINY, _read_jsonl

from service.contract.ports import free_port
from service.contract.train_config import TrainConfig
from trainer import distributed
from trainer.checkpoint import checkpoint_path, load_checkpoint
from trainer.cli import main as cli_main
from trainer.engine import train

STEPS = 4
TORCHRUN_ENV = {
    "RANK": "0",
    "WORLD_SIZE": "1",
    "LOCAL_RANK": "0",
    "LOCAL_WORLD_SIZE": "1",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29500",
}


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in _read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def test_torchrun_launch_reads_the_launcher_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {
        **TORCHRUN_ENV,
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "TORCHELASTIC_RESTART_COUNT": "2",
    }.items():
        monkeypatch.setenv(key, value)
    assert distributed.torchrun_launch() == distributed.Launch(rank=5, world=8, local_rank=1, local_world=4, restart=2)
    monkeypatch.delenv("MASTER_PORT")
    assert distributed.torchrun_launch() is None  # not a launcher's environment: the engine spawns


def test_a_restarted_torchrun_group_resumes_its_run(
    tiny_npz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    for key, value in TORCHRUN_ENV.items():
        monkeypatch.setenv(key, value)
    argv = ["train", "--data", str(tiny_npz), "--out", str(tmp_path), *CLI_ARGS, "--epochs", "1"]
    assert cli_main([*argv, "--max-steps", "1"]) == 0
    assert cli_main([*argv, "--max-steps", "2"]) == 2  # the first attempt must not take over a run
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # torchrun restarted the group after a failure
    capsys.readouterr()
    assert cli_main([*argv, "--max-steps", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 2
    resumes = [r for r in _read_jsonl(tmp_path / "metrics.jsonl") if r.get("event") == "resume"]
    assert [r["step"] for r in resumes] == [1]  # the record also names the precision it resumed in


@pytest.mark.integration
@pytest.mark.slow
def test_torchrun_two_processes_match_the_engines_own_two_processes(tiny_npz: Path, tmp_path: Path) -> None:
    """Same world size, seed and batches: the same run, step for step.

    Both runs have 2 gloo ranks with the same per-rank seeds, samplers, thread counts and
    collectives; only how the processes were started and met differs. So the loss history and
    the final parameters must be identical, bit for bit. (A 1-process run is a different run:
    BatchNorm statistics and augmentation draws are per rank.)
    """
    spawned = tmp_path / "spawned"
    train(TrainConfig(epochs=1, max_steps=STEPS, cpu_processes=2, **TINY), tiny_npz, spawned)

    launched = tmp_path / "torchrun"
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k not in distributed.LAUNCHER_ENV}
    env.update(
        {
            "PATH": f"{venv_bin}:{env.get('PATH', '/usr/bin:/bin')}",
            "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1",
            "SIMCLR_EMBED_RDZV_HOST": "127.0.0.1",
            "SIMCLR_EMBED_RDZV_PORT": str(free_port()),
            "SIMCLR_EMBED_RDZV_ID": uuid.uuid4().hex,
            "SIMCLR_EMBED_NNODES": "1",
            "SIMCLR_EMBED_NPROC_PER_NODE": "2",
            "SIMCLR_EMBED_MAX_RESTARTS": "0",
        }
    )
    run = subprocess.run(
        [shutil.which("bash") or "/bin/bash", str(REPO / "deploy" / "torchrun-multinode.sh"),
         "--data", str(tiny_npz), "--out", str(launched), *CLI_ARGS, "--epochs", "1", "--max-steps", str(STEPS),
         "--cpu-processes", "2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout)["step"] == STEPS  # one result document: rank 0 alone prints it

    # Rank 0 alone writes: each step logged once, one result, a checkpoint of both ranks' RNGs.
    assert [step for step, _ in _losses(launched)] == list(range(1, STEPS + 1))
    assert _losses(launched) == _losses(spawned)
    assert json.loads((launched / "result.json").read_text())["step"] == STEPS
    assert (
        json.loads((launched / "config.json").read_text())["config"]
        == json.loads((spawned / "config.json").read_text())["config"]
    )
    expected, got = load_checkpoint(checkpoint_path(spawned)), load_checkpoint(checkpoint_path(launched))
    assert got["world_size"] == 2 and len(got["rng"]) == 2 and got["step"] == STEPS
    assert expected["method"].keys() == got["method"].keys()
    for key, value in expected["method"].items():
        assert torch.equal(got["method"][key], value), key
