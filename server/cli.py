"""The `spacer` command: serve, tasks on CoralNet CSVs or pyspacer JSON messages, demo, check-config."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from server.commands import WEIGHTS_NOTE, add_bulk_arguments, add_shell_arguments, is_shell_form
from server.config import ServerConfig, add_arguments, config_from_args


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spacer", description="pyspacer-compatible point classification.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gRPC server (default 127.0.0.1:50051)", epilog=WEIGHTS_NOTE)
    add_arguments(serve)

    check = sub.add_parser("check-config", help="print the effective settings and exit")
    add_arguments(check)

    health = sub.add_parser(
        "health", help="ask a server's gRPC health service; exit 0 when SERVING (container probes)"
    )
    health.add_argument("address", nargs="?", default="127.0.0.1:50051", help="host:port")
    health.add_argument("--service", default="", help="service to ask about; default: the server")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")

    for name, help_text in (
        ("extract", "extract features: images + points CSV (or generated points), or a message JSON"),
        ("classify", "classify images into a results CSV, or run a message JSON"),
        ("train", "train a classifier from a CoralNet annotation CSV, or a TrainClassifierMsg JSON"),
        ("evaluate", "accuracy and confusion matrix of a classifier on new annotations"),
    ):
        task = sub.add_parser(name, help=help_text)
        if name != "evaluate":
            task.add_argument(
                "inputs",
                nargs="*",
                metavar="IMAGE_OR_MESSAGE",
                help="images (CSV forms), or one pyspacer message JSON file ('-' = stdin)",
            )
        task.add_argument(
            "-o",
            "--out",
            "--output",
            dest="out",
            type=Path,
            help="where the result goes: features folder, classifier, results CSV or return message JSON",
        )
        add_shell_arguments(name, task)
        task.add_argument("--log-level", default=os.environ.get("SPACER_LOG_LEVEL") or "WARNING")

    bulk = sub.add_parser(
        "bulk", help="extract or classify every image of a points manifest (in process, or on Ray)"
    )
    add_bulk_arguments(bulk)

    demo = sub.add_parser("demo", help="build a small synthetic survey and run the whole workflow on it")
    demo.add_argument(
        "folder",
        nargs="?",
        type=Path,
        default=Path("spacer-demo"),
        help="where to put the survey (default ./spacer-demo)",
    )
    demo.add_argument("--server", metavar="ADDR", help="run through a running `spacer serve` at host:port")
    demo.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    demo.add_argument("--log-level", default=os.environ.get("SPACER_LOG_LEVEL") or "WARNING")
    return parser


def _setup_logging(level: str) -> None:
    from server.logs import setup_logging

    setup_logging(level)


def _read_json(path: Path) -> Any:
    from spacer_core.data_classes import parse_json

    text = sys.stdin.read() if str(path) == "-" else path.read_text()
    return parse_json(text, f"{path}: not JSON")


def _write_output(data: Any, output: Path | None) -> None:
    text = json.dumps(data, indent=2) + "\n"
    if output is None:
        sys.stdout.write(text)
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, output)


def _task_for(command: str, data: dict[str, Any]) -> tuple[Callable[[Any], Any], Any]:
    """The spacer_core task and deserialised message for a subcommand."""
    from spacer_core import messages, tasks

    if command == "extract":
        return tasks.extract_features, messages.ExtractFeaturesMsg.deserialize(data)
    if command == "train":
        return tasks.train_classifier, messages.TrainClassifierMsg.deserialize(data)
    # classify: an image message names an extractor, a features message does not.
    if "extractor" in data:
        return tasks.classify_image, messages.ClassifyImageMsg.deserialize(data)
    return tasks.classify_features, messages.ClassifyFeaturesMsg.deserialize(data)


def _run_task(args: argparse.Namespace) -> int:
    from server.errors import describe

    _setup_logging(args.log_level)
    if len(args.inputs) != 1:
        print(
            f"spacer {args.command}: give one message JSON file, or the CSV form's options"
            f" (see spacer {args.command} --help)",
            file=sys.stderr,
        )
        return 2
    message = Path(args.inputs[0])
    try:
        data = _read_json(message)
        if not isinstance(data, dict):
            raise ValueError(f"{message}: expected a JSON object")
        func, msg = _task_for(args.command, data)
        result = func(msg)
    except Exception as exc:
        code, text = describe(exc, str(message))
        print(f"spacer {args.command}: {code.name}: {text}", file=sys.stderr)
        return 1
    _write_output(result.serialize(), args.out)
    return 0


def _check_config(config: ServerConfig) -> int:
    print(json.dumps({"server": config.describe()}, indent=2))
    try:
        from spacer_core import config as core_config
        from spacer_core.inference.precision import fast_cpu_status

        print("spacer_core settings:")
        core_config.check()
        print(fast_cpu_status())
    except Exception as exc:
        print(f"spacer_core settings: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


_TASKS = ("extract", "classify", "train", "evaluate")


def _health(args: argparse.Namespace) -> int:
    """Print the serving status; 0 for SERVING, 1 otherwise (NOT_SERVING, unreachable, unknown)."""
    import grpc

    from server.client import SpacerClient

    with SpacerClient(args.address, timeout=args.timeout) as client:
        try:
            status = client.health(args.service)
        except grpc.RpcError as exc:
            print(f"{args.address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(f"{args.address}: {status}")
    return 0 if status == "SERVING" else 1


def demo_command(config: ServerConfig) -> str:
    """The shell command that tries this server with `spacer demo`, working from any folder.

    The demo names its files by path, and the server reads and writes only
    under its data roots, so the command first changes into the first one.
    """
    command = f"spacer demo --server {config.client_address}"
    roots = config.effective_data_roots()
    if roots is None:  # allow_any_path
        return command
    return f"cd {shlex.quote(str(roots[0]))} && {command}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `spacer` console script and `python -m server`."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command == "health":
        return _health(args)
    if args.command in ("demo", "bulk") or (args.command in _TASKS and is_shell_form(args)):
        from server.commands import run

        _setup_logging(args.log_level)
        return run(args)
    if args.command in _TASKS:
        return _run_task(args)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    if args.command == "check-config":
        return _check_config(config)
    from server.logs import setup_logging

    setup_logging(config.log_level, config.log_format)
    from server.app import serve

    if config.port:
        print(
            f"spacer serve: to try it, run `{demo_command(config)}` in another shell",
            file=sys.stderr,
            flush=True,
        )
    try:
        asyncio.run(serve(config))
    except (ValueError, OSError) as exc:
        # Settings the parser could not judge (no CUDA, address in use).
        print(f"spacer serve: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
