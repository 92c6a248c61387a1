"""The training loop: run directory contract, stop and resume, exact resume after SIGKILL, DDP on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.contract import defaults
from service.contract.train_config import TrainConfig
from trainer.checkpoint import checkpoint_path, load_checkpoint, load_encoder
from trainer.cli import main as cli_main
from trainer.data import DatasetError
from trainer.engine import GlobalBatchSampler, train
from trainer.evaluate import evaluate_encoder
from trainer.precision import resolve_precision

REPO = Path(__file__).resolve().parents[2]
# 48 images / batch 8 = 6 steps an epoch; the standard stem keeps a 16 px ResNet-18 step cheap.
# The tests compare runs bit for bit, so they ask for a deterministic run (fp32 on a CPU with
# native bf16: oneDNN's bf16 backward is not bitwise reproducible, trainer/precision.py).
TINY = dict(
    deterministic=True,
    image_size=16,
    small_stem=False,
    batch_size=8,
    num_workers=0,
    warmup_epochs=1.0,
    seed=3,
    log_every_steps=1,
    checkpoint_every_steps=4,
)
CLI_ARGS = [
    "--deterministic",
    "--image-size",
    "16",
    "--no-small-stem",
    "--batch-size",
    "8",
    "--num-workers",
    "0",
    "--warmup-epochs",
    "1",
    "--seed",
    "3",
    "--log-every-steps",
    "1",
    "--checkpoint-every-steps",
    "4",
]


class StopAfter:
    """should_stop() that answers True on its k-th call (picklable, as train() requires)."""

    def __init__(self, k: int) -> None:
        self.k, self.calls = k, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls >= self.k


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_global_batches_partition_each_epoch() -> None:
    n, batch, world = 50, 8, 2
    shares = [GlobalBatchSampler(n, batch, r, world, seed=1) for r in range(world)]
    epoch0 = [list(s) for s in shares]
    assert all(len(b) == batch // world for rank in epoch0 for b in rank)
    flat = [i for b in range(6) for rank in epoch0 for i in rank[b]]
    assert len(flat) == 48 == len(set(flat))  # 6 full global batches, no image twice, drop_last
    for s in shares:
        s.set_epoch(0, start=4)
    assert [list(s) for s in shares] == [rank[4:] for rank in epoch0]  # resume mid-epoch: the exact tail
    for s in shares:
        s.set_epoch(1)
    assert [list(s) for s in shares] != epoch0  # a fresh shuffle each epoch


def test_stop_then_resume_and_run_dir_contract(tiny_npz: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=2, **TINY)
    progress: list[dict] = []
    stopped = train(cfg, tiny_npz, tmp_path, on_progress=progress.append, should_stop=StopAfter(3))
    assert stopped.stopped and stopped.step == 3 and stopped.total_steps == 12
    assert load_checkpoint(checkpoint_path(tmp_path))["step"] == 3
    assert not (tmp_path / "result.json").exists()
    assert [p["step"] for p in progress] == [1, 2, 3]
    assert set(progress[0]) == {
        *("epoch", "step", "total_steps", "loss", "lr", "images_per_s", "eta_s", "knn_top1"),
        *("masked_images", "skipped_steps", "defaults", "precision", "warning"),
    }
    assert progress[0]["knn_top1"] is None  # the monitor is off by default
    assert progress[0]["masked_images"] == 0 and progress[0]["skipped_steps"] == 0
    assert progress[0]["defaults"]["base_lr"] == {"value": 1.2, "source": progress[0]["defaults"]["base_lr"]["source"]}
    assert "B.1" in progress[0]["defaults"]["base_lr"]["source"] and "warmup_epochs" not in progress[0]["defaults"]
    ran_in = resolve_precision("auto", cuda=False, deterministic=True)  # how this machine resolves auto here
    assert progress[0]["precision"] == ran_in and progress[0]["warning"] is None

    done = train(cfg, tiny_npz, tmp_path, on_progress=progress.append)
    assert not done.stopped and done.step == 12 and done.epoch == 2
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["step"] == 12 and result["stopped"] is False
    records = _read_jsonl(tmp_path / "metrics.jsonl")
    assert {"event": "resume", "step": 3, "precision": ran_in} in records
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 13))
    # The warm-up (1 epoch = 6 steps) rises linearly to the peak lr, the square-root rule's
    # 0.075 * sqrt(8) at batch 8 (the default), then decays.
    lrs = {r["step"]: r["lr"] for r in records if "lr" in r}
    peak = 0.075 * 8**0.5
    assert lrs[1] == pytest.approx(peak / 6) and lrs[6] == pytest.approx(peak) == lrs[7]
    assert lrs[12] < lrs[8] < peak
    config = json.loads((tmp_path / "config.json").read_text())
    resolved = cfg.resolved(num_images=48).model_copy(update={"precision": ran_in})  # recorded resolved, not "auto"
    assert config["config"] == resolved.model_dump(mode="json")
    assert config["defaults"] == {k: v["source"] for k, v in progress[0]["defaults"].items()}
    assert config["dataset"]["num_images"] == 48 and config["data"] == str(tiny_npz)
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())

    state = load_checkpoint(checkpoint_path(tmp_path))  # weights_only=True inside
    assert {"method", "optimizer", "scheduler", "scaler", "rng", "epoch", "step", "config", "encoder"} <= set(state)
    assert (state["epoch"], state["step"]) == (2, 12)
    encoder, loaded_cfg, info = load_encoder(tmp_path)
    assert loaded_cfg == resolved and info["completed"] and info["step"] == 12
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, state["method"][f"encoder.{key}"])


def test_knn_monitor_scores_the_encoder_each_epoch_without_changing_the_run(tiny_npz: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=2, **{**TINY, "checkpoint_every_steps": 6})
    progress: list[dict] = []
    train(cfg.model_copy(update={"knn_every_epochs": 1}), tiny_npz, tmp_path / "monitored", on_progress=progress.append)
    train(cfg, tiny_npz, tmp_path / "plain")

    events = [r for r in _read_jsonl(tmp_path / "monitored" / "metrics.jsonl") if r.get("event") == "knn"]
    assert [(e["epoch"], e["step"]) for e in events] == [(1, 6), (2, 12)]
    # The last reading is the kNN of the saved encoder, scored afresh by the evaluation protocol.
    encoder, _, _ = load_encoder(tmp_path / "monitored")
    assert events[-1]["knn_top1"] == evaluate_encoder(encoder, tiny_npz, 16)["knn_top1"]
    assert [p["knn_top1"] for p in progress if p["step"] in (5, 6, 12)] == [
        None,
        events[0]["knn_top1"],
        events[1]["knn_top1"],
    ]
    # Scoring runs in eval mode and draws no random numbers: the run itself is unchanged.
    monitored, plain = (load_checkpoint(checkpoint_path(tmp_path / d))["method"] for d in ("monitored", "plain"))
    for key, value in plain.items():
        assert torch.equal(value, monitored[key]), key


def test_knn_monitor_on_unlabeled_data_fails_before_training(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i in range(8):
        Image.fromarray(np.full((16, 16, 3), 30 * i, np.uint8)).save(images / f"{i}.png")
    with pytest.raises(DatasetError, match="no labels"):
        train(TrainConfig(epochs=1, knn_every_epochs=1, **TINY), images, tmp_path / "run")
    assert not checkpoint_path(tmp_path / "run").exists()


def test_resume_rejects_a_different_config(tiny_npz: Path, tmp_path: Path) -> None:
    train(TrainConfig(epochs=1, max_steps=1, **TINY), tiny_npz, tmp_path)
    with pytest.raises(ValueError, match="temperature"):  # the run decided 0.2
        train(TrainConfig(epochs=1, temperature=0.3, **TINY), tiny_npz, tmp_path)
    # epochs and max_steps may change: the run goes on longer.
    assert train(TrainConfig(epochs=1, max_steps=2, **TINY), tiny_npz, tmp_path).step == 2


def test_a_three_epoch_run_reaches_its_peak_rate_and_decays_to_near_zero(tiny_npz: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=3, **{k: v for k, v in TINY.items() if k != "warmup_epochs"})  # warm-up: the default
    train(cfg, tiny_npz, tmp_path)
    lrs = [r["lr"] for r in _read_jsonl(tmp_path / "metrics.jsonl") if "lr" in r]  # one per step
    peak = 0.075 * 8**0.5  # the square-root rule at batch 8
    assert len(lrs) == 18  # 6 steps an epoch
    # Warm-up: 10% of the run (0.3 epochs = 2 steps), not the paper's 10 epochs; then cosine to ~0.
    assert lrs[0] == pytest.approx(peak / 2) and lrs[1] == pytest.approx(peak) == max(lrs)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False))
    assert lrs[-1] < 0.01 * peak


def test_a_resumed_run_keeps_its_stored_defaults_after_the_rules_change(
    tiny_npz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = TrainConfig(epochs=2, **TINY)  # base_lr, lr_scaling, temperature, ... left to the defaults
    assert train(cfg, tiny_npz, tmp_path, should_stop=StopAfter(3)).stopped
    started = load_checkpoint(checkpoint_path(tmp_path))["config"]
    assert (started["lr_scaling"], started["base_lr"], started["temperature"]) == ("sqrt", 1.2, 0.2)
    # New rules: the linear rule at every batch size, and another temperature.
    monkeypatch.setattr(defaults, "SQRT_RULE_MAX_BATCH", 1)
    monkeypatch.setattr(defaults, "LONG_RUN_EPOCHS", 1)
    fresh = cfg.resolved(num_images=48)
    assert (fresh.lr_scaling, fresh.base_lr, fresh.temperature) == ("linear", 0.3, 0.5)
    done = train(cfg, tiny_npz, tmp_path)  # not refused
    assert (done.step, done.stopped) == (12, False)
    state = load_checkpoint(checkpoint_path(tmp_path))
    assert state["config"] == started
    assert state["defaults"]["base_lr"].startswith("SimCLR App. B.1")
    lrs = [r["lr"] for r in _read_jsonl(tmp_path / "metrics.jsonl") if "lr" in r]
    assert max(lrs) == pytest.approx(1.2 * (8 / 256) ** 0.5)  # the stored peak, never the new rule's


def test_cli_config_file_and_overwrite_guard(tiny_npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text("epochs: 1\nmax_steps: 1\ntemperature: 0.25\naugment:\n  crop_min_scale: 0.3\n")
    out = tmp_path / "run"
    argv = [
        "train",
        "--data",
        str(tiny_npz),
        "--out",
        str(out),
        "--config",
        str(config),
        *CLI_ARGS,
        "--augment.hflip-prob",
        "0.0",
    ]
    assert cli_main(argv) == 0
    saved = json.loads((out / "config.json").read_text())["config"]
    assert (saved["temperature"], saved["augment"]["crop_min_scale"], saved["augment"]["hflip_prob"]) == (
        0.25,
        0.3,
        0.0,
    )
    assert json.loads(capsys.readouterr().out)["step"] == 1
    assert cli_main(argv) == 2  # a run is there: no silent overwrite without --resume
    assert "--resume" in capsys.readouterr().err
    assert cli_main(["train", "--data", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "x")]) == 2


def _cli(out: Path, data: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "trainer.cli",
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        *CLI_ARGS,
        "--epochs",
        "2",
        "--augment.blur",
        *extra,
    ]


@pytest.mark.integration
@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tiny_npz: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = lambda out, *extra: subprocess.run(
        _cli(out, tiny_npz, *extra),
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    full = run(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-2000:]

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        _cli(killed_dir, tiny_npz), env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpt = checkpoint_path(killed_dir)
    deadline = time.monotonic() + 300
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = load_checkpoint(ckpt)["step"]
    assert 0 < killed_at < 12 and not (killed_dir / "result.json").exists()

    resumed = run(killed_dir, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    resumes = [r for r in _read_jsonl(killed_dir / "metrics.jsonl") if r.get("event") == "resume"]
    assert [r["step"] for r in resumes] == [killed_at]
    expected, got = load_checkpoint(checkpoint_path(tmp_path / "full")), load_checkpoint(ckpt)
    assert got["step"] == expected["step"] == 12
    assert expected["method"].keys() == got["method"].keys()
    for key, value in expected["method"].items():
        torch.testing.assert_close(
            got["method"][key], value, rtol=1e-6, atol=1e-6, msg=f"{key} (killed at {killed_at})"
        )


@pytest.mark.integration
@pytest.mark.slow
def test_two_cpu_processes_train_with_ddp(tiny_npz: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=1, max_steps=2, cpu_processes=2, **TINY)  # global BN: the default with 2 processes
    result = train(cfg, tiny_npz, tmp_path, should_stop=StopAfter(100))
    assert (result.step, result.stopped) == (2, False)
    state = load_checkpoint(checkpoint_path(tmp_path))
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # ranks draw their own views


def test_auto_precision_is_recorded_and_a_resume_without_bf16_continues_in_fp32(
    tiny_npz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The CPU's flags decide `auto`; these runs present a Sapphire Rapids' flags, then an EPYC's.
    monkeypatch.setattr("trainer.precision.host_cpu_flags", lambda: frozenset({"avx2", "avx512_bf16", "amx_bf16"}))
    cfg = TrainConfig(epochs=1, **{**TINY, "deterministic": False})  # a deterministic run takes fp32
    progress: list[dict] = []
    train(cfg, tiny_npz, tmp_path, on_progress=progress.append, should_stop=StopAfter(2))
    assert json.loads((tmp_path / "config.json").read_text())["config"]["precision"] == "bf16"
    assert load_checkpoint(checkpoint_path(tmp_path))["config"]["precision"] == "bf16"
    assert [(p["precision"], p["warning"]) for p in progress] == [("bf16", None)] * 2

    monkeypatch.setattr("trainer.precision.host_cpu_flags", lambda: frozenset({"avx2"}))
    with pytest.warns(UserWarning, match="resumed at step 2 in fp32; the steps before were trained in bf16"):
        done = train(cfg, tiny_npz, tmp_path, on_progress=progress.append)  # not refused
    assert done.step == 6 and not done.stopped
    assert {p["precision"] for p in progress[2:]} == {"fp32"}
    assert all(p["warning"] and "trained in bf16" in p["warning"] for p in progress[2:])
    assert load_checkpoint(checkpoint_path(tmp_path))["config"]["precision"] == "fp32"
    _, loaded_cfg, _ = load_encoder(tmp_path)
    assert loaded_cfg.precision == "fp32"  # what the model card's train_config will say
