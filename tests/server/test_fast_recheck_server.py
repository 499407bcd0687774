"""A `fast` server scores close calls from exact features (--fast-recheck-margin), end to end over gRPC."""

from __future__ import annotations

import numpy as np
import pytest

from server.client import SpacerClient
from server.config import ServerConfig
from server.testing import running_server
from spacer_core.inference.precision import cpu_has_bf16, openvino_available
from spacer_core.testing import extractor_json, fs_loc, make_classifier, photo_jpeg, random_points

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (cpu_has_bf16() and openvino_available()), reason="needs a CPU with native bf16 and OpenVINO"
    ),
]


def test_recheck_everything_gives_the_exact_servers_scores(efficientnet_weights, tmp_path):  # noqa: F811
    image = tmp_path / "photo.jpg"
    image.write_bytes(photo_jpeg(320, 240, seed=3))
    points = random_points(12, 320, 240, seed=3)
    classifier = make_classifier(tmp_path / "clf.pkl")
    extractor = extractor_json(efficientnet_weights.path, efficientnet_weights.sha256)
    config = ServerConfig(workers=2, log_level="WARNING", allow_any_path=True)

    def scores(**settings) -> np.ndarray:
        with (
            running_server(config, **settings) as server,
            SpacerClient(server.address, timeout=120) as client,
        ):
            reply = client.classify_image(extractor, points, fs_loc(image), fs_loc(classifier))
        return np.array([list(point.scores) for point in reply.scores])

    exact = scores(precision="exact")
    fast = scores(precision="fast", fast_recheck_margin=0.0)
    rechecked = scores(precision="fast", fast_recheck_margin=1.0)  # every point is a close call
    assert np.abs(fast - exact).max() > 1e-9  # bf16 features really move the scores
    np.testing.assert_allclose(rechecked, exact, rtol=0, atol=1e-6)
