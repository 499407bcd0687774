"""The Rust extension's API: stub, headers, batch, buffers, errors, threads."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from spacer.extractors.utils import crop_patches as spacer_crop_patches

from spacer_core import _crop_rs, crop
from spacer_core.exceptions import DataLimitError


def _encode(rgb: np.ndarray, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt, **params)
    return buf.getvalue()


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.slow
def test_stub_matches_extension() -> None:
    """mypy.stubtest fails when a signature or name in _crop_rs.pyi drifts from the Rust code."""
    result = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "spacer_core._crop_rs"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_read_header_is_cheap_and_matches_pillow() -> None:
    rgb = _noise(31, 47)
    for fmt, mode in [("JPEG", "RGB"), ("PNG", "RGB")]:
        data = _encode(rgb, fmt)
        info = crop.read_header(data)
        assert info is not None
        assert (info.format, info.mode, info.width, info.height, info.size) == (fmt, mode, 47, 31, (47, 31))
        assert "width=47" in repr(info)
        # The header alone is enough: the pixel data can be missing.
        cut = data[: data.find(b"\xff\xda") + 14] if fmt == "JPEG" else data[:33]
        assert crop.image_size(cut) == (47, 31)
    bmp = _encode(rgb, "BMP")
    assert crop.read_header(bmp) is None
    assert crop.image_size(bmp) == (47, 31)


def test_decode_image_returns_contiguous_rgb() -> None:
    rgb = _noise(20, 30)
    decoded = crop.decode_image(_encode(rgb, "PNG"))
    assert decoded.rgb.flags.c_contiguous and decoded.rgb.dtype == np.uint8
    assert np.array_equal(decoded.rgb, rgb)
    assert (decoded.format, decoded.mode, decoded.complete) == ("PNG", "RGB", True)


def test_accepts_bytearray_and_memoryview() -> None:
    rgb = _noise(9, 9)
    data = _encode(rgb, "PNG")
    for buf in (bytearray(data), memoryview(data).tobytes()):
        assert np.array_equal(crop.decode_image(buf).rgb, rgb)


def test_point_outside_image_names_the_point() -> None:
    data = _encode(_noise(10, 20), "PNG")
    with pytest.raises(crop.PatchError, match=r"point 1 \(row=10, col=3\) is outside the 10x20 image"):
        crop.crop_patches(data, [(0, 0), (10, 3)])
    with pytest.raises(crop.PatchError, match="outside"):
        crop.crop_patches(data, [(-1, 0)])


def test_zero_points_and_odd_crop_sizes() -> None:
    rgb = _noise(12, 15)
    data = _encode(rgb, "PNG")
    assert crop.crop_patches(data, []).shape == (0, 224, 224, 3)
    for size in (1, 3, 7, 225):
        points = [(0, 0), (11, 14), (6, 7)]
        expected = np.stack(spacer_crop_patches(Image.fromarray(rgb), points, size))
        assert np.array_equal(crop.crop_patches(data, points, size), expected), size
    with pytest.raises(crop.PatchError, match="crop_size"):
        crop.crop_patches(data, [(0, 0)], 0)


def test_chw_buffer_is_checked() -> None:
    data = _encode(_noise(30, 30), "JPEG")
    with pytest.raises(crop.PatchError, match="out must have shape"):
        crop.crop_patches_into_chw(data, [(1, 1)], np.zeros((2, 3, 224, 224), np.float32))
    strided = np.zeros((1, 3, 224, 448), np.float32)[..., ::2]
    with pytest.raises(crop.PatchError, match="C-contiguous"):
        crop.crop_patches_into_chw(data, [(1, 1)], strided)
    with pytest.raises(TypeError):
        crop.crop_patches_into_chw(data, [(1, 1)], np.zeros((1, 3, 224, 224), np.float64))


def test_chw_matches_hwc_divided_by_255() -> None:
    data = _encode(_noise(50, 60), "PNG")
    points = [(0, 0), (49, 59), (25, 30)]
    hwc = crop.crop_patches(data, points)
    out = np.empty((3, 3, 224, 224), np.float32)
    crop.crop_patches_into_chw(data, points, out)
    assert np.array_equal(out, hwc.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255))


def test_batch_equals_single_calls_and_falls_back() -> None:
    images = [
        _encode(_noise(40, 50, 1), "JPEG"),
        _encode(_noise(33, 21, 2), "PNG"),
        _encode(_noise(25, 25, 3), "BMP"),  # Pillow fallback
        _encode(_noise(40, 50, 4), "JPEG", progressive=True),
    ]
    rowcols = [[(0, 0), (39, 49)], [(5, 5)], [(24, 0), (0, 24), (12, 12)], []]
    got = crop.crop_patches_batch(images, rowcols)
    assert len(got) == 4
    for data, points, patches in zip(images, rowcols, got):
        assert np.array_equal(patches, crop.crop_patches(data, points))
    raw = _crop_rs.crop_patches_batch(images, rowcols)
    assert raw[2] is None and raw[0] is not None


def test_batch_error_names_the_image() -> None:
    images = [_encode(_noise(10, 10), "PNG"), b"\x89PNG\r\n\x1a\nbroken"]
    with pytest.raises(crop.ImageDecodeError, match="^image 1: "):
        crop.crop_patches_batch(images, [[(0, 0)], [(0, 0)]])
    with pytest.raises(crop.PatchError, match="image 0: point 0"):
        crop.crop_patches_batch(images[:1], [[(10, 0)]])
    with pytest.raises(crop.PatchError, match="2 images but 1 rowcol"):
        crop.crop_patches_batch(images, [[(0, 0)]])


def test_many_threads_get_the_same_patches() -> None:
    data = [_encode(_noise(300, 400, s), "JPEG", quality=90) for s in range(4)]
    points = [(0, 0), (299, 399), (150, 200), (10, 390)]
    expected = [crop.crop_patches(d, points) for d in data]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda i: crop.crop_patches(data[i % 4], points), range(32)))
    for i, patches in enumerate(results):
        assert np.array_equal(patches, expected[i % 4])


def _other_thread_ran_mid_call(data: bytes) -> bool:
    stamps: list[float] = []
    stop = threading.Event()

    def count() -> None:
        while not stop.is_set():
            stamps.append(time.perf_counter())
            for _ in range(200):
                pass

    counter = threading.Thread(target=count)
    counter.start()
    try:
        t0 = time.perf_counter()
        crop.crop_patches(data, [(0, 0)] * 200)
        t1 = time.perf_counter()
    finally:
        stop.set()
        counter.join()
    lo, hi = t0 + 0.3 * (t1 - t0), t0 + 0.7 * (t1 - t0)
    return any(lo < t < hi for t in stamps)


def test_gil_is_released_while_decoding() -> None:
    """Another Python thread runs in the middle of a long decode+crop call.

    With the GIL held for the call, the other thread could only run just
    before it started or after it returned, never in its middle. A few tries
    absorb a loaded machine not scheduling the other thread in time.
    """
    data = _encode(_noise(1200, 1600), "PNG", compress_level=0)
    assert any(_other_thread_ran_mid_call(data) for _ in range(5))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    fmt=st.sampled_from(["PNG", "JPEG"]),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_random_images_and_points_match_pyspacer(
    h: int, w: int, fmt: str, seed: int, data: st.DataObject
) -> None:
    encoded = _encode(_noise(h, w, seed), fmt)
    points = data.draw(
        st.lists(st.tuples(st.integers(0, h - 1), st.integers(0, w - 1)), min_size=1, max_size=5)
    )
    size = data.draw(st.sampled_from([224, 31, 2]))
    expected = np.stack(spacer_crop_patches(Image.open(io.BytesIO(encoded)), points, size))
    assert np.array_equal(crop.crop_patches(encoded, points, size), expected)


def test_batch_pixel_limit_names_the_image() -> None:
    images = [_encode(_noise(10, 10), "PNG"), _encode(_noise(30, 20), "JPEG")]
    with pytest.raises(DataLimitError, match=r"^Image 1 has 20 x 30 = 600 total pixels"):
        crop.crop_patches_batch(images, [[(0, 0)], [(0, 0)]], max_pixels=599)


@pytest.mark.parametrize("pinned", [False, pytest.param(True, marks=pytest.mark.gpu)])
def test_writes_into_a_torch_owned_buffer(pinned: bool) -> None:
    torch = pytest.importorskip("torch")
    data = _encode(_noise(60, 70), "JPEG")
    points = [(0, 0), (59, 69), (30, 35)]
    buffer = torch.empty((len(points), 3, 224, 224), dtype=torch.float32, pin_memory=pinned)
    crop.crop_patches_into_chw(data, points, buffer.numpy())
    expected = torch.from_numpy(crop.crop_patches(data, points)).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(buffer, expected)
    if pinned:
        assert torch.equal(buffer.cuda(non_blocking=True).cpu(), expected)
