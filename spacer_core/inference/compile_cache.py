"""On-disk cache of compiled networks, one artifact per weights file and backend.

Artifacts are keyed by the sha256 of the weights file, so a renamed or
re-downloaded file reuses its compiled form and a changed file never does.
They live in `<EXTRACTORS_CACHE_DIR>/compiled/`, or in a per-user temporary
directory when that setting is unset, and are written atomically so a
concurrent reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

# Bump when the way artifacts are built changes, so stale ones are rebuilt.
ARTIFACT_FORMAT = 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Directory for compiled artifacts (created if missing)."""
    if override is not None:
        folder = Path(override)
    else:
        from spacer_core import config

        base = getattr(config, "EXTRACTORS_CACHE_DIR", None)
        if base:
            folder = Path(base) / "compiled"
        else:
            folder = Path(tempfile.gettempdir()) / f"spacer-core-compiled-{_user_tag()}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _user_tag() -> str:
    getuid = getattr(os, "getuid", None)
    return str(getuid()) if getuid is not None else "user"


def artifact_path(folder: Path, sha256: str, backend: str, variant: str, suffix: str) -> Path:
    """Path of one compiled artifact, e.g. `<sha>.onnx-exact-cpu.f1.onnx`."""
    sha = sha256.lower()
    if not _SHA256.match(sha):
        raise ValueError(f"Not a sha256 hex digest: {sha256!r}")
    return folder / f"{sha}.{backend}-{variant}.f{ARTIFACT_FORMAT}{suffix}"


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same directory and os.replace."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes owner-only files; artifacts are not secret.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_or_build(path: Path, build: Callable[[], bytes]) -> tuple[bytes, bool]:
    """Bytes of the artifact at `path`, building and storing it first if absent.

    Returns (data, built). Two processes may both build; the last replace wins
    and both results are equal, so no lock is needed.
    """
    try:
        return path.read_bytes(), False
    except FileNotFoundError:
        pass
    data = build()
    write_atomic(path, data)
    return data, True


def discard(path: Path) -> None:
    """Remove an artifact that failed to load, so the next call rebuilds it."""
    with contextlib.suppress(OSError):
        path.unlink()

