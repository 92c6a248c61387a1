"""Routes: fine-tuning jobs (`POST /finetune-jobs`): few labels on top of a finished pretraining
run. They share the job queue and records with pretraining: follow one at `GET /train-jobs/{id}`
and cancel it with `DELETE /train-jobs/{id}`. The model it publishes has `kind` "classifier"
(never activated as the encoder); `POST /classifiers` with method `finetune` serves it.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response, status

from service.api.deps import require_write_key
from service.api.errors import ApiError, error_responses
from service.api.routes.jobs import JobCreated, Jobs, broker, resolve_dataset
from service.contract.finetune_config import FinetuneJobRequest
from service.settings import Settings

router = APIRouter(prefix="/finetune-jobs", tags=["train-jobs"])

CHECKPOINT = ("checkpoints", "last.pt")  # trainer/checkpoint.py's layout of a run directory


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobCreated,
    dependencies=[Depends(require_write_key)],
    responses=error_responses(400, 401, 404, 409, 422, 503),
)
def submit_finetune_job(body: FinetuneJobRequest, request: Request, response: Response, jobs: Jobs) -> dict[str, Any]:
    """Queue a fine-tuning job; 202 with its id and its `/train-jobs/{id}` URL.

    Refused up front: a run without a checkpoint (409 `no_checkpoint`: it never started, or its
    folder is gone), a dataset outside the roots or missing (400 / 404, as for pretraining).
    """
    settings: Settings = request.app.state.settings
    if not settings.jobs_dir.joinpath(body.run, *CHECKPOINT).is_file():
        raise ApiError(
            409,
            "no_checkpoint",
            f"run {body.run!r} has no checkpoint under {settings.jobs_dir}; fine-tuning starts from a pretraining "
            "job's checkpoint (GET /train-jobs lists them)",
        )
    dataset = resolve_dataset(body.dataset, settings)
    with broker():
        record = jobs.submit(body, dataset)
    url = str(request.url_for("get_job", job_id=record.id))
    response.headers["Location"] = url
    return {"id": record.id, "url": url, "state": record.state.value}
