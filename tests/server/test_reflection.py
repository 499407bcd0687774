"""A client that knows only server reflection calls every RPC, as grpcurl does.

Nothing from server._proto is imported here: message types come from a
descriptor pool filled over the reflection service, requests are written as
JSON (grpcurl's -d) and parsed with google.protobuf.json_format.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from spacer_core.testing import extractor_json, make_classifier, make_image
from tests.support.grpc_server import running_server


class ReflectionClient:
    """grpcurl in a few lines: list services, describe methods, call them with JSON."""

    def __init__(self, channel: grpc.Channel):
        self.channel = channel
        self.db = ProtoReflectionDescriptorDatabase(channel)
        self.pool = descriptor_pool.DescriptorPool(self.db)

    def services(self) -> list[str]:
        return sorted(self.db.get_services())

    def method(self, full_method: str):
        service_name, method_name = full_method.rsplit(".", 1)
        return self.pool.FindServiceByName(service_name).methods_by_name[method_name]

    def _call(self, full_method: str, payloads: list[str], timeout: float) -> Iterator[dict]:
        method = self.method(full_method)
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        requests = [json_format.Parse(p, request_cls()) for p in payloads]
        path = f"/{method.containing_service.full_name}/{method.name}"
        kind = {
            (False, False): self.channel.unary_unary,
            (False, True): self.channel.unary_stream,
            (True, False): self.channel.stream_unary,
            (True, True): self.channel.stream_stream,
        }[(method.client_streaming, method.server_streaming)]
        call = kind(
            path,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_cls.FromString,
        )
        if method.client_streaming:
            result = call(iter(requests), timeout=timeout)
        else:
            result = call(requests[0], timeout=timeout)
        responses = result if method.server_streaming else [result]
        for response in responses:
            yield json.loads(json_format.MessageToJson(response, preserving_proto_field_name=True))

    def call(self, full_method: str, *payloads: str, timeout: float = 120) -> list[dict]:
        return list(self._call(full_method, list(payloads), timeout))


def loc(path) -> dict:
    return {"storage_type": "filesystem", "key": str(path)}


@pytest.fixture(scope="module")
def data(tmp_path_factory, efficientnet_weights):  # noqa: F811
    root = tmp_path_factory.mktemp("reflection")
    ext = extractor_json(efficientnet_weights.path, efficientnet_weights.sha256)
    ext["data_locations"]["weights"].pop("bucket_name")
    return {
        "root": root,
        "image": make_image(root / "img.jpg", 64, 48, seed=9),
        "clf": make_classifier(root / "clf.pkl", classes=(3, 5)),
        "extractor": ext,
    }


@pytest.fixture(scope="module")
def rc():
    with running_server(workers=2) as server:
        channel = grpc.insecure_channel(server.address)
        yield ReflectionClient(channel)
        channel.close()


SERVICES = sorted(
    [
        "spacer.v1.Spacer",
        "grpc.health.v1.Health",
        "inference.GRPCInferenceService",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]
)


class _OnlyV1(grpc.StreamStreamClientInterceptor):
    """Sends every reflection call to grpc.reflection.v1, as a v1-only client (newer grpcurl) does."""

    def __init__(self):
        self.methods: list[str] = []

    def intercept_stream_stream(self, continuation, details, request_iterator):
        method = details.method.replace("/grpc.reflection.v1alpha.", "/grpc.reflection.v1.")
        self.methods.append(method)
        return continuation(details._replace(method=method), request_iterator)


def test_reflection_lists_spacer_health_and_reflection(rc):
    assert rc.services() == SERVICES
    spacer = rc.pool.FindServiceByName("spacer.v1.Spacer")
    streams = {m.name: (m.client_streaming, m.server_streaming) for m in spacer.methods}
    assert streams["ClassifyImages"] == (True, True)
    assert streams["TrainClassifier"] == (False, True)
    assert streams["ClassifyImage"] == (False, False)
    oip = rc.pool.FindServiceByName("inference.GRPCInferenceService")
    assert {m.name: m.client_streaming for m in oip.methods}["ModelStreamInfer"]


def test_health_check_by_json(rc):
    assert rc.call("grpc.health.v1.Health.Check", '{"service": "spacer.v1.Spacer"}') == [
        {"status": "SERVING"}
    ]


def test_every_spacer_rpc_by_json(rc, data):
    ext, image, clf = data["extractor"], data["image"], data["clf"]
    feature_path = data["root"] / "img.featurevector"

    extracted = rc.call(
        "spacer.v1.Spacer.ExtractFeatures",
        json.dumps(
            {
                "job_token": "e1",
                "extractor": ext,
                "rowcols": [{"row": 5, "col": 6}, {"row": 40, "col": 60}],
                "image_loc": loc(image),
                "feature_loc": loc(feature_path),
                "return_features": True,
            }
        ),
    )[0]
    assert extracted["job_token"] == "e1"
    assert len(extracted["features"]["point_features"]) == 2
    assert len(extracted["features"]["point_features"][1]["data"]) == 1280
    assert feature_path.exists()

    by_features = rc.call(
        "spacer.v1.Spacer.ClassifyFeatures",
        json.dumps({"job_token": "f1", "feature_loc": loc(feature_path), "classifier_loc": loc(clf)}),
    )[0]
    assert [c["id"] for c in by_features["classes"]] == ["3", "5"]  # int64 is a JSON string
    assert [(s["row"], s["col"]) for s in by_features["scores"]] == [(5, 6), (40, 60)]

    one = json.dumps(
        {
            "job_token": "i1",
            "extractor": ext,
            "rowcols": [{"row": 5, "col": 6}],
            "image_loc": loc(image),
            "classifier_loc": loc(clf),
        }
    )
    by_image = rc.call("spacer.v1.Spacer.ClassifyImage", one)[0]
    assert by_image["job_token"] == "i1" and by_image["valid_rowcol"] is True
    assert by_image["scores"][0]["scores"] == pytest.approx(by_features["scores"][0]["scores"], abs=1e-4)

    bad = json.dumps(
        {
            "job_token": "i2",
            "extractor": ext,
            "rowcols": [{"row": 500, "col": 6}],
            "image_loc": loc(image),
            "classifier_loc": loc(clf),
        }
    )
    streamed = {r["job_token"]: r for r in rc.call("spacer.v1.Spacer.ClassifyImages", one, bad)}
    assert "result" in streamed["i1"]
    assert streamed["i2"]["error"]["code_name"] == "INVALID_ARGUMENT"

    job = {
        "task_name": "classify_features",
        "tasks": [
            {
                "job_token": "j1",
                "feature_loc": {**loc(feature_path), "bucket_name": None},
                "classifier_loc": {**loc(clf), "bucket_name": None},
            }
        ],
    }
    ran = rc.call("spacer.v1.Spacer.RunJob", json.dumps({"job_msg_json": json.dumps(job)}))[0]
    assert ran["ok"] is True
    assert json.loads(ran["job_return_msg_json"])["results"][0]["classes"] == [3, 5]

    loaded = rc.call("spacer.v1.Spacer.LoadModel", json.dumps({"classifier_loc": loc(clf)}))[0]
    assert loaded["kind"] == "classifier" and loaded["feature_dim"] == 1280
    listed = rc.call("spacer.v1.Spacer.ListModels", "{}")[0]
    by_kind = {m["kind"]: m for m in listed["models"]}
    # The extractor was loaded by the calls above; the classifier by LoadModel.
    assert set(by_kind) == {"classifier", "extractor"}
    assert by_kind["classifier"]["loaded_by"] == "load_model" and by_kind["extractor"]["loaded_by"] == "call"

    labels = {
        "images": [
            {
                "feature_loc": loc(feature_path),
                "annotations": [
                    {"row": 5, "col": 6, "label": {"id": 3}},
                    {"row": 40, "col": 60, "label": {"id": 5}},
                ],
            }
        ]
    }
    train = json.dumps(
        {
            "job_token": "t1",
            "nbr_epochs": 2,
            "clf_type": "LR",
            "labels": {"train": labels, "ref": labels, "val": labels},
            "model_loc": loc(data["root"] / "model.pkl"),
            "valresult_loc": loc(data["root"] / "valres.json"),
        }
    )
    events = rc.call("spacer.v1.Spacer.TrainClassifier", train)
    assert [e["progress"]["epoch"] for e in events[:-1]] == [1, 2]
    assert events[-1]["result"]["model_loc"]["key"].endswith("model.pkl")
    assert (data["root"] / "model.pkl").exists()


def test_json_errors_come_back_as_status_codes(rc, data):
    with pytest.raises(grpc.RpcError) as err:
        rc.call(
            "spacer.v1.Spacer.ClassifyFeatures",
            json.dumps(
                {
                    "feature_loc": loc(data["root"] / "absent.featurevector"),
                    "classifier_loc": loc(data["clf"]),
                }
            ),
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "absent.featurevector" in err.value.details()


def test_a_v1_only_client_lists_describes_and_calls(rc):
    only_v1 = _OnlyV1()
    channel = grpc.intercept_channel(rc.channel, only_v1)
    v1 = ReflectionClient(channel)
    assert v1.services() == SERVICES
    # The v1 service describes itself under its own package.
    own = v1.pool.FindServiceByName("grpc.reflection.v1.ServerReflection")
    assert own.file.package == "grpc.reflection.v1"
    assert own.methods_by_name["ServerReflectionInfo"].input_type.full_name == (
        "grpc.reflection.v1.ServerReflectionRequest"
    )
    assert v1.method("spacer.v1.Spacer.ClassifyImages").client_streaming
    assert v1.call("grpc.health.v1.Health.Check", '{"service": "spacer.v1.Spacer"}') == [
        {"status": "SERVING"}
    ]
    assert len(v1.call("spacer.v1.Spacer.ListModels", "{}")) == 1
    reflection_calls = [m for m in only_v1.methods if "ServerReflection" in m]
    assert reflection_calls and all(m.startswith("/grpc.reflection.v1.") for m in reflection_calls)
