"""The runtime: bounded caches of networks, batchers, classifiers and file hashes."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from spacer.extractors.efficientnet import EfficientNetExtractor as PyspacerEfficientNet

from spacer_core import runtime as runtime_module
from spacer_core.data_classes import DataLocation
from spacer_core.extractors import EfficientNetExtractor
from spacer_core.extractors.efficientnet import build_network
from spacer_core.inference import BatcherClosedError, BatcherSettings, NetworkSpec
from spacer_core.inference.backends import probe_batch
from spacer_core.runtime import FileHashes, Runtime, RuntimeSettings
from spacer_core.storage import store_bytes


def _spec(weights, key=None) -> NetworkSpec:
    return NetworkSpec(key or weights.sha256, 1280, lambda: build_network(weights.path), "test weights")


@pytest.mark.slow
def test_features_match_pyspacer_and_compile_once(efficientnet_weights, tmp_path):  # noqa: F811
    active = Runtime(RuntimeSettings(device="cpu", compile_cache_dir=str(tmp_path)))
    batch = probe_batch(6, seed=5)
    with open(efficientnet_weights.path, "rb") as f:
        net = PyspacerEfficientNet.load_weights(f).eval()
    with torch.no_grad():
        expected = net.extract_features(torch.from_numpy(batch)).numpy()
    assert np.max(np.abs(active.features(_spec(efficientnet_weights), batch) - expected)) <= 1e-4
    assert len(list(tmp_path.glob("*.onnx"))) == 1
    assert active.backend(_spec(efficientnet_weights)) is active.backend(_spec(efficientnet_weights))
    assert active.loaded_models() == []  # only what was loaded on request is listed
    active.load_network(_spec(efficientnet_weights))
    [model] = active.loaded_models()
    assert model.kind == "extractor" and model.feature_dim == 1280


@pytest.mark.slow
def test_batcher_is_shared_and_replaced_after_eviction(efficientnet_weights, tmp_path):  # noqa: F811
    active = Runtime(RuntimeSettings(device="cpu", max_networks=1, compile_cache_dir=str(tmp_path)))
    first = active.batcher(_spec(efficientnet_weights))
    assert active.batcher(_spec(efficientnet_weights)) is first
    patches = probe_batch(3)
    features = first.extract_sync(patches, timeout=60)
    assert features.shape == (3, 1280)
    # A second network evicts the first batcher (max_networks=1), which closes it.
    other = active.batcher(_spec(efficientnet_weights, key="ef" * 32))
    assert other is not first
    for worker in first._workers:
        worker.join(10)
    assert first.closed
    with pytest.raises(BatcherClosedError):
        first.submit(patches)
    again = active.batcher(_spec(efficientnet_weights))
    assert again is not first and not again.closed
    np.testing.assert_allclose(again.extract_sync(patches, timeout=60), features, atol=1e-5)
    active.close()
    assert again.closed or not any(w.is_alive() for w in again._workers)


@pytest.mark.slow
def test_batcher_settings_are_the_runtimes_own(efficientnet_weights, tmp_path):  # noqa: F811
    small = Runtime(
        RuntimeSettings(
            device="cpu", batcher=BatcherSettings(max_batch_size=2), compile_cache_dir=str(tmp_path)
        )
    )
    large = Runtime(
        RuntimeSettings(
            device="cpu", batcher=BatcherSettings(max_batch_size=8), compile_cache_dir=str(tmp_path)
        )
    )
    assert small.batcher(_spec(efficientnet_weights)).max_batch_size == 2
    assert large.batcher(_spec(efficientnet_weights)).max_batch_size == 8
    small.close()
    large.close()


def test_activate_makes_the_runtime_current_for_extractors(efficientnet_weights, tmp_path):  # noqa: F811
    active = Runtime(RuntimeSettings(device="cpu", compile_cache_dir=str(tmp_path)))
    extractor = EfficientNetExtractor(
        data_locations={"weights": DataLocation("filesystem", str(efficientnet_weights.path))}
    )
    assert runtime_module.current() is runtime_module.default_runtime()
    with active.activate():
        assert runtime_module.current() is active
        extractor.network()
        assert len(active.file_hashes) == 1
    assert runtime_module.current() is runtime_module.default_runtime()


def test_classifier_reloaded_when_its_file_changes(tmp_path):
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.linear_model import SGDClassifier

    def fitted(seed):
        rng = np.random.default_rng(seed)
        x, y = rng.random((40, 5)), np.arange(40) % 2
        sgd = SGDClassifier(loss="log_loss", random_state=seed).fit(x, y)
        return CalibratedClassifierCV(sgd, cv="prefit").fit(x, y)

    active = Runtime(RuntimeSettings(max_classifiers=1))
    loc = DataLocation("filesystem", str(tmp_path / "clf.pkl"))
    store_bytes(loc, pickle.dumps(fitted(1), protocol=2))
    first = active.classifier(loc)
    assert active.classifier(loc) is first
    store_bytes(loc, pickle.dumps(fitted(2), protocol=2))
    os.utime(loc.key, ns=(1, 1))
    assert active.classifier(loc) is not first
    other = DataLocation("filesystem", str(tmp_path / "other.pkl"))
    store_bytes(other, pickle.dumps(fitted(3), protocol=2))
    active.load_classifier(loc)
    assert [m.name for m in active.loaded_models()] == [loc.key]
    active.load_classifier(other)
    assert [m.name for m in active.loaded_models()] == [other.key]  # bounded to one


def test_classifier_rewritten_in_place_with_size_and_mtime_kept_is_reloaded(tmp_path):
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.linear_model import SGDClassifier

    rng = np.random.default_rng(0)
    x = rng.random((40, 5))
    # Two classifiers whose pickles have the same length: the labels differ, not the layout.
    blobs = []
    for labels in ((0, 1), (7, 8)):
        y = np.array(labels)[np.arange(40) % 2]
        sgd = SGDClassifier(loss="log_loss", random_state=0).fit(x, y)
        blobs.append(pickle.dumps(CalibratedClassifierCV(sgd, cv="prefit").fit(x, y), protocol=2))
    assert len(blobs[0]) == len(blobs[1])
    path = tmp_path / "clf.pkl"
    path.write_bytes(blobs[0])
    stamp = path.stat()
    active = Runtime()
    loc = DataLocation("filesystem", str(path))
    assert active.classifier(loc).classes_.tolist() == [0, 1]
    with open(path, "r+b") as f:  # same inode, same size
        f.write(blobs[1])
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # mtime put back
    assert path.stat().st_mtime_ns == stamp.st_mtime_ns and path.stat().st_ino == stamp.st_ino
    assert active.classifier(loc).classes_.tolist() == [7, 8]


def test_file_hashes_are_bounded(tmp_path):
    hashes = FileHashes(max_entries=2)
    for i in range(4):
        (tmp_path / f"{i}").write_bytes(bytes([i]))
        hashes.sha256(str(tmp_path / f"{i}"))
    assert len(hashes) == 2


def test_image_pixel_bound_is_the_active_runtimes(tmp_path) -> None:
    from PIL import Image as PILImage

    from spacer_core import config, crop, limits
    from spacer_core.exceptions import DataLimitError
    from spacer_core.limits import Limits

    image = tmp_path / "im.png"
    PILImage.new("RGB", (40, 30)).save(image)
    small = Runtime(RuntimeSettings(limits=Limits(max_image_pixels=100)))
    with small.activate():
        assert limits.current().image_pixels == 100
        with pytest.raises(DataLimitError):
            crop.crop_patches(image.read_bytes(), [(5, 5)], 4)
    assert limits.current().image_pixels == config.MAX_IMAGE_PIXELS
    assert crop.crop_patches(image.read_bytes(), [(5, 5)], 4).shape == (1, 4, 4, 3)


def test_remote_hashes_are_a_bounded_lru_of_the_runtime() -> None:
    active = Runtime(RuntimeSettings(max_remote_hashes=2))
    for name in ("a", "b"):
        active.remote_hashes.put(name, name * 64)
    assert active.remote_hashes.get("a") == "a" * 64  # now the most recent
    active.remote_hashes.put("c", "c" * 64)
    assert (active.remote_hashes.get("b"), len(active.remote_hashes)) == (None, 2)
    assert Runtime().remote_hashes.get("a") is None  # another runtime knows nothing of these
    with pytest.raises(ValueError, match="max_entries"):
        runtime_module.BoundedMap(0)
    with pytest.raises(ValueError, match="max_remote_hashes"):
        RuntimeSettings(max_remote_hashes=0)
    with pytest.raises(ValueError, match="reader_threads"):
        RuntimeSettings(reader_threads=0)


def test_reader_pool_is_the_runtimes_bounded_and_closed_with_it() -> None:
    from spacer_core import train_utils

    active = Runtime(RuntimeSettings(reader_threads=2))
    with active.activate():
        pool = active.reader_pool()
        assert pool is active.reader_pool() and pool._max_workers == 2
        assert train_utils.runtime.current().reader_pool() is pool
    assert runtime_module.default_runtime().reader_pool() is not pool
    active.close()
    with pytest.raises(RuntimeError):
        pool.submit(int)
