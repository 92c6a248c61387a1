"""The fine-tuning job request (`POST /finetune-jobs`), importable without torch: the API
validates it, the worker runs it (trainer/finetune.py, SimCLR v2's protocol).

The labeled images come as for classifiers, from the stored items' originals (`examples`, or
`label_key`: the API resolves the field into `examples` before queueing, so the job trains on
the labels that were checked), or as a `dataset` under a dataset root."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # a job id: one path component
MAX_FINETUNE_EXAMPLES = 100_000


class FinetuneExample(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_id: str = Field(min_length=1, max_length=512)
    # Checked by the API (a string or an integer) so that a wrong type gets `invalid_label`.
    label: Any = Field(json_schema_extra={"anyOf": [{"type": "string"}, {"type": "integer"}]})


class FinetuneJobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["finetune"] = "finetune"
    run: str = Field(..., pattern=RUN_ID_PATTERN, description="the pretraining job whose checkpoint to start from")
    dataset: str | None = Field(
        None,
        min_length=1,
        description="labeled images under a dataset root: a folder of class sub-folders (or train/ and test/ "
        "of them), or an .npz with y_train; its test split, else a stratified 20%, gives the validation accuracy",
    )
    examples: list[FinetuneExample] | None = Field(
        None,
        min_length=1,
        max_length=MAX_FINETUNE_EXAMPLES,
        description="labeled stored items: [{item_id, label}]; a stratified 20% gives the validation accuracy",
    )
    label_key: str | None = Field(
        None, min_length=1, max_length=200, description="a metadata field: every item that has it is an example"
    )
    epochs: int | None = Field(
        None, ge=1, le=1000, description="default: scaled to the labels (60 at ~13 a class, 30 at ~128)"
    )
    batch_size: int = Field(64, ge=2, le=4096)
    seed: int = Field(0, ge=0)
    name: str | None = Field(None, max_length=200)

    @model_validator(mode="after")
    def _one_source(self) -> FinetuneJobRequest:
        given = [k for k in ("dataset", "examples", "label_key") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'dataset', 'examples' or 'label_key'")
        return self
