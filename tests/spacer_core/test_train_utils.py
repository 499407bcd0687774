"""train_utils: feature loading, batch order, evaluation and helpers, with pyspacer as oracle."""

from __future__ import annotations

import functools
import http.server
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import spacer.data_classes as py_data
import spacer.train_utils as py_train_utils
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import SGDClassifier
from sklearn.neural_network import MLPClassifier
from threadpoolctl import threadpool_info

from spacer_core import train_utils
from spacer_core.data_classes import DataLocation, ImageFeatures, ImageLabels
from spacer_core.exceptions import RowColumnMismatchError, RowColumnMissingError
from spacer_core.storage import URLStorage
from spacer_core.train_utils import (
    calc_acc,
    evaluate_classifier,
    load_labelled_features,
    make_classifier,
    make_random_data,
    train,
)
from spacer_core.urlfetch import UrlRules


def pyspacer_labels(labels: ImageLabels) -> py_data.ImageLabels:
    """The same labels as pyspacer's class (the JSON forms are shared)."""
    return py_data.ImageLabels.deserialize(labels.serialize())


def pyspacer_all_data(labels: ImageLabels) -> tuple[np.ndarray, list]:
    """pyspacer's load_all_data of the same labels, as an array and a list."""
    x, y = pyspacer_labels(labels).load_all_data()
    return np.asarray(x), list(y)


def float32_features(folder: Path, images: int, points: int, dim: int, seed: int = 0) -> ImageLabels:
    """Feature files holding float32 values (as an extractor writes), with shuffled row/cols."""
    rng = np.random.default_rng(seed)
    labels = ImageLabels()
    for i in range(images):
        classes = rng.integers(0, 3, points)
        feat = (classes[:, None] + rng.standard_normal((points, dim))).astype(np.float32).astype(np.float64)
        rows, cols = rng.permutation(1000)[:points], rng.integers(0, 1000, points)
        loc = DataLocation("filesystem", str(folder / f"{i}.fv"))
        ImageFeatures.from_arrays(feat, rows=rows, cols=cols).store(loc)
        # Annotations in another order than the file's points.
        order = rng.permutation(points)
        labels.add_image(loc, [(int(rows[p]), int(cols[p]), int(classes[p])) for p in order])
    return labels


@pytest.fixture
def random_labels(tmp_path) -> ImageLabels:
    return make_random_data(
        12,
        [1, 2, 3],
        15,
        8,
        DataLocation("filesystem", ""),
        [str(tmp_path / f"{i}.fv") for i in range(12)],
        rng=np.random.default_rng(1),
    )


def test_calc_acc():
    assert calc_acc([1, 2, 3, 4], [1, 2, 0, 0]) == 0.5
    assert calc_acc(["a", "b"], np.array(["a", "b"])) == 1.0
    assert calc_acc([1, 2, 3], [1, 2, 3]) == py_train_utils.calc_acc([1, 2, 3], [1, 2, 3])
    with pytest.raises(ValueError, match="can not be empty"):
        calc_acc([], [])
    with pytest.raises(ValueError, match="same length"):
        calc_acc([1], [1, 2])


def test_loaded_rows_equal_pyspacer_all_data(random_labels):
    data = load_labelled_features(random_labels)
    py_x, py_y = pyspacer_all_data(random_labels)
    # make_random_data's values are not float32-exact: kept as float64.
    assert data.x.dtype == np.float64
    assert np.array_equal(data.x, py_x)
    assert data.y.tolist() == list(py_y)
    assert data.image_count == 12 and len(data) == 12 * 15


def test_float32_exact_features_held_as_float32(tmp_path):
    labels = float32_features(tmp_path, 5, 20, 6)
    data = load_labelled_features(labels)
    assert data.x.dtype == np.float32
    x, y = data.batch(slice(None))
    py_x, py_y = pyspacer_all_data(labels)
    assert x.dtype == np.float64 and np.array_equal(x, np.asarray(py_x))
    assert y.tolist() == list(py_y)


def test_one_inexact_file_makes_everything_float64(tmp_path):
    labels = float32_features(tmp_path, 4, 10, 5)
    loc = list(labels.keys())[2]
    original = ImageFeatures.load(loc)
    ImageFeatures.from_arrays(original.feat + 1e-12, rows=original.rows, cols=original.cols).store(loc)
    data = load_labelled_features(labels)
    assert data.x.dtype == np.float64
    assert np.array_equal(data.x, pyspacer_all_data(labels)[0])


def test_file_backed_float64_features(random_labels, monkeypatch):
    in_memory = load_labelled_features(random_labels)
    monkeypatch.setattr(train_utils, "FEATURE_MEMORY_BUDGET", 0)
    spilled = load_labelled_features(random_labels)
    assert isinstance(spilled.x, np.memmap) and spilled.x.dtype == np.float64
    assert np.array_equal(spilled.x, in_memory.x)


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("batch_size", [7, 40, 1000])
def test_epoch_batches_equal_pyspacer_batches(tmp_path, seed, batch_size):
    labels = float32_features(tmp_path, 9, 13, 4, seed=seed)
    data = load_labelled_features(labels)
    order, state = data.epoch_order(seed)
    ours = [(x.copy(), y.tolist()) for x, y in data.iter_batches(order, batch_size)]
    theirs = list(py_data.ImageLabels.load_data_in_batches(pyspacer_labels(labels), batch_size, seed))
    assert len(ours) == len(theirs)
    for (x, y), pair in zip(ours, theirs):
        py_x, py_y = pair
        assert np.array_equal(x, np.asarray(py_x)) and y == list(py_y)
    # The generator state afterwards is what pyspacer leaves in NumPy's global one.
    assert state.random_sample() == np.random.random_sample()


def test_duplicate_positions_use_the_last_point(tmp_path):
    loc = DataLocation("filesystem", str(tmp_path / "dup.fv"))
    feat = np.arange(12, dtype=np.float64).reshape(3, 4)
    ImageFeatures.from_arrays(feat, rows=[5, 5, 6], cols=[1, 1, 2]).store(loc)
    labels = ImageLabels({loc: [(5, 1, "a"), (6, 2, "b")]})
    data = load_labelled_features(labels)
    assert np.array_equal(data.x, feat[[1, 2]])
    assert np.array_equal(data.x, pyspacer_all_data(labels)[0])


def test_missing_point_names_the_file(tmp_path):
    loc = DataLocation("filesystem", str(tmp_path / "img.fv"))
    ImageFeatures.from_arrays(np.ones((2, 3)), rows=[1, 2], cols=[1, 2]).store(loc)
    with pytest.raises(
        RowColumnMismatchError, match=r"img\.fv: The labels' row-column positions don't match.*\(9, 9\)"
    ):
        load_labelled_features(ImageLabels({loc: [(1, 1, "a"), (9, 9, "b")]}))


def test_legacy_features_are_refused_for_training(tmp_path):
    path = tmp_path / "legacy.fv"
    path.write_text(json.dumps([[0.1, 0.2], [0.3, 0.4]]))
    labels = ImageLabels({DataLocation("filesystem", str(path)): [(1, 1, "a")]})
    with pytest.raises(
        RowColumnMissingError, match="legacy.fv: Features without rowcols are no longer supported"
    ):
        load_labelled_features(labels)


def test_feature_dimension_mismatch_names_both_files(tmp_path):
    locs = [DataLocation("filesystem", str(tmp_path / f"{name}.fv")) for name in ("wide", "narrow")]
    ImageFeatures.from_arrays(np.ones((1, 4)), rows=[0], cols=[0]).store(locs[0])
    ImageFeatures.from_arrays(np.ones((1, 3)), rows=[0], cols=[0]).store(locs[1])
    with pytest.raises(
        ValueError, match=r"narrow\.fv: features have dimension 3, but .*wide\.fv has dimension 4"
    ):
        load_labelled_features(ImageLabels({loc: [(0, 0, 1)] for loc in locs}))


def test_remote_files_go_through_the_filesystem_cache(tmp_path, monkeypatch):
    # The files are served on loopback, which url storage refuses by default.
    monkeypatch.setattr(URLStorage, "default_rules", UrlRules(allow_private=True))
    served = tmp_path / "served"
    served.mkdir()
    labels = float32_features(served, 3, 5, 4)
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        remote = ImageLabels(
            {DataLocation("url", f"{base}/{Path(loc.key).name}"): labels[loc] for loc in labels.keys()}
        )
        cache = tmp_path / "cache"
        cache.mkdir()
        remote.set_filesystem_cache(str(cache))
        data = load_labelled_features(remote)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert np.array_equal(data.x, load_labelled_features(labels).x)
    # pyspacer's cache layout: <cache dir>/<key>.
    cached = [p for p in cache.rglob("*") if p.is_file()]
    assert len(cached) == 3 and all(p.name.endswith(".fv") for p in cached)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


def test_evaluate_classifier_matches_pyspacer(random_labels):
    data = load_labelled_features(random_labels)
    clf = SGDClassifier(loss="log_loss", random_state=0).fit(*data.batch(slice(None)))
    calibrated = CalibratedClassifierCV(clf, cv="prefit").fit(*data.batch(slice(None)))
    gts, ests, scores = evaluate_classifier(calibrated, random_labels)
    py_gts, py_ests, py_scores = py_train_utils.evaluate_classifier(
        calibrated, pyspacer_labels(random_labels)
    )
    assert gts == list(py_gts) and ests == [e.item() for e in py_ests]
    assert np.array_equal(scores, py_scores)


def test_make_classifier_settings():
    lr = make_classifier("LR", 10)
    assert isinstance(lr, SGDClassifier)
    assert (lr.loss, lr.average, lr.random_state) == ("log_loss", True, 0)
    small, large = make_classifier("MLP", 49999), make_classifier("MLP", 50000)
    assert isinstance(small, MLPClassifier)
    assert (small.hidden_layer_sizes, small.learning_rate_init) == ((100,), 1e-3)
    assert (large.hidden_layer_sizes, large.learning_rate_init) == ((200, 100), 1e-4)
    custom = make_classifier("MLP", 10, mlp_hidden_layer_sizes=(7,))
    assert (custom.hidden_layer_sizes, custom.learning_rate_init) == ((7,), 1e-3)
    with pytest.raises(ValueError, match="Unknown classifier type 'SVM'"):
        make_classifier("SVM", 10)


def test_train_reports_progress_and_restores_parameters(random_labels):
    data = load_labelled_features(random_labels)
    calls = []
    for clf in (make_classifier("LR", len(data)), make_classifier("MLP", len(data))):
        calls.clear()
        calibrated, ref_accs = train(
            clf, data, data, [1, 2, 3], 3, 50, progress=lambda *args: calls.append(args)
        )
        assert [c[0] for c in calls] == [0, 1, 2]
        assert [c[1] for c in calls] == ref_accs
        assert all(
            later >= earlier for earlier, later in zip([c[2] for c in calls], [c[2] for c in calls][1:])
        )
        assert calibrated.classes_.tolist() == [1, 2, 3]
        # n_jobs / random_state used while training are not left in the model.
        clf_type = "LR" if isinstance(clf, SGDClassifier) else "MLP"
        assert clf.get_params() == make_classifier(clf_type, len(data)).get_params()


def test_make_random_data_is_readable_by_pyspacer(tmp_path):
    labels = make_random_data(3, ["x", "y"], 6, 5, DataLocation("filesystem", str(tmp_path) + os.sep))
    assert len(labels) == 3 and labels.label_count == 18
    for loc in labels.keys():
        assert {label for *_, label in labels[loc]} == {"x", "y"}
        assert len(Path(loc.key).name) == 20
        features = py_data.ImageFeatures.load(py_data.DataLocation("filesystem", loc.key))
        assert features.npoints == 6 and features.feature_dim == 5
    memory = make_random_data(2, [4, 5], 3, 2, DataLocation("memory", ""), ["m1", "m2"])
    assert [loc.key for loc in memory.keys()] == ["m1", "m2"]
    assert load_labelled_features(memory).x.shape == (6, 2)


def test_auto_blas_threads_keep_the_faster_choice():
    def blas_threads() -> list[int]:
        return [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"]

    default = blas_threads()
    chooser = train_utils._BlasThreads("auto")
    with chooser.epoch(0):
        assert blas_threads() == default
        time.sleep(0.05)
    with chooser.epoch(1):
        assert set(blas_threads()) == {1}
    assert blas_threads() == default
    # One thread was faster here, so later epochs keep it.
    with chooser.epoch(2):
        assert set(blas_threads()) == {1}
    fixed = train_utils._BlasThreads(None)
    with fixed.epoch(5):
        assert blas_threads() == default
