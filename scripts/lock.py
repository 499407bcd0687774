"""The pinned test environment: make constraints.txt, list requirements, report drift.

Usage:
  python scripts/lock.py lock [--no-deps REQ ...]   # `make lock`: rewrite constraints.txt
  python scripts/lock.py requirements [--build] [EXTRA ...]
                                                    # pyproject's dependencies (and extras), one a line
  python scripts/lock.py moved                      # installed versions that differ from constraints.txt

`lock` resolves pyproject.toml's ranges (dependencies, every optional extra,
the build-system requirements) in a throwaway fresh virtual environment, adds
the `--no-deps` requirements (pyspacer, whose own pins we skip), and freezes
that environment into constraints.txt with an exact `==` for every package,
transitive ones included. `make deps` and `make serve` install with
`pip -c constraints.txt`, so a fresh machine gets the versions the tests
passed with; `pip install .` keeps the ranges. spacer-server itself is never
pinned (it is not installed in the throwaway environment).

`moved` (run by `make test-latest` with the newest-versions environment's
Python) prints `name: pinned -> installed` for each package whose installed
version differs from the pin.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: pip vendors the same parser.
    from pip._vendor import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
CONSTRAINTS = ROOT / "constraints.txt"
# Tools of the virtual environment itself, not of the project.
_NOT_PINNED = {"pip", "spacer-server"}
_PIN_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")


def normalize(name: str) -> str:
    """PEP 503 normal form: case and runs of -_. do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(extras: list[str] | None = None, *, build: bool = False) -> list[str]:
    """pyproject's dependencies, plus the named extras (all of them for None), plus build requirements."""
    data = tomllib.loads(PYPROJECT.read_text())
    optional = data["project"].get("optional-dependencies", {})
    unknown = sorted(set(extras or []) - set(optional))
    if unknown:
        raise SystemExit(f"lock.py: no such extra in pyproject.toml: {', '.join(unknown)}")
    reqs = list(data["project"]["dependencies"])
    for extra in optional if extras is None else extras:
        reqs += optional[extra]
    if build:
        reqs += data["build-system"]["requires"]
    return reqs


def read_pins(path: Path = CONSTRAINTS) -> dict[str, tuple[str, str]]:
    """{normalized name: (name as written, version)} of a constraints file."""
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = _PIN_RE.match(line)
        if match is None:
            raise SystemExit(f"{path}:{number}: not a `name==version` pin: {line!r}")
        pins[normalize(match[1])] = (match[1], match[2])
    return pins


def installed() -> dict[str, tuple[str, str]]:
    """{normalized name: (name, version)} of the distributions this interpreter sees."""
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(normalize(name), (name, dist.version))
    return found


def moved(pins: dict[str, tuple[str, str]], now: dict[str, tuple[str, str]]) -> list[str]:
    """`name: pinned -> installed` for pinned packages whose installed version differs, and new ones."""
    lines = []
    for key in sorted(pins.keys() | now.keys()):
        if key in _NOT_PINNED:
            continue
        pinned = pins.get(key)
        current = now.get(key)
        if pinned and current and pinned[1] != current[1]:
            lines.append(f"{current[0]}: {pinned[1]} -> {current[1]}")
        elif current and not pinned:
            lines.append(f"{current[0]}: (not pinned) -> {current[1]}")
    return lines


def _run(cmd: list[str]) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def lock(no_deps: list[str], out: Path = CONSTRAINTS) -> list[str]:
    """Resolve the ranges in a fresh virtual environment and write its freeze to `out` atomically."""
    with tempfile.TemporaryDirectory(prefix="spacer-lock-") as tmp:
        venv = Path(tmp) / "venv"
        _run([sys.executable, "-m", "venv", str(venv)])
        python = str(venv / "bin" / "python")
        reqs = Path(tmp) / "requirements.txt"
        reqs.write_text("\n".join(requirements(build=True)) + "\n")
        # No constraints here: this is where the new pins come from.
        _run([python, "-m", "pip", "install", "--no-cache-dir", "-r", str(reqs)])
        if no_deps:
            _run([python, "-m", "pip", "install", "--no-cache-dir", "--no-deps", *no_deps])
        frozen = subprocess.run(
            [python, "-m", "pip", "freeze", "--all"], check=True, capture_output=True, text=True
        ).stdout
    pins = []
    for line in frozen.splitlines():
        match = _PIN_RE.match(line.strip())
        if match is None:
            raise SystemExit(f"lock.py: unexpected `pip freeze` line {line!r}")
        if normalize(match[1]) not in _NOT_PINNED:
            pins.append(f"{match[1]}=={match[2]}")
    pins.sort(key=str.lower)
    header = [
        "# Exact versions of the test environment: `make deps` and `make serve` install with `pip -c` this file.",
        "# Generated by `make lock` (scripts/lock.py) from pyproject.toml's ranges; do not edit by hand.",
        f"# Resolved {datetime.now(UTC):%Y-%m-%d} on Python {platform.python_version()},"
        f" {platform.system()} {platform.machine()}.",
    ]
    if no_deps:
        header.append(f"# Installed with --no-deps: {' '.join(no_deps)}")
    tmp_out = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp_out.write_text("\n".join(header + pins) + "\n")
    os.replace(tmp_out, out)
    return pins


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    lock_p = sub.add_parser("lock", help="rewrite constraints.txt from a fresh resolution")
    lock_p.add_argument(
        "--no-deps",
        nargs="*",
        default=[],
        metavar="REQ",
        help="requirements installed without their dependencies (pinned too)",
    )
    req_p = sub.add_parser("requirements", help="print pyproject's requirements, one a line")
    req_p.add_argument("--build", action="store_true", help="add the build-system requirements (maturin)")
    req_p.add_argument("extras", nargs="*", help="optional extras to add")
    sub.add_parser("moved", help="print installed packages whose version differs from constraints.txt")
    args = parser.parse_args(argv)
    if args.command == "lock":
        pins = lock(args.no_deps)
        print(f"wrote {CONSTRAINTS.relative_to(ROOT)}: {len(pins)} pins")
    elif args.command == "requirements":
        print("\n".join(requirements(args.extras, build=args.build)))
    else:
        lines = moved(read_pins(), installed())
        print(f"{len(lines)} packages differ from {CONSTRAINTS.name}" + (":" if lines else "."))
        for line in lines:
            print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
