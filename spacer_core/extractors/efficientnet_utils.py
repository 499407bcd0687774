"""pyspacer's EfficientNet helpers (`spacer.extractors.efficientnet_utils`), for this package's network.

The architecture is described as in lukemelas' EfficientNet-PyTorch: a
`GlobalParams` for the whole network and one `BlockArgs` per stage, with
stages written as strings such as ``r2_k3_s22_e6_i16_o24_se0.25`` (repeats,
kernel, strides, expansion, input and output channels, squeeze-excite
ratio). `B0_BLOCKS` is the b0 table our network (`extractors.efficientnet`)
is built from. Helpers for other sizes (b1-b7) answer as pyspacer's do, but
only b0 can be built here.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from spacer_core.exceptions import InvalidInputError


class GlobalParams(NamedTuple):
    """Settings shared by every layer of an EfficientNet (field order as pyspacer's; all default None)."""

    batch_norm_momentum: Any = None
    batch_norm_epsilon: Any = None
    dropout_rate: Any = None
    num_classes: Any = None
    width_coefficient: Any = None
    depth_coefficient: Any = None
    depth_divisor: Any = None
    min_depth: Any = None
    drop_connect_rate: Any = None
    image_size: Any = None


class BlockArgs(NamedTuple):
    """One stage of MBConv blocks (field order as pyspacer's; all default None; `stride` is a 1-item list)."""

    kernel_size: Any = None
    num_repeat: Any = None
    input_filters: Any = None
    output_filters: Any = None
    expand_ratio: Any = None
    id_skip: Any = None
    stride: Any = None
    se_ratio: Any = None


class UnknownModelError(InvalidInputError, KeyError):
    """An EfficientNet size this table lacks (also a KeyError, as pyspacer's dict lookup raised)."""

    def __str__(self) -> str:
        # KeyError would print the message quoted, as a repr.
        return str(self.args[0]) if self.args else ""


class BlockStringError(InvalidInputError, AssertionError):
    """A malformed block string (also an AssertionError, as pyspacer's checks raised)."""


def swish(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x), written out as CoralNet's network computes it."""
    return x * torch.sigmoid(x)


# pyspacer's (and lukemelas') name for swish.
relu_fn = swish


def round_filters(filters: int, global_params: Any) -> int:
    """Channel count scaled by the width coefficient, rounded to a multiple of `depth_divisor`.

    Rounding never drops more than 10% below the scaled count, nor below
    `min_depth` (the divisor when unset). Without a coefficient the count is
    returned unchanged.
    """
    width = global_params.width_coefficient
    if not width:
        return filters
    divisor = global_params.depth_divisor
    floor = global_params.min_depth or divisor
    scaled = filters * width
    rounded = max(floor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def round_repeats(repeats: int, global_params: Any) -> int:
    """Block count scaled by the depth coefficient, rounded up (unchanged without one)."""
    depth = global_params.depth_coefficient
    if not depth:
        return repeats
    return int(math.ceil(depth * repeats))


def drop_connect(inputs: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: in training, zero whole samples with probability `p` and rescale the rest.

    Outside training the input is returned as it is. Draws one uniform number
    per sample from torch's generator, as pyspacer does, so seeded runs agree.
    """
    if not training:
        return inputs
    keep = 1 - p
    noise = torch.rand([inputs.shape[0], 1, 1, 1], dtype=inputs.dtype, device=inputs.device)
    mask = torch.floor(keep + noise)
    return inputs / keep * mask


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow 'SAME' padding along one axis as (before, after); the odd pixel goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _pad_amounts(conv: nn.Conv2d, height: int, width: int) -> list[int]:
    """F.pad's [left, right, top, bottom] for SAME output of `conv` on a height x width input."""
    kh, kw = conv.weight.shape[-2:]
    top, bottom = same_padding(height, kh, conv.stride[0], conv.dilation[0])
    left, right = same_padding(width, kw, conv.stride[1], conv.dilation[1])
    return [left, right, top, bottom]


class Conv2dDynamicSamePadding(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding worked out from each input's size."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
    ):
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = _pad_amounts(self, x.shape[-2], x.shape[-1])
        if any(pad):
            x = F.pad(x, pad)
        return self._conv_forward(x, self.weight, self.bias)


class Conv2dStaticSamePadding(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding fixed for one input size (`image_size`: int or [h, w])."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        image_size: int | Sequence[int] | None = None,
        **kwargs: Any,
    ):
        super().__init__(in_channels, out_channels, kernel_size, **kwargs)
        if image_size is None:
            raise InvalidInputError("Conv2dStaticSamePadding needs image_size (an int or [height, width])")
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        left, right, top, bottom = _pad_amounts(self, height, width)
        # Same submodule name as pyspacer's, so module listings read alike; it has no parameters.
        self.static_padding: nn.Module = (
            nn.ZeroPad2d((left, right, top, bottom)) if any((left, right, top, bottom)) else Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.static_padding(x), self.weight, self.bias)


Identity = nn.Identity


def get_same_padding_conv2d(image_size: int | Sequence[int] | None = None) -> Callable[..., nn.Conv2d]:
    """The SAME-padding conv to build with: padding fixed for `image_size`, or per input when None.

    Fixed padding is what exports (ONNX, TorchScript) need.
    """
    if image_size is None:
        return Conv2dDynamicSamePadding
    return functools.partial(Conv2dStaticSamePadding, image_size=image_size)


# Size -> (width coefficient, depth coefficient, input resolution, dropout rate),
# the compound scaling of the EfficientNet paper.
_SIZES: dict[str, tuple[float, float, int, float]] = {
    "efficientnet-b0": (1.0, 1.0, 224, 0.2),
    "efficientnet-b1": (1.0, 1.1, 240, 0.2),
    "efficientnet-b2": (1.1, 1.2, 260, 0.3),
    "efficientnet-b3": (1.2, 1.4, 300, 0.3),
    "efficientnet-b4": (1.4, 1.8, 380, 0.4),
    "efficientnet-b5": (1.6, 2.2, 456, 0.4),
    "efficientnet-b6": (1.8, 2.6, 528, 0.5),
    "efficientnet-b7": (2.0, 3.1, 600, 0.5),
}


def efficientnet_params(model_name: str) -> tuple[float, float, int, float]:
    """(width coefficient, depth coefficient, resolution, dropout rate) of 'efficientnet-bN'."""
    try:
        return _SIZES[model_name]
    except (KeyError, TypeError):
        raise UnknownModelError(
            f"Unknown EfficientNet model name {model_name!r}; known: {', '.join(_SIZES)}"
        ) from None


def _block_from_string(block_string: str) -> BlockArgs:
    if not isinstance(block_string, str):
        raise BlockStringError(f"A block string must be a str, got {type(block_string).__name__}")
    options = {}
    for part in block_string.split("_"):
        # Each part is a letter key followed by its number, e.g. "k3", "se0.25".
        match = re.match(r"(\D*)(\d.*)", part)
        if match:
            options[match.group(1)] = match.group(2)
    strides = options.get("s", "")
    if not (len(strides) == 1 or (len(strides) == 2 and strides[0] == strides[1])):
        raise BlockStringError(f"Block string {block_string!r} needs equal strides such as s11 or s22")
    try:
        return BlockArgs(
            kernel_size=int(options["k"]),
            num_repeat=int(options["r"]),
            input_filters=int(options["i"]),
            output_filters=int(options["o"]),
            expand_ratio=int(options["e"]),
            id_skip="noskip" not in block_string,
            stride=[int(strides[0])],
            se_ratio=float(options["se"]) if "se" in options else None,
        )
    except (KeyError, ValueError) as err:
        raise BlockStringError(f"Block string {block_string!r} lacks or garbles a field ({err})") from None


def _block_to_string(block: Any) -> str:
    # pyspacer reads `strides` (a pair); BlockArgs as decoded carries `stride`
    # (a 1-item list), so either is taken.
    strides = getattr(block, "strides", None) or block.stride
    first, second = (strides[0], strides[-1]) if isinstance(strides, Sequence) else (strides, strides)
    parts = [
        f"r{block.num_repeat:d}",
        f"k{block.kernel_size:d}",
        f"s{first:d}{second:d}",
        f"e{block.expand_ratio}",
        f"i{block.input_filters:d}",
        f"o{block.output_filters:d}",
    ]
    if block.se_ratio is not None and 0 < block.se_ratio <= 1:
        parts.append(f"se{block.se_ratio}")
    if block.id_skip is False:
        parts.append("noskip")
    return "_".join(parts)


class BlockDecoder:
    """Converts between block strings and `BlockArgs`."""

    @staticmethod
    def decode(string_list: list[str]) -> list[BlockArgs]:
        """One BlockArgs per block string."""
        if not isinstance(string_list, list):
            raise BlockStringError(
                f"BlockDecoder.decode takes a list of strings, got {type(string_list).__name__}"
            )
        return [_block_from_string(text) for text in string_list]

    @staticmethod
    def encode(blocks_args: list[Any]) -> list[str]:
        """One block string per BlockArgs (or any object with the same fields, `strides` or `stride`)."""
        return [_block_to_string(block) for block in blocks_args]


# EfficientNet-b0's stages, the table this package's network is built from.
B0_BLOCK_STRINGS: tuple[str, ...] = (
    "r1_k3_s11_e1_i32_o16_se0.25",
    "r2_k3_s22_e6_i16_o24_se0.25",
    "r2_k5_s22_e6_i24_o40_se0.25",
    "r3_k3_s22_e6_i40_o80_se0.25",
    "r3_k5_s11_e6_i80_o112_se0.25",
    "r4_k5_s22_e6_i112_o192_se0.25",
    "r1_k3_s11_e6_i192_o320_se0.25",
)
B0_BLOCKS: tuple[BlockArgs, ...] = tuple(BlockDecoder.decode(list(B0_BLOCK_STRINGS)))


def efficientnet(
    width_coefficient: float | None = None,
    depth_coefficient: float | None = None,
    dropout_rate: float = 0.2,
    drop_connect_rate: float = 0.2,
    image_size: int | None = None,
    num_classes: int = 1000,
) -> tuple[list[BlockArgs], GlobalParams]:
    """The b0 stage table and the GlobalParams for the given scaling (TensorFlow's BatchNorm settings)."""
    return list(B0_BLOCKS), GlobalParams(
        batch_norm_momentum=0.99,
        batch_norm_epsilon=1e-3,
        dropout_rate=dropout_rate,
        num_classes=num_classes,
        width_coefficient=width_coefficient,
        depth_coefficient=depth_coefficient,
        depth_divisor=8,
        min_depth=None,
        drop_connect_rate=drop_connect_rate,
        image_size=image_size,
    )


class UnknownModelFamilyError(InvalidInputError, NotImplementedError):
    """A model name outside the EfficientNet family (also a NotImplementedError, as in pyspacer)."""


def get_model_params(
    model_name: str, override_params: dict[str, Any] | None
) -> tuple[list[BlockArgs], GlobalParams]:
    """Stage table and GlobalParams of 'efficientnet-bN', with `override_params` replacing GlobalParams fields."""
    if not isinstance(model_name, str) or not model_name.startswith("efficientnet"):
        raise UnknownModelFamilyError(
            f"Model name {model_name!r} is not an EfficientNet ('efficientnet-b0' ...)"
        )
    width, depth, resolution, dropout = efficientnet_params(model_name)
    blocks_args, global_params = efficientnet(
        width_coefficient=width, depth_coefficient=depth, dropout_rate=dropout, image_size=resolution
    )
    if override_params:
        unknown = sorted(set(override_params) - set(GlobalParams._fields))
        if unknown:
            # Also a ValueError (InvalidInputError is one), as namedtuple's _replace raises.
            raise InvalidInputError(f"override_params has fields GlobalParams lacks: {', '.join(unknown)}")
        global_params = global_params._replace(**override_params)
    return blocks_args, global_params
