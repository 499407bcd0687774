"""Per-model statistics, as Triton keeps them: ModelStatistics and the nv_* metrics.

One `Stats` per server holds, per model, the counts and cumulative
nanoseconds of successful and failed requests and of their stages:

- queue: waiting for admission (the server-wide image task slots)
- compute_input: reading the request's tensors
- compute_infer: the pipeline (decode, crop, the batched network, scoring)
- compute_output: building the response's tensors

The same numbers are exported under Triton's metric names (monotonic
counts, durations in microseconds, labelled model and version; typed
untyped so the samples keep Triton's names without a _total suffix) so Triton dashboards work:
nv_inference_request_success, nv_inference_request_failure,
nv_inference_count, nv_inference_exec_count, nv_inference_request_duration_us,
nv_inference_queue_duration_us, nv_inference_compute_input_duration_us,
nv_inference_compute_infer_duration_us, nv_inference_compute_output_duration_us.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from server import metrics


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += max(0, int(ns))


@dataclass
class ModelStats:
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0


class Timer:
    """Stage times of one request, in nanoseconds; `stage(name)` closes the current stage."""

    def __init__(self) -> None:
        self.start = self._last = time.perf_counter_ns()
        self.stages: dict[str, int] = {}

    def stage(self, name: str) -> None:
        now = time.perf_counter_ns()
        self.stages[name] = self.stages.get(name, 0) + now - self._last
        self._last = now

    def total(self) -> int:
        return time.perf_counter_ns() - self.start


class Stats:
    """Statistics of every model of one server."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[tuple[str, str], ModelStats] = {}
        _COLLECTOR.watch(self)

    def record(self, model: str, version: str, timer: Timer, ok: bool, inferences: int) -> None:
        total = timer.total()
        with self._lock:
            entry = self._models.setdefault((model, version), ModelStats())
            entry.last_inference_ms = int(time.time() * 1000)
            if not ok:
                entry.fail.add(total)
                return
            entry.success.add(total)
            for name in ("queue", "compute_input", "compute_infer", "compute_output"):
                getattr(entry, name).add(timer.stages.get(name, 0))
            entry.inference_count += inferences
            entry.execution_count += 1

    def forget(self, model: str, version: str) -> None:
        """Drop the statistics of a model that is gone."""
        with self._lock:
            self._models.pop((model, version), None)

    def get(self, model: str, version: str) -> ModelStats:
        with self._lock:
            entry = self._models.get((model, version), ModelStats())
            return ModelStats(**{f.name: _copy(getattr(entry, f.name)) for f in fields(ModelStats)})

    def items(self) -> list[tuple[tuple[str, str], ModelStats]]:
        with self._lock:
            keys = list(self._models)
        return [(key, self.get(*key)) for key in keys]


def _copy(value: Any) -> Any:
    return Duration(value.count, value.ns) if isinstance(value, Duration) else value


_COUNTERS = (
    (
        "nv_inference_request_success",
        "Number of successful inference requests, all batch sizes",
        lambda s: s.success.count,
    ),
    (
        "nv_inference_request_failure",
        "Number of failed inference requests, all batch sizes",
        lambda s: s.fail.count,
    ),
    (
        "nv_inference_count",
        "Number of inferences performed (points or feature rows)",
        lambda s: s.inference_count,
    ),
    ("nv_inference_exec_count", "Number of model executions performed", lambda s: s.execution_count),
    (
        "nv_inference_request_duration_us",
        "Cumulative inference request duration in microseconds",
        lambda s: (s.success.ns + s.fail.ns) // 1000,
    ),
    (
        "nv_inference_queue_duration_us",
        "Cumulative inference queuing duration in microseconds",
        lambda s: s.queue.ns // 1000,
    ),
    (
        "nv_inference_compute_input_duration_us",
        "Cumulative compute input duration in microseconds",
        lambda s: s.compute_input.ns // 1000,
    ),
    (
        "nv_inference_compute_infer_duration_us",
        "Cumulative compute inference duration in microseconds",
        lambda s: s.compute_infer.ns // 1000,
    ),
    (
        "nv_inference_compute_output_duration_us",
        "Cumulative inference compute output duration in microseconds",
        lambda s: s.compute_output.ns // 1000,
    ),
)


class _TritonCollector(Collector):
    """Triton's counters read from every live server's Stats at scrape time.

    Samples carry Triton's exact names (no _total suffix), as its dashboards expect.
    """

    def __init__(self) -> None:
        self._sources: weakref.WeakSet[Stats] = weakref.WeakSet()

    def watch(self, stats: Stats) -> None:
        self._sources.add(stats)

    def collect(self) -> Iterator[Metric]:
        entries = [item for stats in list(self._sources) for item in stats.items()]
        for name, documentation, value in _COUNTERS:
            # prometheus_client writes a counter family's HELP/TYPE as NAME_total;
            # untyped keeps family and samples under Triton's names.
            family = Metric(name, documentation, "untyped")
            for (model, version), entry in entries:
                family.add_sample(name, {"model": model, "version": version}, float(value(entry)))
            yield family


_COLLECTOR = _TritonCollector()
metrics.REGISTRY.register(_COLLECTOR)
