"""TorchExtractor: the base of extractors whose network is a PyTorch module in one weights file.

Mirrors pyspacer's `spacer.extractors.torch_extractors`. The network itself
runs through the runtime's compiled backends (`FeatureExtractor.network()`),
not through a per-extractor loop, so only the construction helpers live here.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import nn

from spacer_core.data_classes import DataLocation
from spacer_core.exceptions import InvalidInputTypeError
from spacer_core.extractors.base import FeatureExtractor
from spacer_core.extractors.torch_weights import load_into, read_state_dict
from spacer_core.storage import storage_factory, store_bytes

__all__ = ["DataLocation", "FeatureExtractor", "TorchExtractor", "storage_factory", "transformation"]


def _to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    if isinstance(image, Image.Image):
        image = np.asarray(image)
    if not isinstance(image, np.ndarray):
        raise InvalidInputTypeError(
            f"transformation() takes a PIL image or a numpy array, got {type(image).__name__}"
        )
    array = image[:, :, None] if image.ndim == 2 else image
    # A copy: PIL hands out read-only buffers, and the caller keeps its array.
    chw = torch.from_numpy(array.transpose(2, 0, 1).copy())
    # 8-bit pixels scale to [0, 1]; float arrays are taken as already scaled.
    return chw.float().div(255) if array.dtype == np.uint8 else chw


def transformation() -> Callable[[Image.Image | np.ndarray], torch.Tensor]:
    """A callable: HxWxC image (PIL or numpy) -> CxHxW float tensor, uint8 scaled to [0, 1].

    The same conversion as torchvision's ToTensor, which pyspacer applies to
    each patch before its network.
    """
    return _to_tensor


class TorchExtractor(FeatureExtractor):
    """An extractor over one PyTorch weights file (`weights`); subclasses give `untrained_model()`."""

    DATA_LOCATION_KEYS: ClassVar[list[str]] = ["weights"]
    # pyspacer's batch size; here the runtime sizes batches and features do not depend on it.
    BATCH_SIZE: ClassVar[int] = 10

    @classmethod
    def untrained_model(cls) -> nn.Module:
        """The network with fresh (untrained) parameters."""
        raise NotImplementedError(f"{cls.__name__} does not define untrained_model()")

    @classmethod
    def load_weights(cls, weights_datastream: io.BytesIO) -> Any:
        """The network loaded from a weights file's content (`module.` prefixes allowed), frozen, in eval mode."""
        label = "<weights stream>"
        net = cls.untrained_model()
        load_into(net, read_state_dict(weights_datastream.getvalue(), label), label)
        net.eval()
        for param in net.parameters():
            param.requires_grad_(False)
        return net

    @classmethod
    def untrained_instance(cls, data_loc_key: str = "weights") -> Any:
        """An extractor over untrained weights kept in memory storage under `data_loc_key`.

        For tests and demos that need valid features of the right shape, not
        meaningful ones (as pyspacer's method of the same name).
        """
        buffer = io.BytesIO()
        torch.save({"net": cls.untrained_model().state_dict()}, buffer)
        location = DataLocation("memory", data_loc_key)
        store_bytes(location, buffer.getvalue())
        return cls(data_locations={"weights": location})
