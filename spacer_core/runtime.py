"""The runtime: one object that owns what is expensive and shared.

A `Runtime` holds the compiled feature networks, their dynamic batchers,
loaded classifiers and the hashes of local weights files, each in a bounded
cache with explicit settings, plus the storage policy its work runs under.
The library uses a process-wide default (`default_runtime()`); a server, a
test or a bulk job builds its own and makes it current with `activate()`.

    runtime = Runtime(
        RuntimeSettings(batcher=BatcherSettings(max_batch_size=8)), policy=DataRootsPolicy(["/data"])
    )
    with runtime.activate():
        tasks.extract_features(msg)        # uses this runtime's caches and policy
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import IO, Any

import numpy as np

from spacer_core.inference.backends import PATCH_SHAPE as _PATCH_SHAPE
from spacer_core.inference.backends import Backend, PooledBackend, resolve_device
from spacer_core.inference.batcher import (
    DEFAULT_PRIORITY,
    BatchBuffers,
    BatcherClosedError,
    BatcherSettings,
    BatchObservation,
    BatchObserver,
    DynamicBatcher,
    run_batches,
)
from spacer_core.inference.compile import load_backend
from spacer_core.inference.model_cache import ModelCache
from spacer_core.inference.network import NetworkSpec
from spacer_core.inference.precision import Precision
from spacer_core.limits import LIBRARY_DEFAULTS, Limits, limits_scope
from spacer_core.locations import Location
from spacer_core.storage import (
    ALLOW_ALL,
    StoragePolicy,
    fd_version,
    file_version,
    load_classifier,
    open_local,
    policy_scope,
)

logger = logging.getLogger(__name__)

# Top-1 minus top-2 probability under which `fast` features are recomputed
# exactly; chosen with benchmarks/eval_precision.py (docs/benchmarks.md).
DEFAULT_FAST_RECHECK_MARGIN = 0.075


@dataclass(frozen=True)
class RuntimeSettings:
    """How networks run and how much a runtime keeps in memory.

    `max_remote_hashes` bounds how many remote weights files' digests are
    remembered (those downloaded without a hash in their message);
    `reader_threads` is the size of the pool that reads training feature
    files (None: four per core, at most 16).

    `device` None picks CUDA when available. `batcher` sizes network calls
    (`max_batch_size` None: each backend's preferred size, small on CPU,
    large on GPU; the synchronous path uses the same size) and how the
    shared batchers fill them (`workers` None: one batch at once per backend
    session on CPU, at least two, and one on CUDA).

    `fast_recheck_margin`: in `fast` precision, points whose classifier
    scores put the top two classes closer than this (top-1 minus top-2
    probability) get their features recomputed in exact precision and are
    scored again, so reduced precision rarely changes a classification;
    0 turns the recheck off. The default comes from
    benchmarks/eval_precision.py (docs/benchmarks.md).
    """

    device: str | None = None
    precision: str = "exact"
    fast_recheck_margin: float = DEFAULT_FAST_RECHECK_MARGIN
    batcher: BatcherSettings = BatcherSettings()
    max_networks: int = 4
    max_classifiers: int = 8
    max_file_hashes: int = 1024
    max_remote_hashes: int = 1024
    reader_threads: int | None = None
    compile_cache_dir: str | None = None
    limits: Limits = LIBRARY_DEFAULTS

    def __post_init__(self) -> None:
        for name in ("max_remote_hashes", "reader_threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"RuntimeSettings.{name} must be >= 1, got {value}")
        check_fast_recheck_margin(self.fast_recheck_margin, "RuntimeSettings.fast_recheck_margin")


def check_fast_recheck_margin(value: float, name: str) -> None:
    """ValueError naming `name` unless `value` is a margin of probabilities, in [0, 1] (nan fails)."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


@dataclass(frozen=True)
class LoadedModel:
    """A network or classifier a runtime holds, as ListModels reports it."""

    kind: str  # "extractor" or "classifier"
    name: str
    feature_dim: int
    load_seconds: float
    classes: tuple[Any, ...] = ()
    # Filled in by `Runtime.loaded()`: what built a network, its weights' sha256
    # (the network's cache key), who loaded it and when a call last used it.
    extractor_class: str = ""
    weights_sha256: str = ""
    loaded_by: str = ""  # "request" (LoadModel, preload) or "call"
    last_used: float = 0.0  # time.time(); 0.0 before any use


@dataclass
class _Network:
    backend: Backend
    info: LoadedModel
    batch_size: int
    last_used: float = field(default=0.0, init=False)
    nbytes: int = field(init=False)
    # Patches per launch of `features()`, the synchronous path.
    sync_batch_size: int = field(init=False)
    # Input buffers of `features()` (the batcher has its own), reused call after call.
    buffers: BatchBuffers = field(init=False)
    # The same network in exact precision, when `backend` is reduced-precision:
    # built on the first recheck, dropped with this entry.
    exact: _Network | None = field(default=None, init=False)
    exact_lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self) -> None:
        self.nbytes = self.backend.nbytes
        # Backends that share a request out over their sessions themselves
        # (PooledBackend) take it whole; others get it a batch at a time.
        self.sync_batch_size = self.batch_size * self.backend.parallelism
        self.buffers = BatchBuffers(self.backend.allocate_batch, self.sync_batch_size)

    def run(self, patches: np.ndarray) -> np.ndarray:
        """Features of one caller's patches, in this thread."""
        if isinstance(self.backend, PooledBackend):
            return self.backend.run_patches(patches)
        return run_batches(self.backend.launch, patches, self.sync_batch_size, self.buffers)


@dataclass
class _Classifier:
    version: Any
    clf: Any
    info: LoadedModel
    nbytes: int = 0
    last_used: float = 0.0


# Scored points seen before the runtime judges whether the fast recheck pays.
RECHECK_WARN_AFTER = 500


@dataclass
class RecheckCounts:
    """What the `fast` recheck did under one runtime: images scored, points rechecked."""

    images: int = 0
    points: int = 0
    rechecked: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    warned: bool = field(default=False, repr=False, compare=False)

    def add(self, points: int, rechecked: int) -> None:
        with self.lock:
            self.images += 1
            self.points += points
            self.rechecked += rechecked
            # Past about 40% rechecked, fast + recheck costs more than exact alone
            # (fast is 1.5-1.7x exact): say so once, with what to do instead.
            if self.warned or self.points < RECHECK_WARN_AFTER or self.rechecked < 0.4 * self.points:
                return
            self.warned = True
        logger.warning(
            "fast precision: %d of %d scored points (%.0f%%) were close calls recomputed in exact "
            "precision, which is slower than exact precision alone; with these classifiers use exact "
            "precision, or a fast recheck margin of 0 to keep fast without the recheck",
            self.rechecked,
            self.points,
            100 * self.rechecked / self.points,
        )


class FileHashes:
    """sha256 of local files, remembered per name and `fd_version`; bounded LRU.

    The version comes from the open file that is hashed (`digest`), so a
    path swapped between the stat and the read cannot pair one file's
    version with another's digest.
    """

    def __init__(self, max_entries: int = 1024):
        self.max_entries = max_entries
        self._known: OrderedDict[str, tuple[tuple[int, ...], str]] = OrderedDict()
        self._lock = threading.Lock()

    def sha256(self, path: str) -> str:
        """Digest of the file at `path` (a path this process trusts, such as its own cache)."""
        with open(path, "rb") as f:
            return self.digest(path, f)

    def digest(self, name: str, f: IO[bytes]) -> str:
        """Digest of the open file `f`, remembered under `name` and the file's version."""
        version = fd_version(f)
        with self._lock:
            known = self._known.get(name)
            if known is not None and known[0] == version:
                self._known.move_to_end(name)
                return known[1]
        digest = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
        sha = digest.hexdigest()
        with self._lock:
            self._known[name] = (version, sha)
            self._known.move_to_end(name)
            while len(self._known) > self.max_entries:
                self._known.popitem(last=False)
        return sha

    def __len__(self) -> int:
        return len(self._known)


class BoundedMap:
    """A thread-safe mapping that forgets its least recently used entries past `max_entries`."""

    def __init__(self, max_entries: int):
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any | None:
        """The value under `key` (now the most recently used), or None."""
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: Any, value: Any) -> None:
        """Remember `value` under `key`, forgetting the oldest entries past the bound."""
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


def _close_batcher(key: object, batcher: DynamicBatcher) -> None:
    # Don't wait: queued requests still finish on the batcher's own thread.
    batcher.close(drain=True, timeout=0)


class Runtime:
    """Caches for networks, batchers, classifiers and file hashes, and a storage policy."""

    def __init__(
        self,
        settings: RuntimeSettings | None = None,
        *,
        policy: StoragePolicy = ALLOW_ALL,
        batch_observers: Iterable[BatchObserver] = (),
    ):
        self.settings = settings or RuntimeSettings()
        self.policy = policy
        # Called after every batch of every batcher this runtime creates (metrics).
        self._batch_observers: list[BatchObserver] = list(dict.fromkeys(batch_observers))
        self._observers_lock = threading.Lock()
        self.device = resolve_device(self.settings.device)
        self.precision = Precision.parse(self.settings.precision)
        self.file_hashes = FileHashes(self.settings.max_file_hashes)
        # sha256 of remote extractor files downloaded without a hash in their
        # message, so their content-addressed copies can be checked and reused.
        self.remote_hashes = BoundedMap(self.settings.max_remote_hashes)
        self._reader_pool: ThreadPoolExecutor | None = None
        self._reader_pool_lock = threading.Lock()
        self._closed = False
        self._networks: ModelCache[str, _Network] = ModelCache(max_items=self.settings.max_networks)
        self._batchers: ModelCache[str, DynamicBatcher] = ModelCache(
            max_items=self.settings.max_networks, on_evict=_close_batcher
        )
        self._classifiers: ModelCache[Location, _Classifier] = ModelCache(
            max_items=self.settings.max_classifiers
        )
        # Loaded on request (LoadModel): what loaded_models() lists while cached.
        self._requested: dict[tuple[str, Any], None] = {}
        self.recheck_counts = RecheckCounts()

    # -- context ----------------------------------------------------------------------

    @contextlib.contextmanager
    def activate(self) -> Iterator[Runtime]:
        """Make this runtime (and its storage policy) current in this context."""
        token = _current.set(self)
        try:
            with policy_scope(self.policy), limits_scope(self.settings.limits):
                yield self
        finally:
            _current.reset(token)

    # -- networks ---------------------------------------------------------------------

    def backend(self, net: NetworkSpec) -> Backend:
        """The compiled backend for `net` on this runtime's device, built on first use."""
        return self._network(net).backend

    def _network(self, net: NetworkSpec) -> _Network:
        network = self._networks.get(net.key, lambda: self._load(net, self.precision))
        network.last_used = time.time()
        return network

    def _load(self, net: NetworkSpec, precision: Precision) -> _Network:
        def build() -> Any:
            # Whichever thread builds (a worker, a batcher), the files are read
            # under this runtime's storage policy and the network checked
            # against its limits.
            with self.activate():
                return net.build()

        start = time.perf_counter()
        backend = load_backend(
            net.key,
            build,
            device=self.device,
            precision=precision,
            cache_dir=self.settings.compile_cache_dir,
        )
        info = LoadedModel(
            "extractor",
            net.label or net.key,
            net.feature_dim,
            time.perf_counter() - start,
            extractor_class=_builder_class(net.build),
            weights_sha256=net.key,
        )
        return _Network(backend, info, self.settings.batcher.max_batch_size or backend.preferred_batch_size)

    def recheck_margin(self, net: NetworkSpec, *, load: bool = True) -> float:
        """The top-two score margin under which `net`'s points are recomputed exactly; 0: no recheck.

        Nonzero only in `fast` precision when `net` really runs a reduced-precision
        backend (a CPU without bf16 runs exact already) and the setting is on.
        With `load` False a network not built (or no longer cached) is not
        built for this, and the answer is 0: safe on an event loop.
        """
        margin = self.settings.fast_recheck_margin
        return margin if margin > 0 and self._runs_reduced(net, load=load) else 0.0

    def feature_precision(self, net: NetworkSpec | None) -> str:
        """What `net`'s features record as their precision: "fast" when a reduced-precision
        backend makes them, "" (exact) otherwise (also for extractors without a network)."""
        return Precision.FAST.value if net is not None and self._runs_reduced(net) else ""

    def _runs_reduced(self, net: NetworkSpec, *, load: bool = True) -> bool:
        """Whether `net` runs on a reduced-precision backend here (`fast` asked for, and the
        device has it). With `load` False a network not built (or no longer cached) is not
        built for this, and the answer is False."""
        if self.precision is not Precision.FAST:
            return False
        network = self._network(net) if load else self._networks.peek(net.key)
        return network is not None and network.backend.precision is not Precision.EXACT

    def exact_features(self, net: NetworkSpec, patches: np.ndarray) -> np.ndarray:
        """Features of patches from `net` in exact precision, in this thread, whatever the runtime's precision.

        A `fast` runtime builds the exact backend on first use and keeps it with
        the network's cache entry (its memory counted there, dropped with it).
        """
        network = self._network(net)
        if network.backend.precision is not Precision.EXACT:
            with network.exact_lock:
                if network.exact is None:
                    network.exact = self._load(net, Precision.EXACT)
                    network.nbytes += network.exact.nbytes
                    if self._networks.peek(net.key) is network:  # count the twin's bytes in the cache
                        self._networks.put(net.key, network)
            network = network.exact
        return network.run(patches)

    def count_recheck(self, points: int, rechecked: int) -> None:
        """Record one image scored in `fast` precision, `rechecked` of its `points` recomputed exactly."""
        self.recheck_counts.add(points, rechecked)

    def load_network(self, net: NetworkSpec) -> LoadedModel:
        """Build (or find) `net`'s backend now; what ListModels reports for it."""
        info = self._network(net).info
        self._requested[("extractor", net.key)] = None
        return info

    def batch_size(self, net: NetworkSpec, *, load: bool = True) -> int:
        """Patches per network call for `net`: the setting, else the backend's preferred size.

        With `load` False a network not built yet is not built for this: the
        answer is then the generic default (`Backend.preferred_batch_size`).
        """
        if self.settings.batcher.max_batch_size:
            return self.settings.batcher.max_batch_size
        network = self._network(net) if load else self._networks.peek(net.key)
        return network.batch_size if network is not None else Backend.preferred_batch_size

    def batcher(self, net: NetworkSpec) -> DynamicBatcher:
        """The dynamic batcher shared by every caller of `net` in this runtime."""

        def create() -> DynamicBatcher:
            network = self._network(net)
            wanted = self.settings.batcher
            settings = replace(
                wanted,
                max_batch_size=network.batch_size,
                # On CPU one batch in flight per session of the backend (at least two).
                workers=wanted.workers
                or (1 if self.device.type == "cuda" else max(2, network.backend.parallelism)),
            )
            return DynamicBatcher(
                network.backend,
                settings,
                name=f"batcher-{net.key[:8]}-{self.device}",
                observers=(self._observe_batch,),
            )

        batcher = self._batchers.get(net.key, create)
        if batcher.closed:  # evicted between lookup and use
            self._batchers.pop(net.key)
            batcher = self._batchers.get(net.key, create)
        return batcher

    def add_batch_observer(self, observer: BatchObserver) -> None:
        """Call observer(BatchObservation) after every batch of this runtime's batchers.

        Applies to the batchers already running and to every one created later.
        Observers run on batcher threads and must be quick; adding one twice has no effect.
        """
        with self._observers_lock:
            if observer not in self._batch_observers:
                self._batch_observers = [*self._batch_observers, observer]

    def remove_batch_observer(self, observer: BatchObserver) -> None:
        """Stop calling observer; unknown observers are ignored."""
        with self._observers_lock:
            self._batch_observers = [o for o in self._batch_observers if o != observer]

    def _observe_batch(self, observation: BatchObservation) -> None:
        # Every batcher of this runtime calls this one observer, so observers added
        # later reach existing batchers too. The list is replaced, never mutated.
        for observer in self._batch_observers:
            try:
                observer(observation)
            except Exception:
                logger.exception("batch observer %r failed", observer)

    def features(self, net: NetworkSpec, patches: np.ndarray) -> np.ndarray:
        """Features of patches, computed in this thread (on every session of a CPU backend).

        `patches`: uint8 (N, 224, 224, 3) crops, converted piece by piece into
        reused float32 input buffers, or float32 (N, 3, 224, 224) in [0, 1].
        """
        return self._network(net).run(patches)

    async def features_async(
        self,
        net: NetworkSpec,
        patches: np.ndarray,
        *,
        priority: int = DEFAULT_PRIORITY,
        deadline: float | None = None,
    ) -> np.ndarray:
        """Features of patches through the shared batcher (batched with other callers).

        `priority` orders this request among waiting ones (`Priority`, lower
        first); past `deadline` (`time.monotonic()`) it is dropped before
        reaching the network with DeadlineExceededError.
        """
        try:
            return await self.batcher(net).extract(patches, priority=priority, deadline=deadline)
        except BatcherClosedError:
            if self.closed:
                raise
            # Evicted meanwhile by another network: get a fresh batcher once.
            return await self.batcher(net).extract(patches, priority=priority, deadline=deadline)

    def warm_up(self, net: NetworkSpec, *, batched: bool = True) -> float:
        """Run one full batch of blank patches through `net`; seconds taken.

        The first forward pass of a compiled network pays for allocations and
        kernel selection; doing it before traffic keeps that off a client's
        call. `batched` goes through the shared batcher (starting it too).
        """
        start = time.perf_counter()
        blank = np.zeros((self.batch_size(net), *_PATCH_SHAPE), np.float32)
        if batched:
            self.batcher(net).extract_sync(blank)
        else:
            self.features(net, blank)
        return time.perf_counter() - start

    # -- classifiers ------------------------------------------------------------------

    def classifier(self, loc: Location) -> Any:
        """The classifier at `loc`, loaded once and reloaded when its file changes.

        pyspacer caches by location alone and serves a stale model after a
        file is overwritten; local files and memory blobs are keyed on their
        current version too. Remote ones are cached by location.
        """
        if loc.storage_type == "filesystem":
            # The version and the pickle come from one open file, so a path
            # swapped in between cannot cache one file's model as another's.
            with open_local(loc) as f:
                version: Any = fd_version(f)
                entry = self._classifiers.get(loc, lambda: self._load_classifier(loc, version, f.read()))
                if entry.version != version:
                    entry = self._load_classifier(loc, version, f.read())
                    self._classifiers.put(loc, entry)
            entry.last_used = time.time()
            return entry.clf
        version = file_version(loc)
        entry = self._classifiers.get(loc, lambda: self._load_classifier(loc, version))
        if entry.version != version:
            entry = self._load_classifier(loc, version)
            self._classifiers.put(loc, entry)
        entry.last_used = time.time()
        return entry.clf

    @staticmethod
    def _load_classifier(loc: Location, version: Any, data: bytes | None = None) -> _Classifier:
        from spacer_core.legacy import load_classifier_bytes

        start = time.perf_counter()
        clf = load_classifier(loc) if data is None else load_classifier_bytes(data, source=loc.key)
        info = LoadedModel(
            "classifier",
            loc.describe(),
            classifier_feature_dim(clf) or 0,
            time.perf_counter() - start,
            tuple(clf.classes_.tolist()),
        )
        return _Classifier(version, clf, info)

    def load_classifier(self, loc: Location) -> LoadedModel:
        """Load (or find) the classifier at `loc` now; what ListModels reports for it."""
        self.classifier(loc)
        entry = self._classifiers.peek(loc)
        assert entry is not None
        self._requested[("classifier", loc)] = None
        return entry.info

    def forget_classifier(self, loc: Location) -> None:
        """Drop a cached classifier (after it was overwritten through this runtime)."""
        self._classifiers.pop(loc)

    # -- training ---------------------------------------------------------------------

    def reader_pool(self) -> ThreadPoolExecutor:
        """Threads that read training feature files, started on first use.

        Reading and inflating files releases the GIL, and long-lived threads
        keep their per-thread S3 clients; the pool is shared by every
        training under this runtime.
        """
        with self._reader_pool_lock:
            if self._reader_pool is None:
                threads = self.settings.reader_threads or min(16, 4 * (os.cpu_count() or 1))
                self._reader_pool = ThreadPoolExecutor(
                    max_workers=threads, thread_name_prefix="spacer-features"
                )
            return self._reader_pool

    # -- inventory and lifetime -------------------------------------------------------

    def loaded_models(self) -> list[LoadedModel]:
        """Networks and classifiers loaded on request and still held, sorted by kind and name."""
        infos = []
        for kind, key in list(self._requested):
            entry = (self._networks if kind == "extractor" else self._classifiers).peek(key)
            if entry is None:  # evicted since: forget the request too
                self._requested.pop((kind, key), None)
            else:
                infos.append(entry.info)
        return sorted(infos, key=lambda m: (m.kind, m.name))

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop the batchers (queued work finishes) and the reader threads, and drop every cache."""
        self._closed = True
        with self._reader_pool_lock:
            pool, self._reader_pool = self._reader_pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        self.remote_hashes.clear()
        self._batchers.clear()
        self._networks.clear()
        self._classifiers.clear()

    def loaded(self) -> list[LoadedModel]:
        """Every network and classifier held now, whoever loaded it, most recently used first.

        Unlike `loaded_models()` (what was asked for by name) this reads the
        caches themselves, so models a call loaded on its way show too. A
        network's exact twin (the `fast` recheck) belongs to its network's
        entry and is not listed apart; its bytes count in that entry.
        """
        held: list[LoadedModel] = []
        caches: tuple[tuple[str, ModelCache[Any, Any]], ...] = (
            ("extractor", self._networks),
            ("classifier", self._classifiers),
        )
        for kind, cache in caches:
            for key in cache.keys():
                entry = cache.peek(key)
                if entry is None:  # evicted meanwhile
                    continue
                by = "request" if (kind, key) in self._requested else "call"
                held.append(replace(entry.info, loaded_by=by, last_used=entry.last_used))
        return sorted(held, key=lambda m: (-m.last_used, m.kind, m.name))


def _builder_class(build: Any) -> str:
    # A network's build function is defined in its extractor's network(): its
    # qualified name starts with the extractor class.
    qualname = str(getattr(build, "__qualname__", ""))
    if ".<locals>." not in qualname:
        return ""
    owner = qualname.split(".<locals>.")[0].rpartition(".")[0]
    return f"{getattr(build, '__module__', '')}.{owner}" if owner else ""


def classifier_feature_dim(clf: Any) -> int | None:
    """The feature dimension a classifier was trained on, when it says (or its weights do)."""
    calibrated = getattr(clf, "calibrated_classifiers_", None) or [None]
    fitted = getattr(calibrated[0], "estimator", None)
    for candidate in (clf, fitted, getattr(clf, "estimator", None), getattr(clf, "base_estimator", None)):
        dim = getattr(candidate, "n_features_in_", None)
        if dim is not None:
            return int(dim)
        coef = getattr(candidate, "coef_", None)
        if coef is not None:
            return int(np.shape(coef)[-1])
        coefs = getattr(candidate, "coefs_", None)
        if isinstance(coefs, list) and coefs:
            return int(np.shape(coefs[0])[0])
    return None


_default: Runtime | None = None
_default_lock = threading.Lock()
_current: ContextVar[Runtime | None] = ContextVar("spacer_runtime", default=None)


def default_runtime() -> Runtime:
    """The process-wide runtime library calls use when none is active."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Runtime()
        return _default


def current() -> Runtime:
    """The runtime active in this context, else the process default."""
    return _current.get() or default_runtime()
