"""Extractor class paths found in messages, mapped to this package's classes.

pyspacer writes `class_path` as the dotted path of the extractor class, and
the module holding each class moved between releases. Every path a pyspacer
release (0.5.0 to 0.14.0) or this package writes resolves here; any other
path must name a FeatureExtractor subclass inside spacer_core or one
registered with `register_extractor_class` (see
`spacer_core.extractors.base.resolve_class_path`).
"""

from __future__ import annotations

# Class name -> every module path it has been written under.
_MODULES_BY_CLASS: dict[str, tuple[str, ...]] = {
    "EfficientNetExtractor": (
        "spacer.extract_features",  # pyspacer 0.5.0
        "spacer.extractors",
        "spacer.extractors.efficientnet",  # pyspacer 0.14.0
        "spacer_core.extractors",
        "spacer_core.extractors.efficientnet",
    ),
    "VGG16CaffeExtractor": (
        "spacer.extract_features",
        "spacer.extractors",
        "spacer.extractors.vgg16",
        "spacer_core.extractors",
        "spacer_core.extractors.vgg16",
    ),
    "DummyExtractor": (
        "spacer.extract_features",
        "spacer.extractors",
        "spacer.extractors.base",
        "spacer_core.extractors",
        "spacer_core.extractors.base",
        "spacer_core.extractors.dummy",
    ),
}

KNOWN_CLASS_PATHS: frozenset[str] = frozenset(
    f"{module}.{name}" for name, modules in _MODULES_BY_CLASS.items() for module in modules
)

# Where each class lives in this package.
_HOME = {
    "EfficientNetExtractor": "spacer_core.extractors.efficientnet",
    "VGG16CaffeExtractor": "spacer_core.extractors.vgg16",
    "DummyExtractor": "spacer_core.extractors.base",
}


def canonical_class_path(class_path: str) -> str:
    """This package's path for a class path any pyspacer release wrote; others unchanged."""
    if class_path in KNOWN_CLASS_PATHS:
        name = class_path.rsplit(".", 1)[1]
        return f"{_HOME[name]}.{name}"
    return class_path
