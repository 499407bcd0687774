"""A reef survey as an ecologist runs it, and the mistakes people make with one.

Fourteen JPEGs (made here with Pillow) and the CoralNet-style CSVs and the
damaged image under tests/fixtures/scientist/. Every failure is one line on
stderr that names the file at fault: no traceback, no gRPC status names, no
terminal escape codes, and the good images' outputs are still written.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shell.main import main
from spacer_core.testing import write_classifier, write_image
from spacer_core.weights.synthetic import cached_weights

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "scientist"
NAMES = [f"reef_{i:02d}.jpg" for i in range(1, 15)]
GRPC_WORDS = re.compile(r"INVALID_ARGUMENT|NOT_FOUND|FAILED_PRECONDITION|INTERNAL|UNAVAILABLE|server")


def cli(capsys, *argv):
    """`spacer ...` in process: (exit status, stdout, stderr lines)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err.splitlines()


def spacer(*argv, cwd=None):
    """The real `spacer` command in a subprocess."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "shell", *map(str, argv)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


def assert_plain(lines):
    """Each line a message for a person: no traceback, status names or escape codes."""
    for line in lines:
        assert "Traceback" not in line and "\x1b" not in line and not GRPC_WORDS.search(line), line


def rows_of(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    """Fourteen images, their features extracted and a classifier trained, through the CLI."""
    folder = tmp_path_factory.mktemp("reef")
    images = folder / "images"
    images.mkdir()
    for i, name in enumerate(NAMES):
        write_image(images / name, seed=i, size=(320, 240))
    weights = cached_weights().path
    features = folder / "features"
    annotations = FIXTURES / "survey_annotations.csv"
    args = ["--weights", weights, "--points", annotations, "--images", images, "--out", features]
    assert main(["extract", *map(str, args)]) == 0
    classifier = folder / "classifier.pkl"
    train = ["--annotations", annotations, "--features", features, "--out", classifier, "--epochs", "2"]
    assert main(["train", *map(str, train)]) == 0
    return {"folder": folder, "images": images, "weights": weights, "features": features, "clf": classifier}


def seven_images(survey, tmp_path):
    """Six good images and the damaged one as reef_07.jpg, and their rows of the survey CSV."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name in NAMES[:7]:
        shutil.copy(survey["images"] / name, folder / name)
    shutil.copy(FIXTURES / "corrupt.jpg", folder / "reef_07.jpg")
    lines = (FIXTURES / "survey_annotations.csv").read_text().splitlines(keepends=True)
    points = tmp_path / "points.csv"
    points.write_text("".join(lines[:1] + [line for line in lines[1:] if line.split(",")[0] in NAMES[:7]]))
    return folder, points


# ---------------------------------------------------------------- one bad image


def test_extract_writes_the_good_images_and_lists_the_corrupt_one(survey, tmp_path, capsys):
    folder, points = seven_images(survey, tmp_path)
    out = tmp_path / "features"
    code, stdout, err = cli(
        capsys,
        "extract",
        "--weights",
        survey["weights"],
        "--points",
        points,
        "--images",
        folder,
        "--out",
        out,
        "--json",
    )
    assert code == 1
    assert sorted(p.name for p in out.iterdir()) == [f"{n}.featurevector" for n in NAMES[:6]]
    assert len(err) == 1 and "reef_07.jpg" in err[0] and err[0].startswith("spacer extract: ")
    assert_plain(err)
    summary = json.loads(stdout)
    assert [f["file"] for f in summary["failures"]] == [str(folder / "reef_07.jpg")]
    assert summary["images"] == 6


def test_classify_writes_results_and_report_of_the_good_images(survey, tmp_path, capsys):
    folder, points = seven_images(survey, tmp_path)
    results = tmp_path / "results.csv"
    code, stdout, err = cli(
        capsys,
        "classify",
        "--weights",
        survey["weights"],
        "--classifier",
        survey["clf"],
        "--points",
        points,
        "--images",
        folder,
        "--out",
        results,
        "--report",
        tmp_path / "report",
        "--json",
    )
    assert code == 1
    rows = rows_of(results)
    assert sorted({r["Name"] for r in rows}) == NAMES[:6] and len(rows) == 36
    assert (tmp_path / "report" / "index.html").is_file()
    assert len(err) == 1 and "reef_07.jpg" in err[0] and err[0].startswith("spacer classify: ")
    assert_plain(err)
    summary = json.loads(stdout)
    assert [f["file"] for f in summary["failures"]] == [str(folder / "reef_07.jpg")]
    assert summary["points"] == 36 and summary["images"] == 6


def damaged_features(survey, tmp_path):
    """The survey's feature files, one of them garbage and one missing."""
    features = tmp_path / "features"
    shutil.copytree(survey["features"], features)
    (features / "reef_03.jpg.featurevector").write_bytes(b"\x00garbage")
    (features / "reef_05.jpg.featurevector").unlink()
    return features


def test_train_leaves_out_damaged_and_missing_feature_files(survey, tmp_path, capsys):
    features = damaged_features(survey, tmp_path)
    out = tmp_path / "clf.pkl"
    code, stdout, err = cli(
        capsys,
        "train",
        "--annotations",
        FIXTURES / "survey_annotations.csv",
        "--features",
        features,
        "--out",
        out,
        "--epochs",
        "2",
        "--json",
    )
    assert code == 1 and out.is_file()
    assert len(err) == 2 and "reef_03.jpg.featurevector" in err[0] and "reef_05.jpg.featurevector" in err[1]
    assert "run extract first" in err[1]
    assert_plain(err)
    summary = json.loads(stdout)
    assert len(summary["failures"]) == 2
    assert sum(summary["points"].values()) == 12 * 6


def test_evaluate_leaves_out_damaged_feature_files(survey, tmp_path, capsys):
    features = damaged_features(survey, tmp_path)
    code, stdout, err = cli(
        capsys,
        "evaluate",
        "--classifier",
        survey["clf"],
        "--annotations",
        FIXTURES / "survey_annotations.csv",
        "--features",
        features,
    )
    assert code == 1 and stdout.startswith("accuracy ") and "on 72 annotated points" in stdout
    assert len(err) == 2 and "reef_03" in err[0] and "reef_05" in err[1]
    assert_plain(err)


# ---------------------------------------------------------------- silence where a message belongs


def test_extract_lists_images_the_csv_names_but_the_folder_lacks(survey, tmp_path, capsys):
    out = tmp_path / "features"
    code, stdout, err = cli(
        capsys,
        "extract",
        "--weights",
        survey["weights"],
        "--points",
        FIXTURES / "points_missing_images.csv",
        "--images",
        survey["images"],
        "--out",
        out,
        "--json",
    )
    assert code == 1
    assert len(list(out.iterdir())) == 14
    assert len(err) == 1 and "4 images" in err[0] and "reef_15.jpg" in err[0]
    assert "points_missing_images.csv" in err[0]
    assert_plain(err)
    assert json.loads(stdout)["missing_images"] == [f"reef_{i}.jpg" for i in range(15, 19)]


def test_a_class_with_one_point_is_named_when_dropped(survey, tmp_path, capsys):
    code, stdout, err = cli(
        capsys,
        "train",
        "--annotations",
        FIXTURES / "annotations_one_point_class.csv",
        "--features",
        survey["features"],
        "--out",
        tmp_path / "clf.pkl",
        "--epochs",
        "2",
        "--json",
    )
    assert code == 0
    assert len(err) == 1 and "warning" in err[0] and "Acro (1 point)" in err[0] and "too few points" in err[0]
    assert json.loads(stdout)["warnings"] == [err[0].removeprefix("spacer train: warning: ")]


def test_training_on_two_images_says_how_many_it_needs(survey, tmp_path, capsys):
    code, _, err = cli(
        capsys,
        "train",
        "--annotations",
        FIXTURES / "annotations_two_images.csv",
        "--features",
        survey["features"],
        "--out",
        tmp_path / "clf.pkl",
    )
    assert code == 1
    assert err == [
        "spacer train: too few images: training needs at least 3 annotated images (got 2);"
        " whole images are split into validation (about 10% of the points), reference (10%)"
        " and training sets, and each needs at least one"
    ]


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        ("annotations_label_ids.csv", "none of the annotations' labels is a class of the classifier"),
        ("annotations_partly_known.csv", "labels the classifier never predicts"),
    ],
)
def test_evaluate_warns_when_labels_and_classes_do_not_overlap(survey, capsys, fixture, expected):
    code, stdout, err = cli(
        capsys,
        "evaluate",
        "--classifier",
        survey["clf"],
        "--annotations",
        FIXTURES / fixture,
        "--features",
        survey["features"],
        "--json",
    )
    assert code == 0 and len(err) == 1 and expected in err[0] and "warning" in err[0]
    assert_plain(err)
    assert json.loads(stdout)["warnings"] == [err[0].removeprefix("spacer evaluate: warning: ")]
    if fixture == "annotations_partly_known.csv":
        assert "Turf (12 points)" in err[0] and "Porit" not in err[0].partition("):")[2]


@pytest.mark.parametrize("spec", ["stratified:5x5", "random:0", "grid:ten", "hex:4"])
def test_a_bad_point_layout_is_a_usage_error(survey, tmp_path, spec):
    done = spacer(
        "extract", "--weights", survey["weights"], "--points", spec, "--images", survey["images"],
        "--out", tmp_path / "f",
    )  # fmt: skip
    assert done.returncode == 2
    last = done.stderr.splitlines()[-1]
    assert last.startswith("spacer extract: error: argument --points: ") and repr(spec) in last
    assert "random:N" in last and "stratified:ROWSxCOLSxPER_CELL" in last and "grid:ROWSxCOLS" in last
    assert "Traceback" not in done.stderr and "server" not in done.stderr


def test_a_classifier_passed_as_weights_is_named_as_such(survey, tmp_path):
    clf = write_classifier(tmp_path / "clf.pkl")
    done = spacer(
        "extract", "--weights", "clf.pkl", "--points", "grid:2x2", *(survey["images"] / n for n in NAMES[:3]),
        "--out", tmp_path / "f", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "\x1b" not in done.stderr
    assert clf.is_file() and done.stderr.startswith(
        "spacer extract: clf.pkl is not an EfficientNet-b0 weights file:"
        " it holds a pickled scikit-learn classifier (CalibratedClassifierCV);"
    )


def test_an_unusable_classifier_fails_the_run_once_before_any_image(survey, tmp_path, capsys):
    import pickle

    import numpy as np
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.linear_model import SGDClassifier

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 1280)), np.array(["a", "b", "c"] * 20)
    clf = tmp_path / "cv3.pkl"
    clf.write_bytes(pickle.dumps(CalibratedClassifierCV(SGDClassifier(loss="log_loss"), cv=3).fit(x, y)))
    out = tmp_path / "results.csv"
    code, stdout, err = cli(
        capsys,
        "classify",
        "--weights",
        survey["weights"],
        "--classifier",
        clf,
        "--points",
        "grid:2x2",
        *(survey["images"] / n for n in NAMES[:3]),
        "--out",
        out,
    )
    assert code == 1 and stdout == "" and not out.exists()
    assert len(err) == 1 and "cv '3' instead of 'prefit'" in err[0] and str(clf) in err[0]
    assert "image failed" not in err[0]


def test_an_image_passed_as_weights_is_named_as_such(survey, tmp_path, capsys):
    code, _, err = cli(
        capsys,
        "extract",
        "--weights",
        survey["images"] / NAMES[1],
        "--points",
        "grid:2x2",
        survey["images"] / NAMES[0],
        "--out",
        tmp_path / "f",
    )
    assert code == 1 and len(err) == 1 and "reef_02.jpg is not an EfficientNet-b0 weights file" in err[0]
    assert "it holds a JPEG image" in err[0]


def test_a_point_outside_the_image_names_the_csv_row(survey, tmp_path, capsys):
    code, _, err = cli(
        capsys,
        "extract",
        "--weights",
        survey["weights"],
        "--points",
        FIXTURES / "points_outside_image.csv",
        survey["images"] / NAMES[0],
        survey["images"] / NAMES[1],
        "--out",
        tmp_path / "f",
    )
    assert code == 1 and (tmp_path / "f" / f"{NAMES[0]}.featurevector").is_file()
    assert len(err) == 1 and "points_outside_image.csv, row 14" in err[0] and "reef_02.jpg" in err[0]
    assert_plain(err)


def test_a_bad_row_value_names_the_csv_row(survey, tmp_path, capsys):
    code, _, err = cli(
        capsys,
        "train",
        "--annotations",
        FIXTURES / "labelled_points_bad_row.csv",
        "--features",
        survey["features"],
        "--out",
        tmp_path / "clf.pkl",
    )
    assert code == 1
    assert err == [
        f"spacer train: {FIXTURES / 'labelled_points_bad_row.csv'}, row 3, column 'Row':"
        " '4.5' is not a pixel position (a whole number >= 0)"
    ]


def test_an_image_without_rows_in_the_points_csv_costs_only_itself(survey, tmp_path, capsys):
    code, _, err = cli(
        capsys,
        "extract",
        "--weights",
        survey["weights"],
        "--points",
        FIXTURES / "annotations_two_images.csv",
        *(survey["images"] / n for n in NAMES[:3]),
        "--out",
        tmp_path / "f",
    )
    assert code == 1
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == [f"{n}.featurevector" for n in NAMES[:2]]
    assert err == [
        f"spacer extract: image failed: {survey['images'] / NAMES[2]}: no rows with this Name in the points CSV"
    ]


def test_when_every_image_fails_alike_it_is_said_once(survey, tmp_path, capsys):
    points = tmp_path / "points.csv"
    points.write_text("Name,Row,Column\n" + "".join(f"{n},900,10\n" for n in NAMES[:4]))
    code, _, err = cli(
        capsys,
        "extract",
        "--weights",
        survey["weights"],
        "--points",
        points,
        *(survey["images"] / n for n in NAMES[:4]),
        "--out",
        tmp_path / "f",
    )
    assert code == 1 and len(err) == 5
    assert all(f"{points}, row {i + 2}: point (row 900, column 10)" in line for i, line in enumerate(err[:4]))
    assert err[4] == "spacer extract: all 4 images failed (listed above)"


@pytest.mark.parametrize("command", ["extract", "classify"])
def test_json_lists_the_failures_when_every_image_fails(survey, tmp_path, capsys, command):
    points = tmp_path / "points.csv"
    points.write_text("Name,Row,Column\n" + "".join(f"{n},900,10\n" for n in NAMES[:2]))
    extra = ["--classifier", survey["clf"]] if command == "classify" else []
    out_path = tmp_path / ("results.csv" if command == "classify" else "f")
    code, out, err = cli(
        capsys,
        command,
        "--weights",
        survey["weights"],
        *extra,
        "--points",
        points,
        *(survey["images"] / n for n in NAMES[:2]),
        "--out",
        out_path,
        "--json",
    )
    assert code == 1 and err[-1].startswith(f"spacer {command}: all 2 images failed")
    summary = json.loads(out)
    assert summary["images"] == 0 and summary["points"] == 0 and summary["missing_images"] == []
    assert [f["file"] for f in summary["failures"]] == [str(survey["images"] / n) for n in NAMES[:2]]
    assert all("row 900" in f["reason"] for f in summary["failures"])
    # The keys a run with good images has are there too, empty.
    keys = {"features", "files"} if command == "extract" else {"results", "rows", "classes", "accepted"}
    assert keys <= summary.keys()


@pytest.mark.parametrize("command", ["extract", "classify"])
def test_a_points_csv_naming_none_of_the_images_lists_every_image(survey, tmp_path, capsys, command):
    points = tmp_path / "points.csv"
    points.write_text("Name,Row,Column\nelsewhere.jpg,10,10\n")
    extra = ["--classifier", survey["clf"]] if command == "classify" else []
    images = [survey["images"] / n for n in NAMES[:2]]
    code, out, err = cli(
        capsys, command, "--weights", survey["weights"], *extra, "--points", points, *images,
        "--out", tmp_path / "out", "--json",
    )  # fmt: skip
    assert code == 1
    summary = json.loads(out)
    assert [f["file"] for f in summary["failures"]] == [str(p) for p in images]
    assert all(f["reason"] == "no rows with this Name in the points CSV" for f in summary["failures"])
    # Alike failures are said once, naming every image.
    assert err == [
        f"spacer {command}: all 2 images failed ({NAMES[0]}, {NAMES[1]}):"
        " no rows with this Name in the points CSV"
    ]


def test_a_classifier_for_other_features_fails_before_any_image(survey, tmp_path, capsys):
    clf = write_classifier(tmp_path / "f64.pkl", dim=64)
    out = tmp_path / "results.csv"
    code, stdout, err = cli(
        capsys, "classify", "--weights", survey["weights"], "--classifier", clf, "--points", "grid:2x2",
        *(survey["images"] / n for n in NAMES[:2]), "--out", out, "--json",
    )  # fmt: skip
    assert code == 1 and stdout == "" and not out.exists()
    assert err == [
        f"spacer classify: {clf}: the classifier was trained on features of dimension 64, but the"
        " extractor gives 1280; use the classifier made with these weights"
    ]


# ---------------------------------------------------------------- results fed back in


def test_results_fed_back_as_points_rescore_the_machines_labels(survey, tmp_path, capsys):
    image = survey["images"] / NAMES[0]
    first = tmp_path / "results.csv"
    base = ["classify", "--weights", survey["weights"], "--classifier", survey["clf"], "--json"]
    code, _, _ = cli(capsys, *base, "--points", "grid:3x3", "--threshold", "0", "--out", first, image)
    assert code == 0
    rows = rows_of(first)
    assert len(rows) == 9 and all(r["Accepted"] == "yes" and r["Label"] for r in rows)
    # A person reviews one point and marks the label as theirs.
    rows[4].update(Label="Person-Porit", Accepted="person")
    with open(first, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    second = tmp_path / "results2.csv"
    code, stdout, _ = cli(capsys, *base, "--points", first, "--threshold", "1", "--out", second, image)
    assert code == 0
    again = rows_of(second)
    assert [(r["Row"], r["Column"]) for r in again] == [(r["Row"], r["Column"]) for r in rows]
    # Threshold 1 accepts nothing: only the person's label is left.
    assert [(r["Label"], r["Accepted"]) for r in again] == [("", "no")] * 4 + [("Person-Porit", "person")] + [
        ("", "no")
    ] * 4
    summary = json.loads(stdout)
    assert (summary["accepted"], summary["person"]) == (0, 1)
