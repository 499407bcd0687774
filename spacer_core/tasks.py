"""Top-level tasks, each taking and returning pyspacer's message classes."""

from __future__ import annotations

import contextlib
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from logging import getLogger
from typing import Any

import numpy as np

from spacer_core import cancellation, config, limits, pipeline, runtime
from spacer_core.data_classes import DataLocation, ImageFeatures, ImageLabels
from spacer_core.exceptions import JobMsgTypeError, UnknownTaskError
from spacer_core.messages import (
    ClassifyFeaturesMsg,
    ClassifyImageMsg,
    ClassifyReturnMsg,
    ExtractFeaturesMsg,
    ExtractFeaturesReturnMsg,
    JobMsg,
    JobReturnMsg,
    TrainClassifierMsg,
    TrainClassifierReturnMsg,
)
from spacer_core.storage import (
    check_access,
    check_outputs,
    require_writable,
    store_classifier,
)  # noqa: F401  (pyspacer names)

# Re-exported: pyspacer's tasks offers load_image and load_classifier to its importers.
from spacer_core.storage import load_bytes as load_bytes
from spacer_core.storage import load_classifier as load_classifier
from spacer_core.storage import load_image as load_image
from spacer_core.task_utils import (  # noqa: F401  (check_extract_inputs: pyspacer name)
    check_classifier_provenance,
    check_extract_inputs,
    common_provenance,
    preprocess_labels,
    record_provenance,
)
from spacer_core.train_classifier import ClassifierTrainer  # noqa: F401  (pyspacer name)

logger = getLogger(__name__)


def _job(
    msg: ExtractFeaturesMsg | ClassifyImageMsg,
    feature_loc: DataLocation | None = None,
    classifier_loc: DataLocation | None = None,
) -> pipeline.ImageJob:
    return pipeline.ImageJob(
        msg.extractor, msg.rowcols, msg.image_loc, feature_loc=feature_loc, classifier_loc=classifier_loc
    )


def task_locations(msg: Any, prefix: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """(inputs, outputs) of a task message, by field name (`prefix` before each name)."""
    inputs: dict[str, Any] = {}
    outputs: dict[str, Any] = {}
    extractor = getattr(msg, "extractor", None)
    if extractor is not None:
        for key, loc in getattr(extractor, "data_locations", {}).items():
            inputs[f"{prefix}extractor.data_locations[{key!r}]"] = loc
    for name in ("image_loc", "classifier_loc"):
        if getattr(msg, name, None) is not None:
            inputs[prefix + name] = getattr(msg, name)
    if isinstance(msg, ExtractFeaturesMsg):
        outputs[prefix + "feature_loc"] = msg.feature_loc
    elif isinstance(msg, ClassifyFeaturesMsg):
        inputs[prefix + "feature_loc"] = msg.feature_loc
    elif isinstance(msg, TrainClassifierMsg):
        labels = msg.labels
        if isinstance(labels, ImageLabels):
            inputs[prefix + "labels"] = list(labels.keys())
        else:
            for part in ("train", "ref", "val"):
                inputs[f"{prefix}labels.{part}"] = list(getattr(labels, part).keys())
        inputs[prefix + "previous_model_locs"] = msg.previous_model_locs
        outputs[prefix + "model_loc"] = msg.model_loc
        outputs[prefix + "valresult_loc"] = msg.valresult_loc
    return inputs, outputs


def check_task_outputs(msg: Any, prefix: str = "") -> None:
    """Refuse a task message whose outputs name one of its inputs or each other
    (`storage.check_outputs`; `prefix` goes before each field name)."""
    check_outputs(*task_locations(msg, prefix))


def extract_features(msg: ExtractFeaturesMsg) -> ExtractFeaturesReturnMsg:
    """Load the image, check limits and points, extract features and store them."""
    # The pipeline refuses a feature_loc naming one of the job's inputs (`pipeline.load`).
    result = pipeline.run(_job(msg, feature_loc=msg.feature_loc))
    return ExtractFeaturesReturnMsg(extractor_loaded_remotely=result.loaded_remotely, runtime=result.runtime)


def train_classifier(
    msg: TrainClassifierMsg,
    progress: Callable[..., Any] | None = None,
) -> TrainClassifierReturnMsg:
    """Split labels, train, then store the classifier and the validation results.

    `progress`, when given, is called by the trainer after each epoch (the
    gRPC server streams these); it does not change the results.
    """
    limits.current().check_task(msg)  # epochs and layers, before any feature is read
    _check_training_access(msg)  # every location, before any work
    check_task_outputs(msg)
    labels = preprocess_labels(msg.labels)
    logger.debug(
        "Label counts: train=%d ref=%d val=%d; classes in ref: %d",
        labels.train.label_count,
        labels.ref.label_count,
        labels.val.label_count,
        len(labels.ref.classes_set),
    )
    previous = [runtime.current().classifier(loc) for loc in msg.previous_model_locs]
    with _feature_cache(msg, labels), config.log_entry_and_exit("training"):
        kwargs = {"progress": progress} if progress is not None else {}
        clf, val_results, return_msg = msg.trainer(labels, msg.nbr_epochs, previous, msg.clf_type, **kwargs)
    # Every feature file the trainer read, whichever trainer it was.
    loaded = [
        item for part in (labels.train, labels.ref, labels.val) for item in part.loaded_provenance().items()
    ]
    record_provenance(clf, common_provenance(loaded))
    with config.log_entry_and_exit("storing classifier and validation results"):
        store_classifier(msg.model_loc, clf)
        runtime.current().forget_classifier(msg.model_loc)
        val_results.store(msg.valresult_loc)
    return return_msg


def _check_training_access(msg: TrainClassifierMsg) -> None:
    """Refuse a training whose outputs cannot be written, or whose inputs cannot be read,
    under the storage policy: before any feature is read or epoch run, not after."""
    for loc in (msg.model_loc, msg.valresult_loc):
        require_writable(loc)
        check_access(loc, "write")
    for loc in msg.previous_model_locs:
        check_access(loc, "read")
    labels = msg.labels
    parts = [labels] if isinstance(labels, ImageLabels) else [labels.train, labels.ref, labels.val]
    for part in parts:
        for key in part.keys():
            if isinstance(key, DataLocation):
                check_access(key, "read")


@contextlib.contextmanager
def _feature_cache(msg: TrainClassifierMsg, labels: Any) -> Iterator[None]:
    """Cache remote feature files on local disk while training, unless disabled."""
    parent = (
        None
        if msg.feature_cache_dir in (msg.FeatureCache.AUTO, msg.FeatureCache.DISABLED)
        else str(msg.feature_cache_dir)
    )
    if parent is not None:
        # A folder named in the message is written to like any other location.
        check_access(DataLocation("filesystem", parent), "write")
    if not labels.has_remote_data or msg.feature_cache_dir == msg.FeatureCache.DISABLED:
        yield
        return
    # The temporary directory is removed even when training fails.
    with tempfile.TemporaryDirectory(dir=parent) as cache_dir:
        labels.set_filesystem_cache(cache_dir)
        yield


def score_features(clf: Any, features: np.ndarray, source: str) -> np.ndarray:
    """predict_proba for all points of one image (see `spacer_core.pipeline.score`)."""
    return pipeline.score(clf, features, source)


def classify_return(
    start: float,
    rowcols: list[tuple[int | None, int | None]],
    probs: np.ndarray,
    classes: list[Any],
    valid_rowcol: bool,
) -> ClassifyReturnMsg:
    """The reply for scored points: one probability row per (row, col), in order."""
    return ClassifyReturnMsg(
        runtime=time.time() - start,
        scores=[(row, col, p) for (row, col), p in zip(rowcols, probs.tolist())],
        classes=classes,
        valid_rowcol=valid_rowcol,
    )


def classify_features(msg: ClassifyFeaturesMsg) -> ClassifyReturnMsg:
    """Score every point of a stored feature file."""
    start = time.time()
    features = ImageFeatures.load(msg.feature_loc)
    clf = runtime.current().classifier(msg.classifier_loc)
    check_classifier_provenance(clf, features.provenance, msg.classifier_loc.key, msg.feature_loc.key)
    probs = pipeline.score(clf, features.feat, msg.feature_loc.key)
    rowcols = [(pf.row, pf.col) for pf in features.point_features]
    return classify_return(start, rowcols, probs, clf.classes_.tolist(), features.valid_rowcol)


def classify_image(msg: ClassifyImageMsg) -> ClassifyReturnMsg:
    """Extract features at the given points and score them; nothing is stored."""
    start = time.time()
    result = pipeline.run(_job(msg, classifier_loc=msg.classifier_loc))
    assert result.scores is not None and result.classes is not None
    return classify_return(start, list(msg.rowcols), result.scores, result.classes, True)


TASK_FUNCTIONS: dict[str, Callable[[Any], Any]] = {
    "extract_features": extract_features,
    "train_classifier": train_classifier,
    "classify_features": classify_features,
    "classify_image": classify_image,
}


def process_job(job_msg: JobMsg) -> JobReturnMsg:
    """Run a job's tasks in order; the first failure ends the job with ok=False."""
    if not isinstance(job_msg, JobMsg):
        raise JobMsgTypeError(f"process_job needs a JobMsg, got {type(job_msg).__name__}")
    run = TASK_FUNCTIONS.get(job_msg.task_name)
    if run is None:
        raise UnknownTaskError(
            f"Unknown task name {job_msg.task_name!r}; expected one of {sorted(TASK_FUNCTIONS)}."
        )
    # The outputs of every task are checked before the first runs, so a refused
    # job has written nothing; the refusal is reported like a failed task. Tasks
    # are not compared with each other: they run in order, as pyspacer's do, and
    # a later one may read, or replace, what an earlier one wrote.
    for i, task in enumerate(job_msg.tasks):
        try:
            check_task_outputs(task, f"tasks[{i}].")
        except Exception:
            return _failed(job_msg, task.job_token)
    results = []
    for task in job_msg.tasks:
        cancellation.check()  # a call that ended runs no further task
        try:
            with config.log_entry_and_exit(f"{job_msg.task_name} [{task.job_token}]"):
                results.append(run(task))
        except Exception:
            return _failed(job_msg, task.job_token)
    return JobReturnMsg(original_job=job_msg, ok=True, results=results, error_message=None)


def _failed(job_msg: JobMsg, job_token: str) -> JobReturnMsg:
    """The reply of a job whose task `job_token` failed, with the exception being handled."""
    error = traceback.format_exc()
    logger.error("Job %r failed: %s", job_token, error)
    return JobReturnMsg(original_job=job_msg, ok=False, results=None, error_message=error)
