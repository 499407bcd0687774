"""Does FAST precision change classifications? Top-1 agreement of `fast` with `exact`.

Builds a labelled set of synthetic benthic-like patches (classes differ in
colour and texture, with per-patch jitter so the task is not trivial), extracts
`exact` features (fp32, pyspacer parity) and trains a pyspacer-style classifier
(SGD log-loss, averaged, calibrated on a reference split) on them. Then the
held-out patches are scored twice, from `exact` and from `fast` features, and
the script prints how often the top-1 predictions agree (target >= 99.5%),
plus both accuracies and the feature error.

It then replays the runtime's exact recheck (`fast_recheck_margin`): points
whose fast top-1 minus top-2 probability is under a margin get exact features,
for a sweep of margins, and times `exact` against `fast` + recheck on the same
held-out patches (paired, alternating, medians).

    python benchmarks/eval_precision.py                   # CPU: bf16 where the CPU has it
    python benchmarks/eval_precision.py --device cuda     # GPU: fp16 + channels_last
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import cpu_name


def make_classes(rng: np.random.Generator, classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each class: a mean colour, a stripe frequency and an orientation."""
    return (
        rng.uniform(40, 215, size=(classes, 3)),
        rng.uniform(2, 14, size=classes),
        rng.uniform(0, np.pi, size=classes),
    )


def make_patches(
    rng: np.random.Generator, spec: tuple[np.ndarray, np.ndarray, np.ndarray], per_class: int
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, 224, 224, 3) patches of every class in `spec`, and their labels."""
    yy, xx = np.mgrid[0:224, 0:224].astype(np.float32) / 224
    palette, freqs, angles = spec
    classes = len(palette)
    patches = np.empty((classes * per_class, 224, 224, 3), np.uint8)
    labels = np.repeat(np.arange(classes), per_class)
    for i, c in enumerate(labels):
        angle = angles[c] + rng.normal(0, 0.3)
        freq = freqs[c] * rng.uniform(0.8, 1.25)
        wave = np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 6.3))
        colour = palette[c] + rng.normal(0, 18, size=3)
        contrast = rng.uniform(20, 60)
        image = colour[None, None, :] + contrast * wave[..., None]
        image += rng.normal(0, 12, size=image.shape)
        patches[i] = np.clip(image, 0, 255).astype(np.uint8)
    return patches, labels


def train_classifiers(rng: np.random.Generator, train_f: np.ndarray, train_y: np.ndarray) -> tuple[Any, Any]:
    """pyspacer's two recipes trained on exact features: (calibrated SGD, MLP)."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.linear_model import SGDClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # Averaged log-loss SGD, then sigmoid calibration on a reference split.
    order = rng.permutation(len(train_y))
    cut = int(0.8 * len(order))
    sgd = SGDClassifier(loss="log_loss", average=True, random_state=0)
    sgd.fit(train_f[order[:cut]], train_y[order[:cut]])
    clf = CalibratedClassifierCV(sgd, cv="prefit").fit(train_f[order[cut:]], train_y[order[cut:]])
    # Scaled features, two hidden layers, early stopping.
    mlp = make_pipeline(
        StandardScaler(),
        MLPClassifier(hidden_layer_sizes=(200, 100), max_iter=300, early_stopping=True, random_state=0),
    )
    mlp.fit(train_f, train_y)
    return clf, mlp


MARGINS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2)


def sync_batch(backend: Any) -> int:
    """Patches per launch on the runtime's synchronous path (`Runtime.features`)."""
    return backend.preferred_batch_size * backend.parallelism * (4 if backend.parallelism > 1 else 1)


def recheck_report(
    args: argparse.Namespace,
    exact: Any,
    fast: Any,
    test_x: np.ndarray,
    test_exact: np.ndarray,
    test_fast: np.ndarray,
    clf: Any,
    mlp: Any,
) -> list[str]:
    """Agreement with the exact recheck over a sweep of margins, and fast + recheck against exact in time."""
    from spacer_core.inference import run_in_batches
    from spacer_core.pipeline import close_calls
    from spacer_core.runtime import DEFAULT_FAST_RECHECK_MARGIN

    lines = ["recheck sweep (margin: agreement LR, MLP; points rechecked LR, MLP):"]
    preds = {}
    for name, model in (("LR", clf), ("MLP", mlp)):
        exact_scores = model.predict_proba(test_exact.astype(np.float64))
        fast_scores = model.predict_proba(test_fast.astype(np.float64))
        preds[name] = (exact_scores.argmax(1), fast_scores.argmax(1), fast_scores)
    for margin in MARGINS:
        cells = []
        for name in ("LR", "MLP"):
            want, got, fast_scores = preds[name]
            picked = close_calls(fast_scores, margin)
            agree = want == got
            agree[picked] = True  # rechecked points take exact features, so exact's prediction
            cells.append((float(agree.mean()), len(picked) / len(want)))
        lines.append(
            f"  {margin:<6g} {cells[0][0] * 100:6.2f}% {cells[1][0] * 100:6.2f}%"
            f"   {cells[0][1] * 100:5.2f}% {cells[1][1] * 100:5.2f}%"
        )

    margin = DEFAULT_FAST_RECHECK_MARGIN if args.recheck_margin is None else args.recheck_margin
    exact_batch, fast_batch = sync_batch(exact), sync_batch(fast)

    def run_exact() -> None:
        run_in_batches(exact, test_x, exact_batch)

    def run_fast(model: Any, recheck: bool = True) -> Any:
        def go() -> None:
            features = run_in_batches(fast, test_x, fast_batch)
            picked = close_calls(model.predict_proba(features.astype(np.float64)), margin)
            if recheck and len(picked):
                features[picked] = run_in_batches(exact, test_x[picked], exact_batch)
                model.predict_proba(features[picked].astype(np.float64))

        return go

    runs = {
        "exact": run_exact,
        "fast (no recheck, LR scored)": run_fast(clf, recheck=False),
        "fast+recheck LR": run_fast(clf),
        "fast+recheck MLP": run_fast(mlp),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(args.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order each round
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    medians = {name: float(np.median(t)) for name, t in times.items()}
    lines.append(
        f"timing, {len(test_x)} patches, {args.repeats} rounds alternating, medians "
        f"(exact batch {exact_batch}, fast batch {fast_batch}, margin {margin:g}):"
    )
    for name, seconds in medians.items():
        lines.append(
            f"  {name}: {len(test_x) / seconds:.1f} patches/s ({medians['exact'] / seconds:.2f}x exact)"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--train-per-class", type=int, default=60)
    parser.add_argument("--test-per-class", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--recheck-margin",
        type=float,
        default=None,
        help="margin timed for fast + recheck (default: the runtime's fast_recheck_margin)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="paired timing rounds")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument(
        "--fast-backend",
        default="auto",
        help="backend kind for FAST (default auto: OpenVINO bf16 on CPUs with native "
        "bf16 when the `fast` extra is installed, fp16 TorchScript on CUDA; "
        "eager: PyTorch bf16/fp16)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch

    from spacer_core.extractors import build_network
    from spacer_core.inference import load_backend, run_in_batches
    from spacer_core.testing import make_weights

    rng = np.random.default_rng(args.seed)
    spec = make_classes(rng, args.classes)
    train_x, train_y = make_patches(rng, spec, args.train_per_class)
    test_x, test_y = make_patches(rng, spec, args.test_per_class)
    with tempfile.TemporaryDirectory(prefix="eval-precision-") as tmp:
        weights = Path(tmp) / "efficientnet_b0.pt"
        sha256 = make_weights(weights)

        def make_net() -> torch.nn.Module:
            return build_network(weights)

        exact = load_backend(sha256, make_net, device=args.device, precision="exact", cache_dir=tmp)
        fast = load_backend(
            sha256, make_net, device=args.device, precision="fast", kind=args.fast_backend, cache_dir=tmp
        )
        batch = 16
        start = time.perf_counter()
        train_f = run_in_batches(exact, train_x, batch).astype(np.float64)
        test_exact = run_in_batches(exact, test_x, batch)
        exact_rate = (len(train_x) + len(test_x)) / (time.perf_counter() - start)
        start = time.perf_counter()
        test_fast = run_in_batches(fast, test_x, batch)
        fast_rate = len(test_x) / (time.perf_counter() - start)
        clf, mlp = train_classifiers(rng, train_f, train_y)
        recheck = recheck_report(args, exact, fast, test_x, test_exact, test_fast, clf, mlp)

    pred_exact = clf.predict_proba(test_exact.astype(np.float64)).argmax(1)
    pred_fast = clf.predict_proba(test_fast.astype(np.float64)).argmax(1)
    agreement = float(np.mean(pred_exact == pred_fast))
    mlp_exact = mlp.predict_proba(test_exact.astype(np.float64)).argmax(1)
    mlp_fast = mlp.predict_proba(test_fast.astype(np.float64)).argmax(1)
    abs_err = np.abs(test_fast - test_exact)
    print(f"machine: {platform.machine()} {cpu_name()}, {os.cpu_count()} CPUs")
    print(
        f"exact: {exact.describe()} ({exact_rate:.0f} patches/s); "
        f"fast: {fast.describe()} ({fast_rate:.0f} patches/s)"
    )
    print(
        f"test set: {len(test_y)} patches, {args.classes} classes; "
        f"accuracy exact {np.mean(pred_exact == test_y):.3f}, fast {np.mean(pred_fast == test_y):.3f}"
    )
    print(
        f"feature error fast vs exact: max abs {abs_err.max():.3g}, "
        f"mean abs {abs_err.mean():.3g} (mean |feature| {np.abs(test_exact).mean():.3g})"
    )
    print(
        f"top-1 agreement fast vs exact, LR (pyspacer's SGD + calibration): {agreement * 100:.2f}% "
        f"({int(np.sum(pred_exact != pred_fast))} of {len(test_y)} differ; target >= 99.5%)"
    )
    print(
        f"top-1 agreement fast vs exact, MLP: {np.mean(mlp_exact == mlp_fast) * 100:.2f}% "
        f"({int(np.sum(mlp_exact != mlp_fast))} of {len(test_y)} differ; accuracy exact "
        f"{np.mean(mlp_exact == test_y):.3f}, fast {np.mean(mlp_fast == test_y):.3f})"
    )
    print(
        f"fast / exact speed: {fast_rate / exact_rate:.2f}x (same batches, one run; "
        "benchmarks/bench_network.py --fast pairs them)"
    )
    for line in recheck:
        print(line)


if __name__ == "__main__":
    main()
