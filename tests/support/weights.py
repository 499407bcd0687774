"""Test side of spacer_core.weights.synthetic: the session-scoped weights fixture.

    from tests.support.weights import make_weights, efficientnet_weights

`make_weights(path)` writes a file and returns its sha256; the session-scoped
pytest fixture `efficientnet_weights` gives a `WeightsFile(path, sha256)`
made once per test session. Register the fixture by importing it into a test
module (or `pytest_plugins = ["tests.support.weights"]` in a conftest).
"""

from __future__ import annotations

import pytest

from spacer_core.weights.synthetic import (  # noqa: F401  (re-exported for tests and benchmarks)
    DATAPARALLEL_PREFIX,
    WeightsFile,
    _calibrated_state,
    cached_weights,
    make_state_dict,
    make_weights,
    weights_bytes,
)


@pytest.fixture(scope="session")
def efficientnet_weights(tmp_path_factory: pytest.TempPathFactory) -> WeightsFile:
    """A CoralNet-format EfficientNet-b0 weights file (`module.` keys) and its sha256."""
    path = tmp_path_factory.mktemp("weights") / "efficientnet_b0.pt"
    return WeightsFile(path, make_weights(path))
