"""`spacer demo`: a small synthetic survey through the whole workflow, in process or on a server."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from shell import common, errors
from shell.progress import Bar
from spacer_core.survey.workflow import SurveyError


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """`demo [DIR] [--server ADDR] [--json]`."""
    demo = sub.add_parser(
        "demo", parents=parents, help="build a small synthetic survey and run the whole workflow on it"
    )
    demo.add_argument(
        "folder",
        nargs="?",
        type=Path,
        default=Path("spacer-demo"),
        help="where to put the survey (default ./spacer-demo)",
    )
    demo.add_argument("--server", metavar="ADDR", help="run through a running `spacer serve` at host:port")
    common.add_json(demo)


def run(args: argparse.Namespace) -> int:
    """Build the survey, extract, train, classify and report; print where everything went."""
    from shell import remote
    from spacer_core.survey import demo

    runner, client = remote.runner(args.server)
    say = (lambda text: None) if args.json else (lambda text: print(f"- {text}", flush=True))
    start = time.monotonic()
    try:
        summary = demo.run_demo(
            args.folder,
            runner,
            step=say,
            progress=Bar("  images"),
            epoch_progress=Bar("  epochs").epochs(demo.EPOCHS),
        )
    except Exception as exc:
        if args.server and errors.is_permission_denied(exc):
            raise SurveyError(
                f"{args.server} refused the demo's files in {Path(args.folder).resolve()}: a server reads and"
                f" writes only under its data roots (spacer serve --data-root, default its working"
                f" directory). Run the demo from inside one, as `spacer serve` prints:"
                f" cd <data root> && spacer demo --server {args.server}. ({errors.describe(exc)})"
            ) from exc
        raise
    finally:
        if client is not None:
            client.close()
    rows = summary.pop("rows")
    summary["seconds"] = round(time.monotonic() - start, 1)
    summary["via"] = args.server or "in process"
    common.emit(
        args,
        summary,
        [
            f"validation accuracy {summary['validation_accuracy'] * 100:.1f}%;"
            f" on the held-out images {summary['held_out_accuracy'] * 100:.1f}%",
            *common.results_table(rows),
            f"{summary['accepted']} of {summary['points']} points scored >= {summary['threshold']:g}",
            f"results:         {summary['results_csv']}",
            f"training report: {summary['reports']['train']}",
            f"classify report: {summary['reports']['classify']}",
            f"done in {summary['seconds']} s ({summary['via']})",
        ],
    )
    return 0
