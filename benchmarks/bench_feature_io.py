"""Feature-file I/O, spacer_core vs pyspacer side by side in one process.

    python benchmarks/bench_feature_io.py [--images 30] [--points 100] [--dim 1280]

Times storing and loading ``.featurevector`` files and one pass of
``ImageLabels.load_data_in_batches`` (what training does every epoch), and
prints each ratio (pyspacer time / ours: above 1 means we are faster).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import spacer.data_classes as ps

from spacer_core.data_classes import DataLocation, ImageFeatures, ImageLabels


def best_of(fn: Callable[[], object], repeats: int = 3) -> float:
    """Fastest of ``repeats`` runs, in seconds (least disturbed by other load)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def make_features(
    rng: np.random.Generator, points: int, dim: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = rng.choice(3000, points, replace=False)
    cols = rng.choice(4000, points, replace=False)
    # Network features are float32 activations after swish, stored as float64.
    x = rng.normal(size=(points, dim)).astype(np.float32)
    feat = (x / (1 + np.exp(-x))).astype(np.float64)
    return rows, cols, feat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--dim", type=int, default=1280)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    data = [make_features(rng, args.points, args.dim) for _ in range(args.images)]
    ours_objs = [ImageFeatures.from_arrays(f, r, c) for r, c, f in data]
    their_objs = [
        ps.ImageFeatures(
            point_features=[ps.PointFeatures(int(a), int(b), v) for a, b, v in zip(r, c, f)],
            valid_rowcol=True,
            feature_dim=args.dim,
            npoints=args.points,
        )
        for r, c, f in data
    ]

    with tempfile.TemporaryDirectory() as tmp:
        ours_dir, their_dir = Path(tmp, "ours"), Path(tmp, "theirs")
        ours_locs = [DataLocation("filesystem", str(ours_dir / f"{i}.fv")) for i in range(args.images)]
        their_locs = [ps.DataLocation("filesystem", str(their_dir / f"{i}.fv")) for i in range(args.images)]

        def store_ours() -> None:
            for obj, loc in zip(ours_objs, ours_locs):
                obj.store(loc)

        def store_theirs() -> None:
            for obj, loc in zip(their_objs, their_locs):
                obj.store(loc)

        results = [("store", best_of(store_theirs), best_of(store_ours))]
        results.append(
            (
                "load",
                best_of(lambda: [ps.ImageFeatures.load(loc) for loc in their_locs]),
                best_of(lambda: [ImageFeatures.load(loc) for loc in ours_locs]),
            )
        )
        labels = {
            i: [(int(r), int(c), int(k % 5)) for k, (r, c) in enumerate(zip(d[0], d[1]))]
            for i, d in enumerate(data)
        }
        their_labels = ps.ImageLabels({their_locs[i]: v for i, v in labels.items()})
        our_labels = ImageLabels({ours_locs[i]: v for i, v in labels.items()})
        results.append(
            (
                "epoch of batches",
                best_of(lambda: [list(b) for b in their_labels.load_data_in_batches(5000, random_seed=1)]),
                best_of(lambda: [list(b) for b in our_labels.load_data_in_batches(5000, random_seed=1)]),
            )
        )
        size_ours = sum(Path(loc.key).stat().st_size for loc in ours_locs)
        size_theirs = sum(Path(loc.key).stat().st_size for loc in their_locs)

    print(f"{args.images} images x {args.points} points x {args.dim} dims")
    print(f"{'operation':<18}{'pyspacer s':>12}{'ours s':>10}{'ratio':>8}")
    for name, theirs, ours in results:
        print(f"{name:<18}{theirs:>12.3f}{ours:>10.3f}{theirs / ours:>7.1f}x")
    print(
        f"bytes on disk: pyspacer {size_theirs / 1e6:.1f} MB, ours {size_ours / 1e6:.1f} MB ({size_ours / size_theirs:.2f}x)"
    )


if __name__ == "__main__":
    main()
