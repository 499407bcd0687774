"""The batch entry point, run as its own process like AWS Batch runs it."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import spacer.data_classes
import spacer.messages
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import SGDClassifier

from spacer_core.testing import fs_loc as loc


def _classify_job(tmp_path, feature_path):
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (60, 6))
    y = (x[:, 0] > 0).astype(int)
    clf = CalibratedClassifierCV(
        SGDClassifier(loss="log_loss", random_state=0).fit(x[:30], y[:30]), cv="prefit"
    ).fit(x[30:], y[30:])
    model = tmp_path / "model.pkl"
    model.write_bytes(pickle.dumps(clf, protocol=2))
    spacer.data_classes.ImageFeatures(
        point_features=[spacer.data_classes.PointFeatures(row=1, col=2, data=x[0].tolist())],
        valid_rowcol=True,
        feature_dim=6,
        npoints=1,
    ).store(spacer.data_classes.DataLocation("filesystem", str(tmp_path / "f.featurevector")))
    return {
        "task_name": "classify_features",
        "tasks": [{"job_token": "t1", "feature_loc": loc(feature_path), "classifier_loc": loc(model)}],
    }


def _run_env_job(tmp_path, job):
    job_path = tmp_path / "job.json"
    job_path.write_text(json.dumps(job))
    result_path = tmp_path / "out" / "result.json"
    env = dict(os.environ, JOB_MSG_LOC=json.dumps(loc(job_path)), RES_MSG_LOC=json.dumps(loc(result_path)))
    proc = subprocess.run(
        [sys.executable, "-m", "spacer_core.mailman", "env_job"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc, json.loads(result_path.read_text())


@pytest.mark.slow
def test_env_job_writes_result_pyspacer_can_read(tmp_path):
    proc, result = _run_env_job(tmp_path, _classify_job(tmp_path, tmp_path / "f.featurevector"))
    assert proc.returncode == 0, proc.stderr
    assert result["ok"] is True and result["error_message"] is None
    parsed = spacer.messages.JobReturnMsg.deserialize(result)
    assert parsed.results[0].classes == [0, 1]
    assert len(parsed.results[0].scores) == 1


@pytest.mark.slow
def test_env_job_reports_failed_task(tmp_path):
    proc, result = _run_env_job(tmp_path, _classify_job(tmp_path, tmp_path / "missing.featurevector"))
    assert proc.returncode == 1
    assert result["ok"] is False and result["results"] is None
    assert "missing.featurevector" in result["error_message"]


@pytest.mark.slow
def test_env_job_without_job_location_fails_clearly(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("JOB_MSG_LOC", "RES_MSG_LOC")}
    proc = subprocess.run(
        [sys.executable, "-m", "spacer_core.mailman", "env_job"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "JOB_MSG_LOC" in proc.stderr
