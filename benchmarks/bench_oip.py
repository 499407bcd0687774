"""The Open Inference Protocol layer vs spacer.v1 on one `spacer serve` process.

    python benchmarks/bench_oip.py [--images 8] [--points 50] [--size 1600x1200]
                                   [--rounds 5] [--concurrency 4] [--calls 60]

Needs tritonclient[grpc] (the test extra). Makes JPEG images, a weights file
and a classifier (loaded as repository models), then, alternating the two
sides in each round and reporting medians over the rounds:

- throughput, points/s: the same images and points (sent inline) classified
  by ModelInfer on `spacer_pipeline` from tritonclient (`--concurrency`
  calls in flight) vs one spacer.v1 ClassifyImages stream (the server's
  stream window, 4, in flight), and by a tritonclient ModelStreamInfer
  stream vs the same ClassifyImages stream;
- per-call overhead: median latency of sequential ModelInfer vs ClassifyImage
  calls of one point on a small image (the difference is what the OIP
  layer and tritonclient add per call), and the server-side OIP conversion
  alone (reading the request's tensors, building the response) timed in
  this process.
"""

from __future__ import annotations

import argparse
import queue
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from _common import cpu_name

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

PARAMS = {"extractor": "efficientnet", "classifier": "clf"}


def oip_inputs(image: bytes, rowcols) -> list:
    t = grpcclient.InferInput("IMAGE", [1], "BYTES")
    t.set_data_from_numpy(np.array([image], dtype=object))
    p = grpcclient.InferInput("POINTS", [len(rowcols), 2], "INT32")
    p.set_data_from_numpy(np.asarray(rowcols, dtype=np.int32))
    return [t, p]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--points", type=int, default=50)
    parser.add_argument("--size", default="1600x1200")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--calls", type=int, default=60, help="sequential calls per overhead round")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))

    work = Path(tempfile.mkdtemp(prefix="bench_oip_"))
    repo = work / "models"
    repo.mkdir()
    weights = cached_weights()
    shutil.copy(weights.path, repo / "efficientnet.pt")
    make_classifier(repo / "clf.pkl")
    extractor = extractor_json(repo / "efficientnet.pt", weights.sha256)
    clf_loc = fs_loc(repo / "clf.pkl")
    images = [
        write_photo_jpeg(work / f"img{i}.jpg", width, height, i).read_bytes() for i in range(args.images)
    ]
    rowcols = [random_points(args.points, width, height, 100 + i) for i in range(args.images)]
    tiny = write_photo_jpeg(work / "tiny.jpg", 256, 256, 99).read_bytes()
    total_points = args.images * args.points
    print(
        f"machine: {cpu_name()}; {args.images} images {width}x{height}, {args.points} points each,"
        f" {args.rounds} rounds, ModelInfer concurrency {args.concurrency}"
    )

    with (
        ServeProcess(work, "--model-repository", str(repo), "--log-level", "WARNING") as proc,
        SpacerClient(proc.address, timeout=600) as spacer,
        grpcclient.InferenceServerClient(proc.address) as triton,
    ):
        triton.load_model("efficientnet")
        triton.load_model("clf")

        def classify_images() -> list:
            reqs = [
                SpacerClient.image_request(extractor, rc, img, clf_loc, job_token=str(i))
                for i, (img, rc) in enumerate(zip(images, rowcols))
            ]
            out = {r.job_token: r.result for r in spacer.classify_images(reqs)}
            return [out[str(i)] for i in range(len(images))]

        def model_infer() -> list:
            with ThreadPoolExecutor(args.concurrency) as pool:
                return list(
                    pool.map(
                        lambda i: triton.infer(
                            "spacer_pipeline", oip_inputs(images[i], rowcols[i]), parameters=PARAMS
                        ),
                        range(len(images)),
                    )
                )

        def stream_infer() -> list:
            got: queue.Queue = queue.Queue()
            triton.start_stream(callback=lambda result, error: got.put((result, error)))
            try:
                for i in range(len(images)):
                    triton.async_stream_infer(
                        "spacer_pipeline",
                        oip_inputs(images[i], rowcols[i]),
                        request_id=str(i),
                        parameters=PARAMS,
                    )
                results = [got.get(timeout=600) for _ in images]
            finally:
                triton.stop_stream()
            assert all(e is None for _, e in results), [e for _, e in results if e]
            by_id = {r.get_response().id: r for r, _ in results}
            return [by_id[str(i)] for i in range(len(images))]

        # Warm up and check both sides agree before timing anything.
        v1, oip = classify_images(), model_infer()
        for ours, theirs in zip(v1, oip):
            expected = np.array([list(p.scores) for p in ours.scores], dtype=np.float32)
            np.testing.assert_allclose(theirs.as_numpy("SCORES"), expected, rtol=1e-5, atol=1e-6)
        stream_infer()

        timings: dict[str, list[float]] = {"ClassifyImages": [], "ModelInfer": [], "ModelStreamInfer": []}
        sides = {
            "ClassifyImages": classify_images,
            "ModelInfer": model_infer,
            "ModelStreamInfer": stream_infer,
        }
        for r in range(args.rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for name in order:
                start = time.perf_counter()
                sides[name]()
                timings[name].append(time.perf_counter() - start)
        base = total_points / statistics.median(timings["ClassifyImages"])
        print("\nthroughput (median of rounds):")
        for name, times in timings.items():
            rate = total_points / statistics.median(times)
            # Each round ran both sides back to back: the median of the per-round
            # ratios cancels most of the drift of a shared machine.
            paired = statistics.median(v1 / t for v1, t in zip(timings["ClassifyImages"], times))
            print(
                f"  {name:17s} {rate:7.1f} points/s  ({rate / base:.3f}x ClassifyImages;"
                f" median per-round ratio {paired:.3f};"
                f" rounds {', '.join(f'{total_points / t:.0f}' for t in times)})"
            )

        # Per-call overhead: one point on a small image, one call at a time.
        one = [(128, 128)]
        latency: dict[str, list[float]] = {"ClassifyImage": [], "ModelInfer": []}
        calls = {
            "ClassifyImage": lambda: spacer.classify_image(extractor, one, tiny, clf_loc),
            "ModelInfer": lambda: triton.infer("spacer_pipeline", oip_inputs(tiny, one), parameters=PARAMS),
        }
        for fn in calls.values():
            fn()
        for r in range(args.rounds):
            for name in list(calls) if r % 2 == 0 else list(reversed(calls)):
                for _ in range(args.calls // 2):
                    start = time.perf_counter()
                    calls[name]()
                    latency[name].append(time.perf_counter() - start)
        v1_ms = statistics.median(latency["ClassifyImage"]) * 1000
        oip_ms = statistics.median(latency["ModelInfer"]) * 1000
        print(f"\nper call, 1 point on 256x256 (median of {len(latency['ModelInfer'])} calls each):")
        print(f"  ClassifyImage  {v1_ms:7.2f} ms")
        print(f"  ModelInfer     {oip_ms:7.2f} ms  ({oip_ms - v1_ms:+.2f} ms, {oip_ms / v1_ms:.3f}x)")

    # The server-side conversion alone, in this process.
    from server._proto.inference import grpc_service_pb2 as pb
    from server.oip import tensors
    from server.oip.models import IMAGE, IMAGE_PATH, POINTS

    request = pb.ModelInferRequest(model_name="spacer_pipeline")
    for spec, value in ((IMAGE, [images[0]]), (POINTS, np.asarray(rowcols[0], np.int32))):
        tensor = request.inputs.add(name=spec.name, datatype=spec.datatype)
        if isinstance(value, list):
            tensor.shape.append(1)
            request.raw_input_contents.append(tensors.encode_bytes(value))
        else:
            tensor.shape.extend(value.shape)
            request.raw_input_contents.append(value.tobytes())
    wire = request.SerializeToString()
    scores = np.random.default_rng(0).random((args.points, 3)).astype(np.float32)
    samples = []
    for _ in range(2000):
        start = time.perf_counter()
        parsed = pb.ModelInferRequest.FromString(wire)
        tensors.read_inputs(parsed, [IMAGE, IMAGE_PATH, POINTS], "spacer_pipeline")
        response = pb.ModelInferResponse(model_name="spacer_pipeline", model_version="1")
        tensors.add_output(response, "SCORES", scores)
        tensors.add_output(response, "LABELS", [b"1", b"2", b"3"])
        response.SerializeToString()
        samples.append(time.perf_counter() - start)
    print(
        f"\nOIP conversion alone ({len(images[0]) / 1e3:.0f} kB image, {args.points} points:"
        f" parse, read tensors, build and serialize the response):"
        f" {statistics.median(samples) * 1e6:.0f} us median"
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
