"""The data plane: where the servicers' work runs, and how it is admitted and ordered.

It holds a thread pool, admission control, the call's priority (decided
here only) and the server's runtime, and bridges long library work
(training, pyspacer jobs) to the event loop.

Image work goes through `spacer_core.pipeline`: blocking steps in the pool,
the network through the runtime's dynamic batcher shared by every call
using the same network, so concurrent requests fill each other's batches.

Admission is in three steps: a request's inline image bytes as soon as
the handler has the request (`Engine.receive`), a count of image tasks
(`Admission`, before the image is read) and, once its header is read, the
bytes the image will add (`MemoryBudget`, before anything is decoded).
Memory under load follows the byte budget, whatever the image sizes, point
counts and request sizes.

The points each piece of work extracted or scored are reported here, once
it has succeeded (`server.metrics.count_points`): image work in
`run_image`, pyspacer jobs in `run_job`, stored features in
`classify_features`, whichever call or stream item asked for it.

Interactive work goes ahead of bulk work at each of the places it can wait:
admission (a share of the slots and of the bytes is kept for it), the pool
(a priority queue) and the batcher (batches filled in priority order).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import heapq
import itertools
import logging
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, TypeVar

from server import metrics
from server.config import MIB, Preload, ServerConfig
from server.errors import invalid
from server.security import redact_job_error
from spacer_core import cancellation, pipeline, tasks
from spacer_core.data_classes import DataLocation
from spacer_core.exceptions import InvalidInputError, QueueFullError
from spacer_core.extractors import FeatureExtractor
from spacer_core.inference import Priority
from spacer_core.inference.backends import one_session
from spacer_core.inference.batcher import DEFAULT_PRIORITY
from spacer_core.messages import (
    ClassifyFeaturesMsg,
    ClassifyReturnMsg,
    JobMsg,
    JobReturnMsg,
    TrainClassifierMsg,
)
from spacer_core.pipeline import ImageJob, ImageResult
from spacer_core.runtime import LoadedModel, Runtime
from spacer_core.task_io import TrainClassifierReturnMsg

logger = logging.getLogger(__name__)
T = TypeVar("T")

PRIORITY_KEY = "x-priority"
_PRIORITY_NAMES = {"interactive": Priority.INTERACTIVE, "bulk": Priority.BULK}


def _metadata_priority(metadata: Iterable[tuple[str, Any]] | None) -> Priority | None:
    for key, value in metadata or ():
        if key == PRIORITY_KEY:
            text = value.decode() if isinstance(value, bytes) else str(value)
            if text.strip().lower() not in _PRIORITY_NAMES:
                raise invalid(f"x-priority metadata must be 'interactive' or 'bulk', got {text!r}")
            return _PRIORITY_NAMES[text.strip().lower()]
    return None


class TrainingCancelled(Exception):
    """Raised from the progress callback to stop a training whose call ended."""


@dataclass(frozen=True)
class TrainProgress:
    """One finished epoch (1-based) of a training."""

    epoch: int
    ref_accuracy: float
    elapsed: float


class Admission:
    """Counts image tasks admitted server-wide (running + waiting).

    Unary calls use `try_enter` (RESOURCE_EXHAUSTED when full); streams use
    `enter`, which waits, so a fast client is slowed instead of failed.
    Bulk work may fill only `limit - reserved` slots, so a burst of streams
    leaves room for interactive calls.
    """

    def __init__(self, limit: int, reserved: int = 0):
        self.limit = limit
        self.reserved = min(reserved, limit - 1)
        self.active = 0
        self._freed = asyncio.Condition()

    def _has_room(self, priority: int) -> bool:
        bound = self.limit if priority <= Priority.INTERACTIVE else self.limit - self.reserved
        return self.active < bound

    @contextlib.asynccontextmanager
    async def try_enter(self, priority: int = DEFAULT_PRIORITY) -> AsyncIterator[None]:
        if not self._has_room(priority):
            raise QueueFullError(f"server queue is full ({self.active} image tasks admitted); retry later")
        self.active += 1
        try:
            yield
        finally:
            await self._release()

    @contextlib.asynccontextmanager
    async def enter(self, priority: int = DEFAULT_PRIORITY) -> AsyncIterator[None]:
        async with self._freed:
            await self._freed.wait_for(lambda: self._has_room(priority))
            self.active += 1
        try:
            yield
        finally:
            await self._release()

    async def _release(self) -> None:
        async with self._freed:
            self.active -= 1
            # Waiters differ in how much room they need: let each one check.
            self._freed.notify_all()


class MemoryHold:
    """Bytes held by one admitted image or received request; shrinks as the image moves on
    (`pipeline.Hold`)."""

    def __init__(self, budget: MemoryBudget, nbytes: int, request: bool = False):
        self._budget = budget
        self.nbytes = nbytes
        self.request = request

    def resize(self, nbytes: int) -> None:
        nbytes = max(0, min(nbytes, self.nbytes))  # never more than admitted
        freed, self.nbytes = self.nbytes - nbytes, nbytes
        if freed:
            self._budget._give_back(freed, self.request)

    def release(self) -> None:
        self.resize(0)


Waiter = tuple[int, int, int, "asyncio.Future[MemoryHold]"]


class MemoryBudget:
    """Bytes a request makes the server hold, server-wide: its inline image as
    received, then its image's work (decoded pixels, patches, batch input).

    A request with an inline image is charged for it as soon as it is read
    (`request=True`); each image asks again, once its header is read and
    before any pixel is decoded, for the rest of what it will hold
    (`pipeline.Footprint`). Bulk work may hold `budget - reserved` bytes,
    interactive work the whole budget; received requests at most half of
    that, so images already received always have room to be worked on and
    release their requests (the two never wait on each other). Waiting
    images (and waiting requests) are admitted in order (priority, then
    arrival): one that does not fit keeps those behind it waiting, so small
    images cannot overtake a large one forever. An image larger than its
    bound is admitted once no other image work is held, a request once
    nothing is: it runs alone rather than never. Used from the event
    loop only.
    """

    def __init__(self, budget: int, reserved: int = 0):
        if budget < 1:
            raise ValueError(f"memory budget must be >= 1 byte, got {budget}")
        self.budget = budget
        self.reserved = max(0, min(reserved, budget - 1))
        self.held = 0
        self.received = 0  # of `held`: bytes of received requests
        self.peak = 0  # most bytes ever held at once
        self.waited = 0  # images and requests that had to wait for room
        self._order = itertools.count()
        # Image work and received requests wait apart: an image never waits behind a request.
        self._waiting: dict[bool, list[Waiter]] = {False: [], True: []}

    def _bound(self, priority: int) -> int:
        return self.budget if priority <= Priority.INTERACTIVE else self.budget - self.reserved

    def _fits(self, nbytes: int, priority: int, request: bool) -> bool:
        if request:
            return self.held == 0 or (
                self.held + nbytes <= self._bound(priority)
                and self.received + nbytes <= self._bound(priority) // 2
            )
        return self.held == self.received or self.held + nbytes <= self._bound(priority)

    def _grant(self, nbytes: int, request: bool) -> MemoryHold:
        self.held += nbytes
        if request:
            self.received += nbytes
        self.peak = max(self.peak, self.held)
        return MemoryHold(self, nbytes, request)

    async def acquire(
        self,
        nbytes: int,
        priority: int = DEFAULT_PRIORITY,
        *,
        wait: bool = True,
        request: bool = False,
    ) -> MemoryHold:
        """Hold `nbytes` once they fit; with `wait` False raise QueueFullError instead of waiting.

        `request`: the bytes of a request as received (see the class), not image work.
        """
        nbytes = max(0, int(nbytes))
        queue = self._waiting[request]
        ahead = any(p <= priority for p, _, _, f in queue if not f.done())
        if not ahead and self._fits(nbytes, priority, request):
            return self._grant(nbytes, request)
        if not wait:
            what = "request's inline image" if request else "image"
            raise QueueFullError(
                f"server queue is full: the memory budget (--memory-budget-mb, {self.budget / MIB:.0f} MiB)"
                f" has {self.held / MIB:.0f} MiB held and this {what} needs {nbytes / MIB:.0f} MiB;"
                " retry later"
            )
        self.waited += 1
        granted: asyncio.Future[MemoryHold] = asyncio.get_running_loop().create_future()
        heapq.heappush(queue, (int(priority), next(self._order), nbytes, granted))
        try:
            return await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                granted.result().release()  # granted just as the waiter was cancelled
            self._admit_waiting()
            raise

    def _give_back(self, nbytes: int, request: bool) -> None:
        self.held -= nbytes
        if request:
            self.received -= nbytes
        self._admit_waiting()

    def _admit_waiting(self) -> None:
        for request in (False, True):  # image work first: it frees requests once done
            queue = self._waiting[request]
            while queue:
                priority, _, nbytes, granted = queue[0]
                if granted.done():  # cancelled while waiting
                    heapq.heappop(queue)
                    continue
                if not self._fits(nbytes, priority, request):
                    break
                heapq.heappop(queue)
                granted.set_result(self._grant(nbytes, request))


# Inline image bytes are held twice while a request is handled: by the request
# message and by the bytes object its job carries (protobuf hands out copies).
REQUEST_COPIES = 2
# After a request held this many bytes the allocator is asked to return free memory.
TRIM_AFTER = 16 * MIB


class FreeMemory:
    """Hands memory freed by large requests back to the system (glibc's malloc_trim).

    gRPC reads a message into many small buffers, which glibc keeps in its
    per-thread heaps after they are freed: without a trim, each round of large
    requests leaves the process hundreds of MiB larger. One trim runs at a
    time, off the event loop; a no-op off glibc.
    """

    def __init__(self) -> None:
        self._trim: Callable[[int], int] | None = None
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        self._running = threading.Lock()

    def soon(self) -> None:
        """Trim in a background thread, unless a trim is already running."""
        if self._trim is None or not self._running.acquire(blocking=False):
            return
        threading.Thread(target=self._run, name="spacer-trim", daemon=True).start()

    def _run(self) -> None:
        try:
            assert self._trim is not None
            self._trim(0)
        finally:
            self._running.release()


class PriorityPool(concurrent.futures.Executor):
    """Threads running blocking work: higher priority first, FIFO within a priority.

    A plain ThreadPoolExecutor runs work in arrival order, so an interactive
    image would wait for every bulk image that arrived before it.
    """

    def __init__(self, workers: int, name: str = "spacer-work"):
        self._heap: list[tuple[int, int, concurrent.futures.Future[Any], Callable[[], Any]]] = []
        self._order = itertools.count()
        self._lock = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True) for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        """Run fn(*args, **kwargs) at the default priority."""
        return self.submit_at(DEFAULT_PRIORITY, partial(fn, *args, **kwargs))

    def submit_at(self, priority: int, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run fn() once the work of higher priority, and earlier work of its own, has started."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new work after shutdown")
            heapq.heappush(self._heap, (int(priority), next(self._order), future, fn))
            self._lock.notify()
        return future

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._heap and not self._closed:
                    self._lock.wait()
                if not self._heap:
                    return
                _, _, future, fn = heapq.heappop(self._heap)
            if not future.set_running_or_notify_cancel():
                continue  # cancelled while waiting
            result: Any = None
            try:
                result = fn()
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)
            # An idle worker keeps no image alive (its patches, its bytes).
            del future, fn, result

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            dropped = self._heap if cancel_futures else []
            if cancel_futures:
                self._heap = []
            self._lock.notify_all()
        for _, _, future, _ in dropped:
            future.cancel()
        if wait:
            for thread in self._threads:
                thread.join()


def _cancellable(
    stop: threading.Event, deadline: float | None, func: Callable[..., T], args: tuple[Any, ...]
) -> T:
    with cancellation.cancel_scope(stop, deadline):
        return func(*args)


def _identity(model: LoadedModel) -> tuple[str, str]:
    # A network is its weights' digest; a classifier its location.
    return model.kind, model.weights_sha256 or model.name


def _job_points(job: JobMsg, result: JobReturnMsg) -> int:
    # A job's tasks succeed or fail together; only a finished job did its points.
    if not result.ok or not result.results:
        return 0
    points = 0
    for task, returned in zip(job.tasks, result.results, strict=False):
        scores = getattr(returned, "scores", None)
        rowcols = getattr(task, "rowcols", None)
        if scores is not None:
            points += len(scores)
        elif rowcols is not None:
            points += len(rowcols)
    return points


class Engine:
    """Runs library work for the servicer: a thread pool, admission, the server's runtime.

    Every blocking call runs in the pool with the server's `Runtime` active,
    so the library uses this server's caches and storage policy. Cancelling
    the awaiting task drops work that has not started.
    """

    def __init__(self, config: ServerConfig):
        self.config = config
        # With priorities on, a quarter of the slots and bytes is kept for interactive calls.
        self.admission = Admission(config.max_queue, config.max_queue // 4 if config.priority else 0)
        budget = config.memory_budget_bytes
        self.memory = MemoryBudget(budget, budget // 4 if config.priority else 0)
        self.runtime = Runtime(config.runtime_settings(), policy=config.storage_policy())
        self.free_memory = FreeMemory()
        self._pool = PriorityPool(config.workers)
        # Models the preload file named, as (kind, identity) of `_identity`.
        self._preloaded: set[tuple[str, str]] = set()
        # Long work (RunJob, TrainClassifier) holds at most this many workers.
        self._long_slots = asyncio.Semaphore(config.long_work_slots)

    async def call(self, func: Callable[..., T], *args: Any, priority: int = DEFAULT_PRIORITY) -> T:
        """func(*args) in the worker pool, with this server's runtime active.

        While other images are admitted too, the work keeps to one core
        (`one_session`: decoding in one pass, a library forward pass on one
        session): the other images keep the rest busy, and decoding in
        bands would only add work.
        """
        future = self._pool.submit_at(priority, partial(self._in_runtime, func, args))
        return await asyncio.wrap_future(future)

    def _in_runtime(self, func: Callable[..., T], args: tuple[Any, ...]) -> T:
        shared = self.admission.active > 1
        with self.runtime.activate(), one_session() if shared else contextlib.nullcontext():
            return func(*args)

    async def call_long(self, func: Callable[..., T], *args: Any, deadline: float | None = None) -> T:
        """func(*args) as long work: in a bounded share of the workers, stopped when the call ends.

        At most `config.long_work_slots` run at once (later ones wait), so
        the rest of the pool stays free for image work. The library checks
        between epochs and tasks (`spacer_core.cancellation`) whether the
        awaiting call was cancelled or `deadline` (time.monotonic()) passed,
        and stops there; the slot is freed once the thread is done.
        """
        stop = threading.Event()
        await self._long_slots.acquire()
        loop = asyncio.get_running_loop()

        def free(_: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed (server stopped)
                loop.call_soon_threadsafe(self._long_slots.release)

        try:
            future = self._pool.submit_at(
                DEFAULT_PRIORITY, partial(self._in_runtime, _cancellable, (stop, deadline, func, args))
            )
        except BaseException:
            self._long_slots.release()
            raise
        future.add_done_callback(free)
        try:
            return await asyncio.wrap_future(future)
        finally:
            stop.set()

    def priorities(
        self, metadata: Iterable[tuple[str, Any]] | None, *, stream: bool
    ) -> Callable[[Priority | None], int]:
        """The one rule for a call's priority; returns what decides each of its requests.

        A request's own priority wins; else the call's `x-priority` metadata
        ("interactive" or "bulk"); else INTERACTIVE for a unary call and BULK
        for a stream. With priorities off every request runs at the same one.
        Malformed metadata fails the call here, before any request is read.
        """
        call = _metadata_priority(metadata)
        if call is None:
            call = Priority.BULK if stream else Priority.INTERACTIVE

        def decide(requested: Priority | None) -> int:
            chosen = call if requested is None else requested
            return int(chosen) if self.config.priority else DEFAULT_PRIORITY

        return decide

    def admit(self, priority: int, *, wait: bool) -> contextlib.AbstractAsyncContextManager[None]:
        """One admission slot for an image task: waited for (streams) or refused when full (unary)."""
        return self.admission.enter(priority) if wait else self.admission.try_enter(priority)

    async def receive(self, nbytes: int, priority: int = DEFAULT_PRIORITY, *, wait: bool) -> MemoryHold:
        """Charge a request's inline image (`nbytes` encoded) to the memory budget as soon as it is read.

        The request holds it `REQUEST_COPIES` times until it is dropped; streams
        wait for room (and read no further request meanwhile), unary calls are
        refused with QueueFullError. Give it back with `release`.
        """
        return await self.memory.acquire(nbytes * REQUEST_COPIES, priority, wait=wait, request=True)

    def release(self, hold: MemoryHold) -> None:
        """Give back a request's hold (see `receive`); after a large one, return freed memory."""
        large = hold.nbytes >= TRIM_AFTER
        hold.release()
        if large:
            self.free_memory.soon()

    @contextlib.asynccontextmanager
    async def received(
        self, nbytes: int, priority: int = DEFAULT_PRIORITY, *, wait: bool
    ) -> AsyncIterator[MemoryHold]:
        """`receive` for the duration of a unary call."""
        hold = await self.receive(nbytes, priority, wait=wait)
        try:
            yield hold
        finally:
            self.release(hold)

    async def run_image(
        self,
        job: ImageJob,
        *,
        priority: int = DEFAULT_PRIORITY,
        deadline: float | None = None,
        wait: bool = True,
        prepaid: int = 0,
    ) -> ImageResult:
        """One image through the library pipeline; batched with concurrent calls unless disabled.

        `priority` (as decided by `priorities`) orders its pool and network work (`Priority`); work still
        waiting for the network at `deadline` (time.monotonic()) is dropped.
        Its bytes are admitted against the memory budget once its header is
        read: waiting for room, or with `wait` False raising QueueFullError.
        `prepaid`: bytes of its footprint the caller already holds (an inline
        image charged at receipt, see `receive`), not charged twice.
        """
        call = partial(self.call, priority=priority)
        if not self.config.batching:
            # One library call per image: at most `workers` images in memory at once.
            result = await call(pipeline.run, job)
        else:

            async def admit(nbytes: int) -> MemoryHold:
                return await self.memory.acquire(max(0, nbytes - prepaid), priority, wait=wait)

            result = await pipeline.run_async(
                job, self.runtime, call, priority=priority, deadline=deadline, admit=admit
            )
        metrics.count_points(len(result.rowcols))
        return result

    async def classify_features(self, msg: ClassifyFeaturesMsg) -> ClassifyReturnMsg:
        """Score stored features with a stored classifier (pyspacer's classify_features task)."""
        result = await self.call(tasks.classify_features, msg)
        metrics.count_points(len(result.scores))
        return result

    async def run_job(self, data: dict[str, Any], *, deadline: float | None = None) -> JobReturnMsg:
        """A pyspacer job (its JSON, parsed) as long work; a failed job's error is made client-safe."""
        limits = self.runtime.settings.limits
        # List lengths first: a job over its bounds is refused before any item is walked.
        limits.check_job_shape(data)

        def read() -> JobMsg:
            limits.check_json(data)
            try:
                job = JobMsg.deserialize(data)
            except (AssertionError, InvalidInputError) as exc:
                raise invalid(f"job_msg_json is not a valid JobMsg: {exc}") from None
            for i, task in enumerate(job.tasks):
                limits.check_task(task, f"job_msg_json.tasks[{i}]")
            return job

        # Per-item work runs off the event loop, so other calls are still served meanwhile.
        job = await asyncio.to_thread(read)
        result = await self.call_long(tasks.process_job, job, deadline=deadline)
        metrics.count_points(_job_points(job, result))
        if not result.ok and result.error_message:
            # The library reply carries a traceback; clients get its last line, redacted.
            tokens = ",".join(task.job_token for task in job.tasks)
            result.error_message = redact_job_error(result.error_message, tokens)
        return result

    async def train(
        self, msg: TrainClassifierMsg, *, deadline: float | None = None
    ) -> AsyncGenerator[TrainProgress | TrainClassifierReturnMsg, None]:
        """Train as long work: a TrainProgress per epoch as it ends, then the result.

        Training stops at its next epoch once the caller stops iterating
        (call done, failed, cancelled or past its deadline).
        """
        self.runtime.settings.limits.check_task(msg)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TrainProgress] = asyncio.Queue()
        stop = threading.Event()

        def progress(epoch: int, ref_accuracy: float, elapsed: float) -> None:
            # The trainer's callback, run in the training thread after each
            # epoch (0-based): the one place a cancelled call can stop it.
            if stop.is_set():
                raise TrainingCancelled(f"{msg.job_token}: training cancelled")
            update = TrainProgress(int(epoch) + 1, float(ref_accuracy), float(elapsed))
            loop.call_soon_threadsafe(events.put_nowait, update)

        work = asyncio.ensure_future(self.call_long(tasks.train_classifier, msg, progress, deadline=deadline))
        getter: asyncio.Future[TrainProgress] | None = None
        try:
            while not work.done() or not events.empty():
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, work}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                getter.cancel()
            result = work.result()
        finally:
            stop.set()
            work.cancel()
            if getter is not None:
                getter.cancel()
        yield result

    async def load_extractor(self, extractor: FeatureExtractor) -> LoadedModel:
        """Fetch and verify the extractor's files; build its network (and batcher) now."""
        return await self.call(self._load_extractor, extractor)

    def _load_extractor(self, extractor: FeatureExtractor, warm: bool = False) -> LoadedModel:
        for key in extractor.data_locations:
            extractor.resolve_data(key)  # fetches remote files, checks hashes
        found = extractor.network()
        if found is None:
            # No network to build (DummyExtractor): its width is the client's number; check it
            # now, at load, not first at inference.
            self.runtime.settings.limits.check_feature_dim(
                int(extractor.feature_dim), f"{type(extractor).__name__} feature_dim"
            )
            return LoadedModel("extractor", type(extractor).__name__, extractor.feature_dim, 0.0)
        model = self.runtime.load_network(found[0])
        if warm:
            seconds = self.runtime.warm_up(found[0], batched=self.config.batching)
            logger.info("warmed up %s in %.2fs", model.name, seconds)
        elif self.config.batching:
            self.runtime.batcher(found[0])
        return model

    async def preload(self, models: Preload) -> list[LoadedModel]:
        """Load every extractor (with a warm-up forward pass) and classifier of a preload file."""
        loaded = []
        for extractor in models.extractors:
            loaded.append(await self.call(self._load_extractor, extractor, True))
        for loc in models.classifiers:
            loaded.append(await self.load_classifier(loc))
        self._preloaded.update(_identity(m) for m in loaded)
        return loaded

    def models(self) -> list[LoadedModel]:
        """Every network and classifier the runtime holds, with what loaded it:
        "preload", "load_model" or "call" (loaded by the call that first used it)."""
        held = []
        for model in self.runtime.loaded():
            by = model.loaded_by
            if by == "request":
                by = "preload" if _identity(model) in self._preloaded else "load_model"
            held.append(replace(model, loaded_by=by))
        return held

    async def load_classifier(self, loc: DataLocation) -> LoadedModel:
        return await self.call(self.runtime.load_classifier, loc)

    def shutdown(self) -> None:
        """Release threads and networks; called only after the server has drained."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.runtime.close()
