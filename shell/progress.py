"""The progress bar every long shell command draws on stderr."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


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
