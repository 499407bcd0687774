"""ClassifyImages through a real `spacer serve` process vs a loop of pyspacer classify_image.

    python benchmarks/bench_server.py [--images 16] [--points 100] [--size 4000x3000]
                                      [--pyspacer-images 4] [--clients 1,8] [--device auto]

Makes JPEG survey-sized images, a weights file (tests/support/weights.py) and
a classifier, then measures points/s of:
- pyspacer `spacer.tasks.classify_image`, one image after another (the oracle);
- `ClassifyImages` streams from 1 client and from N concurrent clients, with
  images named by filesystem DataLocation (the server decodes them);
and the server's peak RSS (VmHWM) after the concurrent streams. Ratios are
points/s ours / pyspacer (above 1 means the server is faster), and, per
cycle, ours / a plain ONNX Runtime session of pyspacer's network timed in
this process just before (median over `--cycles`).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import run_streams

from server.client import SpacerClient
from server.testing import ServeProcess
from spacer_core.testing import (
    cached_weights,
    extractor_json,
    fs_loc,
    make_classifier,
    random_points,
    write_photo_jpeg,
)


def pyspacer_points_per_s(images, extractor: dict, clf: Path) -> float:
    from spacer import tasks
    from spacer.data_classes import DataLocation
    from spacer.extractors import FeatureExtractor
    from spacer.messages import ClassifyImageMsg

    def message(path: Path, rowcols) -> ClassifyImageMsg:
        return ClassifyImageMsg(
            job_token=path.name,
            extractor=FeatureExtractor.deserialize(extractor),
            rowcols=rowcols,
            image_loc=DataLocation("filesystem", str(path)),
            classifier_loc=DataLocation("filesystem", str(clf)),
        )

    # Untimed: imports and first-call set-up (pyspacer still reloads weights every call).
    tasks.classify_image(message(images[0][0], images[0][1][:1]))
    total = 0
    start = time.perf_counter()
    for path, rowcols in images:
        total += len(tasks.classify_image(message(path, rowcols)).scores)
    return total / (time.perf_counter() - start)


def concurrent_points_per_s(address: str, per_client: list[list]) -> float:
    """Points/s of one ClassifyImages stream per client, all at once."""
    points, seconds = run_streams(address, per_client)
    return points / seconds


def plain_network(weights: Path, images: list) -> object:
    """A timer of the yardstick: pyspacer's network in a plain ONNX Runtime session (default
    settings, best static batch of 2/4/8/16; see bench_network.py) on these images' patches."""
    from bench_network import plain_sessions, run_plain

    from spacer_core import crop

    patches = np.concatenate(
        [
            crop.crop_patches_into_chw(
                path.read_bytes(), rowcols, np.empty((len(rowcols), 3, 224, 224), np.float32)
            )
            for path, rowcols in images
        ]
    )
    sessions = plain_sessions(weights, (2, 4, 8, 16))

    def rate(size: int) -> float:
        start = time.perf_counter()
        done = run_plain(sessions[size][1], size, patches)
        return done / (time.perf_counter() - start)

    for size in sessions:
        rate(size)  # warm
    best = max(sessions, key=rate)
    print(f"plain session: static batch {best}", flush=True)
    return lambda: rate(best)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16, help="images per server run")
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--size", default="4000x3000", help="WIDTHxHEIGHT")
    parser.add_argument("--pyspacer-images", type=int, default=4, help="images in the pyspacer loop")
    parser.add_argument("--clients", default="1,8")
    parser.add_argument("--distinct", type=int, default=8, help="distinct image files made")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="exact", choices=["exact", "fast"])
    parser.add_argument(
        "--cycles",
        type=int,
        default=3,
        help="cycles of (plain session, each client count), alternating; 0: no plain session",
    )
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    client_counts = [int(c) for c in args.clients.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        weights = cached_weights()
        extractor = extractor_json(weights.path, weights.sha256)
        clf = make_classifier(workdir / "clf.pkl")
        files = [write_photo_jpeg(workdir / f"img{i}.jpg", width, height, i) for i in range(args.distinct)]
        images = [
            (files[i % len(files)], random_points(args.points, width, height, i)) for i in range(args.images)
        ]
        mp = width * height / 1e6
        print(
            f"scale: {args.images} images of {width}x{height} ({mp:.1f} MP), {args.points} points each;"
            f" pyspacer loop over {args.pyspacer_images} images; cpus={os.cpu_count()}"
        )

        # Measured before and after the server runs; the faster of the two is
        # the baseline, so load from other processes does not flatter the ratio.
        baseline = pyspacer_points_per_s(images[: args.pyspacer_images], extractor, clf)
        print(f"pyspacer classify_image loop: {baseline:8.1f} points/s")
        rates: list[tuple[int, float]] = []

        server = ServeProcess(
            workdir,
            "--data-root",
            str(weights.path.parent),
            "--device",
            args.device,
            "--precision",
            args.precision,
            "--log-level",
            "WARNING",
        ).start()
        address = server.address
        try:
            with SpacerClient(address) as client:
                # Build (or load the cached) compiled network before timing.
                client.classify_image(extractor, [(10, 10)], fs_loc(files[0]), fs_loc(clf))

            def requests_for(subset, prefix):
                return [
                    SpacerClient.image_request(extractor, rowcols, fs_loc(path), fs_loc(clf), f"{prefix}-{i}")
                    for i, (path, rowcols) in enumerate(subset)
                ]

            plain = plain_network(weights.path, images[:2]) if args.cycles else None
            ratios: dict[int, list[float]] = {c: [] for c in client_counts}
            for cycle in range(max(1, args.cycles)):
                reference = plain() if plain is not None else None
                for clients in client_counts if cycle % 2 == 0 else client_counts[::-1]:
                    # The same images split round-robin over the clients' streams.
                    per_client = [requests_for(images[i::clients], f"c{i}") for i in range(clients)]
                    rate = concurrent_points_per_s(address, per_client)
                    rates.append((clients, rate))
                    note = ""
                    if reference is not None:
                        ratios[clients].append(rate / reference)
                        note = f"  ({rate / reference:.3f} of the plain session's {reference:.1f}/s)"
                    print(f"ClassifyImages, {clients} client(s):  {rate:8.1f} points/s{note}", flush=True)
            for clients, values in ratios.items():
                if values:
                    print(
                        f"ratio ClassifyImages ({clients} client(s)) / plain ONNX Runtime session of "
                        f"pyspacer's network: median {np.median(values):.3f} "
                        f"({min(values):.3f}-{max(values):.3f}, {len(values)} cycles)"
                    )
            rss = server.status().peak_rss_mib
            print(
                f"server peak RSS (VmHWM) after {max(client_counts)} concurrent streams of {mp:.1f} MP images:"
                f" {rss:.0f} MiB (target <= 2048 MiB)"
            )
        finally:
            server.stop()
        again = pyspacer_points_per_s(images[: args.pyspacer_images], extractor, clf)
        print(f"pyspacer classify_image loop (again): {again:8.1f} points/s")
        baseline = max(baseline, again)
        for clients in client_counts:
            rate = float(np.median([r for c, r in rates if c == clients]))
            print(f"ratio ClassifyImages ({clients} client(s)) / pyspacer: {rate / baseline:6.2f}x")


if __name__ == "__main__":
    main()
