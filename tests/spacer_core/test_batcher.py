"""DynamicBatcher: batching across callers, ordering, cancellation, bounds, failures."""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import threading

import numpy as np
import pytest

from spacer_core.inference import BatcherClosedError, BatcherSettings, DynamicBatcher, QueueFullError

TIMEOUT = 10


class RecordingNetwork:
    """A network stand-in whose features identify each patch exactly.

    Feature = the patch's top-left pixel (each test patch is one flat value), so a caller can tell its own
    patches from everyone else's. Batches are recorded; a batch containing a
    patch of value POISON raises; `gate` (when set) holds the first batch
    until released, so tests can line up the queue deterministically.
    """

    POISON = 255

    def __init__(self, hold_first: bool = False):
        self.batches: list[np.ndarray] = []
        self.gate = threading.Event()
        self.entered = threading.Event()
        if not hold_first:
            self.gate.set()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.entered.set()
        assert self.gate.wait(TIMEOUT)
        features = batch[:, :, 0, 0].copy()
        self.batches.append(features)
        if np.any(np.isclose(features, self.POISON / 255)):
            raise RuntimeError("poisoned batch")
        return features


def patches_of(values: list[int]) -> np.ndarray:
    """uint8 HWC crops, each filled with its value (feature = value / 255 per channel)."""
    out = np.empty((len(values), 224, 224, 3), np.uint8)
    for i, v in enumerate(values):
        out[i] = v
    return out


def expected(values: list[int]) -> np.ndarray:
    return np.repeat((np.array(values, np.float32) / np.float32(255))[:, None], 3, axis=1)


def hold_worker(network: RecordingNetwork, batcher: DynamicBatcher):
    """Occupy the worker with a one-patch batch stuck in the network; return its future."""
    first = batcher.submit(patches_of([1]))
    assert network.entered.wait(TIMEOUT)
    return first


@pytest.mark.parametrize("workers", [1, 3])
def test_concurrent_callers_get_exactly_their_own_features(workers):
    network = RecordingNetwork()
    rng = random.Random(3)
    requests = [[rng.randrange(2, 250) for _ in range(rng.randrange(1, 12))] for _ in range(24)]
    with DynamicBatcher(
        network, BatcherSettings(max_batch_size=8, queue_delay_ms=5, workers=workers)
    ) as batcher:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda v: batcher.extract_sync(patches_of(v), TIMEOUT), requests))
    for values, features in zip(requests, results):
        np.testing.assert_array_equal(features, expected(values))
    assert sum(len(b) for b in network.batches) == sum(map(len, requests))
    assert max(len(b) for b in network.batches) <= 8


def test_one_request_of_many_batches_keeps_every_worker_busy():
    """A lone caller's request wakes every worker, not only the one its arrival woke."""
    both = threading.Barrier(2, timeout=TIMEOUT)

    def network(batch: np.ndarray) -> np.ndarray:
        both.wait()  # raises BrokenBarrierError unless two batches run at once
        return batch[:, :, 0, 0].copy()

    with DynamicBatcher(network, BatcherSettings(max_batch_size=2, workers=2, queue_delay_ms=0)) as batcher:
        # Both workers are asleep on the empty queue; one request of four batches arrives.
        got = batcher.extract_sync(patches_of(list(range(8))), timeout=TIMEOUT)
    assert np.array_equal(got, expected(list(range(8))))


def test_asyncio_callers_get_their_own_features_in_order():
    network = RecordingNetwork()
    requests = [[(7 * i + j) % 250 + 1 for j in range(i % 5 + 1)] for i in range(30)]

    async def main(batcher: DynamicBatcher) -> list[np.ndarray]:
        return await asyncio.gather(*(batcher.extract(patches_of(v)) for v in requests))

    with DynamicBatcher(network, BatcherSettings(max_batch_size=16, queue_delay_ms=10)) as batcher:
        results = asyncio.run(main(batcher))
    for values, features in zip(requests, results):
        np.testing.assert_array_equal(features, expected(values))
    # Thirty callers fit in far fewer batches: patches were batched across callers.
    assert len(network.batches) < len(requests)


def test_batches_fill_across_callers_and_split_requests():
    network = RecordingNetwork(hold_first=True)
    with DynamicBatcher(network, BatcherSettings(max_batch_size=8, queue_delay_ms=0)) as batcher:
        first = hold_worker(network, batcher)
        futures = [batcher.submit(patches_of([10 + 3 * i, 11 + 3 * i, 12 + 3 * i])) for i in range(3)]
        network.gate.set()
        results = [f.result(TIMEOUT) for f in futures]
        first.result(TIMEOUT)
    assert [len(b) for b in network.batches] == [1, 8, 1]
    for i, features in enumerate(results):
        np.testing.assert_array_equal(features, expected([10 + 3 * i, 11 + 3 * i, 12 + 3 * i]))


def test_queue_delay_waits_for_a_fuller_batch():
    network = RecordingNetwork()
    with DynamicBatcher(network, BatcherSettings(max_batch_size=64, queue_delay_ms=500)) as batcher:
        a = batcher.submit(patches_of([5]))
        b = batcher.submit(patches_of([6, 7]))
        a.result(TIMEOUT), b.result(TIMEOUT)
    assert [len(x) for x in network.batches] == [3]


def test_float_patches_are_accepted():
    network = RecordingNetwork()
    patches = np.stack([np.full((3, 224, 224), v / 255, np.float32) for v in (3, 9)])
    with DynamicBatcher(network) as batcher:
        np.testing.assert_allclose(batcher.extract_sync(patches, TIMEOUT), expected([3, 9]), rtol=1e-6)


def test_cancelled_callers_patches_are_dropped():
    network = RecordingNetwork(hold_first=True)
    with DynamicBatcher(network, BatcherSettings(max_batch_size=4, queue_delay_ms=0)) as batcher:
        first = hold_worker(network, batcher)
        doomed = batcher.submit(patches_of([40, 41, 42, 43, 44]))
        kept = batcher.submit(patches_of([50, 51]))
        assert batcher.queued_patches == 7
        assert doomed.cancel()
        assert batcher.queued_patches == 2
        network.gate.set()
        np.testing.assert_array_equal(kept.result(TIMEOUT), expected([50, 51]))
        first.result(TIMEOUT)
    seen = np.concatenate(network.batches)[:, 0]
    assert not np.isin(np.round(seen * 255), [40, 41, 42, 43, 44]).any()
    assert batcher.stats.cancelled_patches == 5


def test_cancelled_asyncio_task_drops_its_patches():
    network = RecordingNetwork(hold_first=True)

    async def main(batcher: DynamicBatcher) -> np.ndarray:
        first = batcher.submit(patches_of([1]))
        await asyncio.to_thread(network.entered.wait, TIMEOUT)
        doomed = asyncio.create_task(batcher.extract(patches_of([60, 61, 62])))
        kept = asyncio.create_task(batcher.extract(patches_of([70])))
        while batcher.queued_patches < 4:
            await asyncio.sleep(0.001)
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        assert batcher.queued_patches == 1
        network.gate.set()
        await asyncio.wrap_future(first)
        return await kept

    with DynamicBatcher(network, BatcherSettings(max_batch_size=8, queue_delay_ms=0)) as batcher:
        np.testing.assert_array_equal(asyncio.run(main(batcher)), expected([70]))
    seen = np.round(np.concatenate(network.batches)[:, 0] * 255)
    assert not np.isin(seen, [60, 61, 62]).any()


def test_bounded_queue_pushes_back():
    network = RecordingNetwork(hold_first=True)
    with DynamicBatcher(
        network, BatcherSettings(max_batch_size=2, queue_delay_ms=0, max_queued_patches=4)
    ) as batcher:
        first = hold_worker(network, batcher)
        held = batcher.submit(patches_of([20, 21, 22]))
        with pytest.raises(QueueFullError, match="queue full"):
            batcher.submit(patches_of([23, 24]))
        with pytest.raises(QueueFullError):
            batcher.submit(patches_of([23, 24]), block=True, timeout=0.05)
        assert batcher.queued_patches == 3
        # A blocked caller gets in once the worker makes room.
        waiting = concurrent.futures.ThreadPoolExecutor(1).submit(
            batcher.extract_sync, patches_of([25, 26]), TIMEOUT
        )
        network.gate.set()
        np.testing.assert_array_equal(waiting.result(TIMEOUT), expected([25, 26]))
        np.testing.assert_array_equal(held.result(TIMEOUT), expected([20, 21, 22]))
        first.result(TIMEOUT)


def test_asyncio_caller_awaits_room_or_is_refused():
    network = RecordingNetwork(hold_first=True)

    async def main(batcher: DynamicBatcher) -> np.ndarray:
        first = batcher.submit(patches_of([1]))
        await asyncio.to_thread(network.entered.wait, TIMEOUT)
        held = asyncio.create_task(batcher.extract(patches_of([30, 31])))
        while batcher.queued_patches < 2:
            await asyncio.sleep(0.001)
        with pytest.raises(QueueFullError):
            await batcher.extract(patches_of([32, 33]), block=False)
        with pytest.raises(QueueFullError):
            await batcher.extract(patches_of([32, 33]), timeout=0.05)
        waiting = asyncio.create_task(batcher.extract(patches_of([34, 35])))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        network.gate.set()
        await asyncio.wrap_future(first)
        await held
        return await asyncio.wait_for(waiting, TIMEOUT)

    with DynamicBatcher(
        network, BatcherSettings(max_batch_size=2, queue_delay_ms=0, max_queued_patches=3)
    ) as batcher:
        np.testing.assert_array_equal(asyncio.run(main(batcher)), expected([34, 35]))


def test_request_larger_than_the_bound_runs_alone():
    network = RecordingNetwork()
    values = list(range(10, 30))
    with DynamicBatcher(network, BatcherSettings(max_batch_size=8, max_queued_patches=4)) as batcher:
        np.testing.assert_array_equal(batcher.extract_sync(patches_of(values), TIMEOUT), expected(values))


def test_failing_batch_fails_only_its_callers():
    network = RecordingNetwork(hold_first=True)
    with DynamicBatcher(network, BatcherSettings(max_batch_size=4, queue_delay_ms=0)) as batcher:
        first = hold_worker(network, batcher)
        # Batch 2: [poisoned caller's 2 patches + neighbour's 2]; batch 3: the bystander.
        poisoned = batcher.submit(patches_of([80, RecordingNetwork.POISON]))
        neighbour = batcher.submit(patches_of([81, 82]))
        bystander = batcher.submit(patches_of([83, 84, 85]))
        network.gate.set()
        with pytest.raises(RuntimeError, match="poisoned batch"):
            poisoned.result(TIMEOUT)
        with pytest.raises(RuntimeError, match="poisoned batch"):
            neighbour.result(TIMEOUT)
        np.testing.assert_array_equal(bystander.result(TIMEOUT), expected([83, 84, 85]))
        np.testing.assert_array_equal(first.result(TIMEOUT), expected([1]))
        # The batcher keeps working after a failure.
        np.testing.assert_array_equal(batcher.extract_sync(patches_of([90]), TIMEOUT), expected([90]))
    assert batcher.stats.failed_batches == 1


def test_failure_in_a_later_part_fails_the_whole_request_and_drops_the_rest():
    network = RecordingNetwork(hold_first=True)
    with DynamicBatcher(network, BatcherSettings(max_batch_size=2, queue_delay_ms=0)) as batcher:
        first = hold_worker(network, batcher)
        # Split over three batches; the second one fails.
        split = batcher.submit(patches_of([100, 101, RecordingNetwork.POISON, 103, 104, 105]))
        after = batcher.submit(patches_of([110]))
        network.gate.set()
        with pytest.raises(RuntimeError, match="poisoned batch"):
            split.result(TIMEOUT)
        np.testing.assert_array_equal(after.result(TIMEOUT), expected([110]))
        first.result(TIMEOUT)
    seen = np.round(np.concatenate(network.batches)[:, 0] * 255)
    assert not np.isin(seen, [104, 105]).any()


def test_wrong_shaped_output_fails_the_batch():
    with DynamicBatcher(lambda batch: np.zeros((1, 4), np.float32)) as batcher:
        with pytest.raises(RuntimeError, match="shape"):
            batcher.extract_sync(patches_of([1, 2]), TIMEOUT)


def test_invalid_patches_are_rejected_at_submit():
    with DynamicBatcher(RecordingNetwork()) as batcher:
        with pytest.raises(ValueError, match="uint8 \\(N, 224, 224, 3\\)"):
            batcher.submit(np.zeros((2, 100, 100, 3), np.uint8))
        with pytest.raises(ValueError, match="empty"):
            batcher.submit(np.zeros((0, 224, 224, 3), np.uint8))
        with pytest.raises(TypeError):
            batcher.submit([[1, 2]])  # type: ignore[arg-type]


def test_close_drains_or_fails_queued_work():
    network = RecordingNetwork(hold_first=True)
    batcher = DynamicBatcher(network, BatcherSettings(max_batch_size=1, queue_delay_ms=0))
    first = hold_worker(network, batcher)
    queued = batcher.submit(patches_of([5, 6]))
    closer = threading.Thread(target=batcher.close, kwargs={"drain": False})
    closer.start()
    with pytest.raises(BatcherClosedError):
        queued.result(TIMEOUT)
    network.gate.set()
    closer.join(TIMEOUT)
    np.testing.assert_array_equal(first.result(TIMEOUT), expected([1]))
    with pytest.raises(BatcherClosedError):
        batcher.submit(patches_of([7]))

    drained = DynamicBatcher(RecordingNetwork(), BatcherSettings(max_batch_size=1))
    pending = drained.submit(patches_of([8, 9]))
    drained.close(drain=True)
    np.testing.assert_array_equal(pending.result(0), expected([8, 9]))


@pytest.mark.slow
def test_real_network_through_the_batcher(efficientnet_weights, tmp_path):  # noqa: F811
    from spacer_core.crop import crop_array
    from spacer_core.extractors.efficientnet import build_network
    from spacer_core.inference import load_backend, run_in_batches

    backend = load_backend(
        efficientnet_weights.sha256,
        lambda: build_network(efficientnet_weights.path),
        device="cpu",
        cache_dir=tmp_path,
    )
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(300, 300, 3), dtype=np.uint8)
    requests = [
        crop_array(image, [(int(r), int(c)) for r, c in rng.integers(0, 300, (n, 2))]) for n in (1, 3, 2, 4)
    ]
    alone = [run_in_batches(backend, p, len(p)) for p in requests]
    with DynamicBatcher(backend, BatcherSettings(max_batch_size=4, queue_delay_ms=20)) as batcher:
        futures = [batcher.submit(p) for p in requests]
        together = [f.result(60) for f in futures]
    for a, t in zip(alone, together):
        assert t.shape == a.shape == (len(a), 1280)
        assert np.max(np.abs(a - t)) <= 1e-5


@pytest.mark.gpu
def test_gpu_batcher_overlaps_batches_and_matches_cpu(efficientnet_weights, tmp_path):  # noqa: F811
    from spacer_core.crop import crop_array
    from spacer_core.extractors.efficientnet import build_network
    from spacer_core.inference import load_backend, run_in_batches

    def make():
        return build_network(efficientnet_weights.path)

    cpu = load_backend(efficientnet_weights.sha256, make, device="cpu", kind="eager")
    gpu = load_backend(efficientnet_weights.sha256, make, device="cuda", cache_dir=tmp_path)
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(400, 400, 3), dtype=np.uint8)
    requests = [
        crop_array(image, [(int(r), int(c)) for r, c in rng.integers(0, 400, (n, 2))])
        for n in rng.integers(1, 40, 24)
    ]
    with DynamicBatcher(gpu, BatcherSettings(max_batch_size=32, queue_delay_ms=1)) as batcher:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda p: batcher.extract_sync(p, 60), requests))
    for patches, features in zip(requests, results):
        assert np.max(np.abs(features - run_in_batches(cpu, patches, 16))) <= 1e-4


def test_finished_request_releases_its_patches_without_the_cycle_collector():
    """A served request's patches are freed by reference counting alone: no
    request <-> future cycle keeps ~12 MB per image alive until a gc pass."""
    import gc
    import weakref

    network = RecordingNetwork()
    patches = np.stack([np.full((3, 224, 224), v / 255, np.float32) for v in (3, 9)])
    alive = weakref.ref(patches)
    gc.disable()
    try:
        with DynamicBatcher(network, BatcherSettings(queue_delay_ms=0)) as batcher:
            batcher.extract_sync(patches, TIMEOUT)
            del patches
            # The worker holds its latest batch until the next one; run another.
            batcher.extract_sync(np.zeros((1, 3, 224, 224), np.float32), TIMEOUT)
            network.batches.clear()  # the stand-in's own record of what it saw
            assert alive() is None
    finally:
        gc.enable()


# -- batch assembly: uint8 crops become float32 input only when a batch is formed ------


def _real_jpeg(width: int = 900, height: int = 700, seed: int = 5) -> bytes:
    """A photo-like JPEG: smooth colour fields, gradients and pixel noise, quality 90."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.int16)
    ramp = np.linspace(-30, 30, width, dtype=np.float32).astype(np.int16)[None, :, None]
    noisy = smooth + ramp + rng.integers(-12, 13, (height, width, 1), dtype=np.int16)
    out = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def test_batches_assembled_from_uint8_crops_equal_the_float_crop_bit_for_bit():
    """The float32 batch formed from queued uint8 patches is, bit for bit, what
    cropping straight to float32 (the earlier path, ToTensor) gives."""
    from spacer_core import crop
    from spacer_core.inference.batcher import BatchBuffers, assemble

    data = _real_jpeg()
    rng = np.random.default_rng(2)
    # Border points too, where the crop reflects.
    points = [(0, 0), (699, 899), (350, 0)] + [
        (int(r), int(c)) for r, c in zip(rng.integers(0, 700, 9), rng.integers(0, 900, 9))
    ]
    old = crop.crop_patches_into_chw(data, points, np.empty((len(points), 3, 224, 224), np.float32))
    queued = crop.crop_patches(data, points)
    assert queued.dtype == np.uint8 and queued.nbytes == len(points) * 224 * 224 * 3

    buffers = BatchBuffers(lambda n: np.full((n, 3, 224, 224), np.nan, np.float32), size=5)
    # Batches of up to 5 patches, made of pieces of two "requests" (the two halves).
    first, second = queued[:7], queued[7:]
    batches = [[(first, 0, 5)], [(first, 5, 7), (second, 0, 3)], [(second, 3, 5)]]
    got = []
    for parts in batches:
        inputs, buffer = assemble(parts, buffers)
        assert inputs.dtype == np.float32 and inputs.flags.c_contiguous
        got.append(inputs.copy())
        buffers.give_back(buffer)
    batch = np.concatenate(got)
    assert batch.shape == old.shape
    assert np.array_equal(batch.view(np.uint32), old.view(np.uint32))


def test_contiguous_float_batches_are_not_copied_and_buffers_are_reused():
    from spacer_core.inference.batcher import BatchBuffers, assemble

    made: list[np.ndarray] = []

    def allocate(n: int) -> np.ndarray:
        made.append(np.empty((n, 3, 224, 224), np.float32))
        return made[-1]

    buffers = BatchBuffers(allocate, size=4)
    floats = np.random.default_rng(0).random((6, 3, 224, 224), dtype=np.float32)
    inputs, buffer = assemble([(floats, 2, 6)], buffers)
    assert buffer is None and np.shares_memory(inputs, floats) and not made
    # Two runs of float patches are one batch: copied into a buffer, which is reused.
    inputs, buffer = assemble([(floats, 0, 1), (floats, 5, 6)], buffers)
    np.testing.assert_array_equal(inputs, floats[[0, 5]])
    buffers.give_back(buffer)
    for _ in range(3):
        inputs, buffer = assemble([(patches_of([1, 2, 3]), 0, 3)], buffers)
        np.testing.assert_array_equal(inputs[:, :, 0, 0], expected([1, 2, 3]))
        buffers.give_back(buffer)
    assert len(made) == 1


def test_the_batcher_reuses_its_input_buffers():
    """Many batches, few input arrays: each worker's buffers are handed out again."""
    import torch

    from spacer_core.inference.backends import Backend, ready
    from spacer_core.inference.precision import Precision

    class Counting(Backend):
        allocated = 0

        def launch(self, batch: np.ndarray):
            return ready(batch[:, :, 0, 0].copy())

        def allocate_batch(self, n: int) -> np.ndarray:
            Counting.allocated += 1
            return super().allocate_batch(n)

    backend = Counting(torch.device("cpu"), Precision.EXACT)
    with DynamicBatcher(backend, BatcherSettings(max_batch_size=4, queue_delay_ms=0, workers=2)) as batcher:
        futures = [batcher.submit(patches_of([v % 250 + 1] * 3)) for v in range(40)]
        for v, future in enumerate(futures):
            np.testing.assert_array_equal(future.result(TIMEOUT), expected([v % 250 + 1] * 3))
    assert batcher.stats.batches >= 30
    assert Counting.allocated <= 4  # at most two per worker


def test_batcher_settings_name_the_bad_value() -> None:
    with pytest.raises(ValueError, match="queue_delay_ms"):
        BatcherSettings(queue_delay_ms=-1)
    with pytest.raises(ValueError, match="queue_delay_ms"):
        BatcherSettings(queue_delay_ms=float("nan"))
    with pytest.raises(ValueError, match="max_batch_size"):
        BatcherSettings(max_batch_size=0)
    # A batch buffer of 100000 patches would be 56 GiB: refused, not failed at the first call.
    with pytest.raises(ValueError, match=r"max_batch_size must be in 1\.\.256, got 100000"):
        BatcherSettings(max_batch_size=100000)
    assert BatcherSettings(max_batch_size=256).max_batch_size == 256
    with pytest.raises(TypeError, match="settings"):
        DynamicBatcher(RecordingNetwork(), 8)  # type: ignore[arg-type]


def test_batcher_defaults_and_queue_delay_unit() -> None:
    with DynamicBatcher(RecordingNetwork()) as batcher:
        assert (batcher.max_batch_size, batcher.settings.workers) == (16, 1)
        assert batcher.settings.queue_delay_ms == 2.0
        assert batcher._queue_delay_s == pytest.approx(0.002)


def test_runtime_default_queue_delay_is_the_library_default() -> None:
    from spacer_core.runtime import RuntimeSettings

    assert RuntimeSettings().batcher == BatcherSettings()
    assert RuntimeSettings().batcher.queue_delay_ms == 2.0
