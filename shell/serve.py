"""`spacer serve` (the gRPC server) and `spacer check-config` (its effective settings)."""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

from server.config import ServerConfig, add_arguments, config_from_args
from shell.common import WEIGHTS_NOTE
from shell.errors import UsageError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """`serve` and `check-config`; both take the server's flags (--log-level among them)."""
    serve = sub.add_parser(
        "serve",
        help="run the gRPC server (default 127.0.0.1:50051)",
        description="Serve spacer.v1.Spacer (and the Open Inference Protocol) over gRPC until SIGTERM or"
        " Ctrl-C, then drain. Every flag can also be set by the SPACER_* variable in brackets; a flag"
        " wins over its variable.",
        epilog=WEIGHTS_NOTE,
    )
    add_arguments(serve)
    check = sub.add_parser(
        "check-config",
        help="print the effective settings and exit",
        description="Print the settings `spacer serve` would run with (the same flags and SPACER_*"
        " variables) and the library's own, then exit: 1 when they do not hold.",
    )
    add_arguments(check)


def _config(args: argparse.Namespace) -> ServerConfig:
    try:
        return config_from_args(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


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


UNLIMITED = "unlimited"


def limits_in_force(config: ServerConfig) -> dict[str, object]:
    """Every bound a served call meets, as it will apply: the server's settings, else the library's.

    Sizes are in bytes (names end in `_bytes`; the flags take MiB); a bound
    that is truly absent reads "unlimited".
    """
    from spacer_core import config as core_config

    # The image bounds the library applies unless the server overrides them.
    library = {
        "max_image_pixels": core_config.MAX_IMAGE_PIXELS,
        "max_points_per_image": core_config.MAX_POINTS_PER_IMAGE,
    }
    limits: dict[str, object] = dict(asdict(config.limits()))
    for name, default in library.items():
        chosen = getattr(config, name, None)
        if limits.get(name) is None:
            limits[name] = chosen if chosen is not None else default
    limits["max_message_bytes"] = config.max_message_bytes
    limits["memory_budget_bytes"] = config.memory_budget_bytes
    limits["url_max_bytes"] = config.url_max_bytes
    limits["url_timeout_seconds"] = config.url_timeout_seconds
    limits["max_queue"] = config.max_queue
    limits["long_work_workers"] = config.long_work_slots
    return {name: UNLIMITED if value is None else value for name, value in sorted(limits.items())}


def effective_settings(config: ServerConfig) -> dict[str, object]:
    """What `check-config` prints: the server's settings, with the limits in force filled in."""
    limits = limits_in_force(config)
    server = config.describe()
    for name, value in server.items():
        if name in limits and value is None:
            server[name] = limits[name]
    return {"server": server, "limits_in_force": limits}


def run_check_config(args: argparse.Namespace) -> int:
    """Print the server's settings and the library's; 1 when the library's do not hold."""
    config = _config(args)
    print(json.dumps(effective_settings(config), indent=2))
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


def _print_hint(config: ServerConfig) -> None:
    print(
        f"spacer serve: to try it, run `{demo_command(config)}` in another shell", file=sys.stderr, flush=True
    )


def _file_identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _hint_when_bound(config: ServerConfig, port_file: Path) -> None:
    """With --port 0 the port is known once the server writes --port-file: print the hint then.

    A file left by an earlier run holds a stale port, so only a file written
    after this point counts (the server replaces it, giving a new identity).
    """
    before = _file_identity(port_file)

    def watch() -> None:
        while True:
            now = _file_identity(port_file)
            if now is not None and now != before:
                try:
                    port = int(port_file.read_text().strip())
                except (OSError, ValueError):
                    port = 0
                if port:
                    _print_hint(replace(config, port=port))
                    return
            time.sleep(0.1)

    threading.Thread(target=watch, name="serve-hint", daemon=True).start()


def run_serve(args: argparse.Namespace) -> int:
    """Serve until stopped; 2 when the settings cannot be used (no CUDA, address in use)."""
    config = _config(args)
    from server.logs import setup_logging

    setup_logging(config.log_level, config.log_format)
    from server.app import serve

    if config.port:
        _print_hint(config)
    elif config.port_file is not None:
        _hint_when_bound(config, config.port_file)
    try:
        asyncio.run(serve(config))
    except (ValueError, OSError) as exc:
        # Settings the parser could not judge (no CUDA, address in use).
        print(f"spacer serve: {exc}", file=sys.stderr)
        return 2
    return 0
