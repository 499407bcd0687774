"""Type stub for the Rust extension (crop_rs). Checked against the module by the tests."""

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__version__: str

class PatchError(ValueError):
    """A crop request that cannot be served (bad buffer, point outside the image, ...)."""

def crop_rgb(
    image: npt.NDArray[np.uint8],
    rowcols: Sequence[tuple[int, int]],
    crop_size: int = 224,
) -> npt.NDArray[np.uint8]: ...
def crop_rgb_into_chw(
    image: npt.NDArray[np.uint8],
    rowcols: Sequence[tuple[int, int]],
    out: npt.NDArray[np.float32],
    crop_size: int = 224,
) -> None: ...
