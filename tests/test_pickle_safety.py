"""Classifier pickles are untrusted: crafted ones are refused before their payload runs."""

from __future__ import annotations

import builtins
import io
import os
import pickle
import struct
import subprocess
import sys
import warnings

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


def _classifier(kind: str = "LR") -> CalibratedClassifierCV:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 90)
    x = rng.normal(size=(90, 6)) + y[:, None]
    base = SGDClassifier(loss="log_loss", random_state=0) if kind == "LR" else MLPClassifier((8,), max_iter=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MLP convergence on tiny data
        base.partial_fit(x, y, classes=[0, 1, 2])
        return CalibratedClassifierCV(base, cv="prefit").fit(x[:45], y[:45])


def _payloads(marker: Path) -> dict[str, bytes]:
    touch = f"touch {marker}"
    # A real classifier carrying the payload in an attribute, as an attacker
    # would hide it in a file that otherwise looks right.
    trojan = _classifier()
    trojan.note = _Reduce(os.system, touch)
    return {
        "os.system": pickle.dumps(_Reduce(os.system, touch), protocol=2),
        "subprocess.Popen": pickle.dumps(_Reduce(subprocess.Popen, ["touch", str(marker)]), protocol=2),
        "builtins.eval": pickle.dumps(_Reduce(builtins.eval, f"open({str(marker)!r}, 'w')"), protocol=2),
        "builtins.exec": pickle.dumps(_Reduce(builtins.exec, f"open({str(marker)!r}, 'w')"), protocol=4),
        "getattr": b"cbuiltins\ngetattr\n(cos\nsystem\nS'system'\ntR.",
        "dotted attribute walk": _stack_global("sklearn.calibration", "CalibratedClassifierCV.__init__.__globals__"),
        "allowed module, other name": _stack_global("numpy", "load"),
        "trojan classifier": pickle.dumps(trojan, protocol=2),
        "python 2 builtin": b"c__builtin__\neval\n(S'1'\ntR.",
    }


def test_hostile_pickles_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    for label, data in _payloads(marker).items():
        with pytest.raises(UnsafePickleError, match=r"hostile\.pkl: refused to load classifier: the pickle refers to") as info:
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
    clf = _classifier(kind)
    probe = np.random.default_rng(1).normal(size=(4, 6))
    loaded = load_classifier_bytes(pickle.dumps(clf, protocol=protocol))
    np.testing.assert_array_equal(loaded.predict_proba(probe), clf.predict_proba(probe))
    # pyspacer's own writer, read back through the restricted unpickler.
    spacer.storage.store_classifier(spacer.data_classes.DataLocation("memory", f"{kind}.pkl"), clf)
    raw = spacer.storage.storage_factory("memory").load(f"{kind}.pkl").getvalue()
    np.testing.assert_array_equal(load_classifier_bytes(raw).predict_proba(probe), clf.predict_proba(probe))


def test_every_allowed_global_resolves():
    # The allowlist must name real objects of the installed releases, or a
    # library upgrade silently breaks loading.
    for module, name in sorted(ALLOWED_GLOBALS):
        assert callable(ClassifierUnpickler(io.BytesIO(b"")).find_class(module, name)), (module, name)
