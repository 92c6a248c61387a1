"""Routes: few-label classifiers on the frozen embeddings (`/classifiers`).

`POST /classifiers` fits synchronously (cross-validation takes seconds) up to
`classifier_max_examples` labeled examples and answers 201 with the classifier. A larger set,
up to `classifier_job_max_examples`, is checked in the request as a fit would check it (the
same 4xx as below) and then fitted as a job on a worker (service/classifiers/fit_job.py): 202
with the job's id, its `GET /train-jobs/{job id}` URL and the id the classifier gets once the
job succeeds (`GET /classifiers/{classifier_id}`); a fit that fails on the worker (an item
deleted meanwhile, the name taken meanwhile) is the job's `error`.

| problem | status | code |
|---|---|---|
| no classifier with that id | 404 | `classifier_not_found` |
| the name is taken | 409 | `classifier_exists` |
| example items not in the index (listed) | 422 | `unknown_items` |
| one class only / a class with fewer than two examples | 422 | `one_class` / `too_few_examples` |
| a label that is not a string or an integer | 422 | `invalid_label` |
| an item with two different labels | 422 | `conflicting_labels` |
| no item has the `label_key` field | 422 | `no_examples` |
| items without a vector under the bound model | 409 | `items_not_embedded` |
| more examples than `classifier_job_max_examples` | 413 | `too_many_examples` |
| no index served yet | 503 | `index_not_ready` |
| finetune: no such model / not a classifier model | 404 / 422 | `model_not_found` / `not_a_classifier_model` |
| write-back into the field the labels came from | 422 | `overwrites_labels` |
| write-back, or a fit above `classifier_max_examples`, with no job broker | 503 | `jobs_unavailable` |

`POST /classifiers/{id}/write-back` queues a job (service/classifiers/write_back.py) that
stores every item's predicted label and its probability in two metadata fields; follow it at
`GET /train-jobs/{job id}`, cancel it with `DELETE /train-jobs/{job id}`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from service.api.deps import SettingsDep, read_images, require_read_key, require_write_key
from service.api.errors import ApiError, error_responses
from service.api.routes.jobs import Jobs, get_jobs, queue_job
from service.classifiers.fit_job import fit_job_for
from service.classifiers.schemas import (
    MAX_TOP_K,
    ClassifierCreate,
    ClassifierFitCreated,
    ClassifierList,
    ClassifierOut,
    PredictionOut,
    PredictRequest,
    PredictResponse,
    WriteBackCreated,
    WriteBackRequest,
)
from service.classifiers.service import (
    ClassifierError,
    ClassifierExistsError,
    ClassifierNotFoundError,
    ClassifierService,
    ItemsNotEmbeddedError,
    ModelNotFoundForClassifierError,
    NotReadyError,
    TooManyExamplesError,
)
from service.classifiers.storage import ClassifierRecord
from service.classifiers.write_back import job_for
from service.jobs.celery_app import INDEX_QUEUE

router = APIRouter(prefix="/classifiers", tags=["classifiers"])

_STATUS: dict[type[ClassifierError], int] = {
    ClassifierNotFoundError: 404,
    ModelNotFoundForClassifierError: 404,
    ClassifierExistsError: 409,
    ItemsNotEmbeddedError: 409,
    TooManyExamplesError: 413,
    NotReadyError: 503,
}


@contextmanager
def _as_http() -> Iterator[None]:
    """The service's own errors -> the API's error shape (422 unless listed above)."""
    try:
        yield
    except ClassifierError as exc:
        raise ApiError(_STATUS.get(type(exc), 422), exc.code, str(exc)) from exc


def get_classifiers(request: Request) -> ClassifierService:
    service = getattr(request.app.state, "classifiers", None)
    if service is None:
        raise ApiError(503, "classifiers_unavailable", "the classifier store is not open yet; retry in a moment")
    return service


ClassifiersDep = Annotated[ClassifierService, Depends(get_classifiers)]


@router.post(
    "",
    status_code=201,
    response_model=ClassifierOut,
    dependencies=[Depends(require_write_key)],
    responses={
        202: {"model": ClassifierFitCreated, "description": "more than `classifier_max_examples`: fitted as a job"},
        **error_responses(400, 401, 404, 409, 413, 422, 503),  # 400: a body that is not JSON
    },
)
async def create_classifier(
    body: ClassifierCreate, request: Request, response: Response, classifiers: ClassifiersDep
) -> ClassifierOut | JSONResponse:
    """Fit on the served model's vectors of the examples; answers with the cross-validated
    accuracy (201), or, above `classifier_max_examples`, queues the fit as a job (202)."""
    examples = None if body.examples is None else [(e.item_id, e.label) for e in body.examples]
    with _as_http():
        made = await run_in_threadpool(
            classifiers.create, body.name, body.method, examples, body.label_key, body.model_id
        )
    if isinstance(made, ClassifierRecord):
        return ClassifierOut.of(made, made.fits[0])
    job = fit_job_for(made)
    queued = await run_in_threadpool(queue_job, get_jobs(request), job, "items", request, response, queue=INDEX_QUEUE)
    answer = ClassifierFitCreated(
        **queued,
        classifier_id=job.classifier_id,
        name=job.classifier_name,
        method=job.classifier_method,
        model_id=job.model_id,
        examples=len(job.examples),
    )
    return JSONResponse(answer.model_dump(mode="json"), status_code=202, headers={"Location": queued["url"]})


@router.get("", response_model=ClassifierList, dependencies=[Depends(require_read_key)], responses=error_responses(401))
async def list_classifiers(classifiers: ClassifiersDep) -> ClassifierList:
    records = await run_in_threadpool(classifiers.all)
    return ClassifierList(classifiers=[ClassifierOut.of(r, classifiers.answering_fit(r)) for r in records])


@router.get(
    "/{classifier_id}",
    response_model=ClassifierOut,
    dependencies=[Depends(require_read_key)],
    responses=error_responses(401, 404),
)
async def get_classifier(classifier_id: str, classifiers: ClassifiersDep) -> ClassifierOut:
    with _as_http():
        record = await run_in_threadpool(classifiers.get, classifier_id)
    return ClassifierOut.of(record, classifiers.answering_fit(record))


@router.delete(
    "/{classifier_id}",
    status_code=204,
    dependencies=[Depends(require_write_key)],
    responses=error_responses(401, 404),
)
async def delete_classifier(classifier_id: str, classifiers: ClassifiersDep) -> Response:
    with _as_http():
        await run_in_threadpool(classifiers.delete, classifier_id)
    return Response(status_code=204)


_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {
                        "files": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"}},
                        "top_k": {"type": "integer", "minimum": 1, "maximum": MAX_TOP_K, "default": 3},
                    },
                }
            },
            "application/json": {
                "schema": {
                    "oneOf": [
                        PredictRequest.model_json_schema(),
                        {
                            "type": "object",
                            "required": ["images"],
                            "properties": {
                                "images": {
                                    "type": "array",
                                    "minItems": 1,
                                    "items": {"type": "string", "format": "byte"},
                                },
                                "top_k": {"type": "integer", "minimum": 1, "maximum": MAX_TOP_K, "default": 3},
                            },
                        },
                    ]
                }
            },
        },
    }
}


def _top_k(value: object) -> int:
    try:
        return PredictRequest.model_validate({"item_ids": ["_"], "top_k": value}).top_k
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("top_k",)} for e in exc.errors()]) from exc


@router.post(
    "/{classifier_id}/predict",
    response_model=PredictResponse,
    openapi_extra=_PREDICT_BODY,
    dependencies=[Depends(require_read_key)],
    responses=error_responses(401, 404, 409, 413, 415, 422, 503),
)
async def predict(
    classifier_id: str, request: Request, classifiers: ClassifiersDep, settings: SettingsDep
) -> PredictResponse:
    """Images (multipart `files` and a `top_k` field, or JSON `{"images": [base64], "top_k"}`) or
    JSON `{"item_ids": [...], "top_k"}` -> per input the label, its probability and the top-k classes."""
    with _as_http():
        await run_in_threadpool(classifiers.get, classifier_id)  # 404 before reading any image
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body: object = None
    if content_type == "application/json":
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(422, "malformed_json", f"the body is not valid JSON: {exc}") from exc
    with _as_http():
        if isinstance(body, dict) and "item_ids" in body:
            try:
                query = PredictRequest.model_validate(body)
            except ValidationError as exc:
                raise RequestValidationError(exc.errors()) from exc
            names = query.item_ids
            record, fit, predictions = await run_in_threadpool(
                classifiers.predict_items, classifier_id, query.item_ids, query.top_k
            )
        else:
            async with read_images(request, settings) as upload:
                if unexpected := sorted((set(upload.fields) | set(upload.body)) - {"top_k"}):
                    raise ApiError(
                        422,
                        "unexpected_fields",
                        f"predict takes images (or item_ids) and an optional top_k; unexpected: {', '.join(unexpected)}",
                    )
                fields = upload.fields.get("top_k")
                if fields is not None and len(fields) != 1:
                    raise ApiError(422, "invalid_request", f"send one `top_k` field, not {len(fields)}")
                top_k = _top_k(fields[0] if fields else upload.body.get("top_k", 3))
                names = [u.filename for u in upload.images]
                record, fit, predictions = await classifiers.predict_images(classifier_id, upload.encoded, top_k)
    return PredictResponse(
        classifier_id=record.id,
        model_id=fit.model_id,
        fit_id=fit.fit_id,
        predictions=[PredictionOut.of(n, p) for n, p in zip(names, predictions, strict=True)],
    )


@router.post(
    "/{classifier_id}/write-back",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=WriteBackCreated,
    dependencies=[Depends(require_write_key)],
    responses=error_responses(400, 401, 404, 422, 503),  # 400: a body that is not JSON
)
async def write_back(
    classifier_id: str,
    body: WriteBackRequest,
    request: Request,
    response: Response,
    classifiers: ClassifiersDep,
    jobs: Jobs,
) -> WriteBackCreated:
    """Queue a job that predicts every item with the answering fit and stores the label in
    `label_field` and its probability in `probability_field` (merged into each item's
    metadata), so that `POST /search` can filter on them; 202 with the job's id and URL."""
    assert body.probability_field is not None  # the schema defaults it
    with _as_http():
        record = await run_in_threadpool(classifiers.get, classifier_id)
        job = job_for(record, classifiers.answering_fit(record), body.label_field, body.probability_field)
    queued = await run_in_threadpool(queue_job, jobs, job, "items", request, response, queue=INDEX_QUEUE)
    return WriteBackCreated(
        **queued,
        classifier_id=job.classifier_id,
        fit_id=job.fit_id,
        model_id=job.model_id,
        label_field=job.label_field,
        probability_field=job.probability_field,
    )
