"""Reading CoralNet's PyTorch weight files: `torch.save({'net': state_dict, ...})`.

CoralNet trained under DataParallel, so its keys carry a `module.` prefix;
files written with NumPy 1 may also pickle NumPy scalars (e.g. a best
accuracy) under `numpy.core.*`. Both load here with `weights_only=True`.
"""

from __future__ import annotations

import codecs
import io
import os
import pickletools
import re
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


_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-_]")
# Modules whose globals any pickle may name: they say nothing about what the file holds.
_PLUMBING = ("copyreg", "builtins", "__builtin__", "_codecs", "collections", "numpy", "torch", "_io")


def plain_text(message: object) -> str:
    """A third-party message as one line: terminal escape codes removed, lines joined."""
    return " ".join(_ESCAPES.sub("", str(message)).split())


def _content(source: WeightsSource) -> bytes | None:
    """The file's bytes, for saying what it holds; None when they cannot be had again."""
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            return bytes(source)
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as f:
                return f.read()
        if source.seekable():
            source.seek(0)
            return source.read()
    except OSError:
        pass
    return None


def _pickled_class(data: bytes) -> str | None:
    """`module.Name` of the first class a plain pickle names (opcodes are read, nothing is run)."""
    strings: list[str] = []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name == "GLOBAL":
                module, _, name = str(arg).partition(" ")
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                module, name = strings[-2], strings[-1]
            else:
                if isinstance(arg, str):
                    strings.append(arg)
                continue
            if module.split(".")[0] not in _PLUMBING:
                return f"{module}.{name}"
    except Exception:  # a damaged pickle: what was read so far is all it says
        pass
    return None


def describe_content(data: bytes) -> str | None:
    """What a file that is not a PyTorch weights file holds, in words; None if not recognised."""
    if not data:
        return "nothing (the file is empty)"
    if data[:2] == b"\xff\xd8":
        return "a JPEG image"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "a PNG image"
    if data[:1] == b"\x80":  # a pickle (protocol 2 or later), not PyTorch's zip format
        found = _pickled_class(data)
        if found is None:  # PyTorch's older format is a pickle too: its own message says more
            return None
        if found.startswith("sklearn."):
            return f"a pickled scikit-learn classifier ({found.rpartition('.')[2]})"
        return f"a Python pickle of {found}"
    head = data[:4096]
    if b"\0" not in head:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as err:
            if err.start < len(head) - 4:  # a character cut by the 4 KiB slice is still text
                return None
        return "text"
    return None


def not_weights(head: bytes, label: str, kind: str = "PyTorch weights") -> str | None:
    """Why a file whose first bytes are `head` is no weights file (a classifier pickle, an image,
    text), in one line naming `label`; None when it may be one. The first 64 KiB suffice."""
    holds = describe_content(head)
    if holds is None:
        return None
    return (
        f"{label} is not {_article(kind)} file: it holds {holds}; weights are a PyTorch"
        " file holding {'net': state_dict}, as CoralNet saves them (efficientnet_b0_ver1.pt)"
    )


def read_state_dict(
    source: WeightsSource, name: str | None = None, kind: str = "PyTorch weights"
) -> OrderedDict[str, torch.Tensor]:
    """Load the `net` state dict of a weights file, with any `module.` prefix removed.

    `source` is a path, the file's bytes or a binary stream; `name` labels the
    file in error messages and `kind` names what it should be (an EfficientNet-b0
    weights file, say). Raises WeightsFileError for anything unreadable, saying
    what the file holds where that is recognisable (a classifier pickle, an image).
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
        data = _content(source)
        wrong = not_weights(data, label, kind) if data is not None else None
        if wrong is not None:
            raise WeightsFileError(wrong) from exc
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


def _article(kind: str) -> str:
    return f"{'an' if kind[:1].lower() in 'aeiou' else 'a'} {kind}"


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
