"""Service configuration: one class, every knob an environment variable `SIMCLR_EMBED_*`.

Defaults serve one machine (`simclr-embed up`); docker-compose.yml overrides them.
List values accept a comma-separated string (`SIMCLR_EMBED_API_KEYS=key1,key2`).
"""

from __future__ import annotations

import re
import socket
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

CommaList = Annotated[list[str], NoDecode]
# FAISS ParameterSpace settings for the ANN factories ("name=value,..."); each is ignored by index
# types that lack it. nprobe=32 / efSearch=128 gave recall@10 >= 0.97 in bench/search_ann.py.
DEFAULT_INDEX_SEARCH_PARAMS = "nprobe=32,efSearch=128"
_SEARCH_PARAMS = re.compile(r"^(\w+=\d+(\.\d+)?)(,\w+=\d+(\.\d+)?)*$")


def _split(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SIMCLR_EMBED_", extra="ignore", frozen=True)

    # -- where things live ------------------------------------------------------------------
    data_dir: Path = Field(Path("data"), description="holds models/ (registry), items/ (store, index), jobs/")
    store_url: str | None = Field(
        None,
        description="the item store: unset = the SQLite file <data_dir>/items/items.sqlite3 (one host), "
        "sqlite:///path for another file, postgresql://user@host:5432/db for several API hosts on one database",
    )
    store_pool_size: int = Field(8, ge=1, le=256, description="PostgreSQL connections per process (per store)")
    store_timeout_s: float = Field(
        5.0, gt=0.0, description="how long a write waits for the database before 503 (PostgreSQL)"
    )
    local_dir: Path | None = Field(
        None,
        description="this host's own folder (FAISS snapshots): unset = <data_dir>/hosts/<host name>, so replicas "
        "sharing one data dir (docker compose --scale) never share it; point it at local disk for fast restarts",
    )
    dataset_roots: CommaList = Field(
        default_factory=list, description="folders training datasets must lie under; default <data_dir>/datasets"
    )

    # -- HTTP -------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="when set, mutating routes need `Authorization: Bearer <key>` or `X-API-Key`"
    )
    require_key_for_reads: bool = False
    cors_origins: CommaList = Field(default_factory=list, description="CORS is closed unless origins are listed")

    # -- input limits -----------------------------------------------------------------------
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="per request, enforced while reading")
    max_image_pixels: int = Field(40_000_000, ge=64, description="refuses decompression bombs")
    max_images_per_request: int = Field(64, ge=1)
    max_request_pixels: int = Field(
        1_000_000_000, ge=64, description="all images of one request, width x height summed (decode time)"
    )
    decode_budget_pixels: int = Field(
        160_000_000,
        ge=64,
        description="pixels decoded at once by all requests (memory); at least max_image_pixels",
    )
    decode_wait_s: float = Field(
        10.0, ge=0.0, description="how long a request waits for decode budget before 503 with Retry-After"
    )

    # -- encoder runtime --------------------------------------------------------------------
    batch_max_size: int = Field(64, ge=1, description="micro-batching: most images per ONNX Runtime run")
    batch_max_wait_ms: float = Field(2.0, ge=0.0, description="micro-batching: longest wait to fill a batch")
    ort_intra_op_threads: int = Field(0, ge=0, description="0 = ONNX Runtime's default (all cores)")
    ort_inter_op_threads: int = Field(1, ge=0)
    ort_spin_wait: bool = Field(
        False,
        description="ONNX Runtime's threads busy-wait between runs (its own default; off leaves the cores "
        "to decoding sooner)",
    )
    ort_providers: CommaList = Field(default_factory=list, description="default: CUDA when present, else CPU")
    embed_variant: Literal["auto", "fp32", "int8"] = Field(
        "auto",
        description="which variant of a model embeds, for every process of the deployment: auto = int8 on CPU "
        "when the model has a verified one, else fp32; fp32 forces the reference; int8 wherever the model has it",
    )
    active_poll_s: float = Field(
        1.0, gt=0.0, description="how often the server checks models/active for a swap made elsewhere"
    )
    retired_model_ttl_s: float = Field(
        60.0,
        ge=0.0,
        description="a replaced model stays loaded this long after its last use (search during re-embedding)",
    )

    # -- index ------------------------------------------------------------------------------
    index_factory: str = Field(
        "Flat",
        description="FAISS index_factory string, inner product; e.g. HNSW32, IVF1024,Flat, or IVFauto,Flat "
        "(the number of lists follows the collection, chosen again at each retraining)",
    )
    index_search_params: str = Field(
        DEFAULT_INDEX_SEARCH_PARAMS,
        description="FAISS ParameterSpace string applied to ANN indexes at load and after training (recall vs speed)",
    )
    index_min_train_vectors: int = Field(
        10_000, ge=1, description="trainable indexes wait for this many vectors (IVF also for 39 per list)"
    )
    index_fresh_max: int = Field(
        10_000,
        ge=0,
        description="HNSW: new vectors searched exactly beside the graph until a background thread inserts them "
        "(an add costs the same at any size); past this many, adds insert into the graph themselves (0: always)",
    )
    index_snapshot_every: int = Field(
        1000,
        ge=1,
        description="changes between FAISS snapshots (at least a tenth of the index); written in the background",
    )
    originals_grace_s: float = Field(
        3_600.0, ge=0.0, description="an original no item refers to is deleted after this long (the sweep)"
    )
    originals_sweep_s: float = Field(60.0, gt=0.0, description="how often a host sweeps unreferenced originals")
    index_follow_s: float = Field(
        0.25, gt=0.0, le=10.0, description="how often the served index applies the store's change log"
    )
    index_log_retention_s: float = Field(
        86_400.0, ge=0.0, description="change-log rows already in this host's snapshot are kept this long"
    )
    index_filter_scan_max: int = Field(
        10_000, ge=0, description="filtered searches on IVF/HNSW scan the matching items exactly up to this many"
    )

    # -- classifiers ------------------------------------------------------------------------
    classifier_max_examples: int = Field(
        2000,
        ge=4,
        description="most labeled examples POST /classifiers fits synchronously; a larger set fits as a job "
        "(CV + fit at 512-d, one loaded core: 13 s at 1000, 74 s at 5000; bench/classifier_fit.py)",
    )
    classifier_job_max_examples: int = Field(
        50_000,
        ge=4,
        description="most labeled examples a classifier fit job takes (above: 413 too_many_examples); "
        "the examples travel in the job's record",
    )

    # -- jobs -------------------------------------------------------------------------------
    broker_url: str | None = Field(None, description="Redis URL; unset = `up` starts an embedded server")
    demo_on_empty: bool = Field(True, description="`up` trains a small demo encoder when the registry is empty")
    embedded_broker_port: int = Field(6390, ge=0, le=65535, description="`up`'s embedded Redis port; 0 = a free one")
    worker_concurrency: int = Field(1, ge=1, le=64, description="`worker` processes when --concurrency is not given")
    # The queue's safety margins (celery #5935/#6229: Redis redelivers a long job while it runs).
    job_lock_ttl_s: float = Field(
        60.0, ge=1.0, description="a job's owner lock expires this long after its worker's last heartbeat"
    )
    broker_visibility_timeout_s: int = Field(
        3600, ge=1, description="Redis redelivers an unacknowledged task after this long (kombu visibility_timeout)"
    )
    loss_history_max: int = Field(2000, ge=10, description="loss values kept per job (oldest dropped)")

    @field_validator("dataset_roots", "api_keys", "cors_origins", "ort_providers", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return _split(value)

    @field_validator("index_search_params")
    @classmethod
    def _parameter_space(cls, value: str) -> str:
        value = value.replace(" ", "")
        if value and not _SEARCH_PARAMS.match(value):
            raise ValueError("expected FAISS parameters as name=number pairs, e.g. 'nprobe=32,efSearch=128'")
        return value

    @field_validator("store_url")
    @classmethod
    def _store_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("sqlite:", "postgresql://", "postgres://")):
            raise ValueError("expected sqlite:///path/items.sqlite3 or postgresql://user@host:5432/database")
        return value or None

    @model_validator(mode="after")
    def _budget_fits_an_image(self) -> Settings:
        if self.decode_budget_pixels < self.max_image_pixels:
            raise ValueError(
                f"decode_budget_pixels ({self.decode_budget_pixels}) must be at least max_image_pixels "
                f"({self.max_image_pixels}), or an image at the limit could never be decoded"
            )
        return self

    @property
    def heartbeat_s(self) -> float:
        """Renew a job's lock three times per TTL, so one missed beat does not lose it."""
        return self.job_lock_ttl_s / 3

    @cached_property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @cached_property
    def items_dir(self) -> Path:
        return self.data_dir / "items"

    @property
    def uses_postgres(self) -> bool:
        return self.store_url is not None and self.store_url.startswith(("postgresql://", "postgres://"))

    @cached_property
    def sqlite_store_path(self) -> Path:
        """The SQLite item store's file (when not on PostgreSQL): sqlite:///abs/path, sqlite:relative/path."""
        if self.store_url is None:
            return self.items_dir / "items.sqlite3"
        path = self.store_url.removeprefix("sqlite:")
        return Path(path[2:] if path.startswith("//") else path)

    @cached_property
    def host_dir(self) -> Path:
        """This host's folder: `local_dir`, else one named after the host under the data dir."""
        return self.local_dir if self.local_dir is not None else self.data_dir / "hosts" / socket.gethostname()

    @cached_property
    def index_dir(self) -> Path:
        """Where this host keeps its FAISS snapshots."""
        return self.host_dir / "index"

    @cached_property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @cached_property
    def resolved_dataset_roots(self) -> list[Path]:
        roots = self.dataset_roots or [str(self.data_dir / "datasets")]
        return [Path(r).expanduser().resolve() for r in roots]


@lru_cache(maxsize=1)
def env_settings() -> Settings:
    """The environment's settings, for processes without an app (worker, tasks, `up`)."""
    return Settings()
