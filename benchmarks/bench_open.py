"""What race-free file opening costs: ClassifyImages throughput, confined opens vs check-then-open.

    python benchmarks/bench_open.py [--images 16] [--points 5] [--pairs 5] [--size 1000x750]

One in-process server confined to a temporary data root serves EfficientNet
(synthetic weights) ClassifyImages streams; images, weights and the
classifier are files in the root. Runs alternate between

- confined: `ConfinedFileSystemStorage` as the server uses it (each file
  reached from the root's descriptor with O_NOFOLLOW, weights re-hashed);
- baseline: the same policy check, then a plain `open` by path (the old
  check-then-open),

and the report gives the median points/s of each, their ratio, and the
cost of one open of each kind (best of 2000).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from server.client import SpacerClient
from server.config import ServerConfig
from server.testing import running_server
from spacer_core import storage
from spacer_core.testing import extractor_json, make_classifier, make_weights, random_points, write_photo_jpeg
from spacer_core.testing import fs_loc as fs

CONFINED = (storage.ConfinedFileSystemStorage.open, storage.ConfinedFileSystemStorage.store)
PLAIN = (storage.FileSystemStorage.open, storage.FileSystemStorage.store)


def use(methods: tuple) -> None:
    storage.ConfinedFileSystemStorage.open, storage.ConfinedFileSystemStorage.store = methods  # type: ignore[method-assign]


def open_cost(path: Path, roots: tuple[Path, ...], methods: tuple, repeat: int = 2000) -> float:
    use(methods)
    confined = storage.ConfinedFileSystemStorage(roots)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        with confined.open(str(path)) as f:
            f.read(1)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--points", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--size", default="1000x750")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp).resolve()
        (root / "a" / "b").mkdir(parents=True)
        sha = make_weights(root / "a" / "weights.pt")
        extractor = extractor_json(root / "a" / "weights.pt", sha)
        clf = make_classifier(root / "a" / "clf.pkl")
        images = [
            write_photo_jpeg(root / "a" / "b" / f"img{i}.jpg", width, height, i) for i in range(args.images)
        ]
        rowcols = [random_points(args.points, width, height, i) for i in range(args.images)]
        config = ServerConfig(workers=2, log_level="WARNING", data_roots=(root,))
        with running_server(config) as server, SpacerClient(server.address, timeout=600) as client:

            def run() -> float:
                requests = [
                    SpacerClient.image_request(extractor, rc, fs(path), fs(clf), f"r{i}")
                    for i, (path, rc) in enumerate(zip(images, rowcols))
                ]
                start = time.perf_counter()
                replies = list(client.classify_images(requests))
                assert all(r.WhichOneof("outcome") == "result" for r in replies), replies[0]
                return args.images * args.points / (time.perf_counter() - start)

            run()  # network built, classifier loaded
            rates: dict[str, list[float]] = {"confined": [], "baseline": []}
            for pair in range(args.pairs):
                order = ("confined", "baseline") if pair % 2 == 0 else ("baseline", "confined")
                for name in order:
                    use(CONFINED if name == "confined" else PLAIN)
                    rates[name].append(run())
            use(CONFINED)
        deep = images[0]
        costs = {
            name: open_cost(deep, (root,), methods)
            for name, methods in (("confined", CONFINED), ("baseline", PLAIN))
        }
        use(CONFINED)

    med = {name: statistics.median(values) for name, values in rates.items()}
    print(
        f"ClassifyImages, {args.images} images x {args.points} points, {width}x{height}, {args.pairs} pairs"
    )
    for name in ("baseline", "confined"):
        print(f"  {name:9s} median {med[name]:7.1f} points/s  runs {[round(v, 1) for v in rates[name]]}")
    print(f"  ratio confined / baseline: {med['confined'] / med['baseline']:.3f}")
    print(
        f"  one open (root/a/b/file): baseline {costs['baseline'] * 1e6:.1f} us,"
        f" confined {costs['confined'] * 1e6:.1f} us"
    )


if __name__ == "__main__":
    main()
