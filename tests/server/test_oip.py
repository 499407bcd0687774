"""The Open Inference Protocol, driven by tritonclient against a real `spacer serve`.

Every call tritonclient makes (sync, asyncio and streaming) goes to a
server process on loopback; features and scores are compared with
spacer.v1's for the same image and points, over the same port.
"""

from __future__ import annotations

import asyncio
import json
import queue
import re
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest

grpcclient = pytest.importorskip("tritonclient.grpc")
aioclient = pytest.importorskip("tritonclient.grpc.aio")
from tritonclient.utils import InferenceServerException  # noqa: E402

from server.client import SpacerClient  # noqa: E402
from server.testing import ServeProcess  # noqa: E402
from spacer_core.testing import (  # noqa: E402
    fs_loc,
    make_classifier,
    make_image,
)

pytestmark = pytest.mark.slow

POINTS = [(10, 12), (40, 60), (71, 95)]
EXTRACTOR = "efficientnet_b0"
CLASSIFIER = "reef_clf"


@pytest.fixture(scope="module")
def data(tmp_path_factory, efficientnet_weights):  # noqa: F811
    root = tmp_path_factory.mktemp("oip")
    repo = root / "models"
    repo.mkdir()
    shutil.copy(efficientnet_weights.path, repo / f"{EXTRACTOR}.pt")
    make_classifier(repo / f"{CLASSIFIER}.pkl")
    make_classifier(root / "other_clf.pkl", classes=(4, 5), seed=3)
    outside = tmp_path_factory.mktemp("outside")
    return {
        "root": root,
        "repo": repo,
        "image": make_image(root / "reef.jpg", 96, 72, seed=1),
        "image2": make_image(root / "reef2.png", 120, 90, seed=2),
        "outside_image": make_image(outside / "secret.jpg", 96, 72, seed=3),
        "outside_clf": make_classifier(outside / "clf.pkl"),
        "extractor_json": {
            "class_path": "spacer.extractors.efficientnet.EfficientNetExtractor",
            "data_locations": {"weights": fs_loc(repo / f"{EXTRACTOR}.pt")},
            "data_hashes": {"weights": efficientnet_weights.sha256},
        },
    }


@pytest.fixture(scope="module")
def server(data):
    with ServeProcess(
        data["root"],
        "--model-repository",
        str(data["repo"]),
        "--workers",
        "2",
        "--metrics-port",
        "0",
        "--log-level",
        "INFO",
    ) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    with grpcclient.InferenceServerClient(server.address) as c:
        yield c


@pytest.fixture(scope="module")
def spacer_client(server):
    with SpacerClient(server.address, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def loaded(client):
    client.load_model(EXTRACTOR)
    client.load_model(CLASSIFIER)
    return client


def image_inputs(image: bytes | None = None, path: str | None = None, points=POINTS, *, names=()):
    inputs = []
    if image is not None:
        t = grpcclient.InferInput("IMAGE", [1], "BYTES")
        t.set_data_from_numpy(np.array([image], dtype=object))
        inputs.append(t)
    if path is not None:
        t = grpcclient.InferInput("IMAGE_PATH", [1], "BYTES")
        t.set_data_from_numpy(np.array([path.encode()], dtype=object))
        inputs.append(t)
    p = grpcclient.InferInput("POINTS", [len(points), 2], "INT32")
    p.set_data_from_numpy(np.asarray(points, dtype=np.int32).reshape(len(points), 2))
    inputs.append(p)
    return inputs


def pipeline_params():
    return {"extractor": EXTRACTOR, "classifier": CLASSIFIER}


def status_of(exc: InferenceServerException) -> str:
    return str(exc.status())


# ---------------------------------------------------------------- health, metadata, repository


def test_server_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta.name == "spacer-server"
    assert {"model_repository", "statistics", "model_configuration"} <= set(meta.extensions)
    assert client.is_model_ready("spacer_pipeline")


def test_repository_lists_files_by_stem_until_loaded(client, data):
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert {EXTRACTOR, CLASSIFIER, "spacer_pipeline"} <= set(index)
    assert index["spacer_pipeline"].state == "READY"
    client.load_model(EXTRACTOR)
    client.load_model(CLASSIFIER)
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index[EXTRACTOR].state == index[CLASSIFIER].state == "READY"
    assert index[EXTRACTOR].version == "1"
    assert client.is_model_ready(EXTRACTOR) and client.is_model_ready(CLASSIFIER, "1")


def test_model_metadata_and_config_describe_tensors(loaded):
    meta = loaded.get_model_metadata(EXTRACTOR)
    assert meta.versions == ["1"]
    assert {(t.name, t.datatype, tuple(t.shape)) for t in meta.inputs} == {
        ("IMAGE", "BYTES", (1,)),
        ("IMAGE_PATH", "BYTES", (1,)),
        ("POINTS", "INT32", (-1, 2)),
    }
    assert [(t.name, t.datatype, tuple(t.shape)) for t in meta.outputs] == [("FEATURES", "FP32", (-1, 1280))]
    clf = loaded.get_model_metadata(CLASSIFIER)
    assert [(t.name, tuple(t.shape)) for t in clf.inputs] == [("FEATURES", (-1, 1280))]
    assert ("SCORES", "FP32", (-1, 3)) in {(t.name, t.datatype, tuple(t.shape)) for t in clf.outputs}
    config = loaded.get_model_config(CLASSIFIER).config
    assert config.name == CLASSIFIER and config.max_batch_size == 0
    assert [i.name for i in config.input] == ["FEATURES"]
    assert config.parameters["classes"].string_value == "1,2,3"
    as_json = loaded.get_model_config("spacer_pipeline", as_json=True)
    assert as_json["config"]["name"] == "spacer_pipeline"


# ---------------------------------------------------------------- inference equals spacer.v1


def test_extractor_features_equal_extract_features(loaded, spacer_client, data):
    image = Path(data["image"]).read_bytes()
    result = loaded.infer(EXTRACTOR, image_inputs(image), request_id="r1")
    features = result.as_numpy("FEATURES")
    assert result.get_response().id == "r1"
    ours = spacer_client.extract_features(data["extractor_json"], POINTS, image, return_features=True)
    expected = np.array([p.data for p in ours.features.point_features], dtype=np.float32)
    assert features.shape == (3, 1280) and features.dtype == np.float32
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)


def test_pipeline_scores_equal_classify_image(loaded, spacer_client, data):
    image = Path(data["image"]).read_bytes()
    result = loaded.infer("spacer_pipeline", image_inputs(image), parameters=pipeline_params())
    ours = spacer_client.classify_image(
        data["extractor_json"], POINTS, image, fs_loc(data["repo"] / f"{CLASSIFIER}.pkl")
    )
    expected = np.array([list(p.scores) for p in ours.scores], dtype=np.float32)
    np.testing.assert_allclose(result.as_numpy("SCORES"), expected, rtol=1e-5, atol=1e-6)
    assert [int(x) for x in result.as_numpy("LABELS")] == [c.id for c in ours.classes]
    top = [ours.classes[int(np.argmax(p.scores))].id for p in ours.scores]
    assert [int(x) for x in result.as_numpy("PREDICTIONS")] == top
    assert result.as_numpy("FEATURES") is None  # only when asked for


def test_classifier_model_scores_the_extractor_features(loaded, data):
    image = Path(data["image"]).read_bytes()
    features = loaded.infer(EXTRACTOR, image_inputs(image)).as_numpy("FEATURES")
    f = grpcclient.InferInput("FEATURES", list(features.shape), "FP32")
    f.set_data_from_numpy(features)
    scored = loaded.infer(
        CLASSIFIER,
        [f],
        outputs=[grpcclient.InferRequestedOutput("SCORES"), grpcclient.InferRequestedOutput("LABELS")],
    )
    piped = loaded.infer("spacer_pipeline", image_inputs(image), parameters=pipeline_params())
    np.testing.assert_allclose(scored.as_numpy("SCORES"), piped.as_numpy("SCORES"), rtol=1e-5, atol=1e-6)
    assert scored.as_numpy("PREDICTIONS") is None  # not requested


def test_image_by_path_inside_the_data_roots_and_models_named_by_inputs(loaded, data):
    by_path = loaded.infer(EXTRACTOR, image_inputs(path=str(data["image"])))
    inline = loaded.infer(EXTRACTOR, image_inputs(Path(data["image"]).read_bytes()))
    np.testing.assert_allclose(
        by_path.as_numpy("FEATURES"), inline.as_numpy("FEATURES"), rtol=1e-5, atol=1e-6
    )
    inputs = image_inputs(path=str(data["image"]))
    for name, value in (("EXTRACTOR", EXTRACTOR), ("CLASSIFIER", CLASSIFIER)):
        t = grpcclient.InferInput(name, [1], "BYTES")
        t.set_data_from_numpy(np.array([value.encode()], dtype=object))
        inputs.append(t)
    assert loaded.infer("spacer_pipeline", inputs).as_numpy("SCORES").shape == (3, 3)


def test_priority_and_timeout_parameters(loaded, data):
    image = Path(data["image"]).read_bytes()
    assert loaded.infer(EXTRACTOR, image_inputs(image), priority=1, timeout=60_000_000).as_numpy(
        "FEATURES"
    ).shape == (3, 1280)
    assert loaded.infer(EXTRACTOR, image_inputs(image), priority=2).as_numpy("FEATURES").shape == (3, 1280)
    with pytest.raises(InferenceServerException) as err:
        loaded.infer(EXTRACTOR, image_inputs(image, points=[(5, 5)] * 64), timeout=1)
    assert status_of(err.value) == "StatusCode.DEADLINE_EXCEEDED"


# ---------------------------------------------------------------- errors


def test_unknown_model_and_version(client):
    with pytest.raises(InferenceServerException) as err:
        client.infer("no_such_model", image_inputs(b"x"))
    assert status_of(err.value) == "StatusCode.NOT_FOUND"
    assert "Request for unknown model: 'no_such_model' is not found" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("spacer_pipeline", model_version="7")
    assert status_of(err.value) == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as err:
        client.is_model_ready("no_such_model")
    assert status_of(err.value) == "StatusCode.NOT_FOUND"


def test_wrong_dtype_shape_and_missing_inputs(loaded, data):
    image = Path(data["image"]).read_bytes()
    inputs = image_inputs(image)
    bad = grpcclient.InferInput("POINTS", [3, 2], "FP32")
    bad.set_data_from_numpy(np.asarray(POINTS, dtype=np.float32))
    with pytest.raises(InferenceServerException) as err:
        loaded.infer(EXTRACTOR, [inputs[0], bad])
    assert status_of(err.value) == "StatusCode.INVALID_ARGUMENT"
    assert (
        "unexpected datatype TYPE_FP32 for inference input 'POINTS', expecting TYPE_INT32"
        in err.value.message()
    )
    flat = grpcclient.InferInput("POINTS", [6], "INT32")
    flat.set_data_from_numpy(np.asarray(POINTS, dtype=np.int32).ravel())
    with pytest.raises(InferenceServerException) as err:
        loaded.infer(EXTRACTOR, [inputs[0], flat])
    assert status_of(err.value) == "StatusCode.INVALID_ARGUMENT"
    assert "unexpected shape for input 'POINTS'" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        loaded.infer(EXTRACTOR, [inputs[1]])
    assert status_of(err.value) == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException) as err:
        loaded.infer("spacer_pipeline", inputs)  # no extractor or classifier named
    assert status_of(err.value) == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException) as err:
        loaded.infer(EXTRACTOR, inputs, outputs=[grpcclient.InferRequestedOutput("NOPE")])
    assert status_of(err.value) == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException) as err:
        loaded.infer(EXTRACTOR, image_inputs(b"not an image"))
    assert status_of(err.value) == "StatusCode.INVALID_ARGUMENT"


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_features_that_are_not_finite_are_invalid_argument(loaded, bad):
    features = np.zeros((2, 1280), dtype=np.float32)
    features[1, 3] = bad
    f = grpcclient.InferInput("FEATURES", list(features.shape), "FP32")
    f.set_data_from_numpy(features)
    with pytest.raises(InferenceServerException) as err:
        loaded.infer(CLASSIFIER, [f])
    assert status_of(err.value) == "StatusCode.INVALID_ARGUMENT"
    assert f"{CLASSIFIER}: the features contain NaN or infinite values" in err.value.message()
    assert loaded.is_server_live()


def test_image_outside_the_data_roots_is_permission_denied(loaded, data):
    with pytest.raises(InferenceServerException) as err:
        loaded.infer(EXTRACTOR, image_inputs(path=str(data["outside_image"])))
    assert status_of(err.value) == "StatusCode.PERMISSION_DENIED"
    with pytest.raises(InferenceServerException) as err:  # and through the pipeline model
        loaded.infer(
            "spacer_pipeline", image_inputs(path=str(data["outside_image"])), parameters=pipeline_params()
        )
    assert status_of(err.value) == "StatusCode.PERMISSION_DENIED"


def test_load_with_config_inside_the_roots_unload_and_refusals(client, data):
    config = json.dumps({"classifier": fs_loc(data["root"] / "other_clf.pkl")})
    client.load_model("other", config=config)
    assert client.is_model_ready("other")
    assert client.get_model_metadata("other").outputs[1].shape == [2]
    client.unload_model("other")
    assert "other" not in {m.name for m in client.get_model_repository_index().models}
    with pytest.raises(InferenceServerException) as err:
        client.load_model("sneaky", config=json.dumps({"classifier": str(data["outside_clf"])}))
    assert status_of(err.value) == "StatusCode.PERMISSION_DENIED"
    with pytest.raises(InferenceServerException) as err:
        client.load_model("not_in_repo")
    assert status_of(err.value) == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as err:
        client.load_model("bad", config="{not json")
    assert status_of(err.value) == "StatusCode.INVALID_ARGUMENT"
    # A repository model unloaded stays listed, UNAVAILABLE, until loaded again.
    client.load_model(CLASSIFIER)
    client.unload_model(CLASSIFIER)
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index[CLASSIFIER].state == "UNAVAILABLE"
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata(CLASSIFIER)
    assert status_of(err.value) == "StatusCode.UNAVAILABLE"
    client.load_model(CLASSIFIER)


# ---------------------------------------------------------------- streams and asyncio


def test_stream_infer_answers_each_request_and_reports_a_bad_image(loaded, spacer_client, data):
    results: queue.Queue = queue.Queue()
    loaded.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        images = {"a": data["image"], "b": data["image2"]}
        for rid, path in images.items():
            loaded.async_stream_infer(
                "spacer_pipeline",
                image_inputs(Path(path).read_bytes()),
                request_id=rid,
                parameters=pipeline_params(),
            )
        loaded.async_stream_infer(
            "spacer_pipeline", image_inputs(b"\x89PNG broken"), request_id="bad", parameters=pipeline_params()
        )
        loaded.async_stream_infer(EXTRACTOR, image_inputs(path=str(data["image"])), request_id="c")
        got = [results.get(timeout=120) for _ in range(4)]
    finally:
        loaded.stop_stream()
    errors = [e for _, e in got if e is not None]
    assert len(errors) == 1 and "[request id: bad]" in errors[0].message(), [e.message() for e in errors]
    by_id = {r.get_response().id: r for r, e in got if e is None}
    assert set(by_id) == {"a", "b", "c"}
    for rid, path in images.items():
        ours = spacer_client.classify_image(
            data["extractor_json"], POINTS, path, fs_loc(data["repo"] / f"{CLASSIFIER}.pkl")
        )
        expected = np.array([list(p.scores) for p in ours.scores], dtype=np.float32)
        np.testing.assert_allclose(by_id[rid].as_numpy("SCORES"), expected, rtol=1e-5, atol=1e-6)


def test_asyncio_client_unary_and_stream(loaded, server, data):
    image = Path(data["image"]).read_bytes()

    async def run():
        async with aioclient.InferenceServerClient(server.address) as c:
            assert await c.is_server_live()
            assert await c.is_model_ready(EXTRACTOR)
            one = await c.infer(EXTRACTOR, image_inputs(image))

            async def requests():
                for i in range(3):
                    yield {
                        "model_name": "spacer_pipeline",
                        "inputs": image_inputs(image),
                        "request_id": str(i),
                        "parameters": pipeline_params(),
                    }

            streamed = []
            async for result, error in c.stream_infer(requests()):
                assert error is None
                streamed.append(result)
            stats = await c.get_inference_statistics(EXTRACTOR)
            return one, streamed, stats

    one, streamed, stats = asyncio.run(run())
    assert one.as_numpy("FEATURES").shape == (3, 1280)
    assert sorted(r.get_response().id for r in streamed) == ["0", "1", "2"]
    first = streamed[0].as_numpy("SCORES")
    for r in streamed[1:]:
        np.testing.assert_allclose(r.as_numpy("SCORES"), first, rtol=1e-5, atol=1e-6)
    assert stats.model_stats[0].name == EXTRACTOR


# ---------------------------------------------------------------- statistics and metrics


def test_statistics_and_triton_metrics(loaded, server, data):
    image = Path(data["image"]).read_bytes()
    before = loaded.get_inference_statistics(EXTRACTOR).model_stats[0]
    loaded.infer(EXTRACTOR, image_inputs(image))
    with pytest.raises(InferenceServerException):
        loaded.infer(EXTRACTOR, image_inputs(b"not an image"))
    after = loaded.get_inference_statistics(EXTRACTOR).model_stats[0]
    assert after.name == EXTRACTOR and after.version == "1"
    assert after.execution_count == before.execution_count + 1
    assert after.inference_count == before.inference_count + len(POINTS)
    s = after.inference_stats
    assert s.success.count == before.inference_stats.success.count + 1
    assert s.fail.count == before.inference_stats.fail.count + 1
    assert s.compute_infer.ns > before.inference_stats.compute_infer.ns
    assert s.queue.count == s.success.count and s.success.ns >= s.compute_infer.ns
    everything = {m.name for m in loaded.get_inference_statistics().model_stats}
    assert {EXTRACTOR, "spacer_pipeline"} <= everything

    port = re.search(r"metrics on http://[^:]+:(\d+)/metrics", server.log()).group(1)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    label = f'{{model="{EXTRACTOR}",version="1"}}'
    for name in (
        "nv_inference_request_success",
        "nv_inference_request_failure",
        "nv_inference_count",
        "nv_inference_exec_count",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_inference_request_duration_us",
    ):
        assert f"{name}{label}" in text, name
    success = float(
        re.search(rf"^nv_inference_request_success{re.escape(label)} (\S+)$", text, re.M).group(1)
    )
    assert success == s.success.count
    assert 'grpc_server_handled_total{grpc_code="OK",grpc_method="ModelInfer"}' in text


def test_typed_contents_as_grpcurl_sends_them(loaded, server, data):
    """Inputs in InferTensorContents (not raw), built with tritonclient's own protocol messages."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    request = service_pb2.ModelInferRequest(model_name=EXTRACTOR, id="typed")
    image = request.inputs.add(name="IMAGE_PATH", datatype="BYTES", shape=[1])
    image.contents.bytes_contents.append(str(data["image"]).encode())
    pts = request.inputs.add(name="POINTS", datatype="INT32", shape=[len(POINTS), 2])
    pts.contents.int_contents.extend(v for p in POINTS for v in p)
    with grpc.insecure_channel(server.address) as channel:
        reply = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=120)
    assert reply.id == "typed" and reply.outputs[0].name == "FEATURES"
    features = np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(list(reply.outputs[0].shape))
    expected = loaded.infer(EXTRACTOR, image_inputs(path=str(data["image"]))).as_numpy("FEATURES")
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)


def test_the_bearer_token_gates_oip_calls_too(tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-token-for-tests\n")
    token.chmod(0o600)
    with (
        ServeProcess(tmp_path, "--auth-token-file", str(token)) as proc,
        grpcclient.InferenceServerClient(proc.address) as c,
    ):
        with pytest.raises(InferenceServerException) as err:
            c.is_server_live()
        assert status_of(err.value) == "StatusCode.UNAUTHENTICATED"
        assert c.is_server_live(headers={"authorization": "Bearer s3cret-token-for-tests"})
