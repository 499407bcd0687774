"""What the survey commands share: option help, point sources and the summary they print."""

from __future__ import annotations

import argparse
import json
import sys
import unicodedata
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shell.errors import UsageError
from spacer_core.survey import coralnet, reports
from spacer_core.survey import workflow as survey
from spacer_core.survey.coralnet import ResultRow
from spacer_core.survey.workflow import SurveyError

DEFAULT_THRESHOLD = 0.85

WEIGHTS_HELP = (
    "EfficientNet-b0 weights file in CoralNet's format ({'net': state_dict}). CoralNet's trained"
    " weights (efficientnet_b0_ver1.pt) are not public: CoralNet shares them on request. The"
    " weights `spacer demo` makes are synthetic and useless on real photos."
)
# Said once more where no --weights flag exists (spacer serve: each request names its weights).
WEIGHTS_NOTE = (
    "Extractor weights are named by each request (a file, s3 or URL location with its sha256). "
    "CoralNet's EfficientNet weights (efficientnet_b0_ver1.pt) are not public: CoralNet shares them "
    "on request; `spacer demo` makes synthetic weights, useless on real photos."
)


# What --out names, per command: one shared text read as if every command wrote every kind of file.
_OUT_HELP = {
    "extract": "folder for the .featurevector files; with --message, the return message JSON"
    " (default stdout)",
    "classify": "results CSV to write; with --message, the return message JSON (default stdout)",
    "train": "classifier pickle to write (validation results go beside it as .valresult.json);"
    " with --message, the return message JSON (default stdout)",
}
_IMAGES_HELP = {
    "extract": "extract every image in this folder (besides any IMAGE given)",
    "classify": "classify every image in this folder (besides any IMAGE given)",
}
_ANNOTATIONS_HELP = {
    "train": "CoralNet annotation CSV (Name, Row, Column, Label) of the points to train on",
    "evaluate": "CoralNet annotation CSV (Name, Row, Column, Label) of new points: the truth scored against",
}


def _command(parser: argparse.ArgumentParser) -> str:
    # A subcommand parser's prog ends with its name ("spacer train").
    return parser.prog.split()[-1]


def add_out(parser: argparse.ArgumentParser) -> None:
    """-o/--out/--output: the file or folder a survey command (or a message) writes."""
    parser.add_argument(
        "-o",
        "--out",
        "--output",
        dest="out",
        type=Path,
        help=_OUT_HELP.get(_command(parser), "where the result goes"),
    )


def add_json(parser: argparse.ArgumentParser) -> None:
    """--json: the summary as one JSON object on stdout."""
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout (for scripts)")


def add_points(parser: argparse.ArgumentParser) -> None:
    """Where extract and classify take images and their points from."""
    parser.add_argument("--weights", type=Path, help=WEIGHTS_HELP)
    given = "; a Label a person gave stays in the results" if _command(parser) == "classify" else ""
    parser.add_argument(
        "--points",
        type=_points_arg,
        help=f"points CSV (Name, Row, Column{given}) or random:N, stratified:ROWSxCOLSxN, grid:ROWSxCOLS",
    )
    parser.add_argument(
        "--images", type=Path, help=_IMAGES_HELP.get(_command(parser), "every image in this folder")
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of generated points (default 0)")


def _points_arg(text: str) -> str:
    """--points as given; a layout that is no file must parse, so a typo is a usage error (exit 2)."""
    if _is_spec(text):
        try:
            coralnet.parse_point_spec(text)
        except coralnet.PointSpecError as err:
            raise argparse.ArgumentTypeError(str(err).removeprefix("--points ")) from None
    return text


def add_labelled_features(parser: argparse.ArgumentParser) -> None:
    """The annotation CSV and feature folder train and evaluate read."""
    parser.add_argument(
        "--annotations",
        type=Path,
        help=_ANNOTATIONS_HELP.get(_command(parser), "CoralNet annotation CSV (Name, Row, Column, Label)"),
    )
    parser.add_argument(
        "--features", type=Path, help="folder of <Name>.featurevector files (from spacer extract)"
    )


def add_report(parser: argparse.ArgumentParser) -> None:
    """--report DIR: an HTML report."""
    parser.add_argument("--report", type=Path, help="write an HTML report into this folder")


def need(args: argparse.Namespace, *names: str) -> None:
    """A usage error (exit 2) naming every option of `names` that was not given."""
    missing = [f"--{n}" for n in names if getattr(args, n) is None]
    if missing:
        raise UsageError(f"missing {', '.join(missing)}")


def point_source(args: argparse.Namespace) -> survey.PointSource:
    """--points as a points CSV, or as a generation spec when no such file exists."""
    if args.points is None:
        raise UsageError("missing --points (a points CSV, or random:N, stratified:RxCxN, grid:RxC)")
    text = args.points
    if _is_spec(text):
        return coralnet.parse_point_spec(text)
    return coralnet.read_points(text)


def _is_spec(text: str) -> bool:
    # A file wins over a spec of the same spelling: `random:5` may be a CSV's name.
    return ":" in text and not Path(text).exists()


def given_labels(args: argparse.Namespace) -> dict[str, dict[tuple[int, int], str]]:
    """The labels a person gave in a --points CSV ({image: {(row, col): label}}); none for generated points."""
    if args.points is None or _is_spec(args.points):
        return {}
    return coralnet.read_point_labels(args.points)


def images(args: argparse.Namespace) -> list[Path]:
    """The images named as arguments plus those in --images."""
    return survey.image_files(args.inputs, args.images)


def emit(args: argparse.Namespace, summary: dict[str, Any], lines: Sequence[str]) -> None:
    """Print the summary: as JSON with --json, else as lines of text."""
    if args.json:
        json.dump(summary, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        sys.stdout.write("".join(f"{line}\n" for line in lines))


def report_failures(
    command: str, summary: dict[str, Any], failures: Sequence[survey.Failure], what: str = "left out"
) -> int:
    """List inputs that could not be used, one line each on stderr and under "failures"; the exit status."""
    summary["failures"] = _failures_json(failures)
    for f in failures:
        print(f"spacer {command}: {what}: {f.file}: {f.reason}", file=sys.stderr)
    return 1 if failures else 0


def report_missing_images(
    command: str,
    args: argparse.Namespace,
    summary: dict[str, Any],
    points: survey.PointSource,
    images: Sequence[Path],
) -> int:
    """Images a points CSV names that --images DIR lacks: one line on stderr, "missing_images"; the status."""
    missing = survey.missing_images(points, images) if args.images is not None else []
    summary["missing_images"] = missing
    if not missing:
        return 0
    shown = _first_few(missing)
    names = [p.name for p in images]
    near = next((n for n in (survey.near_name(m, names) for m in missing) if n is not None), None)
    hint = f" ({args.images} has '{near[0]}': {near[1]})" if near else ""
    print(
        f"spacer {command}: {args.points} names {len(missing)} image{'s' if len(missing) != 1 else ''}"
        f" not in {args.images} ({shown}); their points were skipped{hint}",
        file=sys.stderr,
    )
    return 1


def point_failures(args: argparse.Namespace, failures: list[survey.Failure]) -> list[survey.Failure]:
    """Failures retold naming the points CSV row of a point outside its image, where that is the cause."""
    if args.points is None or not Path(args.points).is_file():
        return failures
    return survey.name_point_rows(failures, args.points)


def _first_few(names: Sequence[str]) -> str:
    """The first five names, and how many more."""
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _failures_json(failures: Sequence[survey.Failure]) -> list[dict[str, str]]:
    return [{"file": f.file, "reason": f.reason} for f in failures]


def nothing_done(
    command: str, args: argparse.Namespace, err: survey.ImagesFailed, summary: dict[str, Any]
) -> Exception:
    """The error to end a run with when every image failed: one line, the images listed once each.

    With --json the run's summary (`summary`: the command's keys, empty, and its
    missing images) is still printed first, with every failure, so a script
    reads the failures where it reads them otherwise.
    """
    failures = err.failures
    if args.json:
        emit(args, {**summary, "failures": _failures_json(failures)}, [])
    if len(failures) == 1 and failures[0].reason.startswith(f"{args.points}, row "):
        return SurveyError(f"{failures[0].file}: {failures[0].reason}")  # retold by point_failures
    if len(failures) <= 1:
        return err
    reasons = {f.reason for f in failures}
    if len(reasons) == 1:
        shown = _first_few([Path(f.file).name for f in failures])
        return SurveyError(f"all {len(failures)} images failed ({shown}): {reasons.pop()}")
    report_failures(command, {}, failures, "image failed")
    return SurveyError(f"all {len(failures)} images failed (listed above)")


def warn(command: str, summary: dict[str, Any], lines: Sequence[str]) -> None:
    """Warnings on stderr (one line each) and under "warnings" in the summary."""
    summary.setdefault("warnings", []).extend(lines)  # present, if empty, so scripts need not test for it
    for line in lines:
        print(f"spacer {command}: warning: {line}", file=sys.stderr)


def display_width(text: str) -> int:
    """Terminal columns `text` takes: wide (CJK) characters 2, combining marks 0, others 1."""
    return sum(
        0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
        for ch in text
    )


def fit(text: str, width: int) -> str:
    """`text` padded to `width` terminal columns, shortened in the middle with '…' when wider.

    The middle goes because names differ most at their ends (survey prefixes, frame numbers).
    """
    if display_width(text) <= width:
        return text + " " * (width - display_width(text))
    head, tail = "", ""
    left, right = 0, len(text) - 1
    room = width - 1  # the ellipsis takes one column
    while left <= right:
        if display_width(head) <= display_width(tail):
            step = text[left]
            if display_width(head + step) + display_width(tail) > room:
                break
            head, left = head + step, left + 1
        else:
            step = text[right]
            if display_width(head) + display_width(step + tail) > room:
                break
            tail, right = step + tail, right - 1
    short = f"{head}…{tail}"
    return short + " " * (width - display_width(short))


def _column_width(texts: Sequence[str], least: int, most: int) -> int:
    return max(least, min(most, max((display_width(t) for t in texts), default=least)))


def metric_lines(metrics: reports.ClassMetrics) -> list[str]:
    """Per-class precision, recall, F1 and support as a text table."""
    width = _column_width(metrics.classes, 14, 30)
    lines = [f"  {fit('class', width)} {'precision':>9} {'recall':>7} {'F1':>6} {'support':>8}"]
    for i, c in enumerate(metrics.classes):
        lines.append(
            f"  {fit(c, width)} {metrics.precision[i]:9.3f} {metrics.recall[i]:7.3f}"
            f" {metrics.f1[i]:6.3f} {int(metrics.support[i]):8d}"
        )
    return lines


def results_table(rows: Sequence[ResultRow]) -> list[str]:
    """Per image: points, how many are accepted, the most frequent labels."""
    by_image: dict[str, list[ResultRow]] = {}
    for r in rows:
        by_image.setdefault(r.name, []).append(r)
    width = _column_width(list(by_image), 24, 40)
    lines = [f"  {fit('image', width)} {'points':>6} {'accepted':>8}  most frequent labels"]
    for name, points in by_image.items():
        common = ", ".join(f"{label} {n}" for label, n in Counter(r.label for r in points).most_common(3))
        accepted = sum(r.accepted for r in points)
        lines.append(f"  {fit(name, width)} {len(points):6d} {accepted:8d}  {common}")
    return lines


def rows_json(rows: Sequence[ResultRow]) -> list[dict[str, Any]]:
    """Result rows as JSON objects (the --json form of a results CSV)."""
    return [
        {
            "name": r.name,
            "row": r.row,
            "column": r.col,
            "label": r.label,
            "score": r.score,
            "accepted": r.accepted,
            "given": r.given,
            "suggestions": [[label, score] for label, score in r.suggestions],
        }
        for r in rows
    ]
