"""The command `spacer serve` prints to try it works, as printed, from another folder.

A real `spacer serve` process has its data root in one temporary folder; the
printed command runs in a shell whose working directory is another one.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.config import ServerConfig
from server.testing import ServeProcess
from shell.serve import demo_command
from tests.support import ROOT

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _printed_command(server: ServeProcess, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(r"to try it, run `([^`]+)` in another shell", server.log())
        if match:
            return match[1]
        time.sleep(0.1)
    raise AssertionError(f"no hint in the server's output:\n{server.log()[-2000:]}")


def _shell(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run command in bash, with `spacer` this tree's CLI (the console script may not be installed)."""
    spacer = f"{shlex.quote(sys.executable)} -m shell"
    script = f'spacer() {{ {spacer} "$@"; }}\n{command}'
    return subprocess.run(
        ["bash", "-c", script],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=540,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_the_hint_changes_into_the_first_data_root(tmp_path):
    root = tmp_path / "my data"
    config = ServerConfig(port=50051, data_roots=(root, tmp_path / "other"))
    assert demo_command(config) == f"cd '{root}' && spacer demo --server 127.0.0.1:50051"
    assert demo_command(ServerConfig(port=7, allow_any_path=True)) == "spacer demo --server 127.0.0.1:7"


@pytest.mark.timeout(900)
def test_the_printed_demo_command_succeeds_from_another_folder(tmp_path):
    data_root = tmp_path / "data root"
    elsewhere = tmp_path / "elsewhere"
    data_root.mkdir()
    elsewhere.mkdir()
    with ServeProcess(data_root, port=_free_port()) as server:
        command = _printed_command(server)
        assert command == f"cd {shlex.quote(str(data_root))} && spacer demo --server {server.address}"

        # The server's policy holds: the same demo without the `cd` is refused, with a way out.
        refused = _shell(f"spacer demo --server {server.address}", elsewhere)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "PERMISSION_DENIED" in refused.stderr
        assert "only under its data roots" in refused.stderr and "cd <data root>" in refused.stderr
        assert not (data_root / "spacer-demo").exists()

        done = _shell(command, elsewhere)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"({server.address})" in done.stdout
    results = data_root / "spacer-demo" / "results.csv"
    assert results.is_file() and len(results.read_text().splitlines()) > 1
