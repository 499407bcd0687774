"""Classifier trainers: the ClassifierTrainer interface, MiniBatchTrainer and trainer_factory."""

from __future__ import annotations

import abc
import inspect
import time
from importlib import import_module
from logging import getLogger
from typing import Any

import numpy as np
from sklearn.calibration import CalibratedClassifierCV

from spacer_core import config
from spacer_core.data_classes import ImageLabels, ValResults
from spacer_core.exceptions import (
    FeatureDimensionError,
    InvalidInputError,
    InvalidInputTypeError,
    SpacerError,
    TrainerModuleNotFoundError,
    UnknownTrainerError,
)
from spacer_core.task_io import TrainClassifierReturnMsg, TrainingTaskLabels
from spacer_core.task_utils import common_provenance
from spacer_core.train_utils import (
    EVAL_BATCH_SIZE,
    LabelledFeatures,
    ProgressCallback,
    calc_acc,
    evaluate_classifier,  # noqa: F401  (pyspacer name)
    load_labelled_features,
    make_classifier,
    predict_with_scores,
    train,
)

logger = getLogger(__name__)

# Names accepted by trainer_factory, and class paths written by pyspacer
# (0.5.0 and 0.14.0), resolved to this package's classes.
_TRAINER_ALIASES: dict[str, str] = {
    "minibatch": "spacer_core.train_classifier.MiniBatchTrainer",
    "spacer.train_classifier.MiniBatchTrainer": "spacer_core.train_classifier.MiniBatchTrainer",
}

# Our built-in trainers serialize under pyspacer's class paths, so pyspacer
# reads the training messages we write (it takes the same settings).
_PYSPACER_CLASS_PATHS: dict[str, str] = {
    ours: theirs for theirs, ours in _TRAINER_ALIASES.items() if theirs.startswith("spacer.")
}

TrainResult = tuple[CalibratedClassifierCV, ValResults, TrainClassifierReturnMsg]

# Trainer classes named by class path without an import: registered by
# their users for callers that may not import modules (the gRPC server).
_REGISTERED_TRAINERS: dict[str, type] = {}


def register_trainer_class(class_path: str, trainer_class: type) -> None:
    """Let messages name ``trainer_class`` (a ClassifierTrainer subclass) by ``class_path``.

    Registered trainers resolve without importing anything, and are the
    only custom trainers the server accepts from its clients.
    """
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, ClassifierTrainer)):
        raise InvalidInputTypeError(f"{trainer_class!r} is not a ClassifierTrainer subclass")
    _REGISTERED_TRAINERS[class_path] = trainer_class


def is_registered_trainer(name: str) -> bool:
    """True when ``name`` is a built-in trainer name or class path, or a registered one.

    Such names resolve without importing a module a message chose.
    """
    return name in _TRAINER_ALIASES or name in _TRAINER_ALIASES.values() or name in _REGISTERED_TRAINERS


_MISSING = object()


def _import_trainer_module(module_path: str) -> Any:
    """The module a trainer class path names; a missing module is the caller's input error."""
    try:
        return import_module(module_path)
    except ModuleNotFoundError as err:
        # Only when the path itself is missing: a module that exists but
        # fails on its own imports is a bug there, not bad input here.
        if err.name is None or not (module_path == err.name or module_path.startswith(err.name + ".")):
            raise
        error = TrainerModuleNotFoundError(
            f"Unknown trainer module {module_path!r}: no module named {err.name!r}."
        )
        error.name = err.name
        raise error from err


class ClassifierTrainer(abc.ABC):
    """Trains a classifier from TrainingTaskLabels; JSON-serializable by class path."""

    @abc.abstractmethod
    def __call__(
        self,
        labels: TrainingTaskLabels,
        nbr_epochs: int,
        pc_models: list[CalibratedClassifierCV],
        clf_type: str,
        progress: ProgressCallback | None = None,
    ) -> TrainResult:
        """Train on labels.train, calibrate on labels.ref, evaluate on labels.val.

        `pc_models` (previous classifiers) are scored on the same val set.
        `progress(epoch, ref_accuracy, elapsed_seconds)` is called after each
        epoch when given.
        """

    def serialize(self) -> dict[str, Any]:
        cls = type(self)
        class_path = f"{cls.__module__}.{cls.__name__}"
        return {"class_path": _PYSPACER_CLASS_PATHS.get(class_path, class_path)}

    @staticmethod
    def deserialize(data: dict[str, Any]) -> ClassifierTrainer:
        """Rebuild a trainer from serialize()'s dict (pyspacer's class paths are accepted)."""
        options = dict(data)
        try:
            class_path = options.pop("class_path")
        except KeyError:
            raise InvalidInputError(f"Trainer data {data!r} has no 'class_path'.") from None
        class_path = _TRAINER_ALIASES.get(class_path, class_path)
        module_path, _, class_name = class_path.rpartition(".")
        trainer_class: Any
        if class_path in _REGISTERED_TRAINERS:
            trainer_class = _REGISTERED_TRAINERS[class_path]
        elif not module_path:
            raise InvalidInputError(
                f"Unknown trainer {class_path!r}: not a built-in name or a dotted class path."
            )
        else:
            # pyspacer's behaviour for library callers: any importable class path.
            trainer_class = getattr(_import_trainer_module(module_path), class_name, _MISSING)
            if trainer_class is _MISSING:
                raise UnknownTrainerError(
                    f"Unknown trainer {class_path!r}: module {module_path!r} has no {class_name!r}."
                )
        if not (isinstance(trainer_class, type) and issubclass(trainer_class, ClassifierTrainer)):
            raise InvalidInputTypeError(f"{class_path} is not a ClassifierTrainer subclass")
        return trainer_class(**options)

    def __repr__(self) -> str:
        return str(self.serialize())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClassifierTrainer) and self.serialize() == other.serialize()

    __hash__ = None  # type: ignore[assignment]


class MiniBatchTrainer(ClassifierTrainer):
    """The default trainer: mini-batch partial_fit over epochs, then sigmoid calibration.

    Trains on the same batches with the same seeds as pyspacer's
    MiniBatchTrainer, so results match it (LR bit for bit, MLP up to BLAS
    rounding); feature files are read once instead of once per epoch.
    """

    def __init__(
        self,
        batch_size: int | None = None,
        mlp_hidden_layer_sizes: tuple[int, ...] | None = None,
        mlp_learning_rate_init: float | None = None,
        mlp_large_data_threshold: int = 50000,
        sgd_loss: str = "log_loss",
        sgd_average: bool = True,
        sgd_random_state: int = 0,
    ):
        # batch_size None means config.TRAINING_BATCH_LABEL_COUNT, read when
        # training starts.
        self.batch_size = batch_size
        self.mlp_hidden_layer_sizes = (
            tuple(mlp_hidden_layer_sizes) if mlp_hidden_layer_sizes is not None else None
        )
        self.mlp_learning_rate_init = mlp_learning_rate_init
        self.mlp_large_data_threshold = mlp_large_data_threshold
        self.sgd_loss = sgd_loss
        self.sgd_average = sgd_average
        self.sgd_random_state = sgd_random_state

    def serialize(self) -> dict[str, Any]:
        """Class path plus the settings that differ from their defaults."""
        data = super().serialize()
        for name, param in inspect.signature(type(self).__init__).parameters.items():
            if name == "self":
                continue
            value = getattr(self, name)
            if value != param.default:
                data[name] = list(value) if isinstance(value, tuple) else value
        return data

    def _train(
        self,
        train_labels: ImageLabels,
        ref_labels: ImageLabels,
        nbr_epochs: int,
        clf_type: str,
        progress: ProgressCallback | None = None,
    ) -> tuple[CalibratedClassifierCV, list[float]]:
        """Train on ``train_labels``, calibrate on ``ref_labels``: (calibrated classifier, ref accuracy per epoch).

        pyspacer's step of the same name (its tests and callers build
        classifiers with it); the classes are those of ``ref_labels``.
        """
        if clf_type not in config.CLASSIFIER_TYPES:
            raise InvalidInputError(
                f"Unknown clf_type {clf_type!r}; expected one of {config.CLASSIFIER_TYPES}."
            )
        batch_size = self.batch_size or config.TRAINING_BATCH_LABEL_COUNT
        with config.log_entry_and_exit("loading training and reference features"):
            train_data = load_labelled_features(train_labels)
            ref_data = load_labelled_features(ref_labels)
        # Refused before any epoch runs: a classifier of mixed features fits neither extractor.
        common_provenance(
            [*train_labels.loaded_provenance().items(), *ref_labels.loaded_provenance().items()]
        )
        logger.debug(
            "Train: %d images, %d labels; ref: %d images, %d labels; batch size %d",
            train_data.image_count,
            len(train_data),
            ref_data.image_count,
            len(ref_data),
            batch_size,
        )
        clf = make_classifier(
            clf_type,
            len(train_data),
            mlp_hidden_layer_sizes=self.mlp_hidden_layer_sizes,
            mlp_learning_rate_init=self.mlp_learning_rate_init,
            mlp_large_data_threshold=self.mlp_large_data_threshold,
            sgd_loss=self.sgd_loss,
            sgd_average=self.sgd_average,
            sgd_random_state=self.sgd_random_state,
        )
        # preprocess_labels left train and ref with the same classes.
        classes = list(ref_labels.classes_set)
        with config.log_entry_and_exit(f"training using {clf_type}"):
            return train(clf, train_data, ref_data, classes, nbr_epochs, batch_size, progress)

    def __call__(
        self,
        labels: TrainingTaskLabels,
        nbr_epochs: int,
        pc_models: list[CalibratedClassifierCV],
        clf_type: str,
        progress: ProgressCallback | None = None,
    ) -> TrainResult:
        start = time.time()
        calibrated, ref_accs = self._train(labels["train"], labels["ref"], nbr_epochs, clf_type, progress)
        with config.log_entry_and_exit("loading validation features"):
            val_data = load_labelled_features(labels["val"])
        val_results, acc = _validation_results(calibrated, val_data)
        pc_accs = [_previous_accuracy(model, i, val_data) for i, model in enumerate(pc_models)]
        return_msg = TrainClassifierReturnMsg(
            acc=acc, pc_accs=pc_accs, ref_accs=ref_accs, runtime=time.time() - start
        )
        return calibrated, val_results, return_msg


def _validation_results(clf: CalibratedClassifierCV, val_data: LabelledFeatures) -> tuple[ValResults, float]:
    if len(val_data) == 0:
        raise ValueError("The validation set is empty; preprocess_labels should have rejected it.")
    estimates, scores = predict_with_scores(clf, val_data)
    classes = clf.classes_.tolist()
    position = {label: i for i, label in enumerate(classes)}
    truths = val_data.y.tolist()
    results = ValResults(
        scores=scores.tolist(),
        gt=[position[label] for label in truths],
        est=[position[label] for label in estimates.tolist()],
        classes=classes,
    )
    return results, calc_acc(truths, estimates.tolist())


def _previous_accuracy(clf: Any, i: int, data: LabelledFeatures) -> float:
    """Accuracy of previous model `i` on the validation set; a model that cannot score it is the client's error."""
    from spacer_core.runtime import classifier_feature_dim

    source = f"previous_model_locs[{i}]"
    expected, width = classifier_feature_dim(clf), data.x.shape[1]
    if expected is not None and len(data) and width != expected:
        raise FeatureDimensionError(
            f"{source}: the classifier was trained on dimension {expected}, but the features have dimension {width}."
        )
    try:
        return calc_acc(data.y.tolist(), _predict(clf, data).tolist())
    except (ValueError, IndexError) as err:
        if isinstance(err, SpacerError):
            raise
        raise InvalidInputError(
            f"{source}: the classifier cannot score the validation features ({err})."
        ) from None


def _predict(clf: Any, data: LabelledFeatures) -> np.ndarray:
    # Chunked as pyspacer evaluates, so results match to the last bit.
    chunks = [
        clf.predict(data.batch(slice(first, first + EVAL_BATCH_SIZE))[0])
        for first in range(0, len(data), EVAL_BATCH_SIZE)
    ]
    return np.concatenate(chunks)


def trainer_factory(trainer: str | ClassifierTrainer) -> ClassifierTrainer:
    """A trainer from 'minibatch', a dotted class path, or a trainer instance (returned as is).

    pyspacer's class paths (``spacer.train_classifier.MiniBatchTrainer``)
    resolve to this package's MiniBatchTrainer.
    """
    if isinstance(trainer, ClassifierTrainer):
        return trainer
    if not isinstance(trainer, str):
        raise InvalidInputTypeError(
            f"A trainer must be a name, class path or ClassifierTrainer, got {type(trainer).__name__}."
        )
    return ClassifierTrainer.deserialize({"class_path": trainer})
