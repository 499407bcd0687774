"""task_utils against pyspacer: input checks and label splits must match exactly."""

from __future__ import annotations

import random

import pytest
import spacer.config as py_config
import spacer.data_classes as py_data
import spacer.exceptions as py_exceptions
import spacer.messages as py_messages
import spacer.task_utils as py_task_utils
from PIL import Image

from spacer_core import config, exceptions
from spacer_core.data_classes import DataLocation, ImageLabels
from spacer_core.messages import TrainingTaskLabels
from spacer_core.task_utils import SplitMode, check_extract_inputs, preprocess_labels, split_labels

PY_MODES = {mode: py_task_utils.SplitMode(mode.value) for mode in SplitMode}


# --- check_extract_inputs ---------------------------------------------------


def _outcome(check, image, rowcols):
    """(exception class name, message), or None when the check passes."""
    try:
        check(image, rowcols, "images/a.jpg")
    except Exception as error:  # noqa: BLE001 - the class is what we compare
        return type(error).__name__, str(error)
    return None


@pytest.mark.parametrize(
    "size, rowcols",
    [
        ((40, 30), [(0, 0), (29, 39)]),
        ((40, 30), []),
        ((40, 30), [(1.0, 2)]),
        ((40, 30), [(1, "2")]),
        ((40, 30), [(-1, 2)]),
        ((40, 30), [(1, -2)]),
        ((40, 30), [(30, 2)]),
        ((40, 30), [(2, 40)]),
        ((40, 30), [(-1, 99)]),
        ((40, 30), [(5, 5), (30, -1)]),
        ((40, 30), [(True, 3)]),
    ],
)
def test_check_extract_inputs_matches_pyspacer(size, rowcols):
    image = Image.new("RGB", size)
    ours = _outcome(check_extract_inputs, image, rowcols)
    theirs = _outcome(py_task_utils.check_extract_inputs, image, rowcols)
    assert ours == theirs


def test_check_extract_inputs_reads_limits_at_call_time(monkeypatch):
    image = Image.new("RGB", (40, 30))
    for module in (config, py_config):
        monkeypatch.setattr(module, "MAX_IMAGE_PIXELS", 40 * 30 - 1)
    ours = _outcome(check_extract_inputs, image, [(1, 1)])
    assert ours[0] == "DataLimitError"
    assert ours == _outcome(py_task_utils.check_extract_inputs, image, [(1, 1)])
    assert "images/a.jpg has 40 x 30 = 1200 total pixels" in ours[1]

    for module in (config, py_config):
        monkeypatch.setattr(module, "MAX_IMAGE_PIXELS", 10**8)
        monkeypatch.setattr(module, "MAX_POINTS_PER_IMAGE", 2)
    ours = _outcome(check_extract_inputs, image, [(1, 1)] * 3)
    assert ours == _outcome(py_task_utils.check_extract_inputs, image, [(1, 1)] * 3)
    assert "3 point locations were specified for image images/a.jpg" in ours[1]
    with pytest.raises(exceptions.DataLimitError):
        check_extract_inputs(image, [(1, 1)] * 3, "x")
    check_extract_inputs(image, [(1, 1)] * 2, "x")


# --- splits -------------------------------------------------------------------


def _random_annotations(seed: int, str_labels: bool, images: int = 30) -> dict[str, list]:
    """Feature keys -> annotations; uneven point counts and class frequencies."""
    rng = random.Random(seed)
    classes = [f"class {i}" for i in range(7)] if str_labels else [10, 20, 30, 40, 50, 60, 70]
    weights = [30, 20, 12, 8, 4, 2, 1]
    data = {}
    for i in range(images):
        count = rng.randint(1, 25)
        data[f"features/{seed}/{i}.fv"] = [
            (rng.randrange(500), rng.randrange(500), rng.choices(classes, weights)[0]) for _ in range(count)
        ]
    return data


def _both(data: dict[str, list]):
    ours = ImageLabels({DataLocation("filesystem", k): list(v) for k, v in data.items()})
    theirs = py_data.ImageLabels({py_data.DataLocation("filesystem", k): list(v) for k, v in data.items()})
    return ours, theirs


def _as_lists(sets) -> dict[str, list]:
    return {
        name: [(loc.key, list(sets[name][loc])) for loc in sets[name].keys()]
        for name in ("train", "ref", "val")
    }


def _run(function, *args, **kwargs):
    try:
        return "ok", _as_lists(function(*args, **kwargs))
    except Exception as error:  # noqa: BLE001 - compared with pyspacer's
        return type(error).__name__, str(error)


@pytest.mark.parametrize("mode", list(SplitMode))
@pytest.mark.parametrize("str_labels", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_splits_identical_to_pyspacer(mode, str_labels, seed):
    ours, theirs = _both(_random_annotations(seed, str_labels))
    ours_result = _run(preprocess_labels, ours, split_mode=mode)
    theirs_result = _run(py_task_utils.preprocess_labels, theirs, split_mode=PY_MODES[mode])
    assert ours_result[0] == "ok"
    assert ours_result == theirs_result


@pytest.mark.parametrize("mode", list(SplitMode))
def test_split_ratios_accepted_classes_and_ref_cap(mode, monkeypatch):
    for module in (config, py_config):
        monkeypatch.setattr(module, "TRAINING_BATCH_LABEL_COUNT", 20)
    ours, theirs = _both(_random_annotations(5, False, images=40))
    accepted = {10, 20, 30, 40}
    kwargs = dict(split_ratios=(0.2, 0.15), accepted_classes=accepted)
    ours_result = _run(preprocess_labels, ours, split_mode=mode, **kwargs)
    assert ours_result == _run(py_task_utils.preprocess_labels, theirs, split_mode=PY_MODES[mode], **kwargs)
    sets = ours_result[1]
    assert all(
        label in accepted for name in sets for _, annotations in sets[name] for *_, label in annotations
    )
    if mode != SplitMode.VECTORS:
        assert sum(len(a) for _, a in sets["ref"]) <= 20


def test_presplit_labels_are_filtered_like_pyspacer():
    parts = [_random_annotations(seed, True, images=8) for seed in (11, 12, 13)]
    ours_sets = [_both(part) for part in parts]
    ours = TrainingTaskLabels(*(o for o, _ in ours_sets))
    theirs = py_messages.TrainingTaskLabels(*(t for _, t in ours_sets))
    accepted = {"class 0", "class 1", "class 2"}
    ours_result = _run(preprocess_labels, ours, accepted_classes=accepted)
    assert ours_result[0] == "ok"
    assert ours_result == _run(py_task_utils.preprocess_labels, theirs, accepted_classes=accepted)
    # The caller's labels are left as they were.
    assert ours.train.classes_set == _both(parts[0])[0].classes_set


@pytest.mark.parametrize(
    "data, mode",
    [
        # One class only.
        ({f"{i}.fv": [(i, 1, 5), (i, 2, 5)] for i in range(20)}, SplitMode.VECTORS),
        # Too few annotations for three sets.
        ({"a.fv": [(1, 1, 5), (1, 2, 6)], "b.fv": [(2, 2, 5)]}, SplitMode.POINTS),
        ({"a.fv": [(1, 1, 5), (1, 2, 6)] * 5}, SplitMode.VECTORS),
        # Stratified sets smaller than the class count.
        ({f"{i}.fv": [(i, c, c) for c in range(6)] for i in range(3)}, SplitMode.POINTS_STRATIFIED),
    ],
)
def test_errors_match_pyspacer(data, mode):
    ours, theirs = _both(data)
    ours_result = _run(preprocess_labels, ours, split_mode=mode)
    assert ours_result[0] == "TrainingLabelsError"
    assert ours_result == _run(py_task_utils.preprocess_labels, theirs, split_mode=PY_MODES[mode])
    with pytest.raises(exceptions.TrainingLabelsError):
        preprocess_labels(ours, split_mode=mode)
    assert issubclass(exceptions.TrainingLabelsError, Exception)
    assert py_exceptions.TrainingLabelsError.__name__ == ours_result[0]


def test_presplit_val_emptied_by_class_filter_matches_pyspacer():
    train, py_train = _both({"a.fv": [(1, 1, 1), (1, 2, 2)]})
    ref, py_ref = _both({"b.fv": [(1, 1, 1), (1, 2, 2)]})
    # val only has a class that train and ref lack, so it ends up empty.
    val, py_val = _both({"c.fv": [(1, 1, 9)]})
    ours_result = _run(preprocess_labels, TrainingTaskLabels(train, ref, val))
    assert ours_result == ("TrainingLabelsError", "After preprocessing training data, 'val' set is empty.")
    assert ours_result == _run(
        py_task_utils.preprocess_labels, py_messages.TrainingTaskLabels(py_train, py_ref, py_val)
    )


def test_split_labels_vectors_keeps_whole_images():
    ours, _ = _both(_random_annotations(3, False))
    sets = split_labels(ours, (0.1, 0.1), SplitMode.VECTORS)
    keys = [set(loc.key for loc in sets[name].keys()) for name in ("train", "ref", "val")]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    assert sum(len(k) for k in keys) == len(ours)
    # val and ref reach their goals; train takes the rest.
    assert sets.val.label_count >= round(0.1 * ours.label_count)
    assert sets.label_count == ours.label_count
