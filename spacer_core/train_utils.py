"""The training loop, evaluation and feature loading behind MiniBatchTrainer.

pyspacer re-reads and decompresses every feature file in every epoch. Here
each file is read once (several at a time, in threads) into one contiguous
matrix; each epoch then builds its mini-batches by indexing that matrix.
The batches hold the same rows in the same order as pyspacer's, and every
random draw is made from the same seeds: LR models come out bit-identical
to pyspacer's, MLP models identical up to the last-bit rounding of BLAS
(which depends on its thread count).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import random
import string
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import SGDClassifier
from sklearn.neural_network import MLPClassifier
from threadpoolctl import threadpool_limits

from spacer_core import cancellation, runtime
from spacer_core.data_classes import DataLocation, ImageFeatures, ImageLabels, LabelId
from spacer_core.exceptions import FeatureDimensionError, InvalidInputError
from spacer_core.task_utils import check_features

# Called after each epoch with (epoch index, ref-set accuracy, seconds since
# training started).
ProgressCallback = Callable[[int, float, float], Any]

# pyspacer scores the validation set in batches of this many points; the
# same chunking keeps floating-point results identical.
EVAL_BATCH_SIZE = 1000

# LR batches at least this large (rows x features) fit their one-vs-rest
# classifiers on several threads; below it, thread hand-offs cost more than
# they save.
PARALLEL_OVR_MIN_VALUES = 500_000

# BLAS threads while fitting an MLP: a count, None for the library's default
# (all cores), or "auto". Its products are small (200-row minibatches): on an
# idle 2-core machine two threads fit a batch ~1.6x faster than one, but on a
# busy one they took 2-5x longer (the threads wait on each other). "auto"
# times the first epoch with each choice and keeps the faster. The thread
# count only changes last-bit rounding. The limit is process-wide while set.
MLP_BLAS_THREADS: int | str | None = "auto"

# Bytes of features a training set may hold in RAM (None: a quarter of the
# physical memory). A larger set is kept in a temporary file mapped into
# memory instead, at float32 (4 bytes a value) for extractor features.
FEATURE_MEMORY_BUDGET: int | None = None


@dataclass
class LabelledFeatures:
    """The annotated points of an ImageLabels, loaded into memory.

    Rows of `x` follow the ImageLabels' image order and, inside an image, the
    annotation order. `x` is float32 when every value was exactly
    representable in float32 (true of extractor output, which is float32
    stored as float64), else float64; `batch()` always returns float64.
    """

    x: np.ndarray
    y: np.ndarray
    # Row ranges of the images: image i owns rows starts[i] : starts[i + 1].
    starts: np.ndarray

    @property
    def image_count(self) -> int:
        return len(self.starts) - 1

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, rows: np.ndarray | slice) -> tuple[np.ndarray, np.ndarray]:
        """Features (float64, C-contiguous) and labels of the given rows."""
        x = self.x[rows] if isinstance(rows, slice) else np.take(self.x, rows, axis=0)
        return np.ascontiguousarray(x, dtype=np.float64), self.y[rows]

    def iter_batches(self, order: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Consecutive batches of the rows in `order`, as float64 features and labels.

        The next batch is gathered on a helper thread while the caller fits
        the current one (NumPy copies release the GIL). Feature arrays are
        two buffers used in turn, so a batch's array is only valid until the
        next batch is requested. Reusing them also spares the page faults of
        a fresh 50 MB allocation per batch.
        """
        firsts = range(0, len(order), batch_size)
        size = min(batch_size, len(order))
        buffers = [self._batch_buffers(size) for _ in range(min(2, len(firsts)))]

        def gather(k: int) -> np.ndarray:
            rows = order[firsts[k] : firsts[k] + batch_size]
            out, staging = buffers[k % 2]
            n = len(rows)
            np.take(self.x, rows, axis=0, out=staging[:n])
            if staging is not out:
                out[:n] = staging[:n]
            return out[:n]

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="spacer-batches") as helper:
            pending = helper.submit(gather, 0) if firsts else None
            for k, first in enumerate(firsts):
                assert pending is not None
                x = pending.result()
                if k + 1 < len(firsts):
                    pending = helper.submit(gather, k + 1)
                yield x, self.y[order[first : first + batch_size]]

    def _batch_buffers(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        # (float64 output, buffer in the storage dtype); one array if they agree.
        out = np.empty((rows, self.x.shape[1]), dtype=np.float64)
        if self.x.dtype == np.float64:
            return out, out
        return out, np.empty((rows, self.x.shape[1]), dtype=self.x.dtype)

    def epoch_order(self, seed: int) -> tuple[np.ndarray, np.random.RandomState]:
        """Row order of one epoch, and the random state left after drawing it.

        pyspacer seeds NumPy's global generator with the epoch number and
        shuffles the image list; the MLP then keeps drawing from that same
        generator. A private RandomState makes the same draws.
        """
        state = np.random.RandomState(seed)
        images = np.arange(self.image_count)
        state.shuffle(images)
        lengths = np.diff(self.starts)[images]
        # Row r of the epoch is row (r - first row of its image in the epoch)
        # of that image in x.
        epoch_starts = np.cumsum(lengths) - lengths
        shift = np.repeat(self.starts[:-1][images] - epoch_starts, lengths)
        return np.arange(len(self)) + shift, state


def load_labelled_features(labels: ImageLabels, max_workers: int | None = None) -> LabelledFeatures:
    """Read the feature files of `labels` (in parallel) and pair rows with labels.

    Remote files go through the labels' filesystem cache when one is set. A
    point missing from its feature file raises RowColumnMismatchError and a
    feature file without row/col data raises RowColumnMissingError, each
    naming the file.
    """
    keys = list(labels.keys())
    annotations = [labels[key] for key in keys]
    counts = np.array([len(a) for a in annotations], dtype=np.int64)
    starts = np.zeros(len(keys) + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    y = np.asarray([label for image in annotations for (_row, _col, label) in image])

    # Readers run in the caller's context, so its storage policy applies to them.
    context = contextvars.copy_context()

    def read(i: int) -> np.ndarray:
        return context.copy().run(_annotated_rows, labels, keys[i], annotations[i])

    if not keys:
        return LabelledFeatures(np.empty((0, 0)), y, starts)
    owned = max_workers is not None
    pool = ThreadPoolExecutor(max_workers=max_workers) if owned else runtime.current().reader_pool()
    try:
        blocks: Iterator[np.ndarray] = pool.map(read, range(len(keys)))
        first = next(blocks)
        dim = first.shape[1]
        x32 = _feature_matrix(int(starts[-1]), dim, np.float32)
        # float64 originals of the files that float32 cannot hold exactly.
        inexact: dict[int, np.ndarray] = {}
        for i, block in enumerate(_chain(first, blocks)):
            if block.shape[1] != dim:
                raise FeatureDimensionError(
                    f"{keys[i].key}: features have dimension {block.shape[1]},"
                    f" but {keys[0].key} has dimension {dim}."
                )
            rows = x32[starts[i] : starts[i + 1]]
            rows[...] = block
            if not np.array_equal(rows, block):
                inexact[i] = block
    finally:
        if owned:
            pool.shutdown(cancel_futures=True)
    if not inexact:
        return LabelledFeatures(x32, y, starts)
    x64 = _feature_matrix(len(x32), x32.shape[1], np.float64)
    x64[...] = x32
    del x32
    for i, block in inexact.items():
        x64[starts[i] : starts[i + 1]] = block
    return LabelledFeatures(x64, y, starts)


def _feature_matrix(rows: int, dim: int, dtype: type[np.floating[Any]]) -> np.ndarray:
    """An uninitialised (rows, dim) array, backed by an unlinked temporary file
    when it would exceed the memory budget (the OS then pages it as needed)."""
    size = rows * dim * np.dtype(dtype).itemsize
    if size <= _memory_budget():
        return np.empty((rows, dim), dtype=dtype)
    with tempfile.TemporaryFile(prefix="spacer-features-") as backing:
        backing.truncate(size)
        # The mapping keeps its own handle; the file goes when the array does.
        return np.memmap(backing, dtype=dtype, mode="r+", shape=(rows, dim))


def _memory_budget() -> int:
    if FEATURE_MEMORY_BUDGET is not None:
        return FEATURE_MEMORY_BUDGET
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def _chain(first: np.ndarray, rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    yield first
    yield from rest


def _annotated_rows(labels: ImageLabels, loc: DataLocation, annotations: Sequence[Any]) -> np.ndarray:
    """The float64 feature rows of one file, one per annotation, in annotation order."""
    x, _labels = labels.load_features(loc).match_arrays(annotations, source=loc.key)
    return check_features(x, loc.key)


def make_classifier(
    clf_type: str,
    train_label_count: int,
    *,
    mlp_hidden_layer_sizes: tuple[int, ...] | None = None,
    mlp_learning_rate_init: float | None = None,
    mlp_large_data_threshold: int = 50000,
    sgd_loss: str = "log_loss",
    sgd_average: bool = True,
    sgd_random_state: int = 0,
) -> SGDClassifier | MLPClassifier:
    """A fresh, unfitted classifier of `clf_type` ('LR' or 'MLP') with pyspacer's settings."""
    if clf_type == "MLP":
        if mlp_hidden_layer_sizes is not None:
            hidden, rate = mlp_hidden_layer_sizes, mlp_learning_rate_init or 1e-3
        elif train_label_count >= mlp_large_data_threshold:
            hidden, rate = (200, 100), 1e-4
        else:
            hidden, rate = (100,), 1e-3
        return MLPClassifier(hidden_layer_sizes=hidden, learning_rate_init=rate)
    if clf_type == "LR":
        return SGDClassifier(loss=sgd_loss, average=sgd_average, random_state=sgd_random_state)
    raise InvalidInputError(f"Unknown classifier type {clf_type!r}; expected 'LR' or 'MLP'.")


def train(
    clf: SGDClassifier | MLPClassifier,
    train_data: LabelledFeatures,
    ref_data: LabelledFeatures,
    classes: list[LabelId],
    nbr_epochs: int,
    batch_size: int,
    progress: ProgressCallback | None = None,
) -> tuple[CalibratedClassifierCV, list[float]]:
    """Fit `clf` with mini-batches for `nbr_epochs`, then calibrate it on the ref set.

    Returns the calibrated classifier and the ref-set accuracy after each
    epoch. `progress`, if given, is called after each epoch.
    """
    start = time.time()
    ref_x, ref_y = ref_data.batch(slice(None))
    is_mlp = isinstance(clf, MLPClassifier)
    batch_values = min(batch_size, len(train_data)) * train_data.x.shape[1]
    parallel_ovr = not is_mlp and len(classes) > 2 and batch_values >= PARALLEL_OVR_MIN_VALUES
    if parallel_ovr:
        # One-vs-rest fits are independent and each is seeded up front, so
        # fitting them on several threads gives the same coefficients.
        clf.set_params(n_jobs=min(len(classes), os.cpu_count() or 1))
    blas = _BlasThreads(MLP_BLAS_THREADS if is_mlp else None)
    ref_accs: list[float] = []
    # scikit-learn's MLP takes a Ctrl-C inside partial_fit for "stop early" and goes on
    # with the next batch: held, a Ctrl-C stops the training between batches instead.
    try:
        with cancellation.HeldInterrupts() as ctrl_c:
            for epoch in range(nbr_epochs):
                order, state = train_data.epoch_order(epoch)
                if is_mlp:
                    # Weight initialisation and in-batch shuffles draw from here.
                    clf.set_params(random_state=state)
                with blas.epoch(epoch):
                    for x, y in train_data.iter_batches(order, batch_size):
                        cancellation.check()  # a call that ended stops its training here
                        ctrl_c.check()
                        clf.partial_fit(x, y, classes=classes)
                ref_accs.append(float(np.mean(clf.predict(ref_x) == ref_y)))
                if progress is not None:
                    progress(epoch, ref_accs[-1], time.time() - start)
    finally:
        # Leave the parameters as pyspacer's classifier has them.
        if parallel_ovr:
            clf.set_params(n_jobs=None)
        if is_mlp:
            clf.set_params(random_state=None)
    calibrated = CalibratedClassifierCV(clf, cv="prefit")
    calibrated.fit(ref_x, ref_y)
    return calibrated, ref_accs


class _BlasThreads:
    """The BLAS thread limit for each epoch of a fit (see MLP_BLAS_THREADS)."""

    # Tried in this order by "auto": the library default, then one thread.
    _CANDIDATES: tuple[int | None, ...] = (None, 1)

    def __init__(self, setting: int | str | None):
        self.setting = setting
        self.seconds: dict[int | None, float] = {}

    def _limit_for(self, epoch: int) -> int | None:
        if self.setting != "auto":
            return None if isinstance(self.setting, str) else self.setting
        if epoch < len(self._CANDIDATES):
            return self._CANDIDATES[epoch]
        return min(self.seconds, key=self.seconds.__getitem__)

    @contextlib.contextmanager
    def epoch(self, epoch: int) -> Iterator[None]:
        limit = self._limit_for(epoch)
        started = time.perf_counter()
        if limit is None:
            yield
        else:
            with threadpool_limits(limits=limit, user_api="blas"):
                yield
        if epoch < len(self._CANDIDATES):
            self.seconds[limit] = time.perf_counter() - started


def predict_with_scores(clf: Any, data: LabelledFeatures) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class, highest probability) of every row of `data`.

    The prediction is the class of highest probability, which is exactly
    what CalibratedClassifierCV.predict returns, so one predict_proba call
    serves both.
    """
    classes = np.asarray(clf.classes_)
    estimates, scores = [], []
    for first in range(0, len(data), EVAL_BATCH_SIZE):
        x, _ = data.batch(slice(first, first + EVAL_BATCH_SIZE))
        proba = clf.predict_proba(x)
        estimates.append(classes[np.argmax(proba, axis=1)])
        scores.append(proba.max(axis=1))
    if not estimates:
        return classes[:0], np.empty(0)
    return np.concatenate(estimates), np.concatenate(scores)


def evaluate_classifier(clf: Any, labels: ImageLabels) -> tuple[list, list, list[float]]:
    """(ground truths, estimates, top scores) of `clf` over every point of `labels`."""
    data = load_labelled_features(labels)
    estimates, scores = predict_with_scores(clf, data)
    if len(data) == 0:
        raise InvalidInputError("Cannot evaluate a classifier on an empty label set.")
    return data.y.tolist(), estimates.tolist(), scores.tolist()


def calc_acc(gt: Sequence[Any], est: Sequence[Any]) -> float:
    """Fraction of positions where `gt` and `est` agree."""
    if len(gt) == 0 or len(est) == 0:
        raise InvalidInputError("Inputs can not be empty")
    if len(gt) != len(est):
        raise InvalidInputError("Input gt and est must have the same length")
    return sum(1 for g, e in zip(gt, est) if g == e) / len(gt)


def _label_offset(label: LabelId) -> float:
    # pyspacer offsets features by hash(label); str hashes change from one
    # process to the next, so a checksum keeps test data reproducible.
    if isinstance(label, (int, np.integer)):
        return float(label)
    return float(zlib.crc32(str(label).encode("utf-8")) % 1000)


def make_random_data(
    im_count: int,
    class_list: list[LabelId],
    points_per_image: int,
    feature_dim: int,
    feature_loc_base: DataLocation,
    feature_loc_keys: list[str] | None = None,
    rng: np.random.Generator | None = None,
) -> ImageLabels:
    """Store random feature files whose values depend on the labels; return their labels.

    Every class appears in every image: an image has ``points_per_image``
    points, or one per class when there are more classes, as in pyspacer.
    Keys come from `feature_loc_keys`, or are `feature_loc_base.key` (a
    folder or prefix; pyspacer ignores it) followed by 20 random characters;
    storage type and bucket come from `feature_loc_base`. Without `rng`, the
    draws come from numpy's and Python's global generators in pyspacer's
    order, so after the same seeds the labels, keys and (for int classes)
    values are pyspacer's.
    """
    alphabet = string.ascii_uppercase + string.digits
    labels = ImageLabels()
    for i in range(im_count):
        if rng is None:
            choices = np.random.choice(len(class_list), points_per_image)
        else:
            choices = rng.integers(0, len(class_list), points_per_image)
        point_labels = [class_list[c] for c in choices]
        # Slice assignment grows the list when there are more classes than points.
        point_labels[: len(class_list)] = class_list
        npoints = len(point_labels)
        offsets = np.array([_label_offset(label) for label in point_labels])
        noise = (
            np.random.randn(npoints, feature_dim)
            if rng is None
            else rng.standard_normal((npoints, feature_dim))
        )
        feat = offsets[:, None] + noise
        if feature_loc_keys is not None:
            key = feature_loc_keys[i]
        elif rng is None:
            key = feature_loc_base.key + "".join(random.choice(alphabet) for _ in range(20))
        else:
            key = feature_loc_base.key + "".join(rng.choice(list(alphabet), 20))
        loc = DataLocation(
            storage_type=feature_loc_base.storage_type,
            bucket_name=feature_loc_base.bucket_name,
            key=key,
        )
        # Row = col = point index, as pyspacer's random features have.
        positions = list(range(npoints))
        ImageFeatures.from_arrays(feat, rows=positions, cols=positions).store(loc)
        labels.add_image(loc, [(p, p, label) for p, label in zip(positions, point_labels)])
    return labels
