"""`fast` precision rechecks close calls in exact precision (pipeline.recheck, Runtime.exact_features).

The CPU tests run everywhere: their `fast` network is the real exact network
with its features rounded to bf16 (a real backend, built where the runtime
builds its backends), so fast and exact features genuinely differ on any
CPU. The OpenVINO test runs the real bf16 backend where the CPU and the
`fast` extra allow.
"""

from __future__ import annotations

import asyncio
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import SGDClassifier

import spacer_core.runtime as runtime_module
from spacer_core import pipeline
from spacer_core.data_classes import DataLocation, ImageFeatures
from spacer_core.extractors import EfficientNetExtractor
from spacer_core.inference.backends import Backend, PendingFeatures, ready
from spacer_core.inference.precision import Precision, cpu_has_bf16, openvino_available
from spacer_core.runtime import Runtime, RuntimeSettings
from spacer_core.testing import photo_jpeg, random_points

WIDTH, HEIGHT, POINTS = 480, 360, 24


class RoundedToBf16(Backend):
    """The exact network with its features rounded to bf16: reduced precision on any CPU."""

    name = "bf16-rounded"

    def __init__(self, exact: Backend):
        super().__init__(exact.device, Precision.FAST)
        self.exact = exact
        self.nbytes = exact.nbytes
        self.preferred_batch_size = exact.preferred_batch_size
        self.parallelism = exact.parallelism

    def allocate_batch(self, n: int) -> np.ndarray:
        return self.exact.allocate_batch(n)

    def launch(self, batch: np.ndarray) -> PendingFeatures:
        features = torch.from_numpy(self.exact.run(batch))
        return ready(features.to(torch.bfloat16).to(torch.float32).numpy())


@pytest.fixture
def rounded_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runtimes build `fast` networks as RoundedToBf16 during the test (exact ones as usual)."""
    original = runtime_module.load_backend

    def load(sha256, make_net, *, precision, **kwargs):
        if Precision.parse(precision) is Precision.FAST:
            return RoundedToBf16(original(sha256, make_net, precision=Precision.EXACT, **kwargs))
        return original(sha256, make_net, precision=precision, **kwargs)

    monkeypatch.setattr(runtime_module, "load_backend", load)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("compiled"))


@pytest.fixture(scope="module")
def image() -> tuple[bytes, list[tuple[int, int]]]:
    return photo_jpeg(WIDTH, HEIGHT, seed=5), random_points(POINTS, WIDTH, HEIGHT, seed=5)


@pytest.fixture(scope="module")
def extractor(efficientnet_weights) -> EfficientNetExtractor:  # noqa: F811
    return EfficientNetExtractor(
        data_locations={"weights": DataLocation("filesystem", str(efficientnet_weights.path))}
    )


def make_runtime(compiled: str, precision: str, margin: float = 0.0) -> Runtime:
    return Runtime(
        RuntimeSettings(
            device="cpu", precision=precision, fast_recheck_margin=margin, compile_cache_dir=compiled
        )
    )


def extract(active: Runtime, extractor, image) -> np.ndarray:
    data, points = image
    with active.activate():
        return pipeline.run(pipeline.ImageJob(extractor, points, data)).features


@pytest.fixture(scope="module")
def exact_features(extractor, image, compiled) -> np.ndarray:
    active = make_runtime(compiled, "exact")
    try:
        return extract(active, extractor, image)
    finally:
        active.close()


@pytest.fixture(scope="module")
def classifier(exact_features, tmp_path_factory) -> tuple[DataLocation, CalibratedClassifierCV]:
    """pyspacer's LR recipe fitted to these very points (labels at random), so their margins spread."""
    labels = np.random.default_rng(0).integers(0, 3, len(exact_features))
    x = exact_features.astype(np.float64)
    clf = CalibratedClassifierCV(
        SGDClassifier(loss="log_loss", average=True, random_state=0).fit(x, labels), cv="prefit"
    ).fit(x, labels)
    path = tmp_path_factory.mktemp("classifier") / "clf.pkl"
    path.write_bytes(pickle.dumps(clf))
    return DataLocation("filesystem", str(path)), clf


def classify(active: Runtime, extractor, image, loc: DataLocation, **job) -> pipeline.ImageResult:
    data, points = image
    with active.activate():
        return pipeline.run(pipeline.ImageJob(extractor, points, data, classifier_loc=loc, **job))


def classify_async(active: Runtime, extractor, image, loc: DataLocation) -> pipeline.ImageResult:
    data, points = image

    async def call(func, *args):
        def in_runtime():
            with active.activate():
                return func(*args)

        return await asyncio.to_thread(in_runtime)

    job = pipeline.ImageJob(extractor, points, data, classifier_loc=loc)
    return asyncio.run(pipeline.run_async(job, active, call))


@pytest.fixture
def fast_unchecked(rounded_fast, extractor, image, classifier, compiled) -> pipeline.ImageResult:
    """Fast features and scores without a recheck (margin 0)."""
    active = make_runtime(compiled, "fast", margin=0.0)
    try:
        result = classify(active, extractor, image, classifier[0])
        assert active.recheck_counts.images == 0 and active.recheck_counts.rechecked == 0
        return result
    finally:
        active.close()


def median_margin(scores: np.ndarray) -> float:
    top2 = np.sort(scores, axis=1)[:, -2:]
    return float(np.median(top2[:, 1] - top2[:, 0]))


def test_close_calls_get_exact_features_and_scores_far_points_keep_fast_ones(
    rounded_fast, extractor, image, classifier, compiled, exact_features, fast_unchecked, tmp_path, caplog
):
    loc, clf = classifier
    fast = fast_unchecked.features
    # The perturbed network really differs from the exact one, point by point.
    assert (np.abs(fast - exact_features).max(axis=1) > 1e-4).all()
    margin = median_margin(fast_unchecked.scores)
    close = pipeline.close_calls(fast_unchecked.scores, margin)
    far = np.setdiff1d(np.arange(POINTS), close)
    assert 0 < len(close) < POINTS

    active = make_runtime(compiled, "fast", margin=margin)
    try:
        stored_at = DataLocation("filesystem", str(tmp_path / "rechecked.featurevector"))
        with caplog.at_level("DEBUG", logger="spacer_core.pipeline"):
            result = classify(active, extractor, image, loc, feature_loc=stored_at)
        assert f"{len(close)} of {POINTS} points rechecked in exact precision" in caplog.text
        np.testing.assert_allclose(result.features[close], exact_features[close], rtol=0, atol=1e-5)
        np.testing.assert_array_equal(result.features[far], fast[far])
        exact_scores = clf.predict_proba(exact_features.astype(np.float64))
        np.testing.assert_allclose(result.scores[close], exact_scores[close], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(result.scores[far], fast_unchecked.scores[far])
        # The stored file holds what was scored: exact features for the rechecked points.
        np.testing.assert_array_equal(ImageFeatures.load(stored_at).feat, result.features)
        made = ImageFeatures.load_provenance(stored_at)
        assert made is not None and made.precision == "fast"  # a rerun in exact precision redoes it
        counts = active.recheck_counts
        assert (counts.images, counts.points, counts.rechecked) == (1, POINTS, len(close))

        # The asyncio path (the server's) rechecks the same points to the same result.
        again = classify_async(active, extractor, image, loc)
        np.testing.assert_allclose(again.features, result.features, rtol=0, atol=1e-5)
        np.testing.assert_allclose(again.scores, result.scores, rtol=0, atol=1e-6)
        assert active.recheck_counts.rechecked == 2 * len(close)
        # One network entry, twin included: listed once, its bytes counted once more.
        assert [m.kind for m in active.loaded()].count("extractor") == 1
        network = active._networks.peek(extractor.network()[0].key)
        assert network is not None and network.exact is not None
        assert network.nbytes == network.backend.nbytes + network.exact.backend.nbytes
        assert active._networks.total_bytes >= network.nbytes
    finally:
        active.close()


def test_margin_zero_exact_precision_and_extract_only_never_recheck(
    rounded_fast, extractor, image, classifier, compiled, exact_features, fast_unchecked
):
    loc, _ = classifier
    net = extractor.network()[0]
    exact = make_runtime(compiled, "exact", margin=0.5)
    try:
        assert exact.recheck_margin(net) == 0.0
        result = classify(exact, extractor, image, loc)
        np.testing.assert_array_equal(result.features, exact_features)
        assert exact.recheck_counts.images == 0
    finally:
        exact.close()

    fast = make_runtime(compiled, "fast", margin=1.0)  # every scored point would be rechecked
    try:
        assert fast.recheck_margin(net) == 1.0
        only_features = extract(fast, extractor, image)
        np.testing.assert_array_equal(only_features, fast_unchecked.features)
        assert fast.recheck_counts.images == 0
        network = fast._networks.peek(net.key)
        assert network is not None and network.exact is None  # no twin built for extract-only work
        # ...while a classified image is rechecked in full.
        result = classify(fast, extractor, image, loc)
        np.testing.assert_allclose(result.features, exact_features, rtol=0, atol=1e-5)
        assert fast.recheck_counts.rechecked == POINTS
    finally:
        fast.close()

    with pytest.raises(ValueError, match="fast_recheck_margin"):
        RuntimeSettings(fast_recheck_margin=-0.1)


@pytest.mark.slow
@pytest.mark.skipif(
    not (cpu_has_bf16() and openvino_available()), reason="needs a CPU with native bf16 and OpenVINO"
)
def test_openvino_fast_rechecks_close_calls_exactly(extractor, image, classifier, tmp_path, exact_features):
    loc, clf = classifier
    compiled = str(tmp_path / "compiled")
    unchecked = make_runtime(compiled, "fast", margin=0.0)
    try:
        assert unchecked.backend(extractor.network()[0]).name == "openvino"
        fast = classify(unchecked, extractor, image, loc)
    finally:
        unchecked.close()
    assert np.abs(fast.features - exact_features).max() > 1e-4  # bf16 really differs
    margin = median_margin(fast.scores)
    close = pipeline.close_calls(fast.scores, margin)
    assert 0 < len(close) < POINTS
    active = make_runtime(compiled, "fast", margin=margin)
    try:
        result = classify(active, extractor, image, loc)
        again = classify_async(active, extractor, image, loc)
    finally:
        active.close()
    np.testing.assert_allclose(result.features[close], exact_features[close], rtol=0, atol=1e-5)
    exact_scores = clf.predict_proba(exact_features.astype(np.float64))
    np.testing.assert_allclose(result.scores[close], exact_scores[close], rtol=0, atol=1e-6)
    far = np.setdiff1d(np.arange(POINTS), close)
    np.testing.assert_allclose(result.features[far], fast.features[far], rtol=0, atol=1e-5)
    np.testing.assert_allclose(again.scores, result.scores, rtol=0, atol=1e-6)
    assert Path(compiled).is_dir()


def test_a_recheck_that_costs_more_than_exact_is_reported_once(caplog):
    import logging

    from spacer_core.runtime import RecheckCounts

    caplog.set_level(logging.WARNING, logger="spacer_core.runtime")
    cheap = RecheckCounts()
    for _ in range(20):
        cheap.add(100, 10)
    assert not caplog.records
    costly = RecheckCounts()
    for _ in range(4):
        costly.add(100, 90)
    assert not caplog.records  # too few points to judge yet
    for _ in range(5):
        costly.add(100, 90)
    (record,) = caplog.records
    assert "450 of 500 scored points (90%)" in record.getMessage()
    assert "exact precision" in record.getMessage()
