"""Classifier pickles are untrusted: crafted ones are refused before their payload runs."""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import spacer.data_classes
import spacer.storage
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import SGDClassifier
from sklearn.neural_network import MLPClassifier

from spacer_core.data_classes import DataLocation
from spacer_core.exceptions import SpacerError, UnsafePickleError
from spacer_core.legacy import ALLOWED_GLOBALS, ClassifierUnpickler, load_classifier_bytes
from spacer_core.storage import load_classifier
from spacer_core.testing import calibrated_classifier


@pytest.fixture(autouse=True)
def _fresh_cache():
    load_classifier.cache_clear()
    yield
    load_classifier.cache_clear()


class _Reduce:
    """Pickles as a call of ``func(*args)``: what a hostile file contains."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _stack_global(module: str, name: str) -> bytes:
    """A protocol 4 pickle that resolves module.name (dotted names walk attributes)."""

    def text(s: str) -> bytes:
        raw = s.encode()
        return b"\x8c" + struct.pack("<B", len(raw)) + raw

    return b"\x80\x04" + text(module) + text(name) + b"\x93" + b"."


def _payloads(marker: Path) -> dict[str, bytes]:
    touch = f"touch {marker}"
    # A real classifier carrying the payload in an attribute, as an attacker
    # would hide it in a file that otherwise looks right.
    trojan = calibrated_classifier(feature_dim=6, classes=(0, 1, 2))
    trojan.note = _Reduce(os.system, touch)
    return {
        "os.system": pickle.dumps(_Reduce(os.system, touch), protocol=2),
        "subprocess.Popen": pickle.dumps(_Reduce(subprocess.Popen, ["touch", str(marker)]), protocol=2),
        "builtins.eval": pickle.dumps(_Reduce(builtins.eval, f"open({str(marker)!r}, 'w')"), protocol=2),
        "builtins.exec": pickle.dumps(_Reduce(builtins.exec, f"open({str(marker)!r}, 'w')"), protocol=4),
        "getattr": b"cbuiltins\ngetattr\n(cos\nsystem\nS'system'\ntR.",
        "dotted attribute walk": _stack_global(
            "sklearn.calibration", "CalibratedClassifierCV.__init__.__globals__"
        ),
        "allowed module, other name": _stack_global("numpy", "load"),
        "trojan classifier": pickle.dumps(trojan, protocol=2),
        "python 2 builtin": b"c__builtin__\neval\n(S'1'\ntR.",
    }


def test_hostile_pickles_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    for label, data in _payloads(marker).items():
        with pytest.raises(
            UnsafePickleError, match=r"hostile\.pkl: refused to load classifier: the pickle refers to"
        ) as info:
            load_classifier_bytes(data, source="hostile.pkl")
        assert isinstance(info.value, SpacerError) and isinstance(info.value, ValueError), label
        assert not marker.exists(), f"{label} payload ran"


def test_refusal_names_the_global():
    with pytest.raises(UnsafePickleError, match=r"'posix\.system'|'nt\.system'"):
        load_classifier_bytes(pickle.dumps(_Reduce(os.system, "true"), protocol=2))


def test_hostile_file_through_load_classifier(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pkl"
    path.write_bytes(_payloads(marker)["trojan classifier"])
    with pytest.raises(UnsafePickleError, match="model.pkl"):
        load_classifier(DataLocation("filesystem", str(path)))
    assert not marker.exists()


def test_refused_module_is_never_imported():
    # A module that no part of the library imports; a subprocess gives a clean sys.modules.
    code = (
        "import sys\n"
        "from spacer_core.legacy import load_classifier_bytes\n"
        "try:\n"
        "    load_classifier_bytes(b'cthis\\nZen\\n.')\n"
        "except ValueError as err:\n"
        "    print(type(err).__name__)\n"
        "print('this' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["UnsafePickleError", "False"]


@pytest.mark.parametrize("kind", ["LR", "MLP"])
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_classifiers_we_and_pyspacer_write_still_load(kind, protocol):
    clf = calibrated_classifier(kind, feature_dim=6, classes=(0, 1, 2))
    probe = np.random.default_rng(1).normal(size=(4, 6))
    loaded = load_classifier_bytes(pickle.dumps(clf, protocol=protocol))
    np.testing.assert_array_equal(loaded.predict_proba(probe), clf.predict_proba(probe))
    # What we loaded is stored again (training from a previous model) and loads again.
    again = pickle.dumps(loaded, protocol=protocol)
    assert b"pickle_guard" not in again
    np.testing.assert_array_equal(load_classifier_bytes(again).predict_proba(probe), clf.predict_proba(probe))
    # pyspacer's own writer, read back through the restricted unpickler.
    spacer.storage.store_classifier(spacer.data_classes.DataLocation("memory", f"{kind}.pkl"), clf)
    raw = spacer.storage.storage_factory("memory").load(f"{kind}.pkl").getvalue()
    np.testing.assert_array_equal(load_classifier_bytes(raw).predict_proba(probe), clf.predict_proba(probe))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_large_classifiers_load_within_the_byte_budget(protocol):
    """A genuine classifier's arrays are several MiB (CoralNet's MLPs about 10): the loader's
    byte budget counts each array's data once, whichever protocol stored it."""
    from sklearn.calibration import CalibratedClassifierCV

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 1280)), np.arange(60) % 3
    mlp = MLPClassifier(hidden_layer_sizes=(1000, 200), max_iter=2).fit(x, y)
    clf = CalibratedClassifierCV(mlp, cv="prefit").fit(x, y)
    raw = pickle.dumps(clf, protocol=protocol)
    assert len(raw) > 10 * 2**20
    np.testing.assert_array_equal(load_classifier_bytes(raw).predict_proba(x[:4]), clf.predict_proba(x[:4]))


def test_every_allowed_global_resolves():
    # The allowlist must name real objects of the installed releases, or a
    # library upgrade silently breaks loading.
    for module, name in sorted(ALLOWED_GLOBALS):
        assert callable(ClassifierUnpickler(io.BytesIO(b"")).find_class(module, name)), (module, name)


# ---------------------------------------------------------------- what allowed globals build

CNBETA = Path(__file__).parents[1] / "fixtures" / "pyspacer_cnbeta"


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    # A crash (SIGSEGV) kills only the child, never the test runner.
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_the_probe_file_crashes_plain_pickle():
    # Proof the variants are real: NumPy trusts the dtype state and reads raw bytes as objects.
    out = _run_python(
        "import pickle\n"
        "from tests.support.hostile_pickles import variants\n"
        "clf = pickle.loads(variants()['dtype-setstate-object-field'])\n"
        "print(repr(clf.classes_))\n"
    )
    assert out.returncode < 0, (out.returncode, out.stderr[-500:])


@pytest.mark.slow
def test_numpy_state_and_attribute_variants_are_refused():
    out = _run_python(
        "import json\n"
        "from spacer_core.exceptions import InvalidInputError\n"
        "from spacer_core.legacy import load_classifier_bytes\n"
        "from tests.support.hostile_pickles import variants\n"
        "result = {}\n"
        "for name, data in variants().items():\n"
        "    try:\n"
        "        load_classifier_bytes(data, source=name + '.pkl')\n"
        "        result[name] = 'loaded'\n"
        "    except InvalidInputError as err:\n"
        "        result[name] = [type(err).__name__, str(err)]\n"
        "print(json.dumps(result))\n"
    )
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    result = json.loads(out.stdout)
    assert len(result) >= 20
    for name, outcome in result.items():
        assert outcome != "loaded", name
        kind, message = outcome
        assert message.startswith(f"{name}.pkl: "), message
        assert "0x" not in message and "Traceback" not in message, message
        if name != "estimator-where-list-belongs":  # fails on a missing attribute while upgrading
            assert kind == "UnsafePickleError" and "refused to load classifier" in message, (name, message)


def test_state_checks_see_what_numpy_would_build():
    from spacer_core.pickle_guard import PendingDtype, check_dtype, checked_reconstruct, checked_scalar

    with pytest.raises(UnsafePickleError, match="fields"):
        PendingDtype("f8").__setstate__((3, "|", None, ("f",), {"f": (np.dtype("f8"), 0)}, 8, 1, 0))
    with pytest.raises(UnsafePickleError, match="kind 'O'"):
        check_dtype(np.dtype("O"))
    with pytest.raises(UnsafePickleError, match="with fields"):
        check_dtype(np.dtype([("a", "f8"), ("b", "O")]))
    big = PendingDtype("i4")
    big.__setstate__((3, ">", None, None, None, -1, -1, 0))
    assert big.dtype == np.dtype(">i4")
    text = PendingDtype("U")
    text.__setstate__((3, "<", None, None, None, 12, 4, 8))
    assert text.dtype == np.dtype("<U3")
    assert checked_scalar(PendingDtype("f8"), np.float64(2.5).tobytes()) == 2.5
    with pytest.raises(UnsafePickleError, match="unexpected arguments"):
        checked_reconstruct(np.ndarray, (0,), b"b")


@pytest.mark.parametrize("labels", [[3, 7, 11], ["Acr", "Por", "Sand"]])
def test_loaded_arrays_are_plain_ndarrays(labels):
    rng = np.random.default_rng(2)
    y = np.array([labels[i % 3] for i in range(60)])
    x = rng.normal(size=(60, 5)) + np.arange(60)[:, None] % 3
    clf = CalibratedClassifierCV(SGDClassifier(loss="log_loss", random_state=0).fit(x, y), cv="prefit").fit(
        x, y
    )
    loaded = load_classifier_bytes(pickle.dumps(clf, protocol=2))
    assert type(loaded.classes_) is np.ndarray and type(loaded.estimator.coef_) is np.ndarray
    assert list(loaded.classes_) == sorted(labels)
    np.testing.assert_array_equal(loaded.predict_proba(x[:5]), clf.predict_proba(x[:5]))
    # What we load can be stored and loaded again, by us and by plain pickle.
    again = pickle.loads(pickle.dumps(loaded, protocol=2))
    np.testing.assert_array_equal(again.predict_proba(x[:5]), clf.predict_proba(x[:5]))


def test_coralnet_beta_classifier_loads_like_pyspacer():
    """pyspacer's own oldest fixture: a Python 2 pickle built through copy_reg._reconstructor."""
    model = CNBETA / "cnbeta.model"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = spacer.storage.load_classifier(spacer.data_classes.DataLocation("filesystem", str(model)))
        features = spacer.data_classes.ImageFeatures.load(
            spacer.data_classes.DataLocation("filesystem", str(CNBETA / "cnbeta.jpg.feats"))
        )
    ours = load_classifier(DataLocation("filesystem", str(model)))
    x = np.array([point.data for point in features.point_features])
    assert x.shape == (2, 4096) and len(ours.classes_) == 16
    np.testing.assert_array_equal(ours.classes_, theirs.classes_)
    np.testing.assert_array_equal(ours.predict_proba(x), theirs.predict_proba(x))


# ---------------------------------------------------------------- work the allowed callables do


def test_costly_calls_are_refused_before_they_run():
    import time

    from tests.support.hostile_pickles import costly_variants

    for name, data in costly_variants().items():
        started = time.perf_counter()
        with pytest.raises(UnsafePickleError, match=rf"^{name}\.pkl: refused to load classifier"):
            load_classifier_bytes(data, source=f"{name}.pkl")
        assert time.perf_counter() - started < 1.0, name


def test_the_codec_call_is_only_protocol_2_bytes():
    import _codecs

    from spacer_core.pickle_guard import checked_encode

    assert checked_encode("\xff\x00a", "latin1") == b"\xff\x00a"
    assert checked_encode("ab", "latin-1") == b"ab"
    for args in (
        ("x" * 10, "punycode"),
        ("abc", "rot13"),
        (b"x", "zlib"),
        ("a", "utf-8"),
        ("a", "latin1", "ignore"),
        ("a",),
        (1, "latin1"),
    ):
        with pytest.raises(UnsafePickleError, match="latin-1"):
            checked_encode(*args)
    # What CPython's pickler writes for bytes under protocol 2 names exactly this.
    assert b"c_codecs\nencode\n" in pickle.dumps(b"\x01\x02", protocol=2)
    assert pickle.loads(pickle.dumps(b"\x01\x02", protocol=2)) == _codecs.encode("\x01\x02", "latin1")


def test_random_generators_take_only_small_seeds_and_valid_states():
    from spacer_core.pickle_guard import checked_mt19937, checked_seed_sequence

    for seed in (None, 0, 2**128 - 1, [1, 2, 3], np.arange(4, dtype=np.uint32)):
        checked_mt19937(seed)
        checked_seed_sequence(seed)
    for seed in (2**128, -1, 1 << (1 << 20), list(range(33)), 1.5, "seed", True):
        with pytest.raises(UnsafePickleError, match="seeded with"):
            checked_mt19937(seed)
        with pytest.raises(UnsafePickleError, match="seeded with"):
            checked_seed_sequence(seed)


@pytest.mark.parametrize("pos", [-1, 625, 10**6])
def test_a_random_state_position_out_of_range_is_refused(pos):
    clf = calibrated_classifier("MLP", feature_dim=6, classes=(0, 1, 2))
    state = np.random.RandomState(0).get_state(legacy=False)
    state["state"]["pos"] = pos
    rs = np.random.RandomState()
    try:
        rs.set_state(state)
    except (ValueError, OverflowError):
        pytest.skip("NumPy itself refuses this position")
    clf.estimator._random_state = rs
    with pytest.raises(UnsafePickleError, match=f"position {pos} of its 624-word state"):
        load_classifier_bytes(pickle.dumps(clf, protocol=2))


def test_a_called_scikit_learn_class_runs_no_init():
    import time

    from sklearn.neural_network._stochastic_optimizers import AdamOptimizer

    from tests.support.hostile_pickles import Reduce

    # AdamOptimizer.__init__ would allocate a copy of each of a million references to one array.
    clf = calibrated_classifier(feature_dim=6, classes=(0, 1, 2))
    big = np.zeros(1 << 17)
    clf.note = Reduce(AdamOptimizer, ([big] * 1_000_000,))
    started = time.perf_counter()
    loaded = load_classifier_bytes(pickle.dumps(clf, protocol=2))
    assert time.perf_counter() - started < 5
    assert type(loaded.note) is AdamOptimizer and not hasattr(loaded.note, "ms")


# ---------------------------------------------------------------- arrays that must agree


def test_classifiers_whose_arrays_disagree_are_refused():
    from tests.support.hostile_pickles import mismatched_variants

    expected = {
        "classes-vs-score-columns": "has 3 classes but 'classes_' has 2",
        "mlp-first-layer-width": "'calibrated_classifiers_[0].estimator.n_features_in_' is 1280 but the weights read 5",
        "too-few-calibrators": "has 1 calibrators for 3 score columns",
    }
    variants = mismatched_variants()
    for name, message in expected.items():
        with pytest.raises(UnsafePickleError, match=re.escape(message)):
            load_classifier_bytes(variants[name], source=f"{name}.pkl")
    # Without a declared width the weights' width is checked before scikit-learn runs.
    from spacer_core.exceptions import FeatureDimensionError
    from spacer_core.pipeline import score

    clf = load_classifier_bytes(variants["mlp-width-undeclared"])
    with pytest.raises(FeatureDimensionError, match="f.npz: features have dimension 1280.*dimension 5"):
        score(clf, np.zeros((2, 1280)), "f.npz")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_scoring_refuses_features_that_are_not_finite(bad):
    from spacer_core.exceptions import InvalidInputError
    from spacer_core.pipeline import score

    clf = calibrated_classifier(feature_dim=6, classes=(0, 1, 2))
    x = np.zeros((3, 6))
    x[1, 2] = bad
    with pytest.raises(InvalidInputError, match="img.fv: the features contain NaN or infinite values"):
        score(clf, x, "img.fv")
    with pytest.raises(InvalidInputError, match="img.fv: the features are a 1-D array"):
        score(clf, np.zeros(6), "img.fv")


def test_a_scikit_learn_value_error_while_scoring_is_invalid_input():
    from spacer_core.exceptions import InvalidInputError
    from spacer_core.pipeline import score

    clf = calibrated_classifier(feature_dim=6, classes=(0, 1, 2))
    # Built in memory (the load-time check would refuse it): intercepts that do not match the weights.
    clf.calibrated_classifiers_[0].estimator.intercept_ = np.zeros(2)
    with pytest.raises(InvalidInputError, match="img.fv: the classifier cannot score these features"):
        score(clf, np.zeros((2, 6)), "img.fv")
