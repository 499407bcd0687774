"""The one path from image bytes to features and scores, for every caller.

    job = ImageJob(extractor, rowcols, image=DataLocation(...) or b"...jpeg bytes...",
                   feature_loc=..., classifier_loc=...)
    result = pipeline.run(job)                         # tasks, CLI: features in this thread
    result = await pipeline.run_async(job, runtime, call)  # server: shared dynamic batcher

Each image goes: load bytes -> check limits and points from the header (no
pixel decoded yet; `load`) -> decode + crop in Rust to uint8 patches (`cut`)
-> features (`Runtime.features`, or the runtime's dynamic batcher across
concurrent calls; either converts the patches to the network's float32
input a batch at a time) -> store the features and/or score them.
Extractors without a network (`batchable` False) compute their features
from decoded RGB pixels in the cutting step instead.
In `fast` precision, scored points whose top two classes are close get
exact features from the same patches before anything is stored (`recheck`).

Patches wait for the network as uint8 crops (150 KB a point), a quarter of
the float32 input's bytes. `Loaded.footprint` says, from the header alone,
how many bytes an image will hold, so a server can admit work by memory
(`run_async`'s `admit`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any, Protocol, TypeVar

import numpy as np

from spacer_core import config, crop, runtime
from spacer_core.data_classes import DataLocation, ImageFeatures
from spacer_core.exceptions import FeatureDimensionError, InvalidInputError
from spacer_core.extractors import FeatureExtractor
from spacer_core.inference.backends import in_one_session
from spacer_core.inference.batcher import DEFAULT_PRIORITY
from spacer_core.inference.network import NetworkSpec
from spacer_core.runtime import Runtime, classifier_feature_dim
from spacer_core.storage import check_outputs, load_bytes
from spacer_core.task_utils import check_classifier_provenance, check_extract_inputs, check_features

logger = logging.getLogger(__name__)

T = TypeVar("T")
RowCol = tuple[int, int]


@dataclass(frozen=True)
class ImageJob:
    """One image's points to turn into features, and where the results go.

    `image` is a DataLocation or the encoded bytes themselves; `name` labels
    the image in errors (defaults to the location's key). Features are stored
    at `feature_loc` and scored with the classifier at `classifier_loc`, when
    given.
    """

    extractor: FeatureExtractor
    rowcols: Sequence[RowCol]
    image: DataLocation | bytes
    name: str = ""
    feature_loc: DataLocation | None = None
    classifier_loc: DataLocation | None = None

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return self.image.key if isinstance(self.image, DataLocation) else "image"


@dataclass
class ImageResult:
    """Features (N, D) float32 in the order of the job's points, and scores when asked for."""

    rowcols: list[RowCol]
    features: np.ndarray
    loaded_remotely: bool
    runtime: float
    scores: np.ndarray | None = None  # (N, classes) float64
    classes: list[Any] | None = None


@dataclass(frozen=True)
class Footprint:
    """Bytes one image holds on its way through the pipeline.

    `cutting`: while it is decoded and cut (encoded bytes, decoded RGB,
    uint8 patches, its share of float32 batch input); `waiting`: once cut,
    until its features are back (patches and batch share).
    """

    cutting: int
    waiting: int

    @classmethod
    def of(cls, encoded: int, decoded: int, points: int, crop_size: int, batch_size: int) -> Footprint:
        """`decoded`: what decoding holds at its peak (`crop.decoded_bytes`)."""
        patches = points * crop_size * crop_size * 3
        batch_share = min(points, batch_size) * 3 * crop_size * crop_size * 4
        return cls(encoded + decoded + patches + batch_share, patches + batch_share)


@dataclass
class Loaded:
    """A job whose image bytes were read and checked against the limits; nothing decoded yet."""

    job: ImageJob
    data: bytes
    rowcols: list[RowCol]
    size: tuple[int, int]  # (width, height) from the header
    start: float
    footprint: Footprint
    network: tuple[NetworkSpec, bool] | None  # the extractor's network and loaded-remotely flag


@dataclass
class Prepared:
    """A job after its image was checked and cut: patches for `net`, or features already.

    `patches` are uint8 (N, s, s, 3) crops, as pyspacer cuts them.
    """

    job: ImageJob
    rowcols: list[RowCol]
    start: float
    loaded_remotely: bool
    net: NetworkSpec | None = None
    patches: np.ndarray | None = None
    features: np.ndarray | None = None


def read_image(image: DataLocation | bytes, name: str) -> bytes:
    """The encoded image bytes of a job (read through storage and its policy)."""
    if isinstance(image, DataLocation):
        return load_bytes(image).getvalue()
    if not image:
        raise InvalidInputError(f"{name}: the image is empty (0 bytes)")
    return bytes(image)


def check_points(data: bytes, rowcols: Sequence[RowCol], name: str) -> list[RowCol]:
    """pyspacer's limit and point checks, with the size read from the header only."""
    return _checked(data, rowcols, name)[0]


def _checked(data: bytes, rowcols: Sequence[RowCol], name: str) -> tuple[list[RowCol], tuple[int, int]]:
    points = list(rowcols)
    if not points:
        raise InvalidInputError(f"{name}: no points given; need at least one (row, col)")
    size = crop.image_size(data, image_key=name)
    check_extract_inputs(SimpleNamespace(size=size), points, name)
    return [(int(r), int(c)) for r, c in points], size


def load(job: ImageJob) -> Loaded:
    """Read the image's bytes and check them and the points (header only), with the
    extractor's network (weights hash-checked): all admission needs to know."""
    start = time.time()
    name = job.label
    if job.feature_loc is not None:
        # Before any work: features stored over the image, weights or classifier would destroy them.
        inputs: dict[str, DataLocation | None] = {
            f"extractor.data_locations[{k!r}]": v for k, v in job.extractor.data_locations.items()
        }
        inputs["image_loc"] = job.image if isinstance(job.image, DataLocation) else None
        inputs["classifier_loc"] = job.classifier_loc
        check_outputs(inputs, {"feature_loc": job.feature_loc})
    data = read_image(job.image, name)
    points, (width, height) = _checked(data, job.rowcols, name)
    found = job.extractor.network()
    if found is None:  # features come straight from the decoded image
        footprint = Footprint(len(data) + crop.decoded_bytes(data, width, height, rgb=True), 0)
    else:
        # Sizing only: reading the header must not build the network.
        batch_size = runtime.current().batch_size(found[0], load=False)
        footprint = Footprint.of(
            len(data),
            crop.decoded_bytes(data, width, height),
            len(points),
            job.extractor.CROP_SIZE,
            batch_size,
        )
    return Loaded(job, data, points, (width, height), start, footprint, found)


def cut(loaded: Loaded) -> Prepared:
    """Decode and cut uint8 patches (or, without a network, extract the features)."""
    job, points, name = loaded.job, loaded.rowcols, loaded.job.label
    if loaded.network is None:
        rgb = crop.decode_image(loaded.data, image_key=name).rgb
        with config.log_entry_and_exit("feature extraction"):
            features, remote = job.extractor.extract_rgb(rgb, points)
        return Prepared(job, points, loaded.start, remote, features=np.asarray(features))
    net, remote = loaded.network
    # A worker that keeps to one core decodes there too; a caller alone decodes on every core.
    patches = crop.crop_patches(
        loaded.data, points, job.extractor.CROP_SIZE, image_key=name, parallel=not in_one_session()
    )
    return Prepared(job, points, loaded.start, remote, net=net, patches=patches)


def prepare(job: ImageJob) -> Prepared:
    """Load and check the image, then cut its patches (or, without a network, extract)."""
    return cut(load(job))


def finish(prepared: Prepared, features: np.ndarray) -> ImageResult:
    """Score and/or store the features of a prepared job.

    In `fast` precision, close calls among the scores are recomputed from the
    job's patches in exact precision first (`recheck`), so stored features
    and scores are the rechecked ones.
    """
    job = prepared.job
    if not np.isfinite(features).all():
        # Damaged weights (or a broken extractor) give NaN: no file or reply may carry them.
        raise InvalidInputError(
            f"{job.label}: the extractor gave NaN or infinite features; its weights file may be damaged."
        )
    rows, cols = (list(axis) for axis in zip(*prepared.rowcols))
    made = None
    if job.feature_loc is not None or job.classifier_loc is not None:
        weights = prepared.net.key if prepared.net is not None else None
        made = job.extractor.feature_provenance(rows, cols, weights)
        made = replace(made, precision=runtime.current().feature_precision(prepared.net))
    scores = classes = None
    if job.classifier_loc is not None:
        clf = runtime.current().classifier(job.classifier_loc)
        weights_loc = getattr(job.extractor, "data_locations", {}).get("weights")
        check_classifier_provenance(
            clf, made, job.classifier_loc.key, weights=getattr(weights_loc, "key", None)
        )
        scores = score(clf, features, job.label)
        classes = clf.classes_.tolist()
        if prepared.patches is not None and prepared.net is not None:
            features, scores = recheck(prepared, clf, features, scores)
    prepared.patches = None
    if job.feature_loc is not None:
        stored = ImageFeatures.from_arrays(features, rows, cols)
        stored.provenance = made
        with config.log_entry_and_exit("storing features"):
            stored.store(job.feature_loc)
    result = ImageResult(prepared.rowcols, features, prepared.loaded_remotely, 0.0, scores, classes)
    result.runtime = time.time() - prepared.start
    return result


def close_calls(scores: np.ndarray, margin: float) -> np.ndarray:
    """Indices of the rows of `scores` whose top two probabilities differ by less than `margin`."""
    if margin <= 0 or scores.shape[1] < 2:
        return np.empty(0, np.intp)
    top2 = np.partition(scores, -2, axis=1)[:, -2:]
    return np.flatnonzero(top2[:, 1] - top2[:, 0] < margin)


def recheck(
    prepared: Prepared, clf: Any, features: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Features and scores with the close calls recomputed in exact precision.

    Reduced-precision features move a classifier's scores a little; where the
    top two classes are within the runtime's `fast_recheck_margin` that can
    swap the top-1 class, so those points' features are recomputed exactly
    from the same patches. Other points keep their fast features.
    """
    assert prepared.net is not None and prepared.patches is not None
    active = runtime.current()
    picked = close_calls(scores, active.recheck_margin(prepared.net))
    active.count_recheck(len(scores), len(picked))
    logger.debug(
        "%s: %d of %d points rechecked in exact precision", prepared.job.label, len(picked), len(scores)
    )
    if not len(picked):
        return features, scores
    exact = active.exact_features(prepared.net, prepared.patches[picked])
    features = features.copy()
    features[picked] = exact
    scores = scores.copy()
    scores[picked] = score(clf, exact, prepared.job.label)
    return features, scores


def _keeps_patches(prepared: Prepared, active: Runtime) -> bool:
    """True when `finish` may recheck this job's points and so needs its patches.

    Asked after the features are back, so the network is built; never builds it
    (`run_async` asks on the event loop).
    """
    return (
        prepared.job.classifier_loc is not None
        and prepared.net is not None
        and active.recheck_margin(prepared.net, load=False) > 0
    )


def run(job: ImageJob) -> ImageResult:
    """The whole pipeline in this thread, with the current runtime (tasks, CLI and bulk work)."""
    prepared = prepare(job)
    features = prepared.features
    if features is None:
        assert prepared.net is not None and prepared.patches is not None
        active = runtime.current()
        with config.log_entry_and_exit("forward pass through net"):
            features = active.features(prepared.net, prepared.patches)
        if not _keeps_patches(prepared, active):
            prepared.patches = None  # a survey's workers hold many images: free each one's patches early
    return finish(prepared, features)


Call = Callable[..., Awaitable[Any]]


class Hold(Protocol):
    """Bytes admitted for one image (see `run_async`'s `admit`)."""

    def resize(self, nbytes: int) -> None:
        """Hold `nbytes` from now on (never more than admitted)."""

    def release(self) -> None:
        """Give everything back; calling it again does nothing."""


Admit = Callable[[int], Awaitable[Hold]]


async def run_async(
    job: ImageJob,
    active: Runtime,
    call: Call,
    *,
    priority: int = DEFAULT_PRIORITY,
    deadline: float | None = None,
    admit: Admit | None = None,
) -> ImageResult:
    """The pipeline for asyncio callers: blocking steps through `call`, the network
    through `active`'s dynamic batcher, so concurrent jobs fill each other's batches.

    `call(func, *args)` runs a blocking function off the event loop (in a
    context where `active` is current). `priority` (`Priority`, lower first)
    orders the job's patches among those waiting for the network; a job still
    waiting at `deadline` (`time.monotonic()`) is dropped before the network
    with DeadlineExceededError. `admit(nbytes)`, when given, is awaited once
    the header is read, before anything is decoded, with the bytes the image
    will hold while it is cut (`Footprint.cutting`); the hold it returns is
    shrunk to `Footprint.waiting` once the image is cut and released when its
    features are back (in `fast` precision with a classifier, once it is
    scored: the patches stay for the exact recheck).
    """
    loaded: Loaded | None = await call(load, job)
    assert loaded is not None
    footprint = loaded.footprint
    hold = await admit(footprint.cutting) if admit is not None else None
    try:
        prepared: Prepared = await call(cut, loaded)
        loaded = None  # the encoded bytes are no longer needed
        if hold is not None:
            hold.resize(footprint.waiting)
        features = prepared.features
        if features is None:
            assert prepared.net is not None and prepared.patches is not None
            features = await active.features_async(
                prepared.net, prepared.patches, priority=priority, deadline=deadline
            )
            if not _keeps_patches(prepared, active):
                prepared.patches = None  # free the patches before scoring
        if prepared.patches is not None:
            # The exact recheck runs in `finish`, off the event loop, and needs
            # the patches: they stay held until the job is scored.
            return await call(finish, prepared, features)
    finally:
        if hold is not None:
            hold.release()
    return await call(finish, prepared, features)


def score(clf: Any, features: np.ndarray, source: str) -> np.ndarray:
    """predict_proba for all points of one image in one call.

    `source` names the feature file or image, for the error raised when the
    feature dimension differs from what the classifier was trained on, when
    the features are not finite numbers, or when scikit-learn cannot score
    them with this classifier (InvalidInputError: both come from the client).
    """
    x = check_features(features, source)
    expected = classifier_feature_dim(clf)
    if expected is not None and x.shape[1] != expected:
        raise FeatureDimensionError(
            f"{source}: features have dimension {x.shape[1]}, but the"
            f" classifier was trained on dimension {expected}."
        )
    try:
        with np.errstate(all="ignore"):
            scores = np.asarray(clf.predict_proba(x))
    except (ValueError, IndexError) as err:
        raise InvalidInputError(f"{source}: the classifier cannot score these features ({err}).") from None
    if not np.isfinite(scores).all():
        # Finite but extreme weights (1e308) overflow into NaN: no reply carries such scores.
        raise InvalidInputError(
            f"{source}: the classifier's scores for these features are not finite numbers."
        )
    return scores
