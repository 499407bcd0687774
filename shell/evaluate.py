"""`spacer evaluate`: a classifier's accuracy and confusion matrix on new annotations."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from shell import common
from spacer_core.survey import coralnet, reports
from spacer_core.survey import workflow as survey


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """`evaluate --classifier --annotations --features [--report DIR]`."""
    p = sub.add_parser(
        "evaluate", parents=parents, help="accuracy and confusion matrix of a classifier on new annotations"
    )
    # No --out: evaluate writes nothing but its report (--report) and prints (--json for scripts).
    common.add_labelled_features(p)
    p.add_argument("--classifier", type=Path, help="classifier pickle (from train)")
    common.add_report(p)
    common.add_json(p)


def run(args: argparse.Namespace) -> int:
    """Print accuracy and per-class metrics; nothing is retrained."""
    common.need(args, "classifier", "annotations", "features")
    outcome = survey.evaluate_survey(
        args.classifier, coralnet.read_annotations(args.annotations), args.features
    )
    metrics = outcome.metrics
    summary: dict[str, Any] = {"classifier": str(args.classifier), **metrics.as_dict()}
    common.warn("evaluate", summary, outcome.warnings())
    lines = [
        f"accuracy {metrics.accuracy * 100:.1f}% on {int(metrics.counts.sum())} annotated points",
        *common.metric_lines(metrics),
    ]
    if args.report is not None:
        page = reports.evaluation_report(
            args.report, metrics, {"classifier": str(args.classifier), "annotations": str(args.annotations)}
        )
        summary["report"] = str(page)
        lines.append(f"report: {page}")
    status = common.report_failures("evaluate", summary, outcome.skipped, "image left out")
    common.emit(args, summary, lines)
    return status
