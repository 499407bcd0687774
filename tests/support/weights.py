"""The session-scoped weights fixture; the weights themselves come from spacer_core.testing.

Registered for every test module by tests/conftest.py (`pytest_plugins`).
"""

from __future__ import annotations

import pytest

from spacer_core.testing import WeightsFile, make_weights


@pytest.fixture(scope="session")
def efficientnet_weights(tmp_path_factory: pytest.TempPathFactory) -> WeightsFile:
    """A CoralNet-format EfficientNet-b0 weights file (`module.` keys) and its sha256."""
    path = tmp_path_factory.mktemp("weights") / "efficientnet_b0.pt"
    return WeightsFile(path, make_weights(path))
