"""Peak memory and throughput of a real `spacer serve` under concurrent 12 MP streams.

    python benchmarks/bench_memory.py [--streams 8] [--images 4] [--points 100]
                                      [--size 4000x3000] [--rounds 3] [--inline]
                                      [--tree after=. --tree before=/path/to/other/checkout]
                                      [-- extra serve flags]

Starts `spacer serve` with its default settings (a fresh process per
measurement, so VmHWM is that run's peak), warms it with one single-point
call, then runs `--streams` concurrent ClassifyImages streams of `--images`
JPEGs each, `--points` points per image, images named by filesystem
DataLocation (the server reads and decodes them) or sent inline with
`--inline`. Reports, per run, the server's RSS after warm-up, its peak RSS
(VmHWM from /proc), points/s over the streams and the server's CPU seconds
(user + system) per 100 points, which other jobs on a shared machine
disturb far less than points/s.

`--tree NAME=PATH` (repeatable) runs the server from another checkout of
this project (PYTHONPATH=PATH); with several trees the runs alternate, tree
after tree, `--rounds` times, and the medians are printed with their ratios
to the first tree. Nothing is written into the trees.

The JPEGs are survey-like (smooth colour fields, gradients and pixel noise,
quality 90), so decoding costs what a photo's does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from _common import cpu_name, run_streams

from server.client import SpacerClient
from server.testing import PACKAGE_ROOT, ServeProcess
from spacer_core.testing import (
    cached_weights,
    extractor_json,
    fs_loc,
    make_classifier,
    random_points,
    write_photo_jpeg,
)

MIB = 1024 * 1024


def measure(
    tree: Path,
    workdir: Path,
    weights_dir: Path,
    extractor: dict,
    clf: Path,
    per_stream: list[list],
    warm_image,
    serve_args: list[str],
) -> dict[str, float]:
    server = ServeProcess(workdir, "--data-root", str(weights_dir), "--log-level", "WARNING", *serve_args)
    server.env["PYTHONPATH"] = str(tree)
    server.start()
    try:
        with SpacerClient(server.address, timeout=600) as client:
            # Builds (or loads the cached) compiled network before the measurement.
            client.classify_image(extractor, [(10, 10)], warm_image, fs_loc(clf))
        time.sleep(1.0)
        base = server.status()
        n, seconds = run_streams(server.address, per_stream)
        end = server.status()
    finally:
        server.stop()
    return {
        "base": base.rss_mib,
        "peak": end.peak_rss_mib,
        "points_s": n / seconds,
        "seconds": seconds,
        "cpu_per_100": (end.cpu_s - base.cpu_s) / n * 100,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--images", type=int, default=4, help="images per stream")
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--size", default="4000x3000", help="WIDTHxHEIGHT")
    parser.add_argument("--distinct", type=int, default=8, help="distinct JPEG files made")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--inline", action="store_true", help="send image bytes in the requests")
    parser.add_argument(
        "--tree",
        action="append",
        default=[],
        help="NAME=PATH: run the server from this checkout (repeatable); default this one",
    )
    parser.add_argument("serve_args", nargs="*", help="extra `spacer serve` flags (after --)")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    trees = [(name, Path(path).resolve()) for name, _, path in (t.partition("=") for t in args.tree)]
    trees = trees or [("this", PACKAGE_ROOT)]

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        weights = cached_weights()
        extractor = extractor_json(weights.path, weights.sha256)
        clf = make_classifier(workdir / "clf.pkl")
        files = [write_photo_jpeg(workdir / f"img{i}.jpg", width, height, i) for i in range(args.distinct)]
        encoded = sum(f.stat().st_size for f in files) / len(files) / MIB

        def image(path: Path):
            return path.read_bytes() if args.inline else fs_loc(path)

        per_stream = []
        for s in range(args.streams):
            requests = []
            for i in range(args.images):
                k = s * args.images + i
                requests.append(
                    SpacerClient.image_request(
                        extractor,
                        random_points(args.points, width, height, k),
                        image(files[k % len(files)]),
                        fs_loc(clf),
                        f"s{s}-{i}",
                    )
                )
            per_stream.append(requests)
        print(
            f"{cpu_name()}, cpus={os.cpu_count()}; {args.streams} streams x {args.images} images of"
            f" {width}x{height} ({width * height / 1e6:.1f} MP, JPEG {encoded:.1f} MiB each),"
            f" {args.points} points; {'inline bytes' if args.inline else 'filesystem locations'};"
            f" serve flags: {' '.join(args.serve_args) or 'defaults'}"
        )

        results: dict[str, list[dict[str, float]]] = {name: [] for name, _ in trees}
        for r in range(args.rounds):
            for name, tree in trees:
                load = os.getloadavg()[0]
                out = measure(
                    tree,
                    workdir,
                    weights.path.parent,
                    extractor,
                    clf,
                    per_stream,
                    image(files[0]),
                    args.serve_args,
                )
                results[name].append(out)
                print(
                    f"round {r + 1} {name:>8}: RSS after warm-up {out['base']:6.0f} MiB, peak"
                    f" {out['peak']:6.0f} MiB, {out['points_s']:6.1f} points/s ({out['seconds']:.1f} s),"
                    f" {out['cpu_per_100']:.2f} CPU s per 100 points; load average at start {load:.1f}",
                    flush=True,
                )

        first = trees[0][0]
        medians = {
            name: {k: statistics.median(o[k] for o in runs) for k in runs[0]}
            for name, runs in results.items()
        }
        for name, m in medians.items():
            ratio = ""
            if name != first:
                ratio = (
                    f"; vs {first}: peak x{m['peak'] / medians[first]['peak']:.2f},"
                    f" points/s x{m['points_s'] / medians[first]['points_s']:.2f},"
                    f" CPU per point x{m['cpu_per_100'] / medians[first]['cpu_per_100']:.2f}"
                )
            print(
                f"median {name:>8}: RSS after warm-up {m['base']:.0f} MiB, peak {m['peak']:.0f} MiB"
                f" (target <= 2048), {m['points_s']:.1f} points/s,"
                f" {m['cpu_per_100']:.2f} CPU s per 100 points{ratio}"
            )


if __name__ == "__main__":
    main()
