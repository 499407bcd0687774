"""Operators' view of the work done: points and failed stream items in the metrics and the
call log, models loaded by calls in ListModels, the limits in force in `spacer check-config`."""

from __future__ import annotations

import json
import logging
import shutil
import time

import grpc
import numpy as np
import pytest

from server._proto.inference import grpc_service_pb2 as oip
from server._proto.inference import grpc_service_pb2_grpc as oip_grpc
from server.client import SpacerClient
from spacer_core.testing import extractor_json, make_classifier, make_image
from spacer_core.testing import fs_loc as fs
from tests.server.test_observe import delta, rpc_lines, scrape
from tests.support.grpc_server import running_server

POINTS = [(5, 6), (20, 30), (40, 10)]


@pytest.fixture(scope="module")
def data(tmp_path_factory, efficientnet_weights):  # noqa: F811
    root = tmp_path_factory.mktemp("operators")
    repo = root / "models"
    repo.mkdir()
    shutil.copy(efficientnet_weights.path, repo / "effnet.pt")
    make_classifier(repo / "reef_clf.pkl")
    return {
        "root": root,
        "repo": repo,
        "image": make_image(root / "img.png", 64, 48, seed=4),
        "clf": make_classifier(root / "clf.pkl"),
        "extractor": extractor_json(efficientnet_weights.path, efficientnet_weights.sha256),
        "sha256": efficientnet_weights.sha256,
    }


@pytest.fixture(scope="module")
def served(data):
    with running_server(workers=2, metrics_port=0, log_level="INFO", model_repository=data["repo"]) as server:
        with SpacerClient(server.address, timeout=60) as client:
            yield server, client


def lines_of(caplog, method: str) -> list[str]:
    return [r.getMessage() for r in rpc_lines(caplog, 1) if f"method={method} " in r.getMessage()]


def test_stored_features_count_their_points(served, data, caplog):
    server, client = served
    before = scrape(server)
    with caplog.at_level(logging.INFO, logger="server.rpc"):
        reply = client.extract_features(
            data["extractor"], POINTS, fs(data["image"]), fs(data["root"] / "a.fv")
        )
        line = lines_of(caplog, "ExtractFeatures")[0]
    after = scrape(server)
    assert not reply.HasField("features") and (data["root"] / "a.fv").exists()
    assert delta(before, after, "spacer_points_processed_total", grpc_method="ExtractFeatures") == 3
    assert "status=OK" in line and "points=3" in line


def test_every_call_that_does_points_counts_them_once(served, data, caplog):
    server, client = served
    requests = [
        client.image_request(data["extractor"], POINTS[: i + 1], fs(data["image"]), fs(data["clf"]), f"p{i}")
        for i in range(3)
    ]
    job = {
        "task_name": "extract_features",
        "tasks": [
            {
                "job_token": "job-1",
                "extractor": data["extractor"],
                "rowcols": [list(p) for p in POINTS[:2]],
                "image_loc": fs(data["image"]),
                "feature_loc": fs(data["root"] / "job.fv"),
            }
        ],
    }
    before = scrape(server)
    with caplog.at_level(logging.INFO, logger="server.rpc"):
        client.classify_image(data["extractor"], POINTS, fs(data["image"]), fs(data["clf"]))
        assert all(r.WhichOneof("outcome") != "error" for r in client.classify_images(requests))
        assert client.run_job(json.dumps(job))["ok"]
        client.classify_features(fs(data["root"] / "job.fv"), fs(data["clf"]))
        rpc_lines(caplog, 4)
        classify_images = lines_of(caplog, "ClassifyImages")[0]
        run_job = lines_of(caplog, "RunJob")[0]
    after = scrape(server)

    def points(method: str) -> float:
        return delta(before, after, "spacer_points_processed_total", grpc_method=method)

    assert points("ClassifyImage") == 3
    assert points("ClassifyImages") == 1 + 2 + 3 and "points=6" in classify_images
    assert points("RunJob") == 2 and "points=2" in run_job
    assert points("ClassifyFeatures") == 2


def test_a_failed_stream_item_counts_as_an_error_and_is_logged(served, data, caplog):
    server, client = served
    good = [
        client.image_request(data["extractor"], [(5, 6)], fs(data["image"]), fs(data["clf"]), f"ok{i}")
        for i in range(2)
    ]
    bad = client.image_request(
        data["extractor"], [(5, 6)], fs(data["root"] / "absent.png"), fs(data["clf"]), "missing"
    )
    before = scrape(server)
    with caplog.at_level(logging.INFO, logger="server.rpc"):
        replies = list(client.classify_images([good[0], bad, good[1]]))
        rpc_lines(caplog, 2)
        lines = lines_of(caplog, "ClassifyImages")
    after = scrape(server)
    errors = [r for r in replies if r.HasField("error")]
    assert len(replies) == 3 and [r.error.code_name for r in errors] == ["NOT_FOUND"]

    def count(name: str, code: str) -> float:
        return delta(before, after, name, grpc_method="ClassifyImages", grpc_code=code)

    assert count("spacer_rpc_errors_total", "NOT_FOUND") == 1
    assert count("grpc_server_handled_total", "OK") == 1  # the stream itself went on
    assert delta(before, after, "spacer_points_processed_total", grpc_method="ClassifyImages") == 2
    item = [line for line in lines if line.startswith("rpc-item ")]
    call = [line for line in lines if line.startswith("rpc method=")]
    assert len(item) == 1 and len(call) == 1
    assert item[0].startswith("rpc-item method=ClassifyImages status=NOT_FOUND")
    assert 'token="missing"' in item[0] and "absent.png" in item[0]
    assert call[0].startswith("rpc method=ClassifyImages status=OK") and "points=2" in call[0]


def _infer(model: str, image: bytes, points, request_id: str = "", **params: str) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=model, id=request_id)
    image_in = request.inputs.add(name="IMAGE", datatype="BYTES", shape=[1])
    image_in.contents.bytes_contents.append(image)
    point_in = request.inputs.add(name="POINTS", datatype="INT32", shape=[len(points), 2])
    point_in.contents.int_contents.extend(np.asarray(points, dtype=np.int32).ravel().tolist())
    for key, value in params.items():
        request.parameters[key].string_param = value
    return request


def test_oip_inference_counts_points_and_failed_stream_items(served, data, caplog):
    server, _ = served
    image = data["image"].read_bytes()
    with grpc.insecure_channel(server.address) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        for name in ("effnet", "reef_clf"):
            stub.RepositoryModelLoad(oip.RepositoryModelLoadRequest(model_name=name), timeout=60)
        params = {"extractor": "effnet", "classifier": "reef_clf"}
        before = scrape(server)
        with caplog.at_level(logging.INFO, logger="server.rpc"):
            stub.ModelInfer(_infer("effnet", image, POINTS), timeout=60)
            stream = [
                _infer("spacer_pipeline", image, POINTS[:2], "a", **params),
                _infer("spacer_pipeline", image, POINTS[:2], "b", extractor="effnet", classifier="nope"),
                _infer("spacer_pipeline", image, POINTS[:1], "c", **params),
            ]
            replies = list(stub.ModelStreamInfer(iter(stream), timeout=60))
            rpc_lines(caplog, 3)
            lines = lines_of(caplog, "ModelStreamInfer")
        after = scrape(server)
    assert sorted(bool(r.error_message) for r in replies) == [False, False, True]
    assert delta(before, after, "spacer_points_processed_total", grpc_method="ModelInfer") == 3
    assert delta(before, after, "spacer_points_processed_total", grpc_method="ModelStreamInfer") == 3
    failed = [key for key in after if key[0] == "spacer_rpc_errors_total" and "ModelStreamInfer" in str(key)]
    assert [
        delta(before, after, name, **dict(labels)) for name, labels in failed if "NOT_FOUND" in str(labels)
    ] == [1]
    item = [line for line in lines if line.startswith("rpc-item ")]
    assert len(item) == 1 and "status=NOT_FOUND" in item[0] and "[request id: b]" in item[0]
    assert any(
        line.startswith("rpc method=ModelStreamInfer status=OK") and "points=3" in line for line in lines
    )


def _check_config(capsys, *flags: str) -> dict:
    from shell.main import build_parser
    from shell.serve import run_check_config

    assert run_check_config(build_parser().parse_args(["check-config", *flags])) == 0
    out = capsys.readouterr().out
    return json.loads(out[: out.index("spacer_core settings:")])


def test_check_config_prints_the_limits_in_force(capsys):
    from spacer_core import config as core_config

    settings = _check_config(capsys)
    limits, server = settings["limits_in_force"], settings["server"]
    assert limits["max_image_pixels"] == core_config.MAX_IMAGE_PIXELS > 0
    assert limits["max_points_per_image"] == core_config.MAX_POINTS_PER_IMAGE > 0
    assert server["max_image_pixels"] == limits["max_image_pixels"]
    assert None not in limits.values()
    # Every size in bytes, named so; the flags that set them take MiB.
    sizes = [name for name in limits if "bytes" in name or name.endswith(("_mb", "_mib"))]
    assert sizes and all(name.endswith("_bytes") for name in sizes)
    assert limits["memory_budget_bytes"] == server["memory_budget_bytes"] == 512 << 20
    assert limits["long_work_workers"] == server["long_work_workers"] >= 1

    chosen = _check_config(capsys, "--max-image-pixels", "5000", "--max-feature-file-mb", "2")
    assert chosen["limits_in_force"]["max_image_pixels"] == 5000
    assert chosen["limits_in_force"]["max_feature_file_bytes"] == 2 << 20


def test_list_models_shows_what_calls_loaded(data):
    with running_server(workers=2) as server, SpacerClient(server.address, timeout=60) as client:
        _list_after_calls(client, data)


def _list_after_calls(client, data):
    other = make_classifier(data["root"] / "other.pkl", classes=(4, 5), seed=2)
    start = time.time()
    client.classify_image(data["extractor"], POINTS[:1], fs(data["image"]), fs(data["clf"]))
    client.load_model(classifier_loc=fs(other))
    models = client.list_models()
    networks = [m for m in models if m.kind == "extractor" and m.weights_sha256 == data["sha256"]]
    assert len(networks) == 1
    (network,) = networks
    assert network.extractor_class == "spacer_core.extractors.efficientnet.EfficientNetExtractor"
    assert network.loaded_by == "call" and network.feature_dim == 1280
    assert start - 1 <= network.last_used <= time.time() + 1
    classifiers = {m.name: m for m in models if m.kind == "classifier"}
    by_call = [m for name, m in classifiers.items() if str(data["clf"]) in name]
    by_request = [m for name, m in classifiers.items() if str(other) in name]
    assert [m.loaded_by for m in by_call] == ["call"] and by_call[0].last_used >= start - 1
    assert [m.loaded_by for m in by_request] == ["load_model"] and by_request[0].last_used >= start - 1
    assert [label.id for label in by_request[0].classes] == [4, 5]


def test_list_models_names_preloaded_models(data, tmp_path):
    preload = tmp_path / "preload.json"
    preload.write_text(json.dumps({"classifiers": [fs(data["clf"])]}))
    with (
        running_server(workers=2, preload=preload) as server,
        SpacerClient(server.address, timeout=60) as client,
    ):
        deadline = time.monotonic() + 30
        while client.health() != "SERVING" and time.monotonic() < deadline:
            time.sleep(0.05)
        (model,) = client.list_models()
    assert model.kind == "classifier" and model.loaded_by == "preload" and str(data["clf"]) in model.name
