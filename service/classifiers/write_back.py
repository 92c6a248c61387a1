"""Write-back: predict every stored item with a classifier and store the label and its
probability in two metadata fields, so that filtered search (`POST /search` with `filter`)
can use them, e.g. `{"filter": {"predicted": 3, "predicted_probability": {"gte": 0.9}}}`.

It runs as a job on a worker (trainer/tasks.py, `index` queue), not in the API process: a
collection of a million items takes minutes. The fit is pinned when the job is submitted (the
one answering predictions then), so every item is labeled by the same fit even if the
classifier is refitted meanwhile; the job fails with `fit_not_found` if that fit is gone.

The walk goes by item pk in pages of `page_size`, so items added or deleted meanwhile never
make it skip or repeat one (items added after it passed are not labeled: run it again). Per
page: the items' stored vectors under the fit's model (a fitted `logreg`/`knn`), or their
decoded originals (a fine-tuned classifier model), give the probabilities; the labels then go
into the item store in one transaction through its metadata merge, the one `PATCH
/items/{id}` uses (`update_metadata_many`: other metadata fields are kept, and a concurrent
PATCH of another field is not lost). Items lacking a vector under the fit's model, or whose
original cannot be decoded, are skipped and counted. A redelivered job starts over and
writes the same values: it is idempotent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.classifiers.schemas import WriteBackJob
from service.classifiers.service import (
    ClassifierError,
    ClassifierModel,
    ClassifierNotFoundError,
    InvalidExamplesError,
    predictor,
    ranked,
)
from service.classifiers.storage import ClassifierRecord, ClassifierStore, Fit, open_classifiers
from service.contract.imaging import ImageDecodeError, decode_image
from service.contract.registry import ModelRegistry
from service.items.backend import Item
from service.items.blobs import BlobStore
from service.items.reindex import open_store
from service.items.sqlstore import SqlItemStore
from service.settings import Settings

log = logging.getLogger(__name__)
PAGE_SIZE = 500


class FitGoneError(ClassifierError):
    code = "fit_not_found"


@dataclass
class WriteBackReport:
    total: int  # items in the store when the walk began
    walked: int = 0
    written: int = 0
    skipped: list[str] = field(default_factory=list)  # ids: no vector under the fit's model, or no readable original
    stopped: bool = False

    def progress(self) -> dict[str, Any]:
        """For the job record (service.jobs.store.JobProgress): items walked of the total."""
        warning = (
            f"{len(self.skipped)} item(s) not labeled (no vector under the fit's model, or an unreadable original)"
            if self.skipped
            else None
        )
        return {"step": self.walked, "total_steps": max(self.total, self.walked), "warning": warning}


Scorer = Callable[[Sequence[Item]], tuple[list[str], np.ndarray]]  # items -> (ids scored, proba [n, K])


def _vector_scorer(store: SqlItemStore, record: ClassifierRecord, fit: Fit) -> Scorer:
    model = predictor(record.method, fit)

    def score(items: Sequence[Item]) -> tuple[list[str], np.ndarray]:
        by_pk = {item.pk: item.id for item in items}
        pks, vectors = store.vectors_of(fit.model_id, list(by_pk))  # [n], [n, D]
        if not len(pks):
            return [], np.zeros((0, len(fit.classes)))
        return [by_pk[int(pk)] for pk in pks], model.predict_proba(vectors)

    return score


def _image_scorer(settings: Settings, blobs: BlobStore, fit: Fit) -> Scorer:
    model = ClassifierModel.load(ModelRegistry(settings.models_dir), fit.model_id, settings)

    def score(items: Sequence[Item]) -> tuple[list[str], np.ndarray]:
        ids, images = [], []
        for item in items:
            try:
                images.append(decode_image(blobs.get(item.sha256), max_pixels=settings.max_image_pixels))
                ids.append(item.id)
            except (OSError, ImageDecodeError) as exc:
                log.error("item %s: original unusable for write-back: %s", item.id, exc)
        if not images:
            return [], np.zeros((0, len(fit.classes)))
        return ids, model.predict_proba(images)

    return score


def pinned_fit(classifiers: ClassifierStore, job: WriteBackJob) -> tuple[ClassifierRecord, Fit]:
    """The classifier and the fit the job was submitted with; ClassifierError when gone."""
    record = classifiers.get(job.classifier_id)
    if record is None:
        raise ClassifierNotFoundError(f"classifier {job.classifier_id!r} was deleted before its write-back ran")
    fit = next((f for f in record.fits if f.fit_id == job.fit_id), None)
    if fit is None:
        raise FitGoneError(
            f"fit {job.fit_id} of classifier {job.classifier_id} is gone (refitted on the same model); submit again"
        )
    return record, fit


def write_back(
    settings: Settings,
    job: WriteBackJob,
    *,
    should_stop: Callable[[], bool] = lambda: False,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    page_size: int = PAGE_SIZE,
) -> WriteBackReport:
    """Label every item (see the module doc); returns early with `stopped` when asked."""
    store, blobs = open_store(settings)
    try:
        record, fit = pinned_fit(open_classifiers(settings, store), job)
        score = (
            _image_scorer(settings, blobs, fit) if record.method == "finetune" else _vector_scorer(store, record, fit)
        )
        report, after = WriteBackReport(total=store.count()), 0
        while items := store.items_after(after, page_size):
            if should_stop():
                report.stopped = True
                return report
            after = items[-1].pk
            ids, proba = score(items)
            scored = set(ids)
            report.skipped += [item.id for item in items if item.id not in scored]
            changes = [
                (item_id, {job.label_field: p.label, job.probability_field: p.probability})
                for item_id, p in zip(ids, ranked(fit, proba, 1), strict=True)
            ]
            # An item deleted since the page was read comes back None: nothing to label.
            report.written += sum(r is not None for r in store.update_metadata_many(changes, merge=True))
            report.walked += len(items)
            if on_progress is not None:
                on_progress(report.progress())
        return report
    finally:
        store.close()


def job_for(record: ClassifierRecord, fit: Fit, label_field: str, probability_field: str) -> WriteBackJob:
    """The job that writes `record`'s predictions by `fit` into the two fields; refused
    (`overwrites_labels`) when a field is the metadata field the classifier's labels came from."""
    if record.label_key in (label_field, probability_field):
        raise InvalidExamplesError(
            f"the field {record.label_key!r} holds the labels this classifier was fitted on; "
            "write the predictions to another field",
            "overwrites_labels",
        )
    return WriteBackJob(
        classifier_id=record.id,
        fit_id=fit.fit_id,
        model_id=fit.model_id,
        label_field=label_field,
        probability_field=probability_field,
        name=f"write-back: {record.name}",
    )
