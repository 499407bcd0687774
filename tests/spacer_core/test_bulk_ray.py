"""The Ray engine of bulk work on a real local Ray instance: same outputs as the local engine,
failures recorded, an actor killed mid-run, a driver killed mid-run and resumed."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from spacer_core.bulk import local as bulk
from spacer_core.survey.workflow import local, weights_extractor
from spacer_core.testing import make_survey, read_features, write_manifest
from tests.support.bulk_survey import assert_matches_pyspacer

ray = pytest.importorskip("ray")
spacer = pytest.importorskip("spacer")
from spacer_core.bulk import ray_engine as bulk_ray  # noqa: E402
from spacer_core.bulk.ray_engine import RayOptions  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance (2 CPUs) for the module; its workers import this checkout."""
    before = os.environ.get("PYTHONPATH")
    # Workers inherit the raylet's environment, set here before it starts.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), before) if p)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    return make_survey(tmp_path_factory.mktemp("bulk-ray"), images=20, points=10)


@pytest.fixture(scope="module")
def local_features(survey, tmp_path_factory):
    """The local engine's feature files of the survey: the reference."""
    out = tmp_path_factory.mktemp("local-features")
    summary = bulk.run(
        bulk.BulkTask.extract(weights_extractor(survey.weights), out), bulk.plan(survey.manifest)
    )
    assert summary.counts()["ok"] == 20
    return out


def assert_same_features(a_dir, b_dir, names):
    for name in names:
        a, b = (
            read_features(Path(a_dir) / f"{name}.featurevector"),
            read_features(Path(b_dir) / f"{name}.featurevector"),
        )
        assert a[0] == b[0]
        np.testing.assert_allclose(a[1], b[1], atol=1e-6, rtol=0)


def test_features_match_the_local_engine_and_pyspacer(ray_instance, survey, local_features, tmp_path):
    out = tmp_path / "ray"
    seen = []
    summary = bulk_ray.run(
        bulk.BulkTask.extract(weights_extractor(survey.weights), out),
        bulk.plan(survey.manifest),
        progress=lambda *a: seen.append(a),
    )
    assert summary.engine == "ray" and summary.counts()["ok"] == 20 and summary.counts()["points"] == 200
    assert seen[0] == (0, 20, 0) and seen[-1] == (20, 20, 200) and len(seen) == 21
    assert_same_features(out, local_features, [p.name for p in survey.images])
    written = json.loads((out / "_summary.json").read_text())
    assert written["engine"] == "ray" and len(written["outputs"]) == 20
    # Oracle: pyspacer on one image.
    image = survey.images[7]
    assert_matches_pyspacer(survey.weights, image, out / f"{image.name}.featurevector", tmp_path)


def test_results_csv_is_identical_to_the_local_engine(ray_instance, survey, tmp_path):
    extractor = weights_extractor(survey.weights)
    items = bulk.plan(survey.manifest)
    by_engine = {}
    for engine, run in (("local", bulk.run), ("ray", bulk_ray.run)):
        task = bulk.BulkTask.classify(extractor, local(survey.classifier), tmp_path / f"{engine}.csv", 0.6)
        summary = run(task, items)
        assert summary.counts()["ok"] == 20
        by_engine[engine] = (tmp_path / f"{engine}.csv").read_bytes()
    assert by_engine["ray"] == by_engine["local"]
    with open(tmp_path / "ray.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 200


def test_corrupt_and_missing_images_are_recorded_and_the_others_complete(ray_instance, survey, tmp_path):
    good = [survey.images[i] for i in range(3)]
    (tmp_path / "corrupt.jpg").write_bytes(good[0].read_bytes()[:500])
    points = [(20, 30), (200, 400)]
    manifest = write_manifest(
        tmp_path / "m.csv",
        {
            **{str(p): points for p in good},
            "corrupt.jpg": points,
            "missing.jpg": points,
        },
    )
    summary = bulk_ray.run(
        bulk.BulkTask.extract(weights_extractor(survey.weights), tmp_path / "out"), bulk.plan(manifest)
    )
    entries = json.loads((tmp_path / "out" / "_summary.json").read_text())["outputs"]
    assert [entries[str(p)]["ok"] for p in good] == [True] * 3
    assert entries["missing.jpg"] == {"ok": False, "error": f"{tmp_path / 'missing.jpg'}: file not found"}
    assert not entries["corrupt.jpg"]["ok"] and "corrupt.jpg" in entries["corrupt.jpg"]["error"]
    assert summary.counts() == {
        "images": 5,
        "ok": 3,
        "failed": 2,
        "skipped": 0,
        "points": 6,
        "points_computed": 6,
    }
    assert sorted(p.name for p in (tmp_path / "out").glob("*.featurevector")) == sorted(
        f"{p.name}.featurevector" for p in good
    )


def test_a_network_actor_killed_mid_run_is_restarted_and_every_image_completes(
    ray_instance, survey, local_features, tmp_path
):
    marker = tmp_path / "kill-one-actor"
    marker.write_text("")
    out = tmp_path / "out"
    summary = bulk_ray.run(
        bulk.BulkTask.extract(weights_extractor(survey.weights), out),
        bulk.plan(survey.manifest),
        RayOptions(fault_marker=str(marker)),
    )
    assert not marker.exists() and marker.with_name("kill-one-actor.taken").exists()  # an actor did exit
    assert summary.counts()["ok"] == 20 and summary.counts()["failed"] == 0
    assert_same_features(out, local_features, [p.name for p in survey.images])


def test_a_driver_killed_half_way_resumes_and_the_rerun_writes_only_the_rest(
    ray_instance, survey, local_features, tmp_path
):
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "shell",
        "bulk",
        "extract",
        "--weights",
        str(survey.weights),
        "--manifest",
        str(survey.manifest),
        "--out",
        str(out),
        "--engine",
        "ray",
        "--ray-address",
        ray_instance,
    ]
    driver = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while len(list(out.glob("*.featurevector"))) < 3:
            assert driver.poll() is None, driver.communicate()
            assert time.monotonic() < deadline, "no outputs appeared"
            time.sleep(0.02)
        driver.send_signal(signal.SIGKILL)
        driver.communicate(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
    time.sleep(1)  # work the driver had handed out is cancelled with it
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.featurevector")}
    assert 3 <= len(before) < 20 and not (out / "_summary.json").exists()
    summary = bulk_ray.run(
        bulk.BulkTask.extract(weights_extractor(survey.weights), out), bulk.plan(survey.manifest)
    )
    counts = summary.counts()
    assert counts["ok"] == 20 and counts["skipped"] == len(before)
    assert counts["points_computed"] == 10 * (20 - len(before))
    assert {n: (out / n).stat().st_mtime_ns for n in before} == before  # nothing done twice
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    assert_same_features(out, local_features, [p.name for p in survey.images])
