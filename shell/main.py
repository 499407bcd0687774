"""The `spacer` command: the root parser, the options every command shares, and the dispatch table.

Each subcommand lives in its own module with `add_parser` and `run`. The
commands that work in this process (extract, classify, train, evaluate,
bulk, demo, weights) fail with one line on stderr and exit 1; usage errors
exit 2 with the usage. Ctrl-C stops them with one line and exit 130
(`spacer serve` handles SIGINT itself: it drains, then exits 0).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from types import ModuleType
from typing import NoReturn

# Only light modules here: the subcommand modules pull in torch and ONNX Runtime, which take seconds
# to import, and a Ctrl-C during that time must still end with one line and 130 (see `main`).
from shell import errors, message
from shell.errors import UsageError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# Commands that run library work in this process (or drive a server as their engine).
WORKFLOWS = ("extract", "classify", "train", "evaluate", "bulk", "demo", "weights")
# Commands with a pyspacer message form.
MESSAGE_FORMS = ("extract", "classify", "train")

# command -> (module in `shell`, its function); the modules are imported when the command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("serve", "run_serve"),
    "check-config": ("serve", "run_check_config"),
    "health": ("health", "run"),
    "extract": ("extract", "run"),
    "classify": ("classify", "run"),
    "train": ("train", "run"),
    "evaluate": ("evaluate", "run"),
    "bulk": ("bulk", "run"),
    "demo": ("demo", "run"),
    "weights": ("weights", "run"),
}
# The exit status of a command stopped by Ctrl-C, as shells report SIGINT.
INTERRUPTED = 130


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"shell.{name}")


def command_function(name: str) -> Callable[[argparse.Namespace], int]:
    """The function that runs subcommand `name` (its module is imported on first use)."""
    module, function = COMMANDS[name]
    run: Callable[[argparse.Namespace], int] = getattr(_module(module), function)
    return run


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected one of {', '.join(LOG_LEVELS)}")
    return level


def shared_options() -> argparse.ArgumentParser:
    """The options every survey command takes, declared once (a parent parser)."""
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument(
        "--log-level",
        type=_log_level,
        default=os.environ.get("SPACER_LOG_LEVEL") or "WARNING",
        help="DEBUG, INFO, WARNING (default) or ERROR [SPACER_LOG_LEVEL]",
    )
    shared.add_argument(
        "--allow-truncated",
        action="store_true",
        help="decode a truncated or damaged image as far as its data goes, as pyspacer does"
        " (default: refuse it, a listed failure)",
    )
    return shared


def workflow_runtime(args: argparse.Namespace) -> AbstractContextManager[object]:
    """The runtime a survey command's library work runs under, active for the block.

    The one place the shell decides how images are decoded: a truncated image is
    refused (the server's rule) unless --allow-truncated asks for pyspacer's leniency.
    """
    from dataclasses import replace

    from spacer_core.limits import LIBRARY_DEFAULTS
    from spacer_core.runtime import Runtime, RuntimeSettings

    allow = bool(getattr(args, "allow_truncated", False))
    settings = RuntimeSettings(limits=replace(LIBRARY_DEFAULTS, truncated_images=allow))
    return Runtime(settings).activate()


# What `spacer COMMAND --help` says first, for the commands that do not say it themselves.
DESCRIPTIONS = {
    "extract": "Extract EfficientNet-b0 features of images at their points, one .featurevector file"
    " (pyspacer's format) per image in --out. CSV form: IMAGE... or --images DIR, --weights and"
    " --points. Message form: --message FILE runs a pyspacer ExtractFeaturesMsg.",
    "classify": "Classify the points of images into a CoralNet results CSV at --out: each point's best"
    " label, score and top suggestions; Label is filled where the score reaches --threshold or where"
    " the --points CSV holds a person's label. Message form: --message FILE runs a pyspacer"
    " ClassifyImageMsg or ClassifyFeaturesMsg.",
    "train": "Train a classifier (MLP or LR) on the features `spacer extract` wrote at the points of a"
    " CoralNet annotation CSV. Images are split into train, reference and validation sets as pyspacer"
    " does; the classifier goes to --out, and validation accuracy and per-class metrics are printed."
    " Message form: --message FILE runs a pyspacer TrainClassifierMsg.",
    "evaluate": "Score an existing classifier on newly annotated points whose features `spacer extract`"
    " wrote: accuracy, per-class metrics and the confusion matrix. Nothing is retrained; labels the"
    " classifier does not know count as errors.",
    "bulk": "Extract or classify every image of a manifest (paths, s3:// keys or URLs), in this process"
    " or on Ray. Outputs are written as images finish and --out/_summary.json records each image, so"
    " a rerun resumes where a stopped one left off.",
    "demo": "Build a small synthetic survey (images, CoralNet CSVs, synthetic weights) and run extract,"
    " train, classify and the reports on it, in this process or through a running `spacer serve`.",
}


def build_parser() -> argparse.ArgumentParser:
    """The `spacer` parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="spacer", description="pyspacer-compatible point classification.")
    sub = parser.add_subparsers(dest="command", required=True)
    parents = [shared_options()]
    # serve and check-config take the server's own flags, --log-level among them.
    _module("serve").add_parsers(sub)
    _module("health").add_parser(sub)
    for name in ("extract", "classify", "train", "evaluate", "bulk", "demo", "weights"):
        _module(name).add_parser(sub, parents)
    for name, text in DESCRIPTIONS.items():
        command = sub.choices[name]
        if command.description is None:
            command.description = text
    return parser


def choose_form(args: argparse.Namespace) -> None:
    """Decide, once, whether extract/classify/train run a pyspacer message or the CSV form.

    `--message FILE` asks for the message form. For compatibility, exactly
    one positional argument that ends in `.json` (any case) or is `-` means
    the same (`spacer extract msg.json`). Anything else is the CSV form, its
    positionals images. A message with images or CSV-only options is a
    usage error, not a guess.
    """
    if args.command not in MESSAGE_FORMS:
        return
    inputs = list(args.inputs)
    if (
        args.message is None
        and len(inputs) == 1
        and (inputs[0] == "-" or inputs[0].lower().endswith(".json"))
    ):
        args.message, args.inputs = inputs[0], []
    if args.message is not None:
        if args.inputs:
            raise UsageError(f"{args.command} --message takes no other files (got {' '.join(args.inputs)})")
        extra = [f"--{name}" for name in message.CSV_ONLY if getattr(args, name, None) is not None]
        if extra:
            raise UsageError(
                f"{args.command} --message {args.message}: {', '.join(extra)} belong to the CSV form;"
                " a message names its own files"
            )
    elif args.command == "train" and args.inputs:
        raise UsageError(
            f"train takes no positional files in its CSV form (got {' '.join(args.inputs)});"
            " give --annotations and --features, or --message FILE"
        )


def run_workflow(args: argparse.Namespace) -> int:
    """Run a command that works in this process: a failure is one line and exit 1 (usage errors raise)."""
    from server.logs import setup_logging

    setup_logging(args.log_level)
    try:
        with workflow_runtime(args):
            return command_function(args.command)(args)
    except UsageError:
        raise
    except Exception as exc:
        if interrupt_in(exc) is not None:
            raise
        return errors.report(args.command, exc)


def command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub)command `args` were parsed for: `spacer bulk extract`'s, `spacer serve`'s."""
    chosen = parser
    for dest in ("command", "bulk_command", "weights_command"):
        name = getattr(args, dest, None)
        subcommands = [a for a in chosen._actions if isinstance(a, argparse._SubParsersAction)]
        if name is None or not subcommands or name not in subcommands[0].choices:
            break
        chosen = subcommands[0].choices[name]
    return chosen


def interrupted(exc: KeyboardInterrupt) -> int:
    """Say where a Ctrl-C left the work, in one line, and give the exit status 130.

    Library work that keeps a record of what finished (bulk's summary) raises
    a KeyboardInterrupt with a `message()` saying so; any other Ctrl-C is
    just "interrupted".
    """
    describe = getattr(exc, "message", None)
    text = describe() if callable(describe) else ""
    if getattr(sys.stderr, "isatty", lambda: False)():
        sys.stderr.write("\n")  # past a progress bar drawn without its newline
    print(text if isinstance(text, str) and text else "interrupted", file=sys.stderr, flush=True)
    return INTERRUPTED


def leave_interrupted(exc: KeyboardInterrupt) -> None:
    """Report a Ctrl-C (see `interrupted`) and end the process at once with status 130.

    `os._exit` skips interpreter teardown: torch and ONNX Runtime threads
    still running then can abort the process ("terminate called without an
    active exception", status 134) after the line was printed.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the report
    code = interrupted(exc)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def interrupt_in(exc: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C behind `exc`: Python wraps one raised in some import-time hooks
    (a class's `__set_name__`) in a RuntimeError, so follow causes and contexts."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `spacer` console script and `python -m shell`."""
    try:
        # Building the parser imports every subcommand module (torch among them): inside the guard.
        parser = build_parser()
        args = parser.parse_args(argv)
        try:
            choose_form(args)
            if args.command not in WORKFLOWS:
                return command_function(args.command)(args)
            return run_workflow(args)
        except UsageError as exc:
            # The usage of the command at fault, not the whole tool's.
            command_parser(parser, args).error(str(exc))
    except KeyboardInterrupt as exc:
        leave_interrupted(exc)
        return INTERRUPTED  # not reached: leave_interrupted ends the process
    except Exception as exc:
        interrupt = interrupt_in(exc)
        if interrupt is None:
            raise
        leave_interrupted(interrupt)
        return INTERRUPTED


def console() -> NoReturn:
    """The `spacer` console script and `python -m shell`: `main()`, then exit with its status.

    Once the command has finished, a Ctrl-C while the interpreter shuts down
    (joining threads, unloading torch and ONNX Runtime: up to a second) is
    ignored: the work is done and its status stands. Python gives SIGINT
    back its default action during shutdown, which would kill the process
    by signal without a word.
    """
    code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    console()
