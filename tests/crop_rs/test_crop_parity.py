"""Our patch cropping against pyspacer's `crop_patches`: patches must be byte-identical.

Images go through a real encode/decode (PNG, JPEG, TIFF files) in every
Pillow mode CoralNet uploads arrive in, so the RGB conversion is exercised
the way `load_image` feeds it.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from spacer.extractors.torch_extractors import transformation
from spacer.extractors.utils import crop_patches

from spacer_core.crop import CROP_SIZE, crop_array, crop_array_into_chw, to_rgb_array


def _reference(image: Image.Image, rowcols: list[tuple[int, int]]) -> np.ndarray:
    return np.stack(crop_patches(image, rowcols, CROP_SIZE))


def _ours(image: Image.Image, rowcols: list[tuple[int, int]]) -> np.ndarray:
    return crop_array(to_rgb_array(image), rowcols)


def _edge_points(height: int, width: int, rng: np.random.Generator, extra: int = 4) -> list[tuple[int, int]]:
    """Corners, edge midpoints, the centre, and a few random points."""
    last_r, last_c = height - 1, width - 1
    points = [
        (0, 0), (0, last_c), (last_r, 0), (last_r, last_c),
        (0, width // 2), (last_r, width // 2), (height // 2, 0), (height // 2, last_c),
        (height // 2, width // 2),
    ]  # fmt: skip
    points += [(int(rng.integers(height)), int(rng.integers(width))) for _ in range(extra)]
    return points


def _roundtrip(image: Image.Image, fmt: str, **save_args: object) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    buffer.seek(0)
    decoded = Image.open(buffer)
    decoded.load()
    return decoded


def _noise(height: int, width: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _image_in_mode(mode: str, height: int, width: int, rng: np.random.Generator) -> Image.Image:
    """A random image in `mode`, written to and read back from a real file format."""
    if mode == "RGB":
        return _roundtrip(Image.fromarray(_noise(height, width, 3, rng), "RGB"), "PNG")
    if mode == "RGB-JPEG":
        return _roundtrip(Image.fromarray(_noise(height, width, 3, rng), "RGB"), "JPEG", quality=90)
    if mode == "RGBA":
        return _roundtrip(Image.fromarray(_noise(height, width, 4, rng), "RGBA"), "PNG")
    if mode == "L":
        return _roundtrip(Image.fromarray(_noise(height, width, 1, rng), "L"), "PNG")
    if mode == "LA":
        return _roundtrip(Image.fromarray(_noise(height, width, 2, rng), "LA"), "PNG")
    if mode == "1":
        return _roundtrip(Image.fromarray(_noise(height, width, 1, rng) > 127), "PNG")
    if mode == "P":
        rgb = Image.fromarray(_noise(height, width, 3, rng), "RGB")
        return _roundtrip(rgb.quantize(colors=64), "PNG")
    if mode == "P-transparent":
        paletted = Image.fromarray(_noise(height, width, 3, rng), "RGB").quantize(colors=16)
        return _roundtrip(paletted, "PNG", transparency=3)
    if mode == "CMYK":
        return _roundtrip(Image.fromarray(_noise(height, width, 4, rng), "CMYK"), "JPEG", quality=95)
    if mode == "CMYK-TIFF":
        return _roundtrip(Image.fromarray(_noise(height, width, 4, rng), "CMYK"), "TIFF")
    if mode == "I;16":
        # Values across the whole 16-bit range, as a 16-bit greyscale PNG.
        wide = rng.integers(0, 65536, (height, width), dtype=np.uint16)
        return _roundtrip(Image.fromarray(wide), "PNG")
    if mode == "I":
        wide = rng.integers(-1000, 70000, (height, width), dtype=np.int32)
        return _roundtrip(Image.fromarray(wide), "TIFF")
    if mode == "YCbCr":
        return Image.fromarray(_noise(height, width, 3, rng), "RGB").convert("YCbCr")
    raise AssertionError(mode)


MODES = [
    "RGB",
    "RGB-JPEG",
    "RGBA",
    "L",
    "LA",
    "1",
    "P",
    "P-transparent",
    "CMYK",
    "CMYK-TIFF",
    "I;16",
    "I",
    "YCbCr",
]


@pytest.mark.parametrize("mode", MODES)
def test_modes_match_pyspacer(mode: str) -> None:
    rng = np.random.default_rng(sum(map(ord, mode)))
    image = _image_in_mode(mode, 61, 83, rng)
    points = _edge_points(61, 83, rng)
    np.testing.assert_array_equal(
        _ours(image, points), _reference(image, points), err_msg=f"mode {image.mode}"
    )


def test_sixteen_bit_png_keeps_its_mode() -> None:
    # Guards the test above: a 16-bit PNG must really arrive as a 16-bit image.
    image = _image_in_mode("I;16", 8, 8, np.random.default_rng(0))
    assert image.mode in ("I;16", "I")


@pytest.mark.parametrize(
    "height,width",
    [(1, 1), (1, 7), (7, 1), (2, 3), (5, 300), (300, 5), (111, 113), (223, 225), (224, 224), (449, 450)],
)
def test_small_and_odd_sizes(height: int, width: int) -> None:
    # Smaller than the padding, reflection wraps around more than once.
    rng = np.random.default_rng(height * 1000 + width)
    image = Image.fromarray(_noise(height, width, 3, rng), "RGB")
    points = _edge_points(height, width, rng)
    np.testing.assert_array_equal(_ours(image, points), _reference(image, points))


def test_exif_orientation_is_ignored() -> None:
    # pyspacer crops the stored pixel grid; a rotation tag must not change it.
    rng = np.random.default_rng(5)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW" orientation
    image = _roundtrip(Image.fromarray(_noise(40, 90, 3, rng), "RGB"), "JPEG", exif=exif.tobytes())
    assert image.getexif().get(0x0112) == 6
    points = _edge_points(40, 90, rng)
    np.testing.assert_array_equal(_ours(image, points), _reference(image, points))


def test_duplicate_points_give_duplicate_patches() -> None:
    rng = np.random.default_rng(6)
    image = Image.fromarray(_noise(50, 60, 3, rng), "RGB")
    points = [(10, 20), (10, 20), (0, 0), (10, 20)]
    ours = _ours(image, points)
    np.testing.assert_array_equal(ours, _reference(image, points))
    np.testing.assert_array_equal(ours[0], ours[3])


def test_chw_float_patches_match_to_tensor() -> None:
    """crop_array_into_chw gives exactly what pyspacer's ToTensor makes of its patches."""
    rng = np.random.default_rng(7)
    image = _image_in_mode("RGBA", 90, 70, rng)
    points = _edge_points(90, 70, rng)
    to_tensor = transformation()
    expected = np.stack([to_tensor(p).numpy() for p in crop_patches(image, points, CROP_SIZE)])
    out = np.full((len(points), 3, CROP_SIZE, CROP_SIZE), np.nan, dtype=np.float32)
    crop_array_into_chw(to_rgb_array(image), points, out)
    np.testing.assert_array_equal(out, expected)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    height=st.integers(1, 260),
    width=st.integers(1, 260),
    seed=st.integers(0, 2**32 - 1),
    npoints=st.integers(1, 6),
)
def test_random_images_and_points(height: int, width: int, seed: int, npoints: int) -> None:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(_noise(height, width, 3, rng), "RGB")
    points = [(int(rng.integers(height)), int(rng.integers(width))) for _ in range(npoints)]
    np.testing.assert_array_equal(_ours(image, points), _reference(image, points))
