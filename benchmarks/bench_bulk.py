"""Bulk extraction: the Ray engine vs the local engine vs pyspacer's one-image-at-a-time loop.

Makes `--images` JPEGs (default 100 at 1024x768) with `--points` points each
(default 100) in a manifest, a CoralNet-format EfficientNet-b0 weights file,
then times:

- local: `spacer bulk extract` on the local engine (`spacer_core.bulk.run`);
- ray: the same on a local Ray instance (`spacer_core.bulk.ray_engine.run`), with
  one network actor and, with `--scaling`, with two; Ray's start-up is
  timed apart (a long-lived cluster pays it once);
- pyspacer: `spacer.tasks.extract_features` per image on `--pyspacer-images`
  images (default 5), scaled to the whole set.

Prints points/s of each and Ray's overhead against the local engine (job
time, excluding Ray's start-up). Run on an idle machine; figures from a
shared one vary.

    python benchmarks/bench_bulk.py                          # 100 x 100 (minutes on 2 cores)
    python benchmarks/bench_bulk.py --images 20 --points 50  # a quick look
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from _common import cpu_name

import spacer_core
from spacer_core.bulk import local as bulk
from spacer_core.testing import cached_weights, extractor_json, make_survey

# Ray's workers import the package from where this process found it.
ROOT = Path(spacer_core.__file__).resolve().parent.parent


def timed_run(label: str, run, points: int) -> float:
    start = time.perf_counter()
    summary = run()
    seconds = time.perf_counter() - start
    assert summary.counts()["ok"] == summary.counts()["images"], summary.as_dict()
    print(f"{label:<28} {seconds:8.1f} s {points / seconds:8.1f} points/s", flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--pyspacer-images", type=int, default=5)
    parser.add_argument("--scaling", action="store_true", help="also run Ray with two network actors")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs given to Ray")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="bench-bulk-"))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    try:
        s = make_survey(folder, args.images, args.points, (args.width, args.height))
        items = bulk.plan(s.manifest)
        points = sum(len(i.rowcols) for i in items)
        print(
            f"{args.images} images {args.width}x{args.height} x {args.points} points = {points} points;"
            f" {os.cpu_count()} CPUs ({cpu_name()})"
        )
        weights = cached_weights().path
        task = bulk.build_task("extract", weights, folder / "local")
        bulk.run(
            bulk.build_task("extract", weights, folder / "warm"), items[:1]
        )  # compile once, as Ray's actor does
        local = timed_run("local engine", lambda: bulk.run(task, items), points)

        import ray

        from spacer_core.bulk import ray_engine as bulk_ray

        start = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        print(f"{'ray start-up':<28} {time.perf_counter() - start:8.1f} s")
        widths = (1, 2) if args.scaling else (1,)
        ray_seconds = {}
        for actors in widths:
            out = folder / f"ray-{actors}"
            ray_task = bulk.build_task("extract", weights, out)
            ray_seconds[actors] = timed_run(
                f"ray engine, {actors} actor(s)",
                # Actors and the two CPU stages share the CPUs given to Ray.
                lambda: bulk_ray.run(
                    ray_task, items, bulk_ray.RayOptions(actors=actors, actor_cpus=(args.cpus - 1) / actors)
                ),
                points,
            )
        ray.shutdown()
        print(f"ray overhead vs local: {(ray_seconds[1] / local - 1) * 100:+.1f}% (1 actor)")
        if 2 in ray_seconds:
            print(f"2 actors vs 1: {ray_seconds[1] / ray_seconds[2]:.2f}x the throughput")

        from spacer.data_classes import DataLocation as SpLoc
        from spacer.extractors import FeatureExtractor as SpExtractor
        from spacer.messages import ExtractFeaturesMsg
        from spacer.tasks import extract_features

        sha = hashlib.sha256(weights.read_bytes()).hexdigest()
        subset = items[: args.pyspacer_images]
        start = time.perf_counter()
        for item in subset:
            extractor = SpExtractor.deserialize(extractor_json(weights, sha))
            extract_features(
                ExtractFeaturesMsg(
                    item.name,
                    extractor,
                    list(item.rowcols),
                    SpLoc("filesystem", item.location.key),
                    SpLoc("filesystem", str(folder / f"{item.file_name}.sp")),
                )
            )
        sp = (time.perf_counter() - start) * len(items) / len(subset)
        print(
            f"{'pyspacer loop (scaled)':<28} {sp:8.1f} s {points / sp:8.1f} points/s"
            f"  ({len(subset)} images timed)"
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
