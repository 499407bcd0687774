"""deploy/kserve.yaml: KServe's ServingRuntime and InferenceService fields (a schema written
from KServe's v1alpha1/v1beta1 API reference), its container valid for Kubernetes, and
arguments `spacer serve` accepts, serving the Open Inference Protocol on the h2c port."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from server.config import config_from_args
from shell.main import build_parser

kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")
yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]

_FORMAT = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "version": {"type": "string"},
        "autoSelect": {"type": "boolean"},
        "priority": {"type": "integer", "minimum": 1},
    },
}
_METADATA = {"type": "object", "required": ["name"]}
# The fields of KServe's serving.kserve.io/v1alpha1 ServingRuntime that this project uses.
SERVING_RUNTIME_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "serving.kserve.io/v1alpha1"},
        "kind": {"const": "ServingRuntime"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["supportedModelFormats", "containers"],
            "additionalProperties": False,
            "properties": {
                "supportedModelFormats": {"type": "array", "minItems": 1, "items": _FORMAT},
                "protocolVersions": {"type": "array", "items": {"enum": ["v1", "v2", "grpc-v1", "grpc-v2"]}},
                "multiModel": {"type": "boolean"},
                "disabled": {"type": "boolean"},
                "containers": {"type": "array", "minItems": 1, "items": {"type": "object"}},
                "volumes": {"type": "array"},
                "nodeSelector": {"type": "object"},
                "tolerations": {"type": "array"},
            },
        },
    },
}
# ... and of serving.kserve.io/v1beta1 InferenceService.
INFERENCE_SERVICE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "serving.kserve.io/v1beta1"},
        "kind": {"const": "InferenceService"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["predictor"],
            "additionalProperties": False,
            "properties": {
                "predictor": {
                    "type": "object",
                    "required": ["model"],
                    "additionalProperties": False,
                    "properties": {
                        "minReplicas": {"type": "integer", "minimum": 0},
                        "maxReplicas": {"type": "integer", "minimum": 1},
                        "model": {
                            "type": "object",
                            "required": ["modelFormat"],
                            "additionalProperties": False,
                            "properties": {
                                "modelFormat": _FORMAT,
                                "runtime": {"type": "string"},
                                "protocolVersion": {"enum": ["v1", "v2", "grpc-v1", "grpc-v2"]},
                                "storageUri": {"type": "string"},
                                "resources": {"type": "object"},
                                "env": {"type": "array"},
                            },
                        },
                    },
                }
            },
        },
    },
}


@pytest.fixture(scope="module")
def objs() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy" / "kserve.yaml").read_text()) if d]
    return {d["kind"]: d for d in docs}


def test_runtime_and_inference_service_have_kserves_fields(objs):
    jsonschema.validate(objs["ServingRuntime"], SERVING_RUNTIME_SCHEMA)
    jsonschema.validate(objs["InferenceService"], INFERENCE_SERVICE_SCHEMA)
    broken = copy.deepcopy(objs["InferenceService"])
    broken["spec"]["predictor"]["model"]["storageURI"] = "pvc://x"  # misspelt: refused
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, INFERENCE_SERVICE_SCHEMA)


@pytest.mark.parametrize("version", ("1.30.0", kubernetes_validate.latest_version()))
def test_the_runtime_container_is_valid_for_kubernetes(objs, version):
    containers = objs["ServingRuntime"]["spec"]["containers"]
    doc = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "spacer-runtime"},
        "spec": {"containers": containers},
    }
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"runtime container (Kubernetes {version}): {exc.message} at {list(exc.path)}")


def test_the_service_picks_the_runtime_and_speaks_grpc_v2(objs):
    runtime, isvc = objs["ServingRuntime"], objs["InferenceService"]
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["protocolVersion"] == "grpc-v2" and "grpc-v2" in runtime["spec"]["protocolVersions"]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"


def test_the_container_serves_the_model_repository_on_the_h2c_port(objs, tmp_path, monkeypatch):
    container = objs["ServingRuntime"]["spec"]["containers"][0]
    assert container["name"] == "kserve-container"  # the name KServe injects storage into
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    args = container["args"]
    assert args[:2] == ["spacer", "serve"]
    # Parse the arguments as `spacer serve` does, with the KServe mount made local.
    models = tmp_path / "mnt" / "models"
    models.mkdir(parents=True)
    local = [str(models) if a == "/mnt/models" else str(tmp_path) if a == "/data" else a for a in args[2:]]
    parsed = build_parser().parse_args(["serve", *local])
    config = config_from_args(parsed, environ={})
    assert config.port == ports["h2c"] and config.host == "0.0.0.0"
    assert config.model_repository == models
    assert models.resolve() in config.data_roots  # the repository's files are readable
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["h2c"]
