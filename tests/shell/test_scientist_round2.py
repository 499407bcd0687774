"""Second round of a scientist's findings: Ctrl-C at start-up, files as Excel and macOS leave them,
and CSV Names that almost match an image."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from spacer_core.survey import coralnet, reports, workflow
from spacer_core.survey.coralnet import CsvFormatError
from spacer_core.testing import write_image

ROOT = Path(__file__).resolve().parents[2]
HEADER = "Name,Row,Column,Label\n"


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.3, 1.5])
def test_ctrl_c_while_modules_import_is_one_line_and_130(tmp_path, delay):
    # Start-up imports torch for seconds; a Ctrl-C then is what an impatient user does first.
    proc = subprocess.Popen(
        [sys.executable, "-m", "shell", "extract", "--weights", "w.pt", "--points", "grid:2x2", "x.jpg"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=True,
    )
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 1 and "Traceback" not in err:
        pytest.skip(f"the command finished before the signal: {err}")
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1] == "interrupted", err


def test_a_semicolon_separated_csv_says_to_save_with_commas(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_text("Name;Row;Column;Label\nQ01.JPG;10;20;Sand\n", encoding="utf-8")
    with pytest.raises(CsvFormatError) as caught:
        coralnet.read_annotations(path)
    text = str(caught.value)
    assert "missing from the header (Name;Row;Column;Label)" in text
    assert "looks semicolon-separated (as Excel saves in some locales): save as CSV with commas" in text


def test_a_comma_csv_missing_a_column_gets_no_semicolon_hint(tmp_path):
    path = tmp_path / "short.csv"
    path.write_text("Name,Row,Label;x\nQ01.JPG,10,Sand\n", encoding="utf-8")
    with pytest.raises(CsvFormatError) as caught:
        coralnet.read_annotations(path)
    assert "semicolon" not in str(caught.value)


def test_a_windows_1252_csv_says_to_save_as_csv_utf8(tmp_path):
    path = tmp_path / "cp1252.csv"
    path.write_bytes((HEADER + "Q01.JPG,10,20,Algue calcaire encroûtante\n").encode("cp1252"))
    with pytest.raises(CsvFormatError) as caught:
        coralnet.read_points(path)
    assert "not UTF-8 text" in str(caught.value)
    assert "save it as 'CSV UTF-8'" in str(caught.value)


@pytest.mark.parametrize(
    ("written", "hint"),
    [
        ("q01.jpg", "it has 'q01.jpg': Names must match the file name's case exactly"),
        ("train/Q01.JPG", "it has 'train/Q01.JPG': the Name must be the file name alone"),
        ("C:\\Users\\diver\\Q01.JPG", "it has 'C:\\Users\\diver\\Q01.JPG': the Name must be the file name"),
    ],
)
def test_a_name_off_by_case_or_folder_is_pointed_out(tmp_path, written, hint):
    csv_path = tmp_path / "points.csv"
    csv_path.write_text(f'{HEADER}"{written}",10,20,Sand\n', encoding="utf-8")
    image = write_image(tmp_path / "Q01.JPG", seed=1, size=(64, 48))
    points = coralnet.read_points(csv_path)
    with pytest.raises(workflow.SurveyError) as caught:
        workflow.points_for(image, image.read_bytes(), points)
    assert str(caught.value).startswith("Q01.JPG: no rows with this Name in the points CSV (")
    assert hint in str(caught.value)
    other = write_image(tmp_path / "Q02.JPG", seed=2, size=(64, 48))
    points = {**points, "Q02.JPG": [(1, 2)]}
    items, failed = workflow._plan([image, other], points, 0)
    assert [i.name for i in items] == ["Q02.JPG"] and hint in failed[0].reason


def test_a_name_absent_from_the_csv_keeps_the_plain_message(tmp_path):
    assert workflow.no_rows_message("Q01.JPG", ["Q02.JPG", "train/Q03.JPG"]) == (
        "no rows with this Name in the points CSV"
    )


@pytest.mark.slow
@pytest.mark.parametrize("command", ["extract", "classify"])
def test_a_csv_name_off_by_case_from_an_images_folder_gets_the_case_hint(tmp_path, capsys, command):
    from shell.main import main
    from spacer_core.testing import write_classifier
    from spacer_core.weights.synthetic import cached_weights

    folder = tmp_path / "one"
    folder.mkdir()
    write_image(folder / "good.jpg", seed=1, size=(64, 48))
    points = tmp_path / "points.csv"
    points.write_text("Name,Row,Column\nGood.JPG,10,20\n")
    argv = [command, "--weights", cached_weights().path, "--points", points, "--images", folder]
    if command == "classify":
        argv += ["--classifier", write_classifier(tmp_path / "clf.pkl")]
    code = main([str(a) for a in [*argv, "--out", tmp_path / "out"]])
    missing = [line for line in capsys.readouterr().err.splitlines() if "not in" in line]
    assert code == 1 and len(missing) == 1
    assert missing[0].startswith(f"spacer {command}: {points} names 1 image not in {folder} (Good.JPG)")
    assert missing[0].endswith(f"({folder} has 'good.jpg': Names must match the file name's case exactly)")


def test_dot_files_in_an_images_folder_are_skipped(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    write_image(folder / "Q01.JPG", seed=1, size=(64, 48))
    (folder / "._Q01.JPG").write_bytes(b"\0\0")  # macOS AppleDouble, not a JPEG
    (folder / ".hidden.jpg").write_bytes(b"\0\0")
    assert workflow.image_files(folder=folder) == [folder / "Q01.JPG"]


def _one_image_all_right(points):
    labels = ["Sand", "Turf"] * (points // 2)
    metrics = reports.class_metrics(labels, labels, ["Sand", "Turf"], scores=[0.9] * len(labels))
    return replace(metrics, images=1)


def test_a_suggestion_from_few_points_carries_a_caution_and_a_visible_zero(tmp_path):
    page = reports.training_report(tmp_path, [0.9], _one_image_all_right(50), {}).read_text()
    assert "Suggested --threshold 0.00" in page
    assert "At 0.00 every point is accepted and none goes to review." in page
    assert "only 50 points of 1 image" in page and "uncertain" in page


def test_a_large_validation_set_has_no_caution(tmp_path):
    metrics = _one_image_all_right(400)
    page = reports.evaluation_report(tmp_path, replace(metrics, images=12), {}).read_text()
    assert "Suggested --threshold" in page and "Caution" not in page
    assert "Caution" in reports.evaluation_report(tmp_path / "few", metrics, {}).read_text()


@pytest.mark.slow
def test_serve_on_port_0_prints_the_hint_with_the_bound_port(tmp_path):
    from server.testing import ServeProcess

    with ServeProcess(tmp_path) as server:
        deadline = time.monotonic() + 30
        while "to try it, run" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        log = server.log()
    assert f"--server 127.0.0.1:{server.port}` in another shell" in log, log[-2000:]
    assert log.count("to try it, run") == 1


def test_a_weights_mismatch_names_the_weights_file_beside_the_digests():
    from spacer_core.data_classes import FeatureProvenance, ProvenanceMismatchError
    from spacer_core.task_utils import check_classifier_provenance, record_provenance

    clf = SimpleNamespace()
    record_provenance(clf, FeatureProvenance("EfficientNetExtractor", "a" * 64))
    made = FeatureProvenance("EfficientNetExtractor", "b" * 64)
    with pytest.raises(ProvenanceMismatchError) as caught:
        check_classifier_provenance(clf, made, "clf.pkl", weights="/survey/W2.pt")
    text = str(caught.value)
    assert "classifier clf.pkl was trained on features from weights sha256 aaaaaaaaaaaa..." in text
    assert "but the extractor uses weights sha256 bbbbbbbbbbbb... (file /survey/W2.pt)" in text


def _rows(names_labels):
    # Only what the table reads: ResultRow's other fields are not its concern.
    return [SimpleNamespace(name=name, label=label, accepted=True) for name, label in names_labels]


def test_console_tables_stay_aligned_with_long_and_wide_names():
    from shell import common

    names = ["MooreaLTER_FR3_2019_Q01.JPG", "珊瑚礁の調査_第一地点_画像.jpg", "x" * 80 + "_Q03.JPG", "a.jpg"]
    lines = common.results_table(_rows([(n, "Sand") for n in names]))
    # Every row's counts end in the same terminal column as the header's.
    widths = {common.display_width(line.rsplit(" Sand", 1)[0].rstrip()) for line in lines[1:]}
    assert len(widths) == 1, lines
    assert common.display_width(lines[0].split("  most")[0]) == widths.pop()
    assert "…" in lines[3] and lines[3].rstrip().endswith("Sand 1") and "_Q03.JPG" in lines[3]
    assert common.display_width(common.fit("珊瑚礁の調査", 7)) == 7


def test_the_metrics_table_fits_wide_class_names():
    from shell import common

    labels = ["Algue calcaire encroûtante", "سرطان البحر", "珊瑚", "C" * 60]
    metrics = reports.class_metrics(labels, labels, labels)
    lines = common.metric_lines(metrics)
    widths = {common.display_width(line) for line in lines}
    assert len(widths) == 1, lines
