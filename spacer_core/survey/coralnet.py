"""CoralNet's files and point layouts: annotation/point CSVs, results CSVs, generated points.

CoralNet exports annotations as CSV with one row per point: `Name` (the
image's file name), `Row` and `Column` (pixel positions, 0-based) and
`Label` (a label code or id); any other columns (dates, aux metadata,
machine suggestions) are ignored here. Its annotation upload reads the same
four columns and takes every `Label` it finds as a confirmed annotation, so
the results CSV written here carries a `Label` only where one may be
uploaded: a label a person gave, or the classifier's top label where its
score reached the threshold. Every other point keeps its row with an empty
`Label`, and the machine's top five guesses go in the columns CoralNet's own
export uses for them (`Machine suggestion N`, `Machine confidence N`).

Points can also be generated as CoralNet's point generation does: simple
random, stratified random (cells x points per cell) and a uniform grid of
cell centres, over the whole image.
"""

from __future__ import annotations

import csv
import io
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from spacer_core.data_classes import Annotation
from spacer_core.exceptions import InvalidInputError
from spacer_core.storage import write_file_atomic

__all__ = [
    "CsvFormatError",
    "PointSpec",
    "PointSpecError",
    "ResultRow",
    "generate_points",
    "parse_point_spec",
    "point_rows",
    "read_annotations",
    "read_point_labels",
    "read_points",
    "result_rows",
    "results_header",
    "write_annotations",
    "write_results",
]

NAME, ROW, COLUMN, LABEL = "Name", "Row", "Column", "Label"
# CoralNet's exports name the label column "Label"; older exports and
# hand-made files sometimes say which form the value takes.
_LABEL_ALIASES = ("Label", "Label code", "Label ID")
# CoralNet keeps and exports five machine suggestions per point.
SUGGESTIONS = 5
SUGGESTION, CONFIDENCE = "Machine suggestion", "Machine confidence"
# The results CSV's Accepted column says who set a point's Label; `person` marks a person's label.
ACCEPTED, ACCEPTED_PERSON = "Accepted", "person"


class CsvFormatError(InvalidInputError):
    """A CSV file cannot be read as CoralNet's format; the message names file, row and column."""

    def __init__(self, path: str | Path, message: str, row: int | None = None, column: str | None = None):
        where = [str(path)]
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        super().__init__(f"{', '.join(where)}: {message}")
        self.path, self.row, self.column, self.reason = str(path), row, column, message

    def __reduce__(self) -> tuple[type[CsvFormatError], tuple[str, str, int | None, str | None]]:
        # Crosses process boundaries (bulk workers) with its fields, not only its text.
        return type(self), (self.path, self.reason, self.row, self.column)


def _header_map(path: Path, header: Sequence[str] | None, wanted: Sequence[str]) -> dict[str, int]:
    """Index of each wanted column (case and surrounding spaces ignored)."""
    if not header:
        raise CsvFormatError(path, "empty file; expected a header row with " + ", ".join(wanted))
    normalised = {h.strip().lower(): i for i, h in reversed(list(enumerate(header)))}
    found: dict[str, int] = {}
    for name in wanted:
        aliases = _LABEL_ALIASES if name == LABEL else (name,)
        index = next((normalised[a.lower()] for a in aliases if a.lower() in normalised), None)
        if index is None:
            listed = ", ".join(h.strip() for h in header)
            hint = ""
            # Excel writes ';' between columns where the locale uses ',' for decimals: one header cell.
            if len(header) == 1 and ";" in header[0]:
                hint = (
                    "; it looks semicolon-separated (as Excel saves in some locales): save as CSV with commas"
                )
            raise CsvFormatError(path, f"missing from the header ({listed}){hint}", row=1, column=name)
        found[name] = index
    return found


def _pixel(path: Path, line: int, column: str, text: str) -> int:
    value = text.strip()
    if not re.fullmatch(r"\d+", value):
        raise CsvFormatError(
            path, f"{text!r} is not a pixel position (a whole number >= 0)", row=line, column=column
        )
    return int(value)


def _rows(
    path: Path, wanted: Sequence[str], may_be_empty: Sequence[str] = ()
) -> Iterable[tuple[int, dict[str, str]]]:
    """(spreadsheet row number, {column: text}) for each non-blank data row.

    A column in `may_be_empty` gives '' for an empty cell instead of an error.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise CsvFormatError(path, "no such file") from None
    except UnicodeDecodeError as err:
        raise CsvFormatError(
            path,
            f"not UTF-8 text ({err.reason} at byte {err.start}); in Excel, save it as 'CSV UTF-8'",
        ) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    columns = _header_map(path, header, wanted)
    for line, values in enumerate(reader, start=2):
        if not any(v.strip() for v in values):
            continue
        cells = {}
        for name, index in columns.items():
            cell = values[index] if index < len(values) else ""
            if not cell.strip() and name not in may_be_empty:
                raise CsvFormatError(path, "empty value", row=line, column=name)
            cells[name] = cell
        yield line, cells


def _header_names(path: Path) -> set[str]:
    """The header's column names, lower case; empty where the file cannot be read (_rows says why)."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            return {h.strip().lower() for h in next(csv.reader(f), [])}
    except (OSError, UnicodeDecodeError, csv.Error):
        return set()


def read_annotations(path: str | Path) -> dict[str, list[Annotation]]:
    """{image name: [(row, col, label), ...]} from a CoralNet annotation CSV, in file order.

    Labels stay text (codes or ids as written). In a file with machine
    suggestion columns (a results CSV, CoralNet's export with suggestions) an
    empty Label is a point nobody has confirmed and is left out, as CoralNet's
    upload leaves it unannotated; elsewhere an empty Label is an error.
    Raises CsvFormatError naming the file, row and column of the first problem.
    """
    path = Path(path)
    out: dict[str, list[Annotation]] = {}
    seen: dict[tuple[str, int, int], int] = {}
    unconfirmed = 0
    may_be_empty = (LABEL,) if f"{SUGGESTION} 1".lower() in _header_names(path) else ()
    for line, cells in _rows(path, (NAME, ROW, COLUMN, LABEL), may_be_empty):
        name = cells[NAME].strip()
        row = _pixel(path, line, ROW, cells[ROW])
        col = _pixel(path, line, COLUMN, cells[COLUMN])
        if not cells[LABEL].strip():
            unconfirmed += 1
            continue
        # pyspacer matches features to labels by (row, col): two labels on
        # one point of an image would make training ambiguous.
        first = seen.setdefault((name, row, col), line)
        if first != line:
            raise CsvFormatError(
                path, f"point ({row}, {col}) of {name} is already labelled on row {first}", row=line
            )
        out.setdefault(name, []).append((row, col, cells[LABEL].strip()))
    if not out:
        detail = f" (all {unconfirmed} points have an empty Label: none is accepted)" if unconfirmed else ""
        raise CsvFormatError(path, "no annotation rows" + detail)
    return out


def read_points(path: str | Path) -> dict[str, list[tuple[int, int]]]:
    """{image name: [(row, col), ...]} from a CSV with Name, Row and Column (Label ignored)."""
    path = Path(path)
    out: dict[str, list[tuple[int, int]]] = {}
    for line, cells in _rows(path, (NAME, ROW, COLUMN)):
        point = (_pixel(path, line, ROW, cells[ROW]), _pixel(path, line, COLUMN, cells[COLUMN]))
        out.setdefault(cells[NAME].strip(), []).append(point)
    if not out:
        raise CsvFormatError(path, "no point rows")
    return out


def point_rows(path: str | Path) -> dict[tuple[str, int, int], int]:
    """{(image name, row, col): spreadsheet row number} of a points CSV, so errors can name the row."""
    path = Path(path)
    out: dict[tuple[str, int, int], int] = {}
    for line, cells in _rows(path, (NAME, ROW, COLUMN)):
        key = (
            cells[NAME].strip(),
            _pixel(path, line, ROW, cells[ROW]),
            _pixel(path, line, COLUMN, cells[COLUMN]),
        )
        out.setdefault(key, line)
    return out


def read_point_labels(path: str | Path) -> dict[str, dict[tuple[int, int], str]]:
    """{image name: {(row, col): label}} for the points of a points CSV that a person labelled.

    Points with an empty Label, and every point of a file without a Label
    column, are absent: nobody has labelled them. In a file with an Accepted
    column (a results CSV fed back in) only rows whose Accepted is `person`
    hold a person's label; a machine suggestion accepted by a threshold
    (`yes`) is scored again. These labels stay in the results CSV whatever
    the classifier scores, so uploading it keeps them.
    """
    path = Path(path)
    names = _header_names(path)
    if names and not any(a.lower() in names for a in _LABEL_ALIASES):
        return {}
    wanted: tuple[str, ...] = (NAME, ROW, COLUMN, LABEL)
    by_machine = ACCEPTED.lower() in names
    if by_machine:
        wanted += (ACCEPTED,)
    out: dict[str, dict[tuple[int, int], str]] = {}
    for line, cells in _rows(path, wanted, may_be_empty=(LABEL, ACCEPTED)):
        label = cells[LABEL].strip()
        if by_machine and cells[ACCEPTED].strip().lower() != ACCEPTED_PERSON:
            continue
        if label:
            point = (_pixel(path, line, ROW, cells[ROW]), _pixel(path, line, COLUMN, cells[COLUMN]))
            out.setdefault(cells[NAME].strip(), {})[point] = label
    return out


def _csv_bytes(header: Sequence[str], rows: Iterable[Sequence[object]]) -> bytes:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


def write_annotations(path: str | Path, annotations: Mapping[str, Sequence[Annotation]]) -> None:
    """Write {image name: [(row, col, label)]} as a CoralNet annotation CSV (atomically)."""
    rows = ((name, r, c, label) for name, points in annotations.items() for r, c, label in points)
    write_file_atomic(path, _csv_bytes((NAME, ROW, COLUMN, LABEL), rows))


@dataclass(frozen=True)
class ResultRow:
    """One classified point: the classifier's best label, its score and its top suggestions.

    `label` is the machine's best guess whether accepted or not (reports and
    summaries show it); `given` is a label a person gave the point in the
    input, if any. What may be uploaded as an annotation is `upload_label`.
    """

    name: str
    row: int
    col: int
    label: str
    score: float
    accepted: bool
    suggestions: list[tuple[str, float]] = field(default_factory=list)
    given: str = ""

    @property
    def accepted_text(self) -> str:
        """The results CSV's Accepted: who set the Label (`person`, `yes` for the machine, `no` for nobody)."""
        if self.given:
            return ACCEPTED_PERSON
        return "yes" if self.accepted else "no"

    @property
    def upload_label(self) -> str:
        """The results CSV's Label: a person's label, else the best label if accepted, else ''."""
        if self.given:
            return self.given
        return self.label if self.accepted else ""


def result_rows(
    name: str,
    rowcols: Sequence[tuple[int, int]],
    classes: Sequence[object],
    scores: Sequence[Sequence[float]],
    threshold: float,
    given: Mapping[tuple[int, int], str] | None = None,
) -> list[ResultRow]:
    """Rows for one image's scores (one probability row per point, in `classes` order).

    A point is accepted when its best score is at least `threshold`, as
    CoralNet's Alleviate accepts confident machine suggestions. `given`
    holds labels a person gave some of these points ({(row, col): label}).
    """
    given = given or {}
    out = []
    for (row, col), probs in zip(rowcols, scores):
        ranked = sorted(zip(classes, probs), key=lambda cp: -cp[1])[:SUGGESTIONS]
        top = [(str(c), float(p)) for c, p in ranked]
        accepted = top[0][1] >= threshold
        out.append(ResultRow(name, row, col, top[0][0], top[0][1], accepted, top, given.get((row, col), "")))
    return out


def results_header() -> list[str]:
    """Columns of the results CSV: CoralNet's upload columns, Score and Accepted, then its suggestion columns."""
    header = [NAME, ROW, COLUMN, LABEL, "Score", ACCEPTED]
    for i in range(1, SUGGESTIONS + 1):
        header += [f"{SUGGESTION} {i}", f"{CONFIDENCE} {i}"]
    return header


def _percent(score: float) -> int:
    # CoralNet stores and exports confidences as whole percents.
    return int(round(score * 100))


def write_results(path: str | Path, rows: Iterable[ResultRow]) -> None:
    """Write the results CSV (atomically); Label only where it may be uploaded (`upload_label`).

    Score keeps four decimals because Accepted compares it with the
    threshold; the machine confidences are whole percents as CoralNet writes them.
    """

    def cells(r: ResultRow) -> list[object]:
        out: list[object] = [r.name, r.row, r.col, r.upload_label, f"{r.score:.4f}", r.accepted_text]
        for i in range(SUGGESTIONS):
            label, score = r.suggestions[i] if i < len(r.suggestions) else ("", None)
            out += [label, "" if score is None else _percent(score)]
        return out

    write_file_atomic(path, _csv_bytes(results_header(), (cells(r) for r in rows)))


# ---------------------------------------------------------------- points


@dataclass(frozen=True)
class PointSpec:
    """How to place points on an image: CoralNet's three point generation types."""

    kind: str  # "random", "stratified" or "grid"
    count: int = 0  # random: number of points
    cell_rows: int = 0  # stratified, grid
    cell_cols: int = 0
    per_cell: int = 0  # stratified

    @property
    def points_per_image(self) -> int:
        if self.kind == "random":
            return self.count
        return self.cell_rows * self.cell_cols * (self.per_cell if self.kind == "stratified" else 1)


_SPEC_FORMS = {
    "random": (re.compile(r"(\d+)"), "random:N"),
    "stratified": (re.compile(r"(\d+)x(\d+)x(\d+)"), "stratified:ROWSxCOLSxPER_CELL"),
    "grid": (re.compile(r"(\d+)x(\d+)"), "grid:ROWSxCOLS"),
}
ACCEPTED_POINTS = "a points CSV (Name, Row, Column) or " + ", ".join(f for _, f in _SPEC_FORMS.values())


class PointSpecError(ValueError):
    """A point generation spec that is none of the accepted forms; the message names the spec."""


def parse_point_spec(text: str) -> PointSpec:
    """`random:50`, `stratified:5x5x2` (cell rows x cell columns x points per cell) or `grid:10x10`.

    Anything else raises PointSpecError naming `text` and the accepted forms.
    """
    kind, _, arg = text.strip().partition(":")
    form = _SPEC_FORMS.get(kind.lower())
    if form is None:
        raise PointSpecError(f"--points {text!r}: not a file, nor a point layout; expected {ACCEPTED_POINTS}")
    match = form[0].fullmatch(arg.strip().lower())
    numbers = [int(n) for n in match.groups()] if match else []
    if not numbers or min(numbers) < 1:
        raise PointSpecError(
            f"--points {text!r}: expected {form[1]} with whole numbers >= 1 (accepted: {ACCEPTED_POINTS})"
        )
    kind = kind.lower()
    if kind == "random":
        return PointSpec(kind, count=numbers[0])
    if kind == "grid":
        return PointSpec(kind, cell_rows=numbers[0], cell_cols=numbers[1])
    return PointSpec(kind, cell_rows=numbers[0], cell_cols=numbers[1], per_cell=numbers[2])


def generate_points(spec: PointSpec, width: int, height: int, seed: int | str = 0) -> list[tuple[int, int]]:
    """(row, col) points for an image of `width` x `height`, placed as CoralNet places them.

    random: each point uniform over the image, sorted by row then column.
    stratified: the image cut into cell_rows x cell_cols cells, per_cell
    points uniform within each cell (sorted within the cell), cells in
    reading order. grid: the centre of each cell, in reading order. Random
    layouts are repeatable for a given `seed` (use the image name to give
    each image its own).
    """
    if width < 1 or height < 1:
        raise ValueError(f"cannot place points on a {width} x {height} image")
    rng = random.Random(f"spacer-points:{seed}")

    def clamp(value: float, top: int) -> int:
        return min(max(int(round(value)), 0), top)

    if spec.kind == "random":
        points = [(rng.randint(0, height - 1), rng.randint(0, width - 1)) for _ in range(spec.count)]
        return sorted(points)
    row_step = height / spec.cell_rows
    col_step = width / spec.cell_cols
    out: list[tuple[int, int]] = []
    for i in range(spec.cell_rows):
        for j in range(spec.cell_cols):
            if spec.kind == "grid":
                out.append((clamp(row_step * (i + 0.5), height - 1), clamp(col_step * (j + 0.5), width - 1)))
                continue
            # A cell spans [start, start + step - 1] in pixel positions.
            r0, c0 = row_step * i, col_step * j
            r1, c1 = max(r0, r0 + row_step - 1), max(c0, c0 + col_step - 1)
            cell = [
                (clamp(rng.uniform(r0, r1), height - 1), clamp(rng.uniform(c0, c1), width - 1))
                for _ in range(spec.per_cell)
            ]
            out.extend(sorted(cell))
    return out
