"""deploy/ manifests: valid against the Kubernetes schema (offline) and consistent with the server."""

from __future__ import annotations

from pathlib import Path

import pytest

kubernetes_validate = pytest.importorskip("kubernetes_validate")
yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
# The oldest release with the native preStop sleep action, and the newest bundled schema.
VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


def manifests() -> dict[str, dict]:
    found = {}
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return found


@pytest.fixture(scope="module")
def objs() -> dict[str, dict]:
    return manifests()


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_for_kubernetes(objs, version):
    assert {
        "Deployment/spacer",
        "Service/spacer",
        "PodDisruptionBudget/spacer",
        "HorizontalPodAutoscaler/spacer",
    } <= set(objs)
    for name, doc in objs.items():
        if doc["apiVersion"].startswith("ray.io/"):
            continue  # a KubeRay custom resource: checked in tests/test_bulk_deploy.py
        if doc["apiVersion"].startswith("serving.kserve.io/"):
            continue  # KServe custom resources: checked in tests/test_kserve_deploy.py
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name} (Kubernetes {version}): {exc.message} at {list(exc.path)}")


def test_the_validator_rejects_a_broken_probe(objs):
    import copy

    broken = copy.deepcopy(objs["Deployment/spacer"])
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["grpc"]["port"] = "grpc"  # gRPC probes take a number only
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def _container(objs) -> dict:
    return objs["Deployment/spacer"]["spec"]["template"]["spec"]["containers"][0]


def test_probes_use_grpc_health_on_the_serving_port_and_gpus_are_requested(objs):
    container = _container(objs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["grpc"] == 50051
    assert container["readinessProbe"]["grpc"]["service"] == "spacer.v1.Spacer"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SPACER_DEVICE"] == "cuda"


def test_termination_grace_outlasts_the_prestop_sleep_and_the_server_drain(objs):
    pod = objs["Deployment/spacer"]["spec"]["template"]["spec"]
    container = _container(objs)
    env = {e["name"]: e.get("value") for e in container["env"]}
    drain = float(env["SPACER_GRACE_SECONDS"])
    sleep = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > sleep + drain


def test_service_is_headless_and_everything_selects_the_pods(objs):
    labels = objs["Deployment/spacer"]["spec"]["template"]["metadata"]["labels"]
    service = objs["Service/spacer"]["spec"]
    assert service["clusterIP"] == "None"
    for selector in (
        service["selector"],
        objs["PodDisruptionBudget/spacer"]["spec"]["selector"]["matchLabels"],
        objs["Deployment/spacer"]["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items()
    target = objs["HorizontalPodAutoscaler/spacer"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "spacer")


def test_autoscaler_metric_comes_from_a_metric_the_server_exports(objs):
    from server import metrics

    hpa_metric = objs["HorizontalPodAutoscaler/spacer"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    rules = yaml.safe_load(objs["ConfigMap/prometheus-adapter-spacer"]["data"]["config.yaml"])["rules"]
    rule = next(r for r in rules if r["name"]["as"] == hpa_metric)
    series = rule["name"]["matches"].strip("^$")
    exported = {s.name for family in metrics.REGISTRY.collect() for s in family.samples}
    exported |= {f"{family.name}_total" for family in metrics.REGISTRY.collect() if family.type == "counter"}
    assert series in exported
    annotations = objs["Deployment/spacer"]["spec"]["template"]["metadata"]["annotations"]
    ports = {p["name"]: p["containerPort"] for p in _container(objs)["ports"]}
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
