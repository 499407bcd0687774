"""Task messages: what callers send to the tasks and what comes back.

JSON forms are pyspacer 0.14.0's; pyspacer 0.5.0's forms are accepted on
input (see ``TrainClassifierMsg.deserialize``).

Extractor and trainer fields are resolved through ``spacer_core.extractors``
and ``spacer_core.train_classifier``, which sit below this module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from spacer_core import config
from spacer_core.data_classes import (
    DataClass,
    DataLocation,
    ImageLabels,
    InvalidDataError,
    LabelId,
    _require,
    deserialize_input,
    is_legacy_image_labels,
)
from spacer_core.exceptions import InvalidInputError, UnknownTaskError
from spacer_core.extractors import EfficientNetExtractor, FeatureExtractor
from spacer_core.task_io import ExtractFeaturesReturnMsg, TrainClassifierReturnMsg, TrainingTaskLabels
from spacer_core.train_classifier import ClassifierTrainer, trainer_factory

__all__ = [
    "DataLocation",
    "ExtractFeaturesMsg",
    "ExtractFeaturesReturnMsg",
    "TrainingTaskLabels",
    "TrainClassifierMsg",
    "TrainClassifierReturnMsg",
    "ClassifyFeaturesMsg",
    "ClassifyImageMsg",
    "ClassifyReturnMsg",
    "JobMsg",
    "JobReturnMsg",
]


def _deserialize_extractor(data: Mapping[str, Any]) -> FeatureExtractor:
    return FeatureExtractor.deserialize(data)


def _rowcols(raw: Any, where: str) -> list[tuple[int, int]]:
    _require(isinstance(raw, (list, tuple)), f"{where}: rowcols must be a list of [row, col] pairs.")
    out = []
    for rc in raw:
        _require(
            isinstance(rc, (list, tuple)) and len(rc) == 2,
            f"{where}: each rowcols entry must be a [row, col] pair, got {rc!r}.",
        )
        out.append((rc[0], rc[1]))
    return out


def _check_rowcols(rowcols: Any) -> None:
    _require(isinstance(rowcols, list), "rowcols must be a list of (row, col) pairs.")
    _require(len(rowcols) > 0, "Invalid message, rowcols entry is empty.")
    _require(len(rowcols[0]) == 2, f"rowcols entries must be (row, col) pairs, got {rowcols[0]!r}.")


class ExtractFeaturesMsg(DataClass):
    """Input of extract_features: an image, points on it, an extractor, and where features go."""

    def __init__(
        self,
        job_token: str,
        extractor: FeatureExtractor,
        rowcols: list[tuple[int, int]],
        image_loc: DataLocation,
        feature_loc: DataLocation,
    ):
        _check_rowcols(rowcols)
        _require(
            feature_loc.is_writable, f"Write not supported for '{feature_loc.storage_type}' storage type."
        )
        self.job_token = job_token
        self.extractor = extractor
        self.rowcols = rowcols
        self.image_loc = image_loc
        self.feature_loc = feature_loc

    @classmethod
    def example(cls) -> ExtractFeaturesMsg:

        return cls(
            job_token="123abc",
            extractor=EfficientNetExtractor(
                data_locations={"weights": DataLocation("filesystem", "/path/to/weights.pt")}
            ),
            rowcols=[(100, 100)],
            image_loc=DataLocation("memory", "my_image.jpg"),
            feature_loc=DataLocation("memory", "my_feats.json"),
        )

    def serialize(self) -> dict[str, Any]:
        return {
            "job_token": self.job_token,
            "extractor": self.extractor.serialize(),
            "rowcols": list(self.rowcols),
            "image_loc": self.image_loc.serialize(),
            "feature_loc": self.feature_loc.serialize(),
        }

    @classmethod
    def deserialize(cls, data: Mapping[str, Any]) -> ExtractFeaturesMsg:
        return cls(
            job_token=data["job_token"],
            extractor=_deserialize_extractor(data["extractor"]),
            rowcols=_rowcols(data["rowcols"], f"job {data['job_token']!r}"),
            image_loc=DataLocation.deserialize(data["image_loc"]),
            feature_loc=DataLocation.deserialize(data["feature_loc"]),
        )


def split_legacy_train_labels(
    train_labels: ImageLabels, batch_label_count: int = 5000
) -> tuple[ImageLabels, ImageLabels]:
    """Split 0.5.0-style ``train_labels`` into (train, ref) the way pyspacer 0.5.0 did.

    0.5.0 held out every 10th image as the reference set, capped at the
    number of images whose points fit in one batch of ``batch_label_count``
    labels (judged from the first image's point count), and trained on the
    rest. 0.5.0 shuffled the held-out images before applying the cap with an
    unseeded generator; here the cap keeps the first ones, so the split is
    repeatable.
    """
    keys = list(train_labels.keys())
    if not keys:
        return ImageLabels(), ImageLabels()
    per_image = max(len(train_labels[keys[0]]), 1)
    max_ref_images = max(batch_label_count // per_image, 1)
    ref_keys = keys[::10][:max_ref_images]
    ref_set = set(ref_keys)
    train = ImageLabels({k: train_labels[k] for k in keys if k not in ref_set})
    ref = ImageLabels({k: train_labels[k] for k in ref_keys})
    return train, ref


class TrainClassifierMsg(DataClass):
    """Input of train_classifier."""

    class FeatureCache:
        """Special values of ``feature_cache_dir``."""

        # A temporary directory chosen by the OS.
        AUTO = "auto"
        # Load remote features anew every time (saves disk, costs time).
        DISABLED = "disabled"

    def __init__(
        self,
        job_token: str,
        trainer: ClassifierTrainer | str | None = None,
        nbr_epochs: int = 1,
        clf_type: str = "MLP",
        labels: TrainingTaskLabels | None = None,
        previous_model_locs: list[DataLocation] | None = None,
        model_loc: DataLocation | None = None,
        valresult_loc: DataLocation | None = None,
        feature_cache_dir: str | Path = FeatureCache.AUTO,
        *,
        trainer_name: str | None = None,
        train_labels: ImageLabels | None = None,
        val_labels: ImageLabels | None = None,
        features_loc: DataLocation | None = None,
    ):
        """``trainer``: a ClassifierTrainer, ``'minibatch'`` or a dotted class path.

        pyspacer 0.5.0's keywords are accepted too: ``trainer_name``, and
        ``train_labels`` + ``val_labels`` (ImageLabels, keys may be bare
        feature keys resolved against ``features_loc``) instead of ``labels``;
        the reference set is carved from ``train_labels`` as 0.5.0 did.
        """
        if trainer is None:
            trainer = trainer_name
        _require(trainer is not None, f"Training job {job_token!r} names no trainer.")
        if labels is None:
            _require(
                train_labels is not None and val_labels is not None,
                f"Training job {job_token!r} needs labels (or 0.5.0's train_labels and val_labels).",
            )
            assert train_labels is not None and val_labels is not None
            labels = legacy_training_labels(train_labels, val_labels, features_loc)
        _require(
            model_loc is not None and valresult_loc is not None,
            f"Training job {job_token!r} needs model_loc and valresult_loc.",
        )
        assert model_loc is not None and valresult_loc is not None
        previous_model_locs = list(previous_model_locs or [])
        if isinstance(trainer, str):
            trainer = trainer_factory(trainer)
        assert trainer is not None
        self.job_token = job_token
        self.trainer: ClassifierTrainer = trainer
        self.nbr_epochs = nbr_epochs
        self.clf_type = clf_type
        self.labels = labels
        self.previous_model_locs = previous_model_locs
        self.model_loc: DataLocation = model_loc
        self.valresult_loc: DataLocation = valresult_loc
        self.feature_cache_dir = feature_cache_dir

    @classmethod
    def example(cls) -> TrainClassifierMsg:
        return cls(
            job_token="123_abc",
            trainer="minibatch",
            nbr_epochs=2,
            clf_type="MLP",
            labels=TrainingTaskLabels.example(),
            previous_model_locs=[
                DataLocation("memory", "previous_model1.pkl"),
                DataLocation("memory", "previous_model2.pkl"),
            ],
            model_loc=DataLocation("memory", "my_new_model.pkl"),
            valresult_loc=DataLocation("memory", "my_valresult.json"),
        )

    def serialize(self) -> dict[str, Any]:
        return {
            "job_token": self.job_token,
            "trainer": self.trainer.serialize(),
            "nbr_epochs": self.nbr_epochs,
            "clf_type": self.clf_type,
            "labels": self.labels.serialize(),
            "previous_model_locs": [loc.serialize() for loc in self.previous_model_locs],
            "model_loc": self.model_loc.serialize(),
            "valresult_loc": self.valresult_loc.serialize(),
            "feature_cache_dir": str(self.feature_cache_dir),
        }

    @classmethod
    def deserialize(cls, data: Mapping[str, Any]) -> TrainClassifierMsg:
        """Read 0.14.0 JSON, or 0.5.0's (``trainer_name``, ``train_labels``,
        ``val_labels``, ``features_loc``; train/ref split as 0.5.0 made it)."""
        if "trainer_name" in data:
            trainer = trainer_factory(data["trainer_name"])
        elif "trainer" in data:
            trainer = _trainer_from_json(data["trainer"])
        else:
            raise InvalidDataError(f"Training job {data.get('job_token')!r} names no trainer.")

        if "labels" in data:
            labels = TrainingTaskLabels.deserialize(data["labels"])
        elif "train_labels" in data:
            labels = _legacy_training_labels(data)
        else:
            raise InvalidDataError(f"Training job {data.get('job_token')!r} has no labels.")

        return cls(
            job_token=data["job_token"],
            trainer=trainer,
            nbr_epochs=data["nbr_epochs"],
            clf_type=data["clf_type"],
            labels=labels,
            previous_model_locs=[DataLocation.deserialize(loc) for loc in data["previous_model_locs"]],
            model_loc=DataLocation.deserialize(data["model_loc"]),
            valresult_loc=DataLocation.deserialize(data["valresult_loc"]),
            feature_cache_dir=data.get("feature_cache_dir", cls.FeatureCache.AUTO),
        )


def _trainer_from_json(raw: Any) -> ClassifierTrainer:
    """A trainer from its JSON object, or from a bare name / class path string."""

    if isinstance(raw, str):
        return trainer_factory(raw)
    return ClassifierTrainer.deserialize(raw)


def _legacy_training_labels(data: Mapping[str, Any]) -> TrainingTaskLabels:
    features_loc = DataLocation.deserialize(data["features_loc"]) if data.get("features_loc") else None

    def read(raw: Any) -> ImageLabels:
        if is_legacy_image_labels(raw):
            return ImageLabels.deserialize(raw, features_loc=features_loc)
        return ImageLabels.deserialize(raw)

    return legacy_training_labels(read(data["train_labels"]), read(data["val_labels"]), features_loc)


def legacy_training_labels(
    train_labels: ImageLabels, val_labels: ImageLabels, features_loc: DataLocation | None
) -> TrainingTaskLabels:
    """0.5.0's train_labels / val_labels as train, ref and val sets (bare keys resolved against features_loc)."""
    train, ref = split_legacy_train_labels(
        train_labels.resolve_keys(features_loc), config.TRAINING_BATCH_LABEL_COUNT
    )
    return TrainingTaskLabels(train=train, ref=ref, val=val_labels.resolve_keys(features_loc))


class ClassifyFeaturesMsg(DataClass):
    """Input of classify_features."""

    def __init__(self, job_token: str, feature_loc: DataLocation, classifier_loc: DataLocation):
        self.job_token = job_token
        self.feature_loc = feature_loc
        self.classifier_loc = classifier_loc

    @classmethod
    def example(cls) -> ClassifyFeaturesMsg:
        return cls(
            job_token="my_job",
            feature_loc=DataLocation(
                "url", "https://my-bucket.s3-my-region.amazonaws.com/01234aeiou.png.featurevector"
            ),
            classifier_loc=DataLocation(
                "url", "https://my-bucket.s3-my-region.amazonaws.com/my_model_id.model"
            ),
        )

    def serialize(self) -> dict[str, Any]:
        return {
            "job_token": self.job_token,
            "feature_loc": self.feature_loc.serialize(),
            "classifier_loc": self.classifier_loc.serialize(),
        }

    @classmethod
    def deserialize(cls, data: Mapping[str, Any]) -> ClassifyFeaturesMsg:
        return cls(
            job_token=data["job_token"],
            feature_loc=DataLocation.deserialize(data["feature_loc"]),
            classifier_loc=DataLocation.deserialize(data["classifier_loc"]),
        )


class ClassifyImageMsg(DataClass):
    """Input of classify_image: extract and classify, storing nothing."""

    def __init__(
        self,
        job_token: str,
        extractor: FeatureExtractor,
        rowcols: list[tuple[int, int]],
        image_loc: DataLocation,
        classifier_loc: DataLocation,
    ):
        self.job_token = job_token
        self.extractor = extractor
        self.rowcols = rowcols
        self.image_loc = image_loc
        self.classifier_loc = classifier_loc

    @classmethod
    def example(cls) -> ClassifyImageMsg:

        return cls(
            job_token="my_job",
            extractor=EfficientNetExtractor(
                data_locations={"weights": DataLocation("filesystem", "/path/to/weights.pt")}
            ),
            rowcols=[(1, 1), (2, 2)],
            image_loc=DataLocation("url", "https://my-bucket.s3-my-region.amazonaws.com/01234aeiou.png"),
            classifier_loc=DataLocation(
                "url", "https://my-bucket.s3-my-region.amazonaws.com/my_model_id.model"
            ),
        )

    def serialize(self) -> dict[str, Any]:
        return {
            "job_token": self.job_token,
            "extractor": self.extractor.serialize(),
            "rowcols": list(self.rowcols),
            "image_loc": self.image_loc.serialize(),
            "classifier_loc": self.classifier_loc.serialize(),
        }

    @classmethod
    def deserialize(cls, data: Mapping[str, Any]) -> ClassifyImageMsg:
        return cls(
            job_token=data["job_token"],
            extractor=_deserialize_extractor(data["extractor"]),
            rowcols=_rowcols(data["rowcols"], f"job {data['job_token']!r}"),
            image_loc=DataLocation.deserialize(data["image_loc"]),
            classifier_loc=DataLocation.deserialize(data["classifier_loc"]),
        )


class ClassifyReturnMsg(DataClass):
    """Output of classify_features / classify_image.

    ``scores``: (row, col, [probability per class]); ``classes``: the
    classifier's class order.
    """

    def __init__(
        self,
        runtime: float,
        scores: list[tuple[int | None, int | None, list[float]]],
        classes: list[LabelId],
        valid_rowcol: bool,
    ):
        self.runtime = runtime
        self.scores = scores
        self.classes = classes
        self.valid_rowcol = valid_rowcol

    def __getitem__(self, rowcol: tuple[int, int]) -> list[float]:
        """Scores of the point at (row, col); needs valid_rowcol."""
        if not self.valid_rowcol:
            raise InvalidInputError("Method requires valid rows and columns")
        by_rowcol = {(row, col): scores for row, col, scores in self.scores}
        return by_rowcol[(rowcol[0], rowcol[1])]

    @classmethod
    def example(cls) -> ClassifyReturnMsg:
        return cls(
            runtime=1.1,
            scores=[(10, 20, [0.1, 0.2, 0.7]), (20, 40, [0.9, 0.06, 0.04])],
            classes=[100, 12, 44],
            valid_rowcol=True,
        )

    @classmethod
    def deserialize(cls, data: Mapping[str, Any]) -> ClassifyReturnMsg:
        return cls(
            runtime=data["runtime"],
            scores=[(row, col, scores) for row, col, scores in data["scores"]],
            classes=data["classes"],
            valid_rowcol=data["valid_rowcol"],
        )


TaskMsg = ExtractFeaturesMsg | TrainClassifierMsg | ClassifyFeaturesMsg | ClassifyImageMsg
TaskReturnMsg = ExtractFeaturesReturnMsg | TrainClassifierReturnMsg | ClassifyReturnMsg

_TASK_MSG_TYPES: dict[str, Any] = {
    "extract_features": ExtractFeaturesMsg,
    "train_classifier": TrainClassifierMsg,
    "classify_features": ClassifyFeaturesMsg,
    "classify_image": ClassifyImageMsg,
}
_TASK_RETURN_TYPES: dict[str, Any] = {
    "extract_features": ExtractFeaturesReturnMsg,
    "train_classifier": TrainClassifierReturnMsg,
    "classify_features": ClassifyReturnMsg,
    "classify_image": ClassifyReturnMsg,
}


def _check_task_name(task_name: str) -> None:
    if task_name not in config.TASKS:
        raise UnknownTaskError(f"Unknown task_name {task_name!r}; expected one of {config.TASKS}.")


class JobMsg(DataClass):
    """A job: one task type, several task messages."""

    def __init__(self, task_name: str, tasks: Sequence[TaskMsg]):
        _check_task_name(task_name)
        self.task_name = task_name
        self.tasks = list(tasks)

    @classmethod
    def deserialize(cls, data: Mapping[str, Any]) -> JobMsg:
        """A job from JSON data; for client data, every malformed field is an InvalidDataError
        naming the task (see `data_classes.deserialize_input`)."""
        _require(isinstance(data, Mapping), "A JobMsg must be a JSON object.")
        _require("task_name" in data, "A JobMsg needs a 'task_name'.")
        task_name = data["task_name"]
        _require(isinstance(task_name, str), "A JobMsg's 'task_name' must be a string.")
        _check_task_name(task_name)
        _require(isinstance(data.get("tasks"), list), "A JobMsg's 'tasks' must be a list.")
        msg_type = _TASK_MSG_TYPES[task_name]
        return cls(
            task_name,
            [
                deserialize_input(msg_type, item, f"tasks[{i}] ({msg_type.__name__})")
                for i, item in enumerate(data["tasks"])
            ],
        )

    def serialize(self) -> dict[str, Any]:
        return {"task_name": self.task_name, "tasks": [task.serialize() for task in self.tasks]}

    @classmethod
    def example(cls) -> JobMsg:
        return cls(task_name="classify_image", tasks=[ClassifyImageMsg.example()])


class JobReturnMsg(DataClass):
    """Result of a job: ok with per-task results, or not ok with the error text."""

    def __init__(
        self,
        original_job: JobMsg,
        ok: bool,
        results: list[TaskReturnMsg] | None,
        error_message: str | None,
    ):
        self.original_job = original_job
        self.results = results
        self.ok = ok
        self.error_message = error_message

    @classmethod
    def example(cls) -> JobReturnMsg:
        return cls(
            original_job=JobMsg.example(), ok=True, results=[ClassifyReturnMsg.example()], error_message=None
        )

    @classmethod
    def deserialize(cls, data: Mapping[str, Any]) -> JobReturnMsg:
        original_job = JobMsg.deserialize(data["original_job"])
        results = data["results"]
        if data["ok"]:
            return_type = _TASK_RETURN_TYPES[original_job.task_name]
            results = [return_type.deserialize(item) for item in results]
        return cls(
            original_job=original_job, ok=data["ok"], results=results, error_message=data["error_message"]
        )

    def serialize(self) -> dict[str, Any]:
        results: Any = self.results
        if self.ok and self.results is not None:
            results = [result.serialize() for result in self.results]
        return {
            "original_job": self.original_job.serialize(),
            "ok": self.ok,
            "results": results,
            "error_message": self.error_message,
        }
