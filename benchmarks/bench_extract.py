"""Feature extraction and image classification: pyspacer vs spacer_core, in one process.

Makes `--images` JPEGs (default ten 4000x3000) with `--points` points each
(default 100), a CoralNet-format EfficientNet-b0 weights file and a
calibrated classifier, then times, for one caller and for `--callers`
concurrent callers (threads):

- pyspacer: `spacer.tasks.extract_features` / `classify_image`
  (reloads weights and classifier for every image, eager PyTorch, batches of 10);
- ours/tasks: `spacer_core.tasks.extract_features` / `classify_image`
  (the library path; its network runs on whatever backend the extractor uses);
- ours/batched: the server's path without gRPC: `spacer_core.pipeline` steps
  (Rust decode + crop straight into float32), the runtime's `DynamicBatcher`
  shared by all callers over the compiled backend, features stored as
  pyspacer's npz, or scored with one predict_proba per image on a cached classifier.

Also measures the network alone (no decoding): the project's backend and a
plain ONNX Runtime session of the same network, alternating. Prints points/s,
the ratios to pyspacer and to the network alone, and the max abs feature
difference to pyspacer. `--scale 0.1` runs a tenth of the images and points for a quick look.

    python benchmarks/bench_extract.py                 # full run (several minutes on 2 cores)
    python benchmarks/bench_extract.py --scale 0.2
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from _common import cpu_name
from PIL import Image

Job = tuple[Path, list[tuple[int, int]]]


def make_images(folder: Path, count: int, points: int, width: int, height: int) -> list[Job]:
    """JPEGs with survey-like texture (coloured blobs plus grain) and random points."""
    rng = np.random.default_rng(2024)
    jobs = []
    for i in range(count):
        coarse = rng.integers(0, 256, size=(height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        pixels = np.asarray(
            Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR), dtype=np.int16
        )
        pixels = np.clip(pixels + rng.integers(-12, 13, size=pixels.shape, dtype=np.int16), 0, 255)
        path = folder / f"survey_{i:02d}.jpg"
        Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90)
        rowcols = [
            (int(r), int(c)) for r, c in zip(rng.integers(0, height, points), rng.integers(0, width, points))
        ]
        jobs.append((path, rowcols))
    return jobs


def make_classifier(path: Path) -> None:
    """A pyspacer-style calibrated SGD classifier over 1280-d features, stored with pyspacer."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.linear_model import SGDClassifier
    from spacer.data_classes import DataLocation
    from spacer.storage import store_classifier

    rng = np.random.default_rng(5)
    x = rng.normal(0.5, 0.4, size=(600, 1280))
    y = rng.integers(0, 6, 600)
    clf = SGDClassifier(loss="log_loss", average=True, random_state=0).fit(x[:400], y[:400])
    calibrated = CalibratedClassifierCV(clf, cv="prefit").fit(x[400:], y[400:])
    store_classifier(DataLocation("filesystem", str(path)), calibrated)


def run_callers(jobs: Sequence[Job], callers: int, work: Callable[[list[Job]], None]) -> float:
    """Split the jobs round-robin over `callers` threads; seconds until all finish."""
    shares = [list(jobs[i::callers]) for i in range(callers)]
    start = time.perf_counter()
    if callers == 1:
        work(shares[0])
    else:
        with concurrent.futures.ThreadPoolExecutor(callers) as pool:
            for future in [pool.submit(work, share) for share in shares if share]:
                future.result()
    return time.perf_counter() - start


class Pyspacer:
    """A library's tasks driven by its own message classes (pyspacer, or ours below)."""

    name = "pyspacer"
    package = "spacer"

    def __init__(self, weights: Path, sha256: str, classifier: Path, out: Path):
        self.lib = {
            part: importlib.import_module(f"{self.package}.{part}")
            for part in ("data_classes", "extractors", "messages", "tasks")
        }
        self.loc = self.lib["data_classes"].DataLocation
        self.extractor = self.lib["extractors"].EfficientNetExtractor(
            data_locations={"weights": self.loc("filesystem", str(weights))}, data_hashes={"weights": sha256}
        )
        self.classifier = self.loc("filesystem", str(classifier))
        self.out = out

    def feature_path(self, image: Path) -> Path:
        return self.out / f"{image.stem}.{self.name.replace('/', '-')}.featurevector"

    def extract(self, jobs: list[Job]) -> None:
        messages, tasks = self.lib["messages"], self.lib["tasks"]
        for image, rowcols in jobs:
            tasks.extract_features(
                messages.ExtractFeaturesMsg(
                    "bench",
                    self.extractor,
                    rowcols,
                    self.loc("filesystem", str(image)),
                    self.loc("filesystem", str(self.feature_path(image))),
                )
            )

    def classify(self, jobs: list[Job]) -> None:
        messages, tasks = self.lib["messages"], self.lib["tasks"]
        for image, rowcols in jobs:
            tasks.classify_image(
                messages.ClassifyImageMsg(
                    "bench", self.extractor, rowcols, self.loc("filesystem", str(image)), self.classifier
                )
            )

    def features(self, image: Path) -> np.ndarray:
        data_classes = self.lib["data_classes"]
        feats = data_classes.ImageFeatures.load(self.loc("filesystem", str(self.feature_path(image))))
        return np.array([np.asarray(pf.data) for pf in feats.point_features])


class OursTasks(Pyspacer):
    """spacer_core's library tasks: the same messages, our implementation."""

    name = "ours/tasks"
    package = "spacer_core"


class OursBatched:
    """The server's path without gRPC: `spacer_core.pipeline` steps, the network through the
    runtime's shared dynamic batcher, so concurrent callers fill each other's batches."""

    name = "ours/batched"

    def __init__(self, weights: Path, sha256: str, classifier: Path, out: Path, args: argparse.Namespace):
        from spacer_core.data_classes import DataLocation
        from spacer_core.extractors import EfficientNetExtractor
        from spacer_core.inference import BatcherSettings
        from spacer_core.runtime import Runtime, RuntimeSettings

        self.runtime = Runtime(
            RuntimeSettings(
                precision=args.precision,
                batcher=BatcherSettings(
                    max_batch_size=args.batch_size,
                    queue_delay_ms=args.queue_delay_ms,
                    workers=args.workers,
                ),
            )
        )
        self.extractor = EfficientNetExtractor(
            data_locations={"weights": DataLocation("filesystem", str(weights))},
            data_hashes={"weights": sha256},
        )
        start = time.perf_counter()
        with self.runtime.activate():
            self.net = self.extractor.network()[0]
            self.batcher = self.runtime.batcher(self.net)
        self.backend = self.runtime.backend(self.net)
        self.load_seconds = time.perf_counter() - start
        self.classifier = DataLocation("filesystem", str(classifier))
        self.out = out

    def feature_path(self, image: Path) -> Path:
        return self.out / f"{image.stem}.batched.featurevector"

    def _run(self, jobs: list[Job], classify: bool) -> None:
        from spacer_core import pipeline
        from spacer_core.data_classes import DataLocation

        with self.runtime.activate():
            for image, rowcols in jobs:
                job = pipeline.ImageJob(
                    self.extractor,
                    rowcols,
                    DataLocation("filesystem", str(image)),
                    feature_loc=None
                    if classify
                    else DataLocation("filesystem", str(self.feature_path(image))),
                    classifier_loc=self.classifier if classify else None,
                )
                prepared = pipeline.prepare(job)
                pipeline.finish(prepared, self.batcher.extract_sync(prepared.patches))

    def extract(self, jobs: list[Job]) -> None:
        self._run(jobs, classify=False)

    def classify(self, jobs: list[Job]) -> None:
        self._run(jobs, classify=True)

    def features(self, image: Path) -> np.ndarray:
        from spacer_core.data_classes import DataLocation, ImageFeatures

        return ImageFeatures.load(DataLocation("filesystem", str(self.feature_path(image)))).feat


def network_alone(batched: OursBatched, patches: int, repeats: int = 3) -> tuple[float, float]:
    """Patches/s of the network by itself, no decoding: (the project's backend, a plain ONNX
    Runtime session of the same network with its default settings and a static batch of 4).

    Medians of `repeats` alternating runs over the same float32 input.
    """
    import io

    import onnxruntime as ort
    import torch

    from spacer_core.extractors import build_network
    from spacer_core.inference.backends import probe_batch

    batch = probe_batch(patches, seed=3)
    net = build_network(batched.extractor.resolve_data("weights").read())
    buffer = io.BytesIO()
    torch.onnx.export(
        net, torch.from_numpy(batch[:4]), buffer, input_names=["x"], opset_version=17, dynamo=False
    )
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])

    def plain() -> None:
        for start in range(0, patches - patches % 4, 4):
            session.run(None, {"x": batch[start : start + 4]})

    def ours() -> None:
        batched.runtime.features(batched.net, batch)

    timings: dict[str, list[float]] = {"ours": [], "plain": []}
    for _ in range(repeats):
        for name, run in (("ours", ours), ("plain", plain)):
            start = time.perf_counter()
            run()
            timings[name].append(time.perf_counter() - start)
    done = {"ours": patches, "plain": patches - patches % 4}
    return tuple(done[n] / float(np.median(timings[n])) for n in ("ours", "plain"))  # type: ignore[return-value]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiply the image count and points per image (default 1)"
    )
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--precision", default="exact", choices=["exact", "fast"])
    parser.add_argument("--backend", default="auto", help="auto, onnxruntime, torchscript or eager")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="batcher's max batch (default: the backend's preferred size)",
    )
    parser.add_argument("--queue-delay-ms", type=float, default=2.0, help="milliseconds (default 2)")
    parser.add_argument(
        "--workers", type=int, default=2, help="batches in flight at once in the batcher (default 2)"
    )
    parser.add_argument("--skip", default="", help="comma list of: pyspacer, tasks, batched")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from spacer_core.testing import make_weights

    images = max(1, round(args.images * args.scale))
    points = max(1, round(args.points * args.scale))
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        folder = Path(tmp)
        os.environ.setdefault("SPACER_EXTRACTORS_CACHE_DIR", str(folder / "extractors"))
        weights = folder / "efficientnet_b0.pt"
        sha256 = make_weights(weights)
        classifier = folder / "classifier.pkl"
        make_classifier(classifier)
        jobs = make_images(folder, images, points, args.width, args.height)
        total = images * points
        print(
            f"machine: {platform.machine()} {cpu_name()}, {os.cpu_count()} CPUs; "
            f"{images} images {args.width}x{args.height}, {points} points each "
            f"({total} points); callers: 1 and {args.callers}; "
            f"load average before: {os.getloadavg()[0]:.1f}"
        )

        skip = set(filter(None, args.skip.split(",")))
        systems: list = []
        if "pyspacer" not in skip:
            systems.append(Pyspacer(weights, sha256, classifier, folder))
        if "tasks" not in skip:
            systems.append(OursTasks(weights, sha256, classifier, folder))
        if "batched" not in skip:
            batched = OursBatched(weights, sha256, classifier, folder, args)
            print(
                f"ours/batched backend: {batched.backend.describe()}, max batch "
                f"{batched.batcher.max_batch_size}, {args.workers} workers, compiled/loaded in {batched.load_seconds:.1f} s"
            )
            systems.append(batched)

        # One untimed image per system loads and compiles what each keeps between calls
        # (pyspacer keeps nothing, so this is only fair to it).
        for system in systems:
            system.extract(jobs[:1])
        alone = None
        if "batched" not in skip:
            alone, plain = network_alone(batched, min(total, 200))
            print(
                f"network alone: ours {alone:.1f} patches/s, plain ONNX Runtime session {plain:.1f} "
                f"patches/s (ours/plain {alone / plain:.2f})",
                flush=True,
            )

        rates: dict[tuple[str, str, int], float] = {}
        for task in ("extract", "classify"):
            for callers in (1, args.callers):
                for system in systems:
                    seconds = run_callers(jobs, callers, getattr(system, task))
                    rates[(system.name, task, callers)] = total / seconds
                    base = rates.get(("pyspacer", task, callers))
                    ratio = f"  {total / seconds / base:5.2f}x pyspacer" if base else ""
                    if alone and system.name != "pyspacer":
                        ratio += f"  {total / seconds / alone:4.2f} of network alone"
                    print(
                        f"{task:8s} callers={callers:<2d} {system.name:13s} "
                        f"{total / seconds:8.1f} points/s  ({seconds:6.1f} s){ratio}",
                        flush=True,
                    )

        if systems and systems[0].name == "pyspacer":
            reference = systems[0]
            for system in systems[1:]:
                diff = max(
                    float(np.max(np.abs(system.features(img) - reference.features(img)))) for img, _ in jobs
                )
                print(f"max abs feature difference {system.name} vs pyspacer: {diff:.2e}")
        print(f"load average after: {os.getloadavg()[0]:.1f} (other work on the machine skews figures)")
        for system in systems:
            if isinstance(system, OursBatched):
                system.runtime.close()
                stats = system.batcher.stats
                print(
                    f"ours/batched: {stats.batches} batches, "
                    f"{stats.patches / max(stats.batches, 1):.1f} patches per batch"
                )


if __name__ == "__main__":
    main()
