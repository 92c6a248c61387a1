"""Model variants and the vector space each one writes.

A model in the registry may carry variants beside its fp32 reference (int8 for CPUs, later
fp16 for GPUs). Which variant embeds is one deployment-wide choice, so that every process
that writes vectors for a model (API hosts, a worker's bulk indexing or re-embedding) writes
the same variant's vectors. Vectors of two variants are never mixed: each (model, variant)
pair is its own vector space, keyed in the item store and the index snapshots by
`vector_space`.
"""

from __future__ import annotations

from collections.abc import Collection

FP32 = "fp32"


def vector_space(model_id: str, variant: str = FP32) -> str:
    """The store key of `model_id`'s vectors under `variant`: the bare id for the fp32
    reference (so stores written before variants existed stay valid), `id@variant` otherwise."""
    return model_id if variant == FP32 else f"{model_id}@{variant}"


def split_vector_space(space: str) -> tuple[str, str]:
    """(model_id, variant) of a `vector_space` key."""
    model_id, _, variant = space.partition("@")
    return model_id, variant or FP32


INT8 = "int8"
# The deployment-wide setting (Settings.embed_variant, SIMCLR_EMBED_EMBED_VARIANT).
VARIANT_SETTINGS = ("auto", FP32, INT8)


def serving_variant(setting: str, verified: Collection[str], on_cpu: bool) -> str:
    """The variant a deployment embeds a model with: the one function every writer of vectors
    (API hosts, a worker's bulk indexing or re-embedding) calls, so all write the same one.

    `setting`: "auto" (int8 on a CPU deployment when the model has a verified int8 variant,
    else fp32), "fp32" (forced) or "int8" (int8 wherever the model has it, else fp32: a model
    published without a verified variant is served by its reference). `verified`: the variant
    names its card lists (export publishes only verified ones); `on_cpu`: whether the
    deployment's first ONNX Runtime provider is the CPU's.
    """
    if setting not in VARIANT_SETTINGS:
        raise ValueError(f"embed variant must be one of {', '.join(VARIANT_SETTINGS)}, not {setting!r}")
    if setting == INT8 or (setting == "auto" and on_cpu):
        return INT8 if INT8 in verified else FP32
    return FP32
