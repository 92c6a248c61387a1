"""ClassifierService: few-label classifiers on the frozen embeddings of indexed items.

A classifier is bound to the model whose index is served when it is created: its examples'
stored vectors under that model are fitted (logistic regression or kNN, `fit.py`) and the
fit is stored with its cross-validated accuracy. When another model's index becomes the
served one (re-embedding finished), a background thread refits every classifier from its
examples on the new vectors; until then predictions come from the previous fit, embedded
with the previous model, as search answers from the previous index. Every prediction names
the model and the fit it came from.

Examples given as `label_key` are read from the items' metadata once, at creation, and kept
as (item id, label) pairs: a refit uses the same examples, so accuracies stay comparable.
Errors are this module's own (`ClassifierError` subclasses); the API layer maps them to HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort
from PIL import Image

from service.classifiers.fit import (
    CrossValidation,
    Knn,
    LogReg,
    cross_validate_knn,
    cross_validate_logreg,
    fit_knn,
    fit_logreg,
)
from service.classifiers.storage import (
    ClassifierRecord,
    ClassifierStore,
    DuplicateNameError,
    Fit,
    Label,
    open_classifiers,
)
from service.contract.encoder_io import INPUT_NAME
from service.contract.imaging import EncodedImages, ImageDecodeError, ResizePolicy, decode_image
from service.contract.registry import ModelCard, ModelNotFoundError, ModelRegistry
from service.items.service import ItemService
from service.items.store import Item
from service.runtime import open_session
from service.settings import Settings

log = logging.getLogger(__name__)

METHODS = ("logreg", "knn", "finetune")
FITTED_METHODS = ("logreg", "knn")  # fitted on stored vectors (and refitted); finetune is a registry model
REFIT_POLL_S = 1.0
SHOWN_IDS = 10


# -- errors -------------------------------------------------------------------------------


class ClassifierError(Exception):
    """Base: `code` is the stable id the API sends; the message says what to do."""

    code = "classifier_error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code or self.code


class ClassifierNotFoundError(ClassifierError):
    code = "classifier_not_found"


class ClassifierExistsError(ClassifierError):
    code = "classifier_exists"

    @classmethod
    def named(cls, name: str) -> ClassifierExistsError:
        return cls(f"a classifier named {name!r} exists; pick another name or delete it")


class InvalidExamplesError(ClassifierError):
    """One class only, fewer than two examples of a class, a label of the wrong type, ..."""

    code = "invalid_examples"


class UnknownItemsError(ClassifierError):
    code = "unknown_items"

    def __init__(self, ids: list[str]) -> None:
        shown = ", ".join(repr(i) for i in ids[:SHOWN_IDS]) + (
            f" and {len(ids) - SHOWN_IDS} more" if len(ids) > SHOWN_IDS else ""
        )
        super().__init__(f"{len(ids)} item id(s) are not in the index: {shown}; add them with POST /items first")
        self.ids = ids


class ItemsNotEmbeddedError(ClassifierError):
    code = "items_not_embedded"

    def __init__(self, ids: list[str], model_id: str) -> None:
        shown = ", ".join(repr(i) for i in ids[:SHOWN_IDS])
        super().__init__(
            f"{len(ids)} item(s) have no vector under model {model_id} yet ({shown}); retry once re-embedding finishes"
        )
        self.ids = ids


class ModelNotFoundForClassifierError(ClassifierError):
    code = "model_not_found"


class TooManyExamplesError(ClassifierError):
    code = "too_many_examples"


class NotReadyError(ClassifierError):
    code = "index_not_ready"


# -- what the service needs of the rest ---------------------------------------------------


class ItemSource:
    """The one place that reads the item service: the served model, metadata pages, stored vectors."""

    def __init__(self, items: ItemService) -> None:
        self._items = items

    @property
    def served(self) -> str | None:
        return self._items.served

    def page(self, offset: int, limit: int) -> tuple[list[Item], int]:
        return self._items.page(offset, limit)

    def vector(self, item_id: str, model_id: str) -> np.ndarray | None:
        return self._items.store.vector(item_id, model_id)

    def exists(self, item_id: str) -> bool:
        return self._items.store.get(item_id) is not None

    def image(self, item_id: str) -> Image.Image | None:
        """The item's original, decoded; None when the item (or its original) is gone."""
        item = self._items.store.get(item_id)
        if item is None:
            return None
        try:
            return decode_image(self._items.blobs.get(item.sha256), max_pixels=self._items.settings.max_image_pixels)
        except (OSError, ImageDecodeError):
            return None


class ClassifierModel:
    """A fine-tuned classifier from the registry (trainer/finetune.py): images -> probabilities."""

    def __init__(self, card: ModelCard, session: ort.InferenceSession) -> None:
        self.card = card
        self.session = session
        self.policy = ResizePolicy.from_json(card.resize_policy)

    @classmethod
    def load(cls, registry: ModelRegistry, model_id: str, settings: Settings) -> ClassifierModel:
        card, path = registry.verify(model_id)  # sha256 checked
        return cls(card, open_session(path, settings))

    def predict_proba(self, images: Sequence[Image.Image] | EncodedImages) -> np.ndarray:
        """Images (decoded RGB, or a request's encoded ones) -> float32 [N, K] over the card's classes."""
        pixels = images.batch(self.policy) if isinstance(images, EncodedImages) else self.policy.batch(list(images))
        (proba,) = self.session.run(["probabilities"], {INPUT_NAME: pixels})
        return proba


class Runtime(Protocol):
    async def embed(self, images: EncodedImages, model_id: str | None = None) -> tuple[str, np.ndarray]: ...

    def add_listener(self, callback: Any) -> None: ...


@dataclass(frozen=True)
class Prediction:
    label: Label
    probability: float
    top_k: list[tuple[Label, float]]


# -- labels -------------------------------------------------------------------------------


def _check_label(label: object, where: str) -> Label:
    if isinstance(label, bool) or not isinstance(label, str | int):
        raise InvalidExamplesError(
            f"{where}: labels must be strings or integers, got {type(label).__name__} {label!r}", "invalid_label"
        )
    if isinstance(label, str) and not 1 <= len(label) <= 200:
        raise InvalidExamplesError(f"{where}: a label must be 1-200 characters", "invalid_label")
    return label


def label_order(label: Label) -> tuple[bool, int | str]:
    """Integers first (numerically), then strings: a total order over mixed labels."""
    return (isinstance(label, str), label)


def _encode(labels: Sequence[Label]) -> tuple[list[Label], np.ndarray, list[int]]:
    """Labels -> (classes in order, class index int64 [N], count per class), checked for a fit."""
    classes = sorted(set(labels), key=label_order)
    if len(classes) < 2:
        raise InvalidExamplesError(
            f"all examples have the label {classes[0]!r}"
            if classes
            else "no labeled examples were given; a classifier needs at least two classes",
            "one_class" if classes else "no_examples",
        )
    index = {c: i for i, c in enumerate(classes)}
    y = np.asarray([index[label] for label in labels], dtype=np.int64)
    counts = np.bincount(y, minlength=len(classes)).tolist()
    if few := [f"{c!r} ({n})" for c, n in zip(classes, counts, strict=True) if n < 2]:
        raise InvalidExamplesError(
            f"every class needs at least two examples (for cross-validation); too few: {', '.join(few[:SHOWN_IDS])}",
            "too_few_examples",
        )
    return classes, y, counts


# -- the service --------------------------------------------------------------------------


def predictor(method: str, fit: Fit) -> LogReg | Knn:
    p = fit.params
    if method == "logreg":
        return LogReg(p["weights"], p["bias"], float(p["C"]), 0)
    return Knn(p["vectors"], p["labels"], len(fit.classes), int(p["k"]), float(p["temperature"]))


def fit_examples(method: str, x: np.ndarray, labels: Sequence[Label], model_id: str) -> Fit:
    """Cross-validate, then fit on all examples: x float [N, D] (stored vectors), labels [N]."""
    classes, y, counts = _encode(labels)
    cv: CrossValidation
    params: dict[str, np.ndarray]
    if method == "logreg":
        cv = cross_validate_logreg(x, y, len(classes))
        assert cv.C is not None
        # The served fit to a tighter tolerance than the CV grid's: it is one fit, and it is what answers.
        model = fit_logreg(x, y, len(classes), cv.C, tol=1e-9, max_iter=5000)
        params = {"weights": model.weights, "bias": model.bias, "C": np.asarray(cv.C)}
    else:
        cv = cross_validate_knn(x, y, len(classes))
        knn = fit_knn(x, y, len(classes))
        params = {
            "vectors": knn.vectors,
            "labels": knn.labels,
            "k": np.asarray(knn.k),
            "temperature": np.asarray(knn.temperature),
        }
    summary = {
        "accuracy": cv.accuracy,
        "std": cv.std,
        "fold_accuracies": cv.fold_accuracies,
        "n_folds": cv.n_folds,
        "confusion": cv.confusion,
        "C": cv.C,
        "grid": cv.grid,
        "examples": len(y),
    }
    return Fit(uuid.uuid4().hex[:12], model_id, time.time(), classes, counts, summary, params)


def predict(method: str, fit: Fit, x: np.ndarray, top_k: int) -> list[Prediction]:
    """x float [M, D] under `fit.model_id` -> one prediction per row, top-k classes best first."""
    return ranked(fit, predictor(method, fit).predict_proba(x), top_k)


def ranked(fit: Fit, proba: np.ndarray, top_k: int) -> list[Prediction]:
    """Probabilities [M, K] over `fit.classes` -> one prediction per row, top-k classes best first."""
    k = min(top_k, len(fit.classes))
    order = np.argsort(-proba, axis=1, kind="stable")[:, :k]  # [M, k]
    out = []
    for row, best in zip(proba, order, strict=True):
        top = [(fit.classes[int(c)], float(row[c])) for c in best]
        out.append(Prediction(top[0][0], top[0][1], top))
    return out


class VectorSource(Protocol):
    """Stored vectors by item id: the API's item service (ItemSource) or a worker's item store."""

    def vector(self, item_id: str, model_id: str) -> np.ndarray | None: ...

    def exists(self, item_id: str) -> bool: ...


def example_vectors(
    source: VectorSource, pairs: Sequence[tuple[str, Label]], model_id: str, *, drop_missing: bool
) -> tuple[np.ndarray, list[Label]]:
    """The examples' stored `model_id` vectors float32 [N, D] and their labels [N], in `pairs`
    order (the folds depend on it). Unknown ids raise UnknownItemsError unless `drop_missing`
    (a refit skips items deleted since); ids without a vector raise ItemsNotEmbeddedError."""
    rows: list[np.ndarray] = []
    labels: list[Label] = []
    unknown: list[str] = []
    unembedded: list[str] = []
    for item_id, label in pairs:
        vector = source.vector(item_id, model_id)
        if vector is None:
            (unembedded if source.exists(item_id) else unknown).append(item_id)
        else:
            rows.append(vector)
            labels.append(label)
    if unknown and not drop_missing:
        raise UnknownItemsError(unknown)
    if unembedded:
        raise ItemsNotEmbeddedError(unembedded, model_id)
    return (np.stack(rows) if rows else np.zeros((0, 1), dtype=np.float32)), labels


def store_new(
    store: ClassifierStore,
    classifier_id: str,
    name: str,
    method: str,
    label_key: str | None,
    pairs: list[tuple[str, Label]],
    fit: Fit,
) -> ClassifierRecord:
    """Store a new classifier with its first fit (the API's synchronous fit and a fit job alike)."""
    try:
        return store.create(classifier_id, name, method, label_key, pairs, fit)
    except DuplicateNameError as exc:
        raise ClassifierExistsError.named(name) from exc


@dataclass(frozen=True)
class PendingFit:
    """A classifier whose examples were checked but are too many to fit in the request: a
    worker fits them (service/classifiers/fit_job.py) and stores it under `classifier_id`."""

    classifier_id: str
    name: str
    method: str
    label_key: str | None
    model_id: str  # the served model at submission: the vectors it is fitted on
    pairs: list[tuple[str, Label]]


class ClassifierService:
    def __init__(self, settings: Settings, items: ItemService, runtime: Runtime) -> None:
        self.settings = settings
        self.items = ItemSource(items)
        self.runtime = runtime
        self.store = open_classifiers(settings, items.store)  # the item store's tables and connections
        self.registry = ModelRegistry(settings.models_dir)
        self._models: dict[str, ClassifierModel] = {}  # fine-tuned classifier sessions, loaded on first use
        self._models_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._failed: set[tuple[str, str]] = set()  # (classifier, model) refits that could not run
        self._thread = threading.Thread(target=self._watch, name="classifier-refit", daemon=True)

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Refit whatever lacks a fit for the served model (a restart after an activation), then watch."""
        self.runtime.add_listener(lambda _model_id: self._wake.set())
        self._thread.start()
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _watch(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(REFIT_POLL_S)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                if (served := self.items.served) is not None:
                    self.refit_all(served)
            except Exception:
                log.exception("classifier refit pass failed")

    def refit_all(self, model_id: str) -> int:
        """Fit every classifier without a `model_id` fit on its examples' `model_id` vectors."""
        done = 0
        for classifier_id in self.store.without_fit(model_id, FITTED_METHODS):
            if self._stop.is_set() or (classifier_id, model_id) in self._failed:
                continue
            record = self.store.get(classifier_id)
            if record is None:
                continue
            try:
                fit = self._fit(record.method, record.examples, model_id, drop_missing=True)
            except ClassifierError as exc:
                self._failed.add((classifier_id, model_id))
                log.error(
                    "classifier %s cannot be refitted on %s (it keeps its old fit): %s", classifier_id, model_id, exc
                )
                continue
            if self.store.add_fit(classifier_id, fit):
                done += 1
                log.info("classifier %s refitted on %s: cv accuracy %.4f", classifier_id, model_id, fit.cv["accuracy"])
        return done

    # -- create / read / delete ---------------------------------------------------------

    def _served(self) -> str:
        served = self.items.served
        if served is None:
            raise NotReadyError("no model's index is served yet; activate a model, index items, and retry")
        return served

    def examples_from_metadata(self, label_key: str) -> list[tuple[str, Label]]:
        """(item id, metadata[label_key]) for every item that has the field."""
        out: list[tuple[str, Label]] = []
        offset, page = 0, 1000
        while True:
            items, total = self.items.page(offset, page)
            for item in items:
                if item.metadata and label_key in item.metadata:
                    out.append((item.id, _check_label(item.metadata[label_key], f"item {item.id!r} {label_key}")))
            offset += len(items)
            if not items or offset >= total:
                return out

    def resolve_examples(
        self, examples: list[tuple[str, object]] | None, label_key: str | None, limit: int | None = None
    ) -> list[tuple[str, Label]]:
        """The (item id, label) pairs of `examples`, or of every item with the `label_key` field:
        labels checked (strings or integers), one label per item, duplicates counted once."""
        if label_key is not None:
            pairs = self.examples_from_metadata(label_key)
            if not pairs:
                raise InvalidExamplesError(f"no indexed item has the metadata field {label_key!r}", "no_examples")
        else:
            pairs = [
                (item_id, _check_label(label, f"examples[{i}]")) for i, (item_id, label) in enumerate(examples or [])
            ]
        if limit is not None and len(pairs) > limit:
            raise TooManyExamplesError(
                f"{len(pairs)} examples; a classifier is fitted on at most {limit} "
                "(SIMCLR_EMBED_CLASSIFIER_JOB_MAX_EXAMPLES): label a class-balanced subset"
            )
        seen: dict[str, Label] = {}
        for item_id, label in pairs:
            if seen.setdefault(item_id, label) != label:
                raise InvalidExamplesError(f"item {item_id!r} is given two labels", "conflicting_labels")
        return list(dict.fromkeys(pairs))  # the same example twice counts once

    def finetune_examples(
        self, examples: list[tuple[str, object]] | None, label_key: str | None
    ) -> list[tuple[str, Label]]:
        """Labeled items for a fine-tuning job, checked as for a classifier: known ids (the
        unknown ones listed), labels strings or integers, two classes or more, two examples a
        class or more. Fine-tuning reads the originals, so no vector is needed."""
        pairs = self.resolve_examples(examples, label_key)
        if unknown := [item_id for item_id, _ in pairs if not self.items.exists(item_id)]:
            raise UnknownItemsError(unknown)
        _encode([label for _, label in pairs])
        return pairs

    def create(
        self,
        name: str,
        method: str,
        examples: list[tuple[str, object]] | None,
        label_key: str | None,
        model_id: str | None = None,
    ) -> ClassifierRecord | PendingFit:
        """Fit on the served model's vectors and store (blocking: seconds; call off the event loop).

        More than `classifier_max_examples` examples (at most `classifier_job_max_examples`)
        are checked as a fit would check them (labels, unknown ids, vectors, classes, the
        name) and come back as a PendingFit for a job to fit. `method` "finetune" takes no
        examples: it wraps `model_id`, a classifier model a fine-tuning job published, with the
        validation accuracy the job measured."""
        if method not in METHODS:
            raise InvalidExamplesError(f"method must be one of {', '.join(METHODS)}", "invalid_method")
        if method == "finetune":
            return self._store_new(name, method, None, [], self._finetuned_fit(model_id or ""))
        model_id = self._served()
        pairs = self.resolve_examples(examples, label_key, self.settings.classifier_job_max_examples)
        if len(pairs) <= self.settings.classifier_max_examples:
            return self._store_new(
                name, method, label_key, pairs, self._fit(method, pairs, model_id, drop_missing=False)
            )
        _, labels = example_vectors(self.items, pairs, model_id, drop_missing=False)
        _encode(labels)
        if self.store.name_taken(name):
            raise ClassifierExistsError.named(name)
        return PendingFit(uuid.uuid4().hex[:12], name, method, label_key, model_id, pairs)

    def _store_new(
        self, name: str, method: str, label_key: str | None, pairs: list[tuple[str, Label]], fit: Fit
    ) -> ClassifierRecord:
        return store_new(self.store, uuid.uuid4().hex[:12], name, method, label_key, pairs, fit)

    def _finetuned_fit(self, model_id: str) -> Fit:
        """A fine-tuned classifier model as a fit: its classes, label counts and validation accuracy."""
        try:
            card = self.registry.get(model_id)
        except ModelNotFoundError as exc:
            raise ModelNotFoundForClassifierError(
                f"no model {model_id!r} in the registry; a fine-tuning job publishes one (GET /models)"
            ) from exc
        if card.kind != "classifier":
            raise InvalidExamplesError(
                f"model {model_id} is an {card.kind}; method finetune takes a classifier model from a fine-tuning job",
                "not_a_classifier_model",
            )
        extra = card.model_extra or {}
        cv = {
            "kind": "validation",
            "accuracy": float(card.metrics["val_accuracy"]),
            "std": None,
            "fold_accuracies": [],
            "n_folds": 0,
            "confusion": extra.get("val_confusion", []),
            "C": None,
            "grid": [],
            "examples": int(card.metrics.get("labels", 0)),
        }
        counts = list(extra.get("label_counts", [0] * len(card.classes)))
        return Fit(uuid.uuid4().hex[:12], model_id, time.time(), list(card.classes), counts, cv, {})

    def _classifier_model(self, model_id: str) -> ClassifierModel:
        with self._models_lock:
            if model_id not in self._models:
                self._models[model_id] = ClassifierModel.load(self.registry, model_id, self.settings)
            return self._models[model_id]

    def _fit(self, method: str, pairs: list[tuple[str, Label]], model_id: str, *, drop_missing: bool) -> Fit:
        """Fit `pairs` on their stored `model_id` vectors. A refit (`drop_missing`) skips items deleted since."""
        return fit_examples(method, *example_vectors(self.items, pairs, model_id, drop_missing=drop_missing), model_id)

    def all(self) -> list[ClassifierRecord]:
        return self.store.all()

    def get(self, classifier_id: str) -> ClassifierRecord:
        record = self.store.get(classifier_id)
        if record is None:
            raise ClassifierNotFoundError(f"no classifier with id {classifier_id!r}; GET /classifiers lists them")
        return record

    def delete(self, classifier_id: str) -> None:
        if not self.store.delete(classifier_id):
            raise ClassifierNotFoundError(f"no classifier with id {classifier_id!r}")

    def answering_fit(self, record: ClassifierRecord) -> Fit:
        """The fit on the served model when there is one, else the newest (served model being refitted)."""
        served = self.items.served
        return next((f for f in record.fits if f.model_id == served), record.fits[0])

    # -- predict ------------------------------------------------------------------------

    def predict_items(
        self, classifier_id: str, item_ids: Sequence[str], top_k: int
    ) -> tuple[ClassifierRecord, Fit, list[Prediction]]:
        record = self.get(classifier_id)
        fit = self.answering_fit(record)
        if record.method == "finetune":
            images = [self.items.image(i) for i in item_ids]
            if missing := [i for i, im in zip(item_ids, images, strict=True) if im is None]:
                raise UnknownItemsError(missing)
            proba = self._classifier_model(fit.model_id).predict_proba([im for im in images if im is not None])
            return record, fit, ranked(fit, proba, top_k)
        vectors: list[np.ndarray] = []
        unknown: list[str] = []
        unembedded: list[str] = []
        for item_id in item_ids:
            vector = self.items.vector(item_id, fit.model_id)
            if vector is None:
                (unembedded if self.items.exists(item_id) else unknown).append(item_id)
            else:
                vectors.append(vector)
        if unknown:
            raise UnknownItemsError(unknown)
        if unembedded:
            raise ItemsNotEmbeddedError(unembedded, fit.model_id)
        return record, fit, predict(record.method, fit, np.stack(vectors), top_k)

    async def predict_images(
        self, classifier_id: str, images: EncodedImages, top_k: int
    ) -> tuple[ClassifierRecord, Fit, list[Prediction]]:
        """Embed with the answering fit's model (loaded again if it was replaced), then classify."""
        record = self.get(classifier_id)
        fit = self.answering_fit(record)
        if record.method == "finetune":
            model = await asyncio.to_thread(self._classifier_model, fit.model_id)
            return record, fit, ranked(fit, await asyncio.to_thread(model.predict_proba, images), top_k)
        _, vectors = await self.runtime.embed(images, model_id=fit.model_id)  # [M, D]
        return record, fit, predict(record.method, fit, vectors, top_k)


def build_classifier_service(settings: Settings, items: ItemService, runtime: Runtime) -> ClassifierService:
    """Open the store and start the refit watcher (app lifespan; call close() at shutdown)."""
    service = ClassifierService(settings, items, runtime)
    service.start()
    return service
