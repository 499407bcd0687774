"""Feature extractors: crop patches at points and turn them into feature vectors."""

from spacer_core.extractors.base import ExtractorData, FeatureExtractor
from spacer_core.extractors.class_paths import register_extractor_class
from spacer_core.extractors.dummy import DummyExtractor
from spacer_core.extractors.efficientnet import EfficientNetExtractor, build_network
from spacer_core.extractors.runner import RUNNERS, NetworkRunner, RunnerFactory, TorchRunner
from spacer_core.extractors.torch_weights import WeightsFileError
from spacer_core.extractors.vgg16 import VGG16CaffeExtractor

__all__ = [
    "RUNNERS",
    "DummyExtractor",
    "EfficientNetExtractor",
    "ExtractorData",
    "FeatureExtractor",
    "NetworkRunner",
    "RunnerFactory",
    "TorchRunner",
    "VGG16CaffeExtractor",
    "WeightsFileError",
    "build_network",
    "register_extractor_class",
]
