"""The bulk indexing job request (`POST /index-jobs`), importable without torch or ONNX
Runtime: the API validates it, the worker runs it (service.items.bulk, the code behind
`simclr-embed index`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

FIELD_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"  # a metadata field name, as filters name them


class IndexJobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(..., min_length=1, description="folder of images or .npz under a configured dataset root")
    ids: Literal["path", "stem"] = Field(
        "path",
        description="a folder image's id: its path relative to the dataset, or its file name without the suffix "
        "(which must then be unique); an .npz image's id is `<file stem>-<index>` either way",
    )
    id_prefix: str = Field("", max_length=200, description="text put before every id")
    folders_as: str | None = Field(
        None, pattern=FIELD_PATTERN, description="store the first sub-folder's name as this metadata field"
    )
    metadata: str | None = Field(
        None,
        min_length=1,
        description="sidecar under a dataset root keyed by `path`: .jsonl (types kept) or .csv (numbers parsed)",
    )
    split: str = Field("train", pattern=r"^[A-Za-z0-9_]{1,32}$", description=".npz split (x_<split>, y_<split>)")
    delete_missing: bool = Field(False, description="delete the items whose files vanished since the last run")
    batch_size: int = Field(64, ge=1, le=1024, description="images embedded per ONNX Runtime call")
    name: str | None = Field(None, max_length=200)
