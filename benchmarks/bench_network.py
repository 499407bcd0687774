"""The network at its limit on CPU: every path against a plain ONNX Runtime session, paired.

The yardstick is pyspacer's own EfficientNet exported to ONNX as is (static
batch) and run by a plain `onnxruntime.InferenceSession` with its default
settings (all cores, threads spinning), at whichever of batch 2, 4, 8 and 16
is fastest here. Every cycle times the plain session and then each of our
paths on the same images (alternating the order every cycle), and each row
prints the median over cycles of (our rate / the plain session's rate in
that cycle), so load from other work on the machine cancels out as far as
it can.

Rows:
- `backend`: our compiled backend alone on the identical float32 patches
  (`Runtime.features`, the synchronous library path without decoding);
- `plain 2x1`: the plain network in our layout (two single-thread sessions,
  each on half the patches, in two threads): the best the network does here;
- `tasks.extract_features`: one image at a time through the library call
  (read, decode, crop, network, feature file);
- `folder (bulk)`: `bulk.run` on the folder, workers on whole images;
- `spacer extract`: `survey.extract_images` with the local runner (the CLI's path);
- `batcher, N callers`: N threads each pushing whole images through the
  runtime's shared DynamicBatcher (the server's path without gRPC).
- with `--fast`: `fast` precision against `exact` on the same patches (see
  `benchmarks/eval_precision.py` for agreement).

    python benchmarks/bench_network.py                 # 6 images, 5 cycles (~5 min on 2 cores)
    python benchmarks/bench_network.py --images 2 --cycles 2 --only backend
    python benchmarks/bench_network.py --sizes 2000x1500,3000x2000  # 3 and 6 MP
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from _common import cpu_name
from bench_extract import make_images


def plain_sessions(weights: Path, batches: tuple[int, ...]) -> dict[int, object]:
    """pyspacer's network exported as is, one default ONNX Runtime session per static batch size."""
    import warnings

    import onnxruntime as ort
    import torch
    from spacer.extractors.efficientnet import EfficientNetExtractor as PyspacerEfficientNet

    with open(weights, "rb") as f:
        net = PyspacerEfficientNet.load_weights(f).eval()

    class Features(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return net.extract_features(x)

    out = {}
    for size in batches:
        buffer = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                Features(),
                torch.zeros(size, 3, 224, 224),
                buffer,
                input_names=["x"],
                opset_version=17,
                dynamo=False,
            )
        out[size] = (
            buffer.getvalue(),
            ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"]),
        )
    return out


def run_plain(session: object, size: int, patches: np.ndarray) -> int:
    done = len(patches) - len(patches) % size
    for start in range(0, done, size):
        session.run(None, {"x": patches[start : start + size]})  # type: ignore[attr-defined]
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument(
        "--sizes",
        default="4000x3000",
        help="comma list of image sizes WxH, used in turn (e.g. 2000x1500,3000x2000 for 3-6 MP)",
    )
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--callers", default="1,8", help="batcher callers to measure (default 1,8)")
    parser.add_argument(
        "--only",
        default="",
        help="comma list of rows: backend, layout, previous, tasks, bulk, extract, batcher, fast",
    )
    parser.add_argument("--fast", action="store_true", help="also time `fast` precision")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    only = set(filter(None, args.only.split(",")))

    def wanted(row: str) -> bool:
        return not only or row in only

    import onnxruntime as ort

    from spacer_core import crop, tasks
    from spacer_core.bulk import local as bulk
    from spacer_core.data_classes import DataLocation
    from spacer_core.extractors import EfficientNetExtractor
    from spacer_core.inference import run_in_batches
    from spacer_core.inference.backends import one_session
    from spacer_core.messages import ExtractFeaturesMsg
    from spacer_core.runtime import Runtime, RuntimeSettings, default_runtime
    from spacer_core.survey import workflow as survey
    from spacer_core.testing import make_weights

    with tempfile.TemporaryDirectory(prefix="bench-network-") as tmp:
        folder = Path(tmp)
        os.environ.setdefault("SPACER_EXTRACTORS_CACHE_DIR", str(folder / "extractors"))
        weights = folder / "efficientnet_b0.pt"
        sha256 = make_weights(weights)
        images_dir = folder / "images"
        images_dir.mkdir()
        sizes = [tuple(map(int, size.lower().split("x"))) for size in args.sizes.split(",")]
        jobs = []
        for k, (width, height) in enumerate(sizes):
            (images_dir / f"size{k}").mkdir()
            count = len(range(k, args.images, len(sizes)))
            made = make_images(images_dir / f"size{k}", count, args.points, width, height)
            for image, rowcols in made:  # one folder, unique names (the CLI's point map is by name)
                jobs.append((image.rename(images_dir / f"{width}x{height}_{image.name}"), rowcols))
        total = args.images * args.points
        print(
            f"machine: {cpu_name()}, {os.cpu_count()} CPUs, ONNX Runtime {ort.__version__}; "
            f"{args.images} JPEGs ({args.sizes}) x {args.points} points; "
            f"{args.cycles} cycle{'s' if args.cycles != 1 else ''}; load average before: {os.getloadavg()[0]:.1f}",
            flush=True,
        )

        extractor = EfficientNetExtractor(
            data_locations={"weights": DataLocation("filesystem", str(weights))},
            data_hashes={"weights": sha256},
        )
        runtime = default_runtime()  # what tasks.extract_features uses
        with runtime.activate():
            net = extractor.network()[0]
        backend = runtime.backend(net)
        print(f"our backend: {backend.describe()}", flush=True)
        patches = np.concatenate(
            [
                crop.crop_patches_into_chw(
                    Path(image).read_bytes(), rowcols, np.empty((len(rowcols), 3, 224, 224), np.float32)
                )
                for image, rowcols in jobs[:2]
            ]
        )

        plain = plain_sessions(weights, (2, 4, 8, 16))
        rates = {}
        for size, (_, session) in plain.items():
            run_plain(session, size, patches[:16])
            start = time.perf_counter()
            done = run_plain(session, size, patches)
            rates[size] = done / (time.perf_counter() - start)
        best = max(rates, key=rates.__getitem__)
        plain_session = plain[best][1]
        print(
            "plain session (default settings, 2 threads, spinning) patches/s by static batch: "
            + ", ".join(f"{k}: {v:.1f}" for k, v in rates.items())
            + f" -> batch {best}",
            flush=True,
        )
        # The network in our layout: two single-thread sessions side by side, in our piece size.
        piece = backend.preferred_batch_size if backend.preferred_batch_size in plain else 4
        single = []
        for _ in range(2):
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            opts.inter_op_num_threads = 1
            single.append(ort.InferenceSession(plain[piece][0], opts, providers=["CPUExecutionProvider"]))
        pool = concurrent.futures.ThreadPoolExecutor(2)

        def plain_2x1(batch: np.ndarray) -> int:
            half = len(batch) // 2
            futures = [
                pool.submit(run_plain, s, piece, part)
                for s, part in zip(single, (batch[:half], batch[half:]))
            ]
            return sum(f.result() for f in futures)

        feature_dir = folder / "features"
        feature_dir.mkdir()

        def library_images() -> int:
            for image, rowcols in jobs:
                tasks.extract_features(
                    ExtractFeaturesMsg(
                        "bench",
                        extractor,
                        rowcols,
                        DataLocation("filesystem", str(image)),
                        DataLocation("filesystem", str(feature_dir / f"{image.name}.featurevector")),
                    )
                )
            return total

        manifest = folder / "points.csv"
        with open(manifest, "w") as f:
            f.write("Name,Row,Column\n")
            for image, rowcols in jobs:
                f.writelines(f"{image},{r},{c}\n" for r, c in rowcols)
        items = bulk.plan(manifest)

        def folder_bulk() -> int:
            # With the loaded runtime: a survey's run loads the network once (timed below), so
            # the row is its throughput per image, not six images' share of that start-up.
            task = bulk.BulkTask.extract(extractor, folder / "bulk-out", overwrite=True)
            summary = bulk.run(task, items, runtime=runtime)
            assert summary.counts()["failed"] == 0, summary.as_dict()
            return total

        point_map = {image.name: list(rowcols) for image, rowcols in jobs}

        def spacer_extract() -> int:
            survey.extract_images(
                survey.LocalRunner(), extractor, [image for image, _ in jobs], point_map, folder / "cli-out"
            )
            return total

        def batcher_callers(callers: int) -> Callable[[], int]:
            from spacer_core import pipeline

            def one(image: Path, rowcols: list[tuple[int, int]]) -> None:
                # As the server does: beside other callers' images, an image decodes on one core.
                shared = one_session() if callers > 1 else contextlib.nullcontext()
                with runtime.activate(), shared:
                    prepared = pipeline.prepare(
                        pipeline.ImageJob(
                            extractor,
                            rowcols,
                            DataLocation("filesystem", str(image)),
                            feature_loc=DataLocation("filesystem", str(feature_dir / f"{image.name}.b.fv")),
                        )
                    )
                    pipeline.finish(prepared, runtime.batcher(net).extract_sync(prepared.patches))

            def go() -> int:
                with concurrent.futures.ThreadPoolExecutor(callers) as callers_pool:
                    list(callers_pool.map(lambda job: one(*job), jobs))
                return total

            return go

        rows: dict[str, Callable[[], int]] = {}
        if wanted("backend"):
            rows["backend (identical patches)"] = lambda: (runtime.features(net, patches), len(patches))[1]
        if wanted("layout"):
            rows["plain network, 2x1-thread sessions"] = lambda: plain_2x1(patches)
        if wanted("previous"):
            # The layout before: one session with every core, no spinning (same folded export).
            from spacer_core.inference import OnnxBackend, compile_cache

            artifact = compile_cache.artifact_path(
                compile_cache.cache_dir(), sha256, "onnx", "exact-cpu", ".onnx"
            )
            # Its pieces were 4 patches then.
            previous = type("Previous", (OnnxBackend,), {"preferred_batch_size": 4})(artifact, sessions=1)
            rows["backend, one 2-thread session (previous)"] = lambda: (
                run_in_batches(previous, patches, 4),
                len(patches),
            )[1]

            def folder_one_worker() -> int:
                task = bulk.BulkTask.extract(extractor, folder / "bulk-out-1", overwrite=True)
                bulk.run(task, items, workers=1)
                return total

            rows["folder, 1 worker (previous)"] = folder_one_worker
        if wanted("tasks"):
            rows["tasks.extract_features, 1 image at a time"] = library_images
        if wanted("bulk"):
            rows["folder (bulk.run, local engine)"] = folder_bulk
        if wanted("extract"):
            rows["spacer extract (survey, local runner)"] = spacer_extract
        if wanted("batcher"):
            for n in map(int, args.callers.split(",")):
                rows[f"batcher, {n} caller{'s' if n != 1 else ''}"] = batcher_callers(n)
        if args.fast or wanted("fast") and "fast" in only:
            fast_runtime = Runtime(RuntimeSettings(precision="fast"))
            fast_backend = fast_runtime.backend(net)
            print(f"fast backend: {fast_backend.describe()}", flush=True)
            exact_f = runtime.features(net, patches)
            fast_f = fast_runtime.features(net, patches)
            print(
                f"fast vs exact features: max abs diff {np.max(np.abs(fast_f - exact_f)):.2e}, "
                f"mean abs diff {np.mean(np.abs(fast_f - exact_f)):.2e}",
                flush=True,
            )
            rows["fast precision backend (identical patches)"] = lambda: (
                fast_runtime.features(net, patches),
                len(patches),
            )[1]

        if wanted("bulk"):
            starts = []
            for _ in range(3):
                started = time.perf_counter()
                fresh = Runtime()
                with fresh.activate():
                    fresh.warm_up(extractor.network()[0], batched=False)
                starts.append(time.perf_counter() - started)
                fresh.close()
            print(
                f"start-up of a run's runtime (load the compiled network, one batch): "
                f"median {np.median(starts):.3f} s",
                flush=True,
            )
        for run in rows.values():  # warm: compile, load, first-call allocations
            run()
        ratios: dict[str, list[float]] = {name: [] for name in rows}
        absolute: dict[str, list[float]] = {name: [] for name in rows}
        plain_rates: list[float] = []
        for cycle in range(args.cycles):
            order = list(rows.items())
            if cycle % 2:
                order.reverse()
            start = time.perf_counter()
            done = run_plain(plain_session, best, patches)
            reference = done / (time.perf_counter() - start)
            plain_rates.append(reference)
            for name, run in order:
                start = time.perf_counter()
                count = run()
                rate = count / (time.perf_counter() - start)
                absolute[name].append(rate)
                ratios[name].append(rate / reference)
            print(
                f"cycle {cycle + 1}: plain {reference:.1f} patches/s; "
                + "; ".join(f"{name.split(' (')[0]} {ratios[name][-1]:.3f}" for name in rows),
                flush=True,
            )

        print(
            f"\nplain session of pyspacer's network (batch {best}): median "
            f"{np.median(plain_rates):.1f} patches/s"
        )
        print(f"{'path':48s} {'median rate':>12s} {'ratio to plain (median, min-max)':>34s}")
        for name in rows:
            r = ratios[name]
            print(
                f"{name:48s} {np.median(absolute[name]):9.1f}/s   "
                f"{np.median(r):6.3f}  ({min(r):.3f}-{max(r):.3f})"
            )
        print(f"load average after: {os.getloadavg()[0]:.1f} (other work on the machine skews figures)")
        runtime.close()


if __name__ == "__main__":
    main()
