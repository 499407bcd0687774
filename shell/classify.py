"""`spacer classify`: images into a CoralNet results CSV, or a pyspacer classify message."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from shell import common, message
from shell.extract import IMAGES_HELP
from shell.progress import Bar
from spacer_core.survey import coralnet, reports
from spacer_core.survey import workflow as survey
from spacer_core.survey.coralnet import ResultRow
from spacer_core.survey.workflow import SurveyError


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """`classify [IMAGE...] --weights --classifier --points --out`, or `classify --message FILE`."""
    p = sub.add_parser(
        "classify", parents=parents, help="classify images into a results CSV, or run a message JSON"
    )
    p.add_argument("inputs", nargs="*", metavar="IMAGE", help=IMAGES_HELP)
    message.add_message(p, "ClassifyImageMsg or ClassifyFeaturesMsg")
    common.add_out(p)
    common.add_points(p)
    p.add_argument("--classifier", type=Path, help="classifier pickle (from train)")
    p.add_argument(
        "--threshold",
        type=float,
        default=common.DEFAULT_THRESHOLD,
        help=f"accept labels scored at least this without review (default {common.DEFAULT_THRESHOLD})",
    )
    common.add_report(p)
    common.add_json(p)


def _task(data: dict[str, Any], source: str) -> tuple[Callable[[Any], Any], Any]:
    from spacer_core import messages, tasks

    # An image message names an extractor, a features message does not.
    if "extractor" in data:
        return tasks.classify_image, message.deserialize(messages.ClassifyImageMsg, data, source)
    return tasks.classify_features, message.deserialize(messages.ClassifyFeaturesMsg, data, source)


def run(args: argparse.Namespace) -> int:
    """Write the results CSV at --out and print what can be accepted (or run --message)."""
    if args.message is not None:
        return message.run(args, _task)
    common.need(args, "weights", "classifier", "out")
    if not 0.0 <= args.threshold <= 1.0:
        raise SurveyError(f"--threshold {args.threshold}: expected a score between 0 and 1")
    points = common.point_source(args)  # first: a missing --points is a usage error
    images = common.images(args)
    extractor = survey.weights_extractor(args.weights)
    missing: dict[str, Any] = {}
    status = common.report_missing_images("classify", args, missing, points, images)
    failures: list[survey.Failure] = []
    try:
        rows, classes = survey.classify_images(
            survey.LocalRunner(),
            extractor,
            args.classifier,
            images,
            points,
            threshold=args.threshold,
            seed=args.seed,
            progress=Bar("classify"),
            # Points a person labelled keep that label in the results, whatever the score.
            given=common.given_labels(args),
        )
    except survey.ImagesFailed as err:
        err.failures = common.point_failures(args, err.failures)
        if not err.done or not err.done[0]:  # nothing to show for the run
            empty = _summary(args, [], [], [])
            raise common.nothing_done("classify", args, err, {**empty, **missing}) from None
        (rows, classes), failures = err.done, err.failures
        # The good images' results and report are written; the failed ones are listed.
        failed = {f.file for f in failures}
        images = [p for p in images if str(p.resolve()) not in failed]
    coralnet.write_results(args.out, rows)
    summary = _summary(args, images, rows, classes)
    accepted, person = summary["accepted"], summary["person"]
    share = accepted / len(rows) * 100 if rows else 0.0
    lines = [
        f"classified {len(rows)} points of {len(images)} images: {accepted} ({share:.1f}%) scored"
        f" >= {args.threshold:g} and can be accepted without review"
        + (f"; {person} keep the label a person gave" if person else ""),
        *common.results_table(rows),
        f"results: {args.out}",
    ]
    if args.report is not None:
        page = reports.classification_report(
            args.report,
            {p.name: p.read_bytes() for p in images},
            rows,
            args.threshold,
            classes,
            {"classifier": str(args.classifier), "threshold": args.threshold, "images": len(images)},
        )
        summary["report"] = str(page)
        lines.append(f"report: {page}")
    summary.update(missing)
    status |= common.report_failures("classify", summary, failures, "image failed")
    common.emit(args, summary, lines)
    return status


def _summary(
    args: argparse.Namespace, images: Sequence[Path], rows: Sequence[ResultRow], classes: list[str]
) -> dict[str, Any]:
    """The --json summary of the rows written (none: the keys, empty)."""
    return {
        "results": str(args.out),
        "images": len(images),
        "points": len(rows),
        "accepted": sum(r.accepted and not r.given for r in rows),
        # A person's label is kept whatever the score, so it is counted apart from the machine's.
        "person": sum(bool(r.given) for r in rows),
        "threshold": args.threshold,
        "classes": classes,
        "rows": common.rows_json(rows),
    }
