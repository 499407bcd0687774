"""Numeric precision modes for running the feature network."""

from __future__ import annotations

import enum

import torch


class Precision(str, enum.Enum):
    """How the network's arithmetic may trade accuracy for speed.

    EXACT: float32 throughout; features match pyspacer's within 1e-4.
    FAST: half precision where the hardware has it (fp16 on CUDA, bf16 on
    CPUs with native bf16); features differ by ~1e-2, classifier
    predictions nearly always agree (see benchmarks/eval_precision.py).
    """

    EXACT = "exact"
    FAST = "fast"

    @classmethod
    def parse(cls, value: Precision | str) -> Precision:
        """Accept a Precision or its name (case-insensitive); reject anything else clearly."""
        if isinstance(value, Precision):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            names = ", ".join(p.value for p in cls)
            raise ValueError(f"Unknown precision {value!r}; expected one of: {names}.") from None


def cpu_has_bf16() -> bool:
    """True when oneDNN can run bf16 natively on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def half_dtype(device: torch.device) -> torch.dtype | None:
    """The reduced-precision dtype FAST mode uses on `device`, or None when it has none."""
    if device.type == "cuda":
        # bf16 keeps float32's range; fp16 is faster on every CUDA GPU that
        # lacks bf16 tensor cores and BatchNorm-folded activations stay in range.
        return torch.float16
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return None
