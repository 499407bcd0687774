"""A small synthetic survey to try the whole workflow without CoralNet's private weights.

`build_survey(folder)` makes, from nothing and without downloads:
seabed-like images whose regions carry one of a few textures (the classes),
CoralNet-format annotation CSVs for them (points placed as CoralNet's
stratified random point generation does; each labelled with the texture
under it), and deterministic EfficientNet-b0 weights with calibrated
BatchNorm statistics. `run_demo` then extracts, trains, classifies the
held-out images and writes both reports, through any survey Runner (in
process or a gRPC server).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spacer_core.storage import write_file_atomic
from spacer_core.survey import coralnet, reports
from spacer_core.survey import workflow as survey
from spacer_core.weights.synthetic import make_weights

TRAIN_IMAGES = 16
NEW_IMAGES = 3
WIDTH, HEIGHT = 1024, 768
POINTS = coralnet.PointSpec("stratified", cell_rows=5, cell_cols=5, per_cell=2)
EPOCHS = 10
THRESHOLD = 0.85
WEIGHTS_SEED = 0


def _texture(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A (HEIGHT, WIDTH, 3) float image of one class's texture, in [0, 255]."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    noise = rng.normal(0, 1, (HEIGHT, WIDTH)).astype(np.float32)
    if kind == "SAND":  # pale, fine grain
        base, shade = np.array([214, 196, 150]), 12 * noise
    elif kind == "CORAL":  # pink with round polyps
        cells = np.sin(xx / 6 + rng.uniform(0, 6)) * np.sin(yy / 6 + rng.uniform(0, 6))
        base, shade = np.array([205, 110, 140]), 45 * cells + 8 * noise
    elif kind == "ALGAE":  # green, wavy fronds
        waves = np.sin((xx + 12 * np.sin(yy / 17)) / 4 + rng.uniform(0, 6))
        base, shade = np.array([70, 140, 60]), 40 * waves + 8 * noise
    else:  # ROCK: dark grey, coarse blotches
        coarse = rng.normal(0, 1, (HEIGHT // 16 + 1, WIDTH // 16 + 1))
        blotch = np.kron(coarse, np.ones((16, 16)))[:HEIGHT, :WIDTH]
        base, shade = np.array([95, 95, 100]), 25 * blotch + 10 * noise
    return np.clip(base[None, None, :] + shade[..., None], 0, 255)


CLASSES = ("SAND", "CORAL", "ALGAE", "ROCK")


def seabed(seed: int) -> tuple[bytes, np.ndarray]:
    """A JPEG of a synthetic seabed and its (HEIGHT, WIDTH) map of class indices.

    Regions are the Voronoi cells of a few random centres; every class gets
    at least one region, so each image holds all classes.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    centres = rng.uniform([0, 0], [HEIGHT, WIDTH], size=(6, 2))
    kinds = np.concatenate([rng.permutation(len(CLASSES)), rng.integers(0, len(CLASSES), 2)])
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    distance = (yy[..., None] - centres[:, 0]) ** 2 + (xx[..., None] - centres[:, 1]) ** 2
    region_map = kinds[np.argmin(distance, axis=-1)]
    pixels = np.zeros((HEIGHT, WIDTH, 3), dtype=np.float32)
    for index, kind in enumerate(CLASSES):
        mask = region_map == index
        if mask.any():
            pixels[mask] = _texture(kind, rng)[mask]
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue(), region_map


@dataclass
class Survey:
    """Where build_survey put things."""

    folder: Path
    weights: Path
    train_images: list[Path]
    new_images: list[Path]
    annotations: Path  # labels of the training images
    new_annotations: Path  # labels of the held-out images (truth, for evaluation)
    features: Path = field(init=False)
    classifier: Path = field(init=False)
    results: Path = field(init=False)

    def __post_init__(self) -> None:
        self.features = self.folder / "features"
        self.classifier = self.folder / "classifier.pkl"
        self.results = self.folder / "results.csv"


def build_survey(folder: str | Path) -> Survey:
    """Write the synthetic images, annotation CSVs and weights under `folder`."""
    folder = Path(folder).resolve()
    weights = folder / "weights" / "efficientnet_b0_demo.pt"
    make_weights(weights, seed=WEIGHTS_SEED)
    groups: dict[str, list[Path]] = {"train": [], "new": []}
    labels: dict[str, dict[str, list[tuple[int, int, str]]]] = {"train": {}, "new": {}}
    for i in range(TRAIN_IMAGES + NEW_IMAGES):
        group = "train" if i < TRAIN_IMAGES else "new"
        name = f"{'reef' if group == 'train' else 'new'}_{i + 1:02d}.jpg"
        data, region_map = seabed(seed=1000 + i)
        path = folder / "images" / group / name
        write_file_atomic(path, data)
        groups[group].append(path)
        points = coralnet.generate_points(POINTS, WIDTH, HEIGHT, seed=name)
        labels[group][name] = [(r, c, CLASSES[region_map[r, c]]) for r, c in points]
    coralnet.write_annotations(folder / "annotations.csv", labels["train"])
    coralnet.write_annotations(folder / "new_annotations.csv", labels["new"])
    return Survey(
        folder,
        weights,
        groups["train"],
        groups["new"],
        folder / "annotations.csv",
        folder / "new_annotations.csv",
    )


def run_demo(
    folder: str | Path,
    runner: survey.Runner,
    *,
    step: Callable[[str], Any] = lambda text: None,
    progress: survey.Progress | None = None,
    epoch_progress: survey.EpochProgress | None = None,
) -> dict[str, Any]:
    """Build the survey, extract, train, classify the held-out images, write reports.

    `step` hears a line before each stage; `progress` each image done;
    `epoch_progress` each training epoch. Returns a JSON-ready summary.
    """
    step("making a synthetic survey (images, CoralNet CSVs, EfficientNet weights)")
    s = build_survey(folder)
    extractor = survey.weights_extractor(s.weights)
    train_points = coralnet.read_annotations(s.annotations)
    point_map = {n: [(r, c) for r, c, _ in a] for n, a in train_points.items()}
    step(f"extracting features of {len(s.train_images)} training images")
    survey.extract_images(runner, extractor, s.train_images, point_map, s.features, progress=progress)
    step(f"training an MLP classifier for {EPOCHS} epochs")
    trained = survey.train(
        runner, train_points, s.features, s.classifier, clf_type="MLP", epochs=EPOCHS, progress=epoch_progress
    )
    train_report = reports.training_report(
        s.folder / "report" / "train",
        trained.result.ref_accs,
        trained.metrics,
        {
            "annotations": str(s.annotations),
            "classifier": "MLP",
            "epochs": EPOCHS,
            **{f"{k} points": v for k, v in trained.counts.items()},
        },
    )
    step(f"classifying {len(s.new_images)} held-out images")
    truth = coralnet.read_annotations(s.new_annotations)
    new_points = {n: [(r, c) for r, c, _ in a] for n, a in truth.items()}
    rows, classes = survey.classify_images(
        runner, extractor, s.classifier, s.new_images, new_points, threshold=THRESHOLD, progress=progress
    )
    coralnet.write_results(s.results, rows)
    expected = {(n, r, c): label for n, a in truth.items() for r, c, label in a}
    held_out = reports.class_metrics(
        [expected[(r.name, r.row, r.col)] for r in rows], [r.label for r in rows], classes
    )
    classify_report = reports.classification_report(
        s.folder / "report" / "classify",
        {p.name: p.read_bytes() for p in s.new_images},
        rows,
        THRESHOLD,
        classes,
        {
            "classifier": str(s.classifier),
            "threshold": THRESHOLD,
            "accuracy against the held-out labels": f"{held_out.accuracy * 100:.1f}%",
        },
    )
    return {
        "folder": str(s.folder),
        "classes": classes,
        "validation_accuracy": trained.metrics.accuracy,
        "ref_accs": list(trained.result.ref_accs),
        "held_out_accuracy": held_out.accuracy,
        "points": len(rows),
        "accepted": sum(r.accepted for r in rows),
        "threshold": THRESHOLD,
        "results_csv": str(s.results),
        "reports": {"train": str(train_report), "classify": str(classify_report)},
        "rows": rows,
    }
