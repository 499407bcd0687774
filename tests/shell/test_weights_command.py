"""`spacer weights imagenet`: offline from a --source file, its failures as one line, its exit codes.

The published file is never downloaded here. A CoralNet-format synthetic
weights file stands in for it (its layout is the one the conversion reads),
with the pinned digest swapped for the stand-in's.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from shell.main import main
from spacer_core.exceptions import URLDownloadError
from spacer_core.extractors import build_network
from spacer_core.weights import imagenet

ROOT = Path(__file__).resolve().parents[2]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def spacer_weights(capsys: pytest.CaptureFixture[str], *argv: Any) -> tuple[int, str, str]:
    code = main(["weights", "imagenet", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_local_source_is_converted_and_its_sha256_printed(
    efficientnet_weights, tmp_path, monkeypatch, capsys
):
    source = efficientnet_weights.path
    monkeypatch.setattr(imagenet, "SOURCE_SHA256", efficientnet_weights.sha256)
    dest = tmp_path / "out" / "imagenet_b0.pt"
    code, out, err = spacer_weights(capsys, "--out", dest, "--source", source)
    assert code == 0, err
    # stdout is the written file's sha256 alone, for scripts; progress went to stderr.
    assert out == f"{sha256(dest)}\n"
    lines = err.splitlines()
    assert lines[0] == f"Reading {source}"
    assert lines[1] == f"sha256 verified: {efficientnet_weights.sha256}"
    assert lines[-1] == f"Wrote {dest} (sha256 {sha256(dest)})"
    state = torch.load(io.BytesIO(dest.read_bytes()), weights_only=True)["net"]
    original = torch.load(io.BytesIO(source.read_bytes()), weights_only=True)["net"]
    assert not state["_fc.weight"].any()
    for key in ("_conv_stem.weight", "_bn1.running_var", "_blocks.15._project_conv.weight"):
        assert torch.equal(state[key], original[f"module.{key}"]), key
    build_network(dest)  # loads as every extractor loads it


def test_a_file_with_another_sha256_is_refused_in_one_line(efficientnet_weights, tmp_path, capsys):
    dest = tmp_path / "w.pt"
    code, out, err = spacer_weights(capsys, "--out", dest, "--source", efficientnet_weights.path)
    assert code == 1 and out == ""
    reading, failure = err.splitlines()
    assert reading == f"Reading {efficientnet_weights.path}"
    assert failure.startswith(f"spacer weights: {efficientnet_weights.path} has sha256 ")
    assert efficientnet_weights.sha256 in failure and imagenet.SOURCE_SHA256 in failure
    assert not dest.exists()


def test_a_file_that_is_not_a_state_dict_is_refused(tmp_path, monkeypatch, capsys):
    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor)
    monkeypatch.setattr(imagenet, "SOURCE_SHA256", sha256(tensor))
    code, _, err = spacer_weights(capsys, "--out", tmp_path / "w.pt", "--source", tensor)
    assert code == 1
    assert err.splitlines()[-1] == (
        f"spacer weights: {tensor} is not an EfficientNet-b0 state dict: found Tensor"
    )
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a pickle")
    monkeypatch.setattr(imagenet, "SOURCE_SHA256", sha256(garbage))
    code, _, err = spacer_weights(capsys, "--out", tmp_path / "w.pt", "--source", garbage)
    assert code == 1 and f"spacer weights: Cannot read {garbage}: not a PyTorch state dict" in err
    code, _, err = spacer_weights(capsys, "--out", tmp_path / "w.pt", "--source", tmp_path / "absent.pth")
    assert code == 1 and f"Cannot read the weights source {tmp_path / 'absent.pth'}" in err
    assert "Traceback" not in err and not (tmp_path / "w.pt").exists()


def test_offline_says_to_pass_the_file_with_source(tmp_path, monkeypatch, capsys):
    def offline(url: str, rules: Any = None, timeout: float = 20.0) -> bytes:
        raise URLDownloadError(f"Failed to download from the URL '{url}'.", OSError("Network is unreachable"))

    monkeypatch.setattr(imagenet, "fetch", offline)
    code, out, err = spacer_weights(capsys, "--out", tmp_path / "w.pt")
    assert code == 1 and out == ""
    downloading, failure = err.splitlines()
    assert downloading == f"Downloading {imagenet.SOURCE_URL}"
    assert failure.startswith("spacer weights: Could not download the ImageNet weights")
    assert "--source FILE" in failure and "Network is unreachable" in failure


@pytest.mark.parametrize("argv", [["weights"], ["weights", "imagenet"], ["weights", "vgg16", "--out", "x"]])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and "usage: spacer weights" in capsys.readouterr().err


def test_help_says_where_the_weights_come_from():
    result = subprocess.run(
        [sys.executable, "-m", "shell", "weights", "imagenet", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "--source FILE" in text and "efficientnet-b0-355c32eb.pth" in text and "sha256" in text


def test_the_command_line_fails_without_a_traceback(efficientnet_weights, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "shell",
            "weights",
            "imagenet",
            "--out",
            str(tmp_path / "w.pt"),
            "--source",
            str(efficientnet_weights.path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 1 and result.stdout == ""
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 2
    assert result.stderr.splitlines()[-1].startswith("spacer weights: ")
