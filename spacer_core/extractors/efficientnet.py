"""EfficientNet-b0 as CoralNet trained it, and the extractor that runs it.

The network follows the layout of lukemelas' EfficientNet-PyTorch.

Parameter names match the state dicts CoralNet saved (`_conv_stem`, `_bn0`,
`_blocks.N._expand_conv`, ..., `_conv_head`, `_bn1`, `_fc`), so a weights file
loads with strict key matching. Only inference is supported: drop-connect and
dropout are training-time regularisers and are left out.
"""

import os
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from spacer_core.exceptions import InvalidInputError
from spacer_core.extractors.efficientnet_utils import (
    B0_BLOCKS,
    BlockArgs,
    GlobalParams,
    efficientnet_params,
    get_model_params,
    round_filters,
    round_repeats,
    same_padding,
    swish,
)

# Re-exported: pyspacer's extractors.efficientnet offers these names to its importers.
from spacer_core.extractors.efficientnet_utils import drop_connect as drop_connect
from spacer_core.extractors.efficientnet_utils import get_same_padding_conv2d as get_same_padding_conv2d
from spacer_core.extractors.efficientnet_utils import relu_fn as relu_fn
from spacer_core.extractors.torch_extractors import TorchExtractor
from spacer_core.extractors.torch_weights import WeightsSource, load_into, read_state_dict
from spacer_core.inference.network import NetworkSpec

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


# EfficientNet-b0 (width and depth multipliers 1.0, so no rounding applies),
# from the stage table shared with the pyspacer-style helpers.
B0_STAGES: tuple[Stage, ...] = tuple(
    Stage(b.num_repeat, b.kernel_size, b.stride[0], b.expand_ratio, b.input_filters, b.output_filters)
    for b in B0_BLOCKS
)


def _same_padding(kernel: int, stride: int) -> tuple[int, int, int, int]:
    """TF 'SAME' padding for a 224-sized input, as (left, right, top, bottom).

    The network pads every conv as if its input were INPUT_SIZE wide (static
    padding); every stride-2 layer sees an even size, so that equals the true
    SAME padding. Stride 2 pads one more pixel on the right/bottom than left/top.
    """
    before, after = same_padding(INPUT_SIZE, kernel, stride)
    return (before, after, before, after)


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
            x = F.pad(x, self.pre_pad, mode="constant", value=0.0)
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


class EfficientNet(EfficientNetB0):
    """pyspacer's `EfficientNet` over this package's b0 network.

    As in pyspacer, `forward` returns class scores and `extract_features`
    the 1280-d pooled features, and parameters load from pyspacer's state
    dicts unchanged. Only b0 is built here (the only size CoralNet used):
    other sizes' names are recognised but refused. Inference only: dropout
    and drop-connect are not applied, in training mode either.
    """

    def __init__(self, blocks_args: list[BlockArgs] | None = None, global_params: GlobalParams | None = None):
        if blocks_args is None or global_params is None:
            raise InvalidInputError(
                "EfficientNet needs blocks_args and global_params;"
                " EfficientNet.from_name('efficientnet-b0') builds them"
            )
        _check_builds_b0(blocks_args, global_params)
        super().__init__(global_params.num_classes)
        self._blocks_args = list(blocks_args)
        self._global_params = global_params

    def extract_features(self, inputs: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) float in [0, 1] -> (N, 1280) pooled features."""
        return super().forward(inputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, num_classes) class scores."""
        return self._fc(self.extract_features(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores, as `forward`."""
        return self.forward(x)

    @classmethod
    def from_name(cls, model_name: str, override_params: dict[str, Any] | None = None) -> "EfficientNet":
        """The untrained network of that name ('efficientnet-b0'), GlobalParams fields overridden."""
        cls._check_model_name_is_valid(model_name)
        return cls(*get_model_params(model_name, override_params))

    @classmethod
    def from_pretrained(cls, model_name: str, num_classes: int = 1000) -> "EfficientNet":
        """The network with `num_classes` outputs; untrained, as pyspacer's (which downloads nothing)."""
        return cls.from_name(model_name, override_params={"num_classes": num_classes})

    @classmethod
    def get_image_size(cls, model_name: str) -> int:
        """The input resolution of that model size (224 for b0)."""
        cls._check_model_name_is_valid(model_name)
        return efficientnet_params(model_name)[2]

    @classmethod
    def _check_model_name_is_valid(cls, model_name: str) -> None:
        """Raise a ValueError unless the name is efficientnet-b0 ... b8 ('-' or '_')."""
        valid = [f"efficientnet_b{i}" for i in range(9)]
        if not isinstance(model_name, str) or model_name.replace("-", "_") not in valid:
            raise InvalidInputError(
                f"Unknown EfficientNet model name {model_name!r}; use one of {', '.join(valid)}"
            )


def _check_builds_b0(blocks_args: list[BlockArgs], global_params: GlobalParams) -> None:
    """Refuse, naming the difference, any architecture other than b0 (the only one built here)."""
    scaled = [
        b._replace(
            input_filters=round_filters(b.input_filters, global_params),
            output_filters=round_filters(b.output_filters, global_params),
            num_repeat=round_repeats(b.num_repeat, global_params),
        )
        for b in blocks_args
    ]
    if scaled != list(B0_BLOCKS):
        raise InvalidInputError(
            "Only EfficientNet-b0 is built here; blocks_args (after width and depth scaling) differ from b0's"
        )
    if (
        round_filters(STEM_CHANNELS, global_params) != STEM_CHANNELS
        or round_filters(FEATURE_DIM, global_params) != FEATURE_DIM
    ):
        raise InvalidInputError(
            "Only EfficientNet-b0 is built here; global_params.width_coefficient changes its widths"
        )
    if global_params.image_size not in (None, INPUT_SIZE):
        raise InvalidInputError(
            f"Only {INPUT_SIZE}x{INPUT_SIZE} input padding is built here,"
            f" got image_size={global_params.image_size!r}"
        )
    if (global_params.batch_norm_momentum, global_params.batch_norm_epsilon) != (1 - BN_MOMENTUM, BN_EPS):
        raise InvalidInputError(
            "Only TensorFlow's BatchNorm settings (momentum 0.99, epsilon 1e-3) are built here"
        )
    classes = global_params.num_classes
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
        raise InvalidInputError(f"global_params.num_classes must be a positive int, got {classes!r}")


def build_network(source: WeightsSource, name: str | None = None) -> EfficientNetB0:
    """EfficientNet-b0 loaded from a CoralNet weights file (path, bytes or stream), in eval mode.

    The returned module maps (N, 3, 224, 224) float32 in [0, 1] to (N, 1280)
    features; backends may trace, script or export it.
    """
    label = name or (os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<weights bytes>")
    state = read_state_dict(source, label, kind="EfficientNet-b0 weights")
    net = EfficientNetB0()
    load_into(net, state, label)
    net.eval()
    for param in net.parameters():
        param.requires_grad_(False)
    return net


class EfficientNetExtractor(TorchExtractor):
    """CoralNet 1.0's extractor: EfficientNet-b0 weights in a PyTorch file -> 1280-d features.

    The network is compiled once per weights file (keyed by its sha256) and
    kept by the runtime between calls.
    """

    PYSPACER_CLASS_PATH: ClassVar[str | None] = "spacer.extractors.efficientnet.EfficientNetExtractor"

    # pyspacer's names for the architecture.
    MODEL_NAME: ClassVar[str] = "efficientnet-b0"
    NUM_CLASSES: ClassVar[int] = NUM_CLASSES

    @property
    def feature_dim(self) -> int:
        return FEATURE_DIM

    @classmethod
    def untrained_model(cls) -> EfficientNetB0:
        """The network with fresh (untrained) parameters, in eval mode."""
        return EfficientNetB0(cls.NUM_CLASSES).eval()

    def network(self) -> tuple[NetworkSpec, bool]:
        data = self.resolve_data("weights")
        label = self.data_locations["weights"].describe()
        spec = NetworkSpec(data.sha256, FEATURE_DIM, lambda: build_network(data.read(), label), label)
        return spec, data.remote_loaded
