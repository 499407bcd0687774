"""The one atomic file writer: readers see the old file or the new one, never a part.

Bottom layer (imports nothing of ours), so storage, the compile cache and the
server all write through it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

Data = bytes | bytearray | memoryview

# New files get 0o644 minus the umask: what open() gives with the usual umask 022.
FILE_MODE = 0o644

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIR = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _O_CLOEXEC


def write_atomic(path: str | os.PathLike[str], data: Data | str) -> None:
    """Write `data` (text is UTF-8 encoded) to `path` atomically, creating parent folders.

    A temporary `.<name>.<random>.tmp` in the same folder is written, fsynced
    and renamed over `path`. New files get mode 0o644 minus the process umask,
    like a plain ``open(path, 'wb')`` under the usual umask 022; a replaced
    file takes the new file's mode.
    """
    target = Path(path)
    parent = target.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    dir_fd = os.open(parent, _O_DIR)
    try:
        write_atomic_at(dir_fd, target.name, data)
    finally:
        os.close(dir_fd)


def write_atomic_at(dir_fd: int, name: str, data: Data | str) -> None:
    """`write_atomic` for `name` inside the open directory `dir_fd` (no path is resolved again)."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp_name = f".{name}.{secrets.token_hex(6)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | _O_CLOEXEC
    fd = os.open(tmp_name, flags, FILE_MODE, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            # Durable before it is visible: a crash never leaves a renamed but empty file.
            os.fsync(f.fileno())
        os.replace(tmp_name, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name, dir_fd=dir_fd)
        raise
