"""A small survey for bulk tests: JPEGs, a points manifest, weights and a classifier on disk.

from tests.support.bulk_survey import make_survey
s = make_survey(tmp_path, images=20, points=10)   # s.manifest, s.weights, s.classifier, s.images
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import SGDClassifier

from spacer_core.data_classes import DataLocation, ImageFeatures
from spacer_core.weights.synthetic import cached_weights

CLASSES = ("CCA", "Porit", "Sand")


@dataclass
class Survey:
    folder: Path
    images: list[Path]
    manifest: Path
    weights: Path
    classifier: Path


def write_image(path: Path, seed: int, size: tuple[int, int] = (640, 480)) -> Path:
    """A JPEG of smooth colour fields plus noise (so patches differ), `size` = (width, height)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * (i + 1) + yy * (3 - i)) % 256 for i in range(3)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def write_manifest(path: Path, names_points: dict[str, list[tuple[int, int]]]) -> Path:
    lines = ["Name,Row,Column"] + [f"{n},{r},{c}" for n, pts in names_points.items() for r, c in pts]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_classifier(path: Path, dim: int = 1280, seed: int = 0) -> Path:
    """A calibrated linear classifier over `dim`-d features with three string classes."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (300, dim))
    y = np.array(CLASSES)[np.argmax(x[:, :3], axis=1)]
    base = SGDClassifier(loss="log_loss", random_state=0).fit(x[:150], y[:150])
    clf = CalibratedClassifierCV(base, cv="prefit").fit(x[150:], y[150:])
    path.write_bytes(pickle.dumps(clf, protocol=2))
    return path


def points_for(seed: int, n: int, size: tuple[int, int] = (640, 480)) -> list[tuple[int, int]]:
    rng = np.random.default_rng(1000 + seed)
    w, h = size
    return sorted({(int(r), int(c)) for r, c in zip(rng.integers(0, h, 4 * n), rng.integers(0, w, 4 * n))})[
        :n
    ]


def make_survey(
    folder: Path, images: int = 20, points: int = 10, size: tuple[int, int] = (640, 480)
) -> Survey:
    """`images` JPEGs in folder/images, a manifest naming them by relative path, weights, a classifier."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    paths = [write_image(folder / "images" / f"img{i:03d}.jpg", i, size) for i in range(images)]
    manifest = write_manifest(
        folder / "points.csv", {f"images/{p.name}": points_for(i, points, size) for i, p in enumerate(paths)}
    )
    return Survey(folder, paths, manifest, cached_weights().path, write_classifier(folder / "clf.pkl"))


def read_features(path: Path) -> tuple[list[tuple[int, int]], np.ndarray]:
    """The (row, col) points and the feature rows of a feature file."""
    f = ImageFeatures.load(DataLocation("filesystem", str(path)))
    return [(p.row, p.col) for p in f.point_features], np.array([p.data for p in f.point_features])


def assert_matches_pyspacer(weights: Path, image: Path, feature_file: Path, scratch: Path) -> None:
    """Our feature file for `image` agrees with pyspacer's extract_features (<= 1e-4), point for point."""
    from spacer.data_classes import DataLocation as SpLoc
    from spacer.extractors import FeatureExtractor as SpExtractor
    from spacer.messages import ExtractFeaturesMsg
    from spacer.tasks import extract_features

    from tests.support.grpc_server import extractor_json

    rowcols, ours = read_features(feature_file)
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    extract_features(
        ExtractFeaturesMsg(
            "o",
            SpExtractor.deserialize(extractor_json(weights, sha)),
            rowcols,
            SpLoc("filesystem", str(image)),
            SpLoc("filesystem", str(scratch / "o.fv")),
        )
    )
    theirs = read_features(scratch / "o.fv")
    assert theirs[0] == rowcols
    np.testing.assert_allclose(ours, theirs[1], atol=1e-4, rtol=0)
