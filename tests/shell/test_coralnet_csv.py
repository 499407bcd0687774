"""CoralNet CSV reading/writing and point generation (spacer_core.survey.coralnet), on real files."""

from __future__ import annotations

import csv

import pytest

from shell.main import main
from spacer_core.survey import coralnet
from spacer_core.survey.coralnet import CsvFormatError, PointSpec, generate_points, parse_point_spec


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_reads_coralnet_export_ignoring_other_columns(tmp_path):
    # As CoralNet exports: a BOM, extra columns, codes and ids mixed, blank line at the end.
    path = write(
        tmp_path / "annotations.csv",
        "\ufeffName,Date,Aux1,Row,Column,Label,Machine suggestion 1\n"
        "a.jpg,2024-01-01,site1,10,20,Porit,Porit\n"
        "a.jpg,2024-01-01,site1,30,40,CCA,Porit\n"
        "b.jpg,2024-01-02,site2,5,6,121,CCA\n\n",
    )
    assert coralnet.read_annotations(path) == {
        "a.jpg": [(10, 20, "Porit"), (30, 40, "CCA")],
        "b.jpg": [(5, 6, "121")],
    }
    assert coralnet.read_points(path) == {"a.jpg": [(10, 20), (30, 40)], "b.jpg": [(5, 6)]}


def test_annotations_round_trip_through_the_writer(tmp_path):
    data = {"x.png": [(1, 2, "A"), (3, 4, "B")], "y.png": [(0, 0, "A")]}
    coralnet.write_annotations(tmp_path / "a.csv", data)
    assert coralnet.read_annotations(tmp_path / "a.csv") == data


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "Name,Row,Label\na.jpg,1,A\n",
            ", row 1, column 'Column': missing from the header (Name, Row, Label)",
        ),
        (
            "Name,Row,Column,Label\na.jpg,1,2,A\na.jpg,x7,2,A\n",
            ", row 3, column 'Row': 'x7' is not a pixel position",
        ),
        ("Name,Row,Column,Label\na.jpg,1,-2,A\n", ", row 2, column 'Column': '-2' is not a pixel position"),
        ("Name,Row,Column,Label\na.jpg,1,2,\n", ", row 2, column 'Label': empty value"),
        (
            "Name,Row,Column,Label\na.jpg,1,2,A\na.jpg,1,2,B\n",
            ", row 3: point (1, 2) of a.jpg is already labelled on row 2",
        ),
        ("", ": empty file"),
        ("Name,Row,Column,Label\n", ": no annotation rows"),
    ],
)
def test_bad_annotation_files_name_file_row_and_column(tmp_path, text, expected):
    path = write(tmp_path / "bad.csv", text)
    with pytest.raises(CsvFormatError) as info:
        coralnet.read_annotations(path)
    assert str(info.value).startswith(f"{path}{expected}")


def test_cli_reports_a_bad_csv_on_one_line_with_nonzero_exit(tmp_path, capsys):
    path = write(tmp_path / "ann.csv", "Name,Row,Column,Label\nimg.jpg,4,oops,A\n")
    code = main(
        ["train", "--annotations", str(path), "--features", str(tmp_path), "--out", str(tmp_path / "c.pkl")]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and "Traceback" not in err
    assert (
        err
        == f"spacer train: {path}, row 2, column 'Column': 'oops' is not a pixel position (a whole number >= 0)\n"
    )


def test_results_csv_has_coralnet_upload_columns_then_scores(tmp_path):
    rows = coralnet.result_rows(
        "a.jpg",
        [(1, 2), (3, 4)],
        ["A", "B", "C", "D"],
        [[0.1, 0.7, 0.15, 0.05], [0.9, 0.05, 0.03, 0.02]],
        threshold=0.8,
    )
    coralnet.write_results(tmp_path / "r.csv", rows)
    with open(tmp_path / "r.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0])[:4] == ["Name", "Row", "Column", "Label"]
    # A point below the threshold keeps its row but no Label: CoralNet would import it as confirmed.
    assert [(t["Row"], t["Label"], t["Score"], t["Accepted"]) for t in table] == [
        ("1", "", "0.7000", "no"),
        ("3", "A", "0.9000", "yes"),
    ]
    assert [table[0][f"Machine suggestion {i}"] for i in (1, 2, 3, 4, 5)] == ["B", "C", "A", "D", ""]
    assert [table[0][f"Machine confidence {i}"] for i in (1, 2, 3, 4, 5)] == ["70", "15", "10", "5", ""]
    # What CoralNet's upload reads back is the label table: the accepted point only.
    assert coralnet.read_annotations(tmp_path / "r.csv") == {"a.jpg": [(3, 4, "A")]}


def test_point_specs_parse_and_reject():
    assert parse_point_spec("random:50") == PointSpec("random", count=50)
    assert parse_point_spec("stratified:5x4x2") == PointSpec(
        "stratified", cell_rows=5, cell_cols=4, per_cell=2
    )
    assert parse_point_spec("grid:10x8") == PointSpec("grid", cell_rows=10, cell_cols=8)
    for bad in ("random:0", "grid:10", "stratified:2x2", "hex:5", "random:many"):
        with pytest.raises(ValueError, match="--points"):
            parse_point_spec(bad)


def test_random_points_are_in_bounds_sorted_and_seeded():
    spec = parse_point_spec("random:200")
    points = generate_points(spec, width=300, height=100, seed="a.jpg")
    assert len(points) == 200 and points == sorted(points)
    assert all(0 <= r < 100 and 0 <= c < 300 for r, c in points)
    assert generate_points(spec, 300, 100, seed="a.jpg") == points
    assert generate_points(spec, 300, 100, seed="b.jpg") != points
    # Spread over the whole image, not a corner.
    assert max(r for r, _ in points) > 80 and max(c for _, c in points) > 250


def test_stratified_points_fall_in_their_cells():
    points = generate_points(parse_point_spec("stratified:2x3x4"), width=300, height=200, seed=1)
    assert len(points) == 24
    for cell in range(6):
        i, j = divmod(cell, 3)
        chunk = points[cell * 4 : cell * 4 + 4]
        assert chunk == sorted(chunk)
        assert all(100 * i <= r <= 100 * i + 99 and 100 * j <= c <= 100 * j + 99 for r, c in chunk)


def test_grid_points_are_cell_centres():
    assert generate_points(parse_point_spec("grid:2x2"), width=200, height=100) == [
        (25, 50),
        (25, 150),
        (75, 50),
        (75, 150),
    ]
    tiny = generate_points(parse_point_spec("grid:4x4"), width=3, height=2)
    assert all(0 <= r < 2 and 0 <= c < 3 for r, c in tiny)
