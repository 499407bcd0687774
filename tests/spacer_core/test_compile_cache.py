"""The compiled-network cache: a private folder, and artifacts checked against their digest on every load."""

from __future__ import annotations

import os
import stat

import pytest

from spacer_core import config
from spacer_core.inference import compile_cache

SHA = "ab" * 32


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_folder_is_private_under_the_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "EXTRACTORS_CACHE_DIR", str(tmp_path / "extractors"))
    folder = compile_cache.cache_dir()
    assert folder == tmp_path / "extractors" / "compiled" and _mode(folder) == 0o700
    # A folder someone left open is closed again.
    os.chmod(folder, 0o777)
    assert _mode(compile_cache.cache_dir()) == 0o700


def test_default_folder_is_the_users_cache_not_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "EXTRACTORS_CACHE_DIR", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder = compile_cache.cache_dir()
    assert folder == tmp_path / "xdg" / "spacer-core" / "compiled" and _mode(folder) == 0o700


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to make a folder another user owns")
def test_folder_of_another_user_is_refused(tmp_path):
    folder = tmp_path / "theirs"
    folder.mkdir()
    os.chown(folder, 12345, 12345)
    with pytest.raises(PermissionError, match="belongs to another user"):
        compile_cache.cache_dir(folder)


def test_artifacts_are_verified_on_every_load(tmp_path):
    path = compile_cache.artifact_path(tmp_path, SHA, "onnx", "exact-cpu", ".onnx")
    builds: list[bytes] = []

    def build() -> bytes:
        builds.append(b"compiled network %d" % len(builds))
        return builds[-1]

    assert compile_cache.load_or_build(path, build) == (b"compiled network 0", True)
    assert compile_cache.load_or_build(path, build) == (b"compiled network 0", False)

    # Same length, one byte changed: the digest catches it and it is rebuilt.
    path.write_bytes(b"compiled network X")
    assert compile_cache.load_or_build(path, build) == (b"compiled network 1", True)

    # An artifact without its digest (planted, or from an older release) is not trusted.
    path.with_name(path.name + ".sha256").unlink()
    assert compile_cache.load_or_build(path, build) == (b"compiled network 2", True)
    assert compile_cache.read_verified(path) == b"compiled network 2"

    compile_cache.discard(path)
    assert not path.exists() and not path.with_name(path.name + ".sha256").exists()
    assert not list(tmp_path.glob("*.tmp"))
