"""Network runners and the process-wide cache that keeps them loaded between calls.

A runner turns a float32 batch (N, 3, 224, 224) into float32 features
(N, feature_dim). Every forward pass of EfficientNetExtractor goes through
one, so faster backends (ONNX Runtime, TorchScript, GPU) plug in by
providing a different RunnerFactory.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
from torch import nn


class NetworkRunner(Protocol):
    """Runs a loaded network: float32 (N, 3, H, W) in [0, 1] -> float32 (N, feature_dim)."""

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


# Builds a runner from a weights file's bytes; `name` labels the file in errors.
RunnerFactory = Callable[[bytes, str], NetworkRunner]


class TorchRunner:
    """Eager PyTorch inference of a module, in eval mode, without autograd."""

    def __init__(self, module: nn.Module, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = self.module(torch.from_numpy(batch).to(self.device))
        return out.float().cpu().numpy()


class RunnerCache:
    """Thread-safe LRU of loaded runners, keyed by (runner factory, weights sha256).

    Building happens under the lock, so concurrent first calls for the same
    weights load the network once rather than once per thread.
    """

    def __init__(self, max_entries: int = 4):
        self.max_entries = max_entries
        self._runners: OrderedDict[tuple[object, str], NetworkRunner] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[object, str], build: Callable[[], NetworkRunner]) -> NetworkRunner:
        """The runner cached under `key`, made with `build()` on a miss."""
        with self._lock:
            runner = self._runners.get(key)
            if runner is None:
                runner = build()
                self._runners[key] = runner
                while len(self._runners) > self.max_entries:
                    self._runners.popitem(last=False)
            else:
                self._runners.move_to_end(key)
            return runner

    def clear(self) -> None:
        """Forget every loaded runner (tests; freeing memory)."""
        with self._lock:
            self._runners.clear()

    def __len__(self) -> int:
        return len(self._runners)


RUNNERS = RunnerCache()
