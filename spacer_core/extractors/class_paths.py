"""Extractor class paths found in messages, mapped to this package's classes.

pyspacer writes `class_path` as the dotted path of the extractor class, and
the module holding each class moved between releases. Every path a pyspacer
release (0.5.0 to 0.14.0) or this package writes resolves here; any other
path must name a FeatureExtractor subclass inside spacer_core or one
registered with `register_extractor_class` (unlike pyspacer, a message
cannot make this process import an arbitrary module).
"""

from __future__ import annotations

from importlib import import_module

from spacer_core.data_classes import InvalidDataError

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

# Extractor classes defined outside spacer_core, registered by their users.
_REGISTERED: dict[str, type] = {}


def register_extractor_class(class_path: str, extractor_class: type) -> None:
    """Let messages name `extractor_class` (a FeatureExtractor subclass) by `class_path`."""
    from spacer_core.extractors.base import FeatureExtractor

    if not (isinstance(extractor_class, type) and issubclass(extractor_class, FeatureExtractor)):
        raise TypeError(f"{extractor_class!r} is not a FeatureExtractor subclass")
    _REGISTERED[class_path] = extractor_class


def resolve_class_path(class_path: object) -> type:
    """The FeatureExtractor subclass that `class_path` names; InvalidDataError if none."""
    from spacer_core import extractors
    from spacer_core.extractors.base import FeatureExtractor

    if not isinstance(class_path, str) or "." not in class_path:
        raise InvalidDataError(f"Extractor class_path must be a dotted path string, got {class_path!r}")
    if class_path in KNOWN_CLASS_PATHS:
        return getattr(extractors, class_path.rsplit(".", 1)[1])
    if class_path in _REGISTERED:
        return _REGISTERED[class_path]

    module_path, class_name = class_path.rsplit(".", 1)
    found = None
    # Only this package's modules are imported: a class path in a message
    # must not make us import arbitrary (pyspacer or third-party) code.
    if module_path == "spacer_core" or module_path.startswith("spacer_core."):
        try:
            found = getattr(import_module(module_path), class_name, None)
        except ImportError:
            found = None
    if isinstance(found, type) and issubclass(found, FeatureExtractor):
        return found
    raise InvalidDataError(
        f"Unknown extractor class_path {class_path!r}; expected one of {sorted(KNOWN_CLASS_PATHS)},"
        " a FeatureExtractor subclass in spacer_core, or a path given to register_extractor_class()"
    )
