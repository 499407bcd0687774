"""Training speed: pyspacer's MiniBatchTrainer and ours, side by side in one process.

Writes feature files the way pyspacer stores them (npz, float32 network output
held as float64), with class structure so accuracies mean something, then
trains LR and MLP with both libraries on the same labels and prints times,
the speed-up, accuracies and whether splits, classes and validation results
agree.

    python benchmarks/bench_training.py                 # 600 files x 100 points, 10 epochs
    python benchmarks/bench_training.py --scale 0.1     # 60 files, while developing
    python benchmarks/bench_training.py --data-dir /tmp/feats   # keep and reuse the files
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import spacer.data_classes as py_data
import spacer.task_utils as py_task_utils
import spacer.train_classifier as py_train

import spacer_core.data_classes as our_data
import spacer_core.task_utils as our_task_utils
import spacer_core.train_classifier as our_train


def write_features(
    folder: Path, images: int, points: int, dim: int, classes: int, seed: int
) -> list[tuple[str, list[tuple[int, int, int]]]]:
    """Store `images` feature files under `folder`; return (path, annotations) of each.

    Files already there (from an earlier run with the same settings) are reused.
    """
    rng = np.random.default_rng(seed)
    # Skewed class frequencies and overlapping clusters, like real sources.
    frequency = rng.dirichlet(np.full(classes, 0.7))
    # Class centres close enough together that accuracy stays well below 100%.
    centres = (0.08 * rng.standard_normal((classes, dim))).astype(np.float32)
    label_ids = rng.choice(np.arange(1, 10000), classes, replace=False)
    out = []
    for i in range(images):
        which = rng.choice(classes, points, p=frequency)
        noise = rng.standard_normal((points, dim), dtype=np.float32)
        # Network output is float32; pyspacer stores it as float64.
        feat = np.maximum(centres[which] + noise, -0.3).astype(np.float64)
        rows = rng.choice(4000, points, replace=False)
        cols = rng.integers(0, 3000, points)
        path = folder / f"image_{i:05d}.featurevector"
        if not path.exists():
            our_data.ImageFeatures.from_arrays(feat, rows=rows, cols=cols).store(
                our_data.DataLocation("filesystem", str(path))
            )
        annotations = [(int(r), int(c), int(label_ids[w])) for r, c, w in zip(rows, cols, which)]
        out.append((str(path), annotations))
    return out


def run_one(files, clf_type: str, epochs: int) -> dict[str, float]:
    py_labels = py_data.ImageLabels({py_data.DataLocation("filesystem", p): a for p, a in files})
    our_labels = our_data.ImageLabels({our_data.DataLocation("filesystem", p): a for p, a in files})
    py_sets = py_task_utils.preprocess_labels(py_labels)
    our_sets = our_task_utils.preprocess_labels(our_labels)
    same_split = all(
        [(loc.key, py_sets[name][loc]) for loc in py_sets[name].keys()]
        == [(loc.key, our_sets[name][loc]) for loc in our_sets[name].keys()]
        for name in ("train", "ref", "val")
    )

    start, cpu = time.perf_counter(), time.process_time()
    py_clf, py_val, py_msg = py_train.MiniBatchTrainer()(py_sets, epochs, [], clf_type)
    py_time, py_cpu = time.perf_counter() - start, time.process_time() - cpu

    start, cpu = time.perf_counter(), time.process_time()
    our_clf, our_val, our_msg = our_train.MiniBatchTrainer()(our_sets, epochs, [py_clf], clf_type)
    our_time, our_cpu = time.perf_counter() - start, time.process_time() - cpu

    same_results = (
        py_val.classes == our_val.classes
        and py_val.gt == our_val.gt
        and py_val.est == our_val.est
        and np.allclose(py_val.scores, our_val.scores, rtol=0, atol=1e-12)
        and py_msg.ref_accs == our_msg.ref_accs
    )
    print(
        f"{clf_type:>3}: pyspacer {py_time:7.2f} s   ours {our_time:7.2f} s   speed-up {py_time / our_time:5.2f}x"
        f" (CPU time {py_cpu:.1f} s vs {our_cpu:.1f} s)"
        f" | val acc {py_msg.acc:.4f} vs {our_msg.acc:.4f} (diff {our_msg.acc - py_msg.acc:+.4f};"
        f" pyspacer's model on our val set {our_msg.pc_accs[0]:.4f})"
        f" | splits same: {same_split}, classes same: {py_val.classes == our_val.classes},"
        f" val results and ref accs identical: {same_results}",
        flush=True,
    )
    return {"pyspacer_s": py_time, "ours_s": our_time, "pyspacer_cpu_s": py_cpu, "ours_cpu_s": our_cpu}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the 600 images to use")
    parser.add_argument("--points", type=int, default=100, help="annotated points per image")
    parser.add_argument("--dim", type=int, default=1280, help="feature dimension")
    parser.add_argument("--classes", type=int, default=25)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--clf", default="LR,MLP", help="comma-separated classifier types")
    parser.add_argument("--data-dir", type=Path, help="where feature files go (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    images = max(10, round(600 * args.scale))
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data_dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        files = write_features(folder, images, args.points, args.dim, args.classes, args.seed)
        print(f"spacer_core from {Path(our_train.__file__).parent}", flush=True)
        print(
            f"{images} feature files x {args.points} points, dim {args.dim}, {args.classes} classes,"
            f" {args.epochs} epochs; data ready in {time.perf_counter() - start:.1f} s"
            f" ({os.cpu_count()} CPUs)",
            flush=True,
        )
        load = os.getloadavg()[0]
        if load > 1.5:
            print(f"note: load average {load:.1f} on {os.cpu_count()} CPUs; wall times are noisy", flush=True)
        for clf_type in args.clf.split(","):
            run_one(files, clf_type, args.epochs)


if __name__ == "__main__":
    main()
