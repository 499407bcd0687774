"""The survey runner's workers: images run side by side, results and errors come in image order."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from spacer_core.survey import workflow as survey


class FakeRunner:
    """Records which images ran at the same time; 'bad' images raise."""

    def __init__(self, workers: int):
        self.workers = workers
        self.running = 0
        self.most = 0
        self.lock = threading.Lock()

    def _work(self, image: Path) -> None:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(0.05 if image.name.startswith("a") else 0.01)
        with self.lock:
            self.running -= 1
        if "bad" in image.name:
            raise ValueError(f"{image.name} is broken")

    def extract(self, extractor, image, rowcols, feature_file) -> None:
        self._work(image)

    def classify(self, extractor, image, rowcols, classifier_file):
        self._work(image)
        return ["x", "y"], [[0.25, 0.75] for _ in rowcols]


def _images(tmp_path: Path, names: list[str]) -> list[Path]:
    for name in names:
        (tmp_path / name).write_bytes(b"not read by the fake runner")
    return [tmp_path / name for name in names]


def test_extract_runs_images_side_by_side_and_reports_in_order(tmp_path):
    images = _images(tmp_path, ["a0.jpg", "b1.jpg", "a2.jpg", "b3.jpg"])
    points = {p.name: [(1, 1), (2, 2)] for p in images}
    runner = FakeRunner(workers=2)
    seen = []
    out = survey.extract_images(
        runner, None, images, points, tmp_path / "f", progress=lambda i, n, name: seen.append((i, name))
    )
    assert [o.image for o in out] == [p.name for p in images]
    assert seen == [(i + 1, p.name) for i, p in enumerate(images)]
    assert runner.most == 2


def test_classify_keeps_image_order_and_the_first_error_in_order_raises(tmp_path):
    images = _images(tmp_path, ["a0.jpg", "b1.jpg", "a2.jpg"])
    points = {p.name: [(1, 1)] for p in images}
    from spacer_core.testing import write_classifier

    rows, classes = survey.classify_images(
        FakeRunner(2), None, write_classifier(tmp_path / "c.pkl"), images, points, threshold=0.0
    )
    assert [r[0] if isinstance(r, tuple) else r for r in rows] and classes == ["x", "y"]
    assert len(rows) == 3
    bad = _images(tmp_path, ["a5.jpg", "bad6.jpg", "bad7.jpg"])
    with pytest.raises(ValueError, match="bad6"):
        survey.extract_images(FakeRunner(2), None, bad, {p.name: [(1, 1)] for p in bad}, tmp_path / "f")


def test_one_worker_runs_one_image_at_a_time(tmp_path):
    images = _images(tmp_path, ["a0.jpg", "a1.jpg", "a2.jpg"])
    runner = FakeRunner(workers=1)
    survey.extract_images(runner, None, images, {p.name: [(1, 1)] for p in images}, tmp_path / "f")
    assert runner.most == 1
    assert survey.LocalRunner().workers >= 1 and survey.LocalRunner(3).workers == 3


def test_local_runner_runs_the_bulk_engine_every_image_tried_failures_listed(tmp_path):
    from spacer_core.testing import write_image
    from spacer_core.weights.synthetic import cached_weights

    good = [write_image(tmp_path / f"good{i}.jpg", i) for i in range(2)]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(good[0].read_bytes()[:400])
    images = [good[0], broken, good[1]]
    extractor = survey.weights_extractor(cached_weights().path)
    points = {p.name: [(10, 10), (100, 200)] for p in images}
    seen = []
    with pytest.raises(survey.SurveyError, match=r"1 of 3 images failed .*broken\.jpg"):
        survey.extract_images(
            survey.LocalRunner(2),
            extractor,
            images,
            points,
            tmp_path / "f",
            progress=lambda *a: seen.append(a),
        )
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == [
        "good0.jpg.featurevector",
        "good1.jpg.featurevector",
    ]
    assert len(seen) == 3
    out = survey.extract_images(survey.LocalRunner(2), extractor, good, points, tmp_path / "g")
    assert [(o.image, o.points) for o in out] == [("good0.jpg", 2), ("good1.jpg", 2)]
    assert all(o.feature_file.is_file() for o in out)
