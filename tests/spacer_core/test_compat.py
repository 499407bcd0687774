"""Drop-in use for pyspacer code: public API coverage, the `spacer` import alias, 0.5.0's examples.

The installed pyspacer 0.14.0 is the oracle for which names must exist.
Programs run in subprocesses through `python -m spacer_core.compat`, where
the real pyspacer is importable too, so the alias must win over it.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import inspect
import os
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spacer_core.data_classes import DataLocation, ImageFeatures, ImageLabels
from spacer_core.messages import TrainClassifierMsg
from spacer_core.testing import make_classifier, make_weights

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "tests" / "fixtures" / "pyspacer050" / "examples"

spacer = pytest.importorskip("spacer")

# pyspacer 0.14.0 public names this library deliberately lacks, and why
# (fnmatch patterns over "module.Name.attribute"; docs/migration.md lists them too).
DELIBERATE_GAPS = {
    "spacer.*.patches_to_features": "pyspacer's per-extractor hook from cropped patches to features; here patches are cropped"
    " straight into the network's input batch and run by the runtime's batcher",
    "spacer.storage.ClassifierUnpickler.IMPORT_MAPPING": "internals of pyspacer's pickle loader; ours maps the same old module names with its own restricted"
    " unpickler",
    "spacer.storage.ClassifierUnpickler.patch_estimator": "as IMPORT_MAPPING",
    "spacer.extractors.vgg16.load_net": "returns a caffe.Net that callers drive with Caffe's API; without Caffe there is no such object"
    " (vgg16.build_vgg16_network builds the PyTorch equivalent)",
    "spacer.mailman.get_s3_resource": "mailman's own import of aws.get_s3_resource, not part of its interface; import it from spacer.aws",
}


def _deliberate(full: str) -> bool:
    return any(fnmatch.fnmatchcase(full, pattern) for pattern in DELIBERATE_GAPS)


# Public pyspacer callables whose signature differs here on purpose, and why
# (fnmatch patterns as above). Everything else must take pyspacer's parameters:
# the same names and kinds, positionals in the same places, the same defaults;
# parameters of our own may only follow them, optional (`_signature_changes`).
SIGNATURE_DIFFERENCES = {
    "spacer.config.get_config_value": "the 'no default' marker is a private sentinel, not the string 'NO_DEFAULT', so that"
    " no real default value can be mistaken for it",
    "spacer.*.TrainClassifierMsg": "also takes pyspacer 0.5.0's keywords (trainer_name, train_labels, val_labels,"
    " features_loc), so pyspacer's own parameters became optional; a message still needs one set or the other",
    "spacer.train_classifier.MiniBatchTrainer": "batch_size None reads config.TRAINING_BATCH_LABEL_COUNT when training"
    " starts, so the setting applies (it is 5000 unless set, pyspacer's default)",
    "spacer.train_classifier.trainer_factory": "takes a trainer instance as well as a name or class path, so the"
    " parameter is `trainer`; every pyspacer caller passes it by position",
    "spacer.storage.*Storage.delete": "one parameter name, `key`, for every store (pyspacer said path or url by"
    " store); pyspacer and its callers pass it by position",
    "spacer.storage.*Storage.exists": "as delete",
    "spacer.storage.URLStorage.store": "as delete",
    "spacer.storage.ClassifierUnpickler": "pyspacer's forwards *args/**kwargs to pickle.Unpickler; ours names"
    " pickle.Unpickler's own parameters",
    "spacer.extractors.efficientnet.MBConvBlock": "built from channel counts, kernel, stride and expansion"
    " (EfficientNet builds every block); the parameter names of its state dict are pyspacer's",
    "spacer.extractors.efficientnet.MBConvBlock.forward": "inference only: no drop connect rate, which pyspacer"
    " applied only in training",
    "spacer.extractors.efficientnet.EfficientNet.forward": "the input is called x; torch modules are called with"
    " it by position",
}


def _same_default(theirs: object, ours: object) -> bool:
    if theirs is ours:
        return True
    try:
        if bool(theirs == ours):
            return True
    except Exception:  # arrays and other values without a truth value
        pass
    return repr(theirs).replace("spacer_core", "spacer") == repr(ours)


def _signature_changes(theirs: object, ours: object) -> list[str]:
    """How `ours` fails to accept pyspacer's calls of `theirs` with the same meaning ([] if it does)."""
    try:
        their_sig = inspect.signature(theirs)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return []  # nothing to compare against (a builtin)
    try:
        our_sig = inspect.signature(ours)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ["no signature here"]
    empty = inspect.Parameter.empty
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    their_params, our_params = list(their_sig.parameters.values()), list(our_sig.parameters.values())
    ours_by_name = {p.name: p for p in our_params}
    changes = []
    for index, param in enumerate(their_params):
        if param.kind in variadic:
            if not any(p.kind == param.kind for p in our_params):
                changes.append(f"no {param}")
            continue
        mine = ours_by_name.get(param.name)
        if mine is None:
            changes.append(f"no parameter {param.name!r}")
            continue
        if param.kind in positional and (our_params.index(mine) != index or mine.kind != param.kind):
            changes.append(
                f"{param.name!r} is {mine.kind.description} #{our_params.index(mine)}, was #{index}"
            )
        elif param.kind == inspect.Parameter.KEYWORD_ONLY and mine.kind not in (
            inspect.Parameter.KEYWORD_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            changes.append(f"{param.name!r} cannot be passed by keyword")
        if (param.default is empty) != (mine.default is empty) or (
            param.default is not empty and not _same_default(param.default, mine.default)
        ):
            was, now = (repr(d) if d is not empty else "required" for d in (param.default, mine.default))
            changes.append(f"{param.name!r} defaults to {now}, was {was}")
    their_names = {p.name for p in their_params}
    for mine in our_params:
        if mine.name not in their_names and mine.kind not in variadic and mine.default is empty:
            changes.append(f"new required parameter {mine.name!r}")
    return changes


def _pyspacer_object(module_name: str, dotted: str) -> object:
    found: object = importlib.import_module(module_name)
    for part in filter(None, dotted.split(".")):
        found = getattr(found, part)
    return found


def _signature_report(names: list[tuple[str, str]]) -> dict[str, list[str]]:
    """{full name: changes} for every pyspacer function, class and method present here whose signature differs."""
    report = {}
    for module_name, dotted in names:
        theirs = _pyspacer_object(module_name, dotted)
        if not (inspect.isroutine(theirs) or inspect.isclass(theirs)):
            continue
        try:
            ours = _ours(module_name, dotted)
        except (ImportError, AttributeError):
            continue  # reported (or listed) as missing
        changes = _signature_changes(theirs, ours)
        if changes:
            report[f"{module_name}.{dotted}"] = changes
    return report


def _signature_deliberate(full: str) -> bool:
    return any(fnmatch.fnmatchcase(full, pattern) for pattern in SIGNATURE_DIFFERENCES)


# Underscore helpers that pyspacer's own tests call, compared like public names.
PRIVATE_NAMES_USED_BY_PYSPACERS_TESTS: list[tuple[str, str]] = [
    ("spacer.extractors.efficientnet", "EfficientNet._check_model_name_is_valid"),
    ("spacer.train_classifier", "MiniBatchTrainer._train"),
]


def _pyspacer_modules() -> list[str]:
    """Every public pyspacer module, subpackages' modules included."""
    # Without the prefix walk_packages reports bare names and does not descend
    # into subpackages (spacer.extractors.*).
    walked = [m.name for m in pkgutil.walk_packages(spacer.__path__, prefix="spacer.")]
    return ["spacer"] + [name for name in walked if not any(part.startswith("_") for part in name.split("."))]


def _public_names() -> list[tuple[str, str]]:
    """(pyspacer module, dotted name) for every public module-level name and class attribute.

    A module itself is listed with the dotted name "" so that a missing module
    is reported, not skipped.
    """
    found = []
    for module_name in _pyspacer_modules():
        module = importlib.import_module(module_name)  # spacer.mailman needs `fire` (a test extra)
        found.append((module_name, ""))
        for name, obj in vars(module).items():
            if name.startswith("_") or type(obj).__module__.startswith("django") or inspect.ismodule(obj):
                continue
            if not (getattr(obj, "__module__", None) or "spacer").startswith("spacer"):
                continue  # a third-party name pyspacer imported
            found.append((module_name, name))
            if inspect.isclass(obj):
                found += [(module_name, f"{name}.{attr}") for attr in dir(obj) if not attr.startswith("_")]
    return found + [(module, name) for module, name in PRIVATE_NAMES_USED_BY_PYSPACERS_TESTS]


def _ours(module_name: str, dotted: str) -> object:
    """Our counterpart of pyspacer's `module_name`.`dotted` (spacer.X -> spacer_core.X); raises if absent."""
    ours: object = importlib.import_module("spacer_core" + module_name[len("spacer") :])
    for part in filter(None, dotted.split(".")):
        ours = getattr(ours, part)
    return ours


def test_every_public_pyspacer_name_exists_here():
    names = _public_names()
    modules = {module for module, _ in names}
    assert {"spacer.extractors.efficientnet_utils", "spacer.extractors.vgg16", "spacer.mailman"} <= modules
    assert len(names) > 500  # the walk really covered pyspacer, subpackages included
    missing = []
    for module_name, dotted in names:
        full = f"{module_name}.{dotted}".rstrip(".")
        try:
            _ours(module_name, dotted)
        except (ImportError, AttributeError):
            if not _deliberate(full):
                missing.append(full)
    assert missing == []
    # A name that exists must still take pyspacer's calls: parameter names, kinds and defaults.
    changed = {
        full: changes for full, changes in _signature_report(names).items() if not _signature_deliberate(full)
    }
    assert changed == {}


def test_deliberate_gaps_are_real_pyspacer_names_still_missing_here():
    # A stale entry would hide a regression: each pattern must match names
    # pyspacer has, and none of them may exist here.
    names = _public_names()
    for pattern in DELIBERATE_GAPS:
        matched = [
            (module, dotted)
            for module, dotted in names
            if fnmatch.fnmatchcase(f"{module}.{dotted}".rstrip("."), pattern)
        ]
        assert matched, pattern
        for module, dotted in matched:
            with pytest.raises(AttributeError):
                _ours(module, dotted)


def test_signature_differences_are_real_and_still_differ():
    # As for the gaps: every listed pattern must name a pyspacer callable whose
    # signature here still differs, so that a fixed difference leaves the list.
    report = _signature_report(_public_names())
    for pattern in SIGNATURE_DIFFERENCES:
        assert [full for full in report if fnmatch.fnmatchcase(full, pattern)], pattern


def test_signature_check_sees_changed_names_defaults_and_order():
    def theirs(a, b=1, *, c="x"):
        pass

    def same(a, b=1, *, c="x", d=None):
        pass

    def renamed(a, bb=1, *, c="x"):
        pass

    def new_default(a, b=2, *, c="x"):
        pass

    def swapped(b=1, a=None, *, c="x"):
        pass

    def new_required(a, b=1, *, c="x", d):
        pass

    assert _signature_changes(theirs, same) == []
    assert _signature_changes(theirs, renamed) == ["no parameter 'b'"]
    assert _signature_changes(theirs, new_default) == ["'b' defaults to 2, was 1"]
    assert _signature_changes(theirs, new_required) == ["new required parameter 'd'"]
    for changed in (renamed, new_default, swapped, new_required):
        assert _signature_changes(theirs, changed), changed.__name__


@pytest.mark.slow
def test_untrained_instance_extracts_1280_features():
    from spacer_core.extractors import EfficientNetExtractor

    extractor = EfficientNetExtractor.untrained_instance("compat-untrained")
    assert extractor.data_locations["weights"] == DataLocation("memory", "compat-untrained")
    features, _ = extractor(Image.new("RGB", (240, 240)), [(10, 20)])
    assert len(features.point_features[0].data) == 1280
    assert isinstance(
        EfficientNetExtractor.untrained_model(),
        type(
            EfficientNetExtractor.load_weights(
                __import__("io").BytesIO(extractor.resolve_data("weights").read())
            )
        ),
    )


def test_050_keywords_of_train_classifier_msg_resolve_bare_keys():
    msg = TrainClassifierMsg(
        job_token="t",
        trainer_name="minibatch",
        nbr_epochs=1,
        clf_type="LR",
        train_labels=ImageLabels(data={f"f{i}.fv": [(1, 2, i % 2)] for i in range(12)}),
        val_labels=ImageLabels(data={"v.fv": [(1, 2, 0)]}),
        features_loc=DataLocation("s3", "", bucket_name="b"),
        previous_model_locs=[],
        model_loc=DataLocation("memory", "m"),
        valresult_loc=DataLocation("memory", "v"),
    )
    assert list(msg.labels.val.keys()) == [DataLocation("s3", "v.fv", bucket_name="b")]
    # 0.5.0 held out every 10th image as the reference set.
    assert [loc.key for loc in msg.labels.ref.keys()] == ["f0.fv", "f10.fv"]
    assert len(list(msg.labels.train.keys())) == 10
    assert all(loc.bucket_name == "b" for loc in msg.labels.train.keys())


def _raised(call) -> BaseException:
    try:
        call()
    except Exception as err:  # the oracle's exception, whatever its type
        return err
    raise AssertionError("no exception raised")


def _job_with_task_name(job_msg_class, name: str):
    # Both libraries refuse an unknown name when building a JobMsg, so set it after.
    job = job_msg_class.example()
    job.task_name = name
    return job


@pytest.mark.parametrize(
    "case",
    [
        "not_a_job",
        "unknown_task",
        "unknown_storage",
        "missing_trainer_class",
        "missing_trainer_module",
        "not_a_trainer",
    ],
)
def test_errors_are_also_what_pyspacer_raised(case):
    import spacer.messages as ps_messages
    import spacer.storage as ps_storage
    import spacer.tasks as ps_tasks
    import spacer.train_classifier as ps_train

    from spacer_core import messages, storage, tasks, train_classifier
    from spacer_core.exceptions import InvalidInputError

    calls = {
        "not_a_job": (
            lambda: ps_tasks.process_job({"task_name": "x"}),
            lambda: tasks.process_job({"task_name": "x"}),
        ),
        "unknown_task": (
            lambda: ps_tasks.process_job(_job_with_task_name(ps_messages.JobMsg, "paint")),
            lambda: tasks.process_job(_job_with_task_name(messages.JobMsg, "paint")),
        ),
        "unknown_storage": (
            lambda: ps_storage.storage_factory("ftp"),
            lambda: storage.storage_factory("ftp"),
        ),
        "missing_trainer_class": (
            lambda: ps_train.trainer_factory("spacer.train_classifier.NoSuchTrainer"),
            lambda: train_classifier.trainer_factory("spacer_core.train_classifier.NoSuchTrainer"),
        ),
        "missing_trainer_module": (
            lambda: ps_train.trainer_factory("no_such_pkg.trainers.Mine"),
            lambda: train_classifier.trainer_factory("no_such_pkg.trainers.Mine"),
        ),
        "not_a_trainer": (
            lambda: ps_train.trainer_factory("spacer.data_classes.DataLocation"),
            lambda: train_classifier.trainer_factory("spacer_core.data_classes.DataLocation"),
        ),
    }
    theirs, ours = (_raised(call) for call in calls[case])
    assert isinstance(ours, type(theirs)), (type(ours).__mro__, type(theirs))
    assert isinstance(ours, InvalidInputError)  # and still our category, for the server's status codes
    assert str(ours)  # a sentence naming the input, where pyspacer's assert had none
    if case == "unknown_task":
        assert "paint" in str(ours)


def test_unknown_task_name_in_a_job_msg_is_an_assertion_error_as_in_pyspacer():
    import spacer.messages as ps_messages

    from spacer_core.exceptions import UnknownTaskError
    from spacer_core.messages import JobMsg

    theirs = _raised(lambda: ps_messages.JobMsg(task_name="paint", tasks=[]))
    ours = _raised(lambda: JobMsg(task_name="paint", tasks=[]))
    assert isinstance(ours, type(theirs)) and isinstance(ours, UnknownTaskError)


def _printed_objects(dc, msg) -> list:
    """The same data-class values built with one library's modules (``dc``: data_classes, ``msg``: messages)."""
    # One image: pprint orders unorderable keys (DataLocations) by memory
    # address, so several images print in no repeatable order, in pyspacer too.
    labels = dc.ImageLabels({dc.DataLocation("s3", "img1.fv", bucket_name="b"): [(1, 2, 3), (4, 5, 1)]})
    points = [dc.PointFeatures(row=r, col=r + 1, data=np.linspace(0, 1, 5) + r) for r in (3, 70)]
    objects = [
        dc.DataLocation("s3", "a/b.fv", bucket_name="bucket"),
        dc.DataLocation("url", "https://example.org/" + "x" * 90 + ".jpg"),
        dc.PointFeatures(row=3, col=4, data=[1.5, -2.0, 0.125]),
        dc.ImageFeatures(point_features=points, valid_rowcol=True, feature_dim=5, npoints=2),
        dc.ImageFeatures(
            point_features=[dc.PointFeatures(None, None, [0.25, 0.5])],
            valid_rowcol=False,
            feature_dim=2,
            npoints=1,
        ),
        labels,
        dc.ValResults(scores=[0.5, 0.75], gt=[1, 0], est=[1, 1], classes=[12, 40]),
        msg.ClassifyFeaturesMsg(
            job_token="j",
            feature_loc=dc.DataLocation("filesystem", "f.fv"),
            classifier_loc=dc.DataLocation("memory", "c.pkl"),
        ),
        msg.ClassifyReturnMsg(runtime=1.5, scores=[(1, 2, [0.25, 0.75])], classes=[3, 4], valid_rowcol=True),
        msg.TrainClassifierReturnMsg(acc=0.5, pc_accs=[0.25], ref_accs=[0.1, 0.2], runtime=3.0),
    ]
    for name in (
        "ExtractFeaturesMsg",
        "ClassifyImageMsg",
        "JobMsg",
        "JobReturnMsg",
        "ExtractFeaturesReturnMsg",
    ):
        objects.append(getattr(msg, name).example())
    train_msg = msg.TrainClassifierMsg.example()
    train_msg.labels = type(train_msg.labels)(train=labels, ref=labels, val=labels)
    objects.append(train_msg)
    return objects


def test_repr_and_str_of_data_classes_print_as_pyspacer_prints_them():
    import spacer.data_classes as ps_dc
    import spacer.messages as ps_msg

    from spacer_core import data_classes, messages

    theirs, ours = _printed_objects(ps_dc, ps_msg), _printed_objects(data_classes, messages)
    assert len(ours) == len(theirs) == 16
    for mine, oracle in zip(ours, theirs):
        assert type(mine).__name__ == type(oracle).__name__
        assert repr(mine) == repr(oracle), type(mine).__name__
        assert str(mine) == str(oracle), type(mine).__name__
    assert (
        repr(ours[2]) == "{'col': 4, 'data': array([ 1.5  , -2.   ,  0.125]), 'row': 3}"
    )  # what a person reads: the values


def _aws_check_output(package: str, env: dict[str, str], cwd: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-c", f"import {package}.aws as a; a.aws_check()"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("anonymous", [False, True])
def test_aws_check_prints_pyspacers_lines(moto_server, tmp_path, anonymous):
    from tests.support.s3 import ACCESS_KEY, REGION, SECRET_KEY

    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPACER_", "AWS_"))}
    env.update(
        PYTHONPATH=str(ROOT),
        SPACER_AWS_ACCESS_KEY_ID=ACCESS_KEY,
        SPACER_AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        SPACER_AWS_REGION=REGION,
        AWS_ENDPOINT_URL_STS=moto_server,  # boto's own variable: both libraries
        AWS_DEFAULT_REGION=REGION,
        AWS_CONFIG_FILE=str(tmp_path / "absent-config"),
    )
    if anonymous:
        env["SPACER_AWS_ANONYMOUS"] = "True"
    theirs, ours = (_aws_check_output(package, env, tmp_path) for package in ("spacer", "spacer_core"))
    assert ours == theirs
    if not anonymous:
        assert "Spacer config - AWS_ACCESS_KEY_ID: Yes\n" in ours and "Identified as ARN: arn:aws:" in ours
        assert SECRET_KEY not in ours


@pytest.mark.parametrize("points_per_image", [2, 9])
def test_make_random_data_matches_pyspacer_after_the_same_seeds(points_per_image):
    import random

    import spacer.data_classes as ps_dc
    import spacer.train_utils as ps_train_utils

    from spacer_core import data_classes, train_utils

    classes = [3, 8, 12, 40, 41]  # more classes than points in the first case: pyspacer grows the list
    made = []
    for dc, module in ((ps_dc, ps_train_utils), (data_classes, train_utils)):
        random.seed(11)
        np.random.seed(11)
        labels = module.make_random_data(4, classes, points_per_image, 6, dc.DataLocation("memory", ""))
        made.append([(loc.key, labels[loc], dc.ImageFeatures.load(loc)) for loc in labels.keys()])
    theirs, ours = made
    assert [(key, annotations) for key, annotations, _ in ours] == [
        (key, annotations) for key, annotations, _ in theirs
    ]
    for (_, annotations, mine), (_, _, oracle) in zip(ours, theirs):
        assert len(annotations) == mine.npoints == max(points_per_image, len(classes))
        assert {label for _, _, label in annotations} == set(classes)
        assert np.array_equal(
            np.stack([pf.data for pf in mine.point_features]),
            np.stack([pf.data for pf in oracle.point_features]),
        )


def test_minibatch_trainer_train_step_matches_pyspacers(tmp_path):
    import spacer.data_classes as ps_dc
    import spacer.train_classifier as ps_train

    from spacer_core.train_classifier import MiniBatchTrainer
    from spacer_core.train_utils import make_random_data

    labels = make_random_data(
        8, [1, 2, 3], 12, 16, DataLocation("filesystem", f"{tmp_path}/"), rng=np.random.default_rng(4)
    )
    locs = list(labels.keys())
    ours_sets = [ImageLabels({loc: labels[loc] for loc in part}) for part in (locs[:6], locs[6:])]
    theirs_sets = [
        ps_dc.ImageLabels({ps_dc.DataLocation("filesystem", loc.key): labels[loc] for loc in part})
        for part in (locs[:6], locs[6:])
    ]

    clf, ref_accs = MiniBatchTrainer(batch_size=30)._train(*ours_sets, 3, "LR")
    oracle, oracle_accs = ps_train.MiniBatchTrainer(batch_size=30)._train(*theirs_sets, 3, "LR")
    assert len(ref_accs) == 3 and ref_accs == oracle_accs
    ref_x = np.stack(
        [ImageFeatures.load(loc).get_array((r, c))[0] for loc in locs[6:] for r, c, _ in labels[loc]]
    )
    assert np.array_equal(clf.predict_proba(ref_x), oracle.predict_proba(ref_x))


# --- spacer.extractors.*: our helpers against pyspacer's ---------------------------------

_MODEL_NAMES = [f"efficientnet-b{i}" for i in range(8)]


def test_efficientnet_utils_scaling_and_tables_match_pyspacers():
    import spacer.extractors.efficientnet_utils as theirs

    from spacer_core.extractors import efficientnet_utils as ours

    for name in _MODEL_NAMES:
        assert ours.efficientnet_params(name) == theirs.efficientnet_params(name)
        for override in (None, {"num_classes": 1275}, {"dropout_rate": 0.0, "image_size": 256}):
            mine, oracle = ours.get_model_params(name, override), theirs.get_model_params(name, override)
            assert mine == oracle and type(mine[1]).__name__ == type(oracle[1]).__name__
            params = mine[1]
            for filters in (16, 24, 32, 40, 80, 112, 192, 320, 1280):
                assert ours.round_filters(filters, params) == theirs.round_filters(filters, params)
            for repeats in (1, 2, 3, 4):
                assert ours.round_repeats(repeats, params) == theirs.round_repeats(repeats, params)
    # The cases pyspacer's own tests pin: no width coefficient, and a divisor of 32.
    unscaled = ours.GlobalParams(width_coefficient=None, depth_divisor=8)
    assert ours.round_filters(32, unscaled) == theirs.round_filters(32, unscaled) == 32
    coarse = ours.GlobalParams(width_coefficient=1, depth_divisor=32)
    assert ours.round_filters(40, coarse) == theirs.round_filters(40, coarse) == 64
    assert ours.round_repeats(8, ours.GlobalParams(depth_coefficient=None)) == 8
    assert ours.GlobalParams() == theirs.GlobalParams() and ours.BlockArgs() == theirs.BlockArgs()
    assert ours.efficientnet(1.0, 1.0, image_size=224) == theirs.efficientnet(1.0, 1.0, image_size=224)


def test_block_decoder_matches_pyspacers_and_round_trips():
    import collections

    from spacer.extractors.efficientnet_utils import BlockDecoder as Theirs

    from spacer_core.extractors.efficientnet_utils import B0_BLOCK_STRINGS, BlockDecoder

    strings = list(B0_BLOCK_STRINGS) + ["r2_k5_s11_e4_i8_o8_noskip", "r1_k3_s2_e1_i4_o4_se0.5"]
    assert BlockDecoder.decode(strings) == Theirs.decode(strings)
    # pyspacer's encode reads `strides` (its test builds such tuples); ours takes that or `stride`.
    with_strides = collections.namedtuple(
        "BlockArgs",
        [
            "kernel_size",
            "num_repeat",
            "input_filters",
            "output_filters",
            "expand_ratio",
            "id_skip",
            "strides",
            "se_ratio",
        ],
    )
    block = with_strides(3, 1, 32, 16, 1, False, (1, 1), 0.25)
    assert BlockDecoder.encode([block]) == Theirs.encode([block]) == ["r1_k3_s11_e1_i32_o16_se0.25_noskip"]
    assert BlockDecoder.encode(BlockDecoder.decode(strings[:-1])) == strings[:-1]


@pytest.mark.parametrize("case", ["model_family", "model_size", "model_name", "stride", "not_a_list"])
def test_efficientnet_helpers_refuse_as_pyspacer_does(case):
    import spacer.extractors.efficientnet as ps_net
    import spacer.extractors.efficientnet_utils as ps_utils

    from spacer_core.exceptions import InvalidInputError
    from spacer_core.extractors import efficientnet as net
    from spacer_core.extractors import efficientnet_utils as utils

    calls = {
        "model_family": lambda u, n: u.get_model_params("resnet-50", None),
        "model_size": lambda u, n: u.efficientnet_params("efficientnet-b9"),
        "model_name": lambda u, n: n.EfficientNet._check_model_name_is_valid("dummy"),
        "stride": lambda u, n: u.BlockDecoder.decode(["r1_k3_s12_e1_i32_o16"]),
        "not_a_list": lambda u, n: u.BlockDecoder.decode("r1_k3_s11_e1_i32_o16"),
    }
    theirs, ours = _raised(lambda: calls[case](ps_utils, ps_net)), _raised(lambda: calls[case](utils, net))
    assert isinstance(ours, type(theirs)) and isinstance(ours, InvalidInputError)
    assert str(ours) and "Traceback" not in str(ours)
    if case in ("model_family", "model_size", "model_name"):
        assert {"model_family": "resnet-50", "model_size": "efficientnet-b9", "model_name": "dummy"}[
            case
        ] in str(ours)


def test_drop_connect_draws_as_pyspacers():
    import torch
    from spacer.extractors.efficientnet_utils import drop_connect as theirs

    from spacer_core.extractors.efficientnet_utils import drop_connect

    x = torch.rand(6, 4, 3, 3)
    assert drop_connect(x, 0.5, training=False) is x
    torch.manual_seed(5)
    mine = drop_connect(x, 0.5, training=True)
    torch.manual_seed(5)
    assert torch.equal(mine, theirs(x, p=0.5, training=True))
    assert {float(sample.abs().sum() == 0) for sample in mine} == {
        0.0,
        1.0,
    }  # some samples dropped, some kept
    assert torch.sum(drop_connect(x, 0.999, training=True)).item() == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("kernel, stride, size", [(3, 1, 9), (3, 2, 9), (5, 2, 10), (1, 1, 7), (5, 1, 8)])
def test_same_padding_convs_compute_as_pyspacers(kernel, stride, size):
    import spacer.extractors.efficientnet_utils as theirs
    import torch

    from spacer_core.extractors import efficientnet_utils as ours

    x = torch.rand(2, 3, size, size + 1)
    pairs = [
        (
            ours.Conv2dDynamicSamePadding(3, 4, kernel, stride=stride),
            theirs.Conv2dDynamicSamePadding(3, 4, kernel, stride=stride),
        ),
        (
            ours.get_same_padding_conv2d([size, size + 1])(3, 4, kernel, stride=stride),
            theirs.get_same_padding_conv2d([size, size + 1])(3, 4, kernel, stride=stride),
        ),
    ]
    for mine, oracle in pairs:
        mine.load_state_dict(oracle.state_dict())
        with torch.no_grad():
            assert torch.equal(mine(x), oracle(x))
        assert tuple(mine.stride) == tuple(oracle.stride) == (stride, stride)
    assert ours.get_same_padding_conv2d(None).__name__ == "Conv2dDynamicSamePadding"


@pytest.mark.slow
def test_efficientnet_class_loads_pyspacers_parameters_and_computes_the_same():
    import torch
    from spacer.extractors.efficientnet import EfficientNet as Theirs

    from spacer_core.exceptions import InvalidInputError
    from spacer_core.extractors.efficientnet import EfficientNet, EfficientNetExtractor
    from spacer_core.extractors.torch_extractors import TorchExtractor

    torch.manual_seed(0)
    oracle = Theirs.from_pretrained("efficientnet-b0", num_classes=1275).eval()
    mine = EfficientNet.from_pretrained("efficientnet-b0", num_classes=1275).eval()
    mine.load_state_dict(oracle.state_dict())  # strict: the same parameter names and shapes
    # Small patches keep this fast; both pad every conv as for 224 (static SAME padding).
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(mine.extract_features(x), oracle.extract_features(x), atol=1e-5)
        assert torch.allclose(mine(x), oracle(x), atol=1e-4)
        assert mine(x).shape == (2, 1275)
    assert (
        EfficientNet.from_name("efficientnet-b0")._fc.out_features
        == Theirs.from_name("efficientnet-b0")._fc.out_features
    )
    for name in _MODEL_NAMES:
        assert EfficientNet.get_image_size(name) == Theirs.get_image_size(name)
    with pytest.raises(InvalidInputError, match="Only EfficientNet-b0"):
        EfficientNet.from_name("efficientnet-b3")  # recognised, but only b0 is built here

    # The extractor's classmethods sit on TorchExtractor, as in pyspacer.
    assert issubclass(EfficientNetExtractor, TorchExtractor)
    with pytest.raises(NotImplementedError):
        TorchExtractor.untrained_model()
    buffer = __import__("io").BytesIO()
    torch.save({"net": {f"module.{k}": v for k, v in oracle.state_dict().items()}}, buffer)
    loaded = EfficientNetExtractor.load_weights(buffer)
    with torch.no_grad():
        assert torch.allclose(loaded(x), oracle.extract_features(x), atol=1e-5)


def test_transformation_converts_as_pyspacers():
    import torch
    from spacer.extractors.torch_extractors import transformation as theirs

    from spacer_core.extractors.torch_extractors import transformation

    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    inputs = [
        pixels,
        Image.fromarray(pixels),
        Image.fromarray(pixels[:, :, 0]),
        rng.random((4, 5, 3)).astype(np.float32),
    ]
    for item in inputs:
        mine, oracle = transformation()(item), theirs()(item)
        assert mine.dtype == oracle.dtype and torch.equal(mine, oracle)


def test_crop_helpers_cut_the_same_pixels_as_pyspacers():
    from spacer.extractors.utils import crop_patches as theirs
    from spacer.extractors.utils import crop_simple as theirs_simple

    from spacer_core.extractors.base import crop_patches
    from spacer_core.extractors.utils import crop_simple

    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (150, 210, 3), dtype=np.uint8)
    rowcols = [(0, 0), (149, 209), (75, 100), (3, 200), (120, 5)]
    for im in (Image.fromarray(rgb), Image.fromarray(rgb).convert("L")):
        mine, oracle = crop_patches(im, rowcols, 64), theirs(im, rowcols, 64)
        assert len(mine) == len(oracle) == len(rowcols)
        for a, b in zip(mine, oracle):
            assert a.shape == (64, 64, 3) and np.array_equal(a, b)
    assert np.array_equal(crop_simple(rgb, (80, 90), 33), theirs_simple(rgb, (80, 90), 33))


def test_vgg16_transformer_matches_pyspacers():
    from spacer.extractors.vgg16 import Transformer as Theirs

    from spacer_core.extractors.vgg16 import Transformer

    rng = np.random.default_rng(4)
    patch = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    for mean in ((0, 0, 0), (128, 128, 128), (104.0, 117.0, 123.0)):
        mine, oracle = Transformer(mean).preprocess(patch), Theirs(mean).preprocess(patch)
        assert mine.dtype == oracle.dtype == np.float32 and np.array_equal(mine, oracle)
        assert np.array_equal(Transformer(mean).deprocess(mine), Theirs(mean).deprocess(oracle.copy()))
    assert np.array_equal(
        Transformer((128, 128, 128)).deprocess(Transformer((128, 128, 128)).preprocess(patch)), patch
    )


def test_dummy_extractor_lives_in_base_and_keeps_its_other_paths():
    from spacer_core.extractors import DummyExtractor, base, dummy
    from spacer_core.extractors.base import FeatureExtractor

    assert base.DummyExtractor is dummy.DummyExtractor is DummyExtractor
    for path in ("spacer.extractors.base.DummyExtractor", "spacer_core.extractors.dummy.DummyExtractor"):
        restored = FeatureExtractor.deserialize({"class_path": path, "data_locations": {}, "feature_dim": 7})
        assert type(restored) is DummyExtractor and restored.feature_dim == 7


def _run(script: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), SPACER_EXTRACTORS_CACHE_DIR=str(cwd / "cache"))
    return subprocess.run(
        [sys.executable, "-m", "spacer_core.compat", str(script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.mark.slow
def test_alias_runs_a_pyspacer_program_although_pyspacer_is_installed(tmp_path):
    script = tmp_path / "program.py"
    script.write_text(
        textwrap.dedent("""
        import sys
        from PIL import Image
        import spacer.tasks, spacer_core.tasks
        from spacer.extractors import EfficientNetExtractor
        from spacer.messages import DataLocation, ExtractFeaturesMsg
        from spacer.storage import storage_factory
        from spacer.data_classes import ImageFeatures

        assert spacer.tasks is spacer_core.tasks, spacer.tasks.__file__
        Image.new("RGB", (300, 260), (10, 120, 40)).save(sys.argv[1])
        msg = ExtractFeaturesMsg(
            job_token="img", extractor=EfficientNetExtractor.untrained_instance(),
            rowcols=[(10, 10), (200, 250)], image_loc=DataLocation("filesystem", sys.argv[1]),
            feature_loc=DataLocation("memory", "img.featurevector"))
        spacer.tasks.extract_features(msg)
        features = ImageFeatures.load(msg.feature_loc)
        print("points", len(features.point_features), features.feature_dim)
    """)
    )
    result = _run(script, tmp_path, str(tmp_path / "img.png"))
    assert result.returncode == 0, result.stderr
    assert "points 2 1280" in result.stdout


def test_alias_serves_exactly_pyspacer_0_14_modules():
    from importlib.metadata import version

    from spacer_core import compat

    assert version("pyspacer") == "0.14.0"  # the oracle the list was written from
    assert compat.PYSPACER_MODULES == set(_pyspacer_modules())
    for name in sorted(compat.PYSPACER_MODULES | set(compat.RENAMED)):
        target = compat.target_name(name)
        assert target is not None and importlib.util.find_spec(target) is not None, name


def _our_modules() -> list[str]:
    import spacer_core

    walked = pkgutil.walk_packages(spacer_core.__path__, prefix="spacer_core.")
    return ["spacer_core"] + [m.name for m in walked if not m.name.rpartition(".")[2].startswith("_")]


def test_alias_does_not_reach_this_projects_modules():
    from spacer_core import compat

    finder = compat.AliasFinder()
    ours_only = [
        "spacer" + name[len("spacer_core") :]
        for name in _our_modules()
        if "spacer" + name[len("spacer_core") :] not in compat.PYSPACER_MODULES
    ]
    assert {"spacer.bulk", "spacer.survey", "spacer.runtime", "spacer.pipeline", "spacer.compat"} <= set(
        ours_only
    )
    for name in ours_only:
        assert compat.target_name(name) is None, name
        with pytest.raises(ModuleNotFoundError, match=f"No module named '{name}'") as refused:
            finder.find_spec(name)
        assert refused.value.name == name
    assert finder.find_spec("spacer_core.bulk") is None  # the real names are left to the usual finders


def test_alias_refuses_new_modules_in_a_program(tmp_path):
    script = tmp_path / "new_modules.py"
    script.write_text(
        textwrap.dedent("""
        import sys
        import spacer.tasks, spacer.extract_features, spacer_core.extractors
        assert spacer.extract_features is spacer_core.extractors
        for name in ("spacer.bulk", "spacer.survey.workflow", "spacer.runtime", "spacer.extractors.dummy"):
            try:
                __import__(name)
            except ModuleNotFoundError as err:
                print("refused", err.name)
            else:
                print("imported", name)
        print(sorted(n for n in sys.modules if n.startswith("spacer.") and n.count(".") and "bulk" in n))
    """)
    )
    result = _run(script, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:5] == [
        "refused spacer.bulk",
        "refused spacer.survey",
        "refused spacer.runtime",
        "refused spacer.extractors.dummy",
        "[]",  # no second copy of a module of ours loaded under the alias
    ]


@pytest.mark.slow
def test_alias_refuses_after_real_pyspacer_was_imported(tmp_path):
    script = tmp_path / "late.py"
    script.write_text("import spacer.messages\nimport spacer_core.compat as c\nc.install()\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0 and "already imported" in result.stderr


def _example(name: str, folder: Path) -> Path:
    """The 0.5.0 example with its `/path/to/` placeholders pointing into `folder`."""
    text = (EXAMPLES / f"{name}.py").read_text()
    script = folder / f"{name}.py"
    script.write_text(text.replace("/path/to/", f"{folder}/"))
    return script


@pytest.fixture(scope="module")
def example_files(tmp_path_factory):
    """Real files for the four 0.5.0 examples: weights, a 3200x1600 photo, features, classifiers."""
    folder = tmp_path_factory.mktemp("pyspacer050")
    make_weights(folder / "weights.pt")
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (50, 25, 3), dtype=np.uint8)
    Image.fromarray(coarse).resize((1600, 3200)).save(folder / "image1.jpg", quality=90)
    make_classifier(folder / "classifier1.pkl", classes=(1, 2, 3))
    make_classifier(folder / "oldclassifier1.pkl", classes=(1, 3, 25), seed=1)
    make_classifier(folder / "oldclassifier2.pkl", classes=(19, 25), seed=2)
    return folder


def _store_training_features(folder: Path, points: dict[str, list[tuple[int, int, int]]]) -> None:
    # Features at the labelled points, one cluster per label so a classifier can learn them.
    rng = np.random.default_rng(1)
    for image, annotations in points.items():
        feats = np.stack([rng.normal(size=1280) + label for _, _, label in annotations])
        ImageFeatures.from_arrays(feats, [a[0] for a in annotations], [a[1] for a in annotations]).store(
            DataLocation("filesystem", str(folder / f"{image}.featurevector"))
        )


# The points the train_classifier example labels (train: image1-3, val: image4-5).
_EXAMPLE_POINTS = {
    "image1": [(1000, 2000, 1), (3000, 2000, 2)],
    "image2": [(1000, 2000, 3), (3000, 2000, 1)],
    "image3": [(1234, 2857, 11), (3094, 2262, 25)],
    "image4": [(500, 2500, 1), (2500, 1500, 3)],
    "image5": [(4321, 5582, 25), (4903, 2622, 19)],
}


def _training_folder(example_files: Path, name: str) -> Path:
    folder = example_files / name
    folder.mkdir(exist_ok=True)
    for old in ("oldclassifier1.pkl", "oldclassifier2.pkl"):
        (folder / old).write_bytes((example_files / old).read_bytes())
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("name", ["extract_features", "classify_features", "classify_image"])
def test_050_core_api_example_runs_unchanged(example_files, name):
    if name == "classify_features" and not (example_files / "image1.featurevector").exists():
        _run(_example("extract_features", example_files), example_files)
    result = _run(_example(name, example_files), example_files)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = {
        "extract_features": "Extraction runtime:",
        "classify_features": "Row 2200, column 1000: [",
        "classify_image": "Row 3000, column 450: [",
    }[name]
    assert expected in result.stdout
    if name == "extract_features":
        assert (
            len(
                ImageFeatures.load(
                    DataLocation("filesystem", str(example_files / "image1.featurevector"))
                ).point_features
            )
            == 3
        )


@pytest.mark.slow
def test_050_train_classifier_example_as_written_is_refused_for_its_labels(example_files):
    # 0.5.0 carved the reference set from train_labels (every 10th image), so
    # the example's three images give ref = image1 (classes 1, 2) and train =
    # image2-3 (1, 3, 11, 25): one shared class. No split of its six labels
    # shares two (only class 1 occurs twice), and 0.5.0 itself refused fewer
    # than 10 training images. The message must say so, not crash.
    folder = _training_folder(example_files, "training_as_written")
    _store_training_features(folder, _EXAMPLE_POINTS)
    result = _run(_example("train_classifier", folder), folder)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "spacer_core.exceptions.TrainingLabelsError: Need multiple classes to do training."
        " After preprocessing training data, there are 1 class(es) left."
    )
    assert not (folder / "classifier1.pkl").exists()


@pytest.mark.slow
def test_050_train_classifier_example_trains_with_enough_images(example_files):
    """The example's code, its train_labels grown to 20 images; everything else as written."""
    folder = _training_folder(example_files, "training")
    classes = (1, 2, 3, 11, 25)
    train_points = {
        f"train{i:02d}": [(100 * p + 7, 50 * p + i, label) for p, label in enumerate(classes)]
        for i in range(20)
    }
    _store_training_features(
        folder, {**train_points, "image4": _EXAMPLE_POINTS["image4"], "image5": _EXAMPLE_POINTS["image5"]}
    )
    script = _example("train_classifier", folder)
    text = script.read_text()
    first = text.index("    train_labels=ImageLabels(data={\n") + len("    train_labels=ImageLabels(data={\n")
    last = text.index("    }),\n", first)
    assert text[first:last].count(".featurevector") == 3  # the example's three images, replaced here
    grown = "".join(
        f"        '{folder}/{image}.featurevector': {points!r},\n" for image, points in train_points.items()
    )
    script.write_text(text[:first] + grown + text[last:])

    result = _run(script, folder)
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = float(result.stdout.split("New model's accuracy (0.0 = 0%, 1.0 = 100%): ")[1].split()[0])
    assert accuracy == 1.0  # val keeps the trained classes (1, 3 and 25): well separated clusters
    assert "Previous models' accuracies: [" in result.stdout
    ref_accs = result.stdout.split("after each epoch of training: ")[1].splitlines()[0]
    assert len(ref_accs.strip("[]").split(",")) == 10  # nbr_epochs=10, measured on the carved ref set
    assert (folder / "classifier1.pkl").exists() and (folder / "valresult.json").exists()
