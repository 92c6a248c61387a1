"""Export the encoder f of a run to ONNX and publish it to the model registry.

The ONNX file and its metadata are the whole contract between trainer and service
(docs/architecture.md, "The encoder contract"): input `images` uint8 [N, S, S, 3] RGB with a
dynamic batch axis; cast, /255, NHWC->NCHW and (x - PIXEL_MEAN) / PIXEL_STD inside the graph;
output `embedding` float32 [N, D] = h / ||h||. The projection head g is not exported (SimCLR,
Chen et al. 2020, Sec. 4.2: h, not g(h), is the representation to keep).

Every export is checked before anything is published: `onnx.checker`, then ONNX Runtime (CPU)
against the torch encoder on real images (max abs difference of the unit-norm outputs under
`PARITY_TOLERANCE`). A failed check raises `ExportError` and publishes nothing.

Variants: beside the fp32 reference, an int8 model for CPUs (`quantize_int8`: ONNX Runtime
static quantisation, QDQ format, per-channel int8 weights, uint8 activations calibrated on
CALIBRATION_IMAGES images of the training data; the uint8 input stays the graph's, and the
pixel normalisation is folded into the first convolution, which reads the uint8 pixels:
trainer/quant_stem.py). It is published only when `verify_variant` passes INT8_THRESHOLDS on at least
VERIFY_IMAGES other images of the training data that calibration did not see; otherwise the
fp32 model is published alone and the card says why (`refused_variants`).

Exporter: the TorchScript exporter (`dynamo=False`) with `dynamic_axes`. With torch 2.14.1
both exporters pass parity and give ONNX Runtime graphs of the same speed; the TorchScript
one exports in ~1 s instead of ~8 s and yields a plain graph (BatchNorm folded into Conv,
GlobalAveragePool, no shape arithmetic around the flatten). See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
import warnings
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from service.contract.encoder_io import INPUT_NAME, OUTPUT_NAME, PIXEL_MEAN, PIXEL_STD, ort_session_options
from service.contract.imaging import ResizePolicy
from service.contract.registry import (
    FORMAT_VERSION,
    ModelCard,
    ModelRegistry,
    RegistryError,
    VariantCard,
    valid_model_id,
)
from service.contract.train_config import TrainConfig
from service.contract.variants import INT8
from trainer.checkpoint import load_encoder
from trainer.finetune import FinetunedClassifier
from trainer.models import Encoder, normalize_pixels
from trainer.quant_stem import PIXELS, fold_pixel_normalisation, read_raw_pixels

PARITY_TOLERANCE = 1e-4
PARITY_IMAGES = 64  # real images checked at export
OPSET = 18
CALIBRATION_IMAGES = 256  # training images the int8 activation ranges are calibrated on
VERIFY_IMAGES = 1000  # other training images the int8 model is checked on against fp32
NEIGHBOURS = 10
# What an int8 variant must reach on the held-out images, against the fp32 reference (cosine of
# the two unit embeddings of each image; mean share of each image's 10 nearest neighbours among
# the held-out images that both models find). docs/benchmarks.md gives the figures trained
# models reach (cosine ~0.999, agreement ~0.95) and what search recall@10 follows from them.
INT8_THRESHOLDS = {"cosine_min": 0.98, "cosine_mean": 0.995, "top10_agreement": 0.85}


_RAW_PIXELS = {"scale": np.array(1.0, np.float32), "zero_point": np.array(0, np.uint8)}


class ExportError(RuntimeError):
    """Export refused; nothing was published. `code` is a stable snake_case id."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class EmbeddingGraph(nn.Module):
    """What gets exported: uint8 [N, S, S, 3] RGB -> unit-norm float32 [N, D]."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder = encoder

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, S, S, 3] -> the encoder's input, normalised float32 [N, 3, S, S]."""
        x = images.to(torch.float32) / 255.0  # [N, S, S, 3] in [0, 1]
        x = x.permute(0, 3, 1, 2)  # [N, 3, S, S]
        return normalize_pixels(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.pixels(images))  # [N, D]
        return nn.functional.normalize(h, dim=1)  # [N, D], unit norm


def reference_embed(encoder: Encoder, images: np.ndarray) -> np.ndarray:
    """The torch side of the parity check, preprocessing done apart from EmbeddingGraph.

    uint8 [N, S, S, 3] -> float64 [N, D] unit-norm; normalisation in numpy float64 so a bug in
    the exported wrapper (channel order, scaling) cannot hide behind the same bug here.
    """
    with torch.inference_mode():
        h = encoder(reference_input(images)).to(torch.float64).numpy()  # [N, D]
    return h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12)


def reference_input(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, S, S, 3] -> float32 [N, 3, S, S], normalised in numpy float64 (the parity side)."""
    x = images.astype(np.float64) / 255.0  # [N, S, S, 3]
    x = (x - np.asarray(PIXEL_MEAN)) / np.asarray(PIXEL_STD)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32))


def ort_session(path: str | Path, threads: int = 0) -> ort.InferenceSession:
    """A CPU ONNX Runtime session with every graph optimisation on (what the server runs)."""
    return ort.InferenceSession(str(path), ort_session_options(threads), providers=["CPUExecutionProvider"])


def parity_max_diff(encoder: Encoder, onnx_path: str | Path, images: np.ndarray) -> float:
    """Max abs difference between ONNX Runtime and torch embeddings of `images` (batched whole
    and one at a time for the first image, so the dynamic batch axis is exercised)."""
    session = ort_session(onnx_path)
    expected = reference_embed(encoder, images)  # [N, D]
    got = session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]  # [N, D]
    single = session.run([OUTPUT_NAME], {INPUT_NAME: images[:1]})[0]  # [1, D]
    if got.shape != expected.shape or got.dtype != np.float32:
        raise ExportError(
            "parity_failed", f"ONNX output is {got.dtype} {got.shape}, the torch encoder gives {expected.shape}"
        )
    return float(max(np.abs(got - expected).max(), np.abs(single - expected[:1]).max()))


def _torch_export(graph: EmbeddingGraph, example: torch.Tensor, out_path: Path) -> None:
    """TorchScript exporter, batch axis dynamic; BatchNorm is folded into Conv in eval mode."""
    try:
        torch.onnx.export(
            graph,
            (example,),
            str(out_path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    except Exception as exc:  # an operator the exporter cannot translate, ...
        raise ExportError("export_failed", f"torch.onnx.export failed: {exc}") from exc


def export_encoder(
    encoder: Encoder,
    out_path: str | Path,
    *,
    card: ModelCard,
    parity_images: np.ndarray,
    tolerance: float = PARITY_TOLERANCE,
) -> float:
    """Write `encoder` as a checked ONNX model with `card` as metadata; returns the parity diff.

    `parity_images`: real images, uint8 [N, S, S, 3] with S = card.input_size. Raises
    ExportError (and leaves no file at `out_path`) when a check fails.
    """
    out_path = Path(out_path)
    size = card.input_size
    if parity_images.dtype != np.uint8 or parity_images.ndim != 4 or parity_images.shape[1:] != (size, size, 3):
        raise ExportError(
            "bad_parity_images",
            f"parity images must be uint8 [N, {size}, {size}, 3], got {parity_images.dtype} {list(parity_images.shape)}",
        )
    was_training = encoder.training
    encoder.eval()
    try:
        graph = EmbeddingGraph(encoder).eval()
        example = torch.from_numpy(np.ascontiguousarray(parity_images[:2]))  # [2, S, S, 3]
        with warnings.catch_warnings():
            # The TorchScript exporter announces its deprecation; the choice is deliberate.
            warnings.simplefilter("ignore", DeprecationWarning)
            _torch_export(graph, example, out_path)
        model = onnx.load(str(out_path))
        # The TorchScript exporter leaves D symbolic after the normalising Div; state it.
        out_dims = model.graph.output[0].type.tensor_type.shape.dim  # [batch, D]
        out_dims[1].Clear()
        out_dims[1].dim_value = encoder.feature_dim
        model.producer_name = "simclr-embed"
        model.doc_string = f"encoder f ({card.backbone}, {card.method}); contract: docs/architecture.md"
        onnx.helper.set_model_props(model, card.onnx_metadata())
        onnx.save(model, str(out_path))
        try:
            onnx.checker.check_model(str(out_path), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ExportError("onnx_check_failed", f"onnx.checker rejected the exported model: {exc}") from exc
        diff = parity_max_diff(encoder, out_path, np.ascontiguousarray(parity_images))
        if not diff < tolerance:  # also catches NaN
            raise ExportError(
                "parity_failed",
                f"ONNX Runtime and torch disagree on {len(parity_images)} real images: max abs difference of "
                f"the unit-norm embeddings is {diff:.3g}, the limit is {tolerance:g}; nothing was published",
            )
        return diff
    except BaseException:
        out_path.unlink(missing_ok=True)
        raise
    finally:
        encoder.train(was_training)


# --- variants ------------------------------------------------------------------------------


class _Batches:
    """onnxruntime.quantization's CalibrationDataReader: `images` in batches of 32."""

    def __init__(self, images: np.ndarray) -> None:
        self._batches = iter([{INPUT_NAME: images[i : i + 32]} for i in range(0, len(images), 32)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize_int8(fp32_path: str | Path, out_path: str | Path, calibration: np.ndarray) -> None:
    """Static int8 quantisation of the fp32 encoder (QDQ, per-channel int8 weights, uint8
    activations whose ranges are calibrated on `calibration`: uint8 [N, S, S, 3]), the pixel
    normalisation folded into the first convolution (trainer/quant_stem.py). The reference's
    metadata is carried over, plus `variant`."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out_path = Path(out_path)
    prepared = out_path.with_suffix(".prepared.onnx")
    try:
        # Shape inference and graph optimisation first (ONNX Runtime's advice); the symbolic
        # shape pass cannot follow the normalising Div's Expand, so the ONNX one is used.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        graph = onnx.load(str(prepared))
        folded = fold_pixel_normalisation(graph)
        quantize_static(
            graph,
            str(out_path),
            _Batches(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            # 7-bit weights: AVX2 without VNNI multiplies u8 x s8 pairs into saturating int16
            # (ONNX Runtime's quantisation guide); without it a CPU like this one loses accuracy.
            reduce_range=True,
            # The pixels, 0..255 once folded, at scale 1: exact, and read_raw_pixels drops the pass.
            extra_options={"TensorQuantOverrides": {PIXELS: [_RAW_PIXELS]}} if folded else {},
        )
    finally:
        prepared.unlink(missing_ok=True)
    model = onnx.load(str(out_path))
    if folded:
        read_raw_pixels(model)
    reference = onnx.load(str(fp32_path), load_external_data=False)
    props = {p.key: p.value for p in reference.metadata_props} | {"variant": INT8}
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    model.producer_name, model.doc_string = reference.producer_name, reference.doc_string + " (int8)"
    onnx.save(model, str(out_path))


def neighbour_agreement(reference: np.ndarray, variant: np.ndarray, k: int = NEIGHBOURS) -> float:
    """Mean over images of |top-k(reference) & top-k(variant)| / k, each image's k nearest
    others among the same images by inner product (unit rows [N, D])."""

    def top_k(x: np.ndarray) -> np.ndarray:
        sims = x.astype(np.float64) @ x.astype(np.float64).T  # [N, N]
        np.fill_diagonal(sims, -np.inf)
        return np.argpartition(-sims, k, axis=1)[:, :k]  # [N, k], unordered

    ref, var = top_k(reference), top_k(variant)
    return float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(ref, var, strict=True)]))


def verify_variant(
    reference_path: str | Path, variant_path: str | Path, images: np.ndarray, thresholds: Mapping[str, float]
) -> tuple[bool, dict[str, Any]]:
    """(passed, figures) of a variant against the fp32 reference on `images` (uint8 [N, S, S, 3],
    none of them seen by calibration): per-image cosine (min, mean) and top-10 agreement."""
    reference = ort_session(reference_path).run([OUTPUT_NAME], {INPUT_NAME: images})[0]  # [N, D]
    variant = ort_session(variant_path).run([OUTPUT_NAME], {INPUT_NAME: images})[0]  # [N, D]
    if variant.shape != reference.shape:
        return False, {"error": f"output {list(variant.shape)}, the reference gives {list(reference.shape)}"}
    cosine = np.sum(reference.astype(np.float64) * variant.astype(np.float64), axis=1)  # [N], unit rows
    figures: dict[str, Any] = {
        "images": len(images),
        "cosine_min": float(np.min(cosine)),
        "cosine_mean": float(np.mean(cosine)),
        "top10_agreement": neighbour_agreement(reference, variant),
    }
    # NaN fails every comparison, so a variant that produces NaN fails too.
    passed = all(figures[key] >= limit for key, limit in thresholds.items())
    return passed, {**figures, "thresholds": dict(thresholds)}


def int8_variant(
    fp32_path: Path, out_path: Path, calibration: np.ndarray, held_out: np.ndarray
) -> tuple[VariantCard | None, str]:
    """Quantise and verify; (card entry, "") when it passes, (None, why) when it is refused."""
    if len(held_out) < VERIFY_IMAGES:
        return None, (
            f"needs {VERIFY_IMAGES} held-out images to verify (and {CALIBRATION_IMAGES} to calibrate); "
            f"the training data gave {len(held_out)}"
        )
    try:
        quantize_int8(fp32_path, out_path, calibration)
        passed, figures = verify_variant(fp32_path, out_path, held_out, INT8_THRESHOLDS)
    except Exception as exc:  # a quantiser or session failure refuses the variant, not the export
        out_path.unlink(missing_ok=True)
        return None, f"quantisation failed: {type(exc).__name__}: {exc}"
    figures["calibration_images"] = len(calibration)
    if not passed:
        out_path.unlink(missing_ok=True)
        shown = ", ".join(f"{k} {figures[k]:.4f} (needs >= {v})" for k, v in INT8_THRESHOLDS.items() if k in figures)
        return None, f"verification against fp32 failed on {len(held_out)} held-out images: {shown}"
    card = VariantCard(
        file=f"model.{INT8}.onnx",
        providers=["CPUExecutionProvider"],
        method=f"static QDQ, per-channel int8 weights, uint8 activations calibrated on {len(calibration)} images, "
        "the first convolution on the uint8 pixels",
        verification=figures,
    )
    return card, ""


def export_and_publish(
    encoder: Encoder,
    card: ModelCard,
    registry: ModelRegistry,
    *,
    parity_images: np.ndarray,
    calibration: np.ndarray | None,
    held_out: np.ndarray | None,
    activate: bool = False,
) -> ModelCard:
    """Export the fp32 reference, build the int8 variant from `calibration` and verify it on
    `held_out` (both uint8 [N, S, S, 3]; None: no variant), publish what passed, atomically."""
    with tempfile.TemporaryDirectory(prefix="simclr-export-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export_encoder(encoder, onnx_path, card=card, parity_images=parity_images)
        if calibration is None or held_out is None:
            return registry.publish(onnx_path, card, activate=activate)
        int8_path = Path(tmp) / f"model.{INT8}.onnx"
        variant, refusal = int8_variant(onnx_path, int8_path, calibration, held_out)
        if variant is None:
            card = card.model_copy(update={"refused_variants": {INT8: refusal}})
            return registry.publish(onnx_path, card, activate=activate)
        card = card.model_copy(update={"variants": {INT8: variant}})
        return registry.publish(onnx_path, card, variants={INT8: int8_path}, activate=activate)


# --- runs ----------------------------------------------------------------------------------


def default_model_id(cfg: TrainConfig, encoder: Encoder, now: datetime) -> str:
    """`<method>-<backbone>-<UTC timestamp>-<short hash of the weights>`."""
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return f"{cfg.method}-{cfg.backbone}-{now:%Y%m%dT%H%M%SZ}-{digest.hexdigest()[:8]}"


def _run_metrics(run_dir: Path) -> dict[str, Any]:
    """What result.json knows: its `metrics` object (evaluation) and the final training loss."""
    path = run_dir / "result.json"
    if not path.is_file():
        return {}
    result = json.loads(path.read_text())
    metrics = dict(result.get("metrics") or {})
    if "train_loss" not in metrics and _finite_number(result.get("loss")):
        metrics["train_loss"] = result["loss"]
    return {k: v for k, v in metrics.items() if _finite_number(v)}


def _finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _dataset_images(data_path: str | None, size: int, count: int) -> np.ndarray | None:
    """Up to `count` distinct images of the run's dataset, spread over it; None if it is unreadable."""
    if not data_path:
        return None
    from trainer.data import DatasetError, open_dataset

    try:
        data = open_dataset(data_path, size)
        picks = np.unique(np.linspace(0, len(data) - 1, num=min(count, len(data))).round().astype(int))
        return np.stack([data.image(int(i)) for i in picks])  # [n, S, S, 3]
    except (DatasetError, OSError, ValueError):
        return None


def calibration_split(images: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, held out): CALIBRATION_IMAGES images drawn at random, and all the others."""
    order = np.random.default_rng(seed).permutation(len(images))
    return images[order[:CALIBRATION_IMAGES]], images[order[CALIBRATION_IMAGES:]]


def export_run(
    run_dir: str | Path,
    registry: ModelRegistry,
    *,
    activate: bool = False,
    model_id: str | None = None,
    metrics: Mapping[str, Any] | None = None,
    parity_images: np.ndarray | None = None,
) -> ModelCard:
    """Export the encoder of a finished or checkpointed run and publish it; returns the card.

    Parity images come from the run's dataset when it is readable, else `parity_images`
    (uint8 [N, H, W, 3], resized with the model's ResizePolicy).
    """
    if model_id is not None and not valid_model_id(model_id):
        raise RegistryError(f"invalid model id {model_id!r}: use letters, digits, '.', '_' and '-'")
    if model_id is not None and (registry.root / model_id).exists():
        raise RegistryError(f"model {model_id} is already published; model ids are never reused")
    run_dir = Path(run_dir)
    encoder, cfg, info = load_encoder(run_dir)
    config_json = run_dir / "config.json"
    run_info = json.loads(config_json.read_text()) if config_json.is_file() else {}
    policy = ResizePolicy(cfg.image_size)
    images = _dataset_images(run_info.get("data"), policy.size, PARITY_IMAGES)
    if images is None and parity_images is not None:
        images = policy.batch(parity_images)
    if images is None or not len(images):
        raise ExportError(
            "no_parity_images",
            f"the run's dataset {run_info.get('data')!r} is not readable here and no parity images were given; "
            "export needs real images to check ONNX Runtime against torch",
        )
    now = datetime.now(UTC)
    card = ModelCard(
        format_version=FORMAT_VERSION,
        model_id=model_id or default_model_id(cfg, encoder, now),
        method=cfg.method,
        backbone=cfg.backbone,
        input_size=cfg.image_size,
        embedding_dim=encoder.feature_dim,
        resize_policy=policy.to_json(),
        train_config=cfg.model_dump(mode="json"),
        train_defaults=run_info.get("defaults", {}),  # the source of each default decided for the run
        dataset_fingerprint=str(info["dataset"].get("fingerprint", "")),
        created_at=now.isoformat(timespec="seconds").replace("+00:00", "Z"),
        metrics={**_run_metrics(run_dir), **{k: v for k, v in (metrics or {}).items() if _finite_number(v)}},
    )
    variant_images = _dataset_images(run_info.get("data"), policy.size, CALIBRATION_IMAGES + VERIFY_IMAGES)
    calibration, held_out = calibration_split(variant_images) if variant_images is not None else (None, None)
    return export_and_publish(
        encoder,
        card,
        registry,
        parity_images=images,
        calibration=calibration,
        held_out=held_out,
        activate=activate,
    )


def main(argv: list[str] | None = None) -> int:
    """`simclr-embed export RUN_DIR --registry DIR [--activate] [--model-id ID]`."""
    parser = argparse.ArgumentParser(prog="simclr-embed export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="run directory (config.json, checkpoints/last.pt)")
    parser.add_argument("--registry", type=Path, default=None, help="registry folder; default <data_dir>/models")
    parser.add_argument("--activate", action="store_true", help="make the exported model the active one")
    parser.add_argument("--model-id", default=None, help="default <method>-<backbone>-<UTC time>-<weights hash>")
    args = parser.parse_args(argv)
    if args.registry is None:
        from service.settings import Settings

        args.registry = Settings().models_dir
    try:
        card = export_run(args.run_dir, ModelRegistry(args.registry), activate=args.activate, model_id=args.model_id)
    except (ExportError, RegistryError) as exc:
        print(f"simclr-embed export: {exc}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"simclr-embed export: {args.run_dir} is not a run directory: {exc}", file=sys.stderr)
        return 1
    state = "active" if args.activate else "published"
    variants = {name: v.verification for name, v in card.variants.items()}
    summary = {"model_id": card.model_id, "state": state, "sha256": card.sha256, "metrics": card.metrics}
    print(json.dumps({**summary, "variants": variants, "refused_variants": card.refused_variants}))
    return 0


# --- fine-tuned classifiers ------------------------------------------------------------------

PROBABILITIES = "probabilities"


class ClassifierGraph(nn.Module):
    """A fine-tuned classifier (trainer.finetune.FinetunedClassifier) as exported:
    uint8 [N, S, S, 3] -> (unit-norm h float32 [N, D], class probabilities float32 [N, K])."""

    def __init__(self, model: FinetunedClassifier) -> None:
        super().__init__()
        self.embedding = EmbeddingGraph(model.encoder)
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.model.encoder(self.embedding.pixels(images))  # [N, D]
        logits = self.model.classifier(self.model.neck(h))  # [N, K]
        return nn.functional.normalize(h, dim=1), torch.softmax(logits, dim=1)


def export_classifier(
    model: FinetunedClassifier, out_path: str | Path, *, card: ModelCard, parity_images: np.ndarray
) -> float:
    """Write a fine-tuned classifier as a checked ONNX model (outputs `embedding`, `probabilities`);
    returns the larger parity difference of the two outputs against torch on `parity_images`."""
    out_path = Path(out_path)
    model.eval()
    graph = ClassifierGraph(model).eval()
    images = np.ascontiguousarray(parity_images)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                graph,
                (torch.from_numpy(images[:2]),),
                str(out_path),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME, PROBABILITIES],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}, PROBABILITIES: {0: "batch"}},
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        onnx_model = onnx.load(str(out_path))
        onnx_model.producer_name = "simclr-embed"
        onnx_model.doc_string = f"fine-tuned classifier ({card.backbone}, {len(card.classes)} classes)"
        props = card.onnx_metadata()
        props.update(kind=card.kind, classes=json.dumps(card.classes))
        onnx.helper.set_model_props(onnx_model, props)
        onnx.save(onnx_model, str(out_path))
        onnx.checker.check_model(str(out_path), full_check=True)
        with torch.inference_mode():  # the torch side, preprocessed apart from the exported wrapper
            ref_p = torch.softmax(model(reference_input(images)).to(torch.float64), dim=1).numpy()  # [N, K]
        ref_h = reference_embed(model.encoder, images)  # [N, D]
        session = ort_session(out_path)
        got_h, got_p = session.run([OUTPUT_NAME, PROBABILITIES], {INPUT_NAME: images})
        diff = float(max(np.abs(got_h - ref_h).max(), np.abs(got_p - ref_p).max()))
        if not diff < PARITY_TOLERANCE:
            raise ExportError(
                "parity_failed",
                f"ONNX Runtime and torch disagree on {len(images)} real images by {diff:.3g} (limit "
                f"{PARITY_TOLERANCE:g}); nothing was published",
            )
        return diff
    except onnx.checker.ValidationError as exc:
        out_path.unlink(missing_ok=True)
        raise ExportError("onnx_check_failed", f"onnx.checker rejected the exported classifier: {exc}") from exc
    except BaseException:
        out_path.unlink(missing_ok=True)
        raise
