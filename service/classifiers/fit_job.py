"""A classifier fit as a job: `POST /classifiers` with more examples than
`classifier_max_examples` (CV and fit take minutes there, not seconds) is checked in the
request and then fitted on a worker (trainer/tasks.py, `index` queue).

The worker runs the synchronous path's own fit (`example_vectors` + `fit_examples`, same
order of examples, so the same folds and the same fit) on the vectors of the model served at
submission, and stores the classifier as the API would (`store_new`) under the id the 202
named. The refit watcher of the API then treats it like any classifier (a refit when another
model is served). A redelivered job whose classifier is already stored succeeds at once. A
queued job is cancelled as any job (`DELETE /train-jobs/{id}`); a running one is one fit and
runs to its end.
"""

from __future__ import annotations

import numpy as np

from service.classifiers.schemas import ClassifierFitJob
from service.classifiers.service import PendingFit, example_vectors, fit_examples, store_new
from service.classifiers.storage import ClassifierRecord, open_classifiers
from service.items.reindex import open_store
from service.items.sqlstore import SqlItemStore
from service.settings import Settings


class _StoreVectors:
    """The worker's item store as a VectorSource."""

    def __init__(self, store: SqlItemStore) -> None:
        self._store = store

    def vector(self, item_id: str, model_id: str) -> np.ndarray | None:
        return self._store.vector(item_id, model_id)

    def exists(self, item_id: str) -> bool:
        return self._store.get(item_id) is not None


def fit_job_for(pending: PendingFit) -> ClassifierFitJob:
    """The job's request: what the worker needs, and the id the classifier is stored under."""
    return ClassifierFitJob.model_validate(
        {
            "classifier_id": pending.classifier_id,
            "classifier_name": pending.name,
            "classifier_method": pending.method,
            "label_key": pending.label_key,
            "model_id": pending.model_id,
            "examples": [{"item_id": item_id, "label": label} for item_id, label in pending.pairs],
            "name": f"fit classifier: {pending.name}",
        }
    )


def run_fit_job(settings: Settings, job: ClassifierFitJob) -> ClassifierRecord:
    """Fit and store the classifier (see the module doc); ClassifierError when the examples no
    longer fit (an item deleted or its vector gone since submission, the name taken since)."""
    store, _ = open_store(settings)
    try:
        classifiers = open_classifiers(settings, store)
        if (done := classifiers.get(job.classifier_id)) is not None:
            return done
        pairs = [(e.item_id, e.label) for e in job.examples]
        x, labels = example_vectors(_StoreVectors(store), pairs, job.model_id, drop_missing=False)
        fit = fit_examples(job.classifier_method, x, labels, job.model_id)
        return store_new(
            classifiers, job.classifier_id, job.classifier_name, job.classifier_method, job.label_key, pairs, fit
        )
    finally:
        store.close()
