"""What operators see: Prometheus metrics, one log line per call, request ids in trailers."""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server import app, logs
from server._proto.spacer.v1 import spacer_pb2 as pb
from server.client import SpacerClient
from server.config import ServerConfig
from spacer_core.testing import extractor_json, make_classifier, make_image
from spacer_core.testing import fs_loc as fs
from tests.support.grpc_server import running_server


@pytest.fixture(scope="module")
def data(tmp_path_factory, efficientnet_weights):  # noqa: F811
    root = tmp_path_factory.mktemp("observe")
    return {
        "root": root,
        "image": make_image(root / "img.png", 64, 48, seed=4),
        "clf": make_classifier(root / "clf.pkl"),
        "extractor": extractor_json(efficientnet_weights.path, efficientnet_weights.sha256),
    }


@pytest.fixture(scope="module")
def served():
    with running_server(workers=2, metrics_port=0, log_level="INFO") as server:
        with SpacerClient(server.address, timeout=60) as client:
            yield server, client


def scrape(server) -> dict[tuple[str, tuple], float]:
    """Every sample on /metrics as {(name, sorted labels): value}."""
    port = app.metrics_port(server.server)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def delta(before, after, name, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def rpc_lines(caplog, count: int, timeout: float = 10) -> list[logging.LogRecord]:
    """The server.rpc records, once at least count arrived (cancelled calls log after the client returns)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = [r for r in caplog.records if r.name == "server.rpc"]
        if len(records) >= count:
            return records
        time.sleep(0.02)
    return [r for r in caplog.records if r.name == "server.rpc"]


def test_metrics_count_calls_codes_points_batches_and_models(served, data):
    server, client = served
    before = scrape(server)
    client.list_models()
    with pytest.raises(grpc.RpcError) as missing:
        client.classify_features(fs(data["root"] / "absent.fv"), fs(data["clf"]))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    result = client.classify_image(data["extractor"], [(5, 6), (20, 30)], fs(data["image"]), fs(data["clf"]))
    assert len(result.scores) == 2
    client.load_model(classifier_loc=fs(data["clf"]))
    after = scrape(server)

    assert delta(before, after, "grpc_server_handled_total", grpc_method="ListModels", grpc_code="OK") == 1
    assert delta(before, after, "grpc_server_started_total", grpc_method="ListModels", grpc_type="unary") == 1
    assert (
        delta(
            before, after, "grpc_server_handled_total", grpc_method="ClassifyFeatures", grpc_code="NOT_FOUND"
        )
        == 1
    )
    assert (
        delta(before, after, "spacer_rpc_errors_total", grpc_method="ClassifyFeatures", grpc_code="NOT_FOUND")
        == 1
    )
    assert delta(before, after, "spacer_rpc_errors_total", grpc_method="ListModels", grpc_code="OK") == 0
    assert delta(before, after, "grpc_server_handling_seconds_count", grpc_method="ClassifyImage") == 1
    assert delta(before, after, "spacer_points_processed_total", grpc_method="ClassifyImage") == 2
    assert after[("spacer_loaded_models", (("kind", "classifier"),))] == 1

    batchers = {dict(labels)["batcher"] for name, labels in after if name == "spacer_batch_size_count"}
    assert batchers, "no batch was observed"
    patches = sum(delta(before, after, "spacer_batch_size_sum", batcher=b) for b in batchers)
    waits = sum(delta(before, after, "spacer_queue_seconds_count", batcher=b) for b in batchers)
    network = sum(delta(before, after, "spacer_network_seconds_count", batcher=b) for b in batchers)
    assert patches == 2  # both points of the one image went through the network
    assert waits == 1  # one request queued
    assert network >= 1


def test_request_id_in_trailers_and_log_line(served, data, caplog):
    server, client = served
    with caplog.at_level(logging.INFO, logger="server.rpc"):
        _, call = client.stub.ListModels.with_call(pb.ListModelsRequest(), timeout=10)
        generated = dict(call.trailing_metadata())["x-request-id"]
        _, call = client.stub.ListModels.with_call(
            pb.ListModelsRequest(), timeout=10, metadata=(("x-request-id", "trace-42"),)
        )
        kept = dict(call.trailing_metadata())["x-request-id"]
        with pytest.raises(grpc.RpcError) as failed:
            client.classify_features(fs(data["root"] / "absent.fv"), fs(data["clf"]), job_token="tok-9")
        failed_id = dict(failed.value.trailing_metadata())["x-request-id"]
        lines = [r.getMessage() for r in rpc_lines(caplog, 3)]
    assert len(generated) == 16 and kept == "trace-42"
    assert f"id={generated}" in lines[0] and "id=trace-42" in lines[1]
    assert lines[2].startswith("rpc method=ClassifyFeatures status=NOT_FOUND")
    assert f"id={failed_id}" in lines[2] and 'token="tok-9"' in lines[2]


def test_stream_logs_item_counts_and_tokens(served, data, caplog):
    server, client = served
    requests = [
        client.image_request(
            data["extractor"], [(5, 6)], fs(data["image"]), fs(data["clf"]), job_token=f"s{i}"
        )
        for i in range(3)
    ]
    with caplog.at_level(logging.INFO, logger="server.rpc"):
        replies = list(client.classify_images(requests))
        record = rpc_lines(caplog, 1)[0]
    assert sorted(r.job_token for r in replies) == ["s0", "s1", "s2"]
    line = record.getMessage()
    assert line.startswith("rpc method=ClassifyImages status=OK")
    assert 'token="s0,s1,s2"' in line and "received=3 sent=3 points=3" in line
    # JSON lines carry the same fields.
    fields = json.loads(logs.JsonFormatter().format(record))
    assert fields["method"] == "ClassifyImages" and fields["status"] == "OK"
    assert fields["received"] == 3 and fields["token"] == "s0,s1,s2"
    assert fields["request_id"] and fields["logger"] == "server.rpc"


def test_a_passed_deadline_is_logged_and_counted_as_deadline_exceeded(served, data, caplog):
    server, client = served
    release = threading.Event()

    def slow_requests():
        yield client.image_request(
            data["extractor"], [(5, 6)], fs(data["image"]), fs(data["clf"]), job_token="late"
        )
        release.wait(30)  # the stream stays open past the deadline

    before = scrape(server)
    with caplog.at_level(logging.INFO, logger="server.rpc"):
        try:
            with pytest.raises(grpc.RpcError) as late:
                list(client.stub.ClassifyImages(slow_requests(), timeout=1.0))
        finally:
            release.set()
        record = rpc_lines(caplog, 1)[0]
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert record.getMessage().startswith("rpc method=ClassifyImages status=DEADLINE_EXCEEDED")
    assert 'token="late"' in record.getMessage()
    after = scrape(server)
    assert (
        delta(
            before,
            after,
            "grpc_server_handled_total",
            grpc_method="ClassifyImages",
            grpc_code="DEADLINE_EXCEEDED",
        )
        == 1
    )
    assert (
        delta(before, after, "grpc_server_handled_total", grpc_method="ClassifyImages", grpc_code="CANCELLED")
        == 0
    )


def test_json_log_format_and_metrics_port_are_settings():
    from server.config import config_from_args
    from shell.main import build_parser

    args = build_parser().parse_args(["serve", "--log-format", "json", "--metrics-port", "9100"])
    config = config_from_args(args, environ={})
    assert config.log_format == "json" and config.metrics_port == 9100
    assert config_from_args(build_parser().parse_args(["serve"]), {}).metrics_port is None
    with pytest.raises(ValueError, match="log format"):
        ServerConfig(log_format="xml").validate()
    with pytest.raises(ValueError, match="metrics port"):
        ServerConfig(metrics_port=70000).validate()


def test_json_formatter_writes_one_object_per_line_with_tracebacks():
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        import sys

        record = logging.LogRecord("server", logging.ERROR, __file__, 1, "failed %s", ("x",), sys.exc_info())
    text = logs.JsonFormatter().format(record)
    assert "\n" not in text
    out = json.loads(text)
    assert out["message"] == "failed x" and out["level"] == "ERROR"
    assert "RuntimeError: boom" in out["traceback"]
