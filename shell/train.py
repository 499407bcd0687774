"""`spacer train`: a classifier from a CoralNet annotation CSV, or a pyspacer TrainClassifierMsg."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shell import common, message
from shell.progress import Bar
from spacer_core.survey import coralnet, reports
from spacer_core.survey import workflow as survey
from spacer_core.survey.workflow import SurveyError


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """`train --annotations --features --out`, or `train --message FILE`."""
    p = sub.add_parser(
        "train",
        parents=parents,
        help="train a classifier from a CoralNet annotation CSV, or a TrainClassifierMsg JSON",
    )
    # The CSV form takes no positional arguments: this one is the older spelling of --message.
    p.add_argument(
        "inputs", nargs="*", metavar="MESSAGE", help="one FILE.json or '-': the older spelling of --message"
    )
    message.add_message(p, "TrainClassifierMsg")
    common.add_out(p)
    common.add_labelled_features(p)
    p.add_argument("--clf", choices=("MLP", "LR"), default="MLP", help="classifier type (default MLP)")
    p.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    common.add_report(p)
    common.add_json(p)


def _task(data: dict[str, Any], source: str) -> tuple[Callable[[Any], Any], Any]:
    from spacer_core import messages, tasks

    return tasks.train_classifier, message.deserialize(messages.TrainClassifierMsg, data, source)


def run(args: argparse.Namespace) -> int:
    """Store the classifier at --out and print its validation metrics (or run --message)."""
    if args.message is not None:
        return message.run(args, _task)
    common.need(args, "annotations", "features", "out")
    if args.epochs < 1:
        raise SurveyError(f"--epochs {args.epochs}: expected a whole number >= 1")
    annotations = coralnet.read_annotations(args.annotations)
    outcome = survey.train(
        survey.LocalRunner(),
        annotations,
        args.features,
        args.out,
        clf_type=args.clf,
        epochs=args.epochs,
        progress=Bar("train").epochs(args.epochs),
    )
    summary: dict[str, Any] = {
        "classifier": str(Path(args.out).resolve()),
        "valresult": str(outcome.valresult_file),
        "clf_type": args.clf,
        "epochs": args.epochs,
        "points": outcome.counts,
        "ref_accs": list(outcome.result.ref_accs),
        "validation": outcome.metrics.as_dict(),
    }
    common.warn("train", summary, [_dropped_line(outcome.dropped)] if outcome.dropped else [])
    lines = [
        f"trained {args.clf} on {outcome.counts['train']} points ({args.epochs} epochs):"
        f" validation accuracy {outcome.metrics.accuracy * 100:.1f}% on {outcome.counts['val']} points",
        *common.metric_lines(outcome.metrics),
        f"classifier: {summary['classifier']}",
    ]
    if args.report is not None:
        page = reports.training_report(
            args.report,
            outcome.result.ref_accs,
            outcome.metrics,
            {
                "annotations": str(args.annotations),
                "classifier type": args.clf,
                "epochs": args.epochs,
                **{f"{k} points": v for k, v in outcome.counts.items()},
            },
        )
        summary["report"] = str(page)
        lines.append(f"report: {page}")
    status = common.report_failures("train", summary, outcome.skipped, "image left out of training")
    common.emit(args, summary, lines)
    return status


def _dropped_line(dropped: dict[str, int]) -> str:
    shown = ", ".join(f"{label} ({n} point{'s' if n != 1 else ''})" for label, n in dropped.items())
    return (
        f"classes left out of training: {shown}: too few points to split between the training"
        " and reference/validation sets (images are split whole); the classifier will never predict them"
    )
