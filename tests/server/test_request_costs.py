"""A request's counts are checked from list lengths before any per-item work.

A client controls how many points, annotations and JSON items a request
carries; converting them one by one costs far more than the bytes sent and,
on the event loop, stalls every other call. Each case sends a request over
one count bound to a real server on loopback and checks that it is refused
with RESOURCE_EXHAUSTED naming the field, without the per-item step ever
running (the server runs in this process, so the step is replaced by one
that fails the test), and that a normal call still answers afterwards.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from server import convert, errors, servicer
from server._proto.inference import grpc_service_pb2 as ipb
from server._proto.inference import grpc_service_pb2_grpc as ipbg
from server._proto.spacer.v1 import spacer_pb2 as pb
from server.client import SpacerClient
from server.config import MIB, ServerConfig, add_arguments, config_from_args
from spacer_core.limits import LIBRARY_DEFAULTS, Limits
from spacer_core.testing import make_classifier, make_image
from tests.support.grpc_server import running_server

Code = grpc.StatusCode
DUMMY = "spacer.extractors.base.DummyExtractor"
POINTS = 5
IMAGES = 4
ANNOTATIONS = 12
JOB_BYTES = 64 * 1024
# A refusal from counts alone answers well within this, even on a loaded machine.
PROMPT_S = 5.0


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("costs")
    make_image(root / "img.png", 200, 150)
    make_classifier(root / "clf.pkl", feature_dim=4096)
    return root


@pytest.fixture(scope="module")
def client(root: Path) -> Iterator[SpacerClient]:
    with (
        running_server(
            data_roots=(root,),
            max_points_per_image=POINTS,
            max_training_images=IMAGES,
            max_training_annotations=ANNOTATIONS,
            max_job_json_bytes=JOB_BYTES,
        ) as server,
        SpacerClient(server.address) as client,
    ):
        yield client


@pytest.fixture
def no_item_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the server reaches a per-item step."""

    def reached(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("per-item work ran before the count bound")

    monkeypatch.setattr(convert, "image_job", reached)
    monkeypatch.setattr(convert, "labels", reached)
    monkeypatch.setattr(servicer, "parse_json", reached)
    monkeypatch.setattr(Limits, "check_json", reached)


def loc(path: Path | str) -> pb.DataLocation:
    return pb.DataLocation(storage_type="filesystem", key=str(path))


def normal_classify(client: SpacerClient, root: Path) -> None:
    reply = client.stub.ClassifyImage(classify_request(root, 2), timeout=60)
    assert len(reply.scores) == 2


def classify_request(root: Path, points: int) -> pb.ClassifyImageRequest:
    return pb.ClassifyImageRequest(
        job_token="t",
        extractor=pb.Extractor(class_path=DUMMY),
        rowcols=[pb.RowCol(row=i % 100, col=i % 150) for i in range(points)],
        image_loc=loc(root / "img.png"),
        classifier_loc=loc(root / "clf.pkl"),
    )


def train_request(root: Path, *sets: list[int]) -> pb.TrainClassifierRequest:
    """A training whose train, ref and val sets hold images with the given annotation counts."""

    def image_labels(counts: list[int], name: str) -> pb.ImageLabels:
        return pb.ImageLabels(
            images=[
                pb.ImageAnnotations(
                    feature_loc=loc(root / f"{name}{i}.featurevector"),
                    annotations=[pb.Annotation(row=j, col=j, label=pb.Label(id=1)) for j in range(count)],
                )
                for i, count in enumerate(counts)
            ]
        )

    train, ref, val = (*sets, [], [], [])[:3]
    return pb.TrainClassifierRequest(
        job_token="t",
        nbr_epochs=1,
        clf_type="LR",
        labels=pb.TrainingTaskLabels(
            train=image_labels(train, "train"), ref=image_labels(ref, "ref"), val=image_labels(val, "val")
        ),
        model_loc=loc(root / "out.pkl"),
        valresult_loc=loc(root / "out.json"),
    )


def drain(call: Any) -> Any:
    def run(request: Any, timeout: float) -> None:
        for _ in call(request, timeout=timeout):
            pass

    return run


def expect_refused(call: Any, request: Any, *fragments: str) -> None:
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=120)
    elapsed = time.monotonic() - start
    assert err.value.code() == Code.RESOURCE_EXHAUSTED, err.value.details()
    for fragment in fragments:
        assert fragment in err.value.details()
    assert elapsed < PROMPT_S, f"refused after {elapsed:.1f}s"


# ---------------------------------------------------------------- points


def test_classify_image_point_count_is_checked_first(client, root, no_item_work) -> None:
    expect_refused(client.stub.ClassifyImage, classify_request(root, POINTS + 1), "img.png", f"of {POINTS}")
    expect_refused(client.stub.ClassifyImage, classify_request(root, 300_000), "300000 point locations")


def test_extract_features_point_count_names_inline_bytes(client, root, no_item_work) -> None:
    request = pb.ExtractFeaturesRequest(
        job_token="t",
        extractor=pb.Extractor(class_path=DUMMY),
        rowcols=[pb.RowCol(row=1, col=1)] * (POINTS + 1),
        image_bytes=(root / "img.png").read_bytes(),
        return_features=True,
    )
    expect_refused(client.stub.ExtractFeatures, request, "image_bytes")


def test_stream_item_over_the_point_count_fails_alone(client, root) -> None:
    replies = list(
        client.classify_images([classify_request(root, 100_000), classify_request(root, 2)], timeout=120)
    )
    assert [r.WhichOneof("outcome") for r in replies].count("error") == 1
    error = next(r.error for r in replies if r.WhichOneof("outcome") == "error")
    assert error.code_name == "RESOURCE_EXHAUSTED" and "100000 point locations" in error.message


def test_point_lists_are_not_walked_for_names() -> None:
    """Tokens and keys are looked for only in messages that can hold them."""
    assert not convert._holds_names(pb.RowCol.DESCRIPTOR)
    assert not convert._holds_names(pb.Annotation.DESCRIPTOR)
    assert convert._holds_names(pb.ImageAnnotations.DESCRIPTOR)
    assert convert._holds_names(pb.TrainClassifierRequest.DESCRIPTOR)
    # Nor are they walked for locations when a refusal names its field.
    assert not errors._may_hold_location(pb.RowCol.DESCRIPTOR)
    assert not errors._may_hold_location(pb.Annotation.DESCRIPTOR)
    request = train_request(Path("/r"), [3])
    assert [f.field for f in errors.request_locations(request)] == [
        "labels.train.images[0].feature_loc",
        "model_loc",
        "valresult_loc",
    ]
    with pytest.raises(Exception, match="job_token"):
        convert.check_sizes(pb.ClassifyImageRequest(job_token="x" * 11), Limits(max_token_chars=10))
    request = pb.ClassifyImageRequest(
        job_token="t", extractor=pb.Extractor(data_locations={"weights": loc("k" * 11)})
    )
    with pytest.raises(Exception, match=r"extractor\.data_locations\['weights'\]\.key"):
        convert.check_sizes(request, Limits(max_key_chars=10))


def test_oip_points_shape_is_checked_before_its_data(client, root) -> None:
    stub = ipbg.GRPCInferenceServiceStub(client.channel)
    for rows in (POINTS + 1, 200_000):
        request = ipb.ModelInferRequest(
            model_name="spacer_pipeline",
            inputs=[ipb.ModelInferRequest.InferInputTensor(name="POINTS", datatype="INT32", shape=[rows, 2])],
            raw_input_contents=[struct.pack("<i", 1) * (2 * rows)],
        )
        expect_refused(stub.ModelInfer, request, "input 'POINTS'", f"at most {POINTS}")
    normal_classify(client, root)


# ---------------------------------------------------------------- training


def test_training_annotations_per_image_are_checked_first(client, root, no_item_work) -> None:
    call = drain(client.stub.TrainClassifier)
    expect_refused(call, train_request(root, [2], [POINTS + 1]), "labels.ref.images[0].annotations")
    expect_refused(call, train_request(root, [300_000]), "labels.train.images[0].annotations", "300000")


def test_training_image_and_annotation_totals_are_bounded(client, root, no_item_work) -> None:
    call = drain(client.stub.TrainClassifier)
    expect_refused(call, train_request(root, [1, 1], [1, 1], [1]), "labels (images)", f"at most {IMAGES}")
    expect_refused(call, train_request(root, [5, 5], [3]), "labels (annotations) is 13", str(ANNOTATIONS))


def test_training_within_the_bounds_passes_them(client, root) -> None:
    """A training inside every bound gets past them (here to its missing feature files)."""
    with pytest.raises(grpc.RpcError) as err:
        for _ in client.stub.TrainClassifier(train_request(root, [5, 5], [2]), timeout=120):
            pass
    assert err.value.code() != Code.RESOURCE_EXHAUSTED, err.value.details()
    normal_classify(client, root)


# ---------------------------------------------------------------- RunJob


def run_job(data: Any) -> pb.RunJobRequest:
    return pb.RunJobRequest(job_msg_json=data if isinstance(data, str) else json.dumps(data))


def extract_task(rowcols: int, **fields: Any) -> dict[str, Any]:
    return {"job_token": "x", "rowcols": [[1, 1]] * rowcols, **fields}


def test_run_job_text_size_is_checked_before_parsing(client, root, no_item_work) -> None:
    text = json.dumps({"task_name": "extract_features", "tasks": [extract_task(JOB_BYTES // 6)]})
    expect_refused(client.stub.RunJob, run_job(text), "job_msg_json", f"at most {JOB_BYTES}")
    # Characters over one byte count by their UTF-8 size.
    text = json.dumps({"task_name": "extract_features", "tasks": [], "pad": "é" * (JOB_BYTES // 2)})
    expect_refused(client.stub.RunJob, run_job(text.replace("\\u00e9", "é")), "max_job_json_bytes")


def test_run_job_task_counts_are_checked_before_walking_it(client, root, monkeypatch) -> None:
    def reached(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the job was walked before its counts were checked")

    monkeypatch.setattr(Limits, "check_json", reached)
    job = {"task_name": "extract_features", "tasks": [extract_task(POINTS + 1, image_loc={"key": "a.jpg"})]}
    expect_refused(client.stub.RunJob, run_job(job), "tasks[0].rowcols", "a.jpg")
    labels = {json.dumps({"storage_type": "filesystem", "key": "f"}): [[1, 1, 1]] * (POINTS + 1)}
    job = {"task_name": "train_classifier", "tasks": [{"job_token": "x", "labels": {"train": labels}}]}
    expect_refused(client.stub.RunJob, run_job(job), "tasks[0].labels.train[0]")
    legacy = {"data": {f"f{i}": [[1, 1, 1]] * 4 for i in range(4)}}
    job = {"task_name": "train_classifier", "tasks": [{"job_token": "x", "train_labels": legacy}]}
    expect_refused(client.stub.RunJob, run_job(job), "labels (annotations) is 16")


def test_run_job_missing_extractor_is_refused_promptly(client, root) -> None:
    job = {"task_name": "extract_features", "tasks": [extract_task(POINTS)]}
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        client.stub.RunJob(run_job(job), timeout=60)
    assert err.value.code() == Code.INVALID_ARGUMENT
    assert "extractor" in err.value.details()
    assert time.monotonic() - start < PROMPT_S
    normal_classify(client, root)


# ---------------------------------------------------------------- settings


def test_count_bounds_are_server_settings_with_defaults() -> None:
    defaults = ServerConfig().limits()
    assert defaults.max_job_json_bytes == 4 * MIB
    assert (defaults.max_training_images, defaults.max_training_annotations) == (100_000, 1_000_000)
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--max-job-json-mb", "0.5", "--max-training-images", "7", "--max-training-annotations", "70"]
    )
    limits = config_from_args(args, environ={}).limits()
    assert (limits.max_job_json_bytes, limits.max_training_images, limits.max_training_annotations) == (
        MIB // 2,
        7,
        70,
    )
    with pytest.raises(ValueError, match="max_training_images"):
        ServerConfig(max_training_images=0).validate()


def test_library_defaults_leave_jobs_unbounded() -> None:
    LIBRARY_DEFAULTS.check_job_text("x" * (8 * MIB))
    LIBRARY_DEFAULTS.check_training_counts([("img", 1)] * 200_000)


def test_job_point_lists_are_not_walked_for_names() -> None:
    bounded = Limits(max_key_chars=3)
    points = [[1, 1]] * 1_000_000
    labels = {"train": {"{}": points}, "ref": {"{}": points}}
    start = time.monotonic()
    bounded.check_json({"tasks": [{"rowcols": points, "labels": labels}, {"train_labels": {"data": labels}}]})
    assert time.monotonic() - start < 0.5
    # Locations beside the point lists are still checked.
    with pytest.raises(Exception, match=r"tasks\[0\]\.image_loc\.key"):
        bounded.check_json({"tasks": [{"rowcols": points, "image_loc": {"key": "abcd"}}]})
    with pytest.raises(Exception, match=r"train\.extra\.key"):
        bounded.check_json({"tasks": [{"labels": {"train": {"extra": {"key": "abcd"}}}}]})
