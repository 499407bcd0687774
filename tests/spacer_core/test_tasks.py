"""End-to-end tasks, run side by side with pyspacer from the same JSON messages."""

from __future__ import annotations

import copy
import json
import pickle

import numpy as np
import pytest
import spacer.config
import spacer.data_classes
import spacer.messages
import spacer.storage
import spacer.tasks
from PIL import Image
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import SGDClassifier

from spacer_core import config, data_classes, messages, tasks
from spacer_core.exceptions import DataLimitError, FeatureDimensionError, RowColumnInvalidError
from spacer_core.testing import fs_loc as loc
from spacer_core.testing import make_weights

FEATURE_DIM = 1280


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("tasks")


@pytest.fixture(scope="module")
def extractor_json(workdir) -> dict:
    weights = workdir / "efficientnet_b0.pt"
    sha = make_weights(weights)
    return {
        "class_path": "spacer.extractors.efficientnet.EfficientNetExtractor",
        "data_locations": {"weights": loc(weights)},
        "data_hashes": {"weights": sha},
    }


@pytest.fixture(scope="module")
def image_path(workdir):
    rng = np.random.default_rng(7)
    # Smooth structure plus noise so patches differ from each other.
    y, x = np.mgrid[0:300, 0:420]
    base = np.stack([(x * 0.6) % 256, (y * 0.8) % 256, ((x + y) * 0.3) % 256], axis=-1)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    path = workdir / "reef.jpg"
    Image.fromarray(pixels).save(path, quality=90)
    return path


@pytest.fixture(scope="module")
def classifier_path(workdir):
    """A calibrated LR over 1280-d features, pickled the way pyspacer stores them."""
    rng = np.random.default_rng(3)
    centers = rng.normal(0, 1, (3, FEATURE_DIM))
    labels = np.repeat([10, 20, 30], 40)
    feats = centers[labels // 10 - 1] + rng.normal(0, 0.5, (120, FEATURE_DIM))
    clf = SGDClassifier(loss="log_loss", average=True, random_state=0)
    clf.partial_fit(feats[::2], labels[::2], classes=[10, 20, 30])
    calibrated = CalibratedClassifierCV(clf, cv="prefit").fit(feats[1::2], labels[1::2])
    path = workdir / "model.pkl"
    path.write_bytes(pickle.dumps(calibrated, protocol=2))
    return path


ROWCOLS = [[0, 0], [299, 419], [150, 200], [150, 200], [10, 400]]


def run_both(task_name: str, msg_json: dict, ours_out: dict | None = None):
    """Deserialize one JSON message with each library and run the task."""
    theirs_msg = getattr(spacer.messages, _msg_class(task_name)).deserialize(copy.deepcopy(msg_json))
    ours_json = copy.deepcopy(msg_json)
    ours_json.update(ours_out or {})
    ours_msg = getattr(messages, _msg_class(task_name)).deserialize(ours_json)
    return getattr(spacer.tasks, task_name)(theirs_msg), getattr(tasks, task_name)(ours_msg)


def _msg_class(task_name: str) -> str:
    return {
        "extract_features": "ExtractFeaturesMsg",
        "classify_features": "ClassifyFeaturesMsg",
        "classify_image": "ClassifyImageMsg",
        "train_classifier": "TrainClassifierMsg",
    }[task_name]


@pytest.mark.slow
def test_extract_features_matches_pyspacer(workdir, extractor_json, image_path):
    msg = {
        "job_token": "reef",
        "extractor": extractor_json,
        "rowcols": ROWCOLS,
        "image_loc": loc(image_path),
        "feature_loc": loc(workdir / "theirs.featurevector"),
    }
    theirs, ours = run_both("extract_features", msg, {"feature_loc": loc(workdir / "ours.featurevector")})
    assert ours.runtime > 0 and not ours.extractor_loaded_remotely
    ref = spacer.data_classes.ImageFeatures.load(
        spacer.data_classes.DataLocation("filesystem", str(workdir / "theirs.featurevector"))
    )
    # pyspacer reads the file we wrote, and our reader agrees with it.
    got = spacer.data_classes.ImageFeatures.load(
        spacer.data_classes.DataLocation("filesystem", str(workdir / "ours.featurevector"))
    )
    got_ours = data_classes.ImageFeatures.load(
        data_classes.DataLocation("filesystem", str(workdir / "ours.featurevector"))
    )
    assert got.valid_rowcol and got.npoints == len(ROWCOLS) and got.feature_dim == FEATURE_DIM
    assert [(p.row, p.col) for p in got.point_features] == [tuple(rc) for rc in ROWCOLS]
    ref_arr = np.stack([p.data for p in ref.point_features])
    got_arr = np.stack([p.data for p in got.point_features])
    assert np.abs(ref_arr).max() > 1e-2, "features should not vanish"
    assert np.abs(ref_arr - got_arr).max() <= 1e-4
    np.testing.assert_array_equal(got_arr, np.stack([p.data for p in got_ours.point_features]))
    # Duplicate points are kept and give identical features.
    np.testing.assert_array_equal(got_arr[2], got_arr[3])


def _stored_features(path, rowcols, valid_rowcol=True, legacy=False):
    rng = np.random.default_rng(11)
    feats = spacer.data_classes.ImageFeatures(
        point_features=[
            spacer.data_classes.PointFeatures(row=r, col=c, data=rng.normal(0, 1, FEATURE_DIM).tolist())
            for r, c in rowcols
        ],
        valid_rowcol=valid_rowcol,
        feature_dim=FEATURE_DIM,
        npoints=len(rowcols),
    )
    if legacy:
        # pyspacer 0.5.0-era file: a JSON list of per-point vectors.
        path.write_text(json.dumps([np.asarray(p.data).tolist() for p in feats.point_features]))
    else:
        feats.store(spacer.data_classes.DataLocation("filesystem", str(path)))


@pytest.mark.parametrize("legacy", [False, True], ids=["npz", "legacy-json"])
def test_classify_features_matches_pyspacer(workdir, classifier_path, legacy):
    path = workdir / f"classify_{legacy}.featurevector"
    _stored_features(path, [(5, 6), (7, 8), (9, 10)], valid_rowcol=not legacy, legacy=legacy)
    msg = {"job_token": "cf", "feature_loc": loc(path), "classifier_loc": loc(classifier_path)}
    theirs, ours = run_both("classify_features", msg)
    assert ours.classes == theirs.classes == [10, 20, 30]
    assert ours.valid_rowcol == theirs.valid_rowcol == (not legacy)
    assert len(ours.scores) == 3
    for (tr, tc, tp), (r, c, p) in zip(theirs.scores, ours.scores):
        assert (r, c) == (tr, tc)
        assert np.abs(np.array(tp) - np.array(p)).max() <= 1e-6
    # The reply serializes to JSON pyspacer reads back.
    again = spacer.messages.ClassifyReturnMsg.deserialize(json.loads(json.dumps(ours.serialize())))
    assert again.classes == ours.classes


@pytest.mark.slow
def test_classify_image_matches_pyspacer(extractor_json, image_path, classifier_path):
    msg = {
        "job_token": "ci",
        "extractor": extractor_json,
        "rowcols": ROWCOLS,
        "image_loc": loc(image_path),
        "classifier_loc": loc(classifier_path),
    }
    theirs, ours = run_both("classify_image", msg)
    assert ours.classes == theirs.classes and ours.valid_rowcol
    assert [s[:2] for s in ours.scores] == [s[:2] for s in theirs.scores]
    diff = max(np.abs(np.array(a[2]) - np.array(b[2])).max() for a, b in zip(ours.scores, theirs.scores))
    assert diff <= 1e-4


def test_classify_rejects_feature_dimension_mismatch(workdir, classifier_path):
    path = workdir / "small.featurevector"
    small = spacer.data_classes.ImageFeatures(
        point_features=[spacer.data_classes.PointFeatures(row=1, col=1, data=[0.5] * 8)],
        valid_rowcol=True,
        feature_dim=8,
        npoints=1,
    )
    small.store(spacer.data_classes.DataLocation("filesystem", str(path)))
    msg = messages.ClassifyFeaturesMsg.deserialize(
        {"job_token": "dim", "feature_loc": loc(path), "classifier_loc": loc(classifier_path)}
    )
    with pytest.raises(FeatureDimensionError, match="small.featurevector.*dimension 8.*1280"):
        tasks.classify_features(msg)


def _labelled_features(workdir, n_images=14, n_points=24, dim=24):
    """Feature files with class structure, written by pyspacer, plus string labels."""
    rng = np.random.default_rng(5)
    names = ["Acropora", "Porites", "Sand"]
    centers = rng.normal(0, 1, (3, dim))
    labels = {}
    for i in range(n_images):
        path = workdir / f"train_{i}.featurevector"
        points, annotations = [], []
        for j in range(n_points):
            k = int(rng.integers(0, 3))
            points.append(
                spacer.data_classes.PointFeatures(
                    row=j, col=j * 2, data=(centers[k] + rng.normal(0, 0.7, dim)).tolist()
                )
            )
            annotations.append([j, j * 2, names[k]])
        spacer.data_classes.ImageFeatures(
            point_features=points, valid_rowcol=True, feature_dim=dim, npoints=n_points
        ).store(spacer.data_classes.DataLocation("filesystem", str(path)))
        labels[json.dumps(loc(path))] = annotations
    return labels


@pytest.mark.parametrize("clf_type", ["LR", "MLP"])
def test_train_classifier_matches_pyspacer(workdir, clf_type):
    import spacer.task_utils

    labels = _labelled_features(workdir)
    # Both libraries train on the same train/ref/val split, sent as JSON.
    split = spacer.task_utils.preprocess_labels(spacer.data_classes.ImageLabels.deserialize(labels))
    msg = {
        "job_token": f"train-{clf_type}",
        "trainer": {"class_path": "spacer.train_classifier.MiniBatchTrainer"},
        "nbr_epochs": 3,
        "clf_type": clf_type,
        "labels": split.serialize(),
        "previous_model_locs": [],
        "model_loc": loc(workdir / f"theirs_{clf_type}.pkl"),
        "valresult_loc": loc(workdir / f"theirs_{clf_type}.json"),
        "feature_cache_dir": "auto",
    }
    theirs = spacer.tasks.train_classifier(spacer.messages.TrainClassifierMsg.deserialize(copy.deepcopy(msg)))
    ours_json = copy.deepcopy(msg)
    ours_json["model_loc"] = loc(workdir / f"ours_{clf_type}.pkl")
    ours_json["valresult_loc"] = loc(workdir / f"ours_{clf_type}.json")
    ours_msg = messages.TrainClassifierMsg.deserialize(ours_json)
    epochs_seen = []
    ours = tasks.train_classifier(ours_msg, progress=lambda *a, **k: epochs_seen.append((a, k)))
    assert abs(ours.acc - theirs.acc) <= 0.01
    assert len(ours.ref_accs) == len(theirs.ref_accs) == 3
    assert len(epochs_seen) == 3
    # pyspacer loads the classifier and validation results we stored.
    clf = spacer.storage.load_classifier(
        spacer.data_classes.DataLocation("filesystem", str(workdir / f"ours_{clf_type}.pkl"))
    )
    assert sorted(clf.classes_.tolist()) == ["Acropora", "Porites", "Sand"]
    val = spacer.data_classes.ValResults.load(
        spacer.data_classes.DataLocation("filesystem", str(workdir / f"ours_{clf_type}.json"))
    )
    theirs_val = spacer.data_classes.ValResults.load(
        spacer.data_classes.DataLocation("filesystem", str(workdir / f"theirs_{clf_type}.json"))
    )
    assert val.classes == theirs_val.classes and val.gt == theirs_val.gt


def _train_msg(workdir, labels, previous):
    import spacer.task_utils

    split = spacer.task_utils.preprocess_labels(spacer.data_classes.ImageLabels.deserialize(labels))
    return messages.TrainClassifierMsg.deserialize(
        {
            "job_token": "train-previous",
            "trainer": {"class_path": "spacer.train_classifier.MiniBatchTrainer"},
            "nbr_epochs": 1,
            "clf_type": "LR",
            "labels": split.serialize(),
            "previous_model_locs": [loc(p) for p in previous],
            "model_loc": loc(workdir / "new.pkl"),
            "valresult_loc": loc(workdir / "new.json"),
            "feature_cache_dir": "auto",
        }
    )


def test_training_refuses_a_previous_model_of_another_width_and_features_that_are_not_finite(
    workdir, classifier_path
):
    from spacer_core.exceptions import InvalidInputError

    labels = _labelled_features(workdir)  # 24 features; the previous model reads 1280
    with pytest.raises(
        FeatureDimensionError, match=r"previous_model_locs\[0\].*dimension 1280.*dimension 24"
    ):
        tasks.train_classifier(_train_msg(workdir, labels, [classifier_path]))
    first = json.loads(next(iter(labels)))["key"]
    features = spacer.data_classes.ImageFeatures.load(spacer.data_classes.DataLocation("filesystem", first))
    features.point_features[0].data[3] = float("nan")
    features.store(spacer.data_classes.DataLocation("filesystem", first))
    with pytest.raises(
        InvalidInputError, match="train_0.featurevector: the features contain NaN or infinite values"
    ):
        tasks.train_classifier(_train_msg(workdir, labels, []))


def _bad_extract(workdir, extractor_json, image_path, rowcols):
    return {
        "job_token": "bad",
        "extractor": extractor_json,
        "rowcols": rowcols,
        "image_loc": loc(image_path),
        "feature_loc": loc(workdir / "never.featurevector"),
    }


@pytest.mark.parametrize(
    "rowcols",
    [[[-1, 5]], [[5, -2]], [[300, 5]], [[5, 420]], [[1.5, 2]]],
    ids=["neg-row", "neg-col", "row-high", "col-high", "float-row"],
)
def test_bad_rowcols_raise_pyspacers_error(workdir, extractor_json, image_path, rowcols):
    msg = _bad_extract(workdir, extractor_json, image_path, rowcols)
    with pytest.raises(Exception) as theirs:
        spacer.tasks.extract_features(spacer.messages.ExtractFeaturesMsg.deserialize(copy.deepcopy(msg)))
    with pytest.raises(RowColumnInvalidError) as ours:
        tasks.extract_features(messages.ExtractFeaturesMsg.deserialize(copy.deepcopy(msg)))
    assert type(theirs.value).__name__ == "RowColumnInvalidError"
    assert str(ours.value) == str(theirs.value)
    assert str(image_path) in str(ours.value)


@pytest.mark.parametrize("limit", ["MAX_IMAGE_PIXELS", "MAX_POINTS_PER_IMAGE"])
def test_limits_raise_pyspacers_error(workdir, extractor_json, image_path, monkeypatch, limit):
    value = 1000 if limit == "MAX_IMAGE_PIXELS" else 2
    monkeypatch.setattr(spacer.config, limit, value)
    monkeypatch.setattr(config, limit, value)
    msg = _bad_extract(workdir, extractor_json, image_path, [[1, 1], [2, 2], [3, 3]])
    with pytest.raises(Exception) as theirs:
        spacer.tasks.extract_features(spacer.messages.ExtractFeaturesMsg.deserialize(copy.deepcopy(msg)))
    with pytest.raises(DataLimitError) as ours:
        tasks.extract_features(messages.ExtractFeaturesMsg.deserialize(copy.deepcopy(msg)))
    assert type(theirs.value).__name__ == "DataLimitError"
    assert str(ours.value) == str(theirs.value)


def test_missing_image_names_the_file(workdir, extractor_json):
    msg = _bad_extract(workdir, extractor_json, workdir / "nope.jpg", [[1, 1]])
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        tasks.extract_features(messages.ExtractFeaturesMsg.deserialize(msg))


def test_process_job_runs_tasks_and_stops_at_first_failure(workdir, extractor_json, image_path):
    good = _bad_extract(workdir, extractor_json, image_path, [[10, 10], [20, 20]])
    good["feature_loc"] = loc(workdir / "job_ok.featurevector")
    bad = copy.deepcopy(good)
    bad["job_token"] = "missing-image"
    bad["image_loc"] = loc(workdir / "absent.jpg")
    after = copy.deepcopy(good)
    after["feature_loc"] = loc(workdir / "job_after_failure.featurevector")

    ok = tasks.process_job(messages.JobMsg.deserialize({"task_name": "extract_features", "tasks": [good]}))
    assert ok.ok and ok.error_message is None and len(ok.results) == 1
    assert (workdir / "job_ok.featurevector").exists()
    # pyspacer reads our JobReturnMsg JSON.
    spacer.messages.JobReturnMsg.deserialize(json.loads(json.dumps(ok.serialize())))

    failed = tasks.process_job(
        messages.JobMsg.deserialize({"task_name": "extract_features", "tasks": [good, bad, after]})
    )
    assert not failed.ok and failed.results is None
    assert "Traceback" in failed.error_message and "absent.jpg" in failed.error_message
    assert not (workdir / "job_after_failure.featurevector").exists()


def test_process_job_rejects_unknown_task():
    with pytest.raises(ValueError, match="paint_reef"):
        tasks.process_job(messages.JobMsg.deserialize({"task_name": "paint_reef", "tasks": []}))


# --- outputs may name neither an input nor each other ----------------------------


def _extract_json(extractor_json, image, features) -> dict:
    return {
        "job_token": "overwrite",
        "extractor": extractor_json,
        "rowcols": [[10, 10]],
        "image_loc": loc(image),
        "feature_loc": loc(features),
    }


def _train_json(features: list, model, valresult, previous=()) -> dict:
    part = {json.dumps(loc(f)): [[1, 1, "Sand"]] for f in features}
    return {
        "job_token": "overwrite",
        "trainer": {"class_path": "spacer.train_classifier.MiniBatchTrainer"},
        "nbr_epochs": 1,
        "clf_type": "LR",
        "labels": {"train": part, "ref": part, "val": part},
        "previous_model_locs": [loc(p) for p in previous],
        "model_loc": loc(model),
        "valresult_loc": loc(valresult),
        "feature_cache_dir": "auto",
    }


def test_extract_features_refuses_to_write_over_its_image_or_weights(tmp_path, extractor_json, image_path):
    from spacer_core.exceptions import InvalidInputError

    image = tmp_path / "reef.jpg"
    image.write_bytes(image_path.read_bytes())
    before = image.read_bytes()
    # The same file under another spelling (`..`, a symlink) is the same location.
    (tmp_path / "sub").mkdir()
    (tmp_path / "alias.jpg").symlink_to(image)
    weights = extractor_json["data_locations"]["weights"]["key"]
    weights_before = open(weights, "rb").read()
    for target, field in (
        (image, "image_loc"),
        (tmp_path / "sub" / ".." / "reef.jpg", "image_loc"),
        (tmp_path / "alias.jpg", "image_loc"),
        (weights, r"extractor.data_locations\['weights'\]"),
    ):
        msg = messages.ExtractFeaturesMsg.deserialize(_extract_json(extractor_json, image, target))
        with pytest.raises(InvalidInputError, match=rf"feature_loc names the same location as {field}"):
            tasks.extract_features(msg)
    assert image.read_bytes() == before
    assert open(weights, "rb").read() == weights_before


def test_train_classifier_refuses_outputs_over_inputs_or_each_other(tmp_path, classifier_path):
    from spacer_core.exceptions import InvalidInputError

    features = [tmp_path / f"f{i}.featurevector" for i in range(3)]
    for f in features:
        f.write_bytes(b'{"point_features": []}')
    previous = tmp_path / "previous.pkl"
    previous.write_bytes(classifier_path.read_bytes())
    cases = [
        (_train_json(features, features[1], tmp_path / "v.json"), r"model_loc .* labels\.train"),
        (_train_json(features, tmp_path / "m.pkl", features[0]), r"valresult_loc .* labels\.train"),
        (_train_json(features, tmp_path / "same", tmp_path / "same"), "valresult_loc and model_loc"),
        (
            _train_json(features, previous, tmp_path / "v.json", [previous]),
            "model_loc .* previous_model_locs",
        ),
    ]
    for msg_json, pattern in cases:
        msg = messages.TrainClassifierMsg.deserialize(msg_json)
        with pytest.raises(InvalidInputError, match=pattern):
            tasks.train_classifier(msg)
    assert all(f.read_bytes() == b'{"point_features": []}' for f in features)
    assert previous.read_bytes() == classifier_path.read_bytes()
    assert not (tmp_path / "same").exists() and not (tmp_path / "m.pkl").exists()


def test_a_job_with_a_task_writing_over_its_input_runs_no_task(tmp_path, extractor_json, image_path):
    first = tmp_path / "a.jpg"
    second = tmp_path / "b.jpg"
    for p in (first, second):
        p.write_bytes(image_path.read_bytes())
    job_tasks = [
        _extract_json(extractor_json, first, tmp_path / "a.featurevector"),
        _extract_json(extractor_json, second, second),
    ]
    job = messages.JobMsg.deserialize({"task_name": "extract_features", "tasks": job_tasks})
    reply = tasks.process_job(job)
    assert not reply.ok and reply.results is None
    assert "InvalidInputError: tasks[1].feature_loc names the same location as tasks[1].image_loc" in (
        reply.error_message
    )
    assert not (tmp_path / "a.featurevector").exists()
    assert second.read_bytes() == image_path.read_bytes()


def test_a_classifier_never_replaces_a_feature_file_nor_features_an_image(tmp_path, workdir):
    from spacer_core.exceptions import PreconditionError

    labels = _labelled_features(workdir)
    unrelated = tmp_path / "unrelated.featurevector"
    first = json.loads(next(iter(labels)))["key"]
    unrelated.write_bytes(open(first, "rb").read())
    before = unrelated.read_bytes()
    msg = _train_msg(workdir, labels, [])
    msg.model_loc = data_classes.DataLocation("filesystem", str(unrelated))
    with pytest.raises(PreconditionError, match=r"holds a feature file \(npz\); writing a pickle"):
        tasks.train_classifier(msg)
    assert unrelated.read_bytes() == before
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (8, 8)).save(photo)
    features = data_classes.ImageFeatures.load(data_classes.DataLocation("filesystem", first))
    with pytest.raises(PreconditionError, match="holds an image"):
        features.store(data_classes.DataLocation("filesystem", str(photo)))
    assert photo.read_bytes()[:3] == b"\xff\xd8\xff"


@pytest.mark.parametrize("roots", [None, "tmp"], ids=["any-path", "data-root"])
def test_read_only_folders_refuse_every_write_and_delete(tmp_path, roots):
    from spacer_core import storage
    from spacer_core.exceptions import AccessDeniedError

    repo = tmp_path / "models"
    repo.mkdir()
    served = repo / "clf.pkl"
    served.write_bytes(b"\x80\x02served")
    policy = storage.ClientPolicy(None if roots is None else [tmp_path], read_only=[repo])
    where = data_classes.DataLocation("filesystem", str(served))
    with storage.policy_scope(policy):
        assert storage.load_bytes(where).getvalue() == b"\x80\x02served"
        for call in (
            lambda: storage.store_bytes(where, b"\x80\x02other"),
            lambda: storage.store_bytes(data_classes.DataLocation("filesystem", str(repo / "a" / "b")), b"x"),
            lambda: storage.delete_data(where),
            lambda: storage.check_access(where, "write"),
        ):
            with pytest.raises(AccessDeniedError, match="read-only folder"):
                call()
        storage.store_bytes(data_classes.DataLocation("filesystem", str(tmp_path / "elsewhere.pkl")), b"ok")
    assert served.read_bytes() == b"\x80\x02served" and sorted(p.name for p in repo.iterdir()) == ["clf.pkl"]
    # The confined writer checks the path it walks, whatever the policy checked before.
    confined = storage.ConfinedFileSystemStorage([tmp_path.resolve()], [repo.resolve()])
    with pytest.raises(AccessDeniedError, match="read-only folder"):
        confined.store(str(served), b"\x80\x02other")
    assert served.read_bytes() == b"\x80\x02served"
