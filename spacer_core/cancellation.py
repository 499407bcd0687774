"""Stopping long work whose caller has gone: a flag and a deadline checked between steps.

A server runs a training or a job under `cancel_scope(event, deadline)`;
the library calls `check()` between epochs and between a job's tasks, so
the work ends there once the event is set (the call was cancelled) or the
deadline (a `time.monotonic()` instant) has passed. Outside a scope,
`check()` does nothing.

A Ctrl-C is the other way long work stops. Python raises it in the main
thread wherever that thread is, and inside a thread pool's own locking that
can leave a lock held that a worker then waits on for ever (an interrupted
`concurrent.futures.as_completed` holds every future's lock). Code that
waits on threads runs under `HeldInterrupts()`: a Ctrl-C is noted and
raised where that code knows its threads' state.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import AbstractContextManager
from contextvars import ContextVar
from types import FrameType, TracebackType
from typing import Any

from spacer_core import config
from spacer_core.exceptions import DeadlineExceededError


class WorkCancelledError(DeadlineExceededError):
    """The call this work belongs to was cancelled or ran past its deadline."""


_scope: ContextVar[tuple[threading.Event, float | None] | None] = ContextVar("spacer_cancel", default=None)


def cancel_scope(event: threading.Event, deadline: float | None = None) -> AbstractContextManager[Any]:
    """Make `check()` in this context raise once `event` is set or `deadline` has passed."""
    return config.scoped(_scope, (event, deadline))


def check() -> None:
    """Raise WorkCancelledError when the current work should stop."""
    scope = _scope.get()
    if scope is None:
        return
    event, deadline = scope
    if event.is_set():
        raise WorkCancelledError("the call was cancelled; the work stopped")
    if deadline is not None and time.monotonic() > deadline:
        raise WorkCancelledError("the call's deadline passed; the work stopped")


class _Noted:
    """The main thread's held Ctrl-C: how deep the holding blocks are, and whether one came."""

    depth = 0
    noted = False
    raised = False


_held = _Noted()


def _note(signum: int, frame: FrameType | None) -> None:
    if _held.noted:  # a second Ctrl-C: the user wants out now
        _held.raised = True
        signal.default_int_handler(signum, frame)
    _held.noted = True


class HeldInterrupts:
    """Within the block, a Ctrl-C waits for `check()` or the end of the block to raise KeyboardInterrupt.

    Only in the main thread and only where Ctrl-C has Python's own handler
    (a program's own SIGINT handler is left alone); elsewhere `check()` does
    nothing. Blocks nest: the outermost one restores the handler, and raises
    a Ctrl-C still held unless an exception is already on its way. A second
    Ctrl-C raises at once, wherever the main thread is.
    """

    def __init__(self) -> None:
        self._active = False

    def __enter__(self) -> HeldInterrupts:
        if threading.current_thread() is not threading.main_thread():
            return self
        if _held.depth == 0:
            if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
                return self
            signal.signal(signal.SIGINT, _note)
        _held.depth += 1
        self._active = True
        return self

    def check(self) -> None:
        """Raise KeyboardInterrupt if a Ctrl-C came (once: later checks pass); only in the main thread."""
        if (
            self._active
            and _held.noted
            and not _held.raised
            and threading.current_thread() is threading.main_thread()
        ):
            _held.raised = True
            raise KeyboardInterrupt

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._active:
            return
        self._active = False
        _held.depth -= 1
        if _held.depth:
            return
        signal.signal(signal.SIGINT, signal.default_int_handler)
        pending = _held.noted and not _held.raised
        _held.noted = _held.raised = False
        if pending and kind is None:
            raise KeyboardInterrupt
