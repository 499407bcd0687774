"""Models loaded ahead of traffic (LoadModel) and what ListModels reports.

Loading an extractor fetches its data files into EXTRACTORS_CACHE_DIR and
checks their sha256, so the first request neither downloads nor fails on a
bad hash. Loading a classifier unpickles it once and keeps it.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LoadedModel:
    kind: str  # "extractor" or "classifier"
    name: str
    feature_dim: int
    load_seconds: float
    classes: list[Any] = field(default_factory=list)
    obj: Any = None


class ModelRegistry:
    """Thread-safe map of loaded models, keyed by kind and name."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, str], LoadedModel] = {}
        self._lock = threading.Lock()

    def load_extractor(self, extractor: Any) -> LoadedModel:
        """Fetch and verify every data file of extractor (blocking)."""
        start = time.perf_counter()
        for key in extractor.data_locations:
            # Caches remote files locally and checks the sha256 (HashMismatchError).
            extractor.load_datastream(key)
        name = json.dumps(extractor.serialize(), sort_keys=True)
        model = LoadedModel(
            kind="extractor",
            name=name,
            feature_dim=int(extractor.feature_dim),
            load_seconds=time.perf_counter() - start,
            obj=extractor,
        )
        return self._put(model)

    def load_classifier(self, loc: Any) -> LoadedModel:
        """Unpickle the classifier at loc and keep it (blocking)."""
        from spacer_core.storage import load_classifier

        start = time.perf_counter()
        clf = load_classifier(loc)
        model = LoadedModel(
            kind="classifier",
            name=json.dumps(loc.serialize(), sort_keys=True),
            feature_dim=int(getattr(clf, "n_features_in_", 0) or _coef_dim(clf)),
            load_seconds=time.perf_counter() - start,
            classes=list(clf.classes_.tolist()),
            obj=clf,
        )
        return self._put(model)

    def _put(self, model: LoadedModel) -> LoadedModel:
        with self._lock:
            self._models[(model.kind, model.name)] = model
        return model

    def get(self, kind: str, name: str) -> LoadedModel | None:
        with self._lock:
            return self._models.get((kind, name))

    def list(self) -> list[LoadedModel]:
        with self._lock:
            return sorted(self._models.values(), key=lambda m: (m.kind, m.name))


def _coef_dim(clf: Any) -> int:
    for candidate in (clf, getattr(clf, "estimator", None)):
        coef = getattr(candidate, "coef_", None)
        if coef is not None:
            return int(coef.shape[-1])
        dim = getattr(candidate, "n_features_in_", None)
        if dim:
            return int(dim)
    return 0
