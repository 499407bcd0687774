"""Where the servicer's work runs: a thread pool, admission control and the server's runtime.

Image work goes through `spacer_core.pipeline`: blocking steps in the pool,
the network through the runtime's dynamic batcher shared by every call
using the same network, so concurrent requests fill each other's batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from server.config import ServerConfig
from spacer_core import pipeline
from spacer_core.exceptions import QueueFullError
from spacer_core.extractors import FeatureExtractor
from spacer_core.data_classes import DataLocation
from spacer_core.pipeline import ImageJob, ImageResult
from spacer_core.runtime import LoadedModel, Runtime

logger = logging.getLogger(__name__)
T = TypeVar("T")


class Admission:
    """Counts image tasks admitted server-wide (running + waiting).

    Unary calls use `try_enter` (RESOURCE_EXHAUSTED when full); streams use
    `enter`, which waits, so a fast client is slowed instead of failed.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.active = 0
        self._freed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def try_enter(self) -> AsyncIterator[None]:
        if self.active >= self.limit:
            raise QueueFullError(
                f"server queue is full ({self.limit} image tasks admitted); retry later"
            )
        self.active += 1
        try:
            yield
        finally:
            await self._release()

    @contextlib.asynccontextmanager
    async def enter(self) -> AsyncIterator[None]:
        async with self._freed:
            await self._freed.wait_for(lambda: self.active < self.limit)
            self.active += 1
        try:
            yield
        finally:
            await self._release()

    async def _release(self) -> None:
        async with self._freed:
            self.active -= 1
            self._freed.notify()


class Engine:
    """Runs library work for the servicer: a thread pool, admission, the server's runtime.

    Every blocking call runs in the pool with the server's `Runtime` active,
    so the library uses this server's caches and storage policy. Cancelling
    the awaiting task drops work that has not started.
    """

    def __init__(self, config: ServerConfig):
        self.config = config
        self.admission = Admission(config.max_queue)
        self.runtime = Runtime(config.runtime_settings(), policy=config.storage_policy())
        self._pool = ThreadPoolExecutor(config.workers, thread_name_prefix="spacer-work")

    async def call(self, func: Callable[..., T], *args: Any) -> T:
        """func(*args) in the worker pool, with this server's runtime active."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._in_runtime, func, args)

    def _in_runtime(self, func: Callable[..., T], args: tuple[Any, ...]) -> T:
        with self.runtime.activate():
            return func(*args)

    async def run_image(self, job: ImageJob) -> ImageResult:
        """One image through the library pipeline; batched with concurrent calls unless disabled."""
        if not self.config.batching:
            return await self.call(pipeline.run, job)
        return await pipeline.run_async(job, self.runtime, self.call)

    async def load_extractor(self, extractor: FeatureExtractor) -> LoadedModel:
        """Fetch and verify the extractor's files; build its network (and batcher) now."""
        return await self.call(self._load_extractor, extractor)

    def _load_extractor(self, extractor: FeatureExtractor) -> LoadedModel:
        for key in extractor.data_locations:
            extractor.resolve_data(key)  # fetches remote files, checks hashes
        found = extractor.network()
        if found is None:
            return LoadedModel("extractor", type(extractor).__name__, extractor.feature_dim, 0.0)
        model = self.runtime.load_network(found[0])
        if self.config.batching:
            self.runtime.batcher(found[0])
        return model

    async def load_classifier(self, loc: DataLocation) -> LoadedModel:
        return await self.call(self.runtime.load_classifier, loc)

    def shutdown(self) -> None:
        """Release threads and networks; called only after the server has drained."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.runtime.close()
