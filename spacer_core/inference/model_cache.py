"""A bounded, thread-safe LRU cache for loaded extractors and classifiers.

Loading an extractor (weights + compiled backend) or unpickling a classifier
costs far more than using it, so the server keeps recent ones in memory. The
cache is bounded by entry count and by an estimate of bytes held; the least
recently used entries go first. Concurrent requests for the same missing key
load it once.

    cache = ModelCache(max_items=8, max_bytes=2 << 30, on_evict=lambda k, v: v.close())
    loaded = cache.get(key, lambda: load_it(key))
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import pickle
import threading
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

import numpy as np

logger = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def estimate_nbytes(value: Any) -> int:
    """Approximate memory held by a cached value.

    Uses the value's own `nbytes` (backends, numpy arrays), the parameter bytes
    of a torch module, or the pickled size (scikit-learn classifiers).
    """
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, (int, np.integer)):
        return int(nbytes)
    try:
        import torch

        if isinstance(value, torch.nn.Module):
            from spacer_core.inference.backends import module_nbytes

            return module_nbytes(value)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    try:
        return len(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
    except Exception:
        return 0


class ModelCache(Generic[K, V]):
    """LRU cache with `max_items` and `max_bytes` bounds (None: unbounded).

    An entry bigger than `max_bytes` on its own is still kept (the newest
    entry is never evicted), but everything else makes way for it.
    `on_evict(key, value)` runs outside the lock after an entry leaves.
    """

    def __init__(
        self,
        *,
        max_items: int | None = 4,
        max_bytes: int | None = None,
        size_of: Callable[[Any], int] = estimate_nbytes,
        on_evict: Callable[[K, V], None] | None = None,
    ):
        if max_items is not None and max_items < 1:
            raise ValueError(f"max_items must be >= 1 or None, got {max_items}")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 or None, got {max_bytes}")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._size_of = size_of
        self._on_evict = on_evict
        self._entries: collections.OrderedDict[K, tuple[V, int]] = collections.OrderedDict()
        self._loading: dict[K, concurrent.futures.Future[V]] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: K, load: Callable[[], V]) -> V:
        """The cached value for `key`, calling `load()` once if it is missing.

        If `load` raises, every caller waiting on it gets the exception and
        nothing is cached, so a later call tries again.
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry[0]
            pending = self._loading.get(key)
            owner = pending is None
            if owner:
                self.misses += 1
                pending = concurrent.futures.Future()
                self._loading[key] = pending
        assert pending is not None
        if not owner:
            return pending.result()
        try:
            value = load()
            size = int(self._size_of(value))
        except BaseException as exc:
            with self._lock:
                del self._loading[key]
            pending.set_exception(exc)
            raise
        evicted = self._insert(key, value, size)
        pending.set_result(value)
        self._notify(evicted)
        return value

    def put(self, key: K, value: V) -> None:
        """Insert or replace an entry."""
        self._notify(self._insert(key, value, int(self._size_of(value))))

    def pop(self, key: K) -> V | None:
        """Remove an entry (on_evict runs for it); None if absent."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._bytes -= entry[1]
        if entry is None:
            return None
        self._notify([(key, entry[0])])
        return entry[0]

    def clear(self) -> None:
        """Remove every entry (on_evict runs for each)."""
        with self._lock:
            evicted = [(k, v) for k, (v, _) in self._entries.items()]
            self._entries.clear()
            self._bytes = 0
        self._notify(evicted)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def peek(self, key: K) -> V | None:
        """The cached value, without loading it or changing its recency."""
        with self._lock:
            entry = self._entries.get(key)
        return entry[0] if entry is not None else None

    def keys(self) -> list[K]:
        """Keys from least to most recently used."""
        with self._lock:
            return list(self._entries)

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def _insert(self, key: K, value: V, size: int) -> list[tuple[K, V]]:
        evicted: list[tuple[K, V]] = []
        with self._lock:
            self._loading.pop(key, None)
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
                if old[0] is not value:
                    evicted.append((key, old[0]))
            self._entries[key] = (value, size)
            self._bytes += size
            while len(self._entries) > 1 and self._over_limit():
                old_key, (old_value, old_size) = self._entries.popitem(last=False)
                self._bytes -= old_size
                evicted.append((old_key, old_value))
        return evicted

    def _over_limit(self) -> bool:
        if self.max_items is not None and len(self._entries) > self.max_items:
            return True
        return self.max_bytes is not None and self._bytes > self.max_bytes

    def _notify(self, evicted: list[tuple[K, V]]) -> None:
        if self._on_evict is None:
            return
        for key, value in evicted:
            try:
                self._on_evict(key, value)
            except Exception:
                logger.exception("on_evict failed for %r", key)
