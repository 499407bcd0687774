"""Input checks and label preprocessing shared by the tasks.

Splits are reproduced exactly as pyspacer makes them (same seeds, same
ordering of images and annotations), so a classifier trained here sees the
same train / ref / val sets as one trained by pyspacer.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from enum import Enum
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split

from spacer_core import config, limits
from spacer_core.data_classes import (
    DataLocation,
    FeatureProvenance,
    ImageLabels,
    LabelId,
    ProvenanceMismatchError,
)
from spacer_core.exceptions import (
    DataLimitError,
    InvalidInputError,
    RowColumnInvalidError,
    TrainingLabelsError,
)
from spacer_core.task_io import TrainingTaskLabels

_SET_NAMES = ("train", "ref", "val")

# The attribute a trained classifier carries its features' provenance in: a
# dict of plain strings, which pyspacer's unpickling and ours both accept.
CLASSIFIER_PROVENANCE_ATTR = "spacer_features_"


def check_extract_inputs(image: Any, rowcols: Sequence[tuple[int, int]], im_key: str) -> None:
    """Reject images over MAX_IMAGE_PIXELS, too many points, or bad row/col values.

    `image` is anything with a Pillow-style ``size`` (width, height). The
    bounds are the active runtime's, else `spacer_core.config`'s, read at
    call time so they can be changed at runtime.
    """
    width, height = image.size
    active = limits.current()
    max_pixels, max_points = active.image_pixels, active.points_per_image
    if width * height > max_pixels:
        raise DataLimitError.too_many_pixels(im_key, width, height, max_pixels)
    if len(rowcols) > max_points:
        raise DataLimitError(
            f"{len(rowcols)} point locations were specified for image {im_key},"
            f" and that's larger than the max allowed of {max_points}."
        )
    for row, col in rowcols:
        # Each test runs on row then column before the next test, as in
        # pyspacer, so a point with two faults gets pyspacer's message.
        coordinates = (("Row", row, height), ("Column", col, width))
        for name, value, _extent in coordinates:
            if not isinstance(value, int):
                raise RowColumnInvalidError(
                    f"{im_key}: {name} values must be integers. Given value was: {value}"
                )
        for name, value, _extent in coordinates:
            if value < 0:
                raise RowColumnInvalidError(
                    f"{im_key}: {name} values must be non-negative. Given value was: {value}"
                )
        for name, value, extent in coordinates:
            if value >= extent:
                raise RowColumnInvalidError(
                    f"{im_key}: {name} value {value} falls outside this image's"
                    f" valid range of 0-{extent - 1}."
                )


class SplitMode(Enum):
    """How annotations are divided between the train, ref and val sets."""

    # Whole feature files (images) go to one set: evaluation then measures
    # how the classifier does on images it has never seen.
    VECTORS = "vectors"
    # Individual points are split; set sizes hit their goals exactly.
    POINTS = "points"
    # Like POINTS, but each class is split in the same proportions.
    POINTS_STRATIFIED = "points_stratified"


def split_labels(
    labels_in: ImageLabels,
    split_ratios: tuple[float, float],
    split_mode: SplitMode,
) -> TrainingTaskLabels:
    """Split annotations into train / ref / val as pyspacer does.

    `split_ratios` is (ref max ratio, val ratio); the ref set is also capped at
    TRAINING_BATCH_LABEL_COUNT so it fits in one batch.
    """
    ref_ratio, val_ratio = split_ratios
    total = labels_in.label_count
    ref_goal = min(round(total * ref_ratio), config.TRAINING_BATCH_LABEL_COUNT)
    val_goal = round(total * val_ratio)
    train_goal = total - ref_goal - val_goal

    if split_mode == SplitMode.POINTS_STRATIFIED:
        minimum = len(labels_in.classes_set)
        explanation = (
            f"Each set's size must not be less than the number of classes"
            f" ({minimum}) to work with train_test_split()."
        )
    else:
        minimum = 1
        explanation = "Each set must be non-empty."
    if min(ref_goal, val_goal, train_goal) < minimum:
        raise TrainingLabelsError(
            f"Not enough annotations to populate train/ref/val sets."
            f" Split was calculated as {train_goal}/{ref_goal}/{val_goal}."
            f" {explanation}"
        )

    if split_mode == SplitMode.VECTORS:
        return _split_by_image(labels_in, val_goal, ref_goal, train_goal)
    return _split_by_point(labels_in, val_goal, ref_goal, split_mode == SplitMode.POINTS_STRATIFIED)


def _split_by_image(
    labels_in: ImageLabels, val_goal: int, ref_goal: int, train_goal: int
) -> TrainingTaskLabels:
    # A private Random seeded like pyspacer's global random.seed(0) draws the
    # same sequence without disturbing the caller's global state.
    keys = list(labels_in.keys())
    random.Random(0).shuffle(keys)
    sets: list[dict[Any, list[Any]]] = [{}, {}, {}]
    position = 0
    # Sets are filled val, ref, train; a set takes whole images until it
    # reaches its goal, so val and ref may overshoot and train falls short.
    for chosen, goal in zip(sets, (val_goal, ref_goal, train_goal)):
        count = 0
        while count < goal and position < len(keys):
            key = keys[position]
            position += 1
            chosen[key] = labels_in[key]
            count += len(labels_in[key])
    val, ref, train = sets
    return TrainingTaskLabels(train=ImageLabels(train), ref=ImageLabels(ref), val=ImageLabels(val))


def _split_by_point(
    labels_in: ImageLabels, val_goal: int, ref_goal: int, stratified: bool
) -> TrainingTaskLabels:
    image_keys = list(labels_in.keys())
    # (image index, annotation index) of every annotation, in input order.
    owners: list[tuple[int, int]] = []
    flat_labels: list[LabelId] = []
    for image_index, key in enumerate(image_keys):
        for annotation_index, (_row, _col, label) in enumerate(labels_in[key]):
            owners.append((image_index, annotation_index))
            flat_labels.append(label)

    # Splitting positions 0..N-1 gives the same permutation that splitting
    # pyspacer's list of (image, annotation) pairs gives.
    everything = np.arange(len(owners))
    label_array = np.asarray(flat_labels)
    train_ref, val = train_test_split(
        everything,
        test_size=val_goal,
        random_state=0,
        shuffle=True,
        stratify=label_array if stratified else None,
    )
    train, ref = train_test_split(
        train_ref,
        test_size=ref_goal,
        random_state=0,
        shuffle=True,
        stratify=label_array[train_ref] if stratified else None,
    )

    def collect(positions: np.ndarray) -> ImageLabels:
        # Images appear in order of their first chosen annotation, and each
        # image's annotations in split order, as pyspacer builds them.
        data: defaultdict[Any, list[Any]] = defaultdict(list)
        for position in positions.tolist():
            image_index, annotation_index = owners[position]
            key = image_keys[image_index]
            data[key].append(labels_in[key][annotation_index])
        return ImageLabels(data)

    return TrainingTaskLabels(train=collect(train), ref=collect(ref), val=collect(val))


def preprocess_labels(
    labels_in: ImageLabels | TrainingTaskLabels,
    accepted_classes: Iterable[LabelId] | None = None,
    split_ratios: tuple[float, float] = (0.1, 0.1),
    split_mode: SplitMode = SplitMode.VECTORS,
) -> TrainingTaskLabels:
    """Split (unless already split), filter classes and check the sets.

    Returns new TrainingTaskLabels holding only classes present in both train
    and ref. Raises TrainingLabelsError when fewer than two such classes remain
    or a set ends up empty.
    """
    if isinstance(labels_in, TrainingTaskLabels):
        sets = {name: labels_in[name] for name in _SET_NAMES}
        if accepted_classes:
            sets = {name: labels.filter_classes(accepted_classes) for name, labels in sets.items()}
    else:
        unsplit = labels_in
        if accepted_classes:
            unsplit = unsplit.filter_classes(accepted_classes)
        if split_mode == SplitMode.POINTS_STRATIFIED:
            # train_test_split needs >= 3 annotations of a class to stratify
            # it over three sets. Counts come from the unfiltered input, as
            # in pyspacer.
            common = [label for label, n in labels_in.label_count_per_class.items() if n >= 3]
            if len(common) != len(labels_in.classes_set):
                unsplit = unsplit.filter_classes(common)
        split = split_labels(unsplit, split_ratios=split_ratios, split_mode=split_mode)
        sets = {name: split[name] for name in _SET_NAMES}

    shared_classes = sets["train"].classes_set & sets["ref"].classes_set
    if len(shared_classes) <= 1:
        raise TrainingLabelsError(
            f"Need multiple classes to do training. After preprocessing training"
            f" data, there are {len(shared_classes)} class(es) left."
        )
    for name in _SET_NAMES:
        # A class missing from train or ref cannot be learned or calibrated.
        if not sets[name].classes_set.issubset(shared_classes):
            sets[name] = sets[name].filter_classes(shared_classes)
        if len(sets[name]) == 0:
            raise TrainingLabelsError(f"After preprocessing training data, '{name}' set is empty.")
    return TrainingTaskLabels(train=sets["train"], ref=sets["ref"], val=sets["val"])


def check_features(features: Any, source: str) -> np.ndarray:
    """`features` as a (points, dimension) float64 array of finite numbers, else InvalidInputError naming `source`.

    Where client features enter scoring and training: NaN or infinity would
    otherwise fail (or be scored as garbage) inside scikit-learn.
    """
    try:
        x = np.asarray(features, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{source}: the features are not numbers.") from None
    if x.ndim != 2:
        raise InvalidInputError(
            f"{source}: the features are a {x.ndim}-D array; expected (points, dimension)."
        )
    if not np.isfinite(x).all():
        raise InvalidInputError(f"{source}: the features contain NaN or infinite values.")
    return x


def classifier_provenance(clf: Any) -> FeatureProvenance | None:
    """The feature provenance a classifier records (None: unknown origin, e.g. pyspacer's)."""
    recorded = getattr(clf, CLASSIFIER_PROVENANCE_ATTR, None)
    if not isinstance(recorded, Mapping):
        return None
    try:
        return FeatureProvenance.from_mapping(recorded, "classifier")
    except InvalidInputError:
        return None  # not ours to trust: treated as a classifier of unknown origin


def record_provenance(clf: Any, provenance: FeatureProvenance | None) -> None:
    """Record on ``clf`` what made the features it was trained on (nothing when unknown)."""
    if provenance is not None:
        setattr(clf, CLASSIFIER_PROVENANCE_ATTR, provenance.source())


def check_classifier_provenance(
    clf: Any,
    features: FeatureProvenance | None,
    classifier: str,
    what: str = "the extractor",
    weights: str | None = None,
) -> None:
    """Refuse to score features whose extractor or weights differ from the classifier's.

    Either side of unknown origin (files pyspacer wrote) is accepted.
    ``classifier`` names the classifier and ``what`` the features' side in the
    message; ``weights``, where known, the weights file that side used.
    """
    trained = classifier_provenance(clf)
    if trained is None or features is None or trained.same_source(features):
        return
    if trained.weights_sha256 != features.weights_sha256:
        theirs, ours = _weights_text(trained), _weights_text(features)
        if weights:
            # A digest alone does not tell which of several weights files on disk was given.
            ours += f" (file {weights})"
    else:
        theirs, ours = f"extractor {trained.extractor}", f"extractor {features.extractor}"
    raise ProvenanceMismatchError(
        f"classifier {classifier} was trained on features from {theirs}, but {what} uses {ours};"
        " retrain or use the matching weights"
    )


def _weights_text(provenance: FeatureProvenance) -> str:
    sha = provenance.weights_sha256
    return f"weights sha256 {sha[:12]}..." if sha else f"{provenance.extractor} (no weights)"


def common_provenance(
    loaded: Iterable[tuple[DataLocation, FeatureProvenance | None]],
) -> FeatureProvenance | None:
    """The one extractor and weights all feature files were made with (None if none is known).

    Files of unknown origin are accepted alongside any; two files made by
    different extractors or weights are refused, naming both.
    """
    first: tuple[DataLocation, FeatureProvenance] | None = None
    for loc, provenance in loaded:
        if provenance is None:
            continue
        if first is None:
            first = (loc, provenance)
        elif not first[1].same_source(provenance):
            raise ProvenanceMismatchError(
                f"Feature files were made with different extractors or weights: {first[0].key}"
                f" ({first[1].describe()}) and {loc.key} ({provenance.describe()});"
                " extract all features with the same weights before training"
            )
    if first is None:
        return None
    return FeatureProvenance(first[1].extractor, first[1].weights_sha256)
