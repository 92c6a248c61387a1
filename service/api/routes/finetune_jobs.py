"""Routes: fine-tuning jobs (`POST /finetune-jobs`): few labels on top of a finished pretraining
run. They share the job queue and records with pretraining: follow one at `GET /train-jobs/{id}`
and cancel it with `DELETE /train-jobs/{id}`. The model it publishes has `kind` "classifier"
(never activated as the encoder); `POST /classifiers` with method `finetune` serves it.

The labels come as a `dataset` under a dataset root, or as for classifiers over the stored
items' originals: `examples` or `label_key`, checked here with the classifier service's rules
(422 `unknown_items` listing them, `one_class`, `too_few_examples`, `invalid_label`,
`conflicting_labels`, `no_examples`) before anything is queued; `label_key` is resolved into
the job's `examples` then, so the job trains on exactly the labels that were checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request, Response, status

from service.api.deps import require_write_key
from service.api.errors import ApiError, error_responses
from service.api.routes.classifiers import ClassifiersDep, _as_http
from service.api.routes.jobs import JobCreated, Jobs, queue_job, resolve_dataset
from service.contract.finetune_config import FinetuneExample, FinetuneJobRequest
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
def submit_finetune_job(
    body: FinetuneJobRequest, request: Request, response: Response, jobs: Jobs, classifiers: ClassifiersDep
) -> dict[str, Any]:
    """Queue a fine-tuning job; 202 with its id and its `/train-jobs/{id}` URL.

    Refused up front: a run without a checkpoint (409 `no_checkpoint`: it never started, or its
    folder is gone), a dataset outside the roots or missing (400 / 404, as for pretraining),
    labeled items that do not make a training set (422, see the module docstring).
    """
    settings: Settings = request.app.state.settings
    if not settings.jobs_dir.joinpath(body.run, *CHECKPOINT).is_file():
        raise ApiError(
            409,
            "no_checkpoint",
            f"run {body.run!r} has no checkpoint under {settings.jobs_dir}; fine-tuning starts from a pretraining "
            "job's checkpoint (GET /train-jobs lists them)",
        )
    dataset: Path | str
    if body.dataset is not None:
        dataset = resolve_dataset(body.dataset, settings)
    else:
        given = None if body.examples is None else [(e.item_id, e.label) for e in body.examples]
        with _as_http():
            pairs = classifiers.finetune_examples(given, body.label_key)
        examples = [FinetuneExample(item_id=i, label=label) for i, label in pairs]
        dataset = f"items ({len(pairs)} labeled" + (f" by {body.label_key!r})" if body.label_key else ")")
        body = body.model_copy(update={"examples": examples, "label_key": None})
    return queue_job(jobs, body, dataset, request, response)
