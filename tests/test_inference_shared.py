"""Process-wide backends and batchers, and the runner the library's extractors use."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from spacer.extractors.efficientnet import EfficientNetExtractor as PyspacerEfficientNet

from spacer_core.extractors.efficientnet import build_network
from spacer_core.inference import BatcherClosedError, network_runner, shared_batcher
from spacer_core.inference import shared as shared_module
from spacer_core.inference.backends import probe_batch
from tests.support.weights import efficientnet_weights  # noqa: F401  (fixture)


@pytest.fixture
def isolated_caches(monkeypatch, tmp_path):
    """Fresh process-wide caches whose compiled artifacts go to a temporary directory."""
    from spacer_core import config
    from spacer_core.inference.model_cache import ModelCache

    monkeypatch.setattr(config, "EXTRACTORS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(shared_module, "backend_cache", ModelCache(max_items=2))
    monkeypatch.setattr(shared_module, "batcher_cache",
                        ModelCache(max_items=1, on_evict=shared_module._close_quietly))
    yield tmp_path
    shared_module.batcher_cache.clear()


def test_network_runner_matches_pyspacer(efficientnet_weights, isolated_caches):  # noqa: F811
    data = efficientnet_weights.path.read_bytes()
    runner = network_runner(data, "test weights")
    batch = probe_batch(6, seed=5)
    with open(efficientnet_weights.path, "rb") as f:
        net = PyspacerEfficientNet.load_weights(f).eval()
    with torch.no_grad():
        expected = net.extract_features(torch.from_numpy(batch)).numpy()
    assert np.max(np.abs(runner(batch) - expected)) <= 1e-4
    # Compiled once into EXTRACTORS_CACHE_DIR/compiled, then reused from memory.
    assert len(list((isolated_caches / "compiled").glob("*.onnx"))) == 1
    assert network_runner(data, "again").backend is runner.backend


def test_shared_batcher_is_shared_and_replaced_after_eviction(efficientnet_weights, isolated_caches):  # noqa: F811
    def make():
        return build_network(efficientnet_weights.path)

    first = shared_batcher(efficientnet_weights.sha256, make, device="cpu")
    assert shared_batcher(efficientnet_weights.sha256, make, device="cpu") is first
    patches = np.full((3, 224, 224, 3), 120, np.uint8)
    features = first.extract_sync(patches, timeout=60)
    assert features.shape == (3, 1280)
    # A second weights file evicts the first batcher (max_items=1), which closes it.
    other = shared_batcher("ef" * 32, make, device="cpu")
    assert other is not first
    for worker in first._workers:
        worker.join(10)
    assert first.closed
    with pytest.raises(BatcherClosedError):
        first.submit(patches)
    again = shared_batcher(efficientnet_weights.sha256, make, device="cpu")
    assert again is not first and not again.closed
    np.testing.assert_allclose(again.extract_sync(patches, timeout=60), features, atol=1e-5)
