"""The protocol's tensors <-> numpy arrays.

Inputs arrive either typed (InferInputTensor.contents) or raw
(ModelInferRequest.raw_input_contents, one entry per input); outputs go
back raw, as Triton sends them. BYTES elements in raw form are each a
4-byte little-endian length followed by the bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.errors import invalid
from spacer_core import limits as core_limits

# Datatype name -> (numpy dtype of the raw form, InferTensorContents field).
_NUMERIC: dict[str, tuple[str, str]] = {
    "BOOL": ("?", "bool_contents"),
    "INT8": ("<i1", "int_contents"),
    "INT16": ("<i2", "int_contents"),
    "INT32": ("<i4", "int_contents"),
    "INT64": ("<i8", "int64_contents"),
    "UINT8": ("<u1", "uint_contents"),
    "UINT16": ("<u2", "uint_contents"),
    "UINT32": ("<u4", "uint_contents"),
    "UINT64": ("<u8", "uint64_contents"),
    "FP32": ("<f4", "fp32_contents"),
    "FP64": ("<f8", "fp64_contents"),
}
DATATYPES = (*_NUMERIC, "BYTES", "FP16", "BF16")
# Inputs whose rows are one image's points: their row count is bounded by
# max_points_per_image, checked from the shape before the data is read.
POINT_INPUTS = frozenset({"POINTS"})


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model: name, datatype and shape (-1: any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    optional: bool = False

    def shape_matches(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.shape) and all(
            want < 0 or want == got for want, got in zip(self.shape, shape)
        )


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(int(d)) for d in shape) + "]"


def decode_bytes(raw: bytes, count: int, what: str) -> list[bytes]:
    """`count` length-prefixed elements of a raw BYTES tensor."""
    out: list[bytes] = []
    offset = 0
    view = memoryview(raw)
    for _ in range(count):
        if offset + 4 > len(raw):
            raise invalid(f"{what}: raw BYTES content ends inside an element's length")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise invalid(f"{what}: raw BYTES element of {length} bytes runs past the content")
        out.append(bytes(view[offset : offset + length]))
        offset += length
    if offset != len(raw):
        raise invalid(f"{what}: raw BYTES content holds more than the {count} elements of its shape")
    return out


def encode_bytes(items: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def read_inputs(
    request: Any, specs: Sequence[TensorSpec], model: str, limits: core_limits.Limits | None = None
) -> dict[str, Any]:
    """The request's inputs checked against the model's: name -> ndarray (BYTES: list of bytes).

    Errors are INVALID_ARGUMENT with Triton's wording; a point input with
    more rows than `limits` (default: the active ones) allow is
    RESOURCE_EXHAUSTED.
    """
    bounds = limits or core_limits.current()
    by_name = {spec.name: spec for spec in specs}
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise invalid(f"expected {len(request.inputs)} raw input contents (one per input), got {len(raw)}")
    values: dict[str, Any] = {}
    for i, tensor in enumerate(request.inputs):
        spec = by_name.get(tensor.name)
        if spec is None:
            raise invalid(f"unexpected inference input '{tensor.name}' for model '{model}'")
        if tensor.name in values:
            raise invalid(f"input '{tensor.name}' given twice for model '{model}'")
        if tensor.datatype != spec.datatype:
            raise invalid(
                f"unexpected datatype TYPE_{_triton_type(tensor.datatype)} for inference input"
                f" '{tensor.name}', expecting TYPE_{_triton_type(spec.datatype)} for model '{model}'"
            )
        shape = [int(d) for d in tensor.shape]
        if any(d < 0 for d in shape):
            # -1 means "any size" in a model's metadata only; a request gives actual sizes.
            raise invalid(
                f"unexpected shape {_shape_text(shape)} for input '{tensor.name}' for model '{model}':"
                f" a request's shape gives each dimension's actual size (model shape {_shape_text(spec.shape)},"
                " where -1 means any size)"
            )
        if not spec.shape_matches(shape):
            raise invalid(
                f"unexpected shape for input '{tensor.name}' for model '{model}'."
                f" Expected {_shape_text(spec.shape)}, got {_shape_text(shape)}"
            )
        what = f"input '{tensor.name}'"
        if tensor.name in POINT_INPUTS and shape:
            bounds.check_point_count(shape[0], what)
        count = int(np.prod(shape)) if shape else 1
        if spec.datatype == "BYTES":
            if raw:
                values[tensor.name] = decode_bytes(raw[i], count, what)
            else:
                values[tensor.name] = list(tensor.contents.bytes_contents)
            if len(values[tensor.name]) != count:
                raise invalid(f"{what}: {len(values[tensor.name])} elements for shape {_shape_text(shape)}")
            continue
        dtype, field = _NUMERIC[spec.datatype]
        if raw:
            data = raw[i]
            itemsize = np.dtype(dtype).itemsize
            if len(data) != count * itemsize:
                raise invalid(
                    f"{what}: unexpected total byte size {len(data)} for shape"
                    f" {_shape_text(shape)}, expecting {count * itemsize}"
                )
            array = np.frombuffer(data, dtype=dtype).reshape(shape)
        else:
            array = np.asarray(getattr(tensor.contents, field), dtype=dtype)
            if array.size != count:
                raise invalid(f"{what}: {array.size} elements for shape {_shape_text(shape)}")
            array = array.reshape(shape)
        values[tensor.name] = array
    for spec in specs:
        if spec.name not in values and not spec.optional:
            raise invalid(f"expected input '{spec.name}' for model '{model}'")
    return values


def _triton_type(datatype: str) -> str:
    return "STRING" if datatype == "BYTES" else datatype


def add_output(response: Any, name: str, value: Any) -> None:
    """Append one output (an ndarray, or a list of bytes for BYTES) in raw form."""
    tensor = response.outputs.add()
    tensor.name = name
    if isinstance(value, list):
        tensor.datatype = "BYTES"
        tensor.shape.append(len(value))
        response.raw_output_contents.append(encode_bytes(value))
        return
    array = np.ascontiguousarray(value)
    tensor.datatype = {
        np.dtype("float32"): "FP32",
        np.dtype("float64"): "FP64",
        np.dtype("int32"): "INT32",
        np.dtype("int64"): "INT64",
    }[array.dtype]
    tensor.shape.extend(int(d) for d in array.shape)
    response.raw_output_contents.append(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
