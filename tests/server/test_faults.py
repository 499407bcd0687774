"""Faults: a writer killed mid-write, an S3 endpoint that goes away, a client
that cancels mid-stream, and more streams than the server admits.

Everything here is real: a subprocess killed with SIGKILL, moto's HTTP server
stopped and restarted on the same port, `spacer serve` in its own process
measured through /proc. docs/RELIABILITY.md records the figures.
"""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from server.client import SpacerClient
from server.testing import ServeProcess
from spacer_core import storage
from spacer_core.data_classes import DataLocation, ImageFeatures, ValResults
from spacer_core.testing import extractor_json, fs_loc, make_classifier, make_image
from tests.support import ROOT
from tests.support.grpc_server import running_server
from tests.support.s3 import s3_client, use_endpoint

# 224 x 224 x 3 float32: one point's patch as the network takes it.
PATCH_BYTES = 224 * 224 * 3  # a queued patch: uint8 crop
BATCH_PATCH_BYTES = 224 * 224 * 3 * 4  # a patch of float32 batch input


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# ------------------------------------------------------------- killed writers

# Sizes large enough that each write takes a visible while: ~6 MB of
# features, a ~1.4 MB classifier pickle, ~8 MB of validation results.
FEATURE_POINTS, FEATURE_DIM = 1000, 1280
# Large enough that a classifier's write lasts long enough to be caught by a kill.
CLF_FEATURES = 300_000
VAL_ITEMS = 300_000

WRITER = textwrap.dedent(
    f"""
    import sys, numpy as np
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.linear_model import SGDClassifier
    from spacer_core import storage
    from spacer_core.data_classes import DataLocation, ImageFeatures, ValResults

    out = sys.argv[1]
    rng = np.random.default_rng(0)
    feats = rng.normal(size=({FEATURE_POINTS}, {FEATURE_DIM})).astype(np.float32)
    rows = list(range({FEATURE_POINTS}))
    x = rng.normal(size=(40, {CLF_FEATURES}))
    y = np.arange(40) % 4
    clf = CalibratedClassifierCV(SGDClassifier(loss="log_loss", max_iter=5, tol=None).fit(x, y), cv="prefit").fit(x, y)
    scores = rng.random({VAL_ITEMS}).tolist()
    labels = (np.arange({VAL_ITEMS}) % 4).tolist()
    print("ready", flush=True)
    version = 0
    while True:
        version += 1
        feats[0, 0] = version
        ImageFeatures.from_arrays(feats, rows, rows).store(DataLocation("filesystem", out + "/img.featurevector"))
        storage.store_classifier(DataLocation("filesystem", out + "/clf.pkl"), clf)
        ValResults(scores, labels, labels, [1, 2, 3, 4]).store(DataLocation("filesystem", out + "/valres.json"))
    """
)

TARGETS = ("img.featurevector", "clf.pkl", "valres.json")


def check_complete(folder: Path) -> None:
    """Each target is absent or a complete file that loads with the expected shape."""
    feature_path, clf_path, val_path = (folder / name for name in TARGETS)
    if feature_path.exists():
        feats = ImageFeatures.load(DataLocation("filesystem", str(feature_path)))
        assert (feats.npoints, feats.feature_dim) == (FEATURE_POINTS, FEATURE_DIM)
    if clf_path.exists():
        clf = storage.load_classifier(DataLocation("filesystem", str(clf_path)))
        assert clf.calibrated_classifiers_[0].estimator.coef_.shape == (4, CLF_FEATURES)
    if val_path.exists():
        val = ValResults.load(DataLocation("filesystem", str(val_path)))
        assert len(val.gt) == len(val.scores) == VAL_ITEMS


def temp_files(folder: Path, target: str) -> list[Path]:
    """write_file_atomic's temporaries for target: `.<name>.<random>.tmp` beside it."""
    return [p for p in folder.iterdir() if p.name.startswith(f".{target}.") and p.name.endswith(".tmp")]


@pytest.mark.slow
def test_sigkill_mid_write_never_leaves_a_partial_file(tmp_path):
    """Kill a real writer many times, half of them the moment a temporary file
    is growing; every target is always absent or complete."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    out = tmp_path / "out"
    out.mkdir()
    rng = random.Random(0)
    kills = 0
    mid_write = dict.fromkeys(TARGETS, 0)  # kills that left that target's temporary behind
    while kills < 9 or min(mid_write.values()) < 1:
        assert kills < 40, f"could not kill a write in progress often enough: {mid_write}"
        # Temporaries left by earlier kills; a new one after this kill means
        # the kill landed mid-write (a finished write renames its temporary).
        prior = {name: {p.name for p in temp_files(out, name)} for name in TARGETS}
        proc = subprocess.Popen(
            [sys.executable, str(script), str(out)],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        target = TARGETS[kills % 3]
        if kills % 2:
            time.sleep(rng.uniform(0.0, 0.8))
        else:
            # Kill as soon as this target's temporary holds data.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                fresh = [p for p in temp_files(out, target) if p.name not in prior[target]]
                if any(p.exists() and p.stat().st_size > 0 for p in fresh):
                    break
                time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
        kills += 1
        for name in TARGETS:
            if {p.name for p in temp_files(out, name)} - prior[name]:
                mid_write[name] += 1
        check_complete(out)
    print(f"{kills} kills, mid-write per target: {mid_write}")
    # Every kind of write was caught in progress at least once.
    assert min(mid_write.values()) >= 1, mid_write


# ------------------------------------------------------------ S3 goes away


@pytest.fixture(scope="module")
def image_data(tmp_path_factory, efficientnet_weights):  # noqa: F811
    root = tmp_path_factory.mktemp("faults")
    return {
        "roots": (tmp_path_factory.getbasetemp(),),
        "image": make_image(root / "img.png", 96, 72, seed=5),
        "clf": make_classifier(root / "clf.pkl"),
        "extractor": extractor_json(efficientnet_weights.path, efficientnet_weights.sha256),
    }


class Moto:
    """moto's S3 server on loopback that can be stopped and started again on the same port.

    moto keeps its data in this process, so objects outlive a restart.
    """

    def __init__(self) -> None:
        self.port = 0
        self.server = None

    def start(self) -> Moto:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.port = self.server.get_host_and_port()[1]
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def moto(monkeypatch) -> Iterator[Moto]:
    server = Moto().start()
    use_endpoint(monkeypatch, server.url)
    try:
        yield server
    finally:
        server.stop()


class Stream:
    """One ClassifyImages call fed request by request: `ask` sends one and waits for its answer."""

    def __init__(self, client: SpacerClient, data: dict):
        self.client = client
        self.data = data
        self.requests: queue.Queue = queue.Queue()
        self.responses = client.classify_images(iter(self.requests.get, None))

    def ask(self, token: str, image, points=((10, 10), (40, 60))):
        self.requests.put(
            self.client.image_request(self.data["extractor"], points, image, fs_loc(self.data["clf"]), token)
        )
        response = next(self.responses)
        assert response.job_token == token
        return response

    def close(self) -> list:
        self.requests.put(None)
        return list(self.responses)


@pytest.mark.slow
def test_s3_endpoint_stopping_mid_stream_is_unavailable_then_work_resumes(moto, image_data):
    bucket = "faults"
    s3 = s3_client(moto.url)
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="images/a.png", Body=Path(image_data["image"]).read_bytes())
    on_s3 = {"storage_type": "s3", "key": "images/a.png", "bucket_name": bucket}

    with (
        running_server(workers=2, data_roots=image_data["roots"]) as server,
        SpacerClient(server.address, max_attempts=2, timeout=120) as client,
    ):
        stream = Stream(client, image_data)
        before = stream.ask("s3-before", on_s3)
        assert before.WhichOneof("outcome") == "result"

        moto.stop()
        start = time.monotonic()
        down = stream.ask("s3-down", on_s3)
        failed_in = time.monotonic() - start
        assert down.WhichOneof("outcome") == "error"
        assert down.error.code_name == "UNAVAILABLE"
        assert f"s3://{bucket}/images/a.png" in down.error.message
        assert "unreachable" in down.error.message
        assert failed_in < 15, f"a dead endpoint took {failed_in:.1f} s to fail"

        # Filesystem work on the same stream and other calls go on meanwhile.
        assert stream.ask("fs-during", image_data["image"]).WhichOneof("outcome") == "result"
        assert client.health() == "SERVING"

        moto.start()  # the same port: the endpoint returns
        after = stream.ask("s3-after", on_s3)
        assert after.WhichOneof("outcome") == "result"
        assert list(after.result.scores[0].scores) == list(before.result.scores[0].scores)
        assert stream.close() == []
    print(f"dead S3 endpoint failed the image in {failed_in:.2f} s")


# ---------------------------------------------- a real server process, measured

MAX_QUEUE, STREAM_WINDOW, WORKERS = 4, 2, 2
WIDTH, HEIGHT, POINTS = 1000, 750, 20


@pytest.fixture(scope="module")
def serve(tmp_path_factory, image_data):
    """`spacer serve` with a small admission queue, in its own process so /proc measures only it."""
    workdir = tmp_path_factory.mktemp("serve")
    images = [make_image(workdir / f"img{i}.jpg", WIDTH, HEIGHT, seed=i) for i in range(4)]
    process = ServeProcess(
        workdir,
        "--max-queue",
        str(MAX_QUEUE),
        "--stream-window",
        str(STREAM_WINDOW),
        "--workers",
        str(WORKERS),
        "--data-root",
        str(tmp_path_factory.getbasetemp()),
        "--grace",
        "1",
        "--log-level",
        "WARNING",
    )
    with process, SpacerClient(process.address, max_attempts=2, timeout=300) as client:
        yield process, client, images


def image_requests(client: SpacerClient, data: dict, images: list, n: int, prefix: str) -> list:
    points = [((i * 37) % HEIGHT, (i * 53) % WIDTH) for i in range(POINTS)]
    return [
        client.image_request(
            data["extractor"], points, fs_loc(images[i % len(images)]), fs_loc(data["clf"]), f"{prefix}-{i}"
        )
        for i in range(n)
    ]


def settled(process: ServeProcess, quiet_cpu_s: float = 0.05, window_s: float = 0.5, timeout: float = 60):
    """Wait until the server uses under quiet_cpu_s of CPU in window_s; its status then."""
    deadline = time.monotonic() + timeout
    last = process.status()
    while True:
        time.sleep(window_s)
        now = process.status()
        if now.cpu_s - last.cpu_s < quiet_cpu_s:
            return now
        assert time.monotonic() < deadline, "the server kept working"
        last = now


@pytest.mark.slow
def test_client_cancel_mid_stream_returns_threads_and_memory(serve, image_data):
    process, client, images = serve
    warm = list(client.classify_images(image_requests(client, image_data, images, 8, "warm")))
    assert all(r.WhichOneof("outcome") == "result" for r in warm)
    base = settled(process)

    started = time.monotonic()
    call = client.classify_images(image_requests(client, image_data, images, 200, "cancel"))
    for _ in range(3):
        assert next(call).WhichOneof("outcome") == "result"
    during = process.status()
    call.cancel()
    after = settled(process)
    stopped_in = time.monotonic() - started
    # 200 images would take far longer than the few that were in flight.
    assert stopped_in < 30
    assert after.threads <= base.threads, (base, during, after)
    assert after.rss_mib <= base.rss_mib * 1.05 + 16, (base, during, after)
    print(
        f"cancel: threads {base.threads} -> {during.threads} -> {after.threads};"
        f" RSS {base.rss_mib:.0f} -> {during.rss_mib:.0f} -> {after.rss_mib:.0f} MiB;"
        f" quiet {stopped_in:.1f} s after the call began"
    )


def overload_round(
    process: ServeProcess,
    client: SpacerClient,
    data: dict,
    images: list,
    streams: int,
    per_stream: int,
    tag: str,
) -> dict:
    """`streams` concurrent ClassifyImages streams while unary calls are fired back to back;
    what each got, and the server's peak RSS and threads sampled every 50 ms."""
    answered: dict[str, list[str]] = {}
    errors: list[BaseException] = []

    def run_stream(s: int) -> None:
        try:
            for r in client.classify_images(image_requests(client, data, images, per_stream, f"{tag}{s}")):
                answered.setdefault(r.job_token, []).append(r.WhichOneof("outcome"))
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=run_stream, args=(s,)) for s in range(streams)]
    for t in threads:
        t.start()
    unary = {"ok": 0, "exhausted": 0}
    messages = set()
    single = image_requests(client, data, images, 1, f"{tag}-unary")[0]
    peak_threads, peak_rss = 0, 0.0
    while any(t.is_alive() for t in threads):
        try:
            # As bulk work: interactive calls have admission slots of their own.
            client.stub.ClassifyImage(single, timeout=60, metadata=(("x-priority", "bulk"),))
            unary["ok"] += 1
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
            unary["exhausted"] += 1
            messages.add(err.details())
        now = process.status()
        peak_threads, peak_rss = max(peak_threads, now.threads), max(peak_rss, now.rss_mib)
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert not errors, errors
    # Every stream request answered exactly once, with a result: streams waited, none failed.
    assert sorted(answered) == sorted(f"{tag}{s}-{i}" for s in range(streams) for i in range(per_stream))
    assert all(outcomes == ["result"] for outcomes in answered.values())
    assert unary["exhausted"] >= 1, unary
    assert all("queue is full" in m for m in messages), messages
    return {"unary": unary, "peak_rss": peak_rss, "peak_threads": peak_threads}


@pytest.mark.slow
def test_overload_refuses_unary_calls_and_streams_wait_with_bounded_memory(serve, image_data):
    process, client, images = serve
    list(client.classify_images(image_requests(client, image_data, images, 2, "warm")))
    base = settled(process)
    first = overload_round(process, client, image_data, images, 8, 6, "a")
    second = overload_round(process, client, image_data, images, 16, 6, "b")
    lifetime_peak = process.status().peak_rss_mib  # includes building the network at warm-up
    print(
        f"overload: base RSS {base.rss_mib:.0f} MiB, threads {base.threads}; 8 streams: {first};"
        f" 16 streams: {second}; lifetime VmHWM {lifetime_peak:.0f} MiB"
    )
    # Work in memory is bounded by admission, not by the number of streams:
    # at most MAX_QUEUE images hold uint8 patches and a share of float32
    # batch input (4 patches, the CPU batch), WORKERS decode an RGB image
    # each. 128 MiB covers what the allocator keeps from freed buffers.
    per_image = POINTS * PATCH_BYTES + min(POINTS, 4) * BATCH_PATCH_BYTES
    work_mib = (MAX_QUEUE * per_image + WORKERS * WIDTH * HEIGHT * 3) / 2**20
    bound_mib = base.rss_mib + work_mib + 128
    assert max(first["peak_rss"], second["peak_rss"]) <= bound_mib, (first, second, bound_mib)
    # Threads do not follow the number of streams either (pools start their
    # threads lazily, so the first round may add a few).
    assert first["peak_threads"] <= base.threads + 4, (base, first)
    assert second["peak_threads"] <= first["peak_threads"], (first, second)
