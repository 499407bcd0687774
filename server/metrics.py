"""Prometheus metrics of the server, served on their own port (`--metrics-port`).

Names follow go-grpc-prometheus for the transport (grpc_server_*) so the
usual gRPC dashboards work; the rest is spacer_*. Queue time and network
time are separate histograms, as Triton reports them:

- grpc_server_started_total{grpc_method,grpc_type}
- grpc_server_handled_total{grpc_method,grpc_code}: what the client received
- grpc_server_handling_seconds{grpc_method}: latency histogram
- grpc_server_msg_received_total / grpc_server_msg_sent_total{grpc_method}
- spacer_rpc_errors_total{grpc_method,grpc_code}: every status but OK, of calls
  and of the items of a stream that failed while the stream went on; calls
  refused without a valid token count here and in grpc_server_handled_total
  with UNAUTHENTICATED (grpc_method "unknown" for a method the server lacks)
- spacer_points_processed_total{grpc_method}: points scored or extracted,
  whether returned or stored (`count_points`, called where the work is done)
- spacer_batch_size{batcher}: patches per network call
- spacer_queue_seconds{batcher}: a request's wait before its first patch is batched
- spacer_network_seconds{batcher}: one batch through the network
- spacer_loaded_models{kind}: models LoadModel holds
- spacer_gpu_memory_allocated_bytes / spacer_gpu_memory_reserved_bytes{device},
  only once CUDA is in use

Everything lives in one process-wide registry, `REGISTRY`. The endpoint
answers GET /metrics only (404 elsewhere) and has no authentication: bind
it (`--metrics-address`) where only the scraper can reach it.

A call's points and failed stream items are reported from where the work
happens (the data plane, the servicers) with `count_points` and
`item_failed`; they reach the call that is running through `CallWork`, which
the call log makes current for the call (a context variable, so the tasks a
stream starts for its items report to their call too).
"""

from __future__ import annotations

import socket
import sys
import threading
import weakref
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)

# Latency buckets from 5 ms (a cached classifier) to 10 min (training).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

STARTED = Counter("grpc_server_started", "RPCs started.", ["grpc_method", "grpc_type"], registry=REGISTRY)
HANDLED = Counter(
    "grpc_server_handled",
    "RPCs finished, by the status code the client received.",
    ["grpc_method", "grpc_code"],
    registry=REGISTRY,
)
ERRORS = Counter(
    "spacer_rpc_errors",
    "RPCs, and items of a stream, that ended with a status other than OK.",
    ["grpc_method", "grpc_code"],
    registry=REGISTRY,
)
LATENCY = Histogram(
    "grpc_server_handling_seconds",
    "Time from an RPC's start to its status.",
    ["grpc_method"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
RECEIVED = Counter(
    "grpc_server_msg_received", "Request messages received.", ["grpc_method"], registry=REGISTRY
)
SENT = Counter("grpc_server_msg_sent", "Response messages sent.", ["grpc_method"], registry=REGISTRY)
POINTS = Counter(
    "spacer_points_processed",
    "Points whose features were extracted (returned or stored) or that were scored.",
    ["grpc_method"],
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "spacer_batch_size",
    "Patches per network call.",
    ["batcher"],
    buckets=_BATCH_BUCKETS,
    registry=REGISTRY,
)
QUEUE_SECONDS = Histogram(
    "spacer_queue_seconds",
    "Time a request waited in a batcher's queue before its first batch.",
    ["batcher"],
    buckets=_STAGE_BUCKETS,
    registry=REGISTRY,
)
NETWORK_SECONDS = Histogram(
    "spacer_network_seconds",
    "Time one batch spent in the network (input conversion to features).",
    ["batcher"],
    buckets=_STAGE_BUCKETS,
    registry=REGISTRY,
)

_GRPC_TYPES = {
    (False, False): "unary",
    (False, True): "server_stream",
    (True, False): "client_stream",
    (True, True): "bidi_stream",
}


def grpc_type(client_streaming: bool, server_streaming: bool) -> str:
    """go-grpc-prometheus's grpc_type label for a method's streaming shape."""
    return _GRPC_TYPES[(client_streaming, server_streaming)]


class CallWork:
    """What the running call has done: its points, and a hook for its failed stream items."""

    def __init__(self, method: str, on_item_error: Callable[[str, str, str], None] | None = None):
        self.method = method
        self.points = 0
        self._on_item_error = on_item_error

    def item_failed(self, code: str, message: str, token: str) -> None:
        ERRORS.labels(self.method, code).inc()
        if self._on_item_error is not None:
            self._on_item_error(code, message, token)


_CALL: ContextVar[CallWork | None] = ContextVar("spacer_call_work", default=None)


def begin_call(work: CallWork) -> None:
    """Make `work` the running call's record; tasks started from here on inherit it."""
    _CALL.set(work)


def count_points(points: int) -> None:
    """Add `points` (extracted or scored) to the running call; outside a call, nothing."""
    work = _CALL.get()
    if work is not None and points > 0:
        work.points += int(points)


def item_failed(code: str, message: str, token: str = "") -> None:
    """Report a stream item that failed with status `code` while its stream went on."""
    work = _CALL.get()
    if work is not None:
        work.item_failed(code, message, token)


def record_call(method: str, code: str, seconds: float, received: int, sent: int, points: int) -> None:
    """Count one finished RPC (called once per call by server.errors.rpc_method)."""
    HANDLED.labels(method, code).inc()
    if code != "OK":
        ERRORS.labels(method, code).inc()
    LATENCY.labels(method).observe(seconds)
    if received:
        RECEIVED.labels(method).inc(received)
    if sent:
        SENT.labels(method).inc(sent)
    if points:
        POINTS.labels(method).inc(points)


# The grpc_method label of a call to a method the server lacks: a client
# chooses that name, so it must not become a label value of its own.
UNKNOWN_METHOD = "unknown"


def record_rejected(method: str, code: str) -> None:
    """Count a call refused before it reached its method (no valid token)."""
    HANDLED.labels(method, code).inc()
    ERRORS.labels(method, code).inc()


def _observe_batch(observation: Any) -> None:
    BATCH_SIZE.labels(observation.batcher).observe(observation.size)
    NETWORK_SECONDS.labels(observation.batcher).observe(observation.network_seconds)
    queue = QUEUE_SECONDS.labels(observation.batcher)
    for wait in observation.queue_waits:
        queue.observe(wait)


def observe_batchers(runtime: Any) -> None:
    """Feed the batches of every batcher of `runtime` (a spacer_core Runtime) into
    the spacer_batch/queue/network histograms, those running and those created later."""
    runtime.add_batch_observer(_observe_batch)


class _LiveCollector(Collector):
    """Gauges read at scrape time: loaded models of every live server, GPU memory."""

    def __init__(self) -> None:
        self._sources: weakref.WeakKeyDictionary[Any, Callable[[], Iterable[Any]]] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    def watch(self, owner: Any, models: Callable[[], Iterable[Any]]) -> None:
        with self._lock:
            self._sources[owner] = models

    def collect(self) -> Iterator[GaugeMetricFamily]:
        kinds: Tally[str] = Tally()
        with self._lock:
            sources = list(self._sources.values())
        for models in sources:
            kinds.update(str(getattr(m, "kind", "unknown")) for m in models())
        loaded = GaugeMetricFamily("spacer_loaded_models", "Models held by LoadModel.", labels=["kind"])
        for kind in ("classifier", "extractor", *sorted(set(kinds) - {"classifier", "extractor"})):
            loaded.add_metric([kind], kinds[kind])
        yield loaded
        yield from _gpu_memory()


def _gpu_memory() -> Iterator[GaugeMetricFamily]:
    # Only report CUDA once something in the process has initialised it;
    # a scrape must not be what starts a CUDA context.
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    allocated = GaugeMetricFamily(
        "spacer_gpu_memory_allocated_bytes", "GPU memory held by tensors.", labels=["device"]
    )
    reserved = GaugeMetricFamily(
        "spacer_gpu_memory_reserved_bytes",
        "GPU memory reserved by the caching allocator.",
        labels=["device"],
    )
    for index in range(torch.cuda.device_count()):
        device = f"cuda:{index}"
        allocated.add_metric([device], float(torch.cuda.memory_allocated(index)))
        reserved.add_metric([device], float(torch.cuda.memory_reserved(index)))
    yield allocated
    yield reserved


_LIVE = _LiveCollector()
REGISTRY.register(_LIVE)


def watch_models(owner: Any, models: Callable[[], Iterable[Any]]) -> None:
    """Report models() (objects with a `kind`) in spacer_loaded_models while owner lives."""
    _LIVE.watch(owner, models)


METRICS_PATH = "/metrics"


def _only_metrics(app: Callable[..., Any]) -> Callable[..., Any]:
    """The exposition app at /metrics; 404 on every other path, so the port offers nothing else."""

    def routed(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO") != METRICS_PATH:
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"not found: metrics are at /metrics\n"]
        return app(environ, start_response)

    return routed


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Scrapes are not logged (one line per scrape would drown the call log)."""


class MetricsServer:
    """The /metrics HTTP endpoint on its own thread (no authentication: bind it privately)."""

    def __init__(self, host: str, port: int):
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]

        class _Server(ThreadingWSGIServer):
            address_family = family  # IPv6 hosts need an IPv6 socket

        self._httpd: WSGIServer = make_server(
            host, port, _only_metrics(make_wsgi_app(REGISTRY)), _Server, handler_class=_QuietHandler
        )
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics", daemon=True)
        self._thread.start()
        self.port: int = self._httpd.server_port

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
