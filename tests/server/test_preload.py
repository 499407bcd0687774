"""--preload: models are loaded and warmed before health reports SERVING."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from server.client import SpacerClient
from server.config import ServerConfig, read_preload
from spacer_core.runtime import Runtime
from spacer_core.testing import extractor_json, make_classifier
from spacer_core.testing import fs_loc as fs
from tests.support.grpc_server import running_server

ROOT = Path(__file__).resolve().parents[2]


def wait_until(predicate, timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_health_is_not_serving_until_the_preloaded_models_are_loaded_and_warm(
    tmp_path,
    efficientnet_weights,
    monkeypatch,  # noqa: F811
):
    # Loading the classifier waits for the test's signal, so preloading cannot
    # finish before it: the NOT_SERVING phase is observed for sure. (A named
    # pipe cannot stand in: data files must be regular files.)
    pipe = make_classifier(tmp_path / "clf.pkl")
    release = threading.Event()
    load = Runtime._load_classifier

    def gated(*args, **kwargs):
        release.wait(60)
        return load(*args, **kwargs)

    monkeypatch.setattr(Runtime, "_load_classifier", staticmethod(gated))
    preload = write_json(
        tmp_path / "preload.json",
        {
            "extractors": [extractor_json(efficientnet_weights.path, efficientnet_weights.sha256)],
            "classifiers": [fs(pipe)],
        },
    )
    with (
        running_server(workers=2, log_level="WARNING", preload=preload) as server,
        SpacerClient(server.address, timeout=60) as client,
    ):
        assert client.health() == "NOT_SERVING"
        assert client.health("") == "NOT_SERVING"
        engine = server.server.engine
        # The extractor is loaded and warmed (a forward pass) first; the classifier is still pending.
        wait_until(lambda: any(m.kind == "extractor" for m in client.list_models()), what="the extractor")
        time.sleep(0.2)
        assert client.health() == "NOT_SERVING"

        release.set()
        wait_until(lambda: client.health() == "SERVING", what="SERVING")
        assert client.health("") == "SERVING"
        models = {m.kind: m for m in client.list_models()}
        assert set(models) == {"extractor", "classifier"}
        assert models["extractor"].feature_dim == 1280
        assert str(pipe) in models["classifier"].name
        assert [label.id for label in models["classifier"].classes] == [1, 2, 3]
        batchers = engine.runtime._batchers
        (key,) = batchers.keys()
        batcher = batchers.peek(key)
        assert batcher is not None and batcher.stats.batches >= 1  # the warm-up pass


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json", "cannot read it as JSON"),
        ([], "expected a JSON object"),
        ({"models": []}, "unknown keys ['models']"),
        ({"extractors": {}}, "extractors must be a list"),
        ({"extractors": [{"data_locations": {}}]}, "extractors[0]"),
        ({"classifiers": ["clf.pkl"]}, "classifiers[0]"),
        ({"classifiers": [{"storage_type": "tape", "key": "x"}]}, "classifiers[0]"),
    ],
)
def test_a_malformed_preload_file_is_refused_naming_the_entry(tmp_path, content, message):
    path = tmp_path / "preload.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError) as caught:
        read_preload(path)
    assert message in str(caught.value) and str(path) in str(caught.value)


def test_a_missing_preload_file_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match="preload: no such file"):
        ServerConfig(preload=tmp_path / "absent.json").validate()


@pytest.mark.slow
def test_serve_exits_with_a_clear_message_when_a_preloaded_model_cannot_load(tmp_path):
    preload = write_json(tmp_path / "preload.json", {"classifiers": [fs(tmp_path / "absent.pkl")]})
    proc = subprocess.run(
        [sys.executable, "-m", "shell", "serve", "--port", "0", "--preload", str(preload)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("spacer serve: preload") and "absent.pkl" in last, proc.stderr
    assert "Traceback" not in proc.stderr
