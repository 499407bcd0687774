"""DummyExtractor: random features of a chosen length, for tests and dry runs."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from spacer_core.data_classes import DataLocation
from spacer_core.exceptions import InvalidInputError
from spacer_core.extractors.base import FeatureExtractor, RowCol


class DummyExtractor(FeatureExtractor):
    """Ignores the image and returns uniform random features in [0, 1).

    Draws are seeded from Python's `random` module, so `random.seed()` makes
    them repeatable as with pyspacer. Match `feature_dim` to a classifier's
    to feed it these features.
    """

    PYSPACER_CLASS_PATH: ClassVar[str | None] = "spacer.extractors.base.DummyExtractor"

    def __init__(
        self,
        data_locations: Mapping[str, DataLocation] | None = None,
        feature_dim: int = 4096,
        **kwargs: Any,
    ):
        super().__init__(data_locations or {}, **kwargs)
        if isinstance(feature_dim, bool) or not isinstance(feature_dim, int) or feature_dim < 1:
            raise InvalidInputError(f"DummyExtractor feature_dim must be a positive int, got {feature_dim!r}")
        self._feature_dim = feature_dim

    @property
    def feature_dim(self) -> int:
        return self._feature_dim

    def extract_image(self, im: Image.Image, rowcols: Sequence[RowCol]) -> tuple[np.ndarray, bool]:
        # The pixels are never looked at, so the image is not even decoded.
        return self.extract_rgb(np.empty((0, 0, 3), np.uint8), rowcols)

    def extract_rgb(self, rgb: np.ndarray, rowcols: Sequence[RowCol]) -> tuple[np.ndarray, bool]:
        rng = np.random.default_rng(random.getrandbits(64))
        return rng.random((len(rowcols), self._feature_dim)), False

    def serialize(self) -> dict[str, Any]:
        data = super().serialize()
        data["feature_dim"] = self._feature_dim
        return data
