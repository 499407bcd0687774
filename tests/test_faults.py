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
from spacer_core import storage
from spacer_core.data_classes import DataLocation, ImageFeatures, ValResults
from tests.support.grpc_server import extractor_json, make_classifier, make_image, running_server
from tests.support.locations import fs_loc
from tests.support.s3 import s3_client, use_endpoint
from tests.support.serve_process import ROOT, ServeProcess
from tests.support.weights import efficientnet_weights  # noqa: F401  (fixture)

# 224 x 224 x 3 float32: one point's patch as the network takes it.
PATCH_BYTES = 224 * 224 * 3 * 4


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
CLF_FEATURES = 30_000
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

    with running_server(workers=2, data_roots=image_data["roots"]) as server, \
            SpacerClient(server.address, max_attempts=2, timeout=120) as client:
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
