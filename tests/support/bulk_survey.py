"""The bulk tests' oracle: a feature file of ours against pyspacer's for the same image.

The surveys themselves come from `spacer_core.testing.make_survey`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from spacer_core.testing import extractor_json, read_features


def assert_matches_pyspacer(weights: Path, image: Path, feature_file: Path, scratch: Path) -> None:
    """Our feature file for `image` agrees with pyspacer's extract_features (<= 1e-4), point for point."""
    from spacer.data_classes import DataLocation as SpLoc
    from spacer.extractors import FeatureExtractor as SpExtractor
    from spacer.messages import ExtractFeaturesMsg
    from spacer.tasks import extract_features

    rowcols, ours = read_features(feature_file)
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    extract_features(
        ExtractFeaturesMsg(
            "o",
            SpExtractor.deserialize(extractor_json(weights, sha)),
            rowcols,
            SpLoc("filesystem", str(image)),
            SpLoc("filesystem", str(scratch / "o.fv")),
        )
    )
    theirs = read_features(scratch / "o.fv")
    assert theirs[0] == rowcols
    np.testing.assert_allclose(ours, theirs[1], atol=1e-4, rtol=0)
