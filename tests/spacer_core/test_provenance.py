"""Provenance of feature files and classifiers: what made them, checked by everything that reads them.

Real files throughout: synthetic EfficientNet-b0 weights of two seeds (A and
B), JPEGs, bulk runs, trained classifiers, and pyspacer reading what we write.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from spacer_core import tasks
from spacer_core.bulk import local as bulk
from spacer_core.data_classes import (
    DataLocation,
    FeatureProvenance,
    ImageFeatures,
    ImageLabels,
    ProvenanceMismatchError,
    points_sha256,
)
from spacer_core.exceptions import InvalidDataError, PreconditionError
from spacer_core.messages import ClassifyFeaturesMsg, ClassifyImageMsg, TrainClassifierMsg
from spacer_core.storage import load_classifier
from spacer_core.survey.workflow import evaluate, weights_extractor
from spacer_core.task_utils import CLASSIFIER_PROVENANCE_ATTR, classifier_provenance
from spacer_core.testing import make_survey, points_for, write_classifier, write_manifest
from spacer_core.train_utils import make_random_data
from spacer_core.weights.synthetic import cached_weights

sp_dc = pytest.importorskip("spacer.data_classes")
sp_tasks = pytest.importorskip("spacer.tasks")
sp_msg = pytest.importorskip("spacer.messages")
ROOT = Path(__file__).resolve().parents[2]
SIZE = (320, 240)


def loc(path: Path | str) -> DataLocation:
    return DataLocation("filesystem", str(path))


@pytest.fixture(scope="module")
def weights_a():
    return cached_weights(seed=0)


@pytest.fixture(scope="module")
def weights_b():
    return cached_weights(seed=1)


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    return make_survey(tmp_path_factory.mktemp("provenance"), images=3, points=4, size=SIZE)


def extract(survey, weights: Path, out: Path, manifest: Path | None = None, **options) -> bulk.Summary:
    task = bulk.BulkTask.extract(weights_extractor(weights), out, **options)
    return bulk.run(task, bulk.plan(manifest or survey.manifest), workers=1)


# ---------------------------------------------------------------- feature files


def test_written_features_carry_provenance_and_load_in_pyspacer(survey, weights_a, tmp_path):
    summary = extract(survey, weights_a.path, tmp_path / "fv")
    assert summary.counts()["points_computed"] == 12
    for item in bulk.plan(survey.manifest):
        path = tmp_path / "fv" / (item.file_name + bulk.FEATURE_SUFFIX)
        ours = ImageFeatures.load(loc(path))
        rows, cols = [r for r, _ in item.rowcols], [c for _, c in item.rowcols]
        assert ours.provenance == FeatureProvenance(
            "EfficientNetExtractor", weights_a.sha256, points_sha256(rows, cols)
        )
        assert ImageFeatures.load_provenance(loc(path)) == ours.provenance
        theirs = sp_dc.ImageFeatures.load(sp_dc.DataLocation("filesystem", str(path)))
        assert [(p.row, p.col) for p in theirs.point_features] == list(item.rowcols)
        np.testing.assert_array_equal(np.array([p.data for p in theirs.point_features]), ours.feat)


def test_pyspacer_feature_files_are_of_unknown_origin(tmp_path):
    theirs = sp_dc.ImageFeatures.example()
    theirs.store(sp_dc.DataLocation("filesystem", str(tmp_path / "x.fv")))
    assert ImageFeatures.load(loc(tmp_path / "x.fv")).provenance is None
    assert ImageFeatures.load_provenance(loc(tmp_path / "x.fv")) is None


def test_damaged_provenance_is_named_in_the_error(tmp_path):
    meta = np.array([1, 1, 2])
    for bad in (np.array("{not json"), np.array('{"extractor": 5}'), np.array([1.0, 2.0])):
        out = io.BytesIO()
        np.savez(
            out,
            meta=meta,
            rows=np.array([1], np.uint16),
            cols=np.array([2], np.uint16),
            feat=np.ones((1, 2)),
            provenance=bad,
        )
        with pytest.raises(InvalidDataError, match="x.fv: not a valid feature file"):
            ImageFeatures.from_bytes(out.getvalue(), "x.fv")
        (tmp_path / "x.fv").write_bytes(out.getvalue())
        with pytest.raises(InvalidDataError, match="x.fv: "):
            ImageFeatures.load_provenance(loc(tmp_path / "x.fv"))


# ---------------------------------------------------------------- reruns


def test_rerun_unchanged_skips(survey, weights_a, tmp_path):
    extract(survey, weights_a.path, tmp_path / "fv")
    again = extract(survey, weights_a.path, tmp_path / "fv")
    assert again.counts()["skipped"] == 3 and again.counts()["points_computed"] == 0


def test_rerun_with_other_weights_recomputes(survey, weights_a, weights_b, tmp_path):
    extract(survey, weights_a.path, tmp_path / "fv")
    again = extract(survey, weights_b.path, tmp_path / "fv")
    assert again.counts()["skipped"] == 0 and again.counts()["points_computed"] == 12
    for path in (tmp_path / "fv").glob("*" + bulk.FEATURE_SUFFIX):
        made = ImageFeatures.load_provenance(loc(path))
        assert made is not None and made.weights_sha256 == weights_b.sha256


def test_rerun_recomputes_features_made_in_fast_precision(survey, weights_a, tmp_path):
    extract(survey, weights_a.path, tmp_path / "fv")
    first = sorted((tmp_path / "fv").glob("*" + bulk.FEATURE_SUFFIX))[0]
    stored = ImageFeatures.load(loc(first))
    assert stored.provenance is not None and stored.provenance.precision == ""
    assert "precision" not in stored.provenance.to_json()  # exact files are written as before
    stored.provenance = dataclasses.replace(stored.provenance, precision="fast")
    stored.store(loc(first))
    made = ImageFeatures.load_provenance(loc(first))
    assert made is not None and made.precision == "fast" and "in fast precision" in made.describe()
    again = extract(survey, weights_a.path, tmp_path / "fv")
    assert again.counts()["skipped"] == 2 and again.counts()["points_computed"] == 4
    remade = ImageFeatures.load_provenance(loc(first))
    assert remade is not None and remade.precision == ""


def test_rerun_with_moved_points_recomputes_only_that_image(survey, weights_a, tmp_path):
    extract(survey, weights_a.path, tmp_path / "fv")
    moved = {f"images/{p.name}": points_for(i, 4, SIZE) for i, p in enumerate(survey.images)}
    first = "images/" + survey.images[0].name
    moved[first] = [(r + 1, c) for r, c in moved[first]]
    manifest = write_manifest(survey.folder / "moved.csv", moved)
    again = extract(survey, weights_a.path, tmp_path / "fv", manifest=manifest)
    assert again.counts()["skipped"] == 2 and again.counts()["points_computed"] == 4
    assert not again.outcomes[first].skipped


def test_rerun_over_pyspacer_files_checks_their_points(survey, weights_a, tmp_path):
    items = bulk.plan(survey.manifest)
    out = tmp_path / "fv"
    out.mkdir()
    for i, item in enumerate(items):
        rowcols = list(item.rowcols) if i else [(r + 1, c) for r, c in item.rowcols]
        theirs = sp_dc.ImageFeatures(
            point_features=[sp_dc.PointFeatures(r, c, [0.5] * 1280) for r, c in rowcols],
            valid_rowcol=True,
            feature_dim=1280,
            npoints=len(rowcols),
        )
        theirs.store(sp_dc.DataLocation("filesystem", str(out / (item.file_name + ".featurevector"))))
    summary = extract(survey, weights_a.path, out)
    # Unknown origin is accepted where the points match; the moved image is made again.
    assert summary.counts()["skipped"] == 2 and summary.counts()["points_computed"] == 4
    assert not summary.outcomes[items[0].name].skipped


# ---------------------------------------------------------------- classifiers


def features_with(folder: Path, weights_sha: str, images: int = 12, seed: int = 0) -> ImageLabels:
    """Random 1280-d feature files stamped as made by EfficientNet on the given weights."""
    labels = make_random_data(
        images, ["CCA", "Sand"], 10, 1280, loc(f"{folder}/"), rng=np.random.default_rng(seed)
    )
    for key in labels.keys():
        features = ImageFeatures.load(key)
        assert features.rows is not None and features.cols is not None
        features.provenance = FeatureProvenance(
            "EfficientNetExtractor", weights_sha, points_sha256(features.rows, features.cols)
        )
        features.store(key)
    return labels


def train(labels: ImageLabels, model: Path) -> None:
    tasks.train_classifier(
        TrainClassifierMsg(
            job_token="t",
            trainer="minibatch",
            nbr_epochs=2,
            clf_type="LR",
            labels=labels,
            previous_model_locs=[],
            model_loc=loc(model),
            valresult_loc=loc(model.with_suffix(".valresult.json")),
        )
    )


@pytest.fixture(scope="module")
def classifier_a(tmp_path_factory, weights_a):
    folder = tmp_path_factory.mktemp("clf_a")
    train(features_with(folder, weights_a.sha256), folder / "clf.pkl")
    return folder / "clf.pkl"


def test_classifier_records_its_features_provenance_and_pyspacer_uses_it(classifier_a, weights_a, tmp_path):
    clf = load_classifier(loc(classifier_a))  # through the pickle guard
    assert getattr(clf, CLASSIFIER_PROVENANCE_ATTR) == {
        "extractor": "EfficientNetExtractor",
        "weights_sha256": weights_a.sha256,
    }
    assert classifier_provenance(clf) == FeatureProvenance("EfficientNetExtractor", weights_a.sha256)

    features = ImageFeatures.from_arrays(
        np.random.default_rng(1).normal(size=(3, 1280)), [1, 2, 3], [4, 5, 6]
    )
    features.store(loc(tmp_path / "f.fv"))
    sp_clf = sp_tasks.load_classifier(sp_dc.DataLocation("filesystem", str(classifier_a)))
    assert getattr(sp_clf, CLASSIFIER_PROVENANCE_ATTR)["weights_sha256"] == weights_a.sha256
    reply = sp_tasks.classify_features(
        sp_msg.ClassifyFeaturesMsg(
            "c",
            sp_dc.DataLocation("filesystem", str(tmp_path / "f.fv")),
            sp_dc.DataLocation("filesystem", str(classifier_a)),
        )
    )
    ours = tasks.classify_features(ClassifyFeaturesMsg("c", loc(tmp_path / "f.fv"), loc(classifier_a)))
    np.testing.assert_allclose([s for _, _, s in reply.scores], [s for _, _, s in ours.scores], atol=1e-9)


def image_msg(survey, weights: Path, classifier: Path) -> ClassifyImageMsg:
    image = survey.images[0]
    return ClassifyImageMsg(
        "c", weights_extractor(weights), points_for(0, 4, SIZE), loc(image), loc(classifier)
    )


def test_classifier_from_weights_a_refused_with_extractor_on_weights_b(
    survey, classifier_a, weights_a, weights_b
):
    with pytest.raises(ProvenanceMismatchError) as raised:
        tasks.classify_image(image_msg(survey, weights_b.path, classifier_a))
    message = str(raised.value)
    assert isinstance(raised.value, PreconditionError)
    assert (
        f"classifier {classifier_a} was trained on features from weights sha256 {weights_a.sha256[:12]}"
        in message
    )
    assert f"but the extractor uses weights sha256 {weights_b.sha256[:12]}" in message
    assert "retrain or use the matching weights" in message
    # The matching weights classify.
    assert len(tasks.classify_image(image_msg(survey, weights_a.path, classifier_a)).scores) == 4


def test_bulk_classify_with_other_weights_fails_each_image(survey, classifier_a, weights_b, tmp_path):
    task = bulk.BulkTask.classify(
        weights_extractor(weights_b.path), loc(classifier_a), tmp_path / "r.csv", 0.0
    )
    summary = bulk.run(task, bulk.plan(survey.manifest), workers=1)
    assert summary.counts()["failed"] == 3
    assert all("retrain or use the matching weights" in o.error for o in summary.outcomes.values())


def test_classify_features_from_other_weights_refused(classifier_a, weights_b, tmp_path):
    features = ImageFeatures.from_arrays(np.zeros((2, 1280)), [1, 2], [3, 4])
    features.provenance = FeatureProvenance(
        "EfficientNetExtractor", weights_b.sha256, points_sha256([1, 2], [3, 4])
    )
    features.store(loc(tmp_path / "b.fv"))
    with pytest.raises(ProvenanceMismatchError, match=f"but {tmp_path / 'b.fv'} uses weights sha256"):
        tasks.classify_features(ClassifyFeaturesMsg("c", loc(tmp_path / "b.fv"), loc(classifier_a)))


def test_evaluate_refuses_features_from_other_weights(classifier_a, weights_b, tmp_path):
    labels = features_with(tmp_path, weights_b.sha256, images=2)
    annotations = {}
    for key in labels.keys():
        name = Path(key.key).name
        os.rename(key.key, tmp_path / f"{name}.featurevector")
        annotations[name] = labels[key]
    with pytest.raises(ProvenanceMismatchError, match="retrain or use the matching weights"):
        evaluate(classifier_a, annotations, tmp_path)


def test_pyspacer_classifiers_and_features_are_accepted(survey, weights_b, tmp_path):
    plain = write_classifier(tmp_path / "plain.pkl")  # no recorded provenance, as pyspacer writes
    assert classifier_provenance(load_classifier(loc(plain))) is None
    assert len(tasks.classify_image(image_msg(survey, weights_b.path, plain)).scores) == 4
    theirs = sp_dc.ImageFeatures(
        point_features=[sp_dc.PointFeatures(1, 2, [0.1] * 1280)],
        valid_rowcol=True,
        feature_dim=1280,
        npoints=1,
    )
    theirs.store(sp_dc.DataLocation("filesystem", str(tmp_path / "p.fv")))
    assert (
        len(tasks.classify_features(ClassifyFeaturesMsg("c", loc(tmp_path / "p.fv"), loc(plain))).scores) == 1
    )


def test_pyspacer_features_with_our_classifier_are_accepted(classifier_a, tmp_path):
    theirs = sp_dc.ImageFeatures(
        point_features=[sp_dc.PointFeatures(1, 2, [0.1] * 1280)],
        valid_rowcol=True,
        feature_dim=1280,
        npoints=1,
    )
    theirs.store(sp_dc.DataLocation("filesystem", str(tmp_path / "p.fv")))
    reply = tasks.classify_features(ClassifyFeaturesMsg("c", loc(tmp_path / "p.fv"), loc(classifier_a)))
    assert len(reply.scores) == 1


def test_training_on_mixed_provenance_is_refused_naming_two_files(weights_a, weights_b, tmp_path):
    labels = features_with(tmp_path / "a", weights_a.sha256, seed=1)
    other = features_with(tmp_path / "b", weights_b.sha256, images=2, seed=2)
    for key in other.keys():
        labels.add_image(key, other[key])
    with pytest.raises(ProvenanceMismatchError) as raised:
        train(labels, tmp_path / "clf.pkl")
    message = str(raised.value)
    assert str(tmp_path / "a") in message and str(tmp_path / "b") in message
    assert weights_a.sha256[:12] in message and weights_b.sha256[:12] in message
    assert not (tmp_path / "clf.pkl").exists()


def test_training_on_pyspacer_features_records_nothing(tmp_path):
    labels = make_random_data(12, ["CCA", "Sand"], 10, 8, loc(f"{tmp_path}/"), rng=np.random.default_rng(0))
    train(labels, tmp_path / "clf.pkl")
    clf = pickle.loads((tmp_path / "clf.pkl").read_bytes())
    assert not hasattr(clf, CLASSIFIER_PROVENANCE_ATTR)


# ---------------------------------------------------------------- Ctrl-C


@pytest.mark.parametrize("workers", [1, 2])
def test_keyboard_interrupt_writes_the_summary(survey, weights_a, tmp_path, workers):
    task = bulk.BulkTask.extract(weights_extractor(weights_a.path), tmp_path / "fv")

    def progress(done: int, total: int, points: int) -> None:
        if done >= 1:
            raise KeyboardInterrupt

    with pytest.raises(bulk.BulkInterrupted) as raised:
        bulk.run(task, bulk.plan(survey.manifest), progress=progress, workers=workers)
    summary = json.loads((tmp_path / "fv" / bulk.SUMMARY_NAME).read_text())
    assert summary["interrupted"] is True and summary["images"] == 3
    assert 1 <= summary["ok"] <= 3 and summary["failed"] == 0
    assert raised.value.message().startswith(f"interrupted: {summary['ok']} of 3 images done")
    assert isinstance(raised.value, KeyboardInterrupt)
    # What finished is kept: a rerun skips it.
    again = bulk.run(task, bulk.plan(survey.manifest), workers=1)
    assert again.counts()["skipped"] == summary["ok"]


SIGINT_SCRIPT = textwrap.dedent(
    """
    import sys
    from spacer_core.bulk import local as bulk
    from spacer_core.survey.workflow import weights_extractor

    task = bulk.BulkTask.extract(weights_extractor(sys.argv[2]), sys.argv[3])

    def progress(done, total, points):
        print(f"progress {done}", flush=True)

    try:
        bulk.run(task, bulk.plan(sys.argv[1]), progress=progress, workers=1)
    except bulk.BulkInterrupted as stopped:  # what the shell does
        print(f"spacer bulk: {stopped.message()}", file=sys.stderr)
        sys.exit(130)
    """
)


def test_sigint_to_a_bulk_process_writes_the_summary(tmp_path, weights_a):
    survey = make_survey(tmp_path / "s", images=6, points=4, size=SIZE)
    out = tmp_path / "fv"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-c", SIGINT_SCRIPT, str(survey.manifest), str(weights_a.path), str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 300
        for line in proc.stdout:
            if line.strip() == "progress 1" or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().startswith("spacer bulk: interrupted:")
    summary = json.loads((out / bulk.SUMMARY_NAME).read_text())
    assert summary["interrupted"] is True and summary["images"] == 6 and summary["ok"] < 6
