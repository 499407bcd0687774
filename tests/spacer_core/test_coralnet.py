"""The results CSV is safe to upload to CoralNet: labels only where accepted, suggestions in CoralNet's columns.

CoralNet's annotation upload reads Name, Row, Column and Label and takes
every Label as a confirmed annotation. These tests classify real JPEGs with
EfficientNet weights and a classifier on disk, and read the files back.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from spacer_core.survey import coralnet, workflow
from spacer_core.survey.coralnet import CsvFormatError
from spacer_core.testing import make_survey

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "scientist"
# Between the scores these images get (0.38 to 0.45), so some points are accepted and some are not.
THRESHOLD = 0.42
PERSON = "Person-Porit"  # a label the classifier does not know, so a kept person's label is unmistakable

COLUMNS = ["Name", "Row", "Column", "Label", "Score", "Accepted"] + [
    f"Machine {kind} {i}" for i in range(1, 6) for kind in ("suggestion", "confidence")
]


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def classified(tmp_path_factory):
    """Two images classified through the survey workflow; every third point labelled by a person."""
    folder = tmp_path_factory.mktemp("coralnet")
    s = make_survey(folder, images=2, points=12)
    points = {Path(n).name: p for n, p in coralnet.read_points(s.manifest).items()}
    lines = ["Name,Row,Column,Label"]
    for name, rowcols in points.items():
        lines += [f"{name},{r},{c},{PERSON if i % 3 == 0 else ''}" for i, (r, c) in enumerate(rowcols)]
    points_csv = folder / "points-with-labels.csv"
    points_csv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows, _ = workflow.classify_images(
        workflow.LocalRunner(),
        workflow.weights_extractor(s.weights),
        s.classifier,
        s.images,
        coralnet.read_points(points_csv),
        threshold=THRESHOLD,
        given=coralnet.read_point_labels(points_csv),
    )
    results = folder / "results.csv"
    coralnet.write_results(results, rows)
    return rows, results


def test_header_has_coralnets_suggestion_columns_in_its_order(classified):
    _, results = classified
    header, _ = read_csv(results)
    assert header == COLUMNS
    assert header == coralnet.results_header()


def test_only_accepted_points_carry_a_label(classified):
    rows, results = classified
    _, table = read_csv(results)
    assert [(t["Name"], int(t["Row"]), int(t["Column"])) for t in table] == [
        (r.name, r.row, r.col) for r in rows
    ]
    machine = [t for t in table if t["Label"] != PERSON]
    accepted = [t for t in machine if t["Accepted"] == "yes"]
    # The premise: this threshold splits the machine-labelled points.
    assert accepted and len(accepted) < len(machine)
    for t in machine:
        assert (t["Accepted"] == "yes") == (float(t["Score"]) >= THRESHOLD)
        assert t["Label"] == (t["Machine suggestion 1"] if t["Accepted"] == "yes" else "")


def test_suggestions_and_confidences_are_written_as_coralnet_writes_them(classified):
    _, results = classified
    _, table = read_csv(results)
    for t in table:
        confidences = [int(t[f"Machine confidence {i}"]) for i in (1, 2, 3)]
        assert all(0 <= c <= 100 for c in confidences)
        assert confidences == sorted(confidences, reverse=True)
        assert confidences[0] == round(float(t["Score"]) * 100)
        assert sorted(t[f"Machine suggestion {i}"] for i in (1, 2, 3)) == ["CCA", "Porit", "Sand"]
        # The classifier knows three labels: suggestions 4 and 5 stay empty, as in CoralNet's export.
        assert [t[f"Machine {k} {i}"] for i in (4, 5) for k in ("suggestion", "confidence")] == [""] * 4


def test_a_persons_labels_stay_whatever_the_score(classified):
    rows, results = classified
    _, table = read_csv(results)
    given = [(r, t) for r, t in zip(rows, table) if r.given]
    assert len(given) == 8  # every third of 24 points
    assert all(t["Label"] == PERSON for _, t in given)
    # Accepted says a person set these Labels; the classifier's verdict, on either side of the
    # threshold, does not touch them.
    assert {t["Accepted"] for _, t in given} == {"person"}
    assert {r.accepted for r, _ in given} == {True, False}
    assert all(r.label in ("CCA", "Porit", "Sand") for r, _ in given)


def test_reading_the_results_back_as_annotations_gives_the_accepted_points(classified):
    rows, results = classified
    expected: dict[str, list[tuple[int, int, str]]] = {}
    for r in rows:
        if r.given or r.accepted:
            expected.setdefault(r.name, []).append((r.row, r.col, r.given or r.label))
    assert coralnet.read_annotations(results) == expected
    assert sum(len(v) for v in expected.values()) < len(rows)


def test_upload_label_follows_the_threshold():
    rows = coralnet.result_rows(
        "a.jpg",
        [(1, 2), (3, 4), (5, 6)],
        ["A", "B"],
        [[0.3, 0.7], [0.9, 0.1], [0.6, 0.4]],
        0.8,
        {(5, 6): "C"},
    )
    assert [(r.label, r.accepted, r.upload_label) for r in rows] == [
        ("B", False, ""),
        ("A", True, "A"),
        ("A", False, "C"),
    ]


def test_point_labels_are_read_where_a_person_gave_them():
    assert coralnet.read_point_labels(FIXTURES / "points_partly_labelled.csv") == {
        "reef_01.jpg": {(120, 340): "Porit"},
        "reef_02.jpg": {(300, 410): "CCA"},
    }
    assert coralnet.read_point_labels(FIXTURES / "points_without_labels.csv") == {}


def test_results_fed_back_as_points_keep_only_a_persons_labels(classified):
    rows, results = classified
    _, table = read_csv(results)
    # The premise: the file holds labels of both kinds, a person's and the machine's.
    assert {t["Accepted"] for t in table} == {"person", "yes", "no"}
    expected: dict[str, dict[tuple[int, int], str]] = {}
    for r in rows:
        if r.given:
            expected.setdefault(r.name, {})[(r.row, r.col)] = r.given
    # Machine-accepted labels (`yes`) are suggestions to score again, not a person's labels.
    assert coralnet.read_point_labels(results) == expected


def test_accepted_says_who_set_the_label():
    rows = coralnet.result_rows(
        "a.jpg",
        [(1, 1), (2, 2), (3, 3)],
        ["A", "B"],
        [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]],
        0.85,
        {(3, 3): "P"},
    )
    assert [(r.upload_label, r.accepted_text) for r in rows] == [("A", "yes"), ("", "no"), ("P", "person")]


@pytest.mark.parametrize(
    "reader, fixture, expected",
    [
        (
            coralnet.read_annotations,
            "nothing_accepted_results.csv",
            ": no annotation rows (all 2 points have an empty Label: none is accepted)",
        ),
        (
            coralnet.read_point_labels,
            "labelled_points_bad_row.csv",
            ", row 3, column 'Row': '4.5' is not a pixel position",
        ),
        (coralnet.read_point_labels, "no_such_file.csv", ": no such file"),
    ],
)
def test_bad_files_name_the_file_row_and_column(reader, fixture, expected):
    path = FIXTURES / fixture
    with pytest.raises(CsvFormatError) as info:
        reader(path)
    assert str(info.value).startswith(f"{path}{expected}")
