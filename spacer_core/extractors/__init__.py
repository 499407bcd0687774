"""Feature extractors: crop patches at points and turn them into feature vectors."""

from spacer_core.extractors.base import (
    ExtractorData,
    FeatureExtractor,
    register_extractor_class,
    resolve_class_path,
)
from spacer_core.extractors.dummy import DummyExtractor
from spacer_core.extractors.efficientnet import EfficientNetExtractor, build_network
from spacer_core.extractors.torch_weights import WeightsFileError
from spacer_core.extractors.vgg16 import VGG16CaffeExtractor

__all__ = [
    "DummyExtractor",
    "EfficientNetExtractor",
    "ExtractorData",
    "FeatureExtractor",
    "VGG16CaffeExtractor",
    "WeightsFileError",
    "build_network",
    "register_extractor_class",
    "resolve_class_path",
]
