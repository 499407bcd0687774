"""Server lifecycle: `spacer serve` in a subprocess, SIGTERM drain, deadlines, cancellation."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server._proto.spacer.v1 import spacer_pb2 as pb
from server.client import SpacerClient
from spacer_core.testing import extractor_json, make_classifier, make_image
from spacer_core.testing import fs_loc as fs
from tests.support.grpc_server import TEST_DATA_ROOTS, running_server

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory, efficientnet_weights):  # noqa: F811
    root = tmp_path_factory.mktemp("lifecycle")
    return {
        "root": root,
        "image": make_image(root / "img.png", 80, 60, seed=4),
        "clf": make_classifier(root / "clf.pkl"),
        "extractor": extractor_json(efficientnet_weights.path, efficientnet_weights.sha256),
    }


def wait_until(predicate, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def start_serve(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, int]:
    """`python -m shell serve --port 0` with the port written to a file, confined to the test folders."""
    port_file = tmp_path / "port"
    log = open(tmp_path / "serve.log", "w")
    roots = [arg for root in TEST_DATA_ROOTS for arg in ("--data-root", str(root))]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shell",
            "serve",
            "--port",
            "0",
            "--port-file",
            str(port_file),
            *roots,
            *args,
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        wait_until(lambda: port_file.exists() or proc.poll() is not None, 60, "the port file")
    except AssertionError:
        proc.kill()
        raise
    assert proc.poll() is None, (tmp_path / "serve.log").read_text()
    return proc, int(port_file.read_text())


def many_points(n: int) -> list[tuple[int, int]]:
    return [(i * 7 % 60, i * 11 % 80) for i in range(n)]


@pytest.mark.slow
def test_sigterm_reports_not_serving_refuses_new_calls_and_finishes_in_flight_work(tmp_path, data):
    proc, port = start_serve(tmp_path, "--grace", "60", "--workers", "2", "--stream-window", "2")
    address = f"127.0.0.1:{port}"
    try:
        with SpacerClient(address, timeout=120) as client:
            assert client.health() == "SERVING"
            assert client.health("") == "SERVING"
            statuses: list[str] = []
            watch = health_pb2_grpc.HealthStub(client.channel).Watch(
                health_pb2.HealthCheckRequest(service="spacer.v1.Spacer")
            )

            def follow() -> None:
                try:
                    for update in watch:
                        statuses.append(health_pb2.HealthCheckResponse.ServingStatus.Name(update.status))
                except grpc.RpcError:
                    pass

            watcher = threading.Thread(target=follow)
            watcher.start()
            wait_until(lambda: statuses == ["SERVING"], what="the first health update")

            requests = [
                client.image_request(
                    data["extractor"], many_points(4), data["image"], fs(data["clf"]), f"d{i}"
                )
                for i in range(8)
            ]
            responses: list[pb.ClassifyImagesResponse] = []
            first = threading.Event()

            def stream() -> None:
                for response in client.classify_images(requests):
                    responses.append(response)
                    first.set()

            streamer = threading.Thread(target=stream)
            streamer.start()
            assert first.wait(120), "no stream result before SIGTERM"
            proc.send_signal(signal.SIGTERM)

            wait_until(lambda: "NOT_SERVING" in statuses, what="NOT_SERVING")
            watch.cancel()  # an open Watch would otherwise hold the drain for the whole grace
            with SpacerClient(address, timeout=10) as late:
                with pytest.raises(grpc.RpcError) as refused:
                    late.list_models()
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

            streamer.join(120)
            watcher.join(10)
        assert sorted(r.job_token for r in responses) == [f"d{i}" for i in range(8)]
        assert all(r.WhichOneof("outcome") == "result" for r in responses)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = (tmp_path / "serve.log").read_text()
    assert "method=ClassifyImages status=OK" in log
    assert "draining" in log


@pytest.mark.slow
def test_serve_rejects_bad_settings_with_a_clear_message():
    result = subprocess.run(
        [sys.executable, "-m", "shell", "serve", "--device", "tpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 2
    assert "device must be one of" in result.stderr and "tpu" in result.stderr
    # 192.0.2.1 is TEST-NET-1: never an address of this machine.
    result = subprocess.run(
        [sys.executable, "-m", "shell", "serve", "--address", "192.0.2.1:50051"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 2
    assert "cannot listen on 192.0.2.1:50051" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def served():
    # A training long enough to be cancelled mid-way: more epochs than the default limit.
    with (
        running_server(workers=1, stream_window=1, max_epochs=5000) as server,
        SpacerClient(server.address) as client,
    ):
        yield server, client


def _engine(server):
    return server.server.engine


def _batcher_patches(server) -> int:
    batchers = _engine(server).runtime._batchers
    return sum(b.stats.patches for b in map(batchers.peek, batchers.keys()) if b is not None)


def assert_work_stopped(server, before: int, at_end: int, total: int) -> None:
    """After the call ended, at most the one image already in the network (window 1) completes."""
    engine = _engine(server)
    wait_until(lambda: engine.admission.active == 0, 30, "admitted work to drain")
    settled = -1
    while settled != _batcher_patches(server):
        settled = _batcher_patches(server)
        time.sleep(0.5)
    assert settled - at_end <= 8, "work went on after the call ended"
    assert settled - before < total


@pytest.mark.slow
def test_deadline_exceeded_stops_the_stream_work(served, data):
    server, client = served
    client.classify_image(data["extractor"], [(1, 1)], data["image"], fs(data["clf"]))  # build the network
    before = _batcher_patches(server)
    requests = [
        client.image_request(data["extractor"], many_points(8), data["image"], fs(data["clf"]), f"t{i}")
        for i in range(40)
    ]
    with pytest.raises(grpc.RpcError) as err:
        list(client.classify_images(requests, timeout=1.0))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_work_stopped(server, before, _batcher_patches(server), 40 * 8)


@pytest.mark.slow
def test_client_cancel_stops_the_stream_work(served, data):
    server, client = served
    client.classify_image(data["extractor"], [(1, 1)], data["image"], fs(data["clf"]))
    before = _batcher_patches(server)
    requests = [
        client.image_request(data["extractor"], many_points(8), data["image"], fs(data["clf"]), f"c{i}")
        for i in range(40)
    ]
    call = client.classify_images(requests)
    next(call)
    call.cancel()
    assert_work_stopped(server, before, _batcher_patches(server), 40 * 8)


def _train_request(root: Path, epochs: int) -> pb.TrainClassifierRequest:
    from spacer_core.data_classes import DataLocation, ImageFeatures

    rng = np.random.default_rng(0)
    images = []
    for i in range(20):
        rowcols = [(int(r), int(c)) for r, c in rng.integers(0, 300, (10, 2))]
        loc = DataLocation("filesystem", str(root / f"f{i}.featurevector"))
        ImageFeatures.from_arrays(
            rng.normal(size=(10, 64)), [r for r, _ in rowcols], [c for _, c in rowcols]
        ).store(loc)
        images.append(
            pb.ImageAnnotations(
                feature_loc=pb.DataLocation(storage_type="filesystem", key=loc.key),
                annotations=[
                    pb.Annotation(row=r, col=c, label=pb.Label(id=int(rng.integers(1, 3))))
                    for r, c in rowcols
                ],
            )
        )
    return pb.TrainClassifierRequest(
        job_token="long-train",
        nbr_epochs=epochs,
        clf_type="LR",
        labels=pb.TrainingTaskLabels(
            train=pb.ImageLabels(images=images[:14]),
            ref=pb.ImageLabels(images=images[14:17]),
            val=pb.ImageLabels(images=images[17:]),
        ),
        model_loc=pb.DataLocation(storage_type="filesystem", key=str(root / "model.pkl")),
        valresult_loc=pb.DataLocation(storage_type="filesystem", key=str(root / "valres.json")),
    )


def test_cancelled_training_stops_before_storing(served, tmp_path):
    server, client = served
    call = client.train_classifier(_train_request(tmp_path, epochs=5000))
    first = next(call)
    assert first.progress.epoch == 1
    call.cancel()
    engine = _engine(server)
    # The pool's only worker is free again once training stopped.
    free = engine._pool.submit(lambda: "free")
    assert free.result(timeout=30) == "free"
    assert not (tmp_path / "model.pkl").exists()
