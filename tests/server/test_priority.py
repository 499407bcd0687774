"""Interactive work ahead of bulk work; requests whose deadline passes in the queue are dropped.

The batcher is tested with a recording network stand-in (its features
identify each patch); the server with real EfficientNet on loopback gRPC.
"""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import numpy as np
import pytest

from server._proto.spacer.v1 import spacer_pb2 as pb
from server.client import SpacerClient
from server.errors import status_for
from spacer_core.exceptions import DeadlineExceededError, SpacerError
from spacer_core.inference import BatcherSettings, DynamicBatcher, Priority
from spacer_core.testing import extractor_json, make_classifier, make_image
from spacer_core.testing import fs_loc as fs
from tests.spacer_core.test_batcher import TIMEOUT, RecordingNetwork, expected, hold_worker, patches_of
from tests.support.grpc_server import running_server

# ---------------------------------------------------------------- batcher


def test_interactive_requests_are_batched_before_earlier_bulk_requests():
    network = RecordingNetwork(hold_first=True)
    with DynamicBatcher(network, BatcherSettings(max_batch_size=4, queue_delay_ms=0)) as batcher:
        first = hold_worker(network, batcher)
        bulk = [batcher.submit(patches_of([10 + i] * 3), priority=Priority.BULK) for i in range(3)]
        interactive = batcher.submit(patches_of([50, 51]), priority=Priority.INTERACTIVE)
        late_bulk = batcher.submit(patches_of([99]), priority=Priority.BULK)
        network.gate.set()
        for future in [first, *bulk, interactive, late_bulk]:
            future.result(TIMEOUT)
    # The batch after the held one starts with the interactive patches, then
    # fills with bulk patches in the order they came (FIFO within a priority).
    flat = [round(float(v) * 255) for batch in network.batches[1:] for v in batch[:, 0]]
    assert flat == [50, 51, 10, 10, 10, 11, 11, 11, 12, 12, 12, 99]
    np.testing.assert_array_equal(interactive.result(), expected([50, 51]))
    np.testing.assert_array_equal(bulk[1].result(), expected([11, 11, 11]))


def test_equal_priorities_keep_fifo_order_and_default_priority_is_interactive():
    network = RecordingNetwork(hold_first=True)
    with DynamicBatcher(network, BatcherSettings(max_batch_size=2, queue_delay_ms=0)) as batcher:
        first = hold_worker(network, batcher)
        bulk = batcher.submit(patches_of([7]), priority=Priority.BULK)
        plain = [batcher.submit(patches_of([20 + i])) for i in range(3)]
        network.gate.set()
        for future in [first, bulk, *plain]:
            future.result(TIMEOUT)
    flat = [round(float(v) * 255) for batch in network.batches[1:] for v in batch[:, 0]]
    assert flat == [20, 21, 22, 7]


def test_a_bulk_backlog_does_not_keep_interactive_work_out_of_a_full_queue():
    network = RecordingNetwork(hold_first=True)
    with DynamicBatcher(
        network, BatcherSettings(max_batch_size=4, queue_delay_ms=0, max_queued_patches=6)
    ) as batcher:
        first = hold_worker(network, batcher)
        bulk = batcher.submit(patches_of([3] * 6), priority=Priority.BULK)
        with pytest.raises(SpacerError, match="queue full"):
            batcher.submit(patches_of([4]), priority=Priority.BULK)
        interactive = batcher.submit(patches_of([5] * 2), priority=Priority.INTERACTIVE)
        network.gate.set()
        np.testing.assert_array_equal(interactive.result(TIMEOUT), expected([5, 5]))
        bulk.result(TIMEOUT)
        first.result(TIMEOUT)


def test_a_request_whose_deadline_passes_in_the_queue_never_reaches_the_network():
    network = RecordingNetwork(hold_first=True)
    with DynamicBatcher(network, BatcherSettings(max_batch_size=8, queue_delay_ms=0)) as batcher:
        first = hold_worker(network, batcher)
        doomed = batcher.submit(patches_of([66, 66, 66]), deadline=time.monotonic() + 0.05)
        kept = batcher.submit(patches_of([8]), deadline=time.monotonic() + 60)
        time.sleep(0.1)
        network.gate.set()
        with pytest.raises(
            DeadlineExceededError, match="deadline passed after .*s in the network's queue"
        ) as err:
            doomed.result(TIMEOUT)
        assert batcher.name not in str(err.value)  # clients see what happened, not internal names
        np.testing.assert_array_equal(kept.result(TIMEOUT), expected([8]))
        first.result(TIMEOUT)
        assert batcher.stats.expired_patches == 3
        assert batcher.queued_patches == 0
    seen = {round(float(v) * 255) for batch in network.batches for v in batch[:, 0]}
    assert 66 not in seen and 8 in seen


def test_a_deadline_already_passed_is_refused_at_once_and_async_callers_get_the_error():
    network = RecordingNetwork(hold_first=True)
    with DynamicBatcher(network, BatcherSettings(max_batch_size=8, queue_delay_ms=0)) as batcher:
        with pytest.raises(
            DeadlineExceededError, match="before the request reached the network's queue"
        ) as err:
            batcher.submit(patches_of([1]), deadline=time.monotonic() - 1)
        assert batcher.name not in str(err.value)
        first = hold_worker(network, batcher)

        async def late() -> None:
            await batcher.extract(patches_of([2]), deadline=time.monotonic() + 0.05)

        async def main() -> None:
            task = asyncio.ensure_future(late())
            await asyncio.sleep(0.1)
            network.gate.set()
            await task

        with pytest.raises(DeadlineExceededError):
            asyncio.run(main())
        first.result(TIMEOUT)


def test_deadline_errors_map_to_deadline_exceeded():
    code, message = status_for(DeadlineExceededError("batcher: the deadline passed"))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "deadline passed" in message


# ---------------------------------------------------------------- server

BULK_IMAGES = 6
BULK_POINTS = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory, efficientnet_weights):  # noqa: F811
    root = tmp_path_factory.mktemp("priority")
    return {
        "images": [make_image(root / f"img{i}.png", 80, 60, seed=i) for i in range(BULK_IMAGES)],
        "clf": make_classifier(root / "clf.pkl"),
        "extractor": extractor_json(efficientnet_weights.path, efficientnet_weights.sha256),
    }


def points(n: int) -> list[tuple[int, int]]:
    return [(i * 7 % 60, i * 11 % 80) for i in range(n)]


def _batcher(server):
    batchers = server.server.engine.runtime._batchers
    (key,) = batchers.keys()
    return batchers.peek(key)


@pytest.mark.slow
def test_interactive_call_overtakes_a_bulk_stream_and_an_expired_call_never_reaches_the_network(data):
    config = dict(workers=2, batch_size=4, queue_delay_ms=0, stream_window=BULK_IMAGES, log_level="WARNING")
    with running_server(**config) as server, SpacerClient(server.address, timeout=120) as client:
        request = lambda path, n, token: client.image_request(  # noqa: E731
            data["extractor"], points(n), fs(path), fs(data["clf"]), token
        )
        client.classify_image(data["extractor"], points(1), fs(data["images"][0]), fs(data["clf"]))
        batcher = _batcher(server)
        warm_patches = batcher.stats.patches

        stream = client.classify_images(
            request(path, BULK_POINTS, f"bulk{i}") for i, path in enumerate(data["images"])
        )
        arrivals: list[tuple[str, float]] = []
        first = next(stream)  # the backlog is queued: every image is in the window
        assert first.HasField("result"), first
        arrivals.append((first.job_token, time.monotonic()))
        reader = threading.Thread(
            target=lambda: arrivals.extend((r.job_token, time.monotonic()) for r in stream)
        )
        reader.start()

        # A bulk-priority call with a short deadline waits behind the backlog and is dropped.
        doomed = request(data["images"][1], 20, "doomed")
        with pytest.raises(grpc.RpcError) as caught:
            client.stub.ClassifyImage(doomed, timeout=0.2, metadata=[("x-priority", "bulk")])
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        # An interactive call (the unary default) goes ahead of what is left of the stream:
        # at most the images finishing in the batches already running complete meanwhile.
        asked = time.monotonic()
        reply = client.classify_image(
            data["extractor"], points(2), fs(data["images"][2]), fs(data["clf"]), job_token="interactive"
        )
        answered = time.monotonic()
        assert len(reply.scores) == 2
        reader.join(120)
        during = [token for token, t in arrivals if asked <= t <= answered]
        after = [token for token, t in arrivals if t > answered]
        assert len(during) <= 2 and after, (during, after)
        assert sorted(token for token, _ in arrivals) == sorted(f"bulk{i}" for i in range(BULK_IMAGES))

        # The doomed call's 20 patches were dropped unrun (by its deadline or its
        # cancellation, whichever came first); everything else ran exactly once.
        stats = batcher.stats
        assert stats.patches - warm_patches == BULK_IMAGES * BULK_POINTS + 2
        assert stats.expired_patches + stats.cancelled_patches == 20


def test_unknown_x_priority_is_invalid_argument(data):
    with (
        running_server(workers=1, log_level="WARNING") as server,
        SpacerClient(server.address, timeout=60) as client,
    ):
        request = client.image_request(data["extractor"], points(1), fs(data["images"][0]), fs(data["clf"]))
        with pytest.raises(grpc.RpcError) as caught:
            client.stub.ClassifyImage(request, metadata=[("x-priority", "urgent")])
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "x-priority" in caught.value.details() and "urgent" in caught.value.details()
        request.priority = pb.PRIORITY_BULK
        assert len(client.stub.ClassifyImage(request, timeout=60).scores) == 1
