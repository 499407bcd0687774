"""Deterministic synthetic data for tests and benchmarks (in the spirit of `numpy.testing`).

CoralNet's surveys, weights and classifiers are not public, so tests and
benchmarks build their own from seeds: photo-like images, random points,
EfficientNet-b0 weight files (`spacer_core.weights.synthetic`), calibrated
classifiers stored as pyspacer stores them, and whole bulk surveys on disk.
The same arguments always give the same bytes. Also here: what /proc says
about a process (resident memory, its peak, threads, CPU time), for the
memory checks of tests and benchmarks alike.

    from spacer_core.testing import cached_weights, make_classifier, make_survey
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import SGDClassifier
from sklearn.neural_network import MLPClassifier

from spacer_core.data_classes import DataLocation, ImageFeatures
from spacer_core.weights.synthetic import (
    DATAPARALLEL_PREFIX,
    WeightsFile,
    cached_weights,
    make_state_dict,
    make_weights,
    weights_bytes,
)

__all__ = [
    "DATAPARALLEL_PREFIX",
    "SURVEY_CLASSES",
    "ProcStatus",
    "Survey",
    "WeightsFile",
    "cached_weights",
    "calibrated_classifier",
    "extractor_json",
    "fs_loc",
    "make_classifier",
    "make_image",
    "make_state_dict",
    "make_survey",
    "make_weights",
    "photo_jpeg",
    "png_header",
    "points_for",
    "proc_status",
    "random_points",
    "read_features",
    "weights_bytes",
    "write_classifier",
    "write_image",
    "write_manifest",
    "write_photo_jpeg",
]

# ---------------------------------------------------------------- locations and messages


def fs_loc(path: Any) -> dict[str, Any]:
    """A filesystem DataLocation as pyspacer serializes it."""
    return {"storage_type": "filesystem", "key": str(path), "bucket_name": None}


def extractor_json(weights_path: Any, sha256: str) -> dict[str, Any]:
    """pyspacer 0.14.0 JSON of an EfficientNetExtractor on a filesystem weights file."""
    return {
        "class_path": "spacer.extractors.efficientnet.EfficientNetExtractor",
        "data_locations": {"weights": fs_loc(weights_path)},
        "data_hashes": {"weights": sha256},
    }


# ---------------------------------------------------------------- images and points


def make_image(path: Any, width: int = 96, height: int = 72, seed: int = 0) -> Any:
    """Write a small smooth-plus-noise RGB image (format from the suffix); returns path."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR))
    noise = rng.integers(-20, 21, smooth.shape)
    pixels = np.clip(smooth.astype(int) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def photo_jpeg(width: int, height: int, seed: int = 0, grid: tuple[int, int] = (12, 16)) -> bytes:
    """A survey-like JPEG (quality 90): smooth colour fields from a `grid` of random colours plus grain.

    It compresses like a photo, so encoded sizes and decode costs are realistic.
    """
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (*grid, 3), dtype=np.uint8)
    smooth = np.asarray(
        Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16
    )
    # Grey grain (one value for the three channels), as sensor noise mostly is.
    smooth += rng.integers(-12, 13, (height, width, 1), dtype=np.int16)
    out = io.BytesIO()
    Image.fromarray(np.clip(smooth, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def write_photo_jpeg(
    path: Path, width: int, height: int, seed: int = 0, grid: tuple[int, int] = (12, 16)
) -> Path:
    """Write `photo_jpeg(width, height, seed, grid)` to `path`; returns path."""
    Path(path).write_bytes(photo_jpeg(width, height, seed, grid))
    return path


def random_points(n: int, width: int, height: int, seed: int = 0) -> list[tuple[int, int]]:
    """`n` (row, col) points drawn uniformly inside a width x height image (repeats possible)."""
    rng = np.random.default_rng(seed)
    return [(int(r), int(c)) for r, c in zip(rng.integers(0, height, n), rng.integers(0, width, n))]


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height; the pixel data is a stub."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


# ---------------------------------------------------------------- classifiers


def make_classifier(path: Any, feature_dim: int = 1280, classes: tuple = (1, 2, 3), seed: int = 0) -> Any:
    """Store a fitted CalibratedClassifierCV (as pyspacer trains them) at path; returns path."""
    rng = np.random.default_rng(seed)
    n = 30 * len(classes)
    x = rng.normal(size=(n, feature_dim))
    y = np.array([classes[i % len(classes)] for i in range(n)])
    x += np.eye(len(classes), feature_dim)[[classes.index(c) for c in y]] * 3
    clf = SGDClassifier(loss="log_loss", average=True, random_state=0).fit(x, y)
    calibrated = CalibratedClassifierCV(clf, cv="prefit").fit(x, y)
    with open(path, "wb") as f:
        pickle.dump(calibrated, f, protocol=2)
    return path


def calibrated_classifier(
    kind: str = "LR", feature_dim: int = 1280, classes: tuple = (1, 2, 3), seed: int = 0
) -> CalibratedClassifierCV:
    """A fitted CalibratedClassifierCV in memory: pyspacer's `LR` (SGD) or a small `MLP`.

    Different seeds give different features to fit, so different models.
    """
    if kind not in ("LR", "MLP"):
        raise ValueError(f"kind must be 'LR' or 'MLP', not {kind!r}")
    rng = np.random.default_rng(seed)
    y = np.array([classes[i % len(classes)] for i in range(20 * len(classes))])
    x = (
        rng.normal(size=(len(y), feature_dim))
        + np.eye(len(classes), feature_dim)[[classes.index(c) for c in y]] * 3
    )
    base = (
        SGDClassifier(loss="log_loss", random_state=0)
        if kind == "LR"
        else MLPClassifier((4,), max_iter=2, random_state=0)
    )
    with warnings.catch_warnings():
        # Two MLP iterations never converge; these are fixtures, not models.
        warnings.simplefilter("ignore")
        base.partial_fit(x, y, classes=list(classes))
        return CalibratedClassifierCV(base, cv="prefit").fit(x, y)


# ---------------------------------------------------------------- bulk surveys

SURVEY_CLASSES = ("CCA", "Porit", "Sand")


@dataclass
class Survey:
    """A survey on disk: its folder, JPEGs, points manifest, weights and classifier."""

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
    """A points manifest (`Name,Row,Column`) of each image's (row, col) points."""
    lines = ["Name,Row,Column"] + [f"{n},{r},{c}" for n, pts in names_points.items() for r, c in pts]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_classifier(path: Path, dim: int = 1280, seed: int = 0) -> Path:
    """A calibrated linear classifier over `dim`-d features with the three `SURVEY_CLASSES`."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (300, dim))
    y = np.array(SURVEY_CLASSES)[np.argmax(x[:, :3], axis=1)]
    base = SGDClassifier(loss="log_loss", random_state=0).fit(x[:150], y[:150])
    clf = CalibratedClassifierCV(base, cv="prefit").fit(x[150:], y[150:])
    path.write_bytes(pickle.dumps(clf, protocol=2))
    return path


def points_for(seed: int, n: int, size: tuple[int, int] = (640, 480)) -> list[tuple[int, int]]:
    """`n` distinct (row, col) points, sorted, inside an image of `size` = (width, height)."""
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


def read_features(path: Path) -> tuple[list[tuple[int | None, int | None]], np.ndarray]:
    """The (row, col) points (None for files without them) and the feature rows of a feature file."""
    f = ImageFeatures.load(DataLocation("filesystem", str(path)))
    return [(p.row, p.col) for p in f.point_features], np.array([p.data for p in f.point_features])


# ---------------------------------------------------------------- processes


@dataclass(frozen=True)
class ProcStatus:
    """Resident memory now and at its peak (MiB), thread count and CPU seconds used of one process."""

    rss_mib: float
    peak_rss_mib: float
    threads: int
    cpu_s: float


def proc_status(pid: int) -> ProcStatus:
    """Read VmRSS, VmHWM and Threads from /proc/<pid>/status, user + system time from /proc/<pid>/stat."""
    fields: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    # The command name (field 2) may hold spaces; count fields after its ')'.
    stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    stat = ["pid", "comm", *stat]
    return ProcStatus(
        rss_mib=int(fields["VmRSS"].split()[0]) / 1024,
        peak_rss_mib=int(fields["VmHWM"].split()[0]) / 1024,
        threads=int(fields["Threads"]),
        cpu_s=(int(stat[13]) + int(stat[14])) / os.sysconf("SC_CLK_TCK"),
    )
