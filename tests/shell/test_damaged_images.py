"""Damaged and unreadable images in a survey folder: each a listed failure, the good images still written.

The images are real files cut or filled as a failed copy leaves them; every
command runs through the real `spacer` entry point.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from shell.main import main
from spacer_core.testing import extractor_json, write_classifier, write_image
from spacer_core.weights.synthetic import cached_weights

pytestmark = pytest.mark.slow

TRUNCATED = "the image data ends early (truncated or damaged file)"


def cli(capsys, *argv):
    """`spacer ...` in process: (exit status, stdout, stderr lines)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err.splitlines()


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """A folder of one good JPEG and three damaged images (JPEG cut short, JPEG with zeros, half a PNG)."""
    folder = tmp_path_factory.mktemp("damaged") / "images"
    folder.mkdir()
    write_image(folder / "good.jpg", seed=1, size=(320, 240))
    source = write_image(folder.parent / "source.jpg", seed=2, size=(640, 480)).read_bytes()
    (folder / "cut.jpg").write_bytes(source[: len(source) // 2])
    (folder / "zeros.jpg").write_bytes(source[:5000] + bytes(1000))
    Image.open(folder / "good.jpg").save(folder.parent / "whole.png")
    png = (folder.parent / "whole.png").read_bytes()
    (folder / "half.png").write_bytes(png[: len(png) // 2])
    return folder


def failed_names(summary):
    return sorted(Path(f["file"]).name for f in summary["failures"])


def classify_some(capsys, folder, tmp_path):
    """`spacer classify --json` (random:5) on a folder where some images fail: (summary, results CSV)."""
    clf = write_classifier(tmp_path / "clf.pkl")
    results = tmp_path / "results.csv"
    code, stdout, _ = cli(
        capsys, "classify", "--weights", cached_weights().path, "--classifier", clf,
        "--points", "random:5", "--images", folder, "--out", results, "--json",
    )  # fmt: skip
    assert code == 1
    return json.loads(stdout), results


def extract_good_one(capsys, folder, points, out):
    """`spacer extract --json` on a folder where only good.jpg can be used: (summary, stderr lines)."""
    code, stdout, err = cli(
        capsys, "extract", "--weights", cached_weights().path, "--points", points,
        "--images", folder, "--out", out, "--json",
    )  # fmt: skip
    assert code == 1
    assert sorted(p.name for p in out.iterdir()) == ["good.jpg.featurevector"]
    return json.loads(stdout), err


@pytest.mark.parametrize("points", ["random:5", "grid:2x2"])
def test_extract_refuses_truncated_images_by_default(damaged, tmp_path, capsys, points):
    summary, err = extract_good_one(capsys, damaged, points, tmp_path / "features")
    assert failed_names(summary) == ["cut.jpg", "half.png", "zeros.jpg"]
    assert all(f["reason"].endswith(TRUNCATED) for f in summary["failures"])
    assert len(err) == 3 and all(line.startswith("spacer extract: ") and TRUNCATED in line for line in err)


def test_extract_with_a_points_csv_refuses_them_too(damaged, tmp_path, capsys):
    points = tmp_path / "points.csv"
    names = sorted(p.name for p in damaged.iterdir())
    points.write_text("Name,Row,Column\n" + "".join(f"{n},10,20\n" for n in names))
    out = tmp_path / "features"
    code, stdout, _ = cli(
        capsys, "extract", "--weights", cached_weights().path, "--points", points,
        "--images", damaged, "--out", out, "--json",
    )  # fmt: skip
    assert code == 1
    assert sorted(p.name for p in out.iterdir()) == ["good.jpg.featurevector"]
    assert failed_names(json.loads(stdout)) == ["cut.jpg", "half.png", "zeros.jpg"]


def test_allow_truncated_decodes_them_as_pyspacer_does(damaged, tmp_path, capsys):
    out = tmp_path / "features"
    code, stdout, _ = cli(
        capsys, "extract", "--allow-truncated", "--weights", cached_weights().path,
        "--points", "random:5", "--images", damaged, "--out", out, "--json",
    )  # fmt: skip
    assert code == 0
    assert len(list(out.iterdir())) == 4 and json.loads(stdout)["failures"] == []


def test_classify_refuses_truncated_images(damaged, tmp_path, capsys):
    summary, results = classify_some(capsys, damaged, tmp_path)
    assert failed_names(summary) == ["cut.jpg", "half.png", "zeros.jpg"]
    assert {row.split(",")[0] for row in results.read_text().splitlines()[1:]} == {"good.jpg"}


def test_bulk_extract_refuses_truncated_images(damaged, tmp_path, capsys):
    manifest = tmp_path / "manifest.csv"
    names = sorted(p.name for p in damaged.iterdir())
    manifest.write_text("Name,Row,Column\n" + "".join(f"{damaged / n},10,20\n" for n in names))
    out = tmp_path / "features"
    code, stdout, _ = cli(
        capsys, "bulk", "extract", "--weights", cached_weights().path, "--manifest", manifest,
        "--out", out, "--json",
    )  # fmt: skip
    assert code == 1
    failed = sorted(
        Path(name).name for name, entry in json.loads(stdout)["outputs"].items() if not entry["ok"]
    )
    assert failed == ["cut.jpg", "half.png", "zeros.jpg"]


def test_an_extract_message_refuses_a_truncated_image(damaged, tmp_path, capsys):
    weights = cached_weights().path
    sha = hashlib.sha256(Path(weights).read_bytes()).hexdigest()
    msg = {
        "job_token": "cut",
        "extractor": extractor_json(weights, sha),
        "rowcols": [[10, 20]],
        "image_loc": {"storage_type": "filesystem", "key": str(damaged / "cut.jpg"), "bucket_name": None},
        "feature_loc": {"storage_type": "filesystem", "key": str(tmp_path / "cut.fv"), "bucket_name": None},
    }
    (tmp_path / "msg.json").write_text(json.dumps(msg))
    code, _, err = cli(capsys, "extract", "--message", tmp_path / "msg.json", "-o", tmp_path / "ret.json")
    assert code == 1 and len(err) == 1 and TRUNCATED in err[0]
    assert not (tmp_path / "cut.fv").exists()


@pytest.fixture()
def unreadable(tmp_path):
    """A good JPEG beside an empty file, random bytes and a text file, all named .jpg."""
    folder = tmp_path / "images"
    folder.mkdir()
    write_image(folder / "good.jpg", seed=1, size=(320, 240))
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "noise.jpg").write_bytes(bytes(range(256)) * 12)
    (folder / "notes.jpg").write_text("field notes, not a photo\n")
    return folder


@pytest.mark.parametrize("points", ["random:20", "stratified:2x2x3", "grid:3x3"])
def test_generated_points_list_an_unreadable_file_and_write_the_others(unreadable, tmp_path, capsys, points):
    summary, err = extract_good_one(capsys, unreadable, points, tmp_path / "features")
    assert summary["images"] == 1
    assert failed_names(summary) == ["empty.jpg", "noise.jpg", "notes.jpg"]
    assert all(f["reason"].startswith("cannot identify image") for f in summary["failures"])
    assert len(err) == 3 and all(line.startswith("spacer extract: image failed: ") for line in err)


def test_classify_with_generated_points_lists_an_unreadable_file(unreadable, tmp_path, capsys):
    summary, results = classify_some(capsys, unreadable, tmp_path)
    assert failed_names(summary) == ["empty.jpg", "noise.jpg", "notes.jpg"]
    assert len(results.read_text().splitlines()) == 6
