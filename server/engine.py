"""Where the servicer's work runs: a thread pool, admission control, one batcher per network.

`Engine.classify_image` / `Engine.extract_features` are the one seam for
image work. For EfficientNet extractors the image is decoded and cropped in
the pool, its patches go to a `DynamicBatcher` shared by every call using the
same weights (so concurrent requests fill each other's batches), and the
classifier runs in the pool again. Other extractors (and `batching=False`)
call spacer_core.tasks in the pool, exactly as pyspacer would.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from typing import Any, TypeVar

import numpy as np

from server.config import ServerConfig
from server.errors import QueueFullError
from server.models import LoadedModel, ModelRegistry

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
        self.models = ModelRegistry()
        self._pool = ThreadPoolExecutor(config.workers, thread_name_prefix="spacer-work")
        self._batchers: dict[str, Any] = {}
        self._batchers_lock = threading.Lock()

    async def call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """func(*args, **kwargs) in the worker pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(func, *args, **kwargs))

    # ------------------------------------------------------------ the seam

    async def classify_image(self, msg: Any) -> Any:
        """ClassifyImageMsg -> ClassifyReturnMsg."""
        if not self._batchable(msg.extractor):
            return await self._library_task("classify_image", msg)
        start = time.time()
        features, _remote = await self._extract(msg)
        return await self.call(self._score, msg, features, start)

    async def extract_features(self, msg: Any) -> Any:
        """ExtractFeaturesMsg -> ExtractFeaturesReturnMsg, features stored at feature_loc."""
        if not self._batchable(msg.extractor):
            return await self._library_task("extract_features", msg)
        start = time.time()
        features, remote = await self._extract(msg)
        return await self.call(self._store_features, msg, features, remote, start)

    async def _library_task(self, name: str, msg: Any) -> Any:
        """spacer_core.tasks.<name>(msg) in the pool: one image, pyspacer's way."""
        from spacer_core import tasks

        return await self.call(getattr(tasks, name), msg)

    async def _extract(self, msg: Any) -> tuple[np.ndarray, bool]:
        """Features of msg's points through the shared batcher, and the remote-load flag."""
        from spacer_core.inference import BatcherClosedError

        patches, batcher, remote = await self.call(self._prepare, msg)
        try:
            return await batcher.extract(patches), remote
        except BatcherClosedError:
            # The process-wide cache evicted this network meanwhile: get it again.
            batcher, remote = await self.call(self._batcher_for, msg.extractor)
            return await batcher.extract(patches), remote

    # ------------------------------------------------------------ models

    async def load_extractor(self, extractor: Any) -> LoadedModel:
        """Fetch and verify the extractor's files; build its network and batcher now."""
        model = await self.call(self.models.load_extractor, extractor)
        if self._batchable(extractor):
            await self.call(self._batcher_for, extractor)
        return model

    async def load_classifier(self, loc: Any) -> LoadedModel:
        return await self.call(self.models.load_classifier, loc)

    # ------------------------------------------------------------ blocking parts

    def _batchable(self, extractor: Any) -> bool:
        if not self.config.batching:
            return False
        from spacer_core.extractors import EfficientNetExtractor

        return type(extractor) is EfficientNetExtractor

    def _prepare(self, msg: Any) -> tuple[np.ndarray, Any, bool]:
        """Load and check the image, cut its patches (Rust decoder), find the network's batcher."""
        from spacer_core import crop
        from spacer_core.tasks import load_checked_bytes

        data = load_checked_bytes(msg.image_loc, msg.rowcols)
        batcher, remote = self._batcher_for(msg.extractor)
        patches = crop.crop_patches(data, msg.rowcols, image_key=msg.image_loc.key)
        return patches, batcher, remote

    def _batcher_for(self, extractor: Any) -> tuple[Any, bool]:
        """The process's batcher for this extractor's weights (hash-checked), and the remote flag."""
        from spacer_core.extractors.efficientnet import build_network
        from spacer_core.inference.shared import shared_batcher

        data = extractor.resolve_data("weights")
        label = f"'{extractor.data_locations['weights'].key}'"
        batcher = shared_batcher(
            data.sha256,
            lambda: build_network(data.read(), label),
            device=None if self.config.device == "auto" else self.config.device,
            precision=self.config.precision,
            max_batch_size=self.config.batch_size,
            max_queue_delay_s=self.config.queue_delay_ms / 1000.0,
        )
        with self._batchers_lock:
            if self._batchers.get(data.sha256) is not batcher:
                logger.info("network %s served by %s (batches of %d)", label, batcher.name,
                            batcher.max_batch_size)
                self._batchers[data.sha256] = batcher
        return batcher, data.remote_loaded

    def _classifier(self, loc: Any) -> Any:
        """A classifier pinned by LoadModel, else loaded for this call (as pyspacer does)."""
        from spacer_core.storage import load_classifier

        pinned = self.models.get("classifier", json.dumps(loc.serialize(), sort_keys=True))
        return pinned.obj if pinned is not None else load_classifier(loc)

    def _score(self, msg: Any, features: np.ndarray, start: float) -> Any:
        from spacer_core.tasks import classify_return, score_features

        clf = self._classifier(msg.classifier_loc)
        probs = score_features(clf, features.astype(np.float64), msg.image_loc.key)
        rowcols = [(int(r), int(c)) for r, c in msg.rowcols]
        return classify_return(start, rowcols, probs, clf, True)

    def _store_features(self, msg: Any, features: np.ndarray, remote: bool, start: float) -> Any:
        from spacer_core.data_classes import ImageFeatures
        from spacer_core.messages import ExtractFeaturesReturnMsg

        rows = [int(r) for r, _ in msg.rowcols]
        cols = [int(c) for _, c in msg.rowcols]
        ImageFeatures.from_arrays(features, rows, cols).store(msg.feature_loc)
        return ExtractFeaturesReturnMsg(extractor_loaded_remotely=remote, runtime=time.time() - start)

    def shutdown(self) -> None:
        """Release threads and networks; called only after the server has drained."""
        # The batchers are process-wide (shared with library callers and
        # other servers in this process): they are left to spacer_core.
        with self._batchers_lock:
            self._batchers = {}
        self._pool.shutdown(wait=False, cancel_futures=True)
