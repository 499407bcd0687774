"""Patch cropping around points, pixel-identical to pyspacer's crop_patches.

The work happens in Rust (`spacer_core._crop_rs`) with the GIL released.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from spacer_core._crop_rs import PatchError, crop_rgb, crop_rgb_into_chw

CROP_SIZE = 224

__all__ = ["CROP_SIZE", "PatchError", "crop_array", "crop_array_into_chw", "to_rgb_array"]


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Pillow image -> contiguous uint8 HxWx3, as pyspacer's `convert('RGB')` gives."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


def crop_array(
    rgb: np.ndarray, rowcols: Sequence[tuple[int, int]], crop_size: int = CROP_SIZE
) -> np.ndarray:
    """Cut one uint8 (crop_size, crop_size, 3) patch per (row, col) -> (N, s, s, 3)."""
    return crop_rgb(np.ascontiguousarray(rgb, dtype=np.uint8), _points(rowcols), crop_size)


def crop_array_into_chw(
    rgb: np.ndarray,
    rowcols: Sequence[tuple[int, int]],
    out: np.ndarray,
    crop_size: int = CROP_SIZE,
) -> np.ndarray:
    """Write float32 CHW patches in [0, 1] (ToTensor layout) into `out` (N, 3, s, s)."""
    crop_rgb_into_chw(np.ascontiguousarray(rgb, dtype=np.uint8), _points(rowcols), out, crop_size)
    return out


def _points(rowcols: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(int(r), int(c)) for r, c in rowcols]
