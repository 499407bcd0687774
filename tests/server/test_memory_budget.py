"""Admission by bytes: the server's memory budget against real images' footprints."""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import time

import grpc
import numpy as np
import pytest
from PIL import Image

from server._proto.spacer.v1 import spacer_pb2 as pb
from server._proto.spacer.v1 import spacer_pb2_grpc as pb_grpc
from server.config import ServerConfig
from server.dataplane import Engine, MemoryBudget
from spacer_core import pipeline
from spacer_core.data_classes import DataLocation
from spacer_core.exceptions import QueueFullError
from spacer_core.extractors import EfficientNetExtractor
from spacer_core.inference import BatcherSettings, Priority
from spacer_core.inference.backends import in_one_session
from spacer_core.runtime import Runtime, RuntimeSettings
from spacer_core.testing import photo_jpeg, random_points
from tests.support.grpc_server import running_server

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


def test_image_work_keeps_to_one_core_while_other_images_are_admitted(tmp_path):
    """Alone, an image may decode on every core; beside others it decodes in one pass."""
    engine = Engine(ServerConfig(data_roots=(tmp_path,)))

    async def probe() -> tuple[bool, bool, bool]:
        async with engine.admission.try_enter():
            alone = await engine.call(in_one_session)
            async with engine.admission.try_enter():
                shared = await engine.call(in_one_session)
        return alone, shared, await engine.call(in_one_session)

    try:
        assert asyncio.run(probe()) == (False, True, False)
    finally:
        engine.shutdown()


# ------------------------------------------------------------ request bytes, charged when received

MIB = 1 << 20
DUMMY = pb.Extractor(class_path="spacer.extractors.base.DummyExtractor")


def test_requests_hold_at_most_half_the_bound_and_never_block_image_work():
    budget = MemoryBudget(100, reserved=20)

    async def scenario() -> None:
        first = await budget.acquire(30, Priority.BULK, request=True)
        # A second request would pass half the bulk bound (40): it waits, or is refused.
        with pytest.raises(QueueFullError, match="memory budget"):
            await budget.acquire(30, Priority.BULK, wait=False, request=True)
        waiting = asyncio.ensure_future(budget.acquire(30, Priority.BULK, request=True))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        # Image work of the requests already received goes ahead of the waiting request.
        work = await asyncio.wait_for(budget.acquire(40, Priority.BULK), 1)
        assert budget.held == 70 and budget.received == 30
        first.release()
        second = await asyncio.wait_for(waiting, 1)
        work.release()
        second.release()
        assert budget.held == 0 and budget.received == 0 and budget.peak <= 80

    asyncio.run(scenario())


def _padded_image(mib: float) -> bytes:
    """A valid JPEG followed by padding: `mib` MiB a client can send as one image."""
    image = photo_jpeg(64, 48, 1)
    return image + bytes(int(mib * MIB) - len(image))


def _stub(server) -> pb_grpc.SpacerStub:
    return pb_grpc.SpacerStub(grpc.insecure_channel(server.address))


def test_an_inline_image_is_charged_when_received_and_refused_over_the_budget(tmp_path):
    image = _padded_image(3)
    extract = pb.ExtractFeaturesRequest(
        job_token="big", extractor=DUMMY, rowcols=[pb.RowCol(row=5, col=5)], image_bytes=image
    )
    extract.return_features = True
    classify = pb.ClassifyImageRequest(
        job_token="big",
        extractor=DUMMY,
        rowcols=[pb.RowCol(row=5, col=5)],
        image_bytes=image,
        classifier_loc=pb.DataLocation(storage_type="filesystem", key=str(tmp_path / "never-read.pkl")),
    )
    with running_server(memory_budget_bytes=16 * MIB) as server:
        memory = server.server.engine.memory
        # Other work holds 12 MiB: the image's own work (3 MiB encoded, little decoded) would fit,
        # the request as held (the message and the job's copy of the bytes) does not.
        other = server._run(memory.acquire(12 * MIB))
        stub = _stub(server)
        for call, request in ((stub.ExtractFeatures, extract), (stub.ClassifyImage, classify)):
            with pytest.raises(grpc.RpcError) as refused:
                call(request, timeout=60)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "memory budget (--memory-budget-mb, 16 MiB)" in refused.value.details()
            assert "inline image needs 6 MiB" in refused.value.details()
        assert memory.held == 12 * MIB  # a refused request gives back what it was charged
        server.loop.call_soon_threadsafe(other.release)
        reply = stub.ExtractFeatures(extract, timeout=60)
        assert reply.features.npoints == 1
        assert memory.held == 0 and memory.received == 0
        assert memory.peak >= 2 * len(image)  # the request was charged, not only its image work


def test_stream_requests_wait_for_room_and_are_all_served(tmp_path):
    """Large inline images on concurrent streams: charged as read, each stream waits for room
    (and reads no further) instead of the server holding them all; every one is answered."""
    image = _padded_image(2.5)
    budget = 16 * MIB
    missing = pb.DataLocation(storage_type="filesystem", key=str(tmp_path / "missing.pkl"))

    def stream(k: int) -> list[str]:
        requests = (
            pb.ClassifyImageRequest(
                job_token=f"s{k}-{i}",
                extractor=DUMMY,
                rowcols=[pb.RowCol(row=5, col=5)],
                image_bytes=image,
                classifier_loc=missing,
            )
            for i in range(3)
        )
        return [r.error.code_name for r in stub.ClassifyImages(requests, timeout=120)]

    with running_server(memory_budget_bytes=budget) as server:
        memory = server.server.engine.memory
        stub = _stub(server)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            outcomes = list(pool.map(stream, range(4)))
        # The classifier is missing: each image fails as an item once its features are made.
        assert outcomes == [["NOT_FOUND"] * 3] * 4, outcomes
        assert memory.waited >= 1
        assert memory.peak <= budget - memory.reserved
        assert memory.held == 0 and memory.received == 0


def test_a_cancelled_stream_gives_back_what_its_requests_held():
    image = _padded_image(2)
    with running_server(memory_budget_bytes=64 * MIB) as server:
        memory = server.server.engine.memory
        stub = _stub(server)

        def requests():
            for i in range(50):
                yield pb.ClassifyImageRequest(
                    job_token=f"c{i}", extractor=DUMMY, rowcols=[pb.RowCol(row=5, col=5)], image_bytes=image
                )

        call = stub.ClassifyImages(requests(), timeout=120)
        next(call)
        call.cancel()
        deadline = time.monotonic() + 30
        while (memory.held or memory.received) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert memory.held == 0 and memory.received == 0


def test_an_oip_request_is_charged_when_received():
    from server._proto.inference import grpc_service_pb2 as oip_pb
    from server._proto.inference import grpc_service_pb2_grpc as oip_grpc

    image = _padded_image(3)
    request = oip_pb.ModelInferRequest(
        model_name="spacer-pipeline",
        inputs=[oip_pb.ModelInferRequest.InferInputTensor(name="IMAGE", datatype="BYTES", shape=[1])],
        raw_input_contents=[len(image).to_bytes(4, "little") + image],
    )
    with running_server(memory_budget_bytes=16 * MIB) as server:
        memory = server.server.engine.memory
        other = server._run(memory.acquire(12 * MIB))
        stub = oip_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.address))
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(request, timeout=60)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "memory budget (--memory-budget-mb, 16 MiB)" in refused.value.details()
        server.loop.call_soon_threadsafe(other.release)
        with pytest.raises(grpc.RpcError) as answered:  # admitted now: refused for its missing inputs
            stub.ModelInfer(request, timeout=60)
        assert answered.value.code() != grpc.StatusCode.RESOURCE_EXHAUSTED
        assert memory.held == 0
