"""`spacer extract|train|classify|evaluate|demo` on real CSVs, JPEGs and EfficientNet weights.

The survey (JPEGs, CoralNet CSVs, weights) comes from spacer_core.survey.demo;
pyspacer 0.14.0 is the oracle for features and scores.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import subprocess

import numpy as np
import pytest

from shell.main import main
from spacer_core.survey import coralnet, demo
from spacer_core.testing import extractor_json
from tests.support.grpc_server import running_server

spacer = pytest.importorskip("spacer")
from spacer import tasks as sp_tasks  # noqa: E402
from spacer.data_classes import DataLocation as SpLoc  # noqa: E402
from spacer.data_classes import ImageFeatures as SpFeatures  # noqa: E402
from spacer.extractors import FeatureExtractor as SpExtractor  # noqa: E402
from spacer.messages import ClassifyFeaturesMsg, ExtractFeaturesMsg  # noqa: E402

pytestmark = pytest.mark.slow


def fs(path):
    return SpLoc("filesystem", str(path))


def cli(capsys, *argv):
    """Run `spacer ...` in process; (exit code, parsed --json stdout or text, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if "--json" in argv and code == 0 else out), err


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The demo survey, its training images extracted and a classifier trained, through the CLI."""
    folder = tmp_path_factory.mktemp("survey")
    s = demo.build_survey(folder)
    features = s.folder / "features"
    assert (
        main(
            [
                "extract",
                "--weights",
                str(s.weights),
                "--points",
                str(s.annotations),
                "--images",
                str(s.folder / "images" / "train"),
                "--out",
                str(features),
                "--json",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                "--annotations",
                str(s.annotations),
                "--features",
                str(features),
                "--out",
                str(s.classifier),
                "--epochs",
                "4",
                "--report",
                str(s.folder / "train-report"),
                "--json",
            ]
        )
        == 0
    )
    return s


def test_extract_writes_pyspacer_feature_files(trained, capsys):
    s = trained
    image = s.new_images[0]
    code, summary, _ = cli(
        capsys,
        "extract",
        "--weights",
        s.weights,
        "--points",
        s.new_annotations,
        "--out",
        s.folder / "new-features",
        "--json",
        image,
    )
    assert code == 0 and summary["points"] == len(coralnet.read_points(s.new_annotations)[image.name])
    ours = SpFeatures.load(fs(s.folder / "new-features" / f"{image.name}.featurevector"))
    sha = hashlib.sha256(s.weights.read_bytes()).hexdigest()
    extractor = SpExtractor.deserialize(extractor_json(s.weights, sha))
    rowcols = [(p.row, p.col) for p in ours.point_features][:6]
    sp_tasks.extract_features(ExtractFeaturesMsg("o", extractor, rowcols, fs(image), fs(s.folder / "o.fv")))
    oracle = SpFeatures.load(fs(s.folder / "o.fv"))
    for a, b in zip(ours.point_features, oracle.point_features):
        assert (a.row, a.col) == (b.row, b.col)
        np.testing.assert_allclose(a.data, b.data, atol=1e-4, rtol=0)


def test_train_reports_validation_metrics(trained):
    page = (trained.folder / "train-report" / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 3  # accuracy per epoch, Alleviate, confusion matrices
    assert "Per-class metrics" in page and "ALGAE" in page
    assert "Alleviate: choosing --threshold (validation set)" in page
    val = json.loads(trained.classifier.with_name("classifier.valresult.json").read_text())
    assert sorted(val["classes"]) == sorted(demo.CLASSES)


def points_only(annotations, path):
    """The points of an annotation CSV without its labels (Name, Row, Column)."""
    rows = [(name, r, c) for name, rcs in coralnet.read_points(annotations).items() for r, c in rcs]
    path.write_text("Name,Row,Column\n" + "".join(f"{n},{r},{c}\n" for n, r, c in rows))
    return path


def test_classify_results_match_pyspacer_and_threshold(trained, capsys):
    s = trained
    out = s.folder / "results.csv"
    # Points only: a Label column would make those labels a person's, kept whatever the score.
    points_csv = points_only(s.annotations, s.folder / "points.csv")
    code, summary, _ = cli(
        capsys,
        "classify",
        "--weights",
        s.weights,
        "--classifier",
        s.classifier,
        "--points",
        points_csv,
        "--out",
        out,
        "--threshold",
        "0.8",
        "--json",
        *s.train_images[:2],
    )
    assert code == 0
    table = read_csv(out)
    assert list(table[0])[:4] == ["Name", "Row", "Column", "Label"]
    points = coralnet.read_points(points_csv)
    assert points == coralnet.read_points(s.annotations)
    assert [(t["Name"], int(t["Row"]), int(t["Column"])) for t in table] == [
        (p.name, r, c) for p in s.train_images[:2] for r, c in points[p.name]
    ]
    assert sum(t["Accepted"] == "yes" for t in table) == summary["accepted"]
    for t in table:
        # Only an accepted point carries a Label: CoralNet's upload takes every Label as confirmed.
        assert t["Label"] == (t["Machine suggestion 1"] if t["Accepted"] == "yes" else "")
        assert (t["Accepted"] == "yes") == (float(t["Score"]) >= 0.8)
        assert (
            int(t["Machine confidence 1"]) >= int(t["Machine confidence 2"]) >= int(t["Machine confidence 3"])
        )
    # Oracle: pyspacer scores the feature file extracted at the same points.
    image = s.train_images[0]
    oracle = sp_tasks.classify_features(
        ClassifyFeaturesMsg("o", fs(s.folder / "features" / f"{image.name}.featurevector"), fs(s.classifier))
    )
    classes = [str(c) for c in oracle.classes]
    for row in summary["rows"][: len(points[image.name])]:
        probs = oracle[(row["row"], row["column"])]
        assert row["label"] == classes[int(np.argmax(probs))]
        assert row["score"] == pytest.approx(max(probs), abs=1e-4)
    # Threshold 0 accepts everything; the report shows thumbnails and the histogram.
    code, summary, _ = cli(
        capsys,
        "classify",
        "--weights",
        s.weights,
        "--classifier",
        s.classifier,
        "--points",
        points_csv,
        "--out",
        out,
        "--threshold",
        "0",
        "--json",
        "--report",
        s.folder / "cls-report",
        s.train_images[0],
    )
    assert summary["accepted"] == summary["points"] == len(points[image.name])
    page = (s.folder / "cls-report" / "index.html").read_text()
    assert (
        page.count("data:image/png;base64,") == 2  # histogram and the thumbnail; the legend is HTML
        and f"{summary['points']} of {summary['points']} points" in page
    )


@pytest.mark.parametrize("threshold", ["1", "0"])
def test_labels_a_person_gave_in_points_stay_whatever_the_score(trained, capsys, threshold):
    s = trained
    image = s.train_images[0]
    rowcols = coralnet.read_points(s.annotations)[image.name]
    given = {rowcols[0]: "PERSON", rowcols[2]: "SAND"}
    lines = ["Name,Row,Column,Label"] + [f"{image.name},{r},{c},{given.get((r, c), '')}" for r, c in rowcols]
    (s.folder / "half-labelled.csv").write_text("\n".join(lines) + "\n")
    out = s.folder / f"given-{threshold}.csv"
    code, summary, _ = cli(
        capsys,
        "classify",
        "--weights",
        s.weights,
        "--classifier",
        s.classifier,
        "--points",
        s.folder / "half-labelled.csv",
        "--out",
        out,
        "--threshold",
        threshold,
        "--json",
        image,
    )
    assert code == 0
    table = read_csv(out)
    assert [(int(t["Row"]), int(t["Column"])) for t in table] == rowcols
    for t, row in zip(table, summary["rows"]):
        point = (int(t["Row"]), int(t["Column"]))
        # Threshold 1 accepts nothing, 0 everything: neither touches a person's label.
        machine = t["Machine suggestion 1"] if t["Accepted"] == "yes" else ""
        assert t["Label"] == given.get(point, machine)
        assert row["given"] == given.get(point, "")
        assert t["Machine suggestion 1"] == row["label"]  # the machine's guess is still reported
    assert summary["accepted"] == sum(t["Accepted"] == "yes" for t in table)
    assert summary["person"] == sum(t["Accepted"] == "person" for t in table) == len(given)
    if threshold == "0":
        assert summary["accepted"] + summary["person"] == len(rowcols)


@pytest.mark.parametrize("spec, per_image", [("random:7", 7), ("stratified:2x2x2", 8), ("grid:3x3", 9)])
def test_classify_with_generated_points(trained, capsys, spec, per_image):
    s = trained
    out = s.folder / f"gen-{per_image}.csv"
    code, summary, _ = cli(
        capsys,
        "classify",
        "--weights",
        s.weights,
        "--classifier",
        s.classifier,
        "--points",
        spec,
        "--out",
        out,
        "--json",
        "--images",
        s.folder / "images" / "new",
    )
    assert code == 0 and summary["points"] == per_image * len(s.new_images)
    table = read_csv(out)
    first = s.new_images[0].name
    expected = coralnet.generate_points(
        coralnet.parse_point_spec(spec), demo.WIDTH, demo.HEIGHT, seed=f"0:{first}"
    )
    assert [(int(t["Row"]), int(t["Column"])) for t in table if t["Name"] == first] == expected


def test_extract_with_generated_points_then_evaluate(trained, capsys):
    s = trained
    feats = s.folder / "eval-features"
    code, summary, _ = cli(
        capsys,
        "extract",
        "--weights",
        s.weights,
        "--points",
        s.new_annotations,
        "--out",
        feats,
        "--json",
        *s.new_images,
    )
    assert code == 0
    code, summary, _ = cli(
        capsys,
        "evaluate",
        "--classifier",
        s.classifier,
        "--annotations",
        s.new_annotations,
        "--features",
        feats,
        "--report",
        s.folder / "eval-report",
        "--json",
    )
    assert code == 0
    truth = coralnet.read_annotations(s.new_annotations)
    hits = total = 0
    for name, labelled in truth.items():
        oracle = sp_tasks.classify_features(
            ClassifyFeaturesMsg("o", fs(feats / f"{name}.featurevector"), fs(s.classifier))
        )
        for r, c, label in labelled:
            hits += str(oracle.classes[int(np.argmax(oracle[(r, c)]))]) == label
            total += 1
    assert summary["accuracy"] == pytest.approx(hits / total)
    assert np.sum(summary["confusion"]) == total
    assert (s.folder / "eval-report" / "index.html").is_file()
    assert (
        "Alleviate: choosing --threshold (evaluated annotations)"
        in (s.folder / "eval-report" / "index.html").read_text()
    )


def test_missing_features_and_points_fail_with_one_line(trained, capsys):
    s = trained
    code, _, err = cli(
        capsys,
        "evaluate",
        "--classifier",
        s.classifier,
        "--annotations",
        s.new_annotations,
        "--features",
        s.folder / "nowhere",
    )
    assert code == 1 and err.startswith("spacer evaluate: ") and err.count("\n") == 1
    assert "new_17.jpg" in err
    code, _, err = cli(
        capsys,
        "classify",
        "--weights",
        s.weights,
        "--classifier",
        s.classifier,
        "--points",
        s.annotations,
        "--out",
        s.folder / "x.csv",
        s.new_images[0],
    )
    assert (
        code == 1
        and err == f"spacer classify: {s.new_images[0].name}: no rows with this Name in the points CSV\n"
    )


def _screenshot(page, png):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (scripts/install-system-deps.sh --test)")
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1100,1600",
            f"--screenshot={png}",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    from PIL import Image

    with Image.open(png) as image:
        return np.asarray(image.convert("RGB"))


def test_reports_render_in_chromium(trained, tmp_path):
    for name in ("train-report", "cls-report"):
        page = trained.folder / name / "index.html"
        if not page.exists():
            pytest.skip("classify test did not run")
        pixels = _screenshot(page, tmp_path / f"{name}.png")
        non_white = (pixels < 245).any(axis=-1).mean()
        assert pixels.std() > 20 and non_white > 0.05, f"{name} looks blank"
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200


def test_demo_in_process_and_through_a_server(tmp_path, capsys):
    code, summary, _ = cli(capsys, "demo", tmp_path / "local", "--json")
    assert code == 0
    assert summary["validation_accuracy"] > 0.7 and summary["held_out_accuracy"] > 0.7
    assert len(read_csv(summary["results_csv"])) == summary["points"] > 0
    with running_server() as server:
        code, remote, _ = cli(capsys, "demo", tmp_path / "remote", "--server", server.address, "--json")
    assert code == 0 and remote["via"] == server.address
    # Same survey, same steps: the server gives the same classifier and results.
    assert remote["ref_accs"] == pytest.approx(summary["ref_accs"], abs=1e-9)
    assert read_csv(remote["results_csv"]) == read_csv(summary["results_csv"])
