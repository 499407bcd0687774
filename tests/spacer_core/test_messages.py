"""spacer_core.messages: JSON compatible with pyspacer 0.14.0 both ways, and pyspacer 0.5.0's forms.

The 0.5.0 JSON under tests/fixtures/pyspacer050/ was written by pyspacer
0.5.0 itself (tests/fixtures/make_pyspacer050_messages.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import spacer.data_classes as ps_data
import spacer.messages as ps

from spacer_core import config
from spacer_core.data_classes import DataLocation, ImageFeatures, ImageLabels, InvalidDataError, ValResults
from spacer_core.messages import (
    ClassifyFeaturesMsg,
    ClassifyImageMsg,
    ClassifyReturnMsg,
    ExtractFeaturesMsg,
    ExtractFeaturesReturnMsg,
    JobMsg,
    JobReturnMsg,
    TrainClassifierMsg,
    TrainClassifierReturnMsg,
    TrainingTaskLabels,
    split_legacy_train_labels,
)

FIXTURES_050 = Path(__file__).parents[1] / "fixtures" / "pyspacer050"

# (ours, pyspacer's) pairs of every message class with example().
PAIRS = [
    (ExtractFeaturesMsg, ps.ExtractFeaturesMsg),
    (ExtractFeaturesReturnMsg, ps.ExtractFeaturesReturnMsg),
    (TrainClassifierMsg, ps.TrainClassifierMsg),
    (TrainClassifierReturnMsg, ps.TrainClassifierReturnMsg),
    (ClassifyFeaturesMsg, ps.ClassifyFeaturesMsg),
    (ClassifyImageMsg, ps.ClassifyImageMsg),
    (ClassifyReturnMsg, ps.ClassifyReturnMsg),
    (JobMsg, ps.JobMsg),
    (JobReturnMsg, ps.JobReturnMsg),
    (TrainingTaskLabels, ps.TrainingTaskLabels),
]
IDS = [ours.__name__ for ours, _ in PAIRS]


def as_json(obj: Any) -> Any:
    """What goes over the wire: tuples become lists, key order kept."""
    return json.loads(json.dumps(obj.serialize()))


def _without_trainer(data: Any) -> Any:
    # Trainer class paths name each library's own class; compared separately.
    if isinstance(data, dict):
        return {k: _without_trainer(v) for k, v in data.items() if k != "trainer"}
    if isinstance(data, list):
        return [_without_trainer(v) for v in data]
    return data


@pytest.mark.parametrize(("ours", "theirs"), PAIRS, ids=IDS)
def test_pyspacer_json_reads_and_writes_back_identically(ours, theirs):
    their_json = as_json(theirs.example())
    msg = ours.deserialize(their_json)
    assert _without_trainer(as_json(msg)) == _without_trainer(their_json)
    # And it survives our own round trip.
    assert as_json(ours.deserialize(as_json(msg))) == as_json(msg)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [p for p in PAIRS if p[0] not in (TrainClassifierMsg, TrainingTaskLabels)],
    ids=[i for p, i in zip(PAIRS, IDS) if p[0] not in (TrainClassifierMsg, TrainingTaskLabels)],
)
def test_pyspacer_reads_our_json(ours, theirs):
    our_json = as_json(ours.example())
    assert as_json(theirs.deserialize(our_json)) == our_json


def test_pyspacer_reads_our_training_message():
    our_json = as_json(TrainClassifierMsg.example())
    assert as_json(ps.TrainClassifierMsg.deserialize(our_json)) == our_json


def test_training_labels_read_by_pyspacer():
    our_json = as_json(TrainingTaskLabels.example())
    assert as_json(ps.TrainingTaskLabels.deserialize(our_json)) == our_json


def test_trainer_resolution():
    from spacer_core.train_classifier import MiniBatchTrainer

    their_json = as_json(ps.TrainClassifierMsg.example())
    assert their_json["trainer"] == {"class_path": "spacer.train_classifier.MiniBatchTrainer"}
    assert isinstance(TrainClassifierMsg.deserialize(their_json).trainer, MiniBatchTrainer)
    # pyspacer 0.14 still accepts 0.5.0's trainer_name in an otherwise new message.
    renamed = dict(their_json)
    del renamed["trainer"]
    renamed["trainer_name"] = "minibatch"
    assert isinstance(TrainClassifierMsg.deserialize(renamed).trainer, MiniBatchTrainer)
    msg = TrainClassifierMsg.example()
    assert isinstance(msg.trainer, MiniBatchTrainer)


def test_extractor_fields_use_pyspacer_class_paths():
    data = as_json(ps.ExtractFeaturesMsg.example())
    assert data["extractor"]["class_path"] == "spacer.extractors.efficientnet.EfficientNetExtractor"
    msg = ExtractFeaturesMsg.deserialize(data)
    from spacer_core.extractors import EfficientNetExtractor

    assert isinstance(msg.extractor, EfficientNetExtractor)
    assert msg.rowcols == [(100, 100)]


def test_extract_message_checks():
    loc = DataLocation("memory", "im.jpg")
    with pytest.raises(InvalidDataError, match="rowcols entry is empty"):
        ExtractFeaturesMsg("t", None, [], loc, DataLocation("memory", "f"))  # type: ignore[arg-type]
    with pytest.raises(AssertionError, match="Write not supported for 'url' storage type"):
        ExtractFeaturesMsg("t", None, [(1, 1)], loc, DataLocation("url", "http://h/f"))  # type: ignore[arg-type]
    data = as_json(ps.ExtractFeaturesMsg.example())
    data["rowcols"] = [[1, 2, 3]]
    with pytest.raises(
        InvalidDataError, match=r"job '123abc': each rowcols entry must be a \[row, col\] pair"
    ):
        ExtractFeaturesMsg.deserialize(data)


def test_unknown_task_name():
    with pytest.raises(InvalidDataError, match="Unknown task_name 'paint'"):
        JobMsg("paint", [])
    with pytest.raises(AssertionError, match="Unknown task_name"):
        JobMsg.deserialize({"task_name": "paint", "tasks": []})


def test_classify_return_lookup():
    msg = ClassifyReturnMsg.deserialize(as_json(ps.ClassifyReturnMsg.example()))
    assert msg[(20, 40)] == [0.9, 0.06, 0.04]
    assert msg.classes == [100, 12, 44]
    invalid = ClassifyReturnMsg(runtime=1.0, scores=[(0, 0, [1.0])], classes=[1], valid_rowcol=False)
    with pytest.raises(ValueError, match="requires valid rows and columns"):
        invalid[(0, 0)]


def test_failed_job_return_keeps_error_text():
    job = JobMsg.deserialize(as_json(ps.JobMsg.example()))
    failed = JobReturnMsg(original_job=job, ok=False, results=None, error_message="Traceback: boom")
    data = as_json(failed)
    assert data["results"] is None and data["error_message"] == "Traceback: boom"
    assert as_json(ps.JobReturnMsg.deserialize(data)) == data
    assert JobReturnMsg.deserialize(data).error_message == "Traceback: boom"


def test_training_task_labels_access():
    labels = TrainingTaskLabels.example()
    assert labels["val"] is labels.val
    with pytest.raises(KeyError):
        labels["test"]
    labels["ref"] = ImageLabels()
    assert labels.ref.label_count == 0
    assert labels.label_count == 16
    assert not labels.has_remote_data
    labels.set_filesystem_cache("/tmp/cache")
    assert labels.train.filesystem_cache == labels.val.filesystem_cache == "/tmp/cache"


def test_message_store_and_load(tmp_path):
    loc = DataLocation("filesystem", str(tmp_path / "job.json"))
    JobMsg.deserialize(as_json(ps.JobMsg.example())).store(loc)
    theirs = ps.JobMsg.load(ps_data.DataLocation("filesystem", loc.key))
    assert as_json(theirs) == as_json(JobMsg.load(loc))


# --- pyspacer 0.5.0 -----------------------------------------------------------------


def _load_050(name: str) -> Any:
    return json.loads((FIXTURES_050 / name).read_text())


@pytest.mark.parametrize(
    "name",
    [
        "job_extract_features.json",
        "job_classify_features.json",
        "job_classify_image.json",
        "job_train_classifier.json",
    ],
)
def test_050_jobs_deserialize(name):
    job = JobMsg.deserialize(_load_050(name))
    assert job.tasks
    # What we write back is the 0.14 form, which pyspacer 0.14 reads (bar trainer paths).
    again = JobMsg.deserialize(as_json(job))
    assert _without_trainer(as_json(again)) == _without_trainer(as_json(job))


def test_050_extractor_class_paths():
    from spacer_core.extractors import EfficientNetExtractor, VGG16CaffeExtractor

    raw = _load_050("job_extract_features.json")
    assert {t["extractor"]["class_path"] for t in raw["tasks"]} == {
        "spacer.extract_features.EfficientNetExtractor",
        "spacer.extract_features.VGG16CaffeExtractor",
    }
    job = JobMsg.deserialize(raw)
    kinds = [type(t.extractor) for t in job.tasks]
    assert kinds == [EfficientNetExtractor, VGG16CaffeExtractor, EfficientNetExtractor]
    first = job.tasks[0]
    assert first.extractor.data_locations["weights"] == DataLocation(
        "s3", "efficientnet_b0_ver1.pt", "coralnet-extractors"
    )
    assert first.extractor.data_hashes == {"weights": "c" * 64}
    assert first.rowcols == [(0, 20), (300, 400)]
    assert first.feature_loc == DataLocation("s3", "media/img0.jpg.featurevector", "coralnet-media")


def test_050_training_message_becomes_task_labels():
    raw = _load_050("job_train_classifier.json")["tasks"][0]
    msg = TrainClassifierMsg.deserialize(raw)
    assert msg.clf_type == "MLP" and msg.nbr_epochs == 5
    assert msg.feature_cache_dir == TrainClassifierMsg.FeatureCache.AUTO
    # Keys gain the storage type and bucket of 0.5.0's features_loc.
    all_train = {loc.key for loc in [*msg.labels.train.keys(), *msg.labels.ref.keys()]}
    assert all_train == set(raw["train_labels"]["data"])
    for loc in msg.labels.train.keys():
        assert (loc.storage_type, loc.bucket_name) == ("s3", "coralnet-features")
    # 0.5.0's rule: every 10th image (of 23) held out as the reference set.
    train_keys = list(raw["train_labels"]["data"])
    assert [loc.key for loc in msg.labels.ref.keys()] == train_keys[::10]
    assert len(msg.labels.train) == 20
    assert [loc.key for loc in msg.labels.val.keys()] == list(raw["val_labels"]["data"])
    first_val = next(iter(msg.labels.val.keys()))
    assert msg.labels.val[first_val] == [(5, 5, 1), (50, 60, 2)]
    assert msg.previous_model_locs == [DataLocation("s3", "classifiers/6.model", "coralnet-features")]


def test_050_reference_set_capped_by_batch_size():
    labels = ImageLabels(
        {DataLocation("memory", f"i{i}"): [(r, 0, r % 2) for r in range(40)] for i in range(100)}
    )
    train, ref = split_legacy_train_labels(labels, batch_label_count=120)
    # 10 candidates (every 10th of 100), at most 120 // 40 = 3 images.
    assert [loc.key for loc in ref.keys()] == ["i0", "i10", "i20"]
    assert len(train) == 97 and not set(train.keys()) & set(ref.keys())


def test_050_uses_configured_batch_size(monkeypatch):
    raw = _load_050("job_train_classifier.json")["tasks"][0]
    monkeypatch.setattr(config, "TRAINING_BATCH_LABEL_COUNT", 6)
    msg = TrainClassifierMsg.deserialize(raw)
    # 3 points per image: at most 2 reference images.
    assert len(msg.labels.ref) == 2 and len(msg.labels.train) == 21


@pytest.mark.parametrize(
    ("name", "result_type"),
    [
        ("return_classify_image.json", ClassifyReturnMsg),
        ("return_extract_features.json", ExtractFeaturesReturnMsg),
        ("return_train_classifier.json", TrainClassifierReturnMsg),
    ],
)
def test_050_job_returns(name, result_type):
    ret = JobReturnMsg.deserialize(_load_050(name))
    assert ret.ok and ret.error_message is None
    assert [type(r) for r in ret.results] == [result_type]


def test_050_failed_return():
    ret = JobReturnMsg.deserialize(_load_050("return_classify_image_failed.json"))
    assert not ret.ok and ret.results is None and ret.error_message.endswith("ValueError: boom")
    scores = JobReturnMsg.deserialize(_load_050("return_classify_image.json")).results[0]
    assert scores[(3, 4)] == [0.5, 0.5] and scores.classes == [11, 22]


def test_050_feature_file_and_valresult():
    feats = ImageFeatures.load(DataLocation("filesystem", str(FIXTURES_050 / "img.featurevector")))
    expected = json.loads((FIXTURES_050 / "img.featurevector.expected.json").read_text())
    assert feats.valid_rowcol and feats.npoints == 3
    for row, col, vector in expected:
        np.testing.assert_array_equal(feats[(row, col)], vector)
    val = ValResults.load(DataLocation("filesystem", str(FIXTURES_050 / "valresult.json")))
    assert val.classes == [11, 22] and val.est == [1, 1]
