"""Stopping long work whose caller has gone: a flag and a deadline checked between steps.

A server runs a training or a job under `cancel_scope(event, deadline)`;
the library calls `check()` between epochs and between a job's tasks, so
the work ends there once the event is set (the call was cancelled) or the
deadline (a `time.monotonic()` instant) has passed. Outside a scope,
`check()` does nothing.
"""

from __future__ import annotations

import threading
import time
from contextlib import AbstractContextManager
from contextvars import ContextVar
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
