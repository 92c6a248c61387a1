"""Routes: bulk indexing jobs (`/index-jobs`): every image of a dataset under a dataset root
into the item store, on a worker (service.items.bulk, the code behind `simclr-embed index`).

States and progress are those of training jobs (service.jobs.store): `progress.step` counts
the images gone through, of `progress.total_steps`, and `progress.index` holds the tallies
(added, replaced, skipped, failed, vanished, deleted). The items become searchable as they
are committed: the API's served index follows the store's change log.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response, status

from service.api.deps import Offset, require_read_key, require_write_key
from service.api.errors import ApiError, error_responses
from service.api.routes.jobs import (
    JobCreated,
    JobPage,
    Jobs,
    broker,
    found,
    queue_job,
    resolve_dataset,
    resolve_under_roots,
)
from service.contract.index_config import IndexJobRequest
from service.contract.registry import ModelRegistry
from service.jobs.store import JobRecord
from service.settings import Settings

router = APIRouter(prefix="/index-jobs", tags=["index-jobs"])

SIDECAR_SUFFIXES = (".jsonl", ".ndjson", ".csv")


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobCreated,
    dependencies=[Depends(require_write_key)],
    responses=error_responses(400, 401, 404, 409, 422, 503),
)
def submit_index_job(body: IndexJobRequest, request: Request, response: Response, jobs: Jobs) -> dict[str, Any]:
    """Queue a bulk indexing job; 202 with its id and URL. Poll the URL for progress.

    Refused up front: invalid fields (422 `invalid_request` with `fields`), a dataset or
    metadata file outside the roots (400 `dataset_outside_roots` / `metadata_outside_roots`)
    or missing (404 `dataset_not_found` / `metadata_not_found`), a dataset that is neither a
    folder nor an .npz (400 `dataset_unsupported`), a metadata file that is not .jsonl or .csv
    (400 `metadata_unsupported`), no active model (409 `no_active_model`), no broker (503
    `jobs_unavailable`). Found by the worker as it reads them: an unreadable sidecar or .npz,
    file names that repeat with `ids: "stem"`; the job then ends `failed` with `error`
    saying so. Images that cannot be decoded are counted in `progress.index.failed`.
    """
    settings: Settings = request.app.state.settings
    dataset = resolve_dataset(body.dataset, settings)
    if body.metadata is not None:
        sidecar = resolve_under_roots(body.metadata, settings, "metadata")
        if not sidecar.is_file() or sidecar.suffix.lower() not in SIDECAR_SUFFIXES:
            raise ApiError(
                400, "metadata_unsupported", f"metadata {body.metadata!r} must be a .jsonl or .csv file keyed by `path`"
            )
        body = body.model_copy(update={"metadata": str(sidecar)})
    if ModelRegistry(settings.models_dir).active() is None:
        raise ApiError(
            409, "no_active_model", "no encoder model is active: train one (POST /train-jobs) or activate one"
        )
    return queue_job(jobs, body, dataset, request, response, "get_index_job")


@router.get("", response_model=JobPage, dependencies=[Depends(require_read_key)], responses=error_responses(401, 503))
def list_index_jobs(jobs: Jobs, offset: Offset = 0, limit: Annotated[int, Query(ge=1, le=200)] = 50) -> JobPage:
    """Indexing jobs, newest first."""
    with broker():
        total, items = jobs.list(offset=offset, limit=limit, kind="index")
    return JobPage(total=total, offset=offset, limit=limit, items=items)


@router.get(
    "/{job_id}",
    response_model=JobRecord,
    dependencies=[Depends(require_read_key)],
    responses=error_responses(401, 404, 503),
)
def get_index_job(job_id: str, jobs: Jobs) -> JobRecord:
    with broker():
        return found(jobs.get(job_id), job_id, "index")


@router.delete(
    "/{job_id}",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobRecord,
    dependencies=[Depends(require_write_key)],
    responses=error_responses(401, 404, 503),
)
def cancel_index_job(job_id: str, jobs: Jobs) -> JobRecord:
    """Cancel: a queued job at once; a running one after its current batch. What it committed stays
    indexed; submitting the same dataset again goes on from there."""
    with broker():
        found(jobs.get(job_id), job_id, "index")
        return found(jobs.cancel(job_id), job_id, "index")
