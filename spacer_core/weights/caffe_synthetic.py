"""Caffe model files written by hand, and a NumPy forward pass to check nets against.

CoralNet's VGG16 weights are not public, so tests and benchmarks write their own
`.prototxt` definitions (text) and `.caffemodel` weights (binary). The
weights are encoded here straight from Caffe's wire format (field numbers
of BVLC caffe.proto), not with the project's generated module, so a wrong
field number in spacer_core/caffe/caffe.proto cannot go unnoticed.

    layers = vgg16_layers(width_divisor=16)
    write_net(folder, "vgg", layers, generation="layer")  # -> (prototxt path, caffemodel path)
    features = numpy_forward(layers, bgr_minus_mean_batch, "fc7")
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class Enum(str):
    """A bare identifier in the text format (e.g. `pool: AVE`), not a quoted string."""


@dataclass
class Layer:
    name: str
    type: str  # new-generation spelling: "Convolution", "Pooling", ...
    bottom: list[str]
    top: list[str]
    params: dict[str, Any] = field(default_factory=dict)  # e.g. {"convolution_param": {...}}
    blobs: list[np.ndarray] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. {"include": {"phase": Enum("TRAIN")}}


# V1LayerParameter.LayerType numbers, from Caffe's schema.
V1_TYPES = {
    "Convolution": 4,
    "Pooling": 17,
    "InnerProduct": 14,
    "ReLU": 18,
    "Dropout": 6,
    "Softmax": 20,
    "LRN": 15,
    "Data": 5,
}
V1_ENUM_NAMES = {
    "Convolution": "CONVOLUTION",
    "Pooling": "POOLING",
    "InnerProduct": "INNER_PRODUCT",
    "ReLU": "RELU",
    "Dropout": "DROPOUT",
    "Softmax": "SOFTMAX",
    "LRN": "LRN",
    "Data": "DATA",
}

# --- text format ------------------------------------------------------------------


def _text_value(value: Any) -> str:
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def _text_fields(fields: dict[str, Any], indent: str) -> list[str]:
    lines = []
    for key, value in fields.items():
        values = value if isinstance(value, list) else [value]
        for item in values:
            if isinstance(item, dict):
                lines.append(f"{indent}{key} {{")
                lines.extend(_text_fields(item, indent + "  "))
                lines.append(f"{indent}}}")
            else:
                lines.append(f"{indent}{key}: {_text_value(item)}")
    return lines


def prototxt(layers: list[Layer], generation: str = "layer", name: str = "net") -> str:
    """A deploy definition: `layer` (type strings, Input layer) or V1 `layers` (enum types, `input:`)."""
    lines = [f'name: "{name}"']
    if generation == "layers":
        lines += ['input: "data"', "input_dim: 1", "input_dim: 3", "input_dim: 224", "input_dim: 224"]
    else:
        lines += _text_fields(
            {
                "layer": {
                    "name": "data",
                    "type": "Input",
                    "top": "data",
                    "input_param": {"shape": {"dim": [1, 3, 224, 224]}},
                }
            },
            "",
        )
    for layer in layers:
        body: dict[str, Any] = {"name": layer.name}
        body["type"] = Enum(V1_ENUM_NAMES[layer.type]) if generation == "layers" else layer.type
        body["bottom"] = layer.bottom
        body["top"] = layer.top
        body.update(layer.extra)
        body.update(layer.params)
        lines += _text_fields({generation: body}, "")
    return "\n".join(lines) + "\n"


# --- binary format ------------------------------------------------------------------


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _len_field(number: int, payload: bytes) -> bytes:
    return _key(number, 2) + _varint(len(payload)) + payload


def _int_field(number: int, value: int) -> bytes:
    return _key(number, 0) + _varint(value)


def encode_blob(array: np.ndarray, legacy_dims: bool) -> bytes:
    """A BlobProto: packed float `data` (5) plus `shape` (7, packed dims) or num/channels/height/width (1-4)."""
    data = _len_field(5, np.ascontiguousarray(array, dtype="<f4").tobytes())
    if legacy_dims:
        dims = (1,) * (4 - array.ndim) + tuple(array.shape)
        return b"".join(_int_field(i + 1, d) for i, d in enumerate(dims)) + data
    shape = _len_field(1, b"".join(_varint(d) for d in array.shape))
    return _len_field(7, shape) + data


def caffemodel(layers: list[Layer], generation: str = "layer", name: str = "net") -> bytes:
    """A trained-weights NetParameter: layer (100) / V1 layers (2) with names, types and blobs."""
    parts = [_len_field(1, name.encode())]
    for layer in layers:
        if generation == "layers":
            body = _len_field(4, layer.name.encode()) + _int_field(5, V1_TYPES[layer.type])
            body += b"".join(_len_field(2, b.encode()) for b in layer.bottom)
            body += b"".join(_len_field(3, t.encode()) for t in layer.top)
            body += b"".join(_len_field(6, encode_blob(b, legacy_dims=True)) for b in layer.blobs)
            parts.append(_len_field(2, body))
        else:
            body = _len_field(1, layer.name.encode()) + _len_field(2, layer.type.encode())
            body += b"".join(_len_field(3, b.encode()) for b in layer.bottom)
            body += b"".join(_len_field(4, t.encode()) for t in layer.top)
            body += b"".join(_len_field(7, encode_blob(b, legacy_dims=False)) for b in layer.blobs)
            parts.append(_len_field(100, body))
    return b"".join(parts)


def write_net(folder: Path, stem: str, layers: list[Layer], generation: str = "layer") -> tuple[Path, Path]:
    """Write `<stem>.prototxt` and `<stem>.caffemodel`; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    definition = folder / f"{stem}.prototxt"
    weights = folder / f"{stem}.caffemodel"
    definition.write_text(prototxt(layers, generation, stem))
    weights.write_bytes(caffemodel(layers, generation, stem))
    return definition, weights


# --- networks ------------------------------------------------------------------------


def conv(
    name: str,
    bottom: str,
    c_in: int,
    c_out: int,
    rng: np.random.Generator,
    kernel: int = 3,
    gain: float = 1.0,
    **params: Any,
) -> Layer:
    fan_in = c_in // params.get("group", 1) * kernel * kernel
    weight = rng.normal(
        0, gain * math.sqrt(2.0 / fan_in), (c_out, c_in // params.get("group", 1), kernel, kernel)
    )
    bias = rng.normal(0, 0.05, c_out)
    return Layer(
        name,
        "Convolution",
        [bottom],
        [name],
        {"convolution_param": {"num_output": c_out, "kernel_size": kernel, **params}},
        [weight.astype(np.float32), bias.astype(np.float32)],
    )


def inner_product(name: str, bottom: str, n_in: int, n_out: int, rng: np.random.Generator) -> Layer:
    weight = rng.normal(0, math.sqrt(2.0 / n_in), (n_out, n_in)).astype(np.float32)
    bias = rng.normal(0, 0.05, n_out).astype(np.float32)
    return Layer(
        name, "InnerProduct", [bottom], [name], {"inner_product_param": {"num_output": n_out}}, [weight, bias]
    )


def in_place(name: str, kind: str, blob: str, **params: Any) -> Layer:
    key = {"ReLU": "relu_param", "Dropout": "dropout_param"}[kind]
    return Layer(name, kind, [blob], [blob], {key: params} if params else {})


def vgg16_layers(
    width_divisor: int = 1, seed: int = 0, fc_width: int = 4096, classes: int = 1000
) -> list[Layer]:
    """CoralNet's VGG16 layout (conv1_1..conv5_3, fc6, fc7, fc8, prob; relu/drop in place).

    Conv widths are VGG16's divided by `width_divisor` (1 = the true size).
    The first conv is scaled by 1/128 so activations stay near 1 for inputs
    of +-128, as trained weights keep them.
    """
    rng = np.random.default_rng(seed)
    layers: list[Layer] = []
    blob, channels = "data", 3
    for stage, (width, repeats) in enumerate([(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)], start=1):
        for i in range(1, repeats + 1):
            name = f"conv{stage}_{i}"
            out = max(1, width // width_divisor)
            layers.append(
                conv(name, blob, channels, out, rng, pad=1, gain=1 / 128 if blob == "data" else 1.0)
            )
            layers.append(in_place(f"relu{stage}_{i}", "ReLU", name))
            blob, channels = name, out
        layers.append(
            Layer(
                f"pool{stage}",
                "Pooling",
                [blob],
                [f"pool{stage}"],
                {"pooling_param": {"pool": Enum("MAX"), "kernel_size": 2, "stride": 2}},
            )
        )
        blob = f"pool{stage}"
    layers.append(inner_product("fc6", blob, channels * 7 * 7, fc_width, rng))
    layers += [in_place("relu6", "ReLU", "fc6"), in_place("drop6", "Dropout", "fc6", dropout_ratio=0.5)]
    layers.append(inner_product("fc7", "fc6", fc_width, fc_width, rng))
    layers += [in_place("relu7", "ReLU", "fc7"), in_place("drop7", "Dropout", "fc7", dropout_ratio=0.5)]
    layers.append(inner_product("fc8", "fc7", fc_width, classes, rng))
    layers.append(Layer("prob", "Softmax", ["fc8"], ["prob"]))
    return layers


# --- NumPy reference -------------------------------------------------------------------


def _param(layer: Layer, block: str, key: str, default: Any) -> Any:
    return layer.params.get(block, {}).get(key, default)


def _conv(x: np.ndarray, layer: Layer) -> np.ndarray:
    weight, bias = (b.astype(np.float64) for b in layer.blobs)
    pad_h = _param(layer, "convolution_param", "pad_h", _param(layer, "convolution_param", "pad", 0))
    pad_w = _param(layer, "convolution_param", "pad_w", _param(layer, "convolution_param", "pad", 0))
    stride = _param(layer, "convolution_param", "stride", 1)
    groups = _param(layer, "convolution_param", "group", 1)
    n, c, h, w = x.shape
    c_out, c_per_group, kh, kw = weight.shape
    padded = np.zeros((n, c, h + 2 * pad_h, w + 2 * pad_w))
    padded[:, :, pad_h : pad_h + h, pad_w : pad_w + w] = x
    oh, ow = (h + 2 * pad_h - kh) // stride + 1, (w + 2 * pad_w - kw) // stride + 1
    out = np.zeros((n, c_out, oh, ow))
    per_out = c_out // groups
    for g in range(groups):
        xs = padded[:, g * c_per_group : (g + 1) * c_per_group]
        ws = weight[g * per_out : (g + 1) * per_out]
        for i in range(kh):
            for j in range(kw):
                window = xs[
                    :, :, i : i + stride * (oh - 1) + 1 : stride, j : j + stride * (ow - 1) + 1 : stride
                ]
                out[:, g * per_out : (g + 1) * per_out] += np.einsum("oc,nchw->nohw", ws[:, :, i, j], window)
    return out + bias[None, :, None, None]


def _pool(x: np.ndarray, layer: Layer) -> np.ndarray:
    kernel = _param(layer, "pooling_param", "kernel_size", 0)
    stride = _param(layer, "pooling_param", "stride", 1)
    pad = _param(layer, "pooling_param", "pad", 0)
    average = _param(layer, "pooling_param", "pool", "MAX") == "AVE"
    n, c, h, w = x.shape

    def size(length: int) -> int:
        out = int(math.ceil((length + 2 * pad - kernel) / stride)) + 1
        # A last window starting inside the padding is dropped.
        return out - 1 if pad and (out - 1) * stride >= length + pad else out

    out = np.zeros((n, c, size(h), size(w)))
    for ph in range(out.shape[2]):
        for pw in range(out.shape[3]):
            hs, ws = ph * stride - pad, pw * stride - pad
            he, we = min(hs + kernel, h + pad), min(ws + kernel, w + pad)
            count = (he - hs) * (we - ws)
            hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
            region = x[:, :, hs:he, ws:we]
            out[:, :, ph, pw] = region.sum(axis=(2, 3)) / count if average else region.max(axis=(2, 3))
    return out


def numpy_forward(layers: list[Layer], data: np.ndarray, output_blob: str) -> np.ndarray:
    """Caffe's TEST-phase forward pass in float64 from blob `data` (N, 3, 224, 224, BGR minus mean)."""
    blobs: dict[str, np.ndarray] = {"data": data.astype(np.float64)}
    for layer in layers:
        if any(rule.get("phase") == "TRAIN" for rule in _rules(layer)):
            continue
        x = blobs[layer.bottom[0]]
        if layer.type == "Convolution":
            y = _conv(x, layer)
        elif layer.type == "Pooling":
            y = _pool(x, layer)
        elif layer.type == "InnerProduct":
            weight, bias = (b.astype(np.float64) for b in layer.blobs)
            y = x.reshape(len(x), -1) @ weight.reshape(len(bias), -1).T + bias
        elif layer.type == "ReLU":
            slope = _param(layer, "relu_param", "negative_slope", 0.0)
            y = np.where(x > 0, x, slope * x)
        elif layer.type == "Dropout":
            scale_train = _param(layer, "dropout_param", "scale_train", True)
            y = x if scale_train else x * (1 - _param(layer, "dropout_param", "dropout_ratio", 0.5))
        elif layer.type == "Softmax":
            e = np.exp(x - x.max(axis=1, keepdims=True))
            y = e / e.sum(axis=1, keepdims=True)
        else:
            raise ValueError(layer.type)
        blobs[layer.top[0]] = y
    return blobs[output_blob].reshape(len(data), -1)


def _rules(layer: Layer) -> list[dict[str, Any]]:
    rules = layer.extra.get("include", [])
    return rules if isinstance(rules, list) else [rules]
