"""Fast inference for feature networks: compiled backends, dynamic batching, bounded caches.

- `load_backend(sha256, make_net, device=..., precision=...)`: ONNX Runtime on
  CPU, TorchScript on CUDA, eager PyTorch as fallback; compiled once per
  weights file and cached on disk.
- `DynamicBatcher(backend, BatcherSettings(...))`: batches patches of concurrent callers.
- `ModelCache`: bounded LRU that the runtime keeps networks and classifiers in.
- `NetworkSpec`: what an extractor hands over to have its network run.

This layer knows nothing of extractors or storage; `spacer_core.runtime`
owns the instances.
"""

from spacer_core.inference.backends import (
    Backend,
    BackendError,
    EagerBackend,
    OnnxBackend,
    TorchScriptBackend,
    to_network_input,
)
from spacer_core.inference.batcher import (
    BatcherClosedError,
    BatcherSettings,
    DynamicBatcher,
    Priority,
    QueueFullError,
    check_batch_size,
    run_in_batches,
)
from spacer_core.inference.compile import load_backend
from spacer_core.inference.model_cache import ModelCache, estimate_nbytes
from spacer_core.inference.network import NetworkSpec
from spacer_core.inference.precision import Precision

__all__ = [
    "Backend",
    "BackendError",
    "BatcherClosedError",
    "BatcherSettings",
    "DynamicBatcher",
    "check_batch_size",
    "EagerBackend",
    "ModelCache",
    "NetworkSpec",
    "OnnxBackend",
    "Precision",
    "Priority",
    "QueueFullError",
    "TorchScriptBackend",
    "estimate_nbytes",
    "load_backend",
    "run_in_batches",
    "to_network_input",
]
