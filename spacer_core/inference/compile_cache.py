"""On-disk cache of compiled networks, one artifact per weights file and backend.

Artifacts are keyed by the sha256 of the weights file, so a renamed or
re-downloaded file reuses its compiled form and a changed file never does.
They live in `<EXTRACTORS_CACHE_DIR>/compiled/`, or in the user's cache
directory (`$XDG_CACHE_HOME` or `~/.cache`, then `spacer-core/compiled`)
when that setting is unset. The folder is private (0700, owned by this
user): a compiled network is code the process runs, so no other user may
plant one. Each artifact has a `.sha256` sidecar with the digest of its
bytes, checked on every load; an artifact that does not match (truncated,
edited, or without a sidecar) is rebuilt. Files are written atomically so
a concurrent reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from spacer_core.atomic import write_atomic

# Bump when the way artifacts are built changes, so stale ones are rebuilt.
# 2: EfficientNet's stride-2 pads export an explicit zero value, which ONNX
# Runtime folds into the following convolutions (format 1 kept 5 Pad nodes).
ARTIFACT_FORMAT = 2
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SIDECAR = ".sha256"

# A per-process private folder, used only when no user cache directory is writable.
_fallback_dir: Path | None = None


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Private (0700) directory for compiled artifacts, created if missing."""
    global _fallback_dir
    if override is not None:
        return private_dir(Path(override))
    from spacer_core import config

    base = getattr(config, "EXTRACTORS_CACHE_DIR", None)
    if base:
        return private_dir(Path(base) / "compiled")
    user_cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    try:
        return private_dir(Path(user_cache) / "spacer-core" / "compiled")
    except OSError:
        if _fallback_dir is None:
            # mkdtemp names are unpredictable and owner-only.
            _fallback_dir = Path(tempfile.mkdtemp(prefix="spacer-core-compiled-"))
        return _fallback_dir


def private_dir(folder: Path) -> Path:
    """``folder``, created 0700 if missing; refused if another user owns it."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.stat()
    getuid = getattr(os, "getuid", None)
    if getuid is not None and info.st_uid != getuid():
        raise PermissionError(f"compile cache folder {str(folder)!r} belongs to another user")
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(folder, 0o700)
    return folder


def artifact_path(folder: Path, sha256: str, backend: str, variant: str, suffix: str) -> Path:
    """Path of one compiled artifact, e.g. `<sha>.onnx-exact-cpu.f1.onnx`."""
    sha = sha256.lower()
    if not _SHA256.match(sha):
        raise ValueError(f"Not a sha256 hex digest: {sha256!r}")
    return folder / f"{sha}.{backend}-{variant}.f{ARTIFACT_FORMAT}{suffix}"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + _SIDECAR)


def read_verified(path: Path) -> bytes | None:
    """The artifact's bytes when they match its sidecar digest; None when absent or not matching."""
    try:
        data = path.read_bytes()
        expected = _sidecar(path).read_text().strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    if hashlib.sha256(data).hexdigest() != expected:
        return None
    return data


def store(path: Path, data: bytes) -> None:
    """Write an artifact and then its sidecar digest (both atomically)."""
    write_atomic(path, data)
    write_atomic(_sidecar(path), hashlib.sha256(data).hexdigest().encode())


def load_or_build(path: Path, build: Callable[[], bytes]) -> tuple[bytes, bool]:
    """Bytes of the verified artifact at `path`, building and storing it first if absent or damaged.

    Returns (data, built). Two processes may both build; the last replace wins
    and both results are equal, so no lock is needed.
    """
    data = read_verified(path)
    if data is not None:
        return data, False
    discard(path)
    data = build()
    store(path, data)
    return data, True


def discard(path: Path) -> None:
    """Remove an artifact (and its digest) that failed to load, so the next call rebuilds it."""
    for name in (path, _sidecar(path)):
        with contextlib.suppress(OSError):
            name.unlink()
