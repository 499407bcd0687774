"""Bytes-in decoding and cropping against pyspacer: every patch byte-identical.

The oracle is what pyspacer does with an image file: Pillow `Image.open`
(LOAD_TRUNCATED_IMAGES on), `convert('RGB')` and `crop_patches`, then
`ToTensor` for the network layout. The corpus is generated here: JPEG
(baseline/progressive, 4:4:4/4:2:2/4:2:0, grey, Adobe CMYK and YCCK) and PNG
(every colour type and bit depth, palettes with tRNS, Adam7), odd sizes,
points on every edge and corner, truncated files, and formats that fall back
to Pillow.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from spacer.extractors.torch_extractors import transformation
from spacer.extractors.utils import crop_patches as spacer_crop_patches

from spacer_core import crop
from spacer_core.exceptions import DataLimitError

FIXTURES = Path(__file__).parents[1] / "fixtures" / "crop_regressions"


@pytest.fixture(autouse=True)
def _truncated_images_on(monkeypatch: pytest.MonkeyPatch) -> None:
    # pyspacer's config turns this on at import; the oracle depends on it.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)


# ---------------------------------------------------------------- image makers


def _pattern(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise: exercises both DCT rounding and edges."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w, 1), y * 255 // max(h, 1), (x + y) * 7 % 256], -1)
    return (base // 2 + rng.integers(0, 60, (h, w, 3))).astype(np.uint8)


def _save(image: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


_ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]


def _pack_rows(samples: np.ndarray, depth: int) -> bytes:
    """Rows of (H, W, C) samples as PNG scanlines with filter byte 0."""
    out = []
    for row in samples:
        flat = row.reshape(-1)
        if depth == 16:
            data = flat.astype(">u2").tobytes()
        elif depth == 8:
            data = flat.astype(np.uint8).tobytes()
        else:
            bits = np.unpackbits(flat.astype(np.uint8)[:, None], axis=1)[:, 8 - depth :]
            data = np.packbits(bits.reshape(-1)).tobytes()
        out.append(b"\x00" + data)
    return b"".join(out)


def make_png(
    samples: np.ndarray,
    depth: int,
    color_type: int,
    *,
    palette: bytes | None = None,
    trns: bytes | None = None,
    interlace: bool = False,
) -> bytes:
    """A PNG written by hand, for layouts Pillow cannot save (16-bit RGB, LA16, Adam7, short palettes)."""
    h, w = samples.shape[:2]
    if interlace:
        raw = b"".join(
            _pack_rows(samples[y0::dy, x0::dx], depth)
            for x0, y0, dx, dy in _ADAM7
            if samples[y0::dy, x0::dx].size
        )
    else:
        raw = _pack_rows(samples, depth)
    ihdr = struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, int(interlace))
    body = _chunk(b"IHDR", ihdr)
    if palette is not None:
        body += _chunk(b"PLTE", palette)
    if trns is not None:
        body += _chunk(b"tRNS", trns)
    body += _chunk(b"IDAT", zlib.compress(raw, 6))
    return b"\x89PNG\r\n\x1a\n" + body + _chunk(b"IEND", b"")


def _adobe_ycck(cmyk_jpeg: bytes) -> bytes:
    """Flip an Adobe APP14 transform flag to 2, so libjpeg treats the file as YCCK."""
    at = cmyk_jpeg.find(b"\xff\xeeAdobe"[:2] + b"\x00\x0eAdobe")
    assert at > 0, "Pillow wrote no Adobe marker"
    flag = at + 4 + 11
    return cmyk_jpeg[:flag] + b"\x02" + cmyk_jpeg[flag + 1 :]


def jpeg_cases(h: int, w: int) -> Iterator[tuple[str, bytes]]:
    rgb = Image.fromarray(_pattern(h, w))
    for sub, name in [(0, "444"), (1, "422"), (2, "420")]:
        for progressive in (False, True):
            kind = "prog" if progressive else "base"
            yield (
                f"jpeg-{name}-{kind}",
                _save(rgb, "JPEG", quality=90, subsampling=sub, progressive=progressive),
            )
    yield "jpeg-rgb-no-ycc", _save(rgb, "JPEG", quality=90, keep_rgb=True)  # Adobe transform 0
    yield "jpeg-restart-markers", _save(rgb, "JPEG", quality=90, restart_marker_blocks=1)
    yield "jpeg-grey", _save(rgb.convert("L"), "JPEG", quality=85)
    yield "jpeg-grey-prog", _save(rgb.convert("L"), "JPEG", progressive=True)
    cmyk = _save(rgb.convert("CMYK"), "JPEG", quality=90)
    yield "jpeg-cmyk", cmyk
    yield "jpeg-ycck", _adobe_ycck(cmyk)


def png_cases(h: int, w: int, interlace: bool = False) -> Iterator[tuple[str, bytes]]:
    rng = np.random.default_rng(h * 1000 + w)
    tag = "-adam7" if interlace else ""

    def rand(hi: int, c: int) -> np.ndarray:
        return rng.integers(0, hi, (h, w, c))

    for depth in (1, 2, 4, 8, 16):
        yield f"png-grey{depth}{tag}", make_png(rand(1 << depth, 1), depth, 0, interlace=interlace)
    yield f"png-grey8-trns{tag}", make_png(rand(256, 1), 8, 0, trns=b"\x00\x07", interlace=interlace)
    for depth in (8, 16):
        yield f"png-rgb{depth}{tag}", make_png(rand(1 << depth, 3), depth, 2, interlace=interlace)
        yield f"png-la{depth}{tag}", make_png(rand(1 << depth, 2), depth, 4, interlace=interlace)
        yield f"png-rgba{depth}{tag}", make_png(rand(1 << depth, 4), depth, 6, interlace=interlace)
    for depth in (1, 2, 4, 8):
        # Palettes shorter than the index range: Pillow shows missing entries as black.
        entries = max(1, (1 << depth) - 3)
        palette = rng.integers(0, 256, entries * 3).astype(np.uint8).tobytes()
        yield (
            f"png-p{depth}{tag}",
            make_png(rand(1 << depth, 1), depth, 3, palette=palette, interlace=interlace),
        )
    palette = rng.integers(0, 256, 256 * 3).astype(np.uint8).tobytes()
    yield (
        f"png-p8-trns{tag}",
        make_png(rand(256, 1), 8, 3, palette=palette, trns=b"\x00\x80\xff\x10", interlace=interlace),
    )
    if not interlace:
        rgb = Image.fromarray(_pattern(h, w, seed=3))
        for mode in ("RGB", "RGBA", "L", "LA", "P", "I;16", "1"):
            yield (
                f"png-pillow-{mode}",
                _save(rgb.convert(mode) if mode != "I;16" else rgb.convert("L").convert("I;16"), "PNG"),
            )


# ---------------------------------------------------------------- oracles


def _pillow_rgb(data: bytes) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Palette images with Transparency ..." from convert()
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _spacer_patches(data: bytes, rowcols: list[tuple[int, int]], size: int = 224) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.stack(spacer_crop_patches(Image.open(io.BytesIO(data)), rowcols, size))


def edge_points(h: int, w: int) -> list[tuple[int, int]]:
    """Corners, edge midpoints, the centre, a point one in from the corner, and a duplicate."""
    pts = [
        (0, 0),
        (0, w - 1),
        (h - 1, 0),
        (h - 1, w - 1),
        (0, w // 2),
        (h - 1, w // 2),
        (h // 2, 0),
        (h // 2, w - 1),
    ]
    pts += [(h // 2, w // 2), (min(1, h - 1), min(1, w - 1)), (0, 0)]
    return pts


def assert_decodes_like_pillow(name: str, data: bytes) -> None:
    expected = _pillow_rgb(data)
    got = crop.decode_image(data, max_pixels=10**9)
    assert got.rgb.shape == expected.shape, name
    mismatch = np.argwhere(got.rgb != expected)
    assert mismatch.size == 0, f"{name}: {len(mismatch)} samples differ, first at {mismatch[:3].tolist()}"


def assert_crops_like_pyspacer(name: str, data: bytes, size: int = 224) -> None:
    h, w = _pillow_rgb(data).shape[:2]
    points = edge_points(h, w)
    expected = _spacer_patches(data, points, size)
    got = crop.crop_patches(data, points, size, max_pixels=10**9)
    assert got.dtype == np.uint8 and got.shape == (len(points), size, size, 3), name
    assert np.array_equal(got, expected), name


# ---------------------------------------------------------------- tests

SIZES = [(1, 1), (2, 3), (37, 53), (61, 223), (16, 16)]


@pytest.mark.parametrize("h,w", SIZES)
def test_jpeg_pixels_and_patches_match(h: int, w: int) -> None:
    for name, data in jpeg_cases(h, w):
        assert crop.read_header(data).format == "JPEG"
        assert_decodes_like_pillow(f"{name} {h}x{w}", data)
        assert_crops_like_pyspacer(f"{name} {h}x{w}", data)


@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("interlace", [False, True])
def test_png_pixels_and_patches_match(h: int, w: int, interlace: bool) -> None:
    for name, data in png_cases(h, w, interlace):
        assert crop.read_header(data).format == "PNG"
        assert_decodes_like_pillow(f"{name} {h}x{w}", data)
        assert_crops_like_pyspacer(f"{name} {h}x{w}", data)


@pytest.mark.parametrize("h,w", [(223, 5000), (10000, 10), (5, 300)])
def test_long_thin_images(h: int, w: int) -> None:
    rgb = Image.fromarray(_pattern(h, w))
    for data in (_save(rgb, "JPEG", quality=80), _save(rgb, "PNG", compress_level=1)):
        assert_crops_like_pyspacer(f"{h}x{w}", data)


def test_modes_are_reported_as_pillow_opens_them() -> None:
    for name, data in [*jpeg_cases(9, 7), *png_cases(9, 7)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
        info = crop.read_header(data)
        assert (info.mode, info.size) == (image.mode, image.size), name
        decoded = crop.decode_image(data)
        assert decoded.mode == image.mode and decoded.complete, name


def _truncations(data: bytes) -> list[int]:
    n = len(data)
    return sorted({n // 4, n // 3, n // 2, 2 * n // 3, n - 40, n - 13, n - 2})


@pytest.mark.parametrize("h,w", [(37, 53), (80, 61)])
def test_truncated_files_decode_as_far_as_pillow(h: int, w: int) -> None:
    cases = [*jpeg_cases(h, w), *png_cases(h, w), *png_cases(h, w, interlace=True)]
    compared = 0
    for name, data in cases:
        for cut in _truncations(data):
            part = data[:cut]
            try:
                expected = _pillow_rgb(part)
            except (OSError, SyntaxError, ValueError):
                continue  # Pillow cannot even open it; ours may be more lenient
            got = crop.decode_image(part)
            where = np.argwhere(got.rgb != expected)
            # Known difference: a PNG cut inside the last deflate symbols of a
            # row; the Rust inflater finishes that row, zlib leaves it empty.
            if where.size and name.startswith("png") and len(np.unique(where[:, 0])) == 1:
                continue
            assert where.size == 0, f"{name} cut at {cut}/{len(data)}: {len(where)} samples differ"
            compared += 1
    assert compared > 100


@pytest.mark.parametrize("h,w", [(1037, 131), (555, 64)])
def test_tall_baseline_jpegs_decoded_in_bands_match(h: int, w: int) -> None:
    """Tall baseline JPEGs are decoded in parallel bands; damaged ones in one pass."""
    for name, data in jpeg_cases(h, w):
        for cut in (len(data), len(data) * 3 // 4, len(data) // 3):
            assert_decodes_like_pillow(f"{name} {h}x{w} cut {cut}", data[:cut])


@pytest.mark.parametrize("interlace", [False, True])
def test_one_core_decodes_and_cuts_the_same_pixels(interlace: bool) -> None:
    """`parallel=False` (one pass, no splits) gives exactly what the parallel path gives."""
    cases = [*jpeg_cases(1037, 131), *png_cases(555, 64, interlace)]
    rowcols = [(0, 0), (500, 60), (554, 63), (300, 1)]
    for name, data in cases:
        for cut in (len(data), len(data) * 3 // 4):
            fanned = crop.decode_image(data[:cut], allow_truncated=True)
            one = crop.decode_image(data[:cut], allow_truncated=True, parallel=False)
            assert np.array_equal(one.rgb, fanned.rgb) and one.complete == fanned.complete, name
            got = crop.crop_patches(data[:cut], rowcols, 64, allow_truncated=True, parallel=False)
            assert np.array_equal(got, crop.crop_patches(data[:cut], rowcols, 64, allow_truncated=True))
        strict = crop.crop_patches(data, rowcols, 64, parallel=False)
        assert np.array_equal(strict, crop.crop_patches(data, rowcols, 64)), name


def test_truncated_file_reports_incomplete() -> None:
    data = _save(Image.fromarray(_pattern(64, 64)), "JPEG")
    assert crop.decode_image(data).complete
    assert not crop.decode_image(data[: len(data) // 2]).complete
    png = _save(Image.fromarray(_pattern(64, 64)), "PNG")
    assert not crop.decode_image(png[: len(png) // 2]).complete


def test_exif_orientation_is_not_applied() -> None:
    image = Image.fromarray(_pattern(40, 70))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    data = _save(image, "JPEG", exif=exif.tobytes())
    got = crop.decode_image(data).rgb
    assert got.shape == (40, 70, 3)
    assert np.array_equal(got, _pillow_rgb(data))


def test_to_tensor_layout_is_bit_exact() -> None:
    data = _save(Image.fromarray(_pattern(300, 257)), "JPEG", quality=92)
    points = [*edge_points(300, 257), (150, 128)]
    patches = _spacer_patches(data, points)
    expected = np.stack([transformation()(Image.fromarray(p)).numpy() for p in patches])
    out = np.full((len(points), 3, 224, 224), np.nan, dtype=np.float32)
    returned = crop.crop_patches_into_chw(data, points, out)
    assert returned is out
    assert np.array_equal(out.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize(
    "fmt,params,mode",
    [
        ("TIFF", {}, "RGB"),
        ("TIFF", {"compression": "tiff_lzw"}, "RGBA"),
        ("BMP", {}, "RGB"),
        ("GIF", {}, "P"),
        ("WEBP", {"lossless": True}, "RGB"),
        ("WEBP", {"quality": 80}, "RGB"),
        ("MPO", {}, "RGB"),
    ],
)
def test_other_formats_fall_back_to_pillow(fmt: str, params: dict[str, object], mode: str) -> None:
    image = Image.fromarray(_pattern(50, 41)).convert(mode)
    if fmt == "MPO":
        frames = [Image.fromarray(_pattern(50, 41, seed=s)) for s in (1, 2)]
        data = _save(frames[0], "MPO", save_all=True, append_images=frames[1:])
    else:
        data = _save(image, fmt, **params)
    assert_crops_like_pyspacer(fmt, data)
    assert_decodes_like_pillow(fmt, data)


def test_pixel_limit_refuses_before_decoding_with_pyspacers_message() -> None:
    # 33 bytes claiming a 100000 x 100000 RGB image: refused from the header alone.
    header = make_png(np.zeros((1, 1, 3)), 8, 2)[:33]
    header = header[:16] + struct.pack(">II", 100_000, 100_000) + header[24:]
    with pytest.raises(DataLimitError) as info:
        crop.crop_patches(header, [(0, 0)], image_key="bomb.png")
    assert str(info.value) == (
        "Image bomb.png has 100000 x 100000 = 10000000000 total pixels,"
        " which is larger than the max allowed of 100000000."
    )
    # A JPEG whose SOF claims 60000 x 60000 (only the header is present).
    jpeg = _save(Image.new("RGB", (8, 8)), "JPEG")
    sof = jpeg.find(b"\xff\xc0")
    bomb = jpeg[: sof + 5] + struct.pack(">HH", 60000, 60000) + jpeg[sof + 9 :]
    with pytest.raises(DataLimitError, match="60000 x 60000 = 3600000000 total pixels"):
        crop.decode_image(bomb)
    small = _save(Image.new("RGB", (30, 20)), "PNG")
    with pytest.raises(DataLimitError, match="30 x 20 = 600 total pixels.*max allowed of 599"):
        crop.crop_patches(small, [(0, 0)], max_pixels=599)
    assert crop.crop_patches(small, [(0, 0)], max_pixels=600).shape == (1, 224, 224, 3)
    # The Pillow fallback applies the same limit.
    with pytest.raises(DataLimitError, match="30 x 20 = 600"):
        crop.crop_patches(_save(Image.new("RGB", (30, 20)), "BMP"), [(0, 0)], max_pixels=599)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not an image at all",
        b"\xff\xd8\xff",
        b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00\xff\xd9",
        b"\x89PNG\r\n\x1a\n",
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x00\x00\x00\x00\x01\x08\x02\x00\x00\x00",
    ],
)
def test_garbage_raises_image_decode_error(data: bytes) -> None:
    with pytest.raises(crop.ImageDecodeError) as info:
        crop.crop_patches(data, [(0, 0)], image_key="img-7")
    assert isinstance(info.value, ValueError)
    assert "img-7" in str(info.value)


def test_regression_inputs_never_crash() -> None:
    """Inputs the fuzzer once found troublesome: a result or a typed error, nothing else."""
    files = sorted(FIXTURES.glob("*"))
    for path in files:
        if path.name.startswith(".") or path.suffix == ".md":
            continue
        data = path.read_bytes()
        try:
            decoded = crop.decode_image(data, max_pixels=50_000_000)
        except (crop.ImageDecodeError, DataLimitError):
            continue
        assert decoded.rgb.ndim == 3 and decoded.rgb.shape[2] == 3, path.name
