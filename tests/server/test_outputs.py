"""Where a request may write: never over its own inputs, another of its outputs, or served models.

A real server on loopback, real files: each refused request must leave
every file it named as it was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from server._proto.spacer.v1 import spacer_pb2 as pb
from server._proto.spacer.v1 import spacer_pb2_grpc as pbg
from server.config import ServerConfig
from spacer_core.testing import make_classifier, make_image
from tests.support.grpc_server import running_server

Code = grpc.StatusCode
EFFICIENTNET = "spacer.extractors.efficientnet.EfficientNetExtractor"
FEATURES = b'{"point_features": [], "valid_rowcol": true, "feature_dim": 4, "npoints": 0}'


@pytest.fixture(scope="module")
def env(tmp_path_factory, efficientnet_weights):
    root = tmp_path_factory.mktemp("outputs")
    repo = root / "models"
    repo.mkdir()
    make_classifier(repo / "clf.pkl")
    weights = root / "efficientnet_b0.pt"
    weights.write_bytes(efficientnet_weights.path.read_bytes())
    features = []
    for i in range(4):
        path = root / f"f{i}.featurevector"
        path.write_bytes(FEATURES)
        features.append(path)
    config = ServerConfig(workers=2, log_level="WARNING", data_roots=(root,), model_repository=repo)
    with running_server(config) as server, grpc.insecure_channel(server.address) as channel:
        yield SimpleNamespace(
            root=root,
            repo=repo,
            image=make_image(root / "reef.jpg", 96, 72, seed=1),
            weights=weights,
            sha=efficientnet_weights.sha256,
            features=features,
            stub=pbg.SpacerStub(channel),
        )


def loc(path: Any) -> pb.DataLocation:
    return pb.DataLocation(storage_type="filesystem", key=str(path))


def snapshot(*paths: Path) -> dict[Path, bytes | None]:
    return {p: p.read_bytes() if p.exists() else None for p in paths}


def extract(e: SimpleNamespace, image: Path, feature_loc: Any) -> Any:
    extractor = pb.Extractor(
        class_path=EFFICIENTNET, data_locations={"weights": loc(e.weights)}, data_hashes={"weights": e.sha}
    )
    request = pb.ExtractFeaturesRequest(
        job_token="out", extractor=extractor, rowcols=[pb.RowCol(row=10, col=10)], image_loc=loc(image)
    )
    request.feature_loc.CopyFrom(loc(feature_loc))
    return e.stub.ExtractFeatures(request, timeout=60)


def train(e: SimpleNamespace, model: Path, valresult: Path, previous: tuple[Path, ...] = ()) -> Any:
    def part(paths: list[Path]) -> pb.ImageLabels:
        return pb.ImageLabels(
            images=[
                pb.ImageAnnotations(
                    feature_loc=loc(p), annotations=[pb.Annotation(row=1, col=1, label=pb.Label(name="Sand"))]
                )
                for p in paths
            ]
        )

    labels = pb.TrainingTaskLabels(
        train=part(e.features[:2]), ref=part(e.features[2:3]), val=part(e.features[3:])
    )
    request = pb.TrainClassifierRequest(
        job_token="out",
        nbr_epochs=1,
        clf_type="LR",
        labels=labels,
        previous_model_locs=[loc(p) for p in previous],
        model_loc=loc(model),
        valresult_loc=loc(valresult),
    )
    return list(e.stub.TrainClassifier(request, timeout=60))


def refused(call: Any, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    return info.value.details()


def test_features_never_replace_the_image_or_the_weights(env):
    before = snapshot(env.image, env.weights)
    alias = env.root / "alias.jpg"
    if not alias.exists():
        alias.symlink_to(env.image)
    for target, field in (
        (env.image, "image_loc"),
        (alias, "image_loc"),
        (env.root / "models" / ".." / "reef.jpg", "image_loc"),
        (env.weights, "extractor.data_locations['weights']"),
    ):
        details = refused(lambda t=target: extract(env, env.image, t), Code.INVALID_ARGUMENT)
        assert "feature_loc" in details and field in details
    assert snapshot(env.image, env.weights) == before


def test_a_training_writes_neither_over_its_features_nor_one_output_over_the_other(env):
    previous = env.root / "previous.pkl"
    make_classifier(previous, feature_dim=4)
    watched = (*env.features, previous, env.root / "same", env.root / "m.pkl")
    before = snapshot(*watched)
    cases = [
        ((env.features[0], env.root / "v.json"), ("model_loc", "labels.train")),
        ((env.root / "m.pkl", env.features[3]), ("valresult_loc", "labels.val")),
        ((env.root / "same", env.root / "same"), ("model_loc", "valresult_loc")),
        ((previous, env.root / "v.json", (previous,)), ("model_loc", "previous_model_locs")),
    ]
    for args, fields in cases:
        details = refused(lambda a=args: train(env, *a), Code.INVALID_ARGUMENT)
        assert all(f in details for f in fields), details
    assert snapshot(*watched) == before


def test_run_job_refuses_a_task_writing_over_its_input_before_any_task_runs(env):
    extractor = {
        "class_path": EFFICIENTNET,
        "data_locations": {"weights": {"storage_type": "filesystem", "key": str(env.weights)}},
        "data_hashes": {"weights": env.sha},
    }

    def task(image: Path, features: Path) -> dict[str, Any]:
        return {
            "job_token": "out",
            "extractor": extractor,
            "rowcols": [[10, 10]],
            "image_loc": {"storage_type": "filesystem", "key": str(image)},
            "feature_loc": {"storage_type": "filesystem", "key": str(features)},
        }

    second = env.root / "second.jpg"
    second.write_bytes(env.image.read_bytes())
    before = snapshot(env.image, second, env.weights)
    for tasks, fields in (
        ([task(env.image, env.image)], ("tasks[0].feature_loc", "tasks[0].image_loc")),
        (
            [task(env.image, env.root / "x.fv"), task(second, env.weights)],
            ("tasks[1].feature_loc", "tasks[1].extractor.data_locations['weights']"),
        ),
    ):
        job = json.dumps({"task_name": "extract_features", "tasks": tasks})
        # As any failed task in pyspacer: ok false and the error in the reply.
        reply = env.stub.RunJob(pb.RunJobRequest(job_msg_json=job), timeout=60)
        assert not reply.ok and all(f in reply.error_message for f in fields), reply.error_message
        assert "Traceback" not in reply.error_message
    assert snapshot(env.image, second, env.weights) == before
    assert not (env.root / "x.fv").exists()


def test_the_model_repository_is_read_only_to_clients(env):
    served = env.repo / "clf.pkl"
    before = snapshot(served)
    link = env.root / "into_models"
    if not link.exists():
        link.symlink_to(env.repo)
    for target in (served, env.repo / "new.featurevector", link / "clf.pkl", env.repo / "sub" / "x.fv"):
        details = refused(lambda t=target: extract(env, env.image, t), Code.PERMISSION_DENIED)
        assert "feature_loc" in details and "read-only" in details
    details = refused(lambda: train(env, env.repo / "new.pkl", env.root / "v.json"), Code.PERMISSION_DENIED)
    assert "model_loc" in details and "read-only" in details
    assert snapshot(served) == before
    assert sorted(os.listdir(env.repo)) == ["clf.pkl"]
    # Reading from the repository stays allowed: a classifier there scores features.
    features = env.root / "scored.featurevector"
    extract(env, env.image, features)
    reply = env.stub.ClassifyFeatures(
        pb.ClassifyFeaturesRequest(job_token="out", feature_loc=loc(features), classifier_loc=loc(served)),
        timeout=60,
    )
    assert reply.scores


def test_an_existing_file_of_another_kind_is_never_replaced(env):
    photo = env.root / "other_photo.jpg"
    photo.write_bytes(env.image.read_bytes())
    classifier = env.root / "other_clf.pkl"
    make_classifier(classifier)
    before = snapshot(photo, classifier)
    for target, kind in ((photo, "an image"), (classifier, "a pickle")):
        details = refused(lambda t=target: extract(env, env.image, t), Code.FAILED_PRECONDITION)
        assert str(target) in details and kind in details, details
    assert snapshot(photo, classifier) == before
    # Features replace features: extracting again is the ordinary case.
    again = env.root / "again.featurevector"
    extract(env, env.image, again)
    first = again.read_bytes()
    extract(env, env.image, again)
    assert again.read_bytes()[:4] == first[:4] == b"PK\x03\x04"
