"""Dynamic batching of patches from concurrent callers into one network.

One `DynamicBatcher` serves one loaded extractor on one device. Callers (threads
or asyncio tasks) submit all patches of an image at once; a worker thread
fills batches of up to `max_batch_size` patches across callers, waiting at
most `queue_delay_ms` after the first queued patch for a batch to fill
(Triton's max_queue_delay), runs the network and hands each caller its own
features, in the order its patches were given.

- Bounded: at most `max_queued_patches` patches of a priority or above wait
  to be batched (lower-priority work does not count against higher). A full
  queue raises `QueueFullError` (`block=False`) or makes the caller wait for
  room (`block=True`, optionally with a timeout). A single request larger than
  the bound is admitted only into an empty queue, so it cannot starve.
- Priorities: each request has one (`Priority.INTERACTIVE` first, then
  `Priority.BULK`; any int, lower runs first). Batches are filled from the
  highest priority waiting, FIFO within a priority, so a single interactive
  image overtakes a long bulk backlog at the next batch.
- Deadlines: a request may carry a `time.monotonic()` deadline. One whose
  deadline passes while it waits is dropped when the next batch is formed,
  before any more of its patches reach the network, and fails with
  `DeadlineExceededError`.
- Cancelling a caller's future (or its asyncio task) drops its patches that
  are still waiting.
- A batch whose network call fails fails exactly the callers with patches in
  that batch; everyone else carries on.
- With a backend whose `launch` returns before the GPU has finished, the
  next batch is assembled and its transfer started while the current one runs.
- `workers` > 1 runs that many batches at once (each worker forms its own);
  on CPU this keeps cores busy while another batch is being assembled.
- Memory: patches wait as the caller gave them, ideally uint8 crops (a
  quarter of the float32 bytes); a batch is converted into a float32 input
  buffer only when it is formed. Input buffers are reused from batch to
  batch (`BatchBuffers`), and a batch that is already one contiguous float32
  run of one request's patches goes to the network as it is, uncopied.

    batcher = DynamicBatcher(backend, BatcherSettings(max_batch_size=64, queue_delay_ms=2.0))
    feats = batcher.extract_sync(patches)          # from a thread
    feats = await batcher.extract(patches)         # from asyncio
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import enum
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from spacer_core.exceptions import DeadlineExceededError, QueueFullError, ShuttingDownError
from spacer_core.inference.backends import (
    PATCH_SHAPE,
    Backend,
    PendingFeatures,
    check_patches,
    ready,
    to_network_input,
)

logger = logging.getLogger(__name__)


class BatcherClosedError(ShuttingDownError):
    """The batcher was closed before this request could run."""


class Priority(enum.IntEnum):
    """Which requests fill batches first: lower values run first."""

    INTERACTIVE = 0  # someone is waiting on this one image
    BULK = 1  # streams and batch jobs: throughput matters, latency less


# Library callers that say nothing are served as interactive work, as before
# priorities existed (all requests equal: plain FIFO).
DEFAULT_PRIORITY = Priority.INTERACTIVE


@dataclass(eq=False)
class _Request:
    patches: np.ndarray
    future: concurrent.futures.Future[np.ndarray]
    priority: int = DEFAULT_PRIORITY
    deadline: float | None = None  # time.monotonic() after which it is dropped unrun
    scheduled: int = 0  # patches handed to a batch so far
    finished: int = 0  # patches whose features are back
    features: np.ndarray | None = None
    enqueued: float = 0.0  # monotonic time it entered the queue

    @property
    def size(self) -> int:
        return len(self.patches)


class _Queue:
    """Waiting requests: one FIFO per priority, iterated highest priority first."""

    def __init__(self) -> None:
        self._fifos: dict[int, collections.deque[_Request]] = {}

    def append(self, request: _Request) -> None:
        fifo = self._fifos.get(request.priority)
        if fifo is None:
            fifo = self._fifos[request.priority] = collections.deque()
            self._fifos = dict(sorted(self._fifos.items()))
        fifo.append(request)

    def remove(self, request: _Request) -> None:
        """Raises ValueError when the request is not waiting."""
        fifo = self._fifos.get(request.priority)
        if fifo is None:
            raise ValueError(request)
        fifo.remove(request)

    def first(self) -> _Request:
        for fifo in self._fifos.values():
            if fifo:
                return fifo[0]
        raise IndexError("empty queue")

    def pop_first(self) -> _Request:
        for fifo in self._fifos.values():
            if fifo:
                return fifo.popleft()
        raise IndexError("empty queue")

    def clear(self) -> None:
        self._fifos.clear()

    def waiting_patches(self, up_to: int) -> int:
        """Unbatched patches of requests with priority `up_to` or higher (value <= up_to)."""
        return sum(
            r.size - r.scheduled for priority, fifo in self._fifos.items() if priority <= up_to for r in fifo
        )

    def __iter__(self) -> Iterator[_Request]:
        for fifo in list(self._fifos.values()):
            yield from list(fifo)

    def __bool__(self) -> bool:
        return any(self._fifos.values())


class BatchBuffers:
    """float32 network-input buffers of `size` patches, handed out and taken back.

    A fresh 2.4 MB (CPU) to 77 MB (GPU, page-locked) array per batch costs
    page faults every time; buffers given back are handed out again. At most
    `keep` idle buffers are kept; more callers at once get new ones.
    """

    def __init__(self, allocate: Callable[[int], np.ndarray], size: int, keep: int = 2):
        self.size = size
        self.keep = keep
        self._allocate = allocate
        self._idle: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, n: int) -> np.ndarray:
        """A buffer of at least `n` patches (a new one, not kept later, when n > size)."""
        if n > self.size:
            return self._allocate(n)
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self._allocate(self.size)

    def give_back(self, buffer: np.ndarray | None) -> None:
        if buffer is None or len(buffer) != self.size:
            return
        with self._lock:
            if len(self._idle) < self.keep:
                self._idle.append(buffer)

    @property
    def nbytes(self) -> int:
        """Bytes of the idle buffers kept."""
        return sum(b.nbytes for b in self._idle)


Part = tuple[np.ndarray, int, int]  # patches[start:stop] of one caller


def assemble(parts: Sequence[Part], buffers: BatchBuffers) -> tuple[np.ndarray, np.ndarray | None]:
    """The float32 (n, 3, 224, 224) network input of `parts`, and the buffer it lives in.

    uint8 HWC crops are converted (x / 255, bit for bit ToTensor) into a buffer
    from `buffers`, which the caller gives back once the network is done with
    it. A single run of contiguous float32 CHW patches is the input itself:
    no copy, and no buffer (None).
    """
    if len(parts) == 1:
        patches, start, stop = parts[0]
        run = patches[start:stop]
        if run.dtype == np.float32 and run.shape[1:] == PATCH_SHAPE and run.flags.c_contiguous:
            return run, None
    size = sum(stop - start for _, start, stop in parts)
    buffer = buffers.take(size)
    inputs = buffer[:size]
    offset = 0
    for patches, start, stop in parts:
        to_network_input(patches[start:stop], inputs[offset : offset + stop - start])
        offset += stop - start
    return inputs, buffer


def run_batches(
    launch: Callable[[np.ndarray], PendingFeatures],
    patches: np.ndarray,
    batch_size: int,
    buffers: BatchBuffers,
) -> np.ndarray:
    """Features (N, D) float32 of one caller's patches, `batch_size` at a time, in this thread.

    Batches are assembled as the batcher does (`assemble`, buffers reused).
    The next batch is launched before the previous one's result is read, so
    on a GPU its transfer overlaps the running batch.
    """
    patches = check_patches(patches)
    features: np.ndarray | None = None
    previous: tuple[PendingFeatures, int, int, np.ndarray | None] | None = None

    def collect(pending: PendingFeatures, start: int, stop: int, buffer: np.ndarray | None) -> None:
        nonlocal features
        out = np.asarray(pending.result())
        buffers.give_back(buffer)
        if features is None:
            features = np.empty((len(patches), out.shape[1]), np.float32)
        features[start:stop] = out

    for start in range(0, len(patches), batch_size):
        stop = min(start + batch_size, len(patches))
        inputs, buffer = assemble([(patches, start, stop)], buffers)
        pending = launch(inputs)
        if previous is not None:
            collect(*previous)
        previous = (pending, start, stop, buffer)
    assert previous is not None
    collect(*previous)
    assert features is not None
    return features


def run_in_batches(backend: Backend, patches: np.ndarray, batch_size: int) -> np.ndarray:
    """Features for any number of patches, `batch_size` at a time (`run_batches` with buffers of its own)."""
    return run_batches(backend.launch, patches, batch_size, BatchBuffers(backend.allocate_batch, batch_size))


@dataclass
class _Batch:
    # (request, start, stop) ranges of the requests' patches, in batch order
    parts: list[tuple[_Request, int, int]]
    size: int
    pending: PendingFeatures | None = None
    # The reused input buffer the batch was assembled in (None: the input is a caller's array).
    buffer: np.ndarray | None = None
    started: float = field(default_factory=time.monotonic)
    # Seconds each request whose first patches ride in this batch waited in the queue.
    queue_waits: list[float] = field(default_factory=list)
    launched: float = 0.0


@dataclass
class BatcherStats:
    """Counters for monitoring (read without locking; approximate while running)."""

    batches: int = 0
    patches: int = 0
    failed_batches: int = 0
    cancelled_patches: int = 0
    # Patches of requests dropped unrun because their deadline passed in the queue.
    expired_patches: int = 0
    # Totals behind the observers' figures: queue wait per request, network time per batch.
    queue_seconds: float = 0.0
    network_seconds: float = 0.0


@dataclass(frozen=True)
class BatchObservation:
    """One finished batch, as observers see it."""

    batcher: str
    size: int
    # Time in queue of each request that started in this batch (Triton's queue time).
    queue_waits: tuple[float, ...]
    # Launch to features back: input conversion, transfer and the network (compute time).
    network_seconds: float


BatchObserver = Callable[[BatchObservation], None]


RunBatch = Backend | Callable[[np.ndarray], np.ndarray]


# Patches per network call at most: 256 float32 patches are a 154 MB batch
# buffer, and a batcher keeps two per worker; GPUs run at full speed from 128.
MAX_BATCH_SIZE = 256


def check_batch_size(value: int | None, name: str) -> None:
    """Refuse a batch size outside 1..MAX_BATCH_SIZE (None: the backend's own)."""
    if value is not None and not 1 <= value <= MAX_BATCH_SIZE:
        raise ValueError(f"{name} must be in 1..{MAX_BATCH_SIZE}, got {value}")


@dataclass(frozen=True)
class BatcherSettings:
    """How a `DynamicBatcher` fills batches; the one place these knobs are named.

    `max_batch_size`: patches per network call. `queue_delay_ms`: the longest
    a batch waits to fill after its first patch is queued. The library
    default (2 ms) suits one process calling itself; the server passes its
    own (5 ms by default), as its callers arrive over the network and a
    slightly longer wait fills fuller batches. `max_queued_patches`: patches
    of a priority or above that may wait. `workers`: batches formed and run
    at once.

    Inside `RuntimeSettings`, `max_batch_size` None means each backend's
    preferred size and `workers` None one per CPU session (at least two) or
    one on CUDA; a batcher built directly reads None as 16 and 1.
    """

    max_batch_size: int | None = None
    queue_delay_ms: float = 2.0
    max_queued_patches: int = 4096
    workers: int | None = None

    def __post_init__(self) -> None:
        check_batch_size(self.max_batch_size, "max_batch_size")
        for name in ("max_queued_patches", "workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not self.queue_delay_ms >= 0:  # NaN fails too
            raise ValueError(f"queue_delay_ms must be >= 0, got {self.queue_delay_ms}")


DEFAULT_BATCHER_SETTINGS = BatcherSettings()


class DynamicBatcher:
    """Fills network batches with patches from concurrent callers; see the module docstring."""

    def __init__(
        self,
        backend: RunBatch,
        settings: BatcherSettings = DEFAULT_BATCHER_SETTINGS,
        *,
        name: str = "batcher",
        observers: Iterable[BatchObserver] = (),
    ):
        if not isinstance(settings, BatcherSettings):
            raise TypeError(f"settings must be BatcherSettings, got {type(settings).__name__}")
        if settings.max_batch_size is None or settings.workers is None:
            settings = replace(
                settings, max_batch_size=settings.max_batch_size or 16, workers=settings.workers or 1
            )
        self.settings = settings
        max_batch_size = self.max_batch_size
        workers = settings.workers or 1
        self._launch: Callable[[np.ndarray], PendingFeatures]
        # Memory held by the network, for ModelCache's byte limit.
        self.nbytes = backend.nbytes if isinstance(backend, Backend) else 0
        allocate: Callable[[int], np.ndarray] = (
            backend.allocate_batch
            if isinstance(backend, Backend)
            else lambda n: np.empty((n, *PATCH_SHAPE), dtype=np.float32)
        )
        # One batch being assembled and one in flight per worker.
        self.buffers = BatchBuffers(allocate, max_batch_size, keep=2 * workers)
        if isinstance(backend, Backend):
            self._launch = backend.launch
        else:
            function = backend
            self._launch = lambda batch: ready(function(batch))
        # The wait loop compares against time.monotonic(), in seconds.
        self._queue_delay_s = settings.queue_delay_ms / 1000.0
        self.name = name
        self.stats = BatcherStats()
        self._observers: list[BatchObserver] = []
        for observer in observers:
            if observer not in self._observers:
                self._observers.append(observer)
        self._queue = _Queue()
        self._queued = 0  # patches waiting to be put in a batch
        self._closed = False
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # worker waits for patches
        self._room = threading.Condition(self._lock)  # blocked submitters wait for space
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._workers = [
            threading.Thread(target=self._run, name=f"{name}-worker{i}", daemon=True) for i in range(workers)
        ]
        for worker in self._workers:
            worker.start()

    # -- callers ------------------------------------------------------------------------

    @property
    def max_batch_size(self) -> int:
        """Patches per network call."""
        return self.settings.max_batch_size or 16

    @property
    def max_queued_patches(self) -> int:
        """Patches of a priority or above that may wait to be batched."""
        return self.settings.max_queued_patches

    @property
    def queued_patches(self) -> int:
        """Patches waiting to be put in a batch."""
        return self._queued

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(
        self,
        patches: np.ndarray,
        *,
        block: bool = False,
        timeout: float | None = None,
        priority: int = DEFAULT_PRIORITY,
        deadline: float | None = None,
    ) -> concurrent.futures.Future[np.ndarray]:
        """Queue one caller's patches; the future gives their features (N, D) float32.

        `patches`: uint8 (N, 224, 224, 3) crops, which wait in a quarter of
        the memory and are converted exactly as ToTensor does when their
        batch is formed, or float32 (N, 3, 224, 224) in [0, 1]. The batcher
        reads them until the future is done. When the queue is full:
        `block=False` raises QueueFullError; `block=True` waits for room, up
        to `timeout` seconds (None: no limit), then raises QueueFullError.
        `priority` orders batching (see `Priority`); past `deadline` (a
        `time.monotonic()` value) the request is dropped unrun with
        DeadlineExceededError. Cancelling the future drops the patches not
        yet batched.
        """
        request = self._new_request(patches, priority, deadline)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while not self._admissible(request):
                if not block:
                    raise QueueFullError(self._full_message(request))
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise QueueFullError(self._full_message(request))
                self._room.wait(remaining)
            self._enqueue(request)
        return request.future

    async def extract(
        self,
        patches: np.ndarray,
        *,
        block: bool = True,
        timeout: float | None = None,
        priority: int = DEFAULT_PRIORITY,
        deadline: float | None = None,
    ) -> np.ndarray:
        """asyncio form of submit + result: waits for room without blocking the event loop.

        `priority` and `deadline` as in `submit`. Cancelling the awaiting task
        cancels the request.
        """
        request = self._new_request(patches, priority, deadline)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            with self._lock:
                if self._admissible(request):
                    self._enqueue(request)
                    break
                if not block:
                    raise QueueFullError(self._full_message(request))
                room: asyncio.Future[None] = loop.create_future()
                self._async_waiters.append((loop, room))
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise QueueFullError(self._full_message(request))
            try:
                await asyncio.wait_for(room, remaining)
            except TimeoutError:
                raise QueueFullError(self._full_message(request)) from None
        return await asyncio.wrap_future(request.future)

    def extract_sync(
        self,
        patches: np.ndarray,
        timeout: float | None = None,
        *,
        priority: int = DEFAULT_PRIORITY,
        deadline: float | None = None,
    ) -> np.ndarray:
        """Blocking submit (waiting for room) and result, for threads."""
        future = self.submit(patches, block=True, timeout=timeout, priority=priority, deadline=deadline)
        return future.result(timeout)

    def close(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; with `drain`, finish queued work first, else fail it."""
        with self._lock:
            self._closed = True
            dropped = [] if drain else list(self._queue)
            if not drain:
                self._queue.clear()
                self._queued = 0
            self._work.notify_all()
            self._room.notify_all()
            self._wake_async_waiters()
        for request in dropped:
            _fail(request, BatcherClosedError("the network's queue closed before the request ran"))
        for worker in self._workers:
            if worker is not threading.current_thread():
                worker.join(timeout)

    def __enter__(self) -> DynamicBatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- admission (lock held) ----------------------------------------------------------

    def _new_request(self, patches: np.ndarray, priority: int, deadline: float | None) -> _Request:
        patches = check_patches(patches)
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceededError("the deadline passed before the request reached the network's queue")
        future: concurrent.futures.Future[np.ndarray] = concurrent.futures.Future()
        request = _Request(patches, future, int(priority), deadline)
        # A weak reference: request -> future -> callback -> request would be a
        # cycle, keeping each request's patches alive until a gc pass.
        ref = weakref.ref(request)
        future.add_done_callback(lambda f: self._on_done(ref(), f))
        return request

    def _admissible(self, request: _Request) -> bool:
        if self._closed:
            raise BatcherClosedError("the network's queue is closed")
        # Only work that would run before this request counts against the
        # bound, so a bulk backlog never keeps interactive work out.
        ahead = self._queue.waiting_patches(request.priority)
        return ahead == 0 or ahead + request.size <= self.max_queued_patches

    def _full_message(self, request: _Request) -> str:
        return (
            f"the network's queue full ({self._queued} patches waiting, bound "
            f"{self.max_queued_patches}); cannot take {request.size} more"
        )

    def _enqueue(self, request: _Request) -> None:
        request.enqueued = time.monotonic()
        self._queue.append(request)
        self._queued += request.size
        self._work.notify()

    def _wake_async_waiters(self) -> None:
        waiters, self._async_waiters = self._async_waiters, []
        for loop, room in waiters:
            try:
                loop.call_soon_threadsafe(_set_if_pending, room)
            except RuntimeError:  # that caller's event loop has closed
                pass

    def _freed(self) -> None:
        self._room.notify_all()
        self._wake_async_waiters()

    def _on_done(self, request: _Request | None, future: concurrent.futures.Future[np.ndarray]) -> None:
        """Future callback: a cancelled request gives back its unbatched patches."""
        if request is None or not future.cancelled():
            return
        with self._lock:
            self._remove(request, cancelled=True)

    def _remove(self, request: _Request, *, cancelled: bool) -> None:
        try:
            self._queue.remove(request)
        except ValueError:
            return
        unbatched = request.size - request.scheduled
        self._queued -= unbatched
        if cancelled:
            self.stats.cancelled_patches += unbatched
        self._freed()

    # -- worker -------------------------------------------------------------------------

    def _run(self) -> None:
        in_flight: _Batch | None = None
        while True:
            # While a batch runs on an asynchronous backend, take only what is
            # already queued so its transfer overlaps the running batch.
            batch = self._take_batch(wait=in_flight is None)
            if batch is not None:
                self._start(batch)
            if in_flight is not None:
                self._finish(in_flight)
                in_flight = None
            if batch is not None and batch.pending is not None:
                if batch.pending.is_ready():
                    self._finish(batch)
                else:
                    in_flight = batch
            if batch is None and in_flight is None:
                with self._lock:
                    if self._closed and not self._queue:
                        return

    def _take_batch(self, *, wait: bool) -> _Batch | None:
        expired: list[_Request] = []
        try:
            return self._fill_batch(wait=wait, expired=expired)
        finally:
            for request in expired:
                waited = time.monotonic() - request.enqueued
                _fail(
                    request,
                    DeadlineExceededError(
                        f"the deadline passed after {waited:.3f}s in the network's queue;"
                        " dropped before reaching the network"
                    ),
                )

    def _drop_expired(self, now: float, expired: list[_Request]) -> None:
        """Take requests whose deadline has passed out of the queue (lock held)."""
        for request in self._queue:
            if request.deadline is not None and now >= request.deadline:
                self.stats.expired_patches += request.size - request.scheduled
                self._remove(request, cancelled=False)
                expired.append(request)

    def _fill_batch(self, *, wait: bool, expired: list[_Request]) -> _Batch | None:
        with self._lock:
            while not self._queue:
                if self._closed or not wait:
                    return None
                self._work.wait()
            if wait and self._queue_delay_s > 0:
                deadline = time.monotonic() + self._queue_delay_s
                while self._queued < self.max_batch_size and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._work.wait(remaining)
            parts: list[tuple[_Request, int, int]] = []
            waits: list[float] = []
            size = 0
            now = time.monotonic()
            self._drop_expired(now, expired)
            while self._queue and size < self.max_batch_size:
                request = self._queue.first()
                if request.scheduled == 0:
                    waits.append(now - request.enqueued)
                take = min(self.max_batch_size - size, request.size - request.scheduled)
                parts.append((request, request.scheduled, request.scheduled + take))
                request.scheduled += take
                size += take
                if request.scheduled == request.size:
                    self._queue.pop_first()
            self._queued -= size
            if size:
                self._freed()
            if self._queue:
                # One request may fill many batches, but enqueueing woke only one
                # worker: wake the next so every worker takes a share of it.
                self._work.notify()
        return _Batch(parts, size, queue_waits=waits) if size else None

    def _start(self, batch: _Batch) -> None:
        batch.launched = time.monotonic()
        try:
            inputs, batch.buffer = assemble(
                [(request.patches, start, stop) for request, start, stop in batch.parts], self.buffers
            )
            batch.pending = self._launch(inputs)
        except Exception as exc:
            self._fail_batch(batch, exc)

    def _finish(self, batch: _Batch) -> None:
        assert batch.pending is not None
        try:
            features = np.asarray(batch.pending.result())
            if features.ndim != 2 or features.shape[0] != batch.size:
                raise RuntimeError(f"network returned shape {features.shape} for {batch.size} patches")
        except Exception as exc:
            self._fail_batch(batch, exc)
            return
        finally:
            # The network is done with its input: the next batch may reuse it.
            self.buffers.give_back(batch.buffer)
            batch.buffer = None
        completed: list[_Request] = []
        network_seconds = time.monotonic() - batch.launched
        with self._lock:
            self.stats.batches += 1
            self.stats.patches += batch.size
            self.stats.queue_seconds += sum(batch.queue_waits)
            self.stats.network_seconds += network_seconds
            for request, _, _ in batch.parts:
                if request.features is None:
                    request.features = np.empty((request.size, features.shape[1]), np.float32)
        offset = 0
        for request, start, stop in batch.parts:
            # Workers write disjoint slices, so the copies need no lock.
            assert request.features is not None
            request.features[start:stop] = features[offset : offset + stop - start]
            offset += stop - start
        with self._lock:
            for request, start, stop in batch.parts:
                request.finished += stop - start
                if request.finished == request.size:
                    completed.append(request)
        # Observed before callers get their features, so the figures are in place when they look.
        self._notify(BatchObservation(self.name, batch.size, tuple(batch.queue_waits), network_seconds))
        for request in completed:
            if not request.future.done():
                try:
                    request.future.set_result(request.features)  # type: ignore[arg-type]
                except concurrent.futures.InvalidStateError:
                    pass  # cancelled meanwhile

    def add_observer(self, observer: BatchObserver) -> None:
        """Call observer(BatchObservation) after every successful batch.

        Observers run on the worker thread and must be quick; one that raises is
        logged and skipped. Adding the same observer twice has no effect.
        """
        with self._lock:
            if observer not in self._observers:
                self._observers = [*self._observers, observer]

    def remove_observer(self, observer: BatchObserver) -> None:
        """Stop calling observer; unknown observers are ignored."""
        with self._lock:
            self._observers = [o for o in self._observers if o != observer]

    def _notify(self, observation: BatchObservation) -> None:
        for observer in self._observers:  # replaced, never mutated: no lock needed
            try:
                observer(observation)
            except Exception:
                # Monitoring must never fail inference.
                logger.exception("batch observer %r failed", observer)

    def _fail_batch(self, batch: _Batch, exc: Exception) -> None:
        with self._lock:
            self.stats.failed_batches += 1
        logger.warning("%s: batch of %d patches failed: %s", self.name, batch.size, exc)
        requests = list(dict.fromkeys(request for request, _, _ in batch.parts))
        with self._lock:
            for request in requests:
                self._remove(request, cancelled=False)
        for request in requests:
            _fail(request, exc)


def _fail(request: _Request, exc: BaseException) -> None:
    if not request.future.done():
        try:
            request.future.set_exception(exc)
        except concurrent.futures.InvalidStateError:
            pass


def _set_if_pending(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_result(None)
