"""Soak: concurrent ClassifyImages streams against a real `spacer serve` for a while.

    python benchmarks/soak.py [--seconds 600] [--streams 8] [--size 1000x750] [--points 20]
                              [--warmup SECONDS] [--max-growth 0.05] [--json PATH]

Each stream keeps `--window` images in flight until the time is up. Checked:
every request token answered exactly once and with a result (zero failed,
zero lost), and the server's RSS, sampled each second, grows less than
`--max-growth` after the warm-up (peak after it vs peak during it). Prints p50/p99 per-image latency (send to
answer, with `--window` in flight per stream) and exits non-zero on failure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from _common import cpu_name

from server.client import SpacerClient
from server.testing import ServeProcess
from spacer_core.testing import cached_weights, extractor_json, fs_loc, make_classifier, make_image


class Ledger:
    """Tokens sent and answered, and each answer's latency; thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent: dict[str, float] = {}
        self.answers: dict[str, int] = {}
        self.failed: list[str] = []
        self.latencies: list[tuple[float, float]] = []  # (answered at, seconds)
        self.stream_errors: list[str] = []

    def send(self, token: str) -> None:
        with self.lock:
            self.sent[token] = time.monotonic()

    def answer(self, token: str, ok: bool, detail: str) -> None:
        now = time.monotonic()
        with self.lock:
            self.answers[token] = self.answers.get(token, 0) + 1
            if token in self.sent:
                self.latencies.append((now, now - self.sent[token]))
            if not ok:
                self.failed.append(f"{token}: {detail}")


def run_stream(
    client: SpacerClient, index: int, requests_for, ledger: Ledger, deadline: float, window: int
) -> None:
    """One stream: at most `window` images outstanding, new ones sent until `deadline`."""
    room = threading.Semaphore(window)

    def requests():
        n = 0
        while time.monotonic() < deadline:
            room.acquire()
            token = f"s{index}-{n}"
            request = requests_for(token, index + n)
            ledger.send(token)
            yield request
            n += 1

    try:
        for response in client.classify_images(requests()):
            ok = response.WhichOneof("outcome") == "result"
            ledger.answer(response.job_token, ok, "" if ok else response.error.message)
            room.release()
    except Exception as exc:  # noqa: BLE001 - a broken stream is a failure to report
        with ledger.lock:
            ledger.stream_errors.append(f"stream {index}: {exc!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--window", type=int, default=4, help="images in flight per stream")
    parser.add_argument("--size", default="1000x750", help="WIDTHxHEIGHT of the JPEGs")
    parser.add_argument("--points", type=int, default=20)
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds before the RSS baseline (default: a quarter of --seconds, at most 60)",
    )
    parser.add_argument("--max-growth", type=float, default=0.05, help="allowed RSS growth after warm-up")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    warmup = args.warmup if args.warmup is not None else min(60.0, args.seconds / 4)

    with tempfile.TemporaryDirectory(prefix="spacer-soak-") as tmp:
        workdir = Path(tmp)
        weights = cached_weights()
        extractor = extractor_json(weights.path, weights.sha256)
        clf = fs_loc(make_classifier(workdir / "clf.pkl"))
        images = [fs_loc(make_image(workdir / f"img{i}.jpg", width, height, seed=i)) for i in range(8)]
        rng = np.random.default_rng(0)
        point_sets = [
            [
                (int(r), int(c))
                for r, c in zip(rng.integers(0, height, args.points), rng.integers(0, width, args.points))
            ]
            for _ in range(16)
        ]

        def requests_for(token: str, n: int):
            return SpacerClient.image_request(extractor, point_sets[n % 16], images[n % 8], clf, token)

        server = ServeProcess(
            workdir, "--data-root", str(weights.path.parent), "--log-level", "WARNING", "--grace", "5"
        )
        with server, SpacerClient(server.address, timeout=args.seconds + 300) as client:
            # Build (or load the cached) network before the clock starts.
            client.classify_image(extractor, point_sets[0], images[0], clf)
            ledger = Ledger()
            start = time.monotonic()
            deadline = start + args.seconds
            samples: list[tuple[float, float]] = []
            streams = [
                threading.Thread(
                    target=run_stream, args=(client, i, requests_for, ledger, deadline, args.window)
                )
                for i in range(args.streams)
            ]
            for t in streams:
                t.start()
            while any(t.is_alive() for t in streams):
                samples.append((time.monotonic() - start, server.status().rss_mib))
                time.sleep(1.0)
            for t in streams:
                t.join()
            elapsed = time.monotonic() - start
            final = server.status()
            health = client.health()

    # The allocator's high-water mark moves with the work in flight, so the
    # baseline is the peak of the warm-up and growth compares peaks.
    during = [rss for t, rss in samples if t < warmup]
    after = [rss for t, rss in samples if t >= warmup]
    baseline = max(during) if during else float("nan")
    growth = (max(after) - baseline) / baseline if after and during else float("nan")
    lat = np.array([s for answered, s in ledger.latencies])
    lost = sorted(set(ledger.sent) - set(ledger.answers))
    duplicated = sorted(t for t, n in ledger.answers.items() if n > 1)
    unknown = sorted(set(ledger.answers) - set(ledger.sent))
    summary = {
        "machine": f"{cpu_name()}",
        "seconds": round(elapsed, 1),
        "streams": args.streams,
        "window": args.window,
        "image": f"{width}x{height}",
        "points": args.points,
        "sent": len(ledger.sent),
        "answered": sum(ledger.answers.values()),
        "failed": len(ledger.failed),
        "lost": len(lost),
        "duplicated": len(duplicated),
        "unknown": len(unknown),
        "stream_errors": ledger.stream_errors,
        "images_per_s": round(len(lat) / elapsed, 2),
        "points_per_s": round(len(lat) * args.points / elapsed, 1),
        "latency_p50_ms": round(float(np.percentile(lat, 50)) * 1000, 1) if len(lat) else None,
        "latency_p99_ms": round(float(np.percentile(lat, 99)) * 1000, 1) if len(lat) else None,
        "warmup_s": warmup,
        "rss_warmup_peak_mib": round(baseline, 1),
        "rss_max_after_warmup_mib": round(max(after), 1) if after else None,
        "rss_final_mib": round(final.rss_mib, 1),
        "rss_growth": round(growth, 4),
        "server_threads_final": final.threads,
        "health_after": health,
        "rss_samples_mib": [[round(t, 1), round(rss, 1)] for t, rss in samples],
    }
    problems = []
    if not ledger.sent:
        problems.append("no requests were sent")
    if ledger.failed:
        problems.append(f"{len(ledger.failed)} failed, first: {ledger.failed[0]}")
    if lost or duplicated or unknown:
        problems.append(f"lost {lost[:5]}, duplicated {duplicated[:5]}, unknown {unknown[:5]}")
    if ledger.stream_errors:
        problems.append(f"broken streams: {ledger.stream_errors[:3]}")
    if not after or not growth < args.max_growth:
        problems.append(f"RSS grew {growth:.1%} after warm-up (limit {args.max_growth:.0%})")
    if health != "SERVING":
        problems.append(f"health after the soak: {health}")
    summary["ok"] = not problems
    summary["problems"] = problems

    for key, value in summary.items():
        if key == "rss_samples_mib":
            continue
        print(f"{key:>26}: {value}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
