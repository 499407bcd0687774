"""Image bytes -> point patches, pixel-identical to pyspacer.

pyspacer opens an image with Pillow, converts it to RGB and cuts a 224x224
patch around each point (`reflect` padding at the borders). Here JPEG and PNG
are decoded in Rust (`spacer_core._crop_rs`, libjpeg-turbo like Pillow) with
the GIL released and patches cut on several cores; other formats (TIFF, BMP,
WebP, GIF, ...) are decoded by Pillow and cropped in Rust.

The header's size is checked against `max_pixels` (default: the active
runtime's `Limits.image_pixels`, else `spacer_core.config.MAX_IMAGE_PIXELS`)
before any pixel buffer is allocated.

The extension raises its own exception types; every call into it here turns
them into the library's (`ImageDecodeError`, `PatchError`, `DataLimitError`),
so no extension type crosses into the layers above. `InternalCropError`, a
caught panic, stays what it is: a bug, not a category.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile

from spacer_core import _crop_rs
from spacer_core._crop_rs import (
    ImageInfo,
    InternalCropError,
    UnsupportedFormatError,
    crop_rgb,
    crop_rgb_into_chw,
)
from spacer_core.exceptions import DataLimitError, ImageDecodeError, ImageError, PatchError
from spacer_core.images import open_image

CROP_SIZE = 224
_STRIP_PIXELS = 1 << 20  # pixels converted to RGB at a time by the Pillow path

__all__ = [
    "CROP_SIZE",
    "DecodedImage",
    "ImageDecodeError",
    "ImageInfo",
    "InternalCropError",
    "PatchError",
    "crop_array",
    "crop_array_into_chw",
    "crop_patches",
    "crop_patches_batch",
    "crop_patches_into_chw",
    "decode_image",
    "decoded_bytes",
    "read_header",
    "to_rgb_array",
]

RowCols = Sequence[tuple[int, int]]


@dataclass(frozen=True)
class DecodedImage:
    """An image as pyspacer crops it: RGB pixels plus what the file said."""

    rgb: np.ndarray  # uint8 (H, W, 3), C-contiguous
    format: str  # "JPEG", "PNG", or Pillow's name for other formats
    mode: str  # Pillow's mode before convert("RGB")
    complete: bool  # False when the data ended or broke off early


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Pillow image -> contiguous uint8 HxWx3, as pyspacer's `convert('RGB')` gives."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


def crop_array(rgb: np.ndarray, rowcols: RowCols, crop_size: int = CROP_SIZE) -> np.ndarray:
    """Cut one uint8 (crop_size, crop_size, 3) patch per (row, col) -> (N, s, s, 3)."""
    with _named_errors(None):
        return crop_rgb(np.ascontiguousarray(rgb, dtype=np.uint8), _points(rowcols), crop_size)


def crop_array_into_chw(
    rgb: np.ndarray,
    rowcols: RowCols,
    out: np.ndarray,
    crop_size: int = CROP_SIZE,
) -> np.ndarray:
    """Write float32 CHW patches in [0, 1] (ToTensor layout) into `out` (N, 3, s, s)."""
    with _named_errors(None):
        crop_rgb_into_chw(np.ascontiguousarray(rgb, dtype=np.uint8), _points(rowcols), out, crop_size)
    return out


def read_header(image_bytes: bytes, *, image_key: str | None = None) -> ImageInfo | None:
    """Format, mode and size from the header alone (None for non-JPEG/PNG data)."""
    with _named_errors(image_key):
        return _crop_rs.read_header(image_bytes)


def image_size(image_bytes: bytes, *, image_key: str | None = None) -> tuple[int, int]:
    """(width, height) as Pillow's `Image.size`, read cheaply from the header."""
    info = read_header(image_bytes, image_key=image_key)
    if info is not None:
        return info.size
    return _open_with_pillow(image_bytes, image_key).size


# What Pillow holds a decoded pixel in: 1 byte for 1/L/P, 2 for I;16 modes, 4 for the rest
# (multi-band modes are stored 4 bytes a pixel, as are I and F).
_WEBP_BYTES_PER_PIXEL = 16  # Pillow's WebP decoder keeps its RGBA canvases next to the image
_STRIP_BYTES = _STRIP_PIXELS * 7  # one strip's RGB conversion (Pillow's and numpy's copies)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type
_JPEG_HEADER_SCAN = 1 << 20  # markers before the frame header (EXIF, ICC) fit in this


def _rust_bytes_per_pixel(data: bytes) -> int:
    """Bytes a pixel the Rust decoders hold at their peak, from the header.

    Baseline JPEG and non-interlaced PNG decode row by row into the RGB
    output (3). An interlaced PNG is first decoded whole at its own depth
    (up to 8 bytes a pixel for 16-bit RGBA); a progressive JPEG keeps two
    bytes a coefficient for each component of the whole image; a CMYK JPEG
    is decoded to 4 bytes a pixel before its conversion.
    """
    held = 3
    if data.startswith(_PNG_SIGNATURE) and len(data) >= 29:
        depth, colour, interlace = data[24], data[25], data[28]
        if interlace:
            held += max(1, _PNG_CHANNELS.get(colour, 4) * depth // 8)
        return held
    components, progressive = _jpeg_frame(data)
    if components >= 4:
        held += components
    if progressive:
        held += 2 * components
    return held


def _jpeg_frame(data: bytes) -> tuple[int, bool]:
    """(components, progressive) from a JPEG's frame header; (3, False) when none is found."""
    pos = 2
    end = min(len(data), _JPEG_HEADER_SCAN)
    while pos + 4 <= end and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start-of-frame
            if pos + 10 <= len(data):
                return data[pos + 9], marker in (0xC2, 0xC6, 0xCA, 0xCE)
            break
        if marker == 0xDA or length < 2:  # scan data: no frame header came first
            break
        pos += 2 + length
    return 3, False


def _pillow_bytes_per_pixel(mode: str) -> int:
    if mode in ("1", "L", "P"):
        return 1
    if mode.startswith("I;16"):
        return 2
    return 4


def decoded_bytes(image_bytes: bytes, width: int, height: int, *, rgb: bool = False) -> int:
    """Bytes decoding this image holds at its peak, from the header alone.

    JPEG and PNG decode in Rust to RGB (3 bytes a pixel), plus what the
    decoder keeps for the whole image (`_rust_bytes_per_pixel`). Other formats
    decode in Pillow, which holds the image in its own mode; cutting patches
    adds only one patch window, a full RGB array (`rgb`, as `decode_image`
    returns) adds 3 bytes a pixel and one strip's conversion.
    """
    pixels = width * height
    if read_header(image_bytes) is not None:
        return pixels * _rust_bytes_per_pixel(image_bytes)
    try:
        image = _open_with_pillow(image_bytes, None)
    except ImageDecodeError:
        return pixels * 3  # the decode itself refuses it
    mode, fmt = image.mode, image.format
    image.close()
    held = pixels * _pillow_bytes_per_pixel(mode)
    if rgb:
        held += pixels * 3 + _STRIP_BYTES
    if fmt == "WEBP":
        held = max(held, pixels * _WEBP_BYTES_PER_PIXEL)
    return held


def decode_image(
    image_bytes: bytes,
    *,
    max_pixels: int | None = None,
    image_key: str | None = None,
    allow_truncated: bool | None = None,
    parallel: bool = True,
) -> DecodedImage:
    """Decode to RGB as `Image.open(...).convert('RGB')` does (no EXIF rotation, alpha dropped).

    A truncated image is decoded as far as it goes when `allow_truncated`
    (None: the active runtime's `Limits.allow_truncated_images`), else it is
    an ImageDecodeError naming the image. `parallel` False keeps the work on
    one core: for callers that already keep every core busy, where decoding
    a JPEG in bands only adds work (each band re-reads the rows above it).
    """
    limit = _limit(max_pixels)
    lenient = _truncation_allowed(allow_truncated)
    with _named_errors(image_key):
        try:
            rgb, info, complete = _crop_rs.decode_image(image_bytes, limit, parallel=parallel)
        except UnsupportedFormatError:
            rgb, image = _pillow_decode(image_bytes, limit, image_key, lenient)
            return DecodedImage(rgb, image.format or "", image.mode, True)
        if not complete and not lenient:
            raise _truncated(info.format, image_key)
        return DecodedImage(rgb, info.format, info.mode, complete)


def crop_patches(
    image_bytes: bytes,
    rowcols: RowCols,
    crop_size: int = CROP_SIZE,
    *,
    max_pixels: int | None = None,
    image_key: str | None = None,
    allow_truncated: bool | None = None,
    parallel: bool = True,
) -> np.ndarray:
    """Decode `image_bytes` and cut uint8 (N, crop_size, crop_size, 3) patches.

    Byte-identical to pyspacer's `crop_patches(Image.open(...), rowcols, crop_size)`.
    A truncated image is refused unless allowed; `parallel` as in `decode_image`.
    """
    points = _points(rowcols)
    limit = _limit(max_pixels)
    lenient = _truncation_allowed(allow_truncated)
    with _named_errors(image_key):
        try:
            if lenient:
                return _crop_rs.crop_patches(image_bytes, points, crop_size, limit, parallel=parallel)
            return _strict_patches(image_bytes, points, crop_size, limit, image_key, parallel)
        except UnsupportedFormatError:
            return _pillow_patches(image_bytes, points, crop_size, limit, image_key, lenient)


def crop_patches_into_chw(
    image_bytes: bytes,
    rowcols: RowCols,
    out: np.ndarray,
    crop_size: int = CROP_SIZE,
    *,
    max_pixels: int | None = None,
    image_key: str | None = None,
    allow_truncated: bool | None = None,
) -> np.ndarray:
    """Decode and write float32 (N, 3, s, s) patches in [0, 1] into `out`; returns `out`.

    Equal bit for bit to torchvision `ToTensor()` on pyspacer's patches. `out`
    is owned by the caller (e.g. `torch.empty(..., pin_memory=True).numpy()`).
    A truncated image is refused unless allowed (see `decode_image`).
    """
    points = _points(rowcols)
    limit = _limit(max_pixels)
    lenient = _truncation_allowed(allow_truncated)
    with _named_errors(image_key):
        try:
            if lenient:
                _crop_rs.crop_patches_into_chw(image_bytes, points, out, crop_size, limit)
            else:
                patches = _strict_patches(image_bytes, points, crop_size, limit, image_key, True)
                _patches_into_chw(patches, out, image_key)
        except UnsupportedFormatError:
            patches = _pillow_patches(image_bytes, points, crop_size, limit, image_key, lenient)
            _patches_into_chw(patches, out, image_key)
    return out


def crop_patches_batch(
    images: Sequence[bytes],
    rowcols: Sequence[RowCols],
    crop_size: int = CROP_SIZE,
    *,
    max_pixels: int | None = None,
    allow_truncated: bool | None = None,
) -> list[np.ndarray]:
    """`crop_patches` for several images at once, decoded in parallel.

    An error names the index of the image that caused it. A truncated image
    is refused unless allowed (see `decode_image`); refusing needs each
    image's completeness, so those are decoded one at a time.
    """
    limit = _limit(max_pixels)
    points = [_points(rc) for rc in rowcols]
    lenient = _truncation_allowed(allow_truncated)
    if not lenient:
        return [
            crop_patches(
                image, pts, crop_size, max_pixels=limit, image_key=f"image {index}", allow_truncated=False
            )
            for index, (image, pts) in enumerate(zip(images, points, strict=True))
        ]
    with _named_errors(None):
        results = _crop_rs.crop_patches_batch(list(images), points, crop_size, limit)
    out = []
    for index, patches in enumerate(results):
        if patches is None:  # not JPEG/PNG: Pillow decodes, Rust crops
            patches = _pillow_patches(images[index], points[index], crop_size, limit, f"image {index}", True)
        out.append(patches)
    return out


def _points(rowcols: RowCols) -> list[tuple[int, int]]:
    return [(int(r), int(c)) for r, c in rowcols]


def _limit(max_pixels: int | None) -> int:
    if max_pixels is not None:
        return max_pixels
    from spacer_core import limits  # late: limits reads config, which reads the environment

    # The active runtime's bound, else pyspacer's MAX_IMAGE_PIXELS.
    return limits.current().image_pixels


def _prefix(image_key: str | None) -> str:
    return f"{image_key}: " if image_key else ""


def _truncation_allowed(allow_truncated: bool | None) -> bool:
    if allow_truncated is not None:
        return allow_truncated
    from spacer_core import limits  # late: limits reads config, which reads the environment

    return limits.current().allow_truncated_images


def _truncated(fmt: str, image_key: str | None) -> ImageDecodeError:
    return ImageDecodeError(
        f"{_prefix(image_key)}cannot decode {fmt} image: the image data ends early (truncated or damaged file)"
    )


def _strict_patches(
    image_bytes: bytes,
    points: list[tuple[int, int]],
    crop_size: int,
    limit: int,
    image_key: str | None,
    parallel: bool,
) -> np.ndarray:
    """Rust patches of a complete image only.

    The one-call cropper does not say whether the data ran out, so the image
    is decoded whole (what that cropper holds too) and cut from the array.
    Header, limit and points are checked before the decode, as there.
    """
    if crop_size <= 0:
        raise PatchError(f"{_prefix(image_key)}crop_size must be positive")
    info = _crop_rs.read_header(image_bytes)
    if info is None:
        raise UnsupportedFormatError("not JPEG or PNG")
    width, height = info.size
    _check_pixels((width, height), limit, image_key)
    for index, (row, col) in enumerate(points):
        if not (0 <= row < height and 0 <= col < width):
            raise PatchError(
                f"{_prefix(image_key)}point {index} (row={row}, col={col}) is outside the {height}x{width} image"
            )
    rgb, info, complete = _crop_rs.decode_image(image_bytes, limit, parallel=parallel)
    if not complete:
        raise _truncated(info.format, image_key)
    return crop_rgb(rgb, points, crop_size, parallel=parallel)


# Pillow reads its truncation switch from a module global at load time; a strict
# load in a lenient process sets it for the length of that load.
_PILLOW_SWITCH = threading.Lock()


@contextmanager
def _pillow_truncation(lenient: bool) -> Iterator[None]:
    if lenient == bool(ImageFile.LOAD_TRUNCATED_IMAGES):
        yield
        return
    with _PILLOW_SWITCH:
        saved = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _open_with_pillow(image_bytes: bytes, image_key: str | None) -> Image.Image:
    # Only survey photo formats (spacer_core.images); never a plugin that runs a program.
    try:
        return open_image(image_bytes, image_key or "")
    except ImageError as e:
        raise ImageDecodeError(str(e)) from None


def _pillow_decode(
    image_bytes: bytes, limit: int, image_key: str | None, lenient: bool
) -> tuple[np.ndarray, Image.Image]:
    """Pillow fallback for formats the Rust decoder does not handle: (RGB, opened image)."""
    image = _open_with_pillow(image_bytes, image_key)
    _check_pixels(image.size, limit, image_key)
    width, height = image.size
    try:
        with _pillow_truncation(lenient):
            image.load()
        # Converted a strip of rows at a time into the one RGB array: no full-size RGB
        # image and no full-size byte string next to the decoded image.
        rgb = np.empty((height, width, 3), np.uint8)
        step = max(1, _STRIP_PIXELS // max(width, 1))
        for top in range(0, height, step):
            bottom = min(height, top + step)
            rgb[top:bottom] = to_rgb_array(image.crop((0, top, width, bottom)))
        return rgb, image
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"{_prefix(image_key)}cannot decode {image.format} image: {e}") from e


def _reflect(index: np.ndarray, length: int) -> np.ndarray:
    """`reflect` padding's source index for each (possibly outside) index, as the Rust cropper maps it."""
    if length == 1:
        return np.zeros_like(index)
    period = 2 * (length - 1)
    m = np.mod(index, period)
    return np.where(m >= length, period - m, m)


def _pillow_patches(
    image_bytes: bytes,
    points: list[tuple[int, int]],
    crop_size: int,
    limit: int,
    image_key: str | None,
    lenient: bool,
) -> np.ndarray:
    """Patches of a Pillow-decoded image without a full-size RGB copy of it.

    Pillow holds the decoded image in its own mode; each patch converts only
    the window its pixels come from (at most crop_size square) to RGB and
    picks them with the Rust cropper's `reflect` indexing, so the pixels equal
    `crop_array(to_rgb_array(image), ...)` (a conversion to RGB is per pixel).
    """
    if crop_size <= 0:
        raise PatchError(f"{_prefix(image_key)}crop_size must be positive")
    image = _open_with_pillow(image_bytes, image_key)
    _check_pixels(image.size, limit, image_key)
    width, height = image.size
    for index, (row, col) in enumerate(points):
        if not (0 <= row < height and 0 <= col < width):
            raise PatchError(
                f"{_prefix(image_key)}point {index} (row={row}, col={col}) is outside the {height}x{width} image"
            )
    out = np.empty((len(points), crop_size, crop_size, 3), np.uint8)
    steps = np.arange(crop_size)
    try:
        with _pillow_truncation(lenient):
            image.load()
        for index, (row, col) in enumerate(points):
            # The patch's origin as the Rust cropper computes it (pyspacer's rounding).
            rows = _reflect((2 * row + crop_size) // 2 - crop_size + steps, height)
            cols = _reflect((2 * col + crop_size) // 2 - crop_size + steps, width)
            top, left = int(rows.min()), int(cols.min())
            window = image.crop((left, top, int(cols.max()) + 1, int(rows.max()) + 1))
            rgb = to_rgb_array(window)
            out[index] = rgb[np.ix_(rows - top, cols - left)]
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"{_prefix(image_key)}cannot decode {image.format} image: {e}") from e
    finally:
        image.close()
    return out


def _patches_into_chw(patches: np.ndarray, out: np.ndarray, image_key: str | None) -> None:
    """uint8 (N, s, s, 3) patches -> float32 (N, 3, s, s) in `out`, by the Rust cropper (ToTensor's values)."""
    count, size = patches.shape[0], patches.shape[1]
    if out.shape[:1] != (count,):
        raise PatchError(
            f"{_prefix(image_key)}output buffer holds {out.size} elements, expected {count * 3 * size * size}"
        )
    # The point whose patch is the whole patch image (a 1x1 image reflects onto itself).
    center = (size + 1) // 2 if size > 1 else 0
    for index in range(count):
        crop_rgb_into_chw(patches[index], [(center, center)], out[index : index + 1], size)


def _check_pixels(size: tuple[int, int], limit: int, image_key: str | None) -> None:
    width, height = size
    if width * height > limit:
        raise DataLimitError.too_many_pixels(image_key or "", width, height, limit)


@contextmanager
def _named_errors(image_key: str | None) -> Iterator[None]:
    """Turn the extension's errors into the library's, naming the image.

    The library's own errors pass through: they were named where raised.
    """
    try:
        yield
    except _crop_rs.ImageTooLargeError as e:
        _, width, height, limit, *index = e.args
        key = image_key or (f"{index[0]}" if index else "")
        raise DataLimitError.too_many_pixels(key, width, height, limit) from e
    except _crop_rs.ImageDecodeError as e:
        raise ImageDecodeError(f"{_prefix(image_key)}{e}") from e
    except _crop_rs.PatchError as e:
        raise PatchError(f"{_prefix(image_key)}{e}") from e
