"""The one atomic writer: whole files only, mode 0o644 minus the umask, nothing left behind."""

from __future__ import annotations

import os
import stat

import pytest

from spacer_core import atomic
from spacer_core.storage import write_file_atomic


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_new_files_get_0o644_minus_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic.write_atomic(tmp_path / "deep" / "a.bin", b"abc")
    finally:
        os.umask(old)
    target = tmp_path / "deep" / "a.bin"
    assert target.read_bytes() == b"abc"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644 & ~umask


def test_replaces_whole_files_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "port"
    atomic.write_atomic(target, "1234\n")
    write_file_atomic(target, b"5678\n")
    assert target.read_text() == "5678\n"
    assert os.listdir(tmp_path) == ["port"]


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "f"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        atomic.write_atomic(target, 12345)  # type: ignore[arg-type]
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["f"]
