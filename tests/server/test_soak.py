"""The 60-second soak (benchmarks/soak.py) against a real `spacer serve` process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support import ROOT


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sixty_second_soak_loses_nothing_and_memory_stays_flat(tmp_path):
    out = tmp_path / "soak.json"
    run = subprocess.run(
        [sys.executable, "benchmarks/soak.py", "--seconds", "60", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["ok"] and summary["problems"] == []
    assert summary["sent"] > 0 and summary["answered"] == summary["sent"]
    assert summary["failed"] == summary["lost"] == summary["duplicated"] == 0
    assert summary["rss_growth"] < 0.05
    assert summary["latency_p99_ms"] >= summary["latency_p50_ms"] > 0


@pytest.mark.slow
def test_soak_refuses_bad_arguments():
    run = subprocess.run(
        [sys.executable, "benchmarks/soak.py", "--seconds", "sixty"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert "--seconds" in run.stderr
