"""The one pipeline (image bytes -> features -> scores) against pyspacer, sync and async."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from PIL import Image
from spacer.data_classes import DataLocation as PyspacerDataLocation
from spacer.extractors.efficientnet import EfficientNetExtractor as PyspacerEfficientNet

from spacer_core import pipeline
from spacer_core.crop import ImageDecodeError
from spacer_core.data_classes import DataLocation, ImageFeatures
from spacer_core.exceptions import InvalidInputError, RowColumnInvalidError
from spacer_core.extractors import DummyExtractor, EfficientNetExtractor
from spacer_core.inference import BatcherSettings
from spacer_core.runtime import Runtime, RuntimeSettings


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
            (int(r), int(c)) for r, c in zip(rng.integers(0, h, 2 + i), rng.integers(0, w, 2 + i))
        ]
        out.append((path, rowcols))
    return out


@pytest.fixture(scope="module")
def pyspacer_features(images, efficientnet_weights):  # noqa: F811
    extractor = PyspacerEfficientNet(
        data_locations={"weights": PyspacerDataLocation("filesystem", str(efficientnet_weights.path))}
    )
    result = []
    for path, rowcols in images:
        with Image.open(path) as image:
            features, _ = extractor(image, rowcols)
        result.append(np.array([pf.data for pf in features.point_features]))
    return result


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    active = Runtime(
        RuntimeSettings(
            device="cpu",
            batcher=BatcherSettings(max_batch_size=3),
            compile_cache_dir=str(tmp_path_factory.mktemp("compiled")),
        )
    )
    yield active
    active.close()


def _extractor(weights) -> EfficientNetExtractor:
    return EfficientNetExtractor(data_locations={"weights": DataLocation("filesystem", str(weights.path))})


@pytest.mark.slow
def test_run_matches_pyspacer_from_locations_and_bytes(
    images, pyspacer_features, runtime, efficientnet_weights
):  # noqa: F811
    extractor = _extractor(efficientnet_weights)
    with runtime.activate():
        for (path, rowcols), want in zip(images, pyspacer_features):
            for image in (DataLocation("filesystem", str(path)), path.read_bytes()):
                result = pipeline.run(pipeline.ImageJob(extractor, rowcols, image))
                assert result.features.shape == want.shape
                assert np.max(np.abs(result.features - want)) <= 1e-4
                assert result.rowcols == list(rowcols) and result.scores is None


@pytest.mark.slow
def test_concurrent_async_jobs_share_the_batcher(images, pyspacer_features, runtime, efficientnet_weights):  # noqa: F811
    extractor = _extractor(efficientnet_weights)

    async def call(func, *args):
        def in_runtime():
            with runtime.activate():
                return func(*args)

        return await asyncio.to_thread(in_runtime)

    async def all_images():
        jobs = [
            pipeline.ImageJob(extractor, rowcols, DataLocation("filesystem", str(path)))
            for path, rowcols in images
        ]
        return await asyncio.gather(*(pipeline.run_async(job, runtime, call) for job in jobs))

    before = runtime.batcher(extractor.network()[0]).stats.patches
    results = asyncio.run(all_images())
    for result, want in zip(results, pyspacer_features):
        assert np.max(np.abs(result.features - want)) <= 1e-4
    after = runtime.batcher(extractor.network()[0]).stats.patches
    assert after - before == sum(len(rc) for _, rc in images)


def test_feature_file_written_and_errors_name_the_image(images, runtime, tmp_path, efficientnet_weights):  # noqa: F811
    extractor = _extractor(efficientnet_weights)
    path, rowcols = images[1]
    out = DataLocation("filesystem", str(tmp_path / "f.featurevector"))
    with runtime.activate():
        result = pipeline.run(pipeline.ImageJob(extractor, rowcols, path.read_bytes(), feature_loc=out))
        stored = ImageFeatures.load(out)
        np.testing.assert_array_equal(stored.feat, result.features)
        broken = tmp_path / "broken.jpg"
        broken.write_bytes(b"not a jpeg")
        with pytest.raises(ImageDecodeError, match="broken.jpg"):
            pipeline.run(pipeline.ImageJob(extractor, [(1, 1)], DataLocation("filesystem", str(broken))))
        with pytest.raises(RowColumnInvalidError, match="upload.jpg"):
            pipeline.run(pipeline.ImageJob(extractor, [(10_000, 1)], path.read_bytes(), "upload.jpg"))
        with pytest.raises(InvalidInputError, match="no points"):
            pipeline.run(pipeline.ImageJob(extractor, [], path.read_bytes(), "upload.jpg"))
        with pytest.raises(InvalidInputError, match="empty"):
            pipeline.run(pipeline.ImageJob(extractor, [(1, 1)], b"", "upload.jpg"))
    assert not (tmp_path / "never.featurevector").exists()


def test_extractors_without_a_network_take_the_rgb_path(images, runtime):
    path, rowcols = images[0]
    extractor = DummyExtractor(feature_dim=7)
    assert not extractor.batchable
    with runtime.activate():
        result = pipeline.run(pipeline.ImageJob(extractor, rowcols, path.read_bytes()))
    assert result.features.shape == (len(rowcols), 7)


def test_patches_wait_for_the_network_as_uint8(
    images,
    runtime,
    efficientnet_weights,  # noqa: F811
    monkeypatch,
):
    """Queued patches take 150 KB a point (uint8 crops), not the 600 KB of float32 input."""
    extractor = _extractor(efficientnet_weights)
    path, rowcols = images[0]
    job = pipeline.ImageJob(extractor, rowcols, path.read_bytes())
    with runtime.activate():
        prepared = pipeline.prepare(job)
    assert prepared.patches is not None
    assert prepared.patches.dtype == np.uint8 and prepared.patches.shape == (len(rowcols), 224, 224, 3)
    assert prepared.patches.nbytes == len(rowcols) * 150_528

    submitted: list[np.ndarray] = []
    original = Runtime.features_async

    async def spy(self, net, patches, **kwargs):
        submitted.append(patches)
        return await original(self, net, patches, **kwargs)

    async def call(func, *args):
        def in_runtime():
            with runtime.activate():
                return func(*args)

        return await asyncio.to_thread(in_runtime)

    monkeypatch.setattr(Runtime, "features_async", spy)
    result = asyncio.run(pipeline.run_async(job, runtime, call))
    [queued] = submitted
    assert queued.dtype == np.uint8 and queued.nbytes == len(rowcols) * 224 * 224 * 3
    with runtime.activate():
        np.testing.assert_allclose(result.features, pipeline.run(job).features, atol=1e-5)


def test_footprint_is_read_from_the_header(images, runtime, efficientnet_weights):  # noqa: F811
    extractor = _extractor(efficientnet_weights)
    path, rowcols = images[0]
    data = path.read_bytes()
    with runtime.activate():
        loaded = pipeline.load(pipeline.ImageJob(extractor, rowcols, data))
    width, height = loaded.size
    assert (width, height) == Image.open(path).size
    n, batch = len(rowcols), runtime.settings.batcher.max_batch_size
    patches, share = n * 224 * 224 * 3, min(n, batch) * 3 * 224 * 224 * 4
    assert loaded.footprint == pipeline.Footprint(
        len(data) + width * height * 3 + patches + share, patches + share
    )


def test_admission_is_asked_before_decoding_and_released_after_the_network(
    images, runtime, efficientnet_weights, monkeypatch
):  # noqa: F811
    extractor = _extractor(efficientnet_weights)
    path, rowcols = images[2]
    job = pipeline.ImageJob(extractor, rowcols, path.read_bytes())
    events: list[tuple[str, int]] = []
    cut = pipeline.cut

    def cut_spy(loaded):
        events.append(("cut", 0))
        return cut(loaded)

    class Hold:
        def resize(self, nbytes: int) -> None:
            events.append(("resize", nbytes))

        def release(self) -> None:
            events.append(("release", 0))

    async def admit(nbytes: int) -> Hold:
        events.append(("admit", nbytes))
        return Hold()

    async def call(func, *args):
        def in_runtime():
            with runtime.activate():
                return func(*args)

        return await asyncio.to_thread(in_runtime)

    monkeypatch.setattr(pipeline, "cut", cut_spy)
    with runtime.activate():
        footprint = pipeline.load(job).footprint
    asyncio.run(pipeline.run_async(job, runtime, call, admit=admit))
    assert events == [("admit", footprint.cutting), ("cut", 0), ("resize", footprint.waiting), ("release", 0)]


@pytest.mark.slow
def test_weights_that_give_nan_features_are_refused_and_nothing_is_stored(images, runtime, tmp_path, caplog):
    import io
    import logging

    import torch

    from spacer_core.weights.synthetic import weights_bytes

    state = torch.load(io.BytesIO(weights_bytes()), weights_only=True)
    stem = next(k for k in state["net"] if k.endswith("_conv_stem.weight"))
    state["net"][stem] = torch.full_like(state["net"][stem], float("nan"))
    weights = tmp_path / "nan_weights.pt"
    torch.save(state, weights)
    extractor = EfficientNetExtractor(data_locations={"weights": DataLocation("filesystem", str(weights))})
    out = tmp_path / "nan.featurevector"
    path, rowcols = images[0]
    caplog.set_level(logging.INFO)
    with runtime.activate(), pytest.raises(InvalidInputError, match="image0.jpg: the extractor gave NaN"):
        pipeline.run(
            pipeline.ImageJob(
                extractor,
                rowcols,
                DataLocation("filesystem", str(path)),
                feature_loc=DataLocation("filesystem", str(out)),
            )
        )
    assert not out.exists()
    # The compiled backends fail their check against eager PyTorch: one line each, no traceback.
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("failed" in r.getMessage() for r in warnings)
    assert all(r.exc_info is None for r in warnings)
