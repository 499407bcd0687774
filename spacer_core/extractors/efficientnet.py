"""EfficientNet-b0 as CoralNet trained it, and the extractor that runs it.

The network follows the layout of lukemelas' EfficientNet-PyTorch.

Parameter names match the state dicts CoralNet saved (`_conv_stem`, `_bn0`,
`_blocks.N._expand_conv`, ..., `_conv_head`, `_bn1`, `_fc`), so a weights file
loads with strict key matching. Only inference is supported: drop-connect and
dropout are training-time regularisers and are left out.
"""

import io
import os
from typing import ClassVar, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from spacer_core.data_classes import DataLocation
from spacer_core.extractors.base import FeatureExtractor
from spacer_core.extractors.torch_weights import WeightsSource, load_into, read_state_dict
from spacer_core.inference.network import NetworkSpec
from spacer_core.storage import store_bytes

INPUT_SIZE = 224
FEATURE_DIM = 1280
NUM_CLASSES = 1275
# TensorFlow's BatchNorm decay 0.99 is PyTorch momentum 0.01; eps as in TF.
BN_MOMENTUM = 1 - 0.99
BN_EPS = 1e-3
STEM_CHANNELS = 32
SE_RATIO = 0.25


class Stage(NamedTuple):
    """One row of the b0 architecture table: `repeats` blocks of one shape."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    in_ch: int
    out_ch: int


# EfficientNet-b0 (width and depth multipliers 1.0, so no rounding applies).
B0_STAGES: tuple[Stage, ...] = (
    Stage(1, 3, 1, 1, 32, 16),
    Stage(2, 3, 2, 6, 16, 24),
    Stage(2, 5, 2, 6, 24, 40),
    Stage(3, 3, 2, 6, 40, 80),
    Stage(3, 5, 1, 6, 80, 112),
    Stage(4, 5, 2, 6, 112, 192),
    Stage(1, 3, 1, 6, 192, 320),
)


def swish(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x), written out as CoralNet's network computes it."""
    return x * torch.sigmoid(x)


def _same_padding(kernel: int, stride: int) -> tuple[int, int, int, int]:
    """TF 'SAME' padding for a 224-sized input, as (left, right, top, bottom).

    The network pads every conv as if its input were INPUT_SIZE wide (static
    padding); every stride-2 layer sees an even size, so that equals the true
    SAME padding. Stride 2 pads one more pixel on the right/bottom than left/top.
    """
    out = -(-INPUT_SIZE // stride)
    total = max((out - 1) * stride + kernel - INPUT_SIZE, 0)
    before = total // 2
    return (before, total - before, before, total - before)


class SameConv2d(nn.Conv2d):
    """Conv2d with TF-style static SAME padding (asymmetric for stride 2)."""

    pre_pad: list[int]

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int,
        stride: int = 1,
        groups: int = 1,
        bias: bool = False,
    ):
        left, right, top, bottom = _same_padding(kernel, stride)
        symmetric = left == right and top == bottom
        # Symmetric padding goes into the conv itself (one fewer copy of the
        # activations); only the asymmetric stride-2 case needs an explicit pad.
        super().__init__(
            in_ch,
            out_ch,
            kernel,
            stride=stride,
            padding=left if symmetric else 0,
            groups=groups,
            bias=bias,
        )
        self.pre_pad = [] if symmetric else [left, right, top, bottom]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.pre_pad) > 0:
            x = F.pad(x, self.pre_pad)
        return self._conv_forward(x, self.weight, self.bias)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck: expand 1x1, depthwise kxk, squeeze-excite, project 1x1."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(in_ch, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = _bn(mid)
        squeezed = max(1, int(in_ch * SE_RATIO))
        self._se_reduce = SameConv2d(mid, squeezed, 1, bias=True)
        self._se_expand = SameConv2d(squeezed, mid, 1, bias=True)
        self._project_conv = SameConv2d(mid, out_ch, 1)
        self._bn2 = _bn(out_ch)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if hasattr(self, "_expand_conv"):
            x = swish(self._bn0(self._expand_conv(x)))
        x = swish(self._bn1(self._depthwise_conv(x)))
        scale = F.adaptive_avg_pool2d(x, 1)
        scale = self._se_expand(swish(self._se_reduce(scale)))
        x = torch.sigmoid(scale) * x
        x = self._bn2(self._project_conv(x))
        if self.residual:
            x = x + inputs
        return x


class EfficientNetB0(nn.Module):
    """EfficientNet-b0; `forward` returns the 1280-d pooled features, not logits.

    `_fc` (1275 CoralNet classes) exists so weight files load strictly;
    `logits()` applies it for completeness.
    """

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks = []
        for stage in B0_STAGES:
            for i in range(stage.repeats):
                first = i == 0
                blocks.append(
                    MBConvBlock(
                        stage.in_ch if first else stage.out_ch,
                        stage.out_ch,
                        stage.kernel,
                        stage.stride if first else 1,
                        stage.expand,
                    )
                )
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(B0_STAGES[-1].out_ch, FEATURE_DIM, 1)
        self._bn1 = _bn(FEATURE_DIM)
        self._fc = nn.Linear(FEATURE_DIM, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 224, 224) float in [0, 1] -> (N, 1280) features."""
        x = swish(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = swish(self._bn1(self._conv_head(x)))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores from the CoralNet training head (unused for features)."""
        return self._fc(self.forward(x))


def build_network(source: WeightsSource, name: str | None = None) -> EfficientNetB0:
    """EfficientNet-b0 loaded from a CoralNet weights file (path, bytes or stream), in eval mode.

    The returned module maps (N, 3, 224, 224) float32 in [0, 1] to (N, 1280)
    features; backends may trace, script or export it.
    """
    label = name or (os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<weights bytes>")
    state = read_state_dict(source, label)
    net = EfficientNetB0()
    load_into(net, state, label)
    net.eval()
    for param in net.parameters():
        param.requires_grad_(False)
    return net


class EfficientNetExtractor(FeatureExtractor):
    """CoralNet 1.0's extractor: EfficientNet-b0 weights in a PyTorch file -> 1280-d features.

    The network is compiled once per weights file (keyed by its sha256) and
    kept by the runtime between calls.
    """

    DATA_LOCATION_KEYS: ClassVar[list[str]] = ["weights"]
    PYSPACER_CLASS_PATH: ClassVar[str | None] = "spacer.extractors.efficientnet.EfficientNetExtractor"

    # pyspacer's names for the architecture, and its batch size (here the
    # runtime sizes batches; features do not depend on it).
    MODEL_NAME: ClassVar[str] = "efficientnet-b0"
    NUM_CLASSES: ClassVar[int] = NUM_CLASSES
    BATCH_SIZE: ClassVar[int] = 10

    @property
    def feature_dim(self) -> int:
        return FEATURE_DIM

    @classmethod
    def untrained_model(cls) -> EfficientNetB0:
        """The network with fresh (untrained) parameters, in eval mode."""
        return EfficientNetB0(cls.NUM_CLASSES).eval()

    @classmethod
    def load_weights(cls, weights_datastream: io.BytesIO) -> EfficientNetB0:
        """The network loaded from a CoralNet weights file's content (`module.` prefixes allowed)."""
        return build_network(weights_datastream.getvalue(), "<weights stream>")

    @classmethod
    def untrained_instance(cls, data_loc_key: str = "weights") -> "EfficientNetExtractor":
        """An extractor over untrained weights kept in memory storage under `data_loc_key`.

        For tests and demos that need valid features of the right shape, not
        meaningful ones (as pyspacer's method of the same name).
        """
        buffer = io.BytesIO()
        torch.save({"net": cls.untrained_model().state_dict()}, buffer)
        location = DataLocation("memory", data_loc_key)
        store_bytes(location, buffer.getvalue())
        return cls(data_locations={"weights": location})

    def network(self) -> tuple[NetworkSpec, bool]:
        data = self.resolve_data("weights")
        label = self.data_locations["weights"].describe()
        spec = NetworkSpec(data.sha256, FEATURE_DIM, lambda: build_network(data.read(), label), label)
        return spec, data.remote_loaded
