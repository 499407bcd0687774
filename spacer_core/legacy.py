"""Loading classifiers pickled by older pyspacer / scikit-learn releases.

CoralNet's classifiers were pickled with scikit-learn 0.17.1 (Python 2),
0.22.1 and 1.1.3. Loading them in today's scikit-learn needs:

- old module paths mapped to where the classes live now;
- attributes renamed since (``base_estimator`` -> ``estimator``) or added
  since (``ensemble``, ``n_jobs``, ``classes``, ``calibrators``) filled in;
- SGDClassifier's ``loss='log'`` renamed ``'log_loss'``.

Only what inference (``predict_proba``) needs is guaranteed.
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
from typing import Any

from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import SGDClassifier

from spacer_core.exceptions import InvalidInputError

# Modules of scikit-learn < 0.22 that no longer exist, and where their classes
# live now (0.22 made the submodules private).
_MODULE_RENAMES = {
    "sklearn.linear_model.sgd_fast": "sklearn.linear_model._sgd_fast",
    "sklearn.linear_model.stochastic_gradient": "sklearn.linear_model",
    "sklearn.neural_network.multilayer_perceptron": "sklearn.neural_network",
    "sklearn.neural_network.stochastic_optimizers": "sklearn.neural_network._stochastic_optimizers",
    "sklearn.preprocessing.label": "sklearn.preprocessing",
}

# scikit-learn versions CoralNet pickled with; their "unpickling from another
# version" warnings are expected and silenced.
_KNOWN_OLD_VERSIONS = re.compile(
    r"Trying to unpickle estimator \w+ from version ((pre-0\.18)|(0\.22\.1)|(1\.1\.3))"
)


class ClassifierUnpickler(pickle.Unpickler):
    """Unpickler that maps old scikit-learn module paths and repairs old classifiers."""

    def find_class(self, module: str, name: str) -> Any:
        return super().find_class(_MODULE_RENAMES.get(module, module), name)

    def load(self) -> CalibratedClassifierCV:
        clf = super().load()
        return upgrade_classifier(clf)


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
            return ClassifierUnpickler(io.BytesIO(data), fix_imports=True, encoding="latin1").load()
        except ValueError as err:
            raise InvalidInputError(f"{source}: {err}") from err
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError) as err:
            raise InvalidInputError(f"{source}: cannot load classifier ({type(err).__name__}: {err}).") from err
