"""Fast inference for the feature network: compiled backends, dynamic batching, model caches.

- `load_backend(sha256, make_net, device=..., precision=...)`: ONNX Runtime on
  CPU, TorchScript on CUDA, eager PyTorch as fallback; compiled once per
  weights file and cached on disk.
- `DynamicBatcher(backend, ...)`: batches patches of concurrent callers.
- `ModelCache`: bounded LRU for loaded extractors and classifiers.
- `extract_stream`: decodes and crops the next images while the network runs.
- `shared_backend` / `shared_batcher` / `network_runner`: process-wide
  instances for the library's extractors and the server.
"""

from spacer_core.inference.backends import (
    Backend,
    BackendError,
    EagerBackend,
    OnnxBackend,
    TorchScriptBackend,
    load_backend,
    run_in_batches,
    to_network_input,
)
from spacer_core.inference.batcher import BatcherClosedError, DynamicBatcher, QueueFullError
from spacer_core.inference.model_cache import ModelCache, estimate_nbytes
from spacer_core.inference.pipeline import decode_rgb, extract_stream, load_patches
from spacer_core.inference.precision import Precision
from spacer_core.inference.shared import network_runner, shared_backend, shared_batcher

__all__ = [
    "Backend",
    "BackendError",
    "BatcherClosedError",
    "DynamicBatcher",
    "EagerBackend",
    "ModelCache",
    "OnnxBackend",
    "Precision",
    "QueueFullError",
    "TorchScriptBackend",
    "decode_rgb",
    "estimate_nbytes",
    "extract_stream",
    "load_backend",
    "load_patches",
    "run_in_batches",
    "network_runner",
    "shared_backend",
    "shared_batcher",
    "to_network_input",
]
