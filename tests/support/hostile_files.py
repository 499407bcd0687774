"""Feature files that inflate far beyond their size: a zip bomb and an array header that lies."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np


def zip_bomb(path: Path, mib: int) -> None:
    """A feature file whose 'feat' member inflates to `mib` MiB of zeros (valid npy header)."""
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 1), np.float32))
    header["shape"] = (mib * (1 << 20) // (4 * 1024), 1024)
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, header)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("meta.npy", npy(np.array([0, 1, 1024], np.int64)))
        with archive.open("feat.npy", "w", force_zip64=True) as member:
            member.write(head.getvalue())
            zeros = bytes(1 << 20)
            for _ in range(mib):
                member.write(zeros)


def npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def lying_header(path: Path) -> None:
    """A tiny feature file whose array header claims 2**40 float32 values."""
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 1), np.float32))
    header["shape"] = (1 << 30, 1024)
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, header)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("meta.npy", npy(np.array([0, 1, 1024], np.int64)))
        archive.writestr("feat.npy", head.getvalue() + bytes(64))
