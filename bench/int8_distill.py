"""What quantisation-aware distillation of the int8 variant buys: its output against fp32's.

The fp32 encoder stays the reference (the published model). A copy with its BatchNorms folded
(the student) is fine-tuned for a few hundred steps with the variant's rounding simulated in
its forward pass (int8_error_budget: per-channel weights on ONNX Runtime's 7-bit grid, uint8
per-tensor activations at the tensors the QDQ graph quantises, min-max ranges recalibrated on
the 256 calibration images every `--recalibrate` steps), gradients straight through the
rounding, loss = mean (1 - cosine) to the reference's unit embedding of the same image (random
horizontal flips of the 4,000 train images that are not held out). Then both the reference and
the student are quantised by `trainer.export.quantize_int8` on the same calibration images and
compared with the fp32 reference: mean (1 - cosine) on the 1,000 held-out train images, kNN
top-1 and recall@10 as bench/int8_quality.py measures them (memory cifar10-5k's 5,000 train
images, queries the 10,000 test JPEGs).

    .venv/bin/python bench/int8_distill.py --run /tmp/run3 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from int8_error_budget import REDUCED, ActivationPoints, fold_batchnorms, quantise_weight
from int8_quality import embed, recall_at

from service.contract.variants import INT8
from trainer.data import labeled_arrays, open_labeled
from trainer.evaluate import knn_top1
from trainer.export import EmbeddingGraph, _torch_export, load_encoder, quantize_int8, reference_embed, reference_input

SHARED = REPO.parent / "shared" / "data"


@contextmanager
def fake_quantised(net: nn.Module, points: ActivationPoints) -> Iterator[None]:
    """`net` runs with the variant's rounding, gradients straight through it."""
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:
        conv.forward = lambda x, c=conv: c._conv_forward(  # type: ignore[method-assign]
            x, c.weight + (quantise_weight(c.weight.detach(), REDUCED) - c.weight).detach(), c.bias
        )
    hooks = points.rounding(straight_through=True)
    try:
        yield
    finally:
        for conv in convs:
            del conv.forward
        for h in hooks:
            h.remove()


def distil(
    student: nn.Module, teacher: nn.Module, pool: np.ndarray, calibration: np.ndarray, args: argparse.Namespace
) -> list[dict[str, float]]:
    """Fine-tune `student` in place; returns the loss every `args.recalibrate` steps."""
    x_pool = reference_input(pool)  # [P, 3, S, S]
    with torch.no_grad():
        targets = [nn.functional.normalize(teacher(x), dim=1) for x in (x_pool, x_pool.flip(3))]  # 2 x [P, D]
    points = ActivationPoints(student)
    points.calibrate(student, reference_input(calibration))
    optimiser = torch.optim.Adam(student.parameters(), lr=args.lr)
    rng = torch.Generator().manual_seed(0)
    log, started = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(pool), (args.batch,), generator=rng)
        flip = torch.rand(args.batch, generator=rng) < 0.5  # [B]
        x = torch.where(flip[:, None, None, None], x_pool[idx].flip(3), x_pool[idx])  # [B, 3, S, S]
        target = torch.where(flip[:, None], targets[1][idx], targets[0][idx])  # [B, D]
        with fake_quantised(student, points):
            out = nn.functional.normalize(student(x), dim=1)  # [B, D]
        loss = (1 - (out * target).sum(dim=1)).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % args.recalibrate == 0:
            points.ranges = {}
            points.calibrate(student, reference_input(calibration))
            log.append({"step": step, "loss": loss.item(), "s": round(time.perf_counter() - started, 1)})
            print(log[-1], flush=True)
    return log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a trained run directory (CIFAR-10)")
    parser.add_argument("--data", type=Path, default=SHARED / "cifar10-5k.npz")
    parser.add_argument("--test-folder", type=Path, default=Path("/tmp/cifar10-jpeg"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--recalibrate", type=int, default=50, help="steps between activation range updates")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    teacher, cfg, _ = load_encoder(args.run)
    teacher.eval()
    student = copy.deepcopy(teacher)
    fold_batchnorms(student)
    images, labels = labeled_arrays(open_labeled(args.data, "train", cfg.image_size))  # uint8 [5000, S, S, 3]
    x_test, y_test = labeled_arrays(open_labeled(args.test_folder, "test", cfg.image_size))
    calibration, held_out, pool = images[:256], images[-1000:], images[:-1000]
    reference = reference_embed(teacher, held_out)  # float64 [1000, D]
    log = distil(student, teacher, pool, calibration, args)
    result: dict[str, object] = {"run": str(args.run), "steps": args.steps, "lr": args.lr, "log": log}
    with tempfile.TemporaryDirectory() as tmp:
        files = {name: Path(tmp) / f"{name}.onnx" for name in ("fp32", "stock", "distilled")}
        example = torch.from_numpy(images[:2])
        _torch_export(EmbeddingGraph(teacher).eval(), example, files["fp32"])
        student_fp32 = Path(tmp) / "student.onnx"
        _torch_export(EmbeddingGraph(student).eval(), example, student_fp32)
        quantize_int8(files["fp32"], files["stock"], calibration)
        quantize_int8(student_fp32, files["distilled"], calibration)
        memory = {name: embed(path, images, args.threads)[0] for name, path in files.items()}
        queries = {name: embed(path, x_test, args.threads)[0] for name, path in files.items()}
        held = {name: embed(path, held_out, args.threads)[0] for name, path in files.items()}
    for name in ("stock", "distilled"):
        result[name] = {
            "mean_1_minus_cosine": float(np.mean(1 - np.sum(held[name] * reference, axis=1))),
            "knn_top1": knn_top1(memory[name], labels, queries[name], y_test),
            "recall_at_10": recall_at(
                10, {"fp32": memory["fp32"], INT8: memory[name]}, {"fp32": queries["fp32"], INT8: queries[name]}
            ),
        }
    result["fp32_knn_top1"] = knn_top1(memory["fp32"], labels, queries["fp32"], y_test)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
