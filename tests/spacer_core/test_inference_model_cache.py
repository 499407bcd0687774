"""ModelCache: LRU order, count and byte bounds, eviction callbacks, single loads."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from sklearn.linear_model import SGDClassifier

from spacer_core.inference import ModelCache, estimate_nbytes


def blob(nbytes: int) -> np.ndarray:
    return np.zeros(nbytes, np.uint8)


def test_lru_eviction_by_count():
    evicted: list[str] = []
    cache: ModelCache[str, np.ndarray] = ModelCache(max_items=2, on_evict=lambda k, v: evicted.append(k))
    cache.get("a", lambda: blob(1))
    cache.get("b", lambda: blob(1))
    cache.get("a", lambda: pytest.fail("a is cached"))  # a becomes most recent
    cache.get("c", lambda: blob(1))
    assert evicted == ["b"]
    assert cache.keys() == ["a", "c"]
    assert (cache.hits, cache.misses) == (1, 3)


def test_eviction_by_bytes_and_oversized_entry_stays_alone():
    evicted: list[str] = []
    cache: ModelCache[str, np.ndarray] = ModelCache(
        max_items=None, max_bytes=100, on_evict=lambda k, v: evicted.append(k)
    )
    for key in "abc":
        cache.get(key, lambda: blob(40))
    assert evicted == ["a"] and cache.total_bytes == 80
    cache.get("big", lambda: blob(500))
    assert cache.keys() == ["big"] and evicted == ["a", "b", "c"]
    assert cache.total_bytes == 500


def test_concurrent_misses_load_once():
    calls = []
    started = threading.Event()

    def load() -> np.ndarray:
        calls.append(1)
        started.set()
        time.sleep(0.1)
        return blob(3)

    cache: ModelCache[str, np.ndarray] = ModelCache(max_items=2)
    with ThreadPoolExecutor(6) as pool:
        values = list(pool.map(lambda _: cache.get("k", load), range(6)))
    assert len(calls) == 1
    assert all(v is values[0] for v in values)


def test_failed_load_is_not_cached_and_reaches_waiters():
    gate = threading.Event()
    attempts = []

    def failing() -> np.ndarray:
        attempts.append(1)
        gate.wait(5)
        raise OSError("weights missing")

    cache: ModelCache[str, np.ndarray] = ModelCache()
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(cache.get, "k", failing) for _ in range(3)]
        time.sleep(0.05)
        gate.set()
        for future in futures:
            with pytest.raises(OSError, match="weights missing"):
                future.result(5)
    assert len(attempts) == 1 and "k" not in cache
    assert cache.get("k", lambda: blob(2)).nbytes == 2


def test_pop_clear_and_replacing_put_call_on_evict():
    evicted: list[tuple[str, int]] = []
    cache: ModelCache[str, np.ndarray] = ModelCache(
        max_items=3, on_evict=lambda k, v: evicted.append((k, v.nbytes))
    )
    cache.put("a", blob(1))
    cache.put("a", blob(2))
    cache.put("b", blob(3))
    assert cache.pop("b").nbytes == 3 and cache.pop("missing") is None
    cache.clear()
    assert evicted == [("a", 1), ("b", 3), ("a", 2)]
    assert len(cache) == 0 and cache.total_bytes == 0


def test_evict_callback_errors_do_not_break_the_cache(caplog):
    def boom(key: str, value: object) -> None:
        raise RuntimeError("close failed")

    cache: ModelCache[str, np.ndarray] = ModelCache(max_items=1, on_evict=boom)
    cache.get("a", lambda: blob(1))
    cache.get("b", lambda: blob(1))
    assert cache.keys() == ["b"]
    assert "on_evict failed" in caplog.text


def test_size_estimates():
    import torch

    assert estimate_nbytes(blob(123)) == 123
    assert estimate_nbytes(torch.nn.Linear(10, 10)) == (100 + 10) * 4
    rng = np.random.default_rng(0)
    clf = SGDClassifier(loss="log_loss", random_state=0).fit(
        rng.normal(size=(50, 1280)), rng.integers(0, 3, 50)
    )
    assert estimate_nbytes(clf) > 3 * 1280 * 8


def test_invalid_bounds():
    with pytest.raises(ValueError, match="max_items"):
        ModelCache(max_items=0)
    with pytest.raises(ValueError, match="max_bytes"):
        ModelCache(max_bytes=-1)
