"""Interactive ClassifyImage latency while bulk ClassifyImages streams run, priority off vs on.

    python benchmarks/bench_priority.py [--seconds 30] [--streams 8] [--bulk-points 50]
                                        [--interactive-points 20] [--size 1000x750] [--device auto]

For each setting (`--priority false`, then `--priority true`) a real
`spacer serve` process is started; `--streams` clients each keep a
ClassifyImages stream full of bulk images for `--seconds`, while one client
sends ClassifyImage calls one after another (a pause of 0.1 s between them)
and records each call's latency. Prints p50 / p99 / max latency of the
interactive calls, how many of them failed, and the bulk throughput.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from _common import cpu_name

from server.client import SpacerClient
from server.testing import ServeProcess
from spacer_core.testing import (
    cached_weights,
    extractor_json,
    make_classifier,
    random_points,
    write_photo_jpeg,
)
from spacer_core.testing import fs_loc as fs


def run(address: str, seconds: float, streams: int, bulk, interactive, window: int = 4) -> dict[str, Any]:
    """Bulk streams and interactive calls for `seconds`; latency figures and bulk points/s."""
    stop = threading.Event()
    bulk_points = [0] * streams
    bulk_errors = [0] * streams

    def requests(i: int, credit: threading.Semaphore) -> Iterator:
        # gRPC sends a request iterator ahead as far as flow control lets it;
        # credits keep each stream a few images ahead of its results, as a
        # real bulk client would, so nothing piles up beyond the server's window.
        n = 0
        while not stop.is_set():
            credit.acquire()
            yield bulk[(i + n) % len(bulk)]
            n += 1

    def stream(i: int) -> None:
        credit = threading.Semaphore(window + 2)
        with SpacerClient(address, timeout=seconds + 600) as client:
            for response in client.classify_images(requests(i, credit)):
                credit.release()
                if response.WhichOneof("outcome") == "result":
                    bulk_points[i] += len(response.result.scores)
                else:
                    bulk_errors[i] += 1

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(streams)]
    for t in threads:
        t.start()
    time.sleep(min(5.0, seconds / 4))  # let the streams fill the server's queues
    latencies: list[float] = []
    failures: dict[str, int] = {}
    start = time.monotonic()
    counted_from = sum(bulk_points)
    with SpacerClient(address, timeout=120) as client:
        while time.monotonic() - start < seconds:
            asked = time.perf_counter()
            try:
                client.stub.ClassifyImage(interactive, timeout=120)
                latencies.append(time.perf_counter() - asked)
            except grpc.RpcError as exc:
                failures[exc.code().name] = failures.get(exc.code().name, 0) + 1
            time.sleep(0.1)
    elapsed = time.monotonic() - start
    bulk_rate = (sum(bulk_points) - counted_from) / elapsed
    stop.set()
    for t in threads:
        t.join(300)
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {
        "calls": len(latencies),
        "failed": sum(failures.values()),
        "failures": failures,
        "p50": float(np.percentile(lat, 50)),
        "p99": float(np.percentile(lat, 99)),
        "max": float(lat.max()),
        "bulk_points_per_s": bulk_rate,
        "bulk_errors": sum(bulk_errors),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30, help="measured seconds per setting")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--bulk-points", type=int, default=50)
    parser.add_argument("--interactive-points", type=int, default=20)
    parser.add_argument("--size", default="1000x750", help="WIDTHxHEIGHT of every image")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--max-queue",
        type=int,
        default=None,
        help="the server's --max-queue (default: its own, 32 = 8 streams x window 4)",
    )
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    print(
        f"{cpu_name()}, cpus={os.cpu_count()}, max queue {args.max_queue or 'default'};"
        f" {args.streams} bulk streams of {width}x{height}"
        f" images x {args.bulk_points} points; interactive ClassifyImage of"
        f" {args.interactive_points} points; {args.seconds:.0f} s per setting"
    )

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        weights = cached_weights()
        extractor = extractor_json(weights.path, weights.sha256)
        clf = make_classifier(workdir / "clf.pkl")
        files = [write_photo_jpeg(workdir / f"img{i}.jpg", width, height, i) for i in range(8)]
        bulk = [
            SpacerClient.image_request(
                extractor, random_points(args.bulk_points, width, height, i), fs(path), fs(clf), f"bulk-{i}"
            )
            for i, path in enumerate(files)
        ]
        interactive = SpacerClient.image_request(
            extractor,
            random_points(args.interactive_points, width, height, 99),
            fs(files[0]),
            fs(clf),
            "interactive",
        )
        results = {}
        for priority in (False, True):
            server = ServeProcess(
                workdir,
                "--data-root",
                str(weights.path.parent),
                "--device",
                args.device,
                "--priority",
                str(priority).lower(),
                "--log-level",
                "WARNING",
                *(["--max-queue", str(args.max_queue)] if args.max_queue else []),
            ).start()
            address = server.address
            try:
                with SpacerClient(address) as client:
                    client.classify_image(extractor, [(10, 10)], fs(files[0]), fs(clf))  # warm
                results[priority] = run(address, args.seconds, args.streams, bulk, interactive)
            finally:
                server.stop()
            r = results[priority]
            print(
                f"--priority {str(priority).lower():5}: interactive calls {r['calls']:3d}"
                f" (failed {r['failed']} {r['failures'] or ''}); latency p50 {r['p50']:.3f} s,"
                f" p99 {r['p99']:.3f} s, max {r['max']:.3f} s; bulk {r['bulk_points_per_s']:.1f}"
                f" points/s ({r['bulk_errors']} bulk errors)",
                flush=True,
            )
        before, after = results[False], results[True]
        print(
            f"interactive p99: {before['p99']:.3f} s -> {after['p99']:.3f} s; bulk throughput"
            f" {after['bulk_points_per_s'] / before['bulk_points_per_s']:.2f}x of before"
        )


if __name__ == "__main__":
    main()
