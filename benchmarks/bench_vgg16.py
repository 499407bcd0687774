"""Points/s of the VGG16 (Caffe) path on CPU: true-size VGG16, random weights, no Caffe.

Writes CoralNet's VGG16 layout as a .prototxt + .caffemodel (spacer_core/
weights/caffe_synthetic.py), then times VGG16CaffeExtractor end to end (crop + network)
on a 2000x1500 image in a fresh runtime with eager PyTorch and with the
default compiled backend. Usage: python benchmarks/bench_vgg16.py [--points 40]
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import cpu_name
from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=40)
    args = parser.parse_args()

    from spacer_core import config
    from spacer_core import runtime as runtime_module
    from spacer_core.data_classes import DataLocation
    from spacer_core.extractors import VGG16CaffeExtractor
    from spacer_core.runtime import Runtime, RuntimeSettings
    from spacer_core.weights.caffe_synthetic import vgg16_layers, write_net

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config.EXTRACTORS_CACHE_DIR = str(folder / "cache")
        definition, weights = write_net(folder, "vgg16", vgg16_layers())
        rng = np.random.default_rng(0)
        image = Image.fromarray(rng.integers(0, 256, (1500, 2000, 3), dtype=np.uint8))
        points = [
            (int(r), int(c))
            for r, c in zip(rng.integers(0, 1500, args.points), rng.integers(0, 2000, args.points))
        ]
        extractor = VGG16CaffeExtractor(
            data_locations={
                "definition": DataLocation("filesystem", str(definition)),
                "weights": DataLocation("filesystem", str(weights)),
            }
        )
        print(f"CPU: {cpu_name()}; {args.points} points per run")
        default_load = runtime_module.load_backend
        for label, kind in (("eager PyTorch", "eager"), ("default (compiled)", "auto")):
            # The runtime picks backends itself; force the kind for this run.
            runtime_module.load_backend = functools.partial(default_load, kind=kind)  # type: ignore[assignment]
            active = Runtime(RuntimeSettings(device="cpu"))
            with active.activate():
                start = time.perf_counter()
                extractor(image, points[:2])  # load / compile
                load = time.perf_counter() - start
                start = time.perf_counter()
                extractor(image, points)
                elapsed = time.perf_counter() - start
            active.close()
            print(f"{label}: load {load:.1f} s, {args.points / elapsed:.2f} points/s")
        runtime_module.load_backend = default_load  # type: ignore[assignment]


if __name__ == "__main__":
    main()
