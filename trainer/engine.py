"""The training loop: data -> two augmented views -> method -> loss -> optimiser, resumable.

One process per GPU (DDP over NCCL), or `cfg.cpu_processes` gloo processes without a GPU,
spawned here on one machine; or, under torchrun (several nodes), the processes torchrun
started, which join its rendezvous instead. Only rank 0 writes to the run directory.

The loader position is a function of the global optimiser step: epoch e shuffles the whole
dataset with a generator seeded by (seed, e), global batch b is images perm[bB:(b+1)B], and
rank r takes its contiguous share of it. So a checkpoint at step k resumes at the exact
next batch (and with the saved RNG states, the exact next augmentations).

Run directory layout and the callback contract: docs/architecture.md.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

from service.contract.defaults import Resolution, RunShape, resolve_run
from service.contract.ports import free_port
from service.contract.train_config import TrainConfig
from trainer import distributed
from trainer.checkpoint import (
    atomic_write_json,
    checkpoint_path,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from trainer.data import ImageDataset, open_dataset
from trainer.evaluate import KnnMonitor
from trainer.methods import build_method
from trainer.optim import build_optimizer, build_scheduler
from trainer.precision import resolve_precision
from trainer.sync_bn import convert_sync_batchnorm

ProgressCallback = Callable[[dict[str, Any]], None]
StopCallback = Callable[[], bool]

# Fields that may differ between a checkpoint's config and the config resuming it: they
# change how the run is executed or how long it lasts, not what it learns step by step.
RESUMABLE_CHANGES = frozenset(
    {
        "epochs",
        "max_steps",
        "num_workers",
        "devices",
        "cpu_processes",
        "checkpoint_every_steps",
        "log_every_steps",
        "compile",
        "knn_every_epochs",
        "precision",  # a resumed run continues on whatever this machine computes (trainer/precision.py)
    }
)


@dataclass(frozen=True)
class TrainResult:
    run_dir: str
    step: int
    total_steps: int
    epoch: int
    loss: float | None  # mean over ranks of the last logged window
    images_per_s: float  # over the steps this call ran
    wall_s: float
    stopped: bool


class GlobalBatchSampler(Sampler[list[int]]):
    """This rank's share of every global batch of one epoch, from batch `start` on (drop_last)."""

    def __init__(self, num_images: int, batch_size: int, rank: int, world: int, seed: int) -> None:
        self.num_images, self.batch_size, self.rank, self.world, self.seed = num_images, batch_size, rank, world, seed
        self.per_rank = batch_size // world
        self.epoch, self.start = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.num_images // self.batch_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.num_images, generator=g)  # [num_images]
        for b in range(self.start, self.batches_per_epoch):
            first = b * self.batch_size + self.rank * self.per_rank
            yield perm[first : first + self.per_rank].tolist()


DEFAULT_LOADER_WORKERS = 4


def loader_workers(requested: int | None, processes_here: int, cpus: int | None = None) -> int:
    """DataLoader workers for one training process: `requested`, or by default this process's
    share of the CPUs it may run on (`cpus`, default its affinity), at least 1 and at most 4, so
    that a 2-core host does not start 4 decoders per process to fight over 2 cores."""
    if requested is not None:
        return requested
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(DEFAULT_LOADER_WORKERS, cpus // max(1, processes_here)))


def training_loader(
    dataset: ImageDataset, cfg: TrainConfig, rank: int = 0, world: int = 1, cuda: bool = False
) -> tuple[DataLoader, GlobalBatchSampler]:
    """This rank's loader of training batches (frames uint8 [n, 3, Hc, Wc], sizes int64 [n, 2],
    ok bool [n]: trainer/data.py `training_frames`) and the sampler that positions it."""
    sampler = GlobalBatchSampler(len(dataset), cfg.batch_size, rank, world, cfg.seed)
    loader = DataLoader(
        dataset.training_frames(),
        batch_sampler=sampler,
        # every training process on this host (torchrun says how many; spawned ones are all here)
        num_workers=loader_workers(cfg.num_workers, int(os.environ.get("LOCAL_WORLD_SIZE", world))),
        pin_memory=cuda,
        # worker seeds come from here, not from the global RNG, so creating an iterator
        # mid-epoch on resume draws nothing from the state we restore
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    return loader, sampler


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _world(cfg: TrainConfig) -> tuple[int, bool]:
    """(number of processes, on CUDA?)."""
    if torch.cuda.is_available():
        available = torch.cuda.device_count()
        if cfg.devices is not None and cfg.devices > available:
            raise ValueError(f"devices={cfg.devices} but only {available} GPU(s) are visible")
        return cfg.devices or available, True
    return cfg.cpu_processes, False


def _config_changes(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """Fields whose value differs from the stored run's (a field the stored run predates is no change)."""
    now = cfg.model_dump(mode="json")
    return sorted(k for k in saved if k in now and k not in RESUMABLE_CHANGES and now[k] != saved[k])


def _resolution(cfg: TrainConfig, num_images: int, world: int, run_dir: Path, resume: bool) -> Resolution:
    """The run's defaults, decided once: a resumed run keeps those its checkpoint stored, the rest
    are decided for this run's data size and number of processes (service.contract.defaults)."""
    ckpt = checkpoint_path(run_dir)
    state = load_checkpoint(ckpt) if resume and ckpt.is_file() else None
    stored = None if state is None else state["config"]
    sources = None if state is None else state.get("defaults")
    return resolve_run(cfg, RunShape(num_images, world), stored, sources)


MAX_NONFINITE_STEPS = 10  # non-finite steps in a row after which a run has diverged


class TrainingDivergedError(RuntimeError):
    """The loss or its gradients stayed non-finite: the run cannot go on."""


def train(
    cfg: TrainConfig,
    data: str | Path,
    run_dir: str | Path,
    *,
    resume: bool = True,
    on_progress: ProgressCallback | None = None,
    should_stop: StopCallback | None = None,
) -> TrainResult:
    """Pretrain `cfg.method` on the images at `data`, writing checkpoints and logs to `run_dir`.

    With `resume` and a checkpoint in `run_dir`, continue from it (its config must match but for
    RESUMABLE_CHANGES); without `resume`, start over. Callbacks run on rank 0 (picklable when
    the run spawns processes). Returns after `epochs` or `max_steps`, or when `should_stop()`.

    Launched by torchrun, this process is one rank of torchrun's group (`devices` and
    `cpu_processes` are then torchrun's to decide) and every rank returns the run's result;
    `run_dir` must then be one folder that all nodes share.
    """
    run_dir = Path(run_dir)
    dataset = open_dataset(data, cfg.image_size)
    launch = distributed.torchrun_launch()
    world, cuda = _world(cfg) if launch is None else _launched_world(launch)
    cfg = cfg.model_copy(
        update={"precision": resolve_precision(cfg.precision, cuda, deterministic=cfg.deterministic)}
    )  # recorded resolved
    resolution = _resolution(cfg, len(dataset), world, run_dir, resume)
    cfg = resolution.config
    if launch is None or launch.rank == 0:
        print("training defaults decided for this run:", *resolution.describe(), sep="\n  ", file=sys.stderr)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the {world} training processes")
    if len(dataset) < cfg.batch_size:
        raise ValueError(f"the dataset has {len(dataset)} images, fewer than one batch ({cfg.batch_size})")
    knn = KnnMonitor(data, cfg.image_size) if cfg.knn_every_epochs else None  # unlabeled data fails here
    args = (world, cuda, cfg, dataset, knn, str(run_dir), on_progress, should_stop)
    prepare = partial(_prepare_run_dir, resolution, data, dataset, run_dir, resume)
    if launch is not None:
        return _run(launch.rank, *args, init_method="env://", processes_here=launch.local_world, prepare=prepare)
    prepare()
    if world == 1:
        return _run(0, *args, init_method="", processes_here=1)
    init_method = f"tcp://127.0.0.1:{free_port()}"
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_spawned, args=(*args, init_method, queue), nprocs=world, start_method="spawn")
    return TrainResult(**queue.get())


def _launched_world(launch: distributed.Launch) -> tuple[int, bool]:
    """(number of processes, on CUDA?) of a torchrun launch: one process per GPU of each node."""
    if not torch.cuda.is_available():
        return launch.world, False
    if launch.local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"LOCAL_RANK {launch.local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
            "start at most one process per GPU (torchrun --nproc-per-node gpu)"
        )
    return launch.world, True


def _prepare_run_dir(
    resolution: Resolution, data: str | Path, dataset: ImageDataset, run_dir: Path, resume: bool
) -> None:
    """Check a checkpoint to resume against the run's config (or drop it), and record the config
    with the source of each default it decided."""
    cfg = resolution.config
    ckpt = checkpoint_path(run_dir)
    if resume and ckpt.is_file():
        changed = _config_changes(load_checkpoint(ckpt)["config"], cfg)
        if changed:
            raise ValueError(
                f"{run_dir} holds a run with a different config ({', '.join(changed)}); "
                "resume with the same config or use another run directory"
            )
    elif ckpt.exists():
        ckpt.unlink()
    if not resume:
        (run_dir / "result.json").unlink(missing_ok=True)
    atomic_write_json(
        run_dir / "config.json",
        {
            "config": cfg.model_dump(mode="json"),
            "defaults": resolution.sources,
            "data": str(data),
            "dataset": dataset.describe(),
        },
    )


def _spawned(rank: int, *args: Any) -> None:
    *run_args, init_method, queue = args
    world = run_args[0]
    result = _run(rank, *run_args, init_method=init_method, processes_here=world)
    if rank == 0:
        queue.put(asdict(result))


def _run(
    rank: int,
    world: int,
    cuda: bool,
    cfg: TrainConfig,
    dataset: ImageDataset,
    knn: KnnMonitor | None,
    run_dir: str,
    on_progress: ProgressCallback | None,
    should_stop: StopCallback | None,
    *,
    init_method: str,
    processes_here: int,
    prepare: Callable[[], None] | None = None,
) -> TrainResult:
    """One rank's run; `prepare` (rank 0 only, before any rank reads the run directory) if given."""
    if world > 1 and not cuda:  # the CPU processes on this machine share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // processes_here))
    with distributed.process_group(rank, world, "nccl" if cuda else "gloo", init_method):
        if prepare is not None:
            distributed.main_first(prepare)
        knn = knn if rank == 0 else None
        return _Trainer(rank, world, cuda, cfg, dataset, knn, Path(run_dir), on_progress, should_stop).run()


class _Trainer:
    """Everything one process holds during a run."""

    def __init__(
        self,
        rank: int,
        world: int,
        cuda: bool,
        cfg: TrainConfig,
        dataset: ImageDataset,
        knn: KnnMonitor | None,
        run_dir: Path,
        on_progress: ProgressCallback | None,
        should_stop: StopCallback | None,
    ) -> None:
        from trainer.transforms import SimCLRAugment  # the data side's module, loaded with the run

        self.rank, self.world, self.cfg, self.run_dir = rank, world, cfg, run_dir
        self.is_main = rank == 0
        self.on_progress, self.should_stop = on_progress, should_stop
        self.knn = knn
        self.knn_top1: float | None = None  # the monitor runs on rank 0 only
        self.device = (
            torch.device("cuda", torch.cuda.current_device() if world > 1 else 0) if cuda else torch.device("cpu")
        )
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = cuda and not cfg.deterministic
        bf16 = cfg.precision == "bf16"  # resolved by train(): "fp32" or "bf16"
        # channels-last is where oneDNN's bf16 convolutions are fastest on CPU (2.6x fp32 with it,
        # 2.2x without, issue 16); CPU fp32 keeps the contiguous layout.
        self.channels_last = cfg.channels_last and (cuda or bf16)
        self.precision_warning: str | None = None
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)

        _seed_all(cfg.seed)  # identical initial weights on every rank
        self.method = build_method(cfg).to(self.device)
        if self.channels_last:
            self.method = self.method.to(memory_format=torch.channels_last)
        if cfg.sync_bn and world > 1:
            self.method = convert_sync_batchnorm(self.method, cuda)
        model: nn.Module = self.method
        if world > 1:
            model = DistributedDataParallel(self.method, device_ids=[self.device.index] if cuda else None)
        self.model = torch.compile(model) if cfg.compile else model

        self.loader, self.sampler = training_loader(dataset, cfg, rank, world, cuda)
        self.steps_per_epoch = self.sampler.batches_per_epoch
        self.total_steps = self.steps_per_epoch * cfg.epochs
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.optimizer = build_optimizer(self.method, cfg)
        self.scheduler = build_scheduler(
            self.optimizer, self.total_steps, round((cfg.warmup_epochs or 0.0) * self.steps_per_epoch)
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=False)  # bf16 needs no loss scaling
        aug_device = self.device if cfg.augment.device == "auto" else torch.device(cfg.augment.device)
        self.aug_device = aug_device
        self.augments = [SimCLRAugment(a, cfg.image_size).to(aug_device) for a in self.method.views_augment()]

        _seed_all(cfg.seed * 1_000_003 + 1 + rank)  # each rank draws its own augmentations
        self.step = 0
        self.masked_images = 0  # slots of images that failed to decode, over all ranks and workers
        self.skipped_steps = 0  # optimiser steps skipped for a non-finite loss or gradient
        self.nonfinite_run = 0  # of them, in a row up to now
        self.defaults = self._decided_defaults() if self.is_main else {}
        self._resume()

    def _decided_defaults(self) -> dict[str, dict[str, Any]]:
        """{field: {"value", "source"}} of the defaults decided for this run (its config.json)."""
        sources = json.loads((self.run_dir / "config.json").read_text()).get("defaults", {})
        resolution = Resolution(self.cfg, sources)
        return {name: {"value": resolution.value(name), "source": src} for name, src in sources.items()}

    # --- checkpoints ---------------------------------------------------------------------

    @property
    def _ckpt(self) -> Path:
        return checkpoint_path(self.run_dir)

    def _resume(self) -> None:
        if self._ckpt.is_file():
            self._load(load_checkpoint(self._ckpt))  # on CPU: RNG states must stay there
        if self.world > 1:
            steps: list[Any] = [None] * self.world
            dist.all_gather_object(steps, self.step)
            if len(set(steps)) > 1:  # every rank raises: none is left waiting in a collective
                raise ValueError(
                    f"the ranks found checkpoints at different steps {steps} in {self.run_dir}; "
                    "the run directory must be one folder shared by every node"
                )

    def _load(self, state: dict[str, Any]) -> None:
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.masked_images = int(state.get("masked_images", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if self.rank < len(state["rng"]):
            set_rng_state(state["rng"][self.rank])
        self.step = int(state["step"])
        trained_in = state["config"].get("precision")
        if trained_in != self.cfg.precision:
            self.precision_warning = (
                f"resumed at step {self.step} in {self.cfg.precision}; the steps before were trained in {trained_in} "
                "(precision auto is bf16 only on CUDA or a CPU with AMX / AVX512_BF16)"
            )
            if self.is_main:
                warnings.warn(self.precision_warning, stacklevel=2)
        self._log({"event": "resume", "step": self.step, "precision": self.cfg.precision})

    def _save(self) -> None:
        rng = rng_state()
        rngs: list[Any] = [rng]
        if self.world > 1:
            rngs = [None] * self.world
            dist.all_gather_object(rngs, rng)
        if not self.is_main:
            return
        save_checkpoint(
            self._ckpt,
            {
                "method": self.method.state_dict(),
                "encoder": self.method.encoder.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": rngs,
                "epoch": self.step // self.steps_per_epoch,
                "batch": self.step % self.steps_per_epoch,
                "step": self.step,
                "world_size": self.world,
                "masked_images": self.masked_images,
                "skipped_steps": self.skipped_steps,
                "config": self.cfg.model_dump(mode="json"),
                "defaults": {name: d["source"] for name, d in self.defaults.items()},
            },
        )

    # --- logging -------------------------------------------------------------------------

    def _log(self, record: dict[str, Any]) -> None:
        if self.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    # --- the loop ------------------------------------------------------------------------

    def _train_step(self, frames: torch.Tensor, sizes: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        """One optimiser step on uint8 frames [n, 3, Hc, Wc] of sizes [n, 2], `ok` [n] False for a
        masked slot; returns the detached local loss."""
        self.method.on_before_step(self.step, self.total_steps)
        with torch.no_grad():
            x = frames.to(self.aug_device, non_blocking=True)
            views = [aug(x, sizes).to(self.device, non_blocking=True) for aug in self.augments]  # 2 x [n, 3, S, S]
            if self.channels_last:
                views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        valid = None if bool(ok.all()) else ok.to(self.device)
        with self.autocast:
            loss = self.model(*views, valid=valid)
        self.optimizer.zero_grad(set_to_none=True)
        self.lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        self.scaler.scale(loss).backward()
        if self._gradients_finite():
            self.scaler.step(self.optimizer)
            self.nonfinite_run = 0
        else:  # a non-finite step would put NaN in every weight: skip it, and give up if it persists
            self.skipped_steps += 1
            self.nonfinite_run += 1
            if self.nonfinite_run >= MAX_NONFINITE_STEPS:
                raise TrainingDivergedError(
                    f"the loss or its gradients were not finite for {self.nonfinite_run} steps in a row "
                    f"(step {self.step}, precision {self.cfg.precision}, lr {self.lr:.3g}); "
                    "train again with a lower base_lr, or with precision fp32"
                )
        self.scaler.update()
        self.scheduler.step()
        self.method.on_after_optimizer_step(self.step, self.total_steps)
        return loss.detach()

    def _gradients_finite(self) -> bool:
        """Whether every gradient is finite (the same answer on every rank: DDP has averaged them)."""
        grads = [p.grad for p in self.method.parameters() if p.grad is not None]
        return not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))

    def run(self) -> TrainResult:
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        cfg, spe = self.cfg, self.steps_per_epoch
        writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=self.step) if self.is_main else None
        # On a terminal the bar redraws in place; into a log (a worker's) one line every 10 s is enough.
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            disable=not self.is_main,
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
            mininterval=0.1 if sys.stderr.isatty() else 10.0,
        )
        self.method.train()
        start_step, started = self.step, time.perf_counter()
        window_loss, window_steps, window_start = torch.zeros((), device=self.device), 0, started
        window_masked = torch.zeros((), device=self.device)
        last_loss: float | None = None
        stopped = False
        try:
            while self.step < self.total_steps and not stopped:
                self.sampler.set_epoch(self.step // spe, start=self.step % spe)
                for frames, sizes, ok in self.loader:
                    window_loss += self._train_step(frames, sizes, ok)
                    window_masked += int((~ok).sum())
                    window_steps += 1
                    self.step += 1
                    bar.update(1)
                    if self.should_stop is not None:
                        stopped = distributed.broadcast_flag(self.is_main and bool(self.should_stop()), self.device)
                    done = self.step >= self.total_steps
                    if self.knn is not None and self.step % spe == 0 and (self.step // spe) % cfg.knn_every_epochs == 0:
                        self._monitor_knn(writer)
                    if self.step % cfg.log_every_steps == 0 or done or stopped:
                        last_loss = float(distributed.all_reduce_mean(window_loss / window_steps))
                        self.masked_images += round(float(distributed.all_reduce_mean(window_masked)) * self.world)
                        window_masked.zero_()
                        now = time.perf_counter()
                        rate = window_steps * cfg.batch_size / (now - window_start)
                        record = {
                            "epoch": self.step // spe,
                            "step": self.step,
                            "total_steps": self.total_steps,
                            "loss": last_loss,
                            "lr": self.lr,
                            "images_per_s": rate,
                            "eta_s": (self.total_steps - self.step) * cfg.batch_size / rate,
                            "knn_top1": self.knn_top1,
                            "masked_images": self.masked_images,
                            "skipped_steps": self.skipped_steps,
                            "precision": cfg.precision,
                            "warning": self.precision_warning,
                        }
                        self._report(record, writer, bar)
                        window_loss.zero_()
                        window_steps, window_start = 0, now
                    if stopped or done or self.step % spe == 0 or self.step % cfg.checkpoint_every_steps == 0:
                        self._save()
                    if stopped or done:
                        break
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        wall = time.perf_counter() - started
        result = TrainResult(
            run_dir=str(self.run_dir),
            step=self.step,
            total_steps=self.total_steps,
            epoch=self.step // spe,
            loss=last_loss,
            images_per_s=(self.step - start_step) * cfg.batch_size / max(wall, 1e-9),
            wall_s=wall,
            stopped=stopped,
        )
        if self.is_main and not stopped:
            atomic_write_json(self.run_dir / "result.json", asdict(result))
        return result

    def _monitor_knn(self, writer: Any) -> None:
        """kNN top-1 of h at an epoch's end (rank 0; h in eval mode, train mode restored)."""
        assert self.knn is not None
        self.knn_top1 = self.knn(self.method.encoder, self.device)
        self._log(
            {
                "event": "knn",
                "epoch": self.step // self.steps_per_epoch,
                "step": self.step,
                "knn_top1": self.knn_top1,
                "time": time.time(),
            }
        )
        writer.add_scalar("eval/knn_top1", self.knn_top1, self.step)

    def _report(self, record: dict[str, Any], writer: Any, bar: Any) -> None:
        if not self.is_main:
            return
        self._log({k: v for k, v in record.items() if v is not None} | {"time": time.time()})
        for key in ("loss", "lr", "images_per_s"):
            writer.add_scalar(f"train/{key}", record[key], record["step"])
        knn: dict[str, str] = {} if self.knn_top1 is None else {"knn": f"{self.knn_top1:.3f}"}
        bar.set_postfix(
            loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.3g}", img_s=f"{record['images_per_s']:.0f}", **knn
        )
        if self.on_progress is not None:
            self.on_progress({**record, "defaults": self.defaults})
