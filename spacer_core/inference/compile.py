"""Compiling a feature network into the fastest backend that works, once per weights file.

`load_backend(sha256, make_net, device=..., precision=...)` tries, in order,
TorchScript (CUDA) or ONNX Runtime (CPU), then eager PyTorch; a compiled
artifact is keyed by the weights' sha256, cached on disk
(`compile_cache`), and checked against eager PyTorch before it is used.
In FAST precision on a CPU with native bf16 and OpenVINO installed (the
`fast` extra), OpenVINO runs the ONNX export in bf16; elsewhere FAST on a
CPU runs exact ONNX Runtime and says so in the log.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from spacer_core.inference import compile_cache
from spacer_core.inference.backends import (
    BACKEND_KINDS,
    EXACT_TOLERANCE,
    FAST_RELATIVE_TOLERANCE,
    ONNX_OPSET,
    Backend,
    BackendError,
    EagerBackend,
    OnnxBackend,
    OpenVinoBackend,
    TorchScriptBackend,
    _prepared_module,
    probe_batch,
    resolve_device,
)
from spacer_core.inference.precision import Precision, cpu_has_bf16, fast_cpu_status, openvino_available

logger = logging.getLogger(__name__)


def export_onnx(net: nn.Module) -> bytes:
    """The network as an ONNX model (fp32, dynamic batch size)."""
    module, _ = _prepared_module(net, torch.device("cpu"), Precision.EXACT)
    buffer = io.BytesIO()
    # The TorchScript-based exporter needs no extra packages; its
    # deprecation and constant-folding notices say nothing about our model.
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.from_numpy(probe_batch()),),
            buffer,  # type: ignore[arg-type]  # the exporter writes to any binary file object
            input_names=["patches"],
            output_names=["features"],
            dynamic_axes={"patches": {0: "batch"}, "features": {0: "batch"}},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    return buffer.getvalue()


def export_torchscript(net: nn.Module, device: torch.device, precision: Precision) -> bytes:
    """The network traced and frozen for `device` and `precision`, as torch.jit.save bytes."""
    module, _ = _prepared_module(net, device, precision)
    example = torch.from_numpy(probe_batch()).to(device)
    buffer = io.BytesIO()
    # torch.jit is deprecated in favour of torch.export, which cannot yet
    # save a frozen CUDA half-precision module this simply; silence the notice.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, example)
        frozen = torch.jit.freeze(traced.eval())
        torch.jit.save(frozen, buffer)
    return buffer.getvalue()


class _LazyNet:
    """Builds the torch network only if some backend needs it (cache hits don't)."""

    def __init__(self, make: Callable[[], nn.Module]):
        self._make = make
        self._net: nn.Module | None = None
        self.error: BaseException | None = None

    def get(self) -> nn.Module:
        if self.error is not None:
            raise self.error
        if self._net is None:
            try:
                self._net = self._make().eval()
            except BaseException as exc:
                self.error = exc
                raise
        return self._net


def _verify(backend: Backend, net: nn.Module) -> None:
    """Reject a freshly compiled backend whose features drift from eager PyTorch.

    EXACT must agree within EXACT_TOLERANCE; FAST must stay finite and within
    FAST_RELATIVE_TOLERANCE of the fp32 features on average.
    """
    # Not the tracing example: a traced constant would match that input only.
    batch = probe_batch(3, seed=99)
    reference = EagerBackend(net, torch.device("cpu"), Precision.EXACT).run(batch)
    got = backend.run(batch)
    if got.shape != reference.shape or not np.isfinite(got).all():
        raise BackendError(f"{backend.describe()} gave shape {got.shape} or non-finite features")
    if backend.precision is Precision.EXACT:
        diff = float(np.max(np.abs(got - reference)))
        if not diff <= EXACT_TOLERANCE:
            raise BackendError(
                f"{backend.describe()} differs from eager PyTorch by {diff:.3g} (tolerance {EXACT_TOLERANCE})"
            )
    else:
        rel = float(np.mean(np.abs(got - reference)) / max(np.mean(np.abs(reference)), 1e-12))
        if not rel <= FAST_RELATIVE_TOLERANCE:
            raise BackendError(f"{backend.describe()} drifts {rel:.3g} (mean relative) from fp32")


def _device_variant(device: torch.device) -> str:
    """TorchScript artifacts depend on the torch version and, on CUDA, the GPU generation."""
    torch_version = torch.__version__.split("+")[0]
    if device.type != "cuda":
        return f"cpu-torch{torch_version}"
    major, minor = torch.cuda.get_device_capability(device)
    return f"cuda-sm{major}{minor}-torch{torch_version}"


def _cached_artifact(
    folder: Path,
    sha256: str,
    backend: str,
    variant: str,
    suffix: str,
    build: Callable[[], bytes],
    load: Callable[[bytes], Backend],
    net: _LazyNet,
) -> Backend:
    """Load the cached artifact, or build, verify and store it; a corrupt file is rebuilt once."""
    path = compile_cache.artifact_path(folder, sha256, backend, variant, suffix)
    for attempt in range(2):
        data, built = compile_cache.load_or_build(path, build)
        try:
            loaded = load(data)
            if built:
                _verify(loaded, net.get())
            return loaded
        except Exception:
            compile_cache.discard(path)
            if built or attempt:
                raise
            # One line for people; the traceback only where someone asked for detail.
            logger.warning("Cached artifact %s failed to load; rebuilding", path)
            logger.debug("why the cached artifact %s failed to load", path, exc_info=True)
    raise AssertionError("unreachable")


def _build_on_onnx(sha256: str, net: _LazyNet, folder: Path, load: Callable[[bytes], Backend]) -> Backend:
    """A backend `load`ed from the exact ONNX export (one cached artifact for ONNX Runtime and OpenVINO)."""
    return _cached_artifact(
        folder,
        sha256,
        "onnx",
        "exact-cpu",
        ".onnx",
        build=lambda: export_onnx(net.get()),
        load=load,
        net=net,
    )


def _build_torchscript(
    sha256: str, net: _LazyNet, folder: Path, device: torch.device, precision: Precision
) -> Backend:
    def load(data: bytes) -> Backend:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(io.BytesIO(data), map_location=device)
        return TorchScriptBackend(module.eval(), device, precision)

    return _cached_artifact(
        folder,
        sha256,
        "torchscript",
        f"{precision.value}-{_device_variant(device)}",
        ".pt",
        build=lambda: export_torchscript(net.get(), device, precision),
        load=load,
        net=net,
    )


def _candidates(kind: str, device: torch.device, precision: Precision) -> list[str]:
    if kind not in BACKEND_KINDS:
        raise ValueError(f"Unknown backend kind {kind!r}; expected one of {BACKEND_KINDS}")
    if kind == "onnxruntime" and (device.type != "cpu" or precision is not Precision.EXACT):
        raise ValueError("The onnxruntime backend runs exact (fp32) on CPU only")
    if kind != "auto":
        return [kind] if kind == "eager" else [kind, "eager"]
    if device.type == "cuda":
        return ["torchscript", "eager"]
    if precision is Precision.FAST:
        status = fast_cpu_status()
        logger.info("%s", status)
        if cpu_has_bf16() and openvino_available():
            return ["openvino", "onnxruntime", "eager"]
    return ["onnxruntime", "eager"]


def load_backend(
    sha256: str,
    make_net: Callable[[], nn.Module],
    *,
    device: str | torch.device | None = None,
    precision: Precision | str = Precision.EXACT,
    kind: str = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
    threads: int | None = None,
) -> Backend:
    """The fastest working backend for one weights file.

    `sha256` is the weights file's digest (the cache key); `make_net` builds
    the features network (`forward(x) -> (N, D)`, float32, CPU) and is only
    called when a compiled artifact must be built or eager PyTorch is used.
    `kind` forces a backend ('onnxruntime', 'torchscript', 'eager'); 'auto'
    picks TorchScript on CUDA, ONNX Runtime on CPU. Compiled backends that
    fail to build, load or verify fall back to eager PyTorch (logged). An
    error raised by `make_net` itself (a bad weights file) propagates unchanged.
    """
    device = resolve_device(device)
    precision = Precision.parse(precision)
    net = _LazyNet(make_net)
    folder = compile_cache.cache_dir(cache_dir)
    failures: list[str] = []
    for name in _candidates(kind, device, precision):
        try:
            if name == "onnxruntime":
                backend = _build_on_onnx(sha256, net, folder, lambda data: OnnxBackend(data, threads=threads))
            elif name == "torchscript":
                backend = _build_torchscript(sha256, net, folder, device, precision)
            elif name == "openvino":
                # OpenVINO bf16 reads the same exact ONNX export.
                backend = _build_on_onnx(
                    sha256, net, folder, lambda data: OpenVinoBackend(data, threads=threads)
                )
            else:
                backend = EagerBackend(net.get(), device, precision)
        except Exception as exc:
            if net.error is exc:
                # The network itself cannot be built (e.g. a bad weights file):
                # no backend can help, and the caller needs the original error.
                raise
            logger.warning("Backend %s for %s on %s failed: %s", name, sha256[:12], device, exc)
            logger.debug("why backend %s for %s failed", name, sha256[:12], exc_info=True)
            failures.append(f"{name}: {exc}")
            continue
        if failures:
            logger.warning("Using %s after failures: %s", backend.describe(), "; ".join(failures))
        return backend
    raise BackendError(f"No backend could run the network {sha256[:12]} on {device}: " + "; ".join(failures))
