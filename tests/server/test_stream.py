"""ClassifyImages: a 200-image bidirectional stream with good and bad images."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

from server._proto.spacer.v1 import spacer_pb2 as pb
from server.client import SpacerClient
from spacer_core.testing import extractor_json, make_classifier, make_image
from tests.support.grpc_server import running_server

spacer = pytest.importorskip("spacer")
from spacer import tasks as sp_tasks  # noqa: E402
from spacer.data_classes import DataLocation as SpLoc  # noqa: E402
from spacer.extractors import FeatureExtractor as SpExtractor  # noqa: E402
from spacer.messages import ClassifyImageMsg as SpClassifyImageMsg  # noqa: E402

from spacer_core.testing import fs_loc as fs  # noqa: E402

N_REQUESTS = 200
N_DISTINCT = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory, efficientnet_weights):  # noqa: F811
    root = tmp_path_factory.mktemp("stream")
    images = []
    rng = np.random.default_rng(11)
    for i in range(N_DISTINCT):
        width, height = int(rng.integers(40, 120)), int(rng.integers(30, 90))
        path = make_image(root / f"img{i}.{'png' if i % 2 else 'jpg'}", width, height, seed=i)
        rowcols = [(int(rng.integers(0, height)), int(rng.integers(0, width))) for _ in range(1 + i % 2)]
        images.append((path, rowcols))
    return {
        "root": root,
        "images": images,
        "clf": make_classifier(root / "clf.pkl", classes=(4, 8, 15, 16)),
        "extractor": extractor_json(efficientnet_weights.path, efficientnet_weights.sha256),
    }


@pytest.fixture(scope="module")
def client():
    with running_server(workers=2, stream_window=8) as server, SpacerClient(server.address, timeout=600) as c:
        yield c


def oracle(data, path, rowcols):
    msg = SpClassifyImageMsg(
        job_token="oracle",
        extractor=SpExtractor.deserialize(data["extractor"]),
        rowcols=rowcols,
        image_loc=SpLoc(**fs(path)),
        classifier_loc=SpLoc(**fs(data["clf"])),
    )
    return sp_tasks.classify_image(msg)


def build_requests(client, data):
    """200 requests: every fifth one broken in one of five ways; expected code per token."""
    requests, expected = [], {}
    bad_kinds = [
        ("corrupt", "INVALID_ARGUMENT"),
        ("outside", "INVALID_ARGUMENT"),
        ("missing", "NOT_FOUND"),
        ("hash", "FAILED_PRECONDITION"),
        ("nopoints", "INVALID_ARGUMENT"),
    ]
    for i in range(N_REQUESTS):
        token = f"req-{i:03d}"
        path, rowcols = data["images"][i % N_DISTINCT]
        image = path if i % 3 else fs(path)  # inline bytes and server-side locations
        extractor = data["extractor"]
        if i % 5 == 4:
            kind, code = bad_kinds[(i // 5) % len(bad_kinds)]
            if kind == "corrupt":
                image = path.read_bytes()[:40] + b"\0" * 10
                image = b"garbage" + image
            elif kind == "outside":
                rowcols = [(10_000, 1)]
            elif kind == "missing":
                image = fs(data["root"] / f"missing{i}.jpg")
            elif kind == "hash":
                extractor = dict(extractor, data_hashes={"weights": "f" * 64})
            elif kind == "nopoints":
                rowcols = []
            expected[token] = code
        else:
            expected[token] = (i % N_DISTINCT, rowcols)
        requests.append(client.image_request(extractor, rowcols, image, fs(data["clf"]), token))
    return requests, expected


@pytest.mark.slow
def test_two_hundred_image_stream_matches_pyspacer_and_survives_bad_images(client, data):
    requests, expected = build_requests(client, data)
    responses = list(client.classify_images(requests))

    tokens = [r.job_token for r in responses]
    assert sorted(tokens) == sorted(expected), "every request answered exactly once"
    oracles = {i: oracle(data, *data["images"][i]) for i in range(N_DISTINCT)}
    good = bad = 0
    for response in responses:
        want = expected[response.job_token]
        if isinstance(want, str):
            assert response.WhichOneof("outcome") == "error", response.job_token
            assert response.error.code_name == want, (response.job_token, response.error.message)
            assert response.error.code == getattr(grpc.StatusCode, want).value[0]
            assert response.error.message
            bad += 1
            continue
        assert response.WhichOneof("outcome") == "result", (response.job_token, response.error.message)
        result = response.result
        ref = oracles[want[0]]
        assert result.job_token == response.job_token
        assert [c.id for c in result.classes] == ref.classes == [4, 8, 15, 16]
        assert [(s.row, s.col) for s in result.scores] == [(r, c) for r, c, _ in ref.scores]
        np.testing.assert_allclose(
            [list(s.scores) for s in result.scores], [p for _, _, p in ref.scores], atol=1e-4, rtol=0
        )
        good += 1
    assert (good, bad) == (160, 40)


def test_error_items_name_the_image(client, data):
    requests, _ = build_requests(client, data)
    broken = [requests[i] for i in (4, 9, 14)]  # corrupt, outside, missing
    responses = {r.job_token: r for r in client.classify_images(broken)}
    assert "req-004" in responses["req-004"].error.message
    assert "10000" in responses["req-009"].error.message
    assert "missing14.jpg" in responses["req-014"].error.message


def test_results_stream_back_before_the_request_stream_ends(client, data):
    """The client sends the next image only after the previous result arrived."""
    path, rowcols = data["images"][0]
    got_result = threading.Event()

    def requests():
        for i in range(3):
            got_result.clear()
            yield client.image_request(data["extractor"], rowcols, path, fs(data["clf"]), f"lockstep-{i}")
            if not got_result.wait(120):
                return  # the server held results back: the test fails below

    tokens = []
    for response in client.classify_images(requests()):
        tokens.append(response.job_token)
        got_result.set()
    assert tokens == ["lockstep-0", "lockstep-1", "lockstep-2"]


def test_empty_stream_ends_cleanly(client):
    assert list(client.classify_images([])) == []


def test_stream_of_unary_shaped_bad_requests_never_aborts(client, data):
    requests = [pb.ClassifyImageRequest(job_token=f"empty-{i}") for i in range(5)]
    responses = list(client.classify_images(requests))
    assert sorted(r.job_token for r in responses) == [f"empty-{i}" for i in range(5)]
    assert {r.error.code_name for r in responses} == {"INVALID_ARGUMENT"}
