"""`spacer extract`: features of images at their points (CSV form), or a pyspacer ExtractFeaturesMsg."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from shell import common, message
from shell.progress import Bar
from spacer_core.survey import workflow as survey

IMAGES_HELP = "images (CSV form); one FILE.json or '-' alone is read as --message FILE, the older spelling"


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """`extract [IMAGE...] --weights --points --out`, or `extract --message FILE`."""
    p = sub.add_parser(
        "extract",
        parents=parents,
        help="extract features: images + points CSV (or generated points), or a message JSON",
    )
    p.add_argument("inputs", nargs="*", metavar="IMAGE", help=IMAGES_HELP)
    message.add_message(p, "ExtractFeaturesMsg")
    common.add_out(p)
    common.add_points(p)
    common.add_json(p)


def _task(data: dict[str, Any], source: str) -> tuple[Callable[[Any], Any], Any]:
    from spacer_core import messages, tasks

    return tasks.extract_features, message.deserialize(messages.ExtractFeaturesMsg, data, source)


def run(args: argparse.Namespace) -> int:
    """Write a .featurevector per image into --out (or run --message)."""
    if args.message is not None:
        return message.run(args, _task)
    common.need(args, "weights", "out")
    points = common.point_source(args)  # first: a missing --points is a usage error
    images = common.images(args)
    extractor = survey.weights_extractor(args.weights)
    summary: dict[str, Any] = {}
    status = common.report_missing_images("extract", args, summary, points, images)
    try:
        done = survey.extract_images(
            survey.LocalRunner(), extractor, images, points, args.out, seed=args.seed, progress=Bar("extract")
        )
        failures: list[survey.Failure] = []
    except survey.ImagesFailed as err:
        err.failures = common.point_failures(args, err.failures)
        if not err.done:  # nothing to show for the run
            raise common.nothing_done("extract", args, err, {**_summary(args, []), **summary}) from None
        done, failures = err.done, err.failures
    summary = {**_summary(args, done), **summary}
    status |= common.report_failures("extract", summary, failures, "image failed")
    lines = [f"extracted {summary['points']} points of {len(done)} images into {args.out}"]
    common.emit(args, summary, lines)
    return status


def _summary(args: argparse.Namespace, done: list[survey.ExtractOutcome]) -> dict[str, Any]:
    """The --json summary of the images done (none: the keys, empty)."""
    return {
        "images": len(done),
        "points": sum(d.points for d in done),
        "features": str(args.out),
        "files": [{"image": d.image, "points": d.points, "feature_file": str(d.feature_file)} for d in done],
    }
