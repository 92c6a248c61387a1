"""Model variants and the vector space each one writes.

A model in the registry may carry variants beside its fp32 reference (int8 for CPUs, later
fp16 for GPUs). Which variant embeds is one deployment-wide choice, so that every process
that writes vectors for a model (API hosts, a worker's bulk indexing or re-embedding) writes
the same variant's vectors. Vectors of two variants are never mixed: each (model, variant)
pair is its own vector space, keyed in the item store and the index snapshots by
`vector_space`.
"""

from __future__ import annotations

FP32 = "fp32"


def vector_space(model_id: str, variant: str = FP32) -> str:
    """The store key of `model_id`'s vectors under `variant`: the bare id for the fp32
    reference (so stores written before variants existed stay valid), `id@variant` otherwise."""
    return model_id if variant == FP32 else f"{model_id}@{variant}"


def split_vector_space(space: str) -> tuple[str, str]:
    """(model_id, variant) of a `vector_space` key."""
    model_id, _, variant = space.partition("@")
    return model_id, variant or FP32
