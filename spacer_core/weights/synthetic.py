"""Deterministic EfficientNet-b0 weight files in CoralNet's format, made from a seed.

CoralNet's trained weights are not public, so tests, benchmarks and the demo
make their own: random convolutions with BatchNorm statistics calibrated on
image-like patches, so activations keep a useful scale through all 16 blocks
and features differ clearly from patch to patch (untrained BatchNorm
statistics shrink the features to ~1e-13, where any implementation would look
"identical").

`make_weights(path, seed)` writes a file and returns its sha256;
`cached_weights(seed)` makes one per process in a temporary directory.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from spacer_core.extractors.efficientnet import EfficientNetB0
from spacer_core.storage import write_file_atomic

DATAPARALLEL_PREFIX = "module."
_CALIBRATION_PATCHES = 8


class WeightsFile(NamedTuple):
    path: Path
    sha256: str


def _image_like_patches(generator: torch.Generator, n: int) -> torch.Tensor:
    """(n, 3, 224, 224) in [0, 1], from flat colour fields to pure pixel noise.

    Calibrating on this spread keeps features O(1) for whatever images the
    tests crop, smooth or noisy.
    """
    coarse = torch.rand(n, 3, 7, 7, generator=generator)
    smooth = F.interpolate(coarse, size=(224, 224), mode="bicubic", align_corners=False)
    noise = torch.rand(n, 3, 224, 224, generator=generator)
    mix = torch.linspace(0.0, 1.0, n).view(n, 1, 1, 1)
    return ((1 - mix) * smooth + mix * noise).clamp(0.0, 1.0)


@functools.lru_cache(maxsize=4)
def _calibrated_state(seed: int) -> OrderedDict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = EfficientNetB0()
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        with torch.no_grad():
            bn.weight.copy_(1.0 + 0.2 * torch.randn(bn.num_features, generator=generator))
            bn.bias.copy_(0.1 * torch.randn(bn.num_features, generator=generator))
        # Momentum 1 makes one training-mode pass store exactly that batch's
        # statistics, layer after layer, each seeing already-normalised inputs.
        bn.momentum = 1.0
    net.train()
    with torch.no_grad():
        net(_image_like_patches(generator, _CALIBRATION_PATCHES))
    state = net.state_dict()
    for name, value in state.items():
        if name.endswith("num_batches_tracked"):
            value.zero_()
    return OrderedDict((k, v.detach().clone()) for k, v in state.items())


def make_state_dict(seed: int = 0) -> OrderedDict[str, torch.Tensor]:
    """Random EfficientNet-b0 state dict (lukemelas keys, no prefix) with calibrated BatchNorm.

    Deterministic per seed; built once per process and copied, so callers may edit it.
    """
    return OrderedDict((k, v.clone()) for k, v in _calibrated_state(seed).items())


@functools.lru_cache(maxsize=8)
def weights_bytes(seed: int = 0, prefix: str = DATAPARALLEL_PREFIX) -> bytes:
    """The bytes of a CoralNet-format weights file: torch.save({'net': state_dict})."""
    state = _calibrated_state(seed)
    buffer = io.BytesIO()
    torch.save({"net": OrderedDict((prefix + k, v) for k, v in state.items())}, buffer)
    return buffer.getvalue()


def make_weights(path: str | os.PathLike[str], seed: int = 0, prefix: str = DATAPARALLEL_PREFIX) -> str:
    """Write a weights file to `path` (keys prefixed by `prefix`); return its sha256 hex digest."""
    data = weights_bytes(seed, prefix)
    write_file_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


_session_files: dict[tuple[int, str], WeightsFile] = {}


def cached_weights(seed: int = 0, prefix: str = DATAPARALLEL_PREFIX) -> WeightsFile:
    """One weights file per (seed, prefix) per process, in a temporary directory."""
    key = (seed, prefix)
    if key not in _session_files:
        folder = Path(tempfile.mkdtemp(prefix="spacer-weights-"))
        tag = "module" if prefix else "plain"
        path = folder / f"efficientnet_b0_seed{seed}_{tag}.pt"
        _session_files[key] = WeightsFile(path, make_weights(path, seed, prefix))
    return _session_files[key]
