"""inference.GRPCInferenceService: convert the protocol's messages, call the DataPlane.

Failures are mapped to statuses, and calls logged, by `server.interceptors`.

Inference, loading and statistics live in server/oip/dataplane.py; this
module reads requests and builds replies. See docs/oip.md.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from importlib import metadata
from typing import Any, TypeAlias

import grpc

from server import metrics
from server._proto.inference import grpc_service_pb2 as pb
from server._proto.inference import grpc_service_pb2_grpc as pb_grpc
from server.dataplane import Engine, MemoryHold
from server.errors import describe, invalid, request_locations
from server.oip.dataplane import DataPlane, parameter, request_priority
from server.oip.models import VERSION, Model, Registry, check_name, not_found, valid_name
from server.servicer import call_deadline
from server.streams import windowed
from spacer_core.inference import Priority

logger = logging.getLogger(__name__)
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "spacer-server"
EXTENSIONS = ("model_repository", "model_configuration", "statistics", "parameters")
_DATA_TYPE = {"BYTES": pb.TYPE_STRING, "INT32": pb.TYPE_INT32, "FP32": pb.TYPE_FP32}


def inline_size(request: pb.ModelInferRequest) -> int:
    """Bytes of a request's tensor data (encoded images among them); reads transient copies."""
    raw = sum(len(contents) for contents in request.raw_input_contents)
    return raw + sum(len(item) for tensor in request.inputs for item in tensor.contents.bytes_contents)


def _server_version() -> str:
    try:
        return metadata.version("spacer-server")
    except metadata.PackageNotFoundError:
        return "0"


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The protocol's methods; `ready()` says whether the server is SERVING (preload done)."""

    def __init__(self, engine: Engine, registry: Registry, ready: Callable[[], bool]):
        self.engine = engine
        self.registry = registry
        self.data = DataPlane(engine, registry)
        self._ready = ready
        self._loading: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    # ------------------------------------------------------------ health and metadata

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:  # type: ignore[override]
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:  # type: ignore[override]
        return pb.ServerReadyResponse(ready=self._ready())

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:  # type: ignore[override]
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=_server_version(), extensions=list(EXTENSIONS)
        )

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:  # type: ignore[override]
        model = self.registry.find(request.name, "name")
        if model is None or (request.version and request.version != VERSION):
            raise not_found(request.name, request.version)
        return pb.ModelReadyResponse(ready=model.ready)

    def _known(self, name: str, version: str) -> Model:
        model = self.registry.find(name, "name")
        if model is None or model.kind == "invalid" or (version and version != VERSION):
            raise not_found(name, version)
        return model

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:  # type: ignore[override]
        model = self.registry.ready(request.name, request.version, "name")
        meta = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[VERSION],
            platform=model.platform,
            inputs=[meta(name=t.name, datatype=t.datatype, shape=t.shape) for t in model.inputs()],
            outputs=[meta(name=t.name, datatype=t.datatype, shape=t.shape) for t in model.outputs()],
        )

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:  # type: ignore[override]
        model = self.registry.ready(request.name, request.version, "name")
        config = pb.ModelConfig(
            name=model.name,
            platform=model.platform,
            backend="spacer",
            max_batch_size=0,
            input=[
                pb.ModelInput(
                    name=t.name, data_type=_DATA_TYPE[t.datatype], dims=t.shape, optional=t.optional
                )
                for t in model.inputs()
            ],
            output=[
                pb.ModelOutput(name=t.name, data_type=_DATA_TYPE[t.datatype], dims=t.shape)
                for t in model.outputs()
            ],
        )
        for key, value in model.files.items():
            config.parameters[key].string_value = value
        if model.classes:
            config.parameters["classes"].string_value = ",".join(str(c) for c in model.classes)
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Context
    ) -> pb.ModelStatisticsResponse:  # type: ignore[override]
        if request.name:
            names = [self._known(request.name, request.version).name]
        else:
            names = [m.name for m in self.registry if m.ready]
        response = pb.ModelStatisticsResponse()
        for name in names:
            entry = self.data.stats.get(name, VERSION)
            stats = response.model_stats.add(
                name=name,
                version=VERSION,
                last_inference=entry.last_inference_ms,
                inference_count=entry.inference_count,
                execution_count=entry.execution_count,
            )
            for stage in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
                value = getattr(entry, stage)
                getattr(stats.inference_stats, stage).CopyFrom(
                    pb.StatisticDuration(count=value.count, ns=value.ns)
                )
        return response

    # ------------------------------------------------------------ repository

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Context
    ) -> pb.RepositoryIndexResponse:  # type: ignore[override]
        self.registry.rescan()
        index = pb.RepositoryIndexResponse.ModelIndex
        models = [m for m in self.registry if m.ready or not request.ready]
        return pb.RepositoryIndexResponse(
            models=[
                index(
                    name=m.name,
                    version=VERSION if m.kind != "invalid" else "",
                    state="READY" if m.ready else "UNAVAILABLE",
                    reason=m.reason,
                )
                for m in models
            ]
        )

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:  # type: ignore[override]
        name = request.model_name
        if not name:
            raise invalid("model_name is required")
        check_name(name)
        config = parameter(request.parameters, "config")
        if config is not None and not isinstance(config, str):
            config = config.decode() if isinstance(config, bytes) else None
        for key in request.parameters:
            if key.startswith("file:"):
                raise invalid(
                    "file: parameters (model files sent inline) are not supported;"
                    " name files inside the data roots in the config instead"
                )
        # One load per name at a time; the entry goes with its last user, so
        # names a client tries do not pile up.
        entry = self._loading.setdefault(name, (asyncio.Lock(), [0]))
        lock, users = entry
        users[0] += 1
        try:
            async with lock:
                model = self.registry.candidate(name, config)
                await self.data.load(model)
                self.registry.put(model)
        finally:
            users[0] -= 1
            if not users[0] and self._loading.get(name) is entry:
                del self._loading[name]
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:  # type: ignore[override]
        self.data.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # ------------------------------------------------------------ inference

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:  # type: ignore[override]
        decide = self.engine.priorities(context.invocation_metadata(), stream=False)
        priority = decide(request_priority(request))
        # The message is already in memory: charged before anything else, refused when over budget.
        async with self.engine.received(inline_size(request), priority, wait=False):
            return await self.data.infer(request, priority, call_deadline(context), stream=False)

    async def ModelStreamInfer(  # type: ignore[override]
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Responses in completion order, each with its request's id; a failed request
        yields an error_message and the stream goes on."""
        decide = self.engine.priorities(context.invocation_metadata(), stream=True)
        deadline = call_deadline(context)

        async def one(req: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            try:
                priority = decide(request_priority(req))
                return pb.ModelStreamInferResponse(
                    infer_response=await self.data.infer(req, priority, deadline, stream=True)
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                code, message = describe(exc, locations=request_locations(req))
                prefix = f"[request id: {req.id}] " if req.id else ""
                metrics.item_failed(code.name, f"{prefix}{message}")
                return pb.ModelStreamInferResponse(
                    error_message=f"{prefix}{message}",
                    # A name outside the rule is not echoed: replies stay small.
                    infer_response=pb.ModelInferResponse(
                        model_name=req.model_name if valid_name(req.model_name) else "",
                        model_version=req.model_version,
                        id=req.id,
                    ),
                )

        async def receive(req: pb.ModelInferRequest) -> MemoryHold:
            try:
                priority = decide(request_priority(req))
            except Exception:  # a bad priority fails its own item, in `one`
                priority = Priority.BULK
            return await self.engine.receive(inline_size(req), priority, wait=True)

        async for response in windowed(
            request_iterator,
            one,
            self.engine.config.stream_window,
            receive=receive,
            release=self.engine.release,
        ):
            yield response


def add_to_server(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)


def register_for_reflection() -> bool:
    """Add the service's descriptors to the default pool, for server reflection.

    The stubs keep them in a pool of their own (a client library may define
    the same names in this process). When the default pool already holds
    the protocol from another file (a client library's full copy, imported
    in the same process), reflection describes the service from that one:
    the same messages on the wire. False when neither can be had.
    """
    from google.protobuf import descriptor_pb2, descriptor_pool

    proto = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(proto)
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(proto.name)
        return True
    except KeyError:
        pass
    try:
        pool.FindServiceByName(SERVICE_NAME)
        return True
    except KeyError:
        pass
    try:
        pool.Add(proto)
    except (TypeError, ValueError) as exc:
        logger.info("inference service not offered by reflection: %s", exc)
        return False
    return True
