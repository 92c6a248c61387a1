"""The fine-tuning job request (`POST /finetune-jobs`), importable without torch: the API
validates it, the worker runs it (trainer/finetune.py, SimCLR v2's protocol)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # a job id: one path component


class FinetuneJobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["finetune"] = "finetune"
    run: str = Field(..., pattern=RUN_ID_PATTERN, description="the pretraining job whose checkpoint to start from")
    dataset: str = Field(
        ...,
        min_length=1,
        description="labeled images under a dataset root: a folder of class sub-folders (or train/ and test/ "
        "of them), or an .npz with y_train; its test split, else a stratified 20%, gives the validation accuracy",
    )
    epochs: int | None = Field(
        None, ge=1, le=1000, description="default: scaled to the labels (60 at ~13 a class, 30 at ~128)"
    )
    batch_size: int = Field(64, ge=2, le=4096)
    seed: int = Field(0, ge=0)
    name: str | None = Field(None, max_length=200)
