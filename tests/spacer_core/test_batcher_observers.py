"""Batch observers: what the server's metrics read from every batcher."""

from __future__ import annotations

import threading
import time

import numpy as np

from spacer_core.inference.batcher import BatcherSettings, BatchObservation, DynamicBatcher
from spacer_core.inference.network import NetworkSpec
from spacer_core.runtime import Runtime, RuntimeSettings

TIMEOUT = 10


def _patches(n: int) -> np.ndarray:
    return np.zeros((n, 224, 224, 3), np.uint8)


def test_observer_sees_sizes_queue_waits_and_network_time():
    gate = threading.Event()
    entered = threading.Event()

    def network(batch: np.ndarray) -> np.ndarray:
        entered.set()
        assert gate.wait(TIMEOUT)
        time.sleep(0.05)
        return np.zeros((len(batch), 4), np.float32)

    seen: list[BatchObservation] = []
    with DynamicBatcher(
        network, BatcherSettings(max_batch_size=8, queue_delay_ms=0), name="obs", observers=[seen.append]
    ) as batcher:
        first = batcher.submit(_patches(1))
        assert entered.wait(TIMEOUT)
        # These two wait in the queue while the first batch holds the worker.
        waiting = [batcher.submit(_patches(3)), batcher.submit(_patches(2))]
        time.sleep(0.1)
        gate.set()
        for future in (first, *waiting):
            future.result(TIMEOUT)
    mine = [o for o in seen if o.batcher == "obs"]
    assert [o.size for o in mine] == [1, 5]
    assert len(mine[0].queue_waits) == 1 and len(mine[1].queue_waits) == 2
    assert all(wait >= 0.09 for wait in mine[1].queue_waits)
    assert all(o.network_seconds >= 0.05 for o in mine)
    assert batcher.stats.queue_seconds >= 0.18
    assert batcher.stats.network_seconds >= 0.1


def test_a_failing_observer_does_not_fail_inference():
    def broken(_: BatchObservation) -> None:
        raise RuntimeError("observer bug")

    with DynamicBatcher(lambda b: np.ones((len(b), 2), np.float32), name="obs2") as batcher:
        batcher.add_observer(broken)
        features = batcher.extract_sync(_patches(2), timeout=TIMEOUT)
    assert features.shape == (2, 2)


def test_removed_observer_is_not_called():
    seen: list[BatchObservation] = []
    with DynamicBatcher(
        lambda b: np.ones((len(b), 2), np.float32), name="obs3", observers=[seen.append]
    ) as batcher:
        batcher.extract_sync(_patches(1), timeout=TIMEOUT)
        batcher.remove_observer(seen.append)
        batcher.extract_sync(_patches(1), timeout=TIMEOUT)
    assert [o.size for o in seen] == [1]


def _tiny_net(key: str) -> NetworkSpec:
    import torch

    return NetworkSpec(
        key,
        4,
        lambda: torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 4)),
        "tiny",
    )


def test_runtime_observers_reach_existing_and_later_batchers(tmp_path):
    early: list[BatchObservation] = []
    late: list[BatchObservation] = []
    runtime = Runtime(
        RuntimeSettings(device="cpu", compile_cache_dir=str(tmp_path)), batch_observers=[early.append]
    )
    try:
        patches = np.zeros((2, 3, 224, 224), np.float32)
        first = runtime.batcher(_tiny_net("a1" * 32))
        first.extract_sync(patches, timeout=TIMEOUT)
        runtime.add_batch_observer(late.append)  # after the first batcher exists
        first.extract_sync(patches, timeout=TIMEOUT)
        second = runtime.batcher(_tiny_net("b2" * 32))
        second.extract_sync(patches, timeout=TIMEOUT)
        runtime.remove_batch_observer(early.append)
        first.extract_sync(patches, timeout=TIMEOUT)
    finally:
        runtime.close()
    assert sum(o.size for o in early) == 6
    assert sum(o.size for o in late) == 6
    assert first.name != second.name
    assert {o.batcher for o in late} == {first.name, second.name}
