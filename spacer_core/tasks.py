"""Top-level tasks, each taking and returning pyspacer's message classes."""

from __future__ import annotations

import contextlib
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from logging import getLogger
from types import SimpleNamespace
from typing import Any

import numpy as np

from spacer_core import config, crop
from spacer_core.data_classes import DataLocation, ImageFeatures
from spacer_core.exceptions import FeatureDimensionError
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
from spacer_core.storage import load_bytes, load_classifier, store_classifier
from spacer_core.task_utils import check_extract_inputs, preprocess_labels

logger = getLogger(__name__)


def load_checked_bytes(image_loc: DataLocation, rowcols: Sequence[tuple[int, int]]) -> bytes:
    """The encoded image at `image_loc`, after pyspacer's input checks.

    The size comes from the header, so limits and points are checked (in
    pyspacer's order and words) before any pixel is decoded.
    """
    data = load_bytes(image_loc).getvalue()
    size = crop.image_size(data, image_key=image_loc.key)
    check_extract_inputs(SimpleNamespace(size=size), rowcols, image_loc.key)
    return data


def load_checked_rgb(image_loc: DataLocation, rowcols: Sequence[tuple[int, int]]) -> Any:
    """Pixels as pyspacer's load_image + convert('RGB') give them, after its input checks.

    Decoding runs in Rust without the GIL.
    """
    data = load_checked_bytes(image_loc, rowcols)
    return crop.decode_image(data, image_key=image_loc.key).rgb


def extract_features(msg: ExtractFeaturesMsg) -> ExtractFeaturesReturnMsg:
    """Load the image, check limits and points, extract features and store them."""
    rgb = load_checked_rgb(msg.image_loc, msg.rowcols)
    with config.log_entry_and_exit("feature extraction"):
        features, return_msg = msg.extractor.call_rgb(rgb, msg.rowcols)
    with config.log_entry_and_exit("storing features"):
        features.store(msg.feature_loc)
    return return_msg


def train_classifier(
    msg: TrainClassifierMsg,
    progress: Callable[..., Any] | None = None,
) -> TrainClassifierReturnMsg:
    """Split labels, train, then store the classifier and the validation results.

    `progress`, when given, is called by the trainer after each epoch (the
    gRPC server streams these); it does not change the results.
    """
    labels = preprocess_labels(msg.labels)
    logger.debug(
        "Label counts: train=%d ref=%d val=%d; classes in ref: %d",
        labels.train.label_count,
        labels.ref.label_count,
        labels.val.label_count,
        len(labels.ref.classes_set),
    )
    previous = [load_classifier(loc) for loc in msg.previous_model_locs]
    with _feature_cache(msg, labels), config.log_entry_and_exit("training"):
        kwargs = {"progress": progress} if progress is not None else {}
        clf, val_results, return_msg = msg.trainer(
            labels, msg.nbr_epochs, previous, msg.clf_type, **kwargs
        )
    with config.log_entry_and_exit("storing classifier and validation results"):
        store_classifier(msg.model_loc, clf)
        val_results.store(msg.valresult_loc)
    return return_msg


@contextlib.contextmanager
def _feature_cache(msg: TrainClassifierMsg, labels: Any) -> Iterator[None]:
    """Cache remote feature files on local disk while training, unless disabled."""
    if not labels.has_remote_data or msg.feature_cache_dir == msg.FeatureCache.DISABLED:
        yield
        return
    parent = None if msg.feature_cache_dir == msg.FeatureCache.AUTO else msg.feature_cache_dir
    # The temporary directory is removed even when training fails.
    with tempfile.TemporaryDirectory(dir=parent) as cache_dir:
        labels.set_filesystem_cache(cache_dir)
        yield


def score_features(clf: Any, features: np.ndarray, source: str) -> np.ndarray:
    """predict_proba for all points of one image in one call.

    `source` names the feature file or image, for the error raised when the
    feature dimension differs from what the classifier was trained on.
    """
    expected = _expected_feature_dim(clf)
    if expected is not None and features.shape[1] != expected:
        raise FeatureDimensionError(
            f"{source}: features have dimension {features.shape[1]}, but the"
            f" classifier was trained on dimension {expected}."
        )
    return clf.predict_proba(features)


def _expected_feature_dim(clf: Any) -> int | None:
    for candidate in (clf, getattr(clf, "estimator", None), getattr(clf, "base_estimator", None)):
        dim = getattr(candidate, "n_features_in_", None)
        if dim is not None:
            return int(dim)
        coef = getattr(candidate, "coef_", None)
        if coef is not None:
            return int(np.shape(coef)[-1])
    return None


def classify_return(
    start: float, rowcols: list[tuple[int, int]], probs: np.ndarray, clf: Any, valid_rowcol: bool
) -> ClassifyReturnMsg:
    """The reply for scored points: one probability row per (row, col), in order."""
    return ClassifyReturnMsg(
        runtime=time.time() - start,
        scores=[(row, col, p) for (row, col), p in zip(rowcols, probs.tolist())],
        classes=clf.classes_.tolist(),
        valid_rowcol=valid_rowcol,
    )


def classify_features(msg: ClassifyFeaturesMsg) -> ClassifyReturnMsg:
    """Score every point of a stored feature file."""
    start = time.time()
    features = ImageFeatures.load(msg.feature_loc)
    clf = load_classifier(msg.classifier_loc)
    probs = score_features(clf, features.feat.astype(np.float64), msg.feature_loc.key)
    rowcols = [(pf.row, pf.col) for pf in features.point_features]
    return classify_return(start, rowcols, probs, clf, features.valid_rowcol)


def classify_image(msg: ClassifyImageMsg) -> ClassifyReturnMsg:
    """Extract features at the given points and score them; nothing is stored."""
    start = time.time()
    rgb = load_checked_rgb(msg.image_loc, msg.rowcols)
    features, _ = msg.extractor.call_rgb(rgb, msg.rowcols)
    clf = load_classifier(msg.classifier_loc)
    # The extractor returns one feature row per requested point, in order.
    probs = score_features(clf, features.feat.astype(np.float64), msg.image_loc.key)
    return classify_return(start, list(msg.rowcols), probs, clf, True)


TASK_FUNCTIONS: dict[str, Callable[[Any], Any]] = {
    "extract_features": extract_features,
    "train_classifier": train_classifier,
    "classify_features": classify_features,
    "classify_image": classify_image,
}


def process_job(job_msg: JobMsg) -> JobReturnMsg:
    """Run a job's tasks in order; the first failure ends the job with ok=False."""
    if not isinstance(job_msg, JobMsg):
        raise TypeError(f"process_job needs a JobMsg, got {type(job_msg).__name__}")
    run = TASK_FUNCTIONS.get(job_msg.task_name)
    if run is None:
        raise ValueError(
            f"Unknown task name {job_msg.task_name!r}; expected one of {sorted(TASK_FUNCTIONS)}."
        )
    results = []
    for task in job_msg.tasks:
        try:
            with config.log_entry_and_exit(f"{job_msg.task_name} [{task.job_token}]"):
                results.append(run(task))
        except Exception:
            error = traceback.format_exc()
            logger.error("Job %s failed: %s", task.job_token, error)
            return JobReturnMsg(original_job=job_msg, ok=False, results=None, error_message=error)
    return JobReturnMsg(original_job=job_msg, ok=True, results=results, error_message=None)
