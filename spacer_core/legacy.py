"""Loading classifiers pickled by older pyspacer / scikit-learn releases.

CoralNet's classifiers were pickled with scikit-learn 0.17.1 (Python 2),
0.22.1 and 1.1.3. Loading them in today's scikit-learn needs:

- old module paths mapped to where the classes live now;
- attributes renamed since (``base_estimator`` -> ``estimator``) or added
  since (``ensemble``, ``n_jobs``, ``classes``, ``calibrators``) filled in;
- SGDClassifier's ``loss='log'`` renamed ``'log_loss'``.

Only what inference (``predict_proba``) needs is guaranteed.

A pickle names the callables that rebuild it, so unpickling an untrusted
file can run any code. Classifier files come from clients, so the
unpickler resolves only the globals on an allowlist: the scikit-learn,
NumPy and codec names that trained CoralNet classifiers (every scikit-learn
release CoralNet used, and what pyspacer and this library write) contain.
Anything else is refused with UnsafePickleError before it is imported.
What the allowed callables build is checked too (`spacer_core.pickle_guard`):
NumPy never sees a dtype, array or scalar state it did not pass, and the
loaded object may hold only what a trained classifier holds.
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
from typing import Any

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import SGDClassifier

from spacer_core.exceptions import ClassifierFileError, InvalidInputError, UnsafePickleError
from spacer_core.pickle_guard import REPLACEMENTS, bare_class, byte_budget, check_classifier, check_graph

# Modules of scikit-learn < 0.22 that no longer exist, and where their classes
# live now (0.22 made the submodules private).
_MODULE_RENAMES = {
    "sklearn.linear_model.sgd_fast": "sklearn.linear_model._sgd_fast",
    "sklearn.linear_model.stochastic_gradient": "sklearn.linear_model",
    "sklearn.neural_network.multilayer_perceptron": "sklearn.neural_network",
    "sklearn.neural_network.stochastic_optimizers": "sklearn.neural_network._stochastic_optimizers",
    "sklearn.preprocessing.label": "sklearn.preprocessing",
    # Python 2 names (fix_imports maps them too, but the allowlist sees the raw name).
    "copy_reg": "copyreg",
    "__builtin__": "builtins",
}

# NumPy 2 moved numpy.core to numpy._core; pickles written under NumPy 1
# name the old path, which NumPy 2 still serves but with a warning.
_NUMPY_CORE = "numpy._core" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core"
for _old in ("numpy.core", "numpy._core"):
    for _sub in ("multiarray", "numeric"):
        _MODULE_RENAMES[f"{_old}.{_sub}"] = f"{_NUMPY_CORE}.{_sub}"

_SGD_LOSSES = (
    "Log", "Hinge", "ModifiedHuber", "SquaredHinge",
    "Huber", "SquaredLoss", "EpsilonInsensitive", "SquaredEpsilonInsensitive",
)  # fmt: skip

# (module after renaming, name): everything a trained classifier's pickle
# may name. Found by loading the legacy fixtures and classifiers trained
# and stored by pyspacer 0.14.0 and by this library (pickle protocols 2-5).
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        # The classifier: calibration wrapper around an SGD or MLP model.
        ("sklearn.calibration", "CalibratedClassifierCV"),
        ("sklearn.calibration", "_CalibratedClassifier"),
        ("sklearn.calibration", "_SigmoidCalibration"),
        ("sklearn.linear_model", "SGDClassifier"),
        ("sklearn.linear_model._stochastic_gradient", "SGDClassifier"),
        ("sklearn.neural_network", "MLPClassifier"),
        ("sklearn.neural_network._multilayer_perceptron", "MLPClassifier"),
        ("sklearn.neural_network._stochastic_optimizers", "AdamOptimizer"),
        ("sklearn.preprocessing", "LabelBinarizer"),
        ("sklearn.preprocessing._label", "LabelBinarizer"),
        ("sklearn.preprocessing", "LabelEncoder"),  # scikit-learn 0.17
        ("sklearn.preprocessing._label", "LabelEncoder"),
        # SGDClassifier's loss object (pyspacer's trainer lets the loss be set).
        *(("sklearn.linear_model._sgd_fast", loss) for loss in _SGD_LOSSES),
        # NumPy arrays, scalars and dtypes.
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        (f"{_NUMPY_CORE}.multiarray", "_reconstruct"),
        (f"{_NUMPY_CORE}.multiarray", "scalar"),
        (f"{_NUMPY_CORE}.numeric", "_frombuffer"),  # protocol 5 buffers
        # An MLP's RandomState (its constructor only accepts bit generator
        # classes, which must themselves pass this list).
        ("numpy.random._pickle", "__randomstate_ctor"),
        ("numpy.random._pickle", "__bit_generator_ctor"),
        ("numpy.random._mt19937", "MT19937"),
        ("numpy.random.bit_generator", "SeedSequence"),
        ("numpy.random.bit_generator", "__pyx_unpickle_SeedSequence"),
        # Protocol 2 writes bytes (numpy buffers) as latin-1 text to encode.
        ("_codecs", "encode"),
        # Python 2 pickles (scikit-learn 0.17) build objects through copy_reg.
        ("copyreg", "_reconstructor"),
        ("builtins", "object"),
    }
)

# scikit-learn versions CoralNet pickled with; their "unpickling from another
# version" warnings are expected and silenced.
_KNOWN_OLD_VERSIONS = re.compile(
    r"Trying to unpickle estimator \w+ from version ((pre-0\.18)|(0\.22\.1)|(1\.1\.3))"
)


class ClassifierUnpickler(pickle.Unpickler):
    """Unpickler for untrusted classifier files.

    Resolves only ALLOWED_GLOBALS (raising UnsafePickleError for anything
    else), maps old scikit-learn module paths and repairs old classifiers.
    """

    def find_class(self, module: str, name: str) -> Any:
        target = _MODULE_RENAMES.get(module, module)
        if (target, name) not in ALLOWED_GLOBALS:
            # Checked before anything is imported, so a refused module never loads.
            raise UnsafePickleError(
                f"refused to load classifier: the pickle refers to '{module}.{name}',"
                " which is not part of a trained classifier."
            )
        replacement = REPLACEMENTS.get((target, name))
        if replacement is not None:
            return replacement
        found = super().find_class(target, name)
        if (
            isinstance(found, type)
            and found.__module__.startswith("sklearn.")
            and found.__new__ is object.__new__
        ):
            return bare_class(found)
        return found

    def load(self) -> CalibratedClassifierCV:
        clf = upgrade_classifier(check_graph(super().load(), ALLOWED_GLOBALS))
        check_classifier(clf)
        return clf


def _rename_base_estimator(obj: Any) -> None:
    # CalibratedClassifierCV and _CalibratedClassifier renamed this in 1.2.
    if "base_estimator" in obj.__dict__ and "estimator" not in obj.__dict__:
        obj.estimator = obj.__dict__.pop("base_estimator")


def _upgrade_estimator(estimator: Any) -> None:
    if isinstance(estimator, SGDClassifier) and getattr(estimator, "loss", None) == "log":
        estimator.loss = "log_loss"


def upgrade_classifier(clf: Any) -> CalibratedClassifierCV:
    """Check ``clf`` is a prefit CalibratedClassifierCV and bring old attributes up to date."""
    if not isinstance(clf, CalibratedClassifierCV):
        raise InvalidInputError(f"Loaded a {type(clf).__name__} instead of a CalibratedClassifierCV.")
    if clf.cv != "prefit":
        raise InvalidInputError(
            f"Loaded classifier has cv '{clf.cv}' instead of 'prefit'."
            f" Don't know how to check this classifier type for compatibility."
        )
    # Added after 0.22.1; unused with cv='prefit' but read by repr and get_params.
    clf.__dict__.setdefault("ensemble", True)
    clf.__dict__.setdefault("n_jobs", None)
    _rename_base_estimator(clf)
    _upgrade_estimator(clf.estimator)

    for calibrated in clf.calibrated_classifiers_:
        _rename_base_estimator(calibrated)
        _upgrade_estimator(calibrated.estimator)
        # 0.17.1 had no 'classes'; 0.22.1 had it but left it None.
        if getattr(calibrated, "classes", None) is None:
            calibrated.classes = calibrated.classes_
        # Named calibrators_ before 0.24.
        if not hasattr(calibrated, "calibrators"):
            calibrated.calibrators = calibrated.calibrators_
    return clf


def load_classifier_bytes(data: bytes, source: str = "<bytes>") -> CalibratedClassifierCV:
    """Unpickle and upgrade a classifier; errors name ``source``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, message=_KNOWN_OLD_VERSIONS.pattern)
        try:
            # latin1 reads Python 2 pickles' 8-bit strings (numpy buffers) unchanged.
            # What a genuine pickle builds is its own data, once (plus slack for small scalars).
            with byte_budget(len(data) + (1 << 20)):
                return ClassifierUnpickler(io.BytesIO(data), fix_imports=True, encoding="latin1").load()
        except UnsafePickleError as err:
            raise UnsafePickleError(f"{source}: {err}") from None
        except InvalidInputError as err:
            raise ClassifierFileError(f"{source}: {err}") from err
        except (pickle.UnpicklingError, EOFError) as err:
            # The unpickler's own text names its internals (persistent ids, load keys).
            raise ClassifierFileError(
                f"{source}: cannot load classifier: not a classifier file (unreadable pickle)."
            ) from err
        except (ValueError, AttributeError, ImportError, TypeError) as err:
            raise ClassifierFileError(
                f"{source}: cannot load classifier: not a classifier file (its contents are not a "
                "scikit-learn classifier this server can read)."
            ) from err
