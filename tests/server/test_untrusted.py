"""A real server given hostile input: class paths it must not import, pickles it must not run,
and failures it must report without tracebacks, install paths or object reprs."""

from __future__ import annotations

import json
import logging
import pickle
import sys
from pathlib import Path

import grpc
import pytest

from server._proto.spacer.v1 import spacer_pb2 as pb
from server.client import SpacerClient
from server.security import redact, redact_job_error
from spacer_core.data_classes import DataLocation
from spacer_core.messages import ClassifyFeaturesMsg, JobMsg
from spacer_core.testing import make_classifier
from spacer_core.train_classifier import MiniBatchTrainer, register_trainer_class, trainer_factory
from tests.support.grpc_server import running_server

Code = grpc.StatusCode

# Importing this module (written to a temporary folder) leaves a marker file.
_TRAP = """
import pathlib
pathlib.Path({marker!r}).write_text("imported")

class Trainer:
    pass
"""


@pytest.fixture
def trap_module(tmp_path, monkeypatch):
    """(module name, marker path) of an importable module that reports being imported."""
    name = f"trap_{tmp_path.name.replace('-', '_')}"
    marker = tmp_path / "imported"
    (tmp_path / f"{name}.py").write_text(_TRAP.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, marker
    sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def client():
    with running_server(workers=2) as server, SpacerClient(server.address, timeout=60) as c:
        yield c


def _train_request(root: Path, trainer: str) -> pb.TrainClassifierRequest:
    labels = pb.ImageLabels(
        images=[
            pb.ImageAnnotations(
                feature_loc=pb.DataLocation(storage_type="filesystem", key=str(root / "a.featurevector")),
                annotations=[pb.Annotation(row=1, col=1, label=pb.Label(id=1))],
            )
        ]
    )
    return pb.TrainClassifierRequest(
        job_token="t",
        trainer=trainer,
        nbr_epochs=1,
        clf_type="LR",
        labels=pb.TrainingTaskLabels(train=labels, ref=labels, val=labels),
        model_loc=pb.DataLocation(storage_type="filesystem", key=str(root / "m.pkl")),
        valresult_loc=pb.DataLocation(storage_type="filesystem", key=str(root / "v.json")),
    )


def _train_job(root: Path, trainer: object, field: str = "trainer") -> str:
    task = {
        "job_token": "t",
        field: trainer,
        "nbr_epochs": 1,
        "clf_type": "LR",
        "labels": {"train": {}, "ref": {}, "val": {}},
        "previous_model_locs": [],
        "model_loc": {"storage_type": "filesystem", "key": str(root / "m.pkl"), "bucket_name": None},
        "valresult_loc": {"storage_type": "filesystem", "key": str(root / "v.json"), "bucket_name": None},
    }
    return json.dumps({"task_name": "train_classifier", "tasks": [task]})


def test_unregistered_trainer_is_refused_over_grpc_and_never_imported(client, tmp_path, trap_module):
    name, marker = trap_module
    for trainer in (f"{name}.Trainer", "this.Zen"):
        with pytest.raises(grpc.RpcError) as err:
            list(client.train_classifier(_train_request(tmp_path, trainer)))
        assert err.value.code() == Code.INVALID_ARGUMENT
        assert f"unknown trainer {trainer!r}" in err.value.details()
    for job in (
        _train_job(tmp_path, {"class_path": f"{name}.Trainer"}),
        _train_job(tmp_path, f"{name}.Trainer"),
        _train_job(tmp_path, f"{name}.Trainer", field="trainer_name"),
        _train_job(tmp_path, {"class_path": "this.Zen"}),
    ):
        with pytest.raises(grpc.RpcError) as err:
            client.run_job(job)
        assert err.value.code() == Code.INVALID_ARGUMENT, job
        assert "tasks[0].trainer" in err.value.details()
    assert not marker.exists()
    assert name not in sys.modules and "this" not in sys.modules
    assert client.health() == "SERVING"


def test_library_callers_keep_pyspacer_class_paths(trap_module):
    name, marker = trap_module
    with pytest.raises(TypeError, match="is not a ClassifierTrainer subclass"):
        trainer_factory(f"{name}.Trainer")
    assert marker.exists()  # pyspacer's behaviour: the class path was imported


def test_registered_trainer_resolves_without_import():
    class FastTrainer(MiniBatchTrainer):
        pass

    register_trainer_class("nowhere.FastTrainer", FastTrainer)
    assert type(trainer_factory("nowhere.FastTrainer")) is FastTrainer
    assert "nowhere" not in sys.modules
    from server.convert import check_trainer

    check_trainer("nowhere.FastTrainer")  # accepted: no error
    with pytest.raises(TypeError, match="not a ClassifierTrainer subclass"):
        register_trainer_class("x.Y", dict)


def test_hostile_classifier_pickle_is_refused_over_grpc(client, tmp_path):
    marker = tmp_path / "pwned"
    hostile = tmp_path / "hostile.pkl"

    class Payload:
        def __reduce__(self):
            import os

            return os.system, (f"touch {marker}",)

    hostile.write_bytes(pickle.dumps(Payload(), protocol=2))
    loc = {"storage_type": "filesystem", "key": str(hostile)}
    with pytest.raises(grpc.RpcError) as err:
        client.load_model(classifier_loc=loc)
    assert err.value.code() == Code.INVALID_ARGUMENT
    assert "hostile.pkl: refused to load classifier" in err.value.details()
    features = tmp_path / "f.featurevector"
    features.write_bytes(b"")
    job = JobMsg(
        "classify_features",
        [
            ClassifyFeaturesMsg(
                "cf", DataLocation("filesystem", str(features)), DataLocation("filesystem", str(hostile))
            )
        ],
    )
    reply = client.run_job(job.serialize())
    assert reply["ok"] is False
    assert not marker.exists()


def test_failed_job_reply_has_no_traceback(client, tmp_path, caplog):
    clf = make_classifier(tmp_path / "clf.pkl", feature_dim=8)
    missing = tmp_path / "absent.featurevector"
    job = JobMsg(
        "classify_features",
        [
            ClassifyFeaturesMsg(
                "cf-1", DataLocation("filesystem", str(missing)), DataLocation("filesystem", str(clf))
            )
        ],
    )
    with caplog.at_level(logging.ERROR, logger="server.security"):
        reply = client.run_job(job.serialize())
    message = reply["error_message"]
    assert reply["ok"] is False
    assert "Traceback" not in message and 'File "' not in message
    assert "site-packages" not in message and sys.prefix not in message
    assert message.startswith("StorageFileNotFoundError:") and "absent.featurevector" in message
    ref = message.rsplit("(ref ", 1)[1].split(";")[0]
    logged = [r.getMessage() for r in caplog.records if ref in r.getMessage()]
    assert logged and "Traceback" in logged[0] and "cf-1" in logged[0]


def test_redaction_removes_reprs_and_install_paths():
    import numpy

    text = (
        "Traceback (most recent call last):\n"
        f'  File "{numpy.__file__}", line 1, in <module>\n'
        "    boom()\n"
        "spacer_core.exceptions.URLDownloadError: cannot read <_io.BytesIO object at 0x7f3a2b1c> "
        f"from {numpy.__file__}\n"
    )
    out = redact_job_error(text)
    assert out.startswith("URLDownloadError: cannot read <BytesIO> from <server>")
    assert "0x7f" not in out and numpy.__file__ not in out and "Traceback" not in out
    # The client's own paths are kept: they name its input.
    assert redact("no file /data/reef/img.jpg") == "no file /data/reef/img.jpg"
