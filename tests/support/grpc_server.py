"""The in-process spacer gRPC server of the tests, confined to the tests' data."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from server import testing
from server.config import ServerConfig

# Where test data lives: pytest's temporary folders (under the system temp
# dir) and the committed fixtures. Servers in tests are confined to these,
# as a deployment is confined to its data roots.
TEST_DATA_ROOTS = (
    Path(tempfile.gettempdir()).resolve(),
    Path(__file__).resolve().parent.parent / "fixtures",
)


@contextlib.contextmanager
def running_server(config: ServerConfig | None = None, **overrides: Any) -> Iterator[testing.ServerThread]:
    """Context manager: a started ServerThread, drained on exit.

    Without a config the server may use TEST_DATA_ROOTS (pass data_roots or
    allow_any_path=True to change that).
    """
    base = config or ServerConfig(workers=2, log_level="WARNING", data_roots=TEST_DATA_ROOTS)
    with testing.running_server(base, **overrides) as thread:
        yield thread
