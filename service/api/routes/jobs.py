"""Routes: training jobs (`/train-jobs`). The job schema is the shared TrainJobRequest."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response, status
from pydantic import BaseModel

from service.api.deps import Offset, require_read_key, require_write_key
from service.api.errors import ApiError, error_responses
from service.contract.train_config import TrainJobRequest
from service.jobs.client import JobClient, JobsUnavailableError
from service.jobs.store import JobKind, JobRecord
from service.settings import Settings

if TYPE_CHECKING:
    from service.jobs.client import JobRequest

router = APIRouter(prefix="/train-jobs", tags=["train-jobs"])


class JobCreated(BaseModel):
    id: str
    url: str
    state: str


class JobPage(BaseModel):
    total: int
    offset: int
    limit: int
    items: list[JobRecord]


def get_jobs(request: Request) -> JobClient:
    jobs = getattr(request.app.state, "jobs", None)
    if jobs is None:
        raise ApiError(503, "jobs_unavailable", "the job queue is not configured on this server")
    return jobs


def resolve_under_roots(raw: str, settings: Settings, what: str = "dataset") -> Path:
    """The real path of `raw` (a `what`: dataset, metadata file), which must exist under a
    dataset root after `..` and symlinks resolve. A relative path is taken under the first root.

    A path that escapes answers 400 `<what>_outside_roots`; one that does not exist answers
    404 `<what>_not_found`; one the OS refuses (NUL bytes, loops) 400 `invalid_<what>_path`.
    """
    roots = settings.resolved_dataset_roots
    candidate = Path(raw)  # no `~` expansion: a path names a place under the roots, not a user's home
    try:
        resolved = (candidate if candidate.is_absolute() else roots[0] / candidate).resolve()
        resolved.stat()  # NUL bytes, over-long names and symlink loops surface here as errors
    except FileNotFoundError:
        pass  # checked below, once the path is known to lie under a root
    except (ValueError, OSError, RuntimeError) as exc:
        raise ApiError(400, f"invalid_{what}_path", f"{what} {raw!r} is not a usable path: {exc}") from exc
    if not any(resolved.is_relative_to(root) for root in roots):
        listed = ", ".join(str(r) for r in roots)
        raise ApiError(400, f"{what}_outside_roots", f"{what} {raw!r} lies outside the dataset roots ({listed})")
    if not resolved.exists():
        raise ApiError(404, f"{what}_not_found", f"{what} {raw!r} does not exist under the dataset roots")
    return resolved


def resolve_dataset(raw: str, settings: Settings) -> Path:
    """A dataset's real path under a root (see resolve_under_roots): a folder or an .npz file,
    else 400 `dataset_unsupported`."""
    resolved = resolve_under_roots(raw, settings)
    if not (resolved.is_dir() or (resolved.is_file() and resolved.suffix == ".npz")):
        raise ApiError(400, "dataset_unsupported", f"dataset {raw!r} must be a folder of images or a .npz file")
    return resolved


@contextmanager
def broker() -> Iterator[None]:
    """Broker trouble answers 503 `jobs_unavailable` rather than a 500."""
    try:
        yield
    except JobsUnavailableError as exc:
        raise ApiError(503, exc.code, str(exc)) from exc


def found(record: JobRecord | None, job_id: str, kind: JobKind = "train") -> JobRecord:
    """The record of a job of `kind`, else 404 `job_not_found`."""
    if record is None or record.kind != kind:
        what = "training" if kind == "train" else "indexing"
        raise ApiError(404, "job_not_found", f"no {what} job {job_id!r}")
    return record


Jobs = Annotated[JobClient, Depends(get_jobs)]


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobCreated,
    dependencies=[Depends(require_write_key)],
    responses=error_responses(400, 401, 404, 422, 503),
)
def submit_job(body: TrainJobRequest, request: Request, response: Response, jobs: Jobs) -> dict[str, Any]:
    """Queue a pretraining job; 202 with its id and URL. Poll the URL for progress.

    Refused up front: invalid fields (422 `invalid_request` with `fields`), a dataset outside
    the roots (400 `dataset_outside_roots`), missing (404 `dataset_not_found`) or neither a
    folder nor an .npz (400 `dataset_unsupported`), no broker (503 `jobs_unavailable`).
    Found by the worker, which reads the images: a dataset with no readable image, or fewer
    images than one batch; the job then ends `failed` with `error` saying so (for example
    `no_readable_images: no image under ... could be decoded`).
    """
    dataset = resolve_dataset(body.dataset, request.app.state.settings)
    return queue_job(jobs, body, dataset, request, response)


def queue_job(
    jobs: JobClient,
    body: JobRequest,
    dataset: Path | str,
    request: Request,
    response: Response,
    route: str = "get_job",
    queue: str | None = None,
) -> dict[str, Any]:
    """Submit `body` (on `queue`, default its task's route) and answer as every job route does:
    id, the URL of its `route` (also in Location) and its state."""
    with broker():
        record = jobs.submit(body, dataset, queue)
    url = str(request.url_for(route, job_id=record.id))
    response.headers["Location"] = url
    return {"id": record.id, "url": url, "state": record.state.value}


@router.get("", response_model=JobPage, dependencies=[Depends(require_read_key)], responses=error_responses(401, 503))
def list_jobs(jobs: Jobs, offset: Offset = 0, limit: Annotated[int, Query(ge=1, le=200)] = 50) -> JobPage:
    """Jobs, newest first, without loss histories."""
    with broker():
        total, items = jobs.list(offset=offset, limit=limit)
    return JobPage(total=total, offset=offset, limit=limit, items=items)


@router.get(
    "/{job_id}",
    response_model=JobRecord,
    dependencies=[Depends(require_read_key)],
    responses=error_responses(401, 404, 503),
)
def get_job(job_id: str, jobs: Jobs) -> JobRecord:
    with broker():
        return found(jobs.get(job_id), job_id)


@router.delete(
    "/{job_id}",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobRecord,
    dependencies=[Depends(require_write_key)],
    responses=error_responses(401, 404, 503),
)
def cancel_job(job_id: str, jobs: Jobs) -> JobRecord:
    """Cancel: a queued job at once; a running one stops at its next step and keeps its checkpoint."""
    with broker():
        found(jobs.get(job_id), job_id)
        return found(jobs.cancel(job_id), job_id)
