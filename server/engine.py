"""Where the servicer's blocking work runs: a thread pool behind admission control.

`Engine.classify_image` / `Engine.extract_features` are the one seam for
image work. Today they call spacer_core.tasks in the pool; a dynamic batcher
(spacer_core.inference) can replace them without touching the servicer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from typing import Any, TypeVar

from server.config import ServerConfig
from server.errors import QueueFullError

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


_inline_counter = itertools.count()


@contextlib.contextmanager
def inline_image(data: bytes, job_token: str) -> Iterator[Any]:
    """Expose inline image bytes as a memory DataLocation for the call's duration.

    The key carries the job token so library errors name the image.
    """
    from spacer_core.data_classes import DataLocation
    from spacer_core.storage import storage_factory

    if not data:
        raise ValueError(f"{job_token or 'request'}: image_bytes is empty")
    key = f"inline/{next(_inline_counter)}/{job_token or 'image'}"
    store = storage_factory("memory")
    store.store(key, BytesIO(data))
    try:
        yield DataLocation("memory", key)
    finally:
        with contextlib.suppress(KeyError):
            store.delete(key)


class Engine:
    """Runs library calls off the event loop; cancelling the await drops queued work."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.admission = Admission(config.max_queue)
        self._pool = ThreadPoolExecutor(config.workers, thread_name_prefix="spacer-work")

    async def call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """func(*args, **kwargs) in the worker pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(func, *args, **kwargs))

    async def classify_image(self, msg: Any) -> Any:
        """ClassifyImageMsg -> ClassifyReturnMsg (the seam for batched inference)."""
        from spacer_core import tasks

        return await self.call(tasks.classify_image, msg)

    async def extract_features(self, msg: Any) -> Any:
        """ExtractFeaturesMsg -> ExtractFeaturesReturnMsg, features stored at feature_loc."""
        from spacer_core import tasks

        return await self.call(tasks.extract_features, msg)

    def shutdown(self) -> None:
        # Called after the server drained, so no call still needs the pool.
        self._pool.shutdown(wait=False, cancel_futures=True)
