"""Real spacer servers for tests and benchmarks: in this process on a loopback port, or as a subprocess.

`running_server(config)` starts `create_server` on its own event-loop thread;
`ServeProcess(workdir, *flags)` runs `python -m shell serve`, for checks of
the server's own threads and memory (`status()` reads them from /proc).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from server.app import create_server, drain, start
from server.config import ServerConfig
from spacer_core.testing import ProcStatus, proc_status

# The folder holding the `server` package, for the subprocess's import path.
PACKAGE_ROOT = Path(__file__).resolve().parent.parent


class ServerThread:
    """Starts create_server(config) on port 0 in a background loop; `address` once up."""

    def __init__(self, config: ServerConfig):
        self.config = replace(config, port=0)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: Any = None
        self.port = 0

    def _run(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> ServerThread:
        """Start the loop thread and the server on it; returns self once it listens."""
        self._thread.start()

        async def up() -> tuple[Any, int]:
            server, port = create_server(self.config)
            await start(server)
            return server, port

        self.server, self.port = self._run(up())
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, grace: float = 0) -> None:
        """Drain the server (`grace` seconds for calls in flight), then stop its loop."""
        with contextlib.suppress(Exception):
            self._run(drain(self.server, grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@contextlib.contextmanager
def running_server(config: ServerConfig, **overrides: Any) -> Iterator[ServerThread]:
    """Context manager: a started ServerThread on `config` with `overrides`, drained on exit."""
    if overrides.get("allow_any_path"):
        overrides.setdefault("data_roots", ())
    thread = ServerThread(replace(config, **overrides)).start()
    try:
        yield thread
    finally:
        thread.stop()


class ServeProcess:
    """`python -m shell serve --port 0` in `workdir` (also its data root), logging to workdir/serve.log."""

    def __init__(self, workdir: Path, *args: str, env: dict[str, str] | None = None, port: int = 0):
        self.workdir = Path(workdir)
        self.args = args
        self.env = {**os.environ, **(env or {}), "PYTHONPATH": str(PACKAGE_ROOT)}
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120) -> ServeProcess:
        """Start the server and wait (up to `timeout` s) for its port file; returns self."""
        port_file = self.workdir / "port"
        port_file.unlink(missing_ok=True)
        log = open(self.workdir / "serve.log", "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "shell",
                "serve",
                "--port",
                str(self.port),
                "--port-file",
                str(port_file),
                "--data-root",
                str(self.workdir),
                *self.args,
            ],
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"spacer serve did not start:\n{self.log()[-4000:]}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def status(self) -> ProcStatus:
        """The server process's memory, threads and CPU time now."""
        return proc_status(self.pid)

    def log(self) -> str:
        """What the server has logged so far."""
        path = self.workdir / "serve.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 30 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
