"""The model registry: a directory shared by the trainer (publishes) and the service (reads,
activates). Torch-free.

Layout under `root` (``<data_dir>/models``)::

    <model_id>/model.onnx   the encoder f, contract in docs/architecture.md
    <model_id>/card.json    ModelCard: the ONNX metadata plus sha256 and size of model.onnx
    <model_id>/model.<variant>.onnx   verified variants of the same encoder (int8), listed in the card
    active                  the active model id, replaced atomically
    .staging/               half-written publishes and pointers; never listed, swept on start

Every write goes to a temporary name, is fsynced, then renamed, so a reader (or a process
killed half-way) never sees half a model or half a pointer.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.contract import atomic
from service.contract.variants import FP32

FORMAT_VERSION = "1"
VARIANT_NAME_RE = re.compile(r"[a-z][a-z0-9]{0,15}")
MODEL_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # use fullmatch: "$" admits a trailing newline
# Names the registry itself uses at its root; never model ids.
RESERVED_IDS = frozenset({"active"})
# Modes of what a publish writes: readable by a service running as another user (a shared
# volume in compose), whatever mkstemp/mkdtemp's private 0600/0700 defaults are.
FILE_MODE, DIR_MODE = 0o644, 0o755
# ONNX metadata_props keys written at export and read by the server; values are strings.
METADATA_KEYS = (
    "format_version",
    "model_id",
    "method",
    "backbone",
    "input_size",
    "embedding_dim",
    "resize_policy",
    "train_config",
    "dataset_fingerprint",
    "created_at",
    "metrics",
)


class RegistryError(Exception):
    """Base class; `code` is a stable snake_case id for API errors."""

    code = "registry_error"


class ModelNotFoundError(RegistryError, KeyError):
    code = "model_not_found"

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "model not found"


class ModelIntegrityError(RegistryError):
    code = "model_integrity_error"


class ModelKindError(RegistryError):
    """A classifier model (a fine-tuning job's) asked to serve as the encoder that embeds items."""

    code = "not_an_encoder"


def valid_model_id(model_id: object) -> bool:
    """Whether `model_id` can name a model: one path component, no dot first, not reserved."""
    return isinstance(model_id, str) and MODEL_ID_RE.fullmatch(model_id) is not None and model_id not in RESERVED_IDS


class VariantCard(BaseModel):
    """A verified variant of a model (int8 for CPUs): its file beside model.onnx and the figures
    it passed at export against the fp32 reference (trainer/export.py, `verify_variant`)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    file: str  # under <model_id>/, e.g. model.int8.onnx
    providers: list[str] = Field(default_factory=list, description="execution providers it is meant for")
    method: str = ""  # how it was made, e.g. static QDQ quantisation and its calibration
    verification: dict[str, Any] = Field(default_factory=dict)  # figures, thresholds, image counts
    sha256: str = ""
    size_bytes: int = 0


class ModelCard(BaseModel):
    """What a model is; written beside model.onnx as card.json."""

    model_config = ConfigDict(extra="allow", frozen=True, protected_namespaces=())

    format_version: str = FORMAT_VERSION
    model_id: str
    method: str
    backbone: str
    input_size: int = Field(..., ge=1)
    embedding_dim: int = Field(..., ge=1)
    resize_policy: str
    train_config: dict[str, Any] = Field(default_factory=dict)
    train_defaults: dict[str, str] = Field(default_factory=dict, description="train_config field -> its source")
    dataset_fingerprint: str = ""
    created_at: str
    metrics: dict[str, Any] = Field(default_factory=dict)
    sha256: str = ""
    size_bytes: int = 0
    # Cards written before variants existed have neither field: they load as fp32-only models.
    variants: dict[str, VariantCard] = Field(default_factory=dict)
    refused_variants: dict[str, str] = Field(default_factory=dict, description="variant -> why export refused it")
    # "encoder": f, output `embedding`; "classifier": a fine-tuned f + head with outputs
    # `embedding` and `probabilities` over `classes` (trainer/finetune.py). Only encoders activate.
    kind: Literal["encoder", "classifier"] = "encoder"
    classes: list[str | int] = Field(default_factory=list)

    def onnx_metadata(self) -> dict[str, str]:
        """The card as ONNX metadata_props (strings only; dicts as JSON)."""
        data = self.model_dump()
        return {
            k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in data.items() if k in METADATA_KEYS
        }

    @classmethod
    def from_onnx_metadata(cls, props: dict[str, str], **extra: Any) -> ModelCard:
        missing = [k for k in METADATA_KEYS if k not in props]
        if missing:
            raise ModelIntegrityError(f"ONNX metadata lacks {', '.join(missing)}; re-export the model")
        data: dict[str, Any] = dict(props)
        try:
            for key in ("train_config", "metrics"):
                data[key] = json.loads(props[key] or "{}")
            return cls(**{**data, **extra})
        except ValueError as exc:  # bad JSON or a field pydantic refuses
            raise ModelIntegrityError(f"ONNX metadata is malformed: {exc}") from exc


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class ModelRegistry:
    """A directory of published encoders and the pointer to the active one."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._staging = self.root / ".staging"

    # -- writes ---------------------------------------------------------------------------

    def publish(
        self,
        onnx_path: str | Path,
        card: ModelCard,
        *,
        variants: Mapping[str, str | Path] | None = None,
        activate: bool = False,
    ) -> ModelCard:
        """Copy `onnx_path` (and the file of every variant `card.variants` lists, from
        `variants`: name -> path) in as `card.model_id`; visible only once complete."""
        model_id = card.model_id
        variants = dict(variants or {})
        if set(variants) != set(card.variants):
            raise RegistryError(
                f"model {model_id}: the card lists variants {sorted(card.variants)}, files were given for {sorted(variants)}"
            )
        for name, variant in card.variants.items():
            if name == FP32 or not VARIANT_NAME_RE.fullmatch(name) or variant.file != f"model.{name}.onnx":
                raise RegistryError(f"model {model_id}: invalid variant {name!r} (file {variant.file!r})")
        if not valid_model_id(model_id):
            raise RegistryError(
                f"invalid model id {model_id!r}: 1-128 letters, digits, '.', '_' and '-', starting with a letter "
                f"or digit, not {', '.join(sorted(RESERVED_IDS))}"
            )
        final = self.root / model_id
        if final.exists():
            raise RegistryError(f"model {model_id} is already published; model ids are never reused")
        self._staging.mkdir(exist_ok=True)
        stage = Path(tempfile.mkdtemp(dir=self._staging, prefix=f"{model_id}."))
        try:
            sha256, size_bytes = _copy_in(onnx_path, stage / "model.onnx")
            listed = {}
            for name, variant in card.variants.items():
                v_sha, v_size = _copy_in(variants[name], stage / variant.file)
                listed[name] = variant.model_copy(update={"sha256": v_sha, "size_bytes": v_size})
            card = card.model_copy(update={"sha256": sha256, "size_bytes": size_bytes, "variants": listed})
            atomic.write_atomic(stage / "card.json", card.model_dump_json(indent=2), mode=FILE_MODE)
            os.chmod(stage, DIR_MODE)
            atomic.fsync_dir(stage)
            try:
                os.rename(stage, final)  # atomic on one filesystem; fails if `final` appeared
            except OSError as exc:
                if final.exists():
                    raise RegistryError(
                        f"model {model_id} was published concurrently; model ids are never reused"
                    ) from exc
                raise
            atomic.fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        if activate:
            self.activate(model_id)
        return card

    def activate(self, model_id: str) -> ModelCard:
        """Point `active` at a complete model; the pointer is replaced whole (rename)."""
        card = self.get(model_id)
        if card.kind != "encoder":
            raise ModelKindError(
                f"model {model_id} is a {card.kind}, not an encoder: it cannot embed the items; "
                "use it with POST /classifiers (method finetune)"
            )
        if not (self.root / model_id / "model.onnx").is_file():
            raise ModelIntegrityError(f"model {model_id} has no model.onnx; re-publish it")
        self._staging.mkdir(exist_ok=True)
        # The temporary pointer lives in .staging, so a writer killed half-way leaves it where
        # sweep_staging looks.
        atomic.write_atomic(self.root / "active", model_id + "\n", tmp_dir=self._staging, mode=FILE_MODE)
        return card

    def sweep_staging(self, min_age_s: float = 0.0) -> int:
        """Remove leftovers of publishes that died half-way; returns how many.

        With `min_age_s`, leave entries modified more recently than that: a publish another
        process (the trainer, sharing the volume) is running right now.
        """
        if not self._staging.exists():
            return 0
        cutoff = time.time() - min_age_s
        removed = 0
        for path in list(self._staging.iterdir()):
            try:
                if min_age_s and path.lstat().st_mtime > cutoff:
                    continue
            except FileNotFoundError:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed += 1
        return removed

    # -- reads ----------------------------------------------------------------------------

    def list(self) -> list[ModelCard]:
        """Complete models, newest first."""
        cards = []
        for path in self.root.iterdir():
            if not (valid_model_id(path.name) and path.is_dir() and (path / "model.onnx").is_file()):
                continue
            try:
                cards.append(self.get(path.name))
            except RegistryError:
                continue
        return sorted(cards, key=lambda c: (c.created_at, c.model_id), reverse=True)

    def get(self, model_id: str) -> ModelCard:
        if not valid_model_id(model_id):
            raise ModelNotFoundError(f"no model {model_id!r} in the registry")
        card_path = self.root / model_id / "card.json"
        try:
            card = ModelCard.model_validate_json(card_path.read_text())
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise ModelNotFoundError(f"no model {model_id!r} in the registry") from exc
        except (OSError, ValueError) as exc:
            raise ModelIntegrityError(f"card.json of {model_id} is unreadable: {exc}") from exc
        if card.model_id != model_id:
            raise ModelIntegrityError(
                f"card.json under {model_id}/ names model {card.model_id!r}; the directory was renamed or copied"
            )
        return card

    def active(self) -> str | None:
        """The active model id, or None when none was activated (or the pointer is garbage)."""
        try:
            model_id = (self.root / "active").read_text().strip()
        except (FileNotFoundError, UnicodeDecodeError):
            return None
        return model_id if valid_model_id(model_id) else None

    def model_path(self, model_id: str) -> Path:
        self.get(model_id)
        return self.root / model_id / "model.onnx"

    def verify(self, model_id: str, variant: str = FP32) -> tuple[ModelCard, Path]:
        """The card and the path of `variant`'s file after checking it against the card's sha256."""
        card = self.get(model_id)
        if variant == FP32:
            name, expected = "model.onnx", card.sha256
        elif variant in card.variants:
            name, expected = card.variants[variant].file, card.variants[variant].sha256
        else:
            raise ModelNotFoundError(f"model {model_id} has no {variant} variant (it has {sorted(card.variants)})")
        path = self.root / model_id / name
        if not path.is_file():
            raise ModelIntegrityError(f"model {model_id} has no {name}; re-publish it")
        actual = sha256_file(path)
        if actual != expected:
            raise ModelIntegrityError(
                f"model {model_id}: {name} has sha256 {actual[:12]}..., its card says {expected[:12]}...; "
                "the file is corrupt or was replaced: re-publish the model"
            )
        return card, path


def _copy_in(source: str | Path, dest: Path) -> tuple[str, int]:
    """Copy `source` to `dest` (readable by other users, fsynced); its sha256 and size."""
    shutil.copyfile(source, dest)
    with open(dest, "rb+") as fh:
        os.fchmod(fh.fileno(), FILE_MODE)
        os.fsync(fh.fileno())
    return sha256_file(dest), dest.stat().st_size
