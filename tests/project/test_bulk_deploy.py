"""deploy/rayjob.yaml: KubeRay's RayJob fields (a schema written from KubeRay's v1 API reference),
its pod templates valid for Kubernetes, and an entrypoint the `spacer` command accepts."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path

import pytest

from shell.main import build_parser

kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")
yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {"metadata": {"type": "object"}, "spec": {"type": "object"}},
}
_GROUP = {
    "type": "object",
    "required": ["groupName", "rayStartParams", "template"],
    "additionalProperties": False,
    "properties": {
        "groupName": {"type": "string"},
        "replicas": {"type": "integer", "minimum": 0},
        "minReplicas": {"type": "integer", "minimum": 0},
        "maxReplicas": {"type": "integer", "minimum": 1},
        "rayStartParams": _STRING_MAP,
        "template": _TEMPLATE,
        "numOfHosts": {"type": "integer"},
        "suspend": {"type": "boolean"},
        "idleTimeoutSeconds": {"type": "integer"},
    },
}
# The RayJob fields of KubeRay's ray.io/v1 API reference that this project uses, and their types.
RAYJOB_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayJob"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["entrypoint", "rayClusterSpec"],
            "additionalProperties": False,
            "properties": {
                "entrypoint": {"type": "string"},
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                "shutdownAfterJobFinishes": {"type": "boolean"},
                "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                "backoffLimit": {"type": "integer", "minimum": 0},
                "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                "runtimeEnvYAML": {"type": "string"},
                "suspend": {"type": "boolean"},
                "rayClusterSpec": {
                    "type": "object",
                    "required": ["headGroupSpec"],
                    "additionalProperties": False,
                    "properties": {
                        "rayVersion": {"type": "string"},
                        "enableInTreeAutoscaling": {"type": "boolean"},
                        "headGroupSpec": {
                            "type": "object",
                            "required": ["rayStartParams", "template"],
                            "additionalProperties": False,
                            "properties": {
                                "rayStartParams": _STRING_MAP,
                                "template": _TEMPLATE,
                                "serviceType": {"type": "string"},
                            },
                        },
                        "workerGroupSpecs": {"type": "array", "items": _GROUP},
                    },
                },
            },
        },
    },
}


@pytest.fixture(scope="module")
def job() -> dict:
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy" / "rayjob.yaml").read_text()) if d]
    assert len(docs) == 1
    return docs[0]


def _templates(job: dict) -> dict[str, dict]:
    cluster = job["spec"]["rayClusterSpec"]
    found = {"head": cluster["headGroupSpec"]["template"]}
    found.update({g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]})
    return found


def test_rayjob_has_kuberays_fields_with_their_types(job):
    jsonschema.validate(job, RAYJOB_SCHEMA)
    broken = copy.deepcopy(job)
    broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replica"] = 2  # misspelt: refused
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, RAYJOB_SCHEMA)


@pytest.mark.parametrize("version", ("1.30.0", kubernetes_validate.latest_version()))
def test_every_pod_template_is_valid_for_kubernetes(job, version):
    for name, template in _templates(job).items():
        doc = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"spacer-bulk-{name}"},
            "template": template,
        }
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name} template (Kubernetes {version}): {exc.message} at {list(exc.path)}")


def test_entrypoint_is_a_spacer_bulk_command_on_ray_over_the_shared_volume(job):
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "spacer"
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.bulk_command, args.engine, args.ray_address) == (
        "bulk",
        "extract",
        "ray",
        "auto",
    )
    templates = _templates(job)
    for name, template in templates.items():
        mounts = {m["mountPath"] for c in template["spec"]["containers"] for m in c.get("volumeMounts", [])}
        claims = {
            v["persistentVolumeClaim"]["claimName"]
            for v in template["spec"]["volumes"]
            if "persistentVolumeClaim" in v
        }
        assert "/data" in mounts and claims == {"spacer-bulk-data"}, name
    for path in (args.weights, args.manifest, args.out):
        assert str(path).startswith("/data/")
    gpu = templates["gpu"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {e["name"]: e["value"] for e in gpu["env"]}["SPACER_DEVICE"] == "cuda"
    assert job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
