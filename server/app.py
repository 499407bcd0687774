"""The server object (transport, interceptors, data plane, health) and the serve loop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from PIL import ImageFile

from server import metrics
from server._proto.spacer.v1 import spacer_pb2
from server.config import Preload, ServerConfig, read_preload
from server.dataplane import Engine
from server.interceptors import interceptors
from server.oip import servicer as oip
from server.oip.models import Registry
from server.reflection import enable_reflection
from server.security import read_token_file, server_credentials
from server.servicer import SpacerServicer, add_to_server
from spacer_core.atomic import write_atomic
from spacer_core.storage import StoragePolicy

logger = logging.getLogger("server")

SERVICE_NAME = spacer_pb2.DESCRIPTOR.services_by_name["Spacer"].full_name


def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
    ]


class SpacerServer:
    """One server: the grpc.aio server, its interceptors, its data plane and its health state.

    Built unstarted and bound to config's address (`port`); must be built
    with an event loop running (grpc.aio binds to it).
    """

    def __init__(self, config: ServerConfig):
        config.validate()
        self.config = config
        # Read before binding, so a malformed file fails the start at once.
        self.preload: Preload | None = read_preload(config.preload) if config.preload is not None else None
        if config.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("device is cuda, but CUDA is not available on this machine")
        token = read_token_file(config.auth_token_file) if config.auth_token_file is not None else None
        self.server = grpc.aio.server(options=server_options(config), interceptors=interceptors(token))
        self.engine = Engine(config)
        log_storage_policy(config, self.engine.runtime.policy)
        add_to_server(SpacerServicer(self.engine), self.server)
        # The Open Inference Protocol on the same port, through the same data plane.
        oip.add_to_server(
            oip.InferenceServicer(
                self.engine,
                Registry(
                    config.model_repository,
                    allow_override=config.allow_model_override,
                    max_config_models=config.max_config_models,
                ),
                self.is_ready,
            ),
            self.server,
        )

        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflected: tuple[str, ...] = (SERVICE_NAME, health.SERVICE_NAME)
        if oip.register_for_reflection():
            reflected += (oip.SERVICE_NAME,)
        enable_reflection(reflected, self.server)
        metrics.observe_batchers(self.engine.runtime)
        metrics.watch_models(self.engine, self.engine.runtime.loaded_models)
        self.metrics: metrics.MetricsServer | None = None
        # Loading and warming the preload file's models; health is SERVING once it is done.
        self.preloading: asyncio.Task[None] | None = None
        self.port = self._bind()

    def _bind(self) -> int:
        config = self.config
        try:
            if config.tls_cert is not None and config.tls_key is not None:
                credentials = server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
                port = self.server.add_secure_port(config.address, credentials)
            else:
                port = self.server.add_insecure_port(config.address)
        except RuntimeError as exc:  # grpc reports a failed bind this way
            raise OSError(f"cannot listen on {config.address}: {exc}") from None
        if port == 0:
            raise OSError(f"cannot listen on {config.address}")
        return port

    @property
    def metrics_port(self) -> int | None:
        """The port /metrics is served on, once started; None when metrics are off."""
        return self.metrics.port if self.metrics is not None else None

    async def start(self) -> None:
        """Start serving; every service is SERVING now, or once the preload file's models are warm.

        While preloading, health reports NOT_SERVING (calls are answered, but a
        balancer or probe keeps traffic away); `ready` waits for it to end.
        """
        await self.server.start()
        config = self.config
        if config.metrics_port is not None:
            try:
                self.metrics = metrics.MetricsServer(config.metrics_bind_host, config.metrics_port)
            except OSError as exc:
                await self.server.stop(0)
                raise OSError(
                    f"cannot serve metrics on {config.metrics_bind_host}:{config.metrics_port}: {exc}"
                ) from None
        if self.preload is None:
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)
            return
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.preloading = asyncio.create_task(self._preload(self.preload))
        # The failure is logged and reported by `ready`; nobody else need fetch it.
        self.preloading.add_done_callback(lambda t: t.cancelled() or t.exception())

    def is_ready(self) -> bool:
        """Started, and the preload file's models (if any) are loaded and warm."""
        if self.engine.runtime.closed:
            return False
        task = self.preloading
        return task is None or (task.done() and not task.cancelled() and task.exception() is None)

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)  # type: ignore[arg-type]

    async def _preload(self, models: Preload) -> None:
        start = asyncio.get_running_loop().time()
        try:
            loaded = await self.engine.preload(models)
        except Exception as exc:
            logger.error("preloading %s failed; health stays NOT_SERVING: %s", self.config.preload, exc)
            raise
        logger.info(
            "preloaded %d models in %.1fs: %s",
            len(loaded),
            asyncio.get_running_loop().time() - start,
            ", ".join(m.name for m in loaded),
        )
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def ready(self) -> None:
        """Wait until the server reports SERVING; raises ValueError when preloading failed."""
        task = self.preloading
        if task is None:
            return
        try:
            await asyncio.shield(task)
        except Exception as exc:
            raise ValueError(f"preload {self.config.preload}: {exc}") from None

    async def drain(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, refuse new calls, let in-flight calls finish within grace."""
        grace = self.config.grace_seconds if grace is None else grace
        await self.health.enter_graceful_shutdown()
        if self.preloading is not None and not self.preloading.done():
            self.preloading.cancel()
        await self.server.stop(grace)
        # Models and threads go only after the server has drained.
        self.engine.shutdown()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None


def create_server(config: ServerConfig) -> tuple[SpacerServer, int]:
    """Build an unstarted server bound to config's address; returns it and its port.

    Must be called with an event loop running (grpc.aio binds to it).
    """
    server = SpacerServer(config)
    return server, server.port


def log_storage_policy(config: ServerConfig, policy: StoragePolicy) -> None:
    """Say what clients may reach; loudly when they may reach every file."""
    if config.allow_any_path:
        logger.warning(
            "allow_any_path is set: clients may read and write ANY file this process can reach"
            " (use --data-root to confine them)"
        )
    logger.info("storage policy: %s", policy.describe())


async def start(server: SpacerServer) -> None:
    """Start serving (`SpacerServer.start`)."""
    await server.start()


async def ready(server: SpacerServer) -> None:
    """Wait until the server reports SERVING (`SpacerServer.ready`)."""
    await server.ready()


async def drain(server: SpacerServer, grace: float | None = None) -> None:
    """Report NOT_SERVING, refuse new calls, let in-flight calls finish within grace."""
    await server.drain(grace)


def metrics_port(server: SpacerServer) -> int | None:
    """The port /metrics is served on, once started; None when metrics are off."""
    return server.metrics_port


# Buffers at least this large (decoded images, Pillow's 16 MiB blocks) get their own
# mappings, given back to the system when freed.
MMAP_THRESHOLD = 4 * 1024 * 1024
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def return_large_buffers() -> bool:
    """Make glibc map large allocations on their own, so freed images leave the process.

    glibc raises its mmap threshold after each large free, up to 32 MiB, and
    from then on keeps such buffers in per-thread heaps it rarely trims: a
    server decoding large images in several worker threads would keep the
    memory of past images (hundreds of MiB) though the memory budget admitted
    them one at a time. A fixed threshold keeps it from rising. No-op off
    glibc or when the operator set MALLOC_MMAP_THRESHOLD_.
    """
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM/SIGINT, then drain."""
    return_large_buffers()
    # The process is this server's alone: Pillow's own switch can say what the
    # runtime says, so its decodes need no per-load switching (spacer_core.crop).
    ImageFile.LOAD_TRUNCATED_IMAGES = config.limits().allow_truncated_images
    server, port = create_server(config)
    await start(server)
    if config.port_file is not None:
        write_atomic(config.port_file, f"{port}\n")
    logger.info(
        "spacer.v1.Spacer and %s (Open Inference Protocol) listening on %s:%d",
        oip.SERVICE_NAME,
        config.host,
        port,
    )
    if config.model_repository is not None:
        logger.info("model repository: %s", config.model_repository)
    print(f"listening on {config.host}:{port}", flush=True)
    if metrics_port(server) is not None:
        logger.info("metrics on http://%s:%d/metrics", config.metrics_bind_host, metrics_port(server))

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    preloaded = asyncio.ensure_future(ready(server))
    waiting = asyncio.ensure_future(stopping.wait())
    try:
        done, _ = await asyncio.wait({waiting, preloaded}, return_when=asyncio.FIRST_COMPLETED)
        failure = preloaded.exception() if preloaded in done else None
        if failure is not None:
            # A server without the models it was told to hold must not linger half ready.
            await drain(server, 0)
            raise failure
        await waiting
        logger.info("signal received: draining (grace %.1fs)", config.grace_seconds)
        await drain(server)
        logger.info("stopped")
    finally:
        waiting.cancel()
        preloaded.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
