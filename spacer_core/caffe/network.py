"""Caffe networks in PyTorch: a deploy .prototxt plus a .caffemodel, without Caffe.

`build_caffe_network` reads both files with the schema subset in
caffe.proto (either layer generation: `layer` or V1 `layers`) and returns a
module that reproduces Caffe's TEST-phase forward pass for the layer types
a VGG-style classifier uses: Convolution, Pooling (MAX/AVE with Caffe's
rounded-up output size), InnerProduct, ReLU, Dropout, Softmax, plus Input
and data layers that only name the input blob.

Blobs follow Caffe's naming: a layer whose top names its bottom (ReLU and
Dropout "in place") replaces that blob, so the value read at the end is the
blob's content after every layer that writes into it has run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from google.protobuf import text_format
from google.protobuf.message import DecodeError
from torch import nn
from torch.nn import functional as F

from spacer_core import limits
from spacer_core.caffe import caffe_pb2 as pb
from spacer_core.exceptions import PreconditionError

INPUT_SIZE = 224
# Values one layer may output per patch: 8 Mi (32 MiB of float32), over twice
# VGG16's largest (conv1: 64 x 224 x 224).
MAX_LAYER_VALUES = 1 << 23
# CoralNet's VGG16 input: 0..255 BGR pixels minus this mean per channel, unscaled.
PIXEL_MEAN = 128.0

# Layer types (new generation spelling) whose only role is to provide input.
_INPUT_TYPES = frozenset({"Input", "Data", "ImageData", "MemoryData", "DummyData", "HDF5Data", "WindowData"})
_V1_TYPE_NAMES = {
    pb.V1LayerParameter.CONVOLUTION: "Convolution",
    pb.V1LayerParameter.POOLING: "Pooling",
    pb.V1LayerParameter.INNER_PRODUCT: "InnerProduct",
    pb.V1LayerParameter.RELU: "ReLU",
    pb.V1LayerParameter.DROPOUT: "Dropout",
    pb.V1LayerParameter.SOFTMAX: "Softmax",
    pb.V1LayerParameter.DATA: "Data",
    pb.V1LayerParameter.IMAGE_DATA: "ImageData",
    pb.V1LayerParameter.MEMORY_DATA: "MemoryData",
    pb.V1LayerParameter.DUMMY_DATA: "DummyData",
    pb.V1LayerParameter.HDF5_DATA: "HDF5Data",
    pb.V1LayerParameter.WINDOW_DATA: "WindowData",
}
SUPPORTED_TYPES = ("Convolution", "Pooling", "InnerProduct", "ReLU", "Dropout", "Softmax")


class CaffeModelError(PreconditionError, ValueError):
    """A Caffe definition or weights file cannot be read or run here (as WeightsFileError for PyTorch files)."""


@dataclass
class _Layer:
    """One layer of either generation, with its type as a string."""

    name: str
    type: str
    bottom: list[str]
    top: list[str]
    include: Sequence[pb.NetStateRule]
    exclude: Sequence[pb.NetStateRule]
    blobs: Sequence[pb.BlobProto]
    source: pb.LayerParameter | pb.V1LayerParameter


def _layers(net: pb.NetParameter, label: str) -> list[_Layer]:
    if len(net.layer) and len(net.layers):
        raise CaffeModelError(f"{label}: uses both 'layer' and the older 'layers'; expected one")
    if len(net.layers):
        return [
            _Layer(
                v1.name,
                _V1_TYPE_NAMES.get(v1.type, pb.V1LayerParameter.LayerType.Name(v1.type)),
                list(v1.bottom),
                list(v1.top),
                v1.include,
                v1.exclude,
                v1.blobs,
                v1,
            )
            for v1 in net.layers
        ]
    return [
        _Layer(
            layer.name,
            layer.type,
            list(layer.bottom),
            list(layer.top),
            layer.include,
            layer.exclude,
            layer.blobs,
            layer,
        )
        for layer in net.layer
    ]


def _rule_matches(rule: pb.NetStateRule) -> bool:
    """Whether Caffe's default TEST state (level 0, no stages) meets `rule`."""
    if rule.HasField("phase") and rule.phase != pb.TEST:
        return False
    if rule.HasField("min_level") and rule.min_level > 0:
        return False
    if rule.HasField("max_level") and rule.max_level < 0:
        return False
    return len(rule.stage) == 0


def _in_test_phase(layer: _Layer) -> bool:
    if len(layer.include):
        return any(_rule_matches(rule) for rule in layer.include)
    return not any(_rule_matches(rule) for rule in layer.exclude)


def parse_definition(definition: bytes | str, label: str = "<definition>") -> pb.NetParameter:
    """A .prototxt (text format) as a NetParameter; unknown fields are skipped."""
    text = definition.decode("utf-8") if isinstance(definition, (bytes, bytearray)) else definition
    net = pb.NetParameter()
    try:
        # Fields outside our schema subset belong to layer types we reject by
        # name below (or to training-only settings), so skipping them is safe.
        text_format.Parse(text, net, allow_unknown_field=True)
    except (text_format.ParseError, UnicodeDecodeError) as err:
        raise CaffeModelError(f"{label}: not a Caffe text-format net definition ({err})") from err
    return net


def output_size(definition: bytes | str, label: str = "<definition>", output_blob: str = "fc7") -> int | None:
    """Values per patch in blob `output_blob`, when the definition alone fixes it, else None.

    It does when an InnerProduct writes the blob last (later in-place ReLU,
    Dropout or Softmax layers keep its size), as for VGG16's fc7.
    """
    size = None
    for layer in _layers(parse_definition(definition, label), label):
        if not _in_test_phase(layer) or output_blob not in layer.top:
            continue
        if layer.type == "InnerProduct":
            size = int(layer.source.inner_product_param.num_output)
        elif layer.type not in ("ReLU", "Dropout", "Softmax") or layer.bottom != layer.top:
            size = None
    return size


def parse_weights(weights: bytes, label: str = "<weights>") -> pb.NetParameter:
    """A .caffemodel (binary NetParameter)."""
    net = pb.NetParameter()
    try:
        net.ParseFromString(bytes(weights))
    except DecodeError as err:
        raise CaffeModelError(f"{label}: not a binary Caffe model ({err})") from err
    if not len(net.layer) and not len(net.layers):
        raise CaffeModelError(f"{label}: holds no layers; not a Caffe model")
    return net


def blob_array(blob: pb.BlobProto) -> np.ndarray:
    """A BlobProto's data as float32, shaped by `shape` or by the older num/channels/height/width."""
    if len(blob.double_data):
        data = np.asarray(blob.double_data, dtype=np.float64).astype(np.float32)
    else:
        data = np.asarray(blob.data, dtype=np.float32)
    if blob.HasField("shape"):
        shape = tuple(int(d) for d in blob.shape.dim)
    else:
        shape = (blob.num, blob.channels, blob.height, blob.width)
    if math.prod(shape) != data.size:
        raise CaffeModelError(f"blob of shape {shape} holds {data.size} values")
    return data.reshape(shape)


def _pair(
    values: Sequence[int], h: int | None, w: int | None, default: int, what: str, layer: str
) -> tuple[int, int]:
    if h is not None or w is not None:
        if h is None or w is None:
            raise CaffeModelError(f"layer '{layer}': give both {what}_h and {what}_w")
        return int(h), int(w)
    if len(values) == 0:
        return default, default
    if len(values) == 1:
        return int(values[0]), int(values[0])
    if len(values) == 2:
        return int(values[0]), int(values[1])
    raise CaffeModelError(f"layer '{layer}': only 2-d {what} is supported, got {list(values)}")


def _pad(param: pb.ConvolutionParameter | pb.PoolingParameter, pad: list[int], layer: str) -> tuple[int, int]:
    # pad_h / pad_w default to 0 each, so either one alone is a full setting.
    if param.HasField("pad_h") or param.HasField("pad_w"):
        return int(param.pad_h), int(param.pad_w)
    return _pair(pad, None, None, 0, "pad", layer)


def _opt(msg: object, field: str) -> int | None:
    return int(getattr(msg, field)) if msg.HasField(field) else None  # type: ignore[attr-defined]


class _CaffeConv(nn.Module):
    def __init__(
        self,
        weight: np.ndarray,
        bias: np.ndarray | None,
        stride: tuple[int, int],
        pad: tuple[int, int],
        dilation: tuple[int, int],
        groups: int,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.from_numpy(weight.copy()), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(torch.from_numpy(bias.copy()), requires_grad=False)
        self.stride, self.pad, self.dilation, self.groups = stride, pad, dilation, groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.pad, self.dilation, self.groups)


class _CaffeInnerProduct(nn.Module):
    def __init__(self, weight: np.ndarray, bias: np.ndarray | None, axis: int):
        super().__init__()
        self.weight = nn.Parameter(torch.from_numpy(weight.copy()), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(torch.from_numpy(bias.copy()), requires_grad=False)
        self.axis = axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.flatten(x, self.axis), self.weight, self.bias)


class _CaffePool(nn.Module):
    def __init__(
        self, kind: int, kernel: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int], ceil: bool
    ):
        super().__init__()
        self.average = kind == pb.PoolingParameter.AVE
        self.kernel, self.stride, self.pad, self.ceil = kernel, stride, pad, ceil

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # PyTorch's ceil_mode drops a last window that would start in the
        # padding, and its average divides by the window clipped to the padded
        # input: both exactly as Caffe's pooling layer does.
        if self.average:
            return F.avg_pool2d(
                x, self.kernel, self.stride, self.pad, ceil_mode=self.ceil, count_include_pad=True
            )
        return F.max_pool2d(x, self.kernel, self.stride, self.pad, ceil_mode=self.ceil)


class _Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class _LeakyReLU(nn.Module):
    def __init__(self, slope: float):
        super().__init__()
        self.slope = slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.slope == 0.0:
            return F.relu(x)
        return torch.where(x > 0, x, x * self.slope)


class _Softmax(nn.Module):
    def __init__(self, axis: int):
        super().__init__()
        self.axis = axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, dim=self.axis)


def pooled_size(size: int, kernel: int, stride: int, pad: int, ceil: bool = True) -> int:
    """Caffe's pooling output length: rounded up (or down), minus a last window starting in the padding."""
    span = size + 2 * pad - kernel
    out = (-(-span // stride) if ceil else span // stride) + 1
    if pad > 0 and (out - 1) * stride >= size + pad:
        out -= 1
    return out


class CaffeNet(nn.Module):
    """A Caffe net's TEST-phase forward pass from ToTensor patches to one blob.

    forward: float32 (N, 3, 224, 224) RGB in [0, 1] -> float32 (N, D), the
    content of `output_blob` once every layer writing into it has run.
    """

    def __init__(
        self,
        steps: list[tuple[str, list[str], str]],
        modules: dict[str, nn.Module],
        input_blob: str,
        output_blob: str,
        output_shape: tuple[int, ...],
    ):
        super().__init__()
        self.steps = steps  # (layer name, bottom blobs, top blob), in Caffe's order
        self.layers = nn.ModuleDict(modules)
        self.input_blob = input_blob
        self.output_blob = output_blob
        self.output_shape = output_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Back to the exact 0..255 pixels ToTensor divided, then Caffe's input:
        # BGR order, mean subtracted, no scaling.
        pixels = torch.round(x * 255.0)
        blobs = {self.input_blob: pixels.flip(1) - PIXEL_MEAN}
        for name, bottoms, top in self.steps:
            blobs[top] = self.layers[name](blobs[bottoms[0]])
        return torch.flatten(blobs[self.output_blob], 1)


def _weights_by_layer(weights: pb.NetParameter) -> dict[str, Sequence[pb.BlobProto]]:
    # Caffe copies trained blobs by layer name; the model's own layer
    # generation does not have to match the definition's.
    found: dict[str, Sequence[pb.BlobProto]] = {}
    for layer in [*weights.layer, *weights.layers]:
        if len(layer.blobs):
            found[layer.name] = layer.blobs
    return found


def build_caffe_network(
    definition: bytes | str,
    weights: bytes,
    label: str,
    *,
    output_blob: str = "fc7",
    start_layer: str | None = "conv1_1",
) -> CaffeNet:
    """A CaffeNet for a deploy .prototxt and its .caffemodel, in eval mode.

    `label` names the files in errors. The net starts at `start_layer` (as
    pyspacer's `net.forward(start='conv1_1')`; None or a name the net lacks
    starts after its input layers) and returns blob `output_blob` flattened.
    Raises CaffeModelError for unreadable files, unsupported layer types
    (naming the layer and type), missing or misshapen weights.
    """
    net_def = parse_definition(definition, f"{label} (definition)")
    trained = _weights_by_layer(parse_weights(weights, f"{label} (weights)"))
    layers = [layer for layer in _layers(net_def, f"{label} (definition)") if _in_test_phase(layer)]
    names = [layer.name for layer in layers]
    if start_layer is not None and start_layer in names:
        layers = layers[names.index(start_layer) :]
    else:
        layers = [layer for layer in layers if layer.type not in _INPUT_TYPES]
    writers = [i for i, layer in enumerate(layers) if output_blob in layer.top]
    if not layers or not writers:
        raise CaffeModelError(f"{label}: no layer writes blob '{output_blob}'")
    # Layers after the last one writing the output blob cannot change it.
    layers = layers[: writers[-1] + 1]
    if not layers[0].bottom:
        raise CaffeModelError(f"{label}: first layer '{layers[0].name}' has no input blob")
    input_blob = layers[0].bottom[0]

    shapes: dict[str, tuple[int, ...]] = {input_blob: (1, 3, INPUT_SIZE, INPUT_SIZE)}
    steps: list[tuple[str, list[str], str]] = []
    modules: dict[str, nn.Module] = {}
    for index, layer in enumerate(layers):
        where = f"{label}: layer '{layer.name}' (type {layer.type})"
        if layer.type not in SUPPORTED_TYPES:
            raise CaffeModelError(
                f"{label}: layer '{layer.name}' has type '{layer.type}', which is not supported;"
                f" supported types: {', '.join(SUPPORTED_TYPES)}"
            )
        if len(layer.bottom) != 1 or len(layer.top) != 1:
            raise CaffeModelError(f"{where}: expected one bottom and one top blob")
        if layer.bottom[0] not in shapes:
            raise CaffeModelError(f"{where}: reads blob '{layer.bottom[0]}', which no earlier layer writes")
        in_shape = shapes[layer.bottom[0]]
        blobs = [blob_array(b) for b in trained.get(layer.name, ())]
        try:
            module, out_shape = _build_layer(layer, in_shape, blobs)
        except CaffeModelError as err:
            raise CaffeModelError(f"{where}: {err}") from None
        key = f"l{index}"  # Caffe names may hold characters ModuleDict refuses
        if math.prod(out_shape[1:]) > MAX_LAYER_VALUES:
            # Checked before anything runs: padding or strides can blow one patch up to gigabytes.
            raise CaffeModelError(
                f"{where}: its output holds {math.prod(out_shape[1:])} values per patch;"
                f" at most {MAX_LAYER_VALUES} are supported"
            )
        modules[key] = module
        steps.append((key, [layer.bottom[0]], layer.top[0]))
        shapes[layer.top[0]] = out_shape
    out_shape = shapes[output_blob]
    limits.current().check_feature_dim(math.prod(out_shape[1:]), f"{label}: blob '{output_blob}' width")
    network = CaffeNet(steps, modules, input_blob, output_blob, (math.prod(out_shape[1:]),))
    network.eval()
    return network


def _need_blobs(blobs: list[np.ndarray], count: int) -> None:
    if len(blobs) < count:
        raise CaffeModelError(f"the weights file has {len(blobs)} parameter blobs for it, {count} needed")


def _build_layer(
    layer: _Layer, shape: tuple[int, ...], blobs: list[np.ndarray]
) -> tuple[nn.Module, tuple[int, ...]]:
    src = layer.source
    if layer.type == "Convolution":
        p = src.convolution_param
        if len(shape) != 4 or p.axis != 1:
            raise CaffeModelError(f"needs 4-d input on axis 1, got shape {shape}")
        name = layer.name
        kernel = _pair(p.kernel_size, _opt(p, "kernel_h"), _opt(p, "kernel_w"), 0, "kernel", name)
        stride = _pair(p.stride, _opt(p, "stride_h"), _opt(p, "stride_w"), 1, "stride", name)
        pad = _pad(p, list(p.pad), name)
        dilation = _pair(p.dilation, None, None, 1, "dilation", name)
        if min(kernel) < 1 or min(stride) < 1:
            raise CaffeModelError(f"kernel {kernel} and stride {stride} must be positive")
        out_ch, groups, in_ch = int(p.num_output), int(p.group), shape[1]
        if out_ch < 1 or in_ch % groups or out_ch % groups:
            raise CaffeModelError(f"num_output {out_ch} and group {groups} do not fit {in_ch} input channels")
        _need_blobs(blobs, 2 if p.bias_term else 1)
        weight = _reshaped(blobs[0], (out_ch, in_ch // groups, *kernel), "weights")
        bias = _reshaped(blobs[1], (out_ch,), "bias") if p.bias_term else None
        out = tuple(
            (shape[2 + i] + 2 * pad[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(2)
        )
        if min(out) < 1:
            raise CaffeModelError(f"input {shape} is too small for kernel {kernel}")
        return _CaffeConv(weight, bias, stride, pad, dilation, groups), (shape[0], out_ch, *out)
    if layer.type == "Pooling":
        p = src.pooling_param
        if len(shape) != 4:
            raise CaffeModelError(f"needs 4-d input, got shape {shape}")
        if p.pool not in (pb.PoolingParameter.MAX, pb.PoolingParameter.AVE):
            raise CaffeModelError(
                f"pool method {pb.PoolingParameter.PoolMethod.Name(p.pool)} is not supported"
            )
        if p.global_pooling:
            kernel, stride, pad = (shape[2], shape[3]), (1, 1), (0, 0)
        else:
            kernel = _pair(
                [p.kernel_size] if p.HasField("kernel_size") else [],
                _opt(p, "kernel_h"),
                _opt(p, "kernel_w"),
                0,
                "kernel",
                layer.name,
            )
            stride = _pair([p.stride], _opt(p, "stride_h"), _opt(p, "stride_w"), 1, "stride", layer.name)
            pad = _pad(p, [p.pad], layer.name)
        if min(kernel) < 1 or min(stride) < 1:
            raise CaffeModelError(f"kernel {kernel} and stride {stride} must be positive")
        if any(2 * pad[i] > kernel[i] for i in range(2)):
            raise CaffeModelError(f"padding {pad} over half the kernel {kernel} is not supported")
        ceil = p.round_mode == pb.PoolingParameter.CEIL
        out = tuple(pooled_size(shape[2 + i], kernel[i], stride[i], pad[i], ceil) for i in range(2))
        return _CaffePool(p.pool, kernel, stride, pad, ceil), (shape[0], shape[1], *out)
    if layer.type == "InnerProduct":
        p = src.inner_product_param
        axis = p.axis % len(shape)
        fan_in, out_n = math.prod(shape[axis:]), int(p.num_output)
        if out_n < 1 or axis != 1:
            raise CaffeModelError(f"needs num_output >= 1 and axis 1, got {out_n} and {p.axis}")
        _need_blobs(blobs, 2 if p.bias_term else 1)
        if p.transpose:
            weight = _reshaped(blobs[0], (fan_in, out_n), "weights").T
        else:
            weight = _reshaped(blobs[0], (out_n, fan_in), "weights")
        bias = _reshaped(blobs[1], (out_n,), "bias") if p.bias_term else None
        return _CaffeInnerProduct(np.ascontiguousarray(weight), bias, axis), (shape[0], out_n)
    if layer.type == "ReLU":
        return _LeakyReLU(float(src.relu_param.negative_slope)), shape
    if layer.type == "Dropout":
        p = src.dropout_param
        # TEST phase: identity, unless the ratio is applied at test time
        # rather than at training time (scale_train false).
        factor = 1.0 if p.scale_train else 1.0 - float(p.dropout_ratio)
        return _Scale(factor), shape
    # Softmax
    return _Softmax(src.softmax_param.axis % len(shape)), shape


def _reshaped(array: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    # Blobs written with the old 4-d layout pad the shape with ones, so only
    # the element count has to agree.
    if array.size != math.prod(shape):
        raise CaffeModelError(f"{what} blob has shape {array.shape}, expected {shape}")
    return np.ascontiguousarray(array.reshape(shape), dtype=np.float32)
