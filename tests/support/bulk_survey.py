"""A small survey for bulk tests: JPEGs, a points manifest, weights and a classifier on disk.

    from tests.support.bulk_survey import make_survey
    s = make_survey(tmp_path, images=20, points=10)   # s.manifest, s.weights, s.classifier, s.images
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import SGDClassifier

from spacer_core.synthetic_weights import cached_weights

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
    return sorted({(int(r), int(c)) for r, c in zip(rng.integers(0, h, 4 * n), rng.integers(0, w, 4 * n))})[:n]


def make_survey(folder: Path, images: int = 20, points: int = 10, size: tuple[int, int] = (640, 480)) -> Survey:
    """`images` JPEGs in folder/images, a manifest naming them by relative path, weights, a classifier."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    paths = [write_image(folder / "images" / f"img{i:03d}.jpg", i, size) for i in range(images)]
    manifest = write_manifest(
        folder / "points.csv", {f"images/{p.name}": points_for(i, points, size) for i, p in enumerate(paths)}
    )
    return Survey(folder, paths, manifest, cached_weights().path, write_classifier(folder / "clf.pkl"))
