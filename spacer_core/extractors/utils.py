"""pyspacer's patch helpers (`spacer.extractors.utils`) on this package's cropper.

The pipeline crops straight into the network's input batch
(`spacer_core.crop`); these return the same pixels as a list of HxWx3
uint8 arrays, as pyspacer's did.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from spacer_core.crop import crop_array, to_rgb_array


def crop_patches(im: Image.Image, rowcols: Sequence[tuple[int, int]], crop_size: int) -> list[np.ndarray]:
    """One crop_size x crop_size x 3 uint8 patch centred on each (row, col) of `im` (any mode; RGB out).

    Points near or past the edge see the image mirrored there, as in pyspacer.
    """
    return list(crop_array(to_rgb_array(im), rowcols, crop_size))


def crop_simple(im: np.ndarray, center: tuple[int, int], crop_size: int) -> np.ndarray:
    """The crop_size square of an already padded HxWxC array around `center` (a view, not a copy)."""
    top = int(center[0] - crop_size / 2)
    left = int(center[1] - crop_size / 2)
    return im[top : top + crop_size, left : left + crop_size, :]
