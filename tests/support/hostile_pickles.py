"""Classifier pickles that name only allowlisted globals and still build what a classifier never holds.

Each is a CalibratedClassifierCV whose ``classes_`` (or another attribute)
is the hostile part, built from NumPy's own ``dtype``, ``_reconstruct``,
``scalar``, ``_frombuffer`` and ``ndarray``, or from scikit-learn classes in
the wrong place. Unpickled with plain ``pickle``, the first ones give arrays
whose object fields are raw bytes: touching them crashes the process.
"""

from __future__ import annotations

import copyreg
import pickle
from typing import Any

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.preprocessing import LabelBinarizer

from spacer_core.testing import calibrated_classifier

_CORE = "numpy._core" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core"
_multiarray = __import__(f"{_CORE}.multiarray", fromlist=["_reconstruct"])
_numeric = __import__(f"{_CORE}.numeric", fromlist=["_frombuffer"])
# 8 bytes that are no valid object pointer.
RAW = b"\x41" * 8


class Reduce:
    """Pickles as ``func(*args)``, then ``__setstate__(state)`` when a state is given."""

    def __init__(self, func: Any, args: tuple[Any, ...], state: Any = None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self) -> Any:
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def dtype(typecode: str, state: tuple[Any, ...] | None = None) -> Reduce:
    """``numpy.dtype(typecode)`` with the given pickled state (NumPy's format 3)."""
    return Reduce(np.dtype, (typecode, False, True), state or (3, "|", None, None, None, -1, -1, 0))


def array(dtype_part: Any, shape: tuple[int, ...], data: Any, typecode: bytes = b"b") -> Reduce:
    """An array as NumPy pickles one: ``_reconstruct(ndarray, (0,), typecode)`` then its state."""
    return Reduce(_multiarray._reconstruct, (np.ndarray, (0,), typecode), (1, shape, dtype_part, False, data))


def _object_field_dtype(itemsize: int = 8, offset: int = 0, flags: int = 0) -> Reduce:
    # A void dtype whose state adds an object field; `flags` 0 says "holds no objects".
    fields = {"f": (np.dtype("O"), offset)}
    return dtype(f"V{itemsize}", (3, "|", None, ("f",), fields, itemsize, 1, flags))


def _structured() -> Reduce:
    fields = {"a": (np.dtype("f8"), 0), "b": (np.dtype("O"), 8)}
    return dtype("V16", (3, "|", None, ("a", "b"), fields, 16, 1, 0))


def _classifier_with(**attributes: Any) -> CalibratedClassifierCV:
    clf = CalibratedClassifierCV(cv="prefit")
    clf.calibrated_classifiers_ = []
    for name, value in attributes.items():
        setattr(clf, name, value)
    return clf


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


def variants() -> dict[str, bytes]:
    """name -> classifier pickle bytes; every one must be refused."""
    built: dict[str, Any] = {
        # The probe's file: a dtype given an object field over raw bytes.
        "dtype-setstate-object-field": _classifier_with(classes_=array(_object_field_dtype(), (2,), RAW * 2)),
        "structured-dtype-object-field": _classifier_with(classes_=array(_structured(), (1,), RAW * 2)),
        "dtype-flags-claim-objects": _classifier_with(
            classes_=array(_object_field_dtype(flags=63), (1,), RAW)
        ),
        "dtype-subarray-of-objects": _classifier_with(
            classes_=array(dtype("V16", (3, "|", (np.dtype("O"), (2,)), None, None, 16, 1, 0)), (1,), RAW * 2)
        ),
        "dtype-odd-elsize": _classifier_with(
            classes_=array(dtype("f8", (3, "<", None, None, None, 4096, 1, 0)), (1,), RAW)
        ),
        "dtype-unreadable-state": _classifier_with(classes_=array(dtype("f8", ("<", "junk")), (1,), RAW)),
        "object-array-from-list": _classifier_with(classes_=array(dtype("O8"), (2,), [1, 2])),
        "object-array-from-bytes": _classifier_with(classes_=array(dtype("O8"), (2,), RAW * 2)),
        "reconstruct-object-typecode": _classifier_with(
            classes_=array(dtype("f8"), (1,), RAW, typecode=b"O")
        ),
        "reconstruct-huge-shape": _classifier_with(
            classes_=Reduce(_multiarray._reconstruct, (np.ndarray, (1 << 40,), b"b"))
        ),
        "array-shape-over-data": _classifier_with(classes_=array(dtype("f8"), (1 << 20,), RAW)),
        "scalar-object-dtype": _classifier_with(classes_=Reduce(_multiarray.scalar, (dtype("O8"), RAW))),
        "scalar-object-field": _classifier_with(
            classes_=Reduce(_multiarray.scalar, (_object_field_dtype(), RAW))
        ),
        "ndarray-called-on-bytes": _classifier_with(classes_=Reduce(np.ndarray, ((1,), dtype("O8"), RAW))),
        "float-dtype-given-fields": _classifier_with(
            classes_=array(
                dtype("f8", (3, "|", None, ("f",), {"f": (np.dtype("f8"), 0)}, 8, 1, 0)), (1,), RAW
            )
        ),
        "copyreg-plain-object": _classifier_with(
            classes_=Reduce(copyreg._reconstructor, (object, object, None))
        ),
        "unexpected-attribute-type": _classifier_with(classes_=Reduce(LabelBinarizer, ())),
        "bytes-attribute": _classifier_with(classes_=np.arange(3), note=b"payload"),
        "dict-with-number-keys": _classifier_with(classes_=np.arange(3), note={1: 2}),
        "estimator-where-list-belongs": _classifier_with(
            classes_=np.arange(3), calibrated_classifiers_=[LabelBinarizer()]
        ),
        "string-where-array-belongs": _classifier_with(classes_="0123"),
        "nested-too-deep": _classifier_with(classes_=np.arange(3), note=_nested(200)),
    }
    out = {name: pickle.dumps(value, protocol=2) for name, value in built.items()}
    # Protocol 5 keeps array bytes in a buffer rebuilt by _frombuffer.
    out["frombuffer-object-field"] = pickle.dumps(
        _classifier_with(
            classes_=Reduce(
                _numeric._frombuffer, (pickle.PickleBuffer(bytearray(RAW)), _object_field_dtype(), (1,), "C")
            )
        ),
        protocol=5,
    )
    return out


# ---------------------------------------------------------------- work and shapes

# A 512 KiB integer: converting it to a seed takes quadratic time.
HUGE_SEED = (1 << (1 << 22)) - 12345
# Punycode is quadratic in the length of the text it encodes.
CJK_TEXT = "".join(chr(0x4E00 + i) for i in range(60000))


def _with_extra(value: Any) -> bytes:
    clf = calibrated_classifier()
    clf.extra = value
    return pickle.dumps(clf, protocol=2)


def _mlp_bad_random_state() -> bytes:
    clf = calibrated_classifier("MLP")
    state = np.random.RandomState(0).get_state(legacy=False)
    state["state"]["pos"] = 10**6
    rs = np.random.RandomState()
    rs.set_state(state)  # NumPy does not check the position
    clf.calibrated_classifiers_[0].estimator._random_state = rs
    return pickle.dumps(clf, protocol=2)


MIB_TEXT = "a" * (1 << 20)
MIB_BYTES = bytes(1 << 20)


def _np_reconstruct() -> Any:
    return np.ndarray.__reduce__(np.zeros(1))[0]  # what pickles of arrays call (_reconstruct)


def costly_variants() -> dict[str, bytes]:
    """name -> a classifier pickle whose allowed callables would take minutes of CPU, or an invalid RNG state."""
    import _codecs

    from numpy.random import MT19937, SeedSequence
    from numpy.random._pickle import __bit_generator_ctor, __randomstate_ctor  # type: ignore[attr-defined]

    return {
        "codec-punycode": _with_extra(Reduce(_codecs.encode, (CJK_TEXT, "punycode"))),
        "codec-rot13": _with_extra(Reduce(_codecs.encode, ("abc", "rot13"))),
        "codec-zlib": _with_extra(Reduce(_codecs.encode, (b"x" * 1000, "zlib"))),
        "seed-mt19937": pickle.dumps(Reduce(MT19937, (HUGE_SEED,)), protocol=2),
        "seed-seedsequence": pickle.dumps(Reduce(SeedSequence, (HUGE_SEED,)), protocol=2),
        "seed-in-classifier": _with_extra(Reduce(MT19937, (HUGE_SEED,))),
        "seed-randomstate-ctor": _with_extra(Reduce(__randomstate_ctor, (HUGE_SEED, MT19937))),
        "seed-bit-generator-ctor": _with_extra(Reduce(__bit_generator_ctor, (SeedSequence,))),
        "randomstate-position-out-of-range": _mlp_bad_random_state(),
        # One 1 MiB string stored once, encoded 600 times: 600 MiB of copies from a 1 MiB file.
        "amplified-encode": _with_extra([Reduce(_codecs.encode, (MIB_TEXT, "latin1")) for _ in range(600)]),
        # One 1 MiB data string under 600 arrays (NumPy copies a str's data for each).
        "amplified-arrays": _with_extra(
            [
                Reduce(
                    _np_reconstruct(),
                    (np.ndarray, (0,), b"b"),
                    (1, (1 << 20,), np.dtype("u1"), False, MIB_TEXT),
                )
                for _ in range(600)
            ]
        ),
        # One 1 MiB bytes under 600 byte-swapped arrays (NumPy makes each its own copy).
        "amplified-swapped-arrays": _with_extra(
            [
                Reduce(
                    _np_reconstruct(),
                    (np.ndarray, (0,), b"b"),
                    (1, (1 << 17,), np.dtype(">f8"), False, MIB_BYTES),
                )
                for _ in range(600)
            ]
        ),
    }


def mismatched_variants() -> dict[str, bytes]:
    """name -> a classifier pickle whose arrays disagree in shape (scikit-learn would fail while scoring)."""
    out = {}
    clf = calibrated_classifier()
    clf.classes_ = np.array([1, 2])  # 2 classes, 3 score columns
    clf.calibrated_classifiers_[0].classes = clf.classes_
    out["classes-vs-score-columns"] = pickle.dumps(clf, protocol=2)
    clf = calibrated_classifier("MLP")
    est = clf.calibrated_classifiers_[0].estimator
    est.coefs_[0] = np.zeros((5, est.coefs_[0].shape[1]))  # reads 5 features; n_features_in_ says 1280
    out["mlp-first-layer-width"] = pickle.dumps(clf, protocol=2)
    clf = calibrated_classifier("MLP")
    est = clf.calibrated_classifiers_[0].estimator
    est.coefs_[0] = np.zeros((5, est.coefs_[0].shape[1]))
    for holder in (clf, est):
        del holder.n_features_in_  # as scikit-learn 0.22 wrote them: only the weights tell the width
    out["mlp-width-undeclared"] = pickle.dumps(clf, protocol=2)
    clf = calibrated_classifier()
    clf.calibrated_classifiers_[0].calibrators = clf.calibrated_classifiers_[0].calibrators[:1]
    out["too-few-calibrators"] = pickle.dumps(clf, protocol=2)
    clf = calibrated_classifier("MLP")
    clf.calibrated_classifiers_[0].estimator.coefs_[1][:] = np.inf  # every score would be NaN
    out["mlp-weights-infinite"] = pickle.dumps(clf, protocol=2)
    clf = calibrated_classifier()
    clf.calibrated_classifiers_[0].calibrators[0].a_ = float("nan")
    out["calibration-nan"] = pickle.dumps(clf, protocol=2)
    return out


def overflowing_classifier() -> bytes:
    """Finite weights so large (1e308) that every score overflows to NaN."""
    clf = calibrated_classifier("MLP")
    clf.calibrated_classifiers_[0].estimator.coefs_[0][:] = 1e308
    return pickle.dumps(clf, protocol=2)
