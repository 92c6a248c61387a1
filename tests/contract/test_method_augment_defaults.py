"""Per-method augmentation defaults of TrainConfig: filled where unset, explicit values win,
and they survive the JSON round trips of the job API and the run directory."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.contract.train_config import AugmentConfig, TrainConfig, TrainJobRequest

# The papers' values, written out here rather than read from the module under test.
SIMCLR = {"crop_min_scale": 0.08, "color_strength": 1.0, "blur_prob": 0.5, "solarize_prob": 0.0,
          "view_b_blur_prob": None, "view_b_solarize_prob": None}  # fmt: skip
MOCO_V2 = {**SIMCLR, "crop_min_scale": 0.2, "color_strength": 0.5}
BYOL = {"crop_min_scale": 0.08, "color_strength": 0.5, "blur_prob": 1.0, "solarize_prob": 0.0,
        "view_b_blur_prob": 0.1, "view_b_solarize_prob": 0.2}  # fmt: skip


# Crop scale and colour strength depend on the run: left None at validation, decided at its start.
RUN_DEPENDENT = {"crop_min_scale": None, "color_strength": None}


def _picked(aug: AugmentConfig) -> dict[str, object]:
    return {k: getattr(aug, k) for k in SIMCLR}


@pytest.mark.parametrize(("method", "expected"), [("simclr", SIMCLR), ("moco_v2", MOCO_V2), ("byol", BYOL)])
def test_a_long_run_on_large_images_gets_the_papers_augmentations(method: str, expected: dict[str, object]) -> None:
    cfg = TrainConfig(method=method, batch_size=256, image_size=224, epochs=200)
    assert _picked(cfg.resolved(num_images=1_281_167).augment) == expected


@pytest.mark.parametrize(("method", "expected"), [("simclr", SIMCLR), ("moco_v2", MOCO_V2), ("byol", BYOL)])
def test_unset_fields_take_the_method_defaults(method: str, expected: dict[str, object]) -> None:
    expected = {**expected, **RUN_DEPENDENT}
    assert _picked(TrainConfig(method=method, batch_size=256).augment) == expected
    # A partly given augment still fills the rest, and keeps what was given.
    cfg = TrainConfig(method=method, batch_size=256, augment={"hflip_prob": 0.0})
    assert _picked(cfg.augment) == expected and cfg.augment.hflip_prob == 0.0
    # Nothing else changes: the other fields are AugmentConfig's own defaults.
    rest = {k: v for k, v in AugmentConfig().model_dump().items() if k not in SIMCLR}
    assert {k: getattr(cfg.augment, k) for k in rest} == {**rest, "hflip_prob": 0.0}


@pytest.mark.parametrize("method", ["moco_v2", "byol"])
def test_explicit_values_win_even_when_equal_to_simclr_defaults(method: str) -> None:
    given = {"crop_min_scale": 0.08, "color_strength": 1.0, "blur_prob": 0.5, "solarize_prob": 0.0}
    aug = TrainConfig(method=method, batch_size=256, augment=given).augment
    assert _picked(aug) == {**given, "view_b_blur_prob": None, "view_b_solarize_prob": None}
    # The same from an AugmentConfig instance (the Python API), not a dict.
    assert TrainConfig(method=method, batch_size=256, augment=AugmentConfig(**given)).augment == aug


def test_byol_explicit_first_view_probability_applies_to_both_views() -> None:
    aug = TrainConfig(method="byol", augment={"blur_prob": 0.3}).augment
    assert (aug.blur_prob, aug.view_b_blur_prob) == (0.3, None)  # view b falls back to 0.3
    assert (aug.solarize_prob, aug.view_b_solarize_prob) == (0.0, 0.2)  # the other pair keeps BYOL's
    aug = TrainConfig(method="byol", augment={"view_b_solarize_prob": 0.5}).augment
    assert (aug.solarize_prob, aug.view_b_solarize_prob) == (0.0, 0.5)


def test_second_view_fields_are_byol_only() -> None:
    with pytest.raises(ValidationError, match="byol only"):
        TrainConfig(method="moco_v2", batch_size=256, augment={"view_b_blur_prob": 0.1})
    with pytest.raises(ValidationError, match="byol only"):
        TrainConfig(augment={"view_b_solarize_prob": 0.2})


def test_invalid_method_reports_the_method_error_only() -> None:
    with pytest.raises(ValidationError) as err:
        TrainConfig(method="swav", augment={"crop_min_scale": 0.5})
    assert [e["loc"] for e in err.value.errors()] == [("method",)]


@pytest.mark.parametrize("augment", [None, {"color_strength": 1.0}])
@pytest.mark.parametrize("method", ["simclr", "moco_v2", "byol"])
def test_json_round_trip_of_the_job_request_keeps_every_value(method: str, augment: dict | None) -> None:
    body = {"method": method, "batch_size": 256, "dataset": "digits.npz"}
    if augment is not None:
        body["augment"] = augment
    request = TrainJobRequest.model_validate(body)
    # What the job store keeps and the worker reads back (trainer/tasks.py).
    stored = TrainJobRequest.model_validate_json(request.model_dump_json())
    assert stored == request
    cfg = TrainConfig.model_validate(stored.model_dump(exclude={"dataset", "activate", "name"}))
    assert cfg.augment == request.augment
    if augment is not None:
        assert cfg.augment.color_strength == 1.0
    # A run directory's resolved config reloads to itself.
    resolved = cfg.resolved()
    assert TrainConfig.model_validate_json(resolved.model_dump_json()) == resolved


def test_job_request_schema_documents_the_fields() -> None:
    schema = TrainJobRequest.model_json_schema()
    augment = schema["$defs"]["AugmentConfig"]["properties"]
    assert {"view_b_blur_prob", "view_b_solarize_prob", "crop_min_scale", "color_strength"} <= set(augment)
    assert "method" in schema["properties"]["augment"]["description"]
