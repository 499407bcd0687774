"""OIP model names and shared models, over real gRPC on loopback.

Every RPC that takes a model name checks it with one rule (1 to 128 of
A-Z a-z 0-9 . _ -, not starting with '.'), so no name can inflate the
replies that list models; clients hold at most --max-config-models models
loaded from a config; a config may not replace a model the repository
provides, or another config's model, unless --allow-model-override; the
repository lists only files that are really in its folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import grpc
import numpy as np
import pytest

from server._proto.inference import grpc_service_pb2 as ipb
from server._proto.inference import grpc_service_pb2_grpc as ipbg
from spacer_core.testing import make_classifier
from tests.support.grpc_server import running_server

Code = grpc.StatusCode
REPO_CLF = "reef_clf"
DIM = 8
# Past the limit, control characters, a leading dot, a space, a slash, non-ASCII.
BAD_NAMES = ["a" * 129, "a\x00b", "clf\n", ".hidden", "a b", "a/b", "ünï", "n" * 100_000]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("oip_names")
    repo = root / "models"
    repo.mkdir()
    make_classifier(repo / f"{REPO_CLF}.pkl", feature_dim=DIM)
    make_classifier(root / "mine.pkl", feature_dim=DIM, classes=(4, 5), seed=1)
    make_classifier(root / "theirs.pkl", feature_dim=DIM, classes=(6, 7), seed=2)
    outside = tmp_path_factory.mktemp("oip_names_outside")
    (outside / "secret.json").write_text('{"classifier": "/etc/passwd"}')
    make_classifier(outside / "elsewhere.pkl", feature_dim=DIM)
    # Symlinks leading out of the repository folder, and a stem that is not a name.
    (repo / "escape.json").symlink_to(outside / "secret.json")
    (repo / "linked.pkl").symlink_to(outside / "elsewhere.pkl")
    (repo / "sibling.pkl").symlink_to(root / "mine.pkl")
    make_classifier(repo / "bad name.pkl", feature_dim=DIM)
    return {"root": root, "repo": repo}


@pytest.fixture(scope="module")
def server(data):
    with running_server(model_repository=data["repo"], max_config_models=3) as server:
        yield server


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield ipbg.GRPCInferenceServiceStub(channel)


def config_of(path: Path) -> dict[str, ipb.ModelRepositoryParameter]:
    return {"config": ipb.ModelRepositoryParameter(string_param=json.dumps({"classifier": str(path)}))}


def load(stub, name: str, path: Path | None = None) -> None:
    params = config_of(path) if path is not None else {}
    stub.RepositoryModelLoad(ipb.RepositoryModelLoadRequest(model_name=name, parameters=params), timeout=60)


def unload(stub, name: str) -> None:
    stub.RepositoryModelUnload(ipb.RepositoryModelUnloadRequest(model_name=name), timeout=30)


def features_request(name: str, **params: str) -> ipb.ModelInferRequest:
    request = ipb.ModelInferRequest(model_name=name, id="r")
    request.inputs.add(name="FEATURES", datatype="FP32", shape=[2, DIM])
    request.raw_input_contents.append(np.ones((2, DIM), dtype=np.float32).tobytes())
    for key, value in params.items():
        request.parameters[key].string_param = value
    return request


def refused(call, code: Code, *words: str) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value.details()
    details = err.value.details()
    for word in words:
        assert word in details, details
    assert "Traceback" not in details
    return details


def name_calls(stub, name: str):
    """Every OIP call that takes a model name, with the field it comes in."""
    return [
        ("model_name", lambda: load(stub, name)),
        ("model_name", lambda: load(stub, name, Path("/nowhere.pkl"))),
        ("model_name", lambda: unload(stub, name)),
        ("model_name", lambda: stub.ModelInfer(features_request(name), timeout=30)),
        ("name", lambda: stub.ModelReady(ipb.ModelReadyRequest(name=name), timeout=30)),
        ("name", lambda: stub.ModelMetadata(ipb.ModelMetadataRequest(name=name), timeout=30)),
        ("name", lambda: stub.ModelConfig(ipb.ModelConfigRequest(name=name), timeout=30)),
        ("name", lambda: stub.ModelStatistics(ipb.ModelStatisticsRequest(name=name), timeout=30)),
    ]  # fmt: skip


@pytest.mark.parametrize("name", BAD_NAMES, ids=lambda n: repr(n[:12]))
def test_every_rpc_that_takes_a_model_name_refuses_a_bad_one(stub, name):
    for field, call in name_calls(stub, name):
        details = refused(call, Code.INVALID_ARGUMENT, f"{field}:", "not a model name")
        assert len(details) < 400, details
    # The pipeline's named models and the stream's items go through the same rule.
    refused(
        lambda: stub.ModelInfer(
            features_request("spacer_pipeline", extractor=name, classifier="x"), timeout=30
        ),
        Code.INVALID_ARGUMENT,
    )
    replies = list(stub.ModelStreamInfer(iter([features_request(name)]), timeout=30))
    assert len(replies) == 1 and "not a model name" in replies[0].error_message
    assert replies[0].infer_response.model_name == ""  # not echoed back


def test_names_within_the_rule_load_and_the_index_stays_small(stub, data):
    longest = "A." + "z" * 124 + "-_"
    assert len(longest) == 128
    load(stub, longest, data["root"] / "mine.pkl")
    try:
        assert stub.ModelReady(ipb.ModelReadyRequest(name=longest), timeout=30).ready
        index = stub.RepositoryIndex(ipb.RepositoryIndexRequest(), timeout=30)
        assert longest in {m.name for m in index.models}
        assert index.ByteSize() < 4096
    finally:
        unload(stub, longest)


def test_clients_hold_at_most_max_config_models(stub, data):
    names = ["cap_a", "cap_b", "cap_c"]
    for name in names:
        load(stub, name, data["root"] / "mine.pkl")
    try:
        refused(
            lambda: load(stub, "cap_d", data["root"] / "mine.pkl"),
            Code.RESOURCE_EXHAUSTED,
            "'cap_d'",
            "--max-config-models",
        )
        load(stub, "cap_a", data["root"] / "mine.pkl")  # the same config again is no new model
        unload(stub, "cap_c")
        load(stub, "cap_d", data["root"] / "mine.pkl")
        names[2] = "cap_d"
        index = {m.name for m in stub.RepositoryIndex(ipb.RepositoryIndexRequest(), timeout=30).models}
        assert {"cap_a", "cap_b", "cap_d"} <= index and "cap_c" not in index
    finally:
        for name in names:
            unload(stub, name)


def test_a_config_cannot_replace_a_shared_model(stub, data):
    # A repository model, loaded or not, keeps its name.
    refused(lambda: load(stub, REPO_CLF, data["root"] / "theirs.pkl"), Code.ALREADY_EXISTS, f"'{REPO_CLF}'")
    load(stub, REPO_CLF)
    refused(lambda: load(stub, REPO_CLF, data["root"] / "theirs.pkl"), Code.ALREADY_EXISTS, f"'{REPO_CLF}'")
    reply = stub.ModelInfer(features_request(REPO_CLF), timeout=60)
    assert [o.name for o in reply.outputs] == ["SCORES", "LABELS", "PREDICTIONS"]
    assert reply.outputs[0].shape == [2, 3]  # still the repository's three classes
    # Another client's config model keeps its config; the same config loads again.
    load(stub, "shared", data["root"] / "mine.pkl")
    try:
        refused(lambda: load(stub, "shared", data["root"] / "theirs.pkl"), Code.ALREADY_EXISTS, "'shared'")
        load(stub, "shared", data["root"] / "mine.pkl")
        assert stub.ModelInfer(features_request("shared"), timeout=60).outputs[0].shape == [2, 2]
    finally:
        unload(stub, "shared")


def test_the_operator_may_allow_overrides(data):
    with (
        running_server(model_repository=data["repo"], allow_model_override=True) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = ipbg.GRPCInferenceServiceStub(channel)
        load(stub, REPO_CLF)
        load(stub, REPO_CLF, data["root"] / "theirs.pkl")
        assert stub.ModelInfer(features_request(REPO_CLF), timeout=60).outputs[0].shape == [2, 2]


def test_the_repository_lists_only_its_own_files_with_valid_names(stub, data):
    assert os.path.islink(data["repo"] / "escape.json")
    index = {m.name: m for m in stub.RepositoryIndex(ipb.RepositoryIndexRequest(), timeout=30).models}
    assert REPO_CLF in index
    # Leading out (even to a readable file under the data roots), or no valid name: not listed.
    for name in ("escape", "linked", "sibling", "bad name"):
        assert name not in index
    assert not any("passwd" in m.reason for m in index.values())
    refused(lambda: load(stub, "escape"), Code.NOT_FOUND, "'escape'")
