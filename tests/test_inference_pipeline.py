"""extract_stream (decode + crop overlapped with the network) against pyspacer end to end."""

from __future__ import annotations

import functools
import io

import numpy as np
import pytest
from PIL import Image
from spacer.data_classes import DataLocation
from spacer.extractors.efficientnet import EfficientNetExtractor as PyspacerEfficientNet

from spacer_core.crop import ImageDecodeError
from spacer_core.extractors.efficientnet import build_network
from spacer_core.inference import DynamicBatcher, extract_stream, load_backend, run_in_batches
from spacer_core.inference.pipeline import decode_rgb
from tests.support.weights import efficientnet_weights  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory):
    """Three JPEGs (different sizes, one greyscale) and their points, near edges too."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(11)
    out = []
    for i, (h, w, mode) in enumerate([(300, 420, "RGB"), (256, 256, "L"), (330, 250, "RGB")]):
        coarse = rng.integers(0, 256, size=(h // 10 + 1, w // 10 + 1, 3), dtype=np.uint8)
        pixels = coarse.repeat(10, 0).repeat(10, 1)[:h, :w]
        image = Image.fromarray(pixels).convert(mode)
        path = folder / f"image{i}.jpg"
        image.save(path, quality=90)
        rowcols = [(0, 0), (h - 1, w - 1)] + [
            (int(r), int(c)) for r, c in zip(rng.integers(0, h, 2 + i), rng.integers(0, w, 2 + i))]
        out.append((path, rowcols))
    return out


@pytest.fixture(scope="module")
def pyspacer_features(images, efficientnet_weights):  # noqa: F811
    extractor = PyspacerEfficientNet(
        data_locations={"weights": DataLocation("filesystem", str(efficientnet_weights.path))})
    result = []
    for path, rowcols in images:
        with Image.open(path) as image:
            features, _ = extractor(image, rowcols)
        result.append(np.array([pf.data for pf in features.point_features]))
    return result


@pytest.fixture(scope="module")
def backend(efficientnet_weights, tmp_path_factory):  # noqa: F811
    return load_backend(efficientnet_weights.sha256, lambda: build_network(efficientnet_weights.path),
                        device="cpu", cache_dir=tmp_path_factory.mktemp("compiled"))


def test_stream_matches_pyspacer_per_image(images, pyspacer_features, backend):
    features_of = functools.partial(run_in_batches, backend, batch_size=3)
    results = list(extract_stream(images, features_of, prefetch=2))
    assert len(results) == len(images)
    for got, want in zip(results, pyspacer_features):
        assert got.shape == want.shape
        assert np.max(np.abs(got - want)) <= 1e-4


def test_stream_through_batcher_from_every_source_kind(images, pyspacer_features, backend):
    path, rowcols = images[0]
    data = path.read_bytes()
    with Image.open(path) as image:
        image.load()
        sources = [path, str(path), data, image, decode_rgb(data)]
    with DynamicBatcher(backend, max_batch_size=4) as batcher:
        results = list(extract_stream(((s, rowcols) for s in sources), batcher.extract_sync))
    for got in results:
        assert np.max(np.abs(got - pyspacer_features[0])) <= 1e-4


def test_unreadable_image_raises_in_turn(images, backend, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    items = [images[1], (broken, [(1, 1)])]
    stream = extract_stream(items, functools.partial(run_in_batches, backend, batch_size=4))
    assert next(stream).shape == (len(images[1][1]), 1280)
    with pytest.raises(ImageDecodeError, match="broken.jpg"):
        next(stream)


def test_decode_rgb_rejects_bad_arrays():
    with pytest.raises(ValueError, match="HxWx3"):
        decode_rgb(np.zeros((4, 4), np.uint8))
    buffer = io.BytesIO()
    Image.new("RGBA", (5, 4), (1, 2, 3, 4)).save(buffer, format="PNG")
    assert decode_rgb(buffer.getvalue()).shape == (4, 5, 3)
