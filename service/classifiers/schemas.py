"""Request and response models of /classifiers."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.classifiers.service import Prediction
from service.classifiers.storage import ClassifierRecord, Fit
from service.items.filters import FIELD_NAME
from service.items.schemas import MAX_ID_CHARS

LABEL_SCHEMA: dict[str, Any] = {"anyOf": [{"type": "string"}, {"type": "integer"}]}


class Example(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    # Checked by the service (a string or an integer) so that a wrong type gets `invalid_label`.
    label: Any = Field(json_schema_extra=LABEL_SCHEMA)


class ClassifierCreate(BaseModel):
    """`logreg` / `knn`: exactly one of `examples` or `label_key`. `finetune`: `model_id` only."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    method: Literal["logreg", "knn", "finetune"] = "logreg"
    examples: list[Example] | None = Field(None, description="labeled items: [{item_id, label}]")
    label_key: str | None = Field(
        None, min_length=1, max_length=200, description="a metadata field: every item that has it is an example"
    )
    model_id: str | None = Field(
        None, min_length=1, max_length=128, description="finetune: the classifier model a fine-tuning job published"
    )

    @model_validator(mode="after")
    def _one_source(self) -> ClassifierCreate:
        if self.method == "finetune":
            if self.model_id is None or self.examples is not None or self.label_key is not None:
                raise ValueError("method 'finetune' takes 'model_id' (a fine-tuning job's model) and no examples")
        elif self.model_id is not None or (self.examples is None) == (self.label_key is None):
            raise ValueError("give exactly one of 'examples' or 'label_key' ('model_id' is for method 'finetune')")
        return self


class ClassCount(BaseModel):
    label: str | int
    count: int


class CrossValidationOut(BaseModel):
    kind: Literal["cv", "validation"] = Field(
        description="cv: stratified k-fold on the examples; validation: the fine-tuning job's held-out images"
    )
    accuracy: float = Field(description="mean out-of-fold accuracy at the chosen setting (or validation accuracy)")
    std: float | None = Field(description="standard deviation of the fold accuracies (none for validation)")
    n_folds: int
    fold_accuracies: list[float]
    confusion: list[list[int]] = Field(description="[true class][predicted class], classes in `classes` order")
    C: float | None = Field(description="logreg: the chosen inverse L2 strength (scikit-learn's C)")


class FitOut(BaseModel):
    fit_id: str
    model_id: str
    fitted_at: datetime
    cv_accuracy: float

    @classmethod
    def of(cls, fit: Fit) -> FitOut:
        return cls(
            fit_id=fit.fit_id,
            model_id=fit.model_id,
            fitted_at=datetime.fromtimestamp(fit.fitted_at, UTC),
            cv_accuracy=fit.cv["accuracy"],
        )


class ClassifierOut(BaseModel):
    id: str
    name: str
    method: str
    label_key: str | None
    created: datetime
    examples: int
    model_id: str = Field(description="the model whose fit answers predictions now")
    fit_id: str
    classes: list[ClassCount]
    cv: CrossValidationOut
    fits: list[FitOut] = Field(description="one per model it was fitted on, newest first")

    @classmethod
    def of(cls, record: ClassifierRecord, fit: Fit) -> ClassifierOut:
        cv = fit.cv
        return cls(
            id=record.id,
            name=record.name,
            method=record.method,
            label_key=record.label_key,
            created=datetime.fromtimestamp(record.created, UTC),
            examples=cv["examples"],
            model_id=fit.model_id,
            fit_id=fit.fit_id,
            classes=[ClassCount(label=c, count=n) for c, n in zip(fit.classes, fit.counts, strict=True)],
            cv=CrossValidationOut(
                kind=cv.get("kind", "cv"),
                accuracy=cv["accuracy"],
                std=cv["std"],
                n_folds=cv["n_folds"],
                fold_accuracies=cv["fold_accuracies"],
                confusion=cv["confusion"],
                C=cv["C"],
            ),
            fits=[FitOut.of(f) for f in record.fits],
        )


class ClassifierList(BaseModel):
    classifiers: list[ClassifierOut]


MAX_TOP_K = 100


class PredictRequest(BaseModel):
    """JSON by item ids; images come as JSON `images` (base64) or multipart `files`."""

    model_config = ConfigDict(extra="forbid")

    item_ids: list[str] = Field(min_length=1, max_length=1000)
    top_k: int = Field(3, ge=1, le=MAX_TOP_K)


class ClassProbability(BaseModel):
    label: str | int
    probability: float


class PredictionOut(BaseModel):
    input: str = Field(description="the item id, or the image's file name (images[i] for JSON)")
    label: str | int
    probability: float
    top_k: list[ClassProbability] = Field(description="best first")

    @classmethod
    def of(cls, name: str, p: Prediction) -> PredictionOut:
        return cls(
            input=name,
            label=p.label,
            probability=p.probability,
            top_k=[ClassProbability(label=label, probability=q) for label, q in p.top_k],
        )


class PredictResponse(BaseModel):
    classifier_id: str
    model_id: str = Field(description="the model the inputs were embedded with")
    fit_id: str
    predictions: list[PredictionOut] = Field(description="in input order")


FIELD_PATTERN = FIELD_NAME.pattern  # a field that search filters can name (service/items/filters.py)


class WriteBackRequest(BaseModel):
    """`POST /classifiers/{id}/write-back`: the metadata fields the predictions go into."""

    model_config = ConfigDict(extra="forbid")

    label_field: str = Field(pattern=FIELD_PATTERN, description="receives the predicted label")
    probability_field: str | None = Field(
        None, pattern=FIELD_PATTERN, description="receives its probability; default `<label_field>_probability`"
    )

    @model_validator(mode="after")
    def _two_fields(self) -> WriteBackRequest:
        if self.probability_field is None:
            self.probability_field = f"{self.label_field}_probability"[:64]
        if self.probability_field == self.label_field:
            raise ValueError("label_field and probability_field must differ")
        return self


class WriteBackJob(BaseModel):
    """The job's request as stored in its record and run by the worker: the fit is pinned at
    submission (the one answering then), so every item is labeled by the same fit."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["write_back"] = "write_back"
    classifier_id: str
    fit_id: str
    model_id: str = Field(description="the model (vector space) the fit was fitted on")
    label_field: str = Field(pattern=FIELD_PATTERN)
    probability_field: str = Field(pattern=FIELD_PATTERN)
    name: str | None = None


class WriteBackCreated(BaseModel):
    id: str = Field(description="the job id; follow it at `url` (GET /train-jobs/{id})")
    url: str
    state: str
    classifier_id: str
    fit_id: str
    model_id: str
    label_field: str
    probability_field: str


class ClassifierFitJob(BaseModel):
    """A fit too large for the request, as stored in its job record and run by the worker
    (service/classifiers/fit_job.py): the examples checked at submission, in their order (the
    folds depend on it), and the id the classifier is stored under when the fit succeeds."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["fit_classifier"] = "fit_classifier"
    classifier_id: str
    classifier_name: str
    classifier_method: Literal["logreg", "knn"]
    label_key: str | None = None
    model_id: str = Field(description="the model (vector space) served at submission; the fit uses its vectors")
    examples: list[Example]
    name: str | None = None


class ClassifierFitCreated(BaseModel):
    """202 of `POST /classifiers` above the synchronous limit: the job that fits it."""

    id: str = Field(description="the job id; follow it at `url` (GET /train-jobs/{id})")
    url: str
    state: str
    classifier_id: str = Field(description="the id the classifier gets once the job succeeds")
    name: str
    method: str
    model_id: str
    examples: int
