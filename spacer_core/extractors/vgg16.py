"""VGG16CaffeExtractor: CoralNet's legacy 4096-d features from a Caffe VGG16.

Runs only where the `caffe` Python module is installed; elsewhere its
messages still load and serialize, and calling it raises ConfigError.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from spacer_core import config
from spacer_core.crop import crop_array
from spacer_core.exceptions import ConfigError
from spacer_core.extractors.base import FeatureExtractor, RowCol

# Caffe's VGG16 input: BGR channels minus this mean, unscaled.
PIXEL_MEAN = 128.0


def has_caffe() -> bool:
    """Whether the `caffe` module can be imported here."""
    return importlib.util.find_spec("caffe") is not None


class VGG16CaffeExtractor(FeatureExtractor):
    """fc7 activations of a Caffe VGG16 (`definition` .prototxt + `weights` .caffemodel)."""

    DATA_LOCATION_KEYS: ClassVar[list[str]] = ["definition", "weights"]
    PYSPACER_CLASS_PATH: ClassVar[str | None] = "spacer.extractors.vgg16.VGG16CaffeExtractor"
    BATCH_SIZE: ClassVar[int] = 10
    START_LAYER: ClassVar[str] = "conv1_1"
    SCORE_LAYER: ClassVar[str] = "fc7"

    _net_lock = threading.Lock()
    _net_cache: dict[tuple[str, str], Any] = {}

    @property
    def feature_dim(self) -> int:
        return 4096

    def __call__(self, im: Image.Image, rowcols: Sequence[RowCol]):  # type: ignore[no-untyped-def]
        if not has_caffe():
            raise ConfigError(f"Need Caffe installed to call {type(self).__name__}.")
        return super().__call__(im, rowcols)

    def _load_net(self) -> tuple[Any, bool]:
        definition, _ = self.load_data_into_filesystem("definition")
        weights, loaded_remotely = self.load_data_into_filesystem("weights")
        with self._net_lock:
            net = self._net_cache.get((definition, weights))
            if net is None:
                import caffe  # type: ignore[import-not-found]  # only where Caffe is installed

                caffe.set_mode_cpu()
                net = caffe.Net(definition, weights, caffe.TEST)
                # One net at a time: VGG16 is large.
                self._net_cache.clear()
                self._net_cache[(definition, weights)] = net
        return net, loaded_remotely

    def extract_rgb(self, rgb: np.ndarray, rowcols: Sequence[RowCol]) -> tuple[np.ndarray, bool]:
        net, loaded_remotely = self._load_net()
        feats = np.empty((len(rowcols), self.feature_dim), dtype=np.float64)
        with config.log_entry_and_exit("forward pass through net"), self._net_lock:
            for start in range(0, len(rowcols), self.BATCH_SIZE):
                patches = crop_array(rgb, rowcols[start : start + self.BATCH_SIZE], self.CROP_SIZE)
                # RGB -> BGR, minus the mean, HWC -> CHW.
                batch = (patches[..., ::-1].astype(np.float32) - PIXEL_MEAN).transpose(0, 3, 1, 2)
                net.blobs["data"].data[: len(batch)] = batch
                net.forward(start=self.START_LAYER)
                feats[start : start + len(batch)] = net.blobs[self.SCORE_LAYER].data[: len(batch)]
        return feats, loaded_remotely
