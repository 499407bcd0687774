"""Admission by bytes: the server's memory budget against real images' footprints."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from server.config import ServerConfig
from server.dataplane import Engine, MemoryBudget
from spacer_core import pipeline
from spacer_core.data_classes import DataLocation
from spacer_core.exceptions import QueueFullError
from spacer_core.extractors import EfficientNetExtractor
from spacer_core.inference import BatcherSettings, Priority
from spacer_core.runtime import Runtime, RuntimeSettings
from spacer_core.testing import photo_jpeg, random_points

SIZES = [(1600, 1200), (1200, 900), (800, 600), (640, 480)]


async def _two_waiters_behind(budget: MemoryBudget, running: int, first: int, second: int) -> tuple:
    """Hold `running` bytes, then queue a waiter for `first` bytes and one for `second` behind it."""
    hold = await budget.acquire(running)
    ahead = asyncio.ensure_future(budget.acquire(first))
    await asyncio.sleep(0.01)
    behind = asyncio.ensure_future(budget.acquire(second))
    await asyncio.sleep(0.01)
    return hold, ahead, behind


@pytest.fixture(scope="module")
def jobs(efficientnet_weights):  # noqa: F811
    extractor = EfficientNetExtractor(
        data_locations={"weights": DataLocation("filesystem", str(efficientnet_weights.path))}
    )
    return [
        pipeline.ImageJob(
            extractor, random_points(3 + i, w, h, i), photo_jpeg(w, h, i, grid=(6, 8)), f"image{i}"
        )
        for i, (w, h) in enumerate(SIZES)
    ]


@pytest.fixture(scope="module")
def footprints(jobs) -> list[pipeline.Footprint]:
    runtime = Runtime(RuntimeSettings(device="cpu", batcher=BatcherSettings(max_batch_size=4)))
    with runtime.activate():
        return [pipeline.load(job).footprint for job in jobs]


def test_footprints_count_decoded_pixels_patches_and_batch_input(jobs, footprints):
    for job, footprint in zip(jobs, footprints):
        n = len(job.rowcols)
        width, height = Image.open(io.BytesIO(job.image)).size
        queued = n * 224 * 224 * 3 + min(n, 4) * 3 * 224 * 224 * 4
        assert footprint.waiting == queued
        assert footprint.cutting == len(job.image) + width * height * 3 + queued


def test_the_budget_refuses_to_over_admit_by_bytes(footprints):
    big, mid, small, _ = footprints
    budget = MemoryBudget(big.cutting + mid.cutting + small.cutting - 1)

    async def scenario() -> None:
        first = await budget.acquire(big.cutting)
        second = await budget.acquire(mid.cutting)
        # The third image's bytes would pass the budget: refused at once, or made to wait.
        with pytest.raises(QueueFullError, match="queue is full"):
            await budget.acquire(small.cutting, wait=False)
        third = asyncio.ensure_future(budget.acquire(small.cutting))
        await asyncio.sleep(0.01)
        assert not third.done() and budget.held == big.cutting + mid.cutting
        # The first image is cut: it now holds only its patches, and the third fits.
        first.resize(big.waiting)
        hold = await asyncio.wait_for(third, 1)
        assert budget.held == big.waiting + mid.cutting + small.cutting <= budget.budget
        for h in (first, second, hold):
            h.release()
            h.release()  # a second release gives nothing back twice
        assert budget.held == 0 and budget.peak <= budget.budget and budget.waited == 1

    asyncio.run(scenario())


def test_an_image_larger_than_the_budget_runs_alone(footprints):
    big, _, small, _ = footprints
    budget = MemoryBudget(big.cutting // 2)

    async def scenario() -> None:
        alone = await asyncio.wait_for(budget.acquire(big.cutting), 1)  # nothing held: admitted
        with pytest.raises(QueueFullError):
            await budget.acquire(small.cutting, wait=False)
        after = asyncio.ensure_future(budget.acquire(small.cutting))
        await asyncio.sleep(0.01)
        assert not after.done()
        alone.release()
        (await asyncio.wait_for(after, 1)).release()
        assert budget.held == 0 and budget.peak == big.cutting

    asyncio.run(scenario())


def test_waiting_images_are_admitted_in_order_so_a_large_one_is_not_starved(footprints):
    big, mid, small, tiny = footprints
    budget = MemoryBudget(big.cutting + small.cutting)

    async def scenario() -> None:
        # The tiny image would fit now, but the large image waits ahead of it.
        running, large, later = await _two_waiters_behind(budget, mid.cutting, big.cutting, tiny.cutting)
        assert not large.done() and not later.done()
        running.release()
        hold = await asyncio.wait_for(large, 1)
        (await asyncio.wait_for(later, 1)).release()
        hold.release()
        assert budget.held == 0

    asyncio.run(scenario())


def test_bulk_work_leaves_the_reserved_bytes_to_interactive_work(footprints):
    big, mid, _, _ = footprints
    budget = MemoryBudget(big.cutting + mid.cutting, reserved=mid.cutting)

    async def scenario() -> None:
        bulk = await budget.acquire(big.cutting, Priority.BULK)
        with pytest.raises(QueueFullError):
            await budget.acquire(mid.cutting, Priority.BULK, wait=False)
        interactive = await budget.acquire(mid.cutting, Priority.INTERACTIVE, wait=False)
        assert budget.held == budget.budget
        interactive.release()
        bulk.release()

    asyncio.run(scenario())


def test_a_cancelled_waiter_gives_way(footprints):
    big, mid, small, _ = footprints
    budget = MemoryBudget(mid.cutting + small.cutting)

    async def scenario() -> None:
        # The small image fits, but waits its turn.
        running, cancelled, behind = await _two_waiters_behind(
            budget, mid.cutting, big.cutting, small.cutting
        )
        assert not behind.done()
        cancelled.cancel()
        (await asyncio.wait_for(behind, 1)).release()
        running.release()
        assert budget.held == 0

    asyncio.run(scenario())


@pytest.mark.slow
def test_the_engine_holds_no_more_image_memory_than_its_budget(jobs, footprints, efficientnet_weights):  # noqa: F811
    """Concurrent streams' images through the real pipeline and network: the
    bytes held never pass the bulk share of the budget, every image is served."""
    config = ServerConfig(
        workers=2,
        log_level="WARNING",
        device="cpu",
        batch_size=4,
        data_roots=(efficientnet_weights.path.parent,),
        memory_budget_bytes=(footprints[0].cutting + footprints[1].cutting) * 4 // 3,
    )
    engine = Engine(config)
    bound = engine.memory.budget - engine.memory.reserved
    assert bound == footprints[0].cutting + footprints[1].cutting
    many = [jobs[i % len(jobs)] for i in range(8)]

    async def run() -> list[pipeline.ImageResult]:
        return await asyncio.gather(*(engine.run_image(job, priority=Priority.BULK) for job in many))

    try:
        results = asyncio.run(run())
        assert engine.memory.held == 0
        assert engine.memory.peak <= bound
        assert engine.memory.waited >= 1
        with engine.runtime.activate():
            for job, result in zip(many, results):
                np.testing.assert_allclose(result.features, pipeline.run(job).features, atol=1e-4)
    finally:
        engine.shutdown()
