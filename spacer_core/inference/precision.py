"""Numeric precision modes for running the feature network."""

from __future__ import annotations

import enum

import torch


class Precision(enum.StrEnum):
    """How the network's arithmetic may trade accuracy for speed.

    EXACT: float32 throughout; features match pyspacer's within 1e-4.
    FAST: half precision where the hardware has it (fp16 on CUDA, bf16 on
    CPUs with native bf16); features differ by ~1e-2, classifier
    predictions nearly always agree, and a runtime recomputes the close
    calls exactly (`RuntimeSettings.fast_recheck_margin`; see
    benchmarks/eval_precision.py).
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


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """The native-bf16 instruction sets this CPU reports (AVX512-BF16, AMX-BF16); [] if none or unknown."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [flag for flag in BF16_CPU_FLAGS if flag in flags]
    except OSError:
        pass
    return []


def cpu_has_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX512-BF16 or AMX), by /proc/cpuinfo or oneDNN."""
    if cpu_bf16_flags():
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def openvino_available() -> bool:
    """True when OpenVINO (the `fast` extra) is installed."""
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def fast_cpu_status() -> str:
    """What `fast` precision does on this machine's CPU, in one line (logged, and shown by check-config)."""
    flags = cpu_bf16_flags()
    if not flags and not cpu_has_bf16():
        return "fast precision on CPU: this CPU has no native bf16 (avx512_bf16/amx_bf16); runs exact (fp32)"
    if not openvino_available():
        return (
            f"fast precision on CPU: CPU has {', '.join(flags) or 'bf16'} but OpenVINO is not "
            "installed (pip install 'spacer-server[fast]'); runs exact (fp32)"
        )
    return f"fast precision on CPU: OpenVINO bf16 ({', '.join(flags) or 'bf16'})"


def half_dtype(device: torch.device) -> torch.dtype | None:
    """The reduced-precision dtype FAST mode uses on `device`, or None when it has none."""
    if device.type == "cuda":
        # bf16 keeps float32's range; fp16 is faster on every CUDA GPU that
        # lacks bf16 tensor cores and BatchNorm-folded activations stay in range.
        return torch.float16
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return None
