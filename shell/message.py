"""The pyspacer message form of extract, classify and train: one JSON message in, its return out.

`--message FILE` ('-' = stdin) asks for it; `spacer extract msg.json`, the
older spelling, is turned into `--message` by `shell.main.choose_form`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shell import errors
from spacer_core.exceptions import DataNotFoundError, InvalidInputError

# Options only the CSV forms read: given beside a message they would be silently ignored.
CSV_ONLY = ("weights", "points", "images", "classifier", "annotations", "features", "report")

# (message data, its source) -> (the spacer_core task, the deserialised message)
TaskFor = Callable[[dict[str, Any], str], tuple[Callable[[Any], Any], Any]]


def add_message(parser: argparse.ArgumentParser, message_class: str) -> None:
    """--message FILE on a subcommand whose message is `message_class`."""
    parser.add_argument(
        "--message",
        metavar="FILE",
        help=f"run a pyspacer {message_class} JSON file ('-' = stdin) and write its return message"
        " to --out (default stdout)",
    )


def read_message(source: str) -> dict[str, Any]:
    """The JSON object in `source` (a path, or '-' for stdin)."""
    from spacer_core.data_classes import parse_json

    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except FileNotFoundError:
        raise DataNotFoundError(f"{source}: no such message file") from None
    except OSError as exc:
        raise InvalidInputError(f"{source}: cannot read the message ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise InvalidInputError(f"{source}: not JSON (not UTF-8 text)") from None
    data = parse_json(text, f"{source}: not JSON")
    if not isinstance(data, dict):
        raise InvalidInputError(f"{source}: expected a JSON object")
    return data


def deserialize(message_class: Any, data: dict[str, Any], source: str) -> Any:
    """`message_class.deserialize(data)`, a malformed message becoming an input error naming source."""
    try:
        return message_class.deserialize(data)
    except InvalidInputError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, AssertionError) as exc:
        detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise InvalidInputError(f"{source}: not a {message_class.__name__} ({detail})") from None


def write_output(data: Any, output: Path | None) -> None:
    """JSON to stdout, or to `output` atomically (a reader never sees half a file)."""
    text = json.dumps(data, indent=2) + "\n"
    if output is None:
        sys.stdout.write(text)
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, output)


def run(args: argparse.Namespace, task_for: TaskFor) -> int:
    """Run the message in --message with the task `task_for` picks; `CODE: message` on failure."""
    source = args.message
    try:
        func, msg = task_for(read_message(source), source)
        result = func(msg)
    except Exception as exc:
        print(f"spacer {args.command}: {errors.describe_message_error(exc, source)}", file=sys.stderr)
        return 1
    try:
        write_output(result.serialize(), args.out)
    except OSError as exc:
        print(f"spacer {args.command}: {args.out}: cannot write the result ({exc.strerror})", file=sys.stderr)
        return 1
    return 0
