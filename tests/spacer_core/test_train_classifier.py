"""Trainers against pyspacer's MiniBatchTrainer on the same labels and feature files."""

from __future__ import annotations

import numpy as np
import pytest
import spacer.config as py_config
import spacer.messages as py_messages
import spacer.task_utils as py_task_utils
import spacer.train_classifier as py_train
from sklearn.linear_model import SGDClassifier

from spacer_core import config, train_utils
from spacer_core.data_classes import DataLocation, ValResults
from spacer_core.messages import TrainClassifierMsg, TrainClassifierReturnMsg
from spacer_core.task_utils import preprocess_labels
from spacer_core.train_classifier import ClassifierTrainer, MiniBatchTrainer, trainer_factory
from spacer_core.train_utils import make_random_data
from tests.spacer_core.test_train_utils import float32_features, pyspacer_labels

# make_random_data offsets int classes by their value: one noise sigma apart
# here, so accuracies stay below 100%.
INT_CLASSES = [1, 2, 3, 4]
STR_CLASSES = ["Acropora", "Porites", "Sand", "Turf"]


def _labels(folder, classes, seed, images=30, points=30, dim=10):
    rng = np.random.default_rng(seed)
    return make_random_data(images, classes, points, dim, DataLocation("filesystem", f"{folder}/"), rng=rng)


def _both_sets(labels):
    ours = preprocess_labels(labels)
    theirs = py_task_utils.preprocess_labels(pyspacer_labels(labels))
    return ours, theirs


@pytest.mark.slow
@pytest.mark.parametrize("clf_type", ["LR", "MLP"])
@pytest.mark.parametrize("classes", [INT_CLASSES, STR_CLASSES], ids=["int", "str"])
def test_same_classifier_as_pyspacer(tmp_path, clf_type, classes):
    ours_sets, py_sets = _both_sets(_labels(tmp_path, classes, seed=3))
    py_clf, py_val, py_msg = py_train.MiniBatchTrainer(batch_size=150)(py_sets, 3, [], clf_type)
    clf, val, msg = MiniBatchTrainer(batch_size=150)(ours_sets, 3, [], clf_type)

    assert clf.classes_.tolist() == py_clf.classes_.tolist() == sorted(classes)
    assert isinstance(val, ValResults) and isinstance(msg, TrainClassifierReturnMsg)
    assert val.classes == py_val.classes
    assert abs(msg.acc - py_msg.acc) <= 0.01
    # Same batches and seeds: the runs agree (MLPs up to BLAS rounding).
    assert msg.ref_accs == py_msg.ref_accs and len(msg.ref_accs) == 3
    assert val.gt == py_val.gt and val.est == py_val.est
    assert np.allclose(val.scores, py_val.scores, rtol=0, atol=1e-9)
    assert msg.pc_accs == [] and msg.runtime > 0
    ours_est = clf.calibrated_classifiers_[0].estimator
    py_est = py_clf.calibrated_classifiers_[0].estimator
    assert ours_est.get_params() == py_est.get_params()
    features = np.random.default_rng(0).standard_normal((5, 10)) + 2
    assert np.allclose(clf.predict_proba(features), py_clf.predict_proba(features), rtol=0, atol=1e-9)


def test_parallel_one_vs_rest_gives_the_same_lr(tmp_path, monkeypatch):
    ours_sets, py_sets = _both_sets(_labels(tmp_path, INT_CLASSES, seed=8))
    monkeypatch.setattr(train_utils, "PARALLEL_OVR_MIN_VALUES", 0)
    seen_jobs = []
    original = SGDClassifier.partial_fit

    def spy(self, *args, **kwargs):
        seen_jobs.append(self.n_jobs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SGDClassifier, "partial_fit", spy)
    clf, val, msg = MiniBatchTrainer(batch_size=200)(ours_sets, 2, [], "LR")
    monkeypatch.setattr(SGDClassifier, "partial_fit", original)
    py_clf, py_val, py_msg = py_train.MiniBatchTrainer(batch_size=200)(py_sets, 2, [], "LR")
    assert seen_jobs and all(jobs is not None and jobs > 1 for jobs in seen_jobs)
    assert msg.ref_accs == py_msg.ref_accs and val.est == py_val.est
    ours_est, py_est = clf.calibrated_classifiers_[0].estimator, py_clf.calibrated_classifiers_[0].estimator
    assert np.array_equal(ours_est.coef_, py_est.coef_)
    assert ours_est.n_jobs is None


def test_features_over_the_memory_budget_are_file_backed(tmp_path, monkeypatch):
    labels = float32_features(tmp_path, 25, 20, 6, seed=9)
    ours_sets, _ = _both_sets(labels)
    in_memory = MiniBatchTrainer(batch_size=100)(ours_sets, 2, [], "LR")
    monkeypatch.setattr(train_utils, "FEATURE_MEMORY_BUDGET", 0)
    assert isinstance(train_utils.load_labelled_features(ours_sets.train).x, np.memmap)
    spilled = MiniBatchTrainer(batch_size=100)(ours_sets, 2, [], "LR")
    assert spilled[2].ref_accs == in_memory[2].ref_accs
    assert spilled[1].est == in_memory[1].est and spilled[1].scores == in_memory[1].scores


def test_float32_features_and_config_batch_size(tmp_path, monkeypatch):
    labels = float32_features(tmp_path, 25, 20, 6, seed=4)
    ours_sets, py_sets = _both_sets(labels)
    monkeypatch.setattr(config, "TRAINING_BATCH_LABEL_COUNT", 64)
    _, val, msg = MiniBatchTrainer()(ours_sets, 2, [], "MLP")
    _, py_val, py_msg = py_train.MiniBatchTrainer(batch_size=64)(py_sets, 2, [], "MLP")
    assert msg.ref_accs == py_msg.ref_accs
    assert val.est == py_val.est and msg.acc == py_msg.acc
    # A different batch size gives a different fit: the setting is used.
    _, _, other = py_train.MiniBatchTrainer(batch_size=500)(py_sets, 2, [], "MLP")
    assert other.ref_accs != msg.ref_accs


def test_previous_models_scored_on_val_like_pyspacer(tmp_path):
    ours_sets, py_sets = _both_sets(_labels(tmp_path, INT_CLASSES, seed=5))
    previous = [
        py_train.MiniBatchTrainer()(py_sets, epochs, [], clf_type)[0]
        for epochs, clf_type in ((1, "LR"), (2, "MLP"))
    ]
    _, _, py_msg = py_train.MiniBatchTrainer()(py_sets, 2, previous, "LR")
    _, _, msg = MiniBatchTrainer()(ours_sets, 2, previous, "LR")
    assert msg.pc_accs == py_msg.pc_accs and len(msg.pc_accs) == 2


def test_progress_callback(tmp_path):
    sets, _ = _both_sets(_labels(tmp_path, INT_CLASSES, seed=6, images=20, points=10))
    seen = []
    _, _, msg = MiniBatchTrainer()(sets, 4, [], "LR", progress=lambda *args: seen.append(args))
    assert [epoch for epoch, _, _ in seen] == [0, 1, 2, 3]
    assert [acc for _, acc, _ in seen] == msg.ref_accs


def test_unknown_classifier_type(tmp_path):
    sets, _ = _both_sets(_labels(tmp_path, INT_CLASSES, seed=6, images=20, points=10))
    with pytest.raises(ValueError, match="Unknown clf_type 'SVM'"):
        MiniBatchTrainer()(sets, 1, [], "SVM")


def test_trainer_factory_forms():
    assert trainer_factory("minibatch") == MiniBatchTrainer()
    assert isinstance(trainer_factory("spacer_core.train_classifier.MiniBatchTrainer"), MiniBatchTrainer)
    # pyspacer's class path resolves to ours.
    assert isinstance(trainer_factory("spacer.train_classifier.MiniBatchTrainer"), MiniBatchTrainer)
    custom = MiniBatchTrainer(batch_size=10)
    assert trainer_factory(custom) is custom
    with pytest.raises(TypeError, match="is not a ClassifierTrainer subclass"):
        trainer_factory("collections.OrderedDict")
    with pytest.raises(ModuleNotFoundError):
        trainer_factory("no_such_module.Trainer")
    with pytest.raises(ValueError, match="Unknown trainer 'gradient'"):
        trainer_factory("gradient")
    with pytest.raises(TypeError, match="got int"):
        trainer_factory(3)  # type: ignore[arg-type]


def test_serialize_round_trip_and_pyspacer_json():
    trainer = MiniBatchTrainer(batch_size=100, mlp_hidden_layer_sizes=(50, 20), sgd_average=False)
    data = trainer.serialize()
    # pyspacer's class path, so pyspacer reads the messages we write.
    assert data == {
        "class_path": "spacer.train_classifier.MiniBatchTrainer",
        "batch_size": 100,
        "mlp_hidden_layer_sizes": [50, 20],
        "sgd_average": False,
    }
    assert ClassifierTrainer.deserialize(data) == trainer
    assert MiniBatchTrainer().serialize() == {"class_path": "spacer.train_classifier.MiniBatchTrainer"}
    theirs = py_train.ClassifierTrainer.deserialize(data)
    assert type(theirs) is py_train.MiniBatchTrainer
    assert (theirs.batch_size, list(theirs.mlp_hidden_layer_sizes), theirs.sgd_average) == (
        100,
        [50, 20],
        False,
    )
    # What pyspacer writes for its trainers loads here.
    py_json = py_train.MiniBatchTrainer(mlp_learning_rate_init=0.01).serialize()
    assert ClassifierTrainer.deserialize(py_json) == MiniBatchTrainer(mlp_learning_rate_init=0.01)
    assert trainer != MiniBatchTrainer()


def test_messages_resolve_trainers_through_the_factory():
    msg = py_messages.TrainClassifierMsg.example()
    data = msg.serialize()
    ours = TrainClassifierMsg.deserialize(data)
    assert ours.trainer == MiniBatchTrainer()
    legacy = dict(data)
    legacy["trainer_name"] = "minibatch"
    del legacy["trainer"]
    assert TrainClassifierMsg.deserialize(legacy).trainer == MiniBatchTrainer()
    assert py_config.TRAINING_BATCH_LABEL_COUNT == config.TRAINING_BATCH_LABEL_COUNT
