"""Type stub for the Rust extension (crop_rs). Checked against the module by the tests."""

from collections.abc import Sequence
from typing import final

import numpy as np
import numpy.typing as npt

__all__ = [
    "PatchError",
    "ImageDecodeError",
    "InternalCropError",
    "UnsupportedFormatError",
    "ImageTooLargeError",
    "ImageInfo",
    "read_header",
    "decode_image",
    "crop_patches",
    "crop_patches_into_chw",
    "crop_patches_batch",
    "crop_rgb",
    "crop_rgb_into_chw",
    "__version__",
]

__version__: str

class PatchError(ValueError):
    """A crop request that cannot be served (bad buffer, point outside the image, ...)."""

class ImageDecodeError(ValueError):
    """The bytes are not a decodable image (corrupt, truncated header, unsupported layout)."""

class InternalCropError(RuntimeError):
    """A bug in crop_rs (a caught panic): not the caller's fault."""

class UnsupportedFormatError(ImageDecodeError):
    """Neither JPEG nor PNG: decode such files with Pillow instead."""

class ImageTooLargeError(ImageDecodeError):
    """The header claims more pixels than allowed; args are (message, width, height, limit[, batch index])."""

@final
class ImageInfo:
    """Header facts of an image, as Pillow reports them after `Image.open`."""

    @property
    def format(self) -> str: ...
    @property
    def mode(self) -> str: ...
    @property
    def width(self) -> int: ...
    @property
    def height(self) -> int: ...
    @property
    def size(self) -> tuple[int, int]: ...

def read_header(data: bytes) -> ImageInfo | None: ...
def decode_image(
    data: bytes, max_pixels: int | None = None, *, parallel: bool = True
) -> tuple[npt.NDArray[np.uint8], ImageInfo, bool]: ...
def crop_patches(
    data: bytes,
    rowcols: Sequence[tuple[int, int]],
    crop_size: int = 224,
    max_pixels: int | None = None,
    *,
    parallel: bool = True,
) -> npt.NDArray[np.uint8]: ...
def crop_patches_into_chw(
    data: bytes,
    rowcols: Sequence[tuple[int, int]],
    out: npt.NDArray[np.float32],
    crop_size: int = 224,
    max_pixels: int | None = None,
) -> None: ...
def crop_patches_batch(
    images: Sequence[bytes],
    rowcols: Sequence[Sequence[tuple[int, int]]],
    crop_size: int = 224,
    max_pixels: int | None = None,
) -> list[npt.NDArray[np.uint8] | None]: ...
def crop_rgb(
    image: npt.NDArray[np.uint8],
    rowcols: Sequence[tuple[int, int]],
    crop_size: int = 224,
    *,
    parallel: bool = True,
) -> npt.NDArray[np.uint8]: ...
def crop_rgb_into_chw(
    image: npt.NDArray[np.uint8],
    rowcols: Sequence[tuple[int, int]],
    out: npt.NDArray[np.float32],
    crop_size: int = 224,
) -> None: ...
