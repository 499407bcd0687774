"""Reading CoralNet's PyTorch weight files: `torch.save({'net': state_dict, ...})`.

CoralNet trained under DataParallel, so its keys carry a `module.` prefix;
files written with NumPy 1 may also pickle NumPy scalars (e.g. a best
accuracy) under `numpy.core.*`. Both load here with `weights_only=True`.
"""

from __future__ import annotations

import codecs
import io
import os
from collections import OrderedDict
from collections.abc import Mapping
from importlib import import_module
from typing import Any, BinaryIO, Union

import numpy as np
import torch
from torch import nn

from spacer_core.exceptions import PreconditionError

WeightsSource = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]", BinaryIO]

DATAPARALLEL_PREFIX = "module."


class WeightsFileError(PreconditionError, ValueError):
    """A weights file cannot be read, or does not fit the network it is meant for."""


def _numpy_safe_globals() -> list[Any]:
    """NumPy objects a weights-only unpickler must accept for CoralNet's files.

    NumPy 2 renamed `numpy.core` to `numpy._core`; files saved under NumPy 1
    name the old path, so there the scalar constructor is allowed under both.
    """
    allowed: list[Any] = [
        np.dtype,
        np.dtypes.Int64DType,
        np.dtypes.Float64DType,
        np.dtypes.Float32DType,
        codecs.encode,
    ]
    if np.lib.NumpyVersion(np.__version__) >= "2.0.0":
        scalar = import_module("numpy._core.multiarray").scalar
        allowed += [scalar, (scalar, "numpy.core.multiarray.scalar")]
    else:  # pragma: no cover - NumPy 1 keeps the old path
        allowed.append(import_module("numpy.core.multiarray").scalar)
    return allowed


def _describe(source: WeightsSource, name: str | None) -> str:
    if name:
        return name
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return "<weights bytes>"


def read_state_dict(source: WeightsSource, name: str | None = None) -> OrderedDict[str, torch.Tensor]:
    """Load the `net` state dict of a weights file, with any `module.` prefix removed.

    `source` is a path, the file's bytes or a binary stream; `name` labels the
    file in error messages. Raises WeightsFileError for anything unreadable.
    """
    label = _describe(source, name)
    stream: str | os.PathLike[str] | BinaryIO
    if isinstance(source, (bytes, bytearray, memoryview)):
        stream = io.BytesIO(source)
    else:
        stream = source
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            content = torch.load(stream, map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch's own text runs over many lines, with terminal escapes and advice about its
        # internals: the message is one line naming the file (the cause stays chained).
        raise WeightsFileError(
            f"Cannot read weights file {label}: not a PyTorch weights file loadable"
            f" with weights_only=True ({type(exc).__name__})"
        ) from exc
    if not isinstance(content, Mapping) or "net" not in content:
        found = sorted(map(str, content)) if isinstance(content, Mapping) else type(content).__name__
        raise WeightsFileError(
            f"Weights file {label} should hold a dict with the state dict under 'net'; found {found}"
        )
    state = content["net"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsFileError(f"Weights file {label}: 'net' is not a state dict of tensors")
    return OrderedDict(
        (k[len(DATAPARALLEL_PREFIX) :] if k.startswith(DATAPARALLEL_PREFIX) else k, v)
        for k, v in state.items()
    )


def load_into(module: nn.Module, state: Mapping[str, torch.Tensor], label: str) -> None:
    """Copy `state` into `module`, requiring exactly its keys and shapes."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise WeightsFileError(
            f"Weights file {label} does not match {type(module).__name__}:"
            f" {len(missing)} missing keys {_preview(missing)},"
            f" {len(unexpected)} unexpected keys {_preview(unexpected)}"
        )
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if state[k].shape != v.shape
    ]
    if wrong:
        raise WeightsFileError(f"Weights file {label} has tensors of the wrong shape: {_preview(wrong)}")
    module.load_state_dict(state, strict=True)


def _preview(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"[{shown}{more}]"
