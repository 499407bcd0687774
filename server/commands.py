"""The `spacer` shell forms on CoralNet's files: extract, train, classify, evaluate, demo.

Each command reads CSVs and images, runs spacer_core's survey steps (in
process, or for `demo --server` through a running server) and prints a short
summary, or with `--json` one JSON object for scripts. Progress bars go to
stderr and only when it is a terminal. Failures print one line naming the
file (and row and column) at fault and exit non-zero.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from spacer_core.survey import coralnet, reports
from spacer_core.survey import workflow as survey
from spacer_core.survey.coralnet import CsvFormatError, ResultRow
from spacer_core.survey.workflow import SurveyError

DEFAULT_THRESHOLD = 0.85


class Bar:
    """A one-line progress bar on a terminal; silent when the stream is not one."""

    def __init__(self, what: str, stream: TextIO | None = None, width: int = 28):
        self.what, self.width = what, width
        self.stream = stream or sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.monotonic()

    def __call__(self, done: int, total: int, note: str = "") -> None:
        if not self.live:
            return
        filled = int(self.width * done / max(total, 1))
        elapsed = time.monotonic() - self.start
        self.stream.write(
            f"\r{self.what} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total}"
            f" {elapsed:5.1f}s {note[:30]:<30}"
        )
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()

    def epochs(self, total: int) -> Callable[[int, float, float], None]:
        """A trainer progress callback (0-based epoch, ref accuracy, seconds) drawing this bar."""
        return lambda epoch, acc, _: self(epoch + 1, total, f"ref accuracy {acc * 100:.1f}%")


# ---------------------------------------------------------------- arguments

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


def add_shell_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    """Options of the CSV forms of `name` (message-file forms keep their positional argument)."""
    output = "--json", {"action": "store_true", "help": "print one JSON object on stdout (for scripts)"}
    if name in ("extract", "classify"):
        parser.add_argument("--weights", type=Path, help=WEIGHTS_HELP)
        parser.add_argument(
            "--points",
            help="points CSV (Name, Row, Column) or random:N, stratified:ROWSxCOLSxN, grid:ROWSxCOLS",
        )
        parser.add_argument("--images", type=Path, help="classify/extract every image in this folder")
        parser.add_argument("--seed", type=int, default=0, help="seed of generated points (default 0)")
    if name in ("train", "evaluate"):
        parser.add_argument(
            "--annotations", type=Path, help="CoralNet annotation CSV (Name, Row, Column, Label)"
        )
        parser.add_argument("--features", type=Path, help="folder of <Name>.featurevector files")
    if name in ("classify", "evaluate"):
        parser.add_argument("--classifier", type=Path, help="classifier pickle (from train)")
    if name == "classify":
        parser.add_argument(
            "--threshold",
            type=float,
            default=DEFAULT_THRESHOLD,
            help=f"accept labels scored at least this without review (default {DEFAULT_THRESHOLD})",
        )
    if name == "train":
        parser.add_argument(
            "--clf", choices=("MLP", "LR"), default="MLP", help="classifier type (default MLP)"
        )
        parser.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    if name in ("train", "classify", "evaluate"):
        parser.add_argument("--report", type=Path, help="write an HTML report into this folder")
    parser.add_argument(output[0], **output[1])  # type: ignore[arg-type]


def add_bulk_arguments(parser: argparse.ArgumentParser) -> None:
    """`spacer bulk extract|classify`: a whole manifest, resumable, on the local or the Ray engine."""
    sub = parser.add_subparsers(dest="bulk_command", required=True)
    for name, help_text in (
        ("extract", "a .featurevector per image into --out, and --out/_summary.json"),
        ("classify", "a results CSV at --out (scores kept in --out.parts/ for resuming)"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--weights", type=Path, required=True, help=WEIGHTS_HELP)
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
                default=DEFAULT_THRESHOLD,
                help=f"accept labels scored at least this (default {DEFAULT_THRESHOLD})",
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
        p.add_argument("--log-level", default=os.environ.get("SPACER_LOG_LEVEL") or "WARNING")


def parse_shard(text: str) -> tuple[int, int]:
    """`I/N` -> (i, n) with 0 <= i < n."""
    index, _, count = text.partition("/")
    if not (index.strip().isdigit() and count.strip().isdigit()) or not 0 <= int(index) < int(count):
        raise SurveyError(f"--shard {text!r}: expected I/N with 0 <= I < N, such as 0/4")
    return int(index), int(count)


def is_shell_form(args: argparse.Namespace) -> bool:
    """Whether the arguments ask for the CSV form rather than a message JSON file."""
    if args.command == "evaluate":
        return True
    shell_only = ("weights", "points", "images", "classifier", "annotations", "features", "report")
    return any(getattr(args, name, None) is not None for name in shell_only)


def _need(args: argparse.Namespace, *names: str) -> None:
    missing = [f"--{n}" for n in names if getattr(args, n) is None]
    if missing:
        raise SurveyError(f"missing {', '.join(missing)}")


def _point_source(args: argparse.Namespace) -> survey.PointSource:
    if args.points is None:
        raise SurveyError("missing --points (a points CSV, or random:N, stratified:RxCxN, grid:RxC)")
    text = args.points
    if ":" in text and not Path(text).exists():
        return coralnet.parse_point_spec(text)
    return coralnet.read_points(text)


def _images(args: argparse.Namespace) -> list[Path]:
    return survey.image_files(args.inputs, args.images)


# ---------------------------------------------------------------- output


def _emit(args: argparse.Namespace, summary: dict[str, Any], lines: Sequence[str]) -> None:
    if args.json:
        json.dump(summary, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        sys.stdout.write("".join(f"{line}\n" for line in lines))


def _metric_lines(metrics: reports.ClassMetrics) -> list[str]:
    lines = [f"  {'class':<14} {'precision':>9} {'recall':>7} {'F1':>6} {'support':>8}"]
    for i, c in enumerate(metrics.classes):
        lines.append(
            f"  {c:<14} {metrics.precision[i]:9.3f} {metrics.recall[i]:7.3f}"
            f" {metrics.f1[i]:6.3f} {int(metrics.support[i]):8d}"
        )
    return lines


def results_table(rows: Sequence[ResultRow]) -> list[str]:
    """Per image: points, how many are accepted, the most frequent labels."""
    by_image: dict[str, list[ResultRow]] = {}
    for r in rows:
        by_image.setdefault(r.name, []).append(r)
    lines = [f"  {'image':<24} {'points':>6} {'accepted':>8}  most frequent labels"]
    for name, points in by_image.items():
        common = ", ".join(f"{label} {n}" for label, n in Counter(r.label for r in points).most_common(3))
        accepted = sum(r.accepted for r in points)
        lines.append(f"  {name:<24} {len(points):6d} {accepted:8d}  {common}")
    return lines


def _rows_json(rows: Sequence[ResultRow]) -> list[dict[str, Any]]:
    return [
        {
            "name": r.name,
            "row": r.row,
            "column": r.col,
            "label": r.label,
            "score": r.score,
            "accepted": r.accepted,
            "suggestions": [[label, score] for label, score in r.suggestions],
        }
        for r in rows
    ]


# ---------------------------------------------------------------- commands


def run_extract(args: argparse.Namespace) -> int:
    _need(args, "weights", "out")
    images = _images(args)
    extractor = survey.weights_extractor(args.weights)
    done = survey.extract_images(
        survey.LocalRunner(),
        extractor,
        images,
        _point_source(args),
        args.out,
        seed=args.seed,
        progress=Bar("extract"),
    )
    points = sum(d.points for d in done)
    _emit(
        args,
        {
            "images": len(done),
            "points": points,
            "features": str(args.out),
            "files": [
                {"image": d.image, "points": d.points, "feature_file": str(d.feature_file)} for d in done
            ],
        },
        [f"extracted {points} points of {len(done)} images into {args.out}"],
    )
    return 0


def run_train(args: argparse.Namespace) -> int:
    _need(args, "annotations", "features", "out")
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
    lines = [
        f"trained {args.clf} on {outcome.counts['train']} points ({args.epochs} epochs):"
        f" validation accuracy {outcome.metrics.accuracy * 100:.1f}% on {outcome.counts['val']} points",
        *_metric_lines(outcome.metrics),
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
    _emit(args, summary, lines)
    return 0


def run_classify(args: argparse.Namespace) -> int:
    _need(args, "weights", "classifier", "out")
    if not 0.0 <= args.threshold <= 1.0:
        raise SurveyError(f"--threshold {args.threshold}: expected a score between 0 and 1")
    images = _images(args)
    extractor = survey.weights_extractor(args.weights)
    rows, classes = survey.classify_images(
        survey.LocalRunner(),
        extractor,
        args.classifier,
        images,
        _point_source(args),
        threshold=args.threshold,
        seed=args.seed,
        progress=Bar("classify"),
    )
    coralnet.write_results(args.out, rows)
    accepted = sum(r.accepted for r in rows)
    summary: dict[str, Any] = {
        "results": str(args.out),
        "images": len(images),
        "points": len(rows),
        "accepted": accepted,
        "threshold": args.threshold,
        "classes": classes,
        "rows": _rows_json(rows),
    }
    share = accepted / len(rows) * 100 if rows else 0.0
    lines = [
        f"classified {len(rows)} points of {len(images)} images: {accepted} ({share:.1f}%) scored"
        f" >= {args.threshold:g} and can be accepted without review",
        *results_table(rows),
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
    _emit(args, summary, lines)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    _need(args, "classifier", "annotations", "features")
    metrics = survey.evaluate(args.classifier, coralnet.read_annotations(args.annotations), args.features)
    summary: dict[str, Any] = {"classifier": str(args.classifier), **metrics.as_dict()}
    lines = [
        f"accuracy {metrics.accuracy * 100:.1f}% on {int(metrics.counts.sum())} annotated points",
        *_metric_lines(metrics),
    ]
    if args.report is not None:
        page = reports.evaluation_report(
            args.report, metrics, {"classifier": str(args.classifier), "annotations": str(args.annotations)}
        )
        summary["report"] = str(page)
        lines.append(f"report: {page}")
    _emit(args, summary, lines)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from spacer_core.survey import demo

    runner: survey.Runner
    if args.server:
        from server.client import SpacerClient

        client = SpacerClient(args.server)
        runner = GrpcRunner(client)
    else:
        runner = survey.LocalRunner()
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
        if args.server and _is_permission_denied(exc):
            raise SurveyError(
                f"{args.server} refused the demo's files in {Path(args.folder).resolve()}: a server reads and"
                f" writes only under its data roots (spacer serve --data-root, default its working"
                f" directory). Run the demo from inside one, as `spacer serve` prints:"
                f" cd <data root> && spacer demo --server {args.server}. ({_describe(exc)})"
            ) from exc
        raise
    finally:
        if args.server:
            client.close()
    rows = summary.pop("rows")
    summary["seconds"] = round(time.monotonic() - start, 1)
    summary["via"] = args.server or "in process"
    _emit(
        args,
        summary,
        [
            f"validation accuracy {summary['validation_accuracy'] * 100:.1f}%;"
            f" on the held-out images {summary['held_out_accuracy'] * 100:.1f}%",
            *results_table(rows),
            f"{summary['accepted']} of {summary['points']} points scored >= {summary['threshold']:g}",
            f"results:         {summary['results_csv']}",
            f"training report: {summary['reports']['train']}",
            f"classify report: {summary['reports']['classify']}",
            f"done in {summary['seconds']} s ({summary['via']})",
        ],
    )
    return 0


def run_bulk(args: argparse.Namespace) -> int:
    """`spacer bulk extract|classify`; exit 1 when any image failed (the summary says which)."""
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
    _emit(
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


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "bulk": run_bulk,
    "extract": run_extract,
    "train": run_train,
    "classify": run_classify,
    "evaluate": run_evaluate,
    "demo": run_demo,
}


def run(args: argparse.Namespace) -> int:
    """Run a shell-form command; one line on stderr and exit status 1 on failure."""
    try:
        return COMMANDS[args.command](args)
    except (CsvFormatError, SurveyError) as exc:
        message = str(exc)
    except Exception as exc:
        message = _describe(exc)
    print(f"spacer {args.command}: {message}", file=sys.stderr)
    return 1


def _is_permission_denied(exc: Exception) -> bool:
    import grpc

    return isinstance(exc, grpc.RpcError) and exc.code() == grpc.StatusCode.PERMISSION_DENIED


def _describe(exc: Exception) -> str:
    import grpc

    if isinstance(exc, grpc.RpcError):
        return f"server {exc.code().name}: {exc.details()}"
    from server.errors import describe

    _, message = describe(exc)
    return message


# ---------------------------------------------------------------- over gRPC


class GrpcRunner:
    """The survey steps on a running `spacer serve`; images go inline, files by path."""

    def __init__(self, client: Any):
        self.client = client

    def extract(
        self, extractor: Any, image: Path, rowcols: Sequence[tuple[int, int]], feature_file: Path
    ) -> None:
        self.client.extract_features(extractor, rowcols, image, survey.local(feature_file))

    def train(
        self, labels: Any, model_file: Path, valresult_file: Path, clf_type: str, epochs: int, progress: Any
    ) -> Any:
        from server.client import pb, to_location
        from spacer_core.messages import TrainClassifierReturnMsg

        def image_labels(which: Any) -> Any:
            return pb.ImageLabels(
                images=[
                    pb.ImageAnnotations(
                        feature_loc=to_location(loc),
                        annotations=[pb.Annotation(row=r, col=c, label=_label(v)) for r, c, v in points],
                    )
                    for loc, points in which.items()
                ]
            )

        request = pb.TrainClassifierRequest(
            job_token=model_file.name,
            trainer="minibatch",
            nbr_epochs=epochs,
            clf_type=clf_type,
            labels=pb.TrainingTaskLabels(
                train=image_labels(labels.train), ref=image_labels(labels.ref), val=image_labels(labels.val)
            ),
            model_loc=to_location(survey.local(model_file)),
            valresult_loc=to_location(survey.local(valresult_file)),
        )
        for event in self.client.train_classifier(request):
            if event.HasField("progress") and progress is not None:
                # The stream counts epochs from 1; the library's callback from 0.
                progress(event.progress.epoch - 1, event.progress.ref_accuracy, event.progress.elapsed)
            elif event.HasField("result"):
                r = event.result
                return TrainClassifierReturnMsg(r.acc, list(r.pc_accs), list(r.ref_accs), r.runtime)
        raise SurveyError(f"{self.client.address}: training ended without a result")

    def classify(
        self, extractor: Any, image: Path, rowcols: Sequence[tuple[int, int]], classifier_file: Path
    ) -> tuple[list[Any], list[list[float]]]:
        response = self.client.classify_image(extractor, rowcols, image, survey.local(classifier_file))
        classes = [c.id if c.WhichOneof("value") == "id" else c.name for c in response.classes]
        return classes, [list(p.scores) for p in response.scores]


def _label(value: Any) -> Any:
    from server.client import pb

    return pb.Label(id=value) if isinstance(value, int) else pb.Label(name=str(value))
