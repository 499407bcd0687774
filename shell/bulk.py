"""`spacer bulk extract|classify`: every image of a manifest, resumable, on the local or the Ray engine."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from shell import common
from shell.progress import Bar
from spacer_core.survey.workflow import SurveyError


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """`bulk extract|classify --weights --manifest --out [...]`."""
    parser = sub.add_parser(
        "bulk", help="extract or classify every image of a points manifest (in process, or on Ray)"
    )
    bulk_sub = parser.add_subparsers(dest="bulk_command", required=True)
    for name, help_text in (
        ("extract", "a .featurevector per image into --out, and --out/_summary.json"),
        ("classify", "a results CSV at --out (scores kept in --out.parts/ for resuming)"),
    ):
        p = bulk_sub.add_parser(name, parents=parents, help=help_text)
        p.add_argument("--weights", type=Path, required=True, help=common.WEIGHTS_HELP)
        p.add_argument(
            "--manifest",
            type=Path,
            required=True,
            help="points CSV (Name, Row, Column); Name is a path, s3://bucket/key or an http(s) URL",
        )
        p.add_argument(
            "-o",
            "--out",
            type=Path,
            required=True,
            help="features folder (extract) or results CSV (classify)",
        )
        if name == "classify":
            p.add_argument("--classifier", required=True, help="classifier pickle: a path or s3://bucket/key")
            p.add_argument(
                "--threshold",
                type=float,
                default=common.DEFAULT_THRESHOLD,
                help=f"accept labels scored at least this (default {common.DEFAULT_THRESHOLD})",
            )
        else:
            p.set_defaults(classifier=None, threshold=0.0)
        p.add_argument(
            "--engine",
            choices=("local", "ray"),
            default="local",
            help="local: this process (default); ray: a Ray Data job (pip install '.[ray]')",
        )
        p.add_argument(
            "--ray-address",
            metavar="ADDR",
            help="Ray cluster to join (auto, ray://host:10001); default: start a local one",
        )
        p.add_argument(
            "--actors", type=int, help="network actors on Ray (default: one per GPU, or per 4 CPUs)"
        )
        p.add_argument(
            "--shard",
            default="0/1",
            metavar="I/N",
            help="do only image I of every N, in manifest order (default 0/1: all);"
            " the summary and results CSV name the shard",
        )
        p.add_argument("--overwrite", action="store_true", help="redo images whose output exists")
        p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")


def parse_shard(text: str) -> tuple[int, int]:
    """`I/N` -> (i, n) with 0 <= i < n."""
    index, _, count = text.partition("/")
    if not (index.strip().isdigit() and count.strip().isdigit()) or not 0 <= int(index) < int(count):
        raise SurveyError(f"--shard {text!r}: expected I/N with 0 <= I < N, such as 0/4")
    return int(index), int(count)


def run(args: argparse.Namespace) -> int:
    """Run the manifest; exit 1 when any image failed (the summary says which)."""
    from spacer_core import runtime
    from spacer_core.bulk import local as bulk

    if args.actors is not None and args.actors < 1:
        raise SurveyError(f"--actors {args.actors}: expected a whole number >= 1")
    shard, shards = parse_shard(args.shard)
    items = bulk.plan(args.manifest, shard, shards)
    task = bulk.build_task(
        args.bulk_command,
        args.weights,
        args.out,
        classifier=args.classifier,
        threshold=args.threshold,
        shard=shard,
        shards=shards,
        overwrite=args.overwrite,
    )
    # The engines build their own runtimes from the task: they decode as the shell's does.
    task = dataclasses.replace(task, settings=runtime.current().settings)
    bar = Bar(f"bulk {args.bulk_command}")

    def progress(done: int, total: int, points: int) -> None:
        bar(done, total, f"{points} points")

    if args.engine == "ray":
        try:
            from spacer_core.bulk import ray_engine as bulk_ray
        except ImportError as exc:
            raise SurveyError(
                f"--engine ray needs Ray ({exc}); install it with pip install 'spacer-server[ray]'"
            ) from exc
        options = bulk_ray.RayOptions(address=args.ray_address, actors=args.actors)
        summary = bulk_ray.run(task, items, options, progress)
    else:
        summary = bulk.run(task, items, progress)
    counts = summary.counts()
    report = summary.as_dict()
    report["summary"] = task.summary_location.key
    failures = [f"  {name}: {entry['error']}" for name, entry in report["outputs"].items() if not entry["ok"]]
    common.emit(
        args,
        report,
        [
            f"{args.bulk_command}: {counts['ok']} of {counts['images']} images ok ({counts['skipped']} done before),"
            f" {counts['points_computed']} points computed in {summary.seconds:.1f} s on the {summary.engine} engine",
            *([f"{counts['failed']} images failed:"] + failures if failures else []),
            *([f"results: {summary.results}"] if summary.results else []),
            f"summary: {task.summary_location.key}",
        ],
    )
    return 1 if counts["failed"] else 0
