"""The `spacer` command: the root parser, the options every command shares, and the dispatch table.

Each subcommand lives in its own module with `add_parser` and `run`. The
survey commands (extract, classify, train, evaluate, bulk, demo) fail with
one line on stderr and exit 1; usage errors exit 2 with the usage.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from shell import bulk, classify, demo, errors, evaluate, extract, health, message, serve, train
from shell.errors import UsageError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# Commands that run the survey workflow in this process (or drive a server as their engine).
WORKFLOWS = ("extract", "classify", "train", "evaluate", "bulk", "demo")
# Commands with a pyspacer message form.
MESSAGE_FORMS = ("extract", "classify", "train")

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": serve.run_serve,
    "check-config": serve.run_check_config,
    "health": health.run,
    "extract": extract.run,
    "classify": classify.run,
    "train": train.run,
    "evaluate": evaluate.run,
    "bulk": bulk.run,
    "demo": demo.run,
}


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
    return shared


def build_parser() -> argparse.ArgumentParser:
    """The `spacer` parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="spacer", description="pyspacer-compatible point classification.")
    sub = parser.add_subparsers(dest="command", required=True)
    parents = [shared_options()]
    # serve and check-config take the server's own flags, --log-level among them.
    serve.add_parsers(sub)
    health.add_parser(sub)
    for module in (extract, classify, train, evaluate, bulk, demo):
        module.add_parser(sub, parents)
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `spacer` console script and `python -m shell`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        choose_form(args)
        if args.command not in WORKFLOWS:
            return COMMANDS[args.command](args)
    except UsageError as exc:
        parser.error(str(exc))
    from server.logs import setup_logging

    setup_logging(args.log_level)
    try:
        return COMMANDS[args.command](args)
    except Exception as exc:
        return errors.report(args.command, exc)


if __name__ == "__main__":
    sys.exit(main())
