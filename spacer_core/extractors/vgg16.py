"""VGG16CaffeExtractor: CoralNet's legacy 4096-d features from a Caffe VGG16, without Caffe.

The `.prototxt` definition and `.caffemodel` weights are read with protobuf
and rebuilt in PyTorch (`spacer_core.caffe.build_caffe_network`), which
feeds Caffe's input (BGR, mean 128, unscaled) and returns blob `fc7` after
the whole forward pass, as pyspacer's Caffe path does. The network runs
through the current runtime's compiled backends, as EfficientNet's does.
"""

from __future__ import annotations

import hashlib
from typing import ClassVar

import numpy as np
from torch import nn

from spacer_core import limits
from spacer_core.caffe import build_caffe_network, output_size
from spacer_core.exceptions import ConfigError  # noqa: F401  (pyspacer exposes it here)
from spacer_core.extractors.base import FeatureExtractor
from spacer_core.inference.network import NetworkSpec

FEATURE_DIM = 4096
# pyspacer starts the forward pass here (skipping the data layer) and reads this blob.
START_LAYER = "conv1_1"
SCORE_LAYER = "fc7"


def combined_sha256(definition_sha256: str, weights_sha256: str) -> str:
    """One cache key for a definition + weights pair: the network depends on both files."""
    return hashlib.sha256(f"caffe:{definition_sha256}:{weights_sha256}".encode()).hexdigest()


def build_vgg16_network(definition: bytes, weights: bytes, label: str) -> nn.Module:
    """The PyTorch network for a Caffe definition + weights pair, returning blob fc7, frozen."""
    net = build_caffe_network(definition, weights, label, output_blob=SCORE_LAYER, start_layer=START_LAYER)
    net.eval()
    for param in net.parameters():
        param.requires_grad_(False)
    return net


class VGG16CaffeExtractor(FeatureExtractor):
    """fc7 activations of a Caffe VGG16 (`definition` .prototxt + `weights` .caffemodel).

    The network is compiled once per file pair (keyed by a sha256 over both
    files) and kept by the runtime between calls.
    """

    DATA_LOCATION_KEYS: ClassVar[list[str]] = ["definition", "weights"]
    PYSPACER_CLASS_PATH: ClassVar[str | None] = "spacer.extractors.vgg16.VGG16CaffeExtractor"
    # pyspacer's names. Batches are sized by the runtime; features do not depend on it.
    BATCH_SIZE: ClassVar[int] = 10
    START_LAYER: ClassVar[str] = START_LAYER
    SCORE_LAYER: ClassVar[str] = SCORE_LAYER

    @property
    def feature_dim(self) -> int:
        return FEATURE_DIM

    def network(self) -> tuple[NetworkSpec, bool]:
        definition = self.resolve_data("definition")
        weights = self.resolve_data("weights")
        label = (
            f"{self.data_locations['definition'].describe()} + {self.data_locations['weights'].describe()}"
        )
        # fc7's size as the definition gives it (4096 for CoralNet's VGG16).
        dim = output_size(definition.read(), f"{label} (definition)", SCORE_LAYER) or FEATURE_DIM
        limits.current().check_feature_dim(dim, f"{label}: blob '{SCORE_LAYER}' width")
        spec = NetworkSpec(
            combined_sha256(definition.sha256, weights.sha256),
            dim,
            lambda: build_vgg16_network(definition.read(), weights.read(), label),
            label,
        )
        return spec, definition.remote_loaded or weights.remote_loaded


class Transformer:
    """pyspacer's Caffe-style patch conversion: RGB HxWx3 -> BGR 3xHxW float32, minus `mean`, times `scale`.

    The network path does this itself (`spacer_core.caffe`); this is for code
    that prepared or inspected patches with pyspacer's class.
    """

    def __init__(self, mean: tuple[float, ...] = (0, 0, 0)) -> None:
        self.mean = np.array(mean, dtype=np.float32)
        self.scale = 1.0

    def preprocess(self, im: np.ndarray) -> np.ndarray:
        """RGB HxWx3 pixels -> BGR 3xHxW float32 with the mean subtracted and the scale applied."""
        bgr = np.asarray(im, dtype=np.float32)[:, :, ::-1]
        return ((bgr - self.mean) * self.scale).transpose(2, 0, 1)

    def deprocess(self, im: np.ndarray) -> np.ndarray:
        """The inverse of `preprocess`, back to RGB HxWx3 uint8 (values wrap as numpy's cast does)."""
        hwc = np.asarray(im, dtype=np.float32).transpose(1, 2, 0) / self.scale + self.mean
        return hwc[:, :, ::-1].astype(np.uint8)
