"""Job-side knobs not in :class:`service.settings.Settings`, read from the same `SIMCLR_EMBED_*` env.

They size the safety margins of the queue: how long a job's owner lock lives without a
heartbeat, how long Redis keeps a delivered-but-unacknowledged message before handing it to
another worker, and where the embedded broker of `simclr-embed up` listens.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class JobOptions(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SIMCLR_EMBED_", extra="ignore", frozen=True)

    job_lock_ttl_s: float = Field(
        60.0, ge=1.0, description="a job's owner lock expires this long after its worker's last heartbeat"
    )
    broker_visibility_timeout_s: int = Field(
        3600, ge=1, description="Redis redelivers an unacknowledged task after this long (kombu visibility_timeout)"
    )
    loss_history_max: int = Field(2000, ge=10, description="loss values kept per job (oldest dropped)")
    embedded_broker_port: int = Field(6390, ge=0, le=65535, description="`up`'s embedded Redis port; 0 = a free one")
    worker_concurrency: int = Field(1, ge=1, le=64, description="`worker` processes when --concurrency is not given")

    @property
    def heartbeat_s(self) -> float:
        """Renew the lock three times per TTL, so one missed beat does not lose it."""
        return self.job_lock_ttl_s / 3


@lru_cache(maxsize=1)
def job_options() -> JobOptions:
    return JobOptions()
