"""inference.GRPCInferenceService: the Open Inference Protocol over the server's Engine.

Every image request is one `ImageJob` through `Engine.run_image`, exactly
as spacer.v1's ClassifyImage and ExtractFeatures run, under the same
admission, priorities, batcher, storage policy and limits. See docs/oip.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from importlib import metadata
from typing import Any, TypeAlias

import grpc
import numpy as np

from server.errors import RequestError, describe, invalid, rpc_method
from server.engine import Engine
from server.oip import tensors
from server.oip.models import PIPELINE, VERSION, Model, Registry, location_from_text, not_found
from server.oip.stats import Stats, Timer
from server.servicer import call_deadline, call_priority
from spacer_core import pipeline
from spacer_core.data_classes import DataLocation
from spacer_core.inference import Priority
from spacer_core.pipeline import ImageJob

from server._proto.inference import grpc_service_pb2 as pb
from server._proto.inference import grpc_service_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "spacer-server"
EXTENSIONS = ("model_repository", "model_configuration", "statistics", "parameters")
_DATA_TYPE = {"BYTES": pb.TYPE_STRING, "INT32": pb.TYPE_INT32, "FP32": pb.TYPE_FP32}


def _server_version() -> str:
    try:
        return metadata.version("spacer-server")
    except metadata.PackageNotFoundError:
        return "0"


def _parameter(params: Any, name: str) -> Any:
    """A request parameter's value, whichever field of the oneof carries it; None when absent."""
    if name not in params:
        return None
    value = params[name]
    which = value.WhichOneof("parameter_choice")
    return None if which is None else getattr(value, which)


def request_priority(request: Any, fallback: Priority) -> Priority:
    """Triton's "priority" parameter: 0 or absent -> `fallback`, 1 -> INTERACTIVE, >1 -> BULK."""
    value = _parameter(request.parameters, "priority")
    if value is None or value == 0:
        return fallback
    if isinstance(value, (str, bytes, float)) or value < 0:
        raise invalid(f"parameter 'priority' must be a non-negative integer, got {value!r}")
    return Priority.INTERACTIVE if value == 1 else Priority.BULK


def request_deadline(request: Any, call_deadline: float | None) -> float | None:
    """The earlier of the call's deadline and Triton's "timeout" parameter (microseconds)."""
    value = _parameter(request.parameters, "timeout")
    if value is None or value == 0:
        return call_deadline
    if isinstance(value, (str, bytes, float)) or value < 0:
        raise invalid(f"parameter 'timeout' must be a non-negative integer (us), got {value!r}")
    own = time.monotonic() + value / 1e6
    return own if call_deadline is None else min(own, call_deadline)


def _labels(classes: Any) -> list[bytes]:
    return [str(c).encode() for c in classes]


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The protocol's methods; `ready()` says whether the server is SERVING (preload done)."""

    def __init__(self, engine: Engine, registry: Registry, ready: Callable[[], bool]):
        self.engine = engine
        self.registry = registry
        self.stats = Stats()
        self._ready = ready
        self._loading: dict[str, asyncio.Lock] = {}

    # ------------------------------------------------------------ health and metadata

    @rpc_method
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:  # type: ignore[override]
        return pb.ServerLiveResponse(live=True)

    @rpc_method
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:  # type: ignore[override]
        return pb.ServerReadyResponse(ready=self._ready())

    @rpc_method
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> pb.ServerMetadataResponse:  # type: ignore[override]
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=_server_version(),
                                         extensions=list(EXTENSIONS))

    @rpc_method
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:  # type: ignore[override]
        model = self.registry.find(request.name)
        if model is None or (request.version and request.version != VERSION):
            raise not_found(request.name, request.version)
        return pb.ModelReadyResponse(ready=model.ready)

    def _known(self, name: str, version: str) -> Model:
        model = self.registry.find(name)
        if model is None or model.kind == "invalid" or (version and version != VERSION):
            raise not_found(name, version)
        return model

    @rpc_method
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:  # type: ignore[override]
        model = self.registry.ready(request.name, request.version)
        meta = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name, versions=[VERSION], platform=model.platform,
            inputs=[meta(name=t.name, datatype=t.datatype, shape=t.shape) for t in model.inputs()],
            outputs=[meta(name=t.name, datatype=t.datatype, shape=t.shape) for t in model.outputs()],
        )

    @rpc_method
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:  # type: ignore[override]
        model = self.registry.ready(request.name, request.version)
        config = pb.ModelConfig(
            name=model.name, platform=model.platform, backend="spacer", max_batch_size=0,
            input=[pb.ModelInput(name=t.name, data_type=_DATA_TYPE[t.datatype], dims=t.shape,
                                 optional=t.optional) for t in model.inputs()],
            output=[pb.ModelOutput(name=t.name, data_type=_DATA_TYPE[t.datatype], dims=t.shape)
                    for t in model.outputs()],
        )
        for key, value in model.files.items():
            config.parameters[key].string_value = value
        if model.classes:
            config.parameters["classes"].string_value = ",".join(str(c) for c in model.classes)
        return pb.ModelConfigResponse(config=config)

    @rpc_method
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Context) -> pb.ModelStatisticsResponse:  # type: ignore[override]
        if request.name:
            names = [self._known(request.name, request.version).name]
        else:
            names = [m.name for m in self.registry if m.ready]
        response = pb.ModelStatisticsResponse()
        for name in names:
            entry = self.stats.get(name, VERSION)
            stats = response.model_stats.add(
                name=name, version=VERSION, last_inference=entry.last_inference_ms,
                inference_count=entry.inference_count, execution_count=entry.execution_count)
            for stage in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
                value = getattr(entry, stage)
                getattr(stats.inference_stats, stage).CopyFrom(
                    pb.StatisticDuration(count=value.count, ns=value.ns))
        return response

    # ------------------------------------------------------------ repository

    @rpc_method
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context) -> pb.RepositoryIndexResponse:  # type: ignore[override]
        self.registry.rescan()
        index = pb.RepositoryIndexResponse.ModelIndex
        models = [m for m in self.registry if m.ready or not request.ready]
        return pb.RepositoryIndexResponse(models=[
            index(name=m.name, version=VERSION if m.kind != "invalid" else "",
                  state="READY" if m.ready else "UNAVAILABLE", reason=m.reason)
            for m in models])

    @rpc_method
    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest, context: Context) -> pb.RepositoryModelLoadResponse:  # type: ignore[override]
        name = request.model_name
        if not name:
            raise invalid("model_name is required")
        config = _parameter(request.parameters, "config")
        if config is not None and not isinstance(config, str):
            config = config.decode() if isinstance(config, bytes) else None
        for key in request.parameters:
            if key.startswith("file:"):
                raise invalid("file: parameters (model files sent inline) are not supported;"
                              " name files inside the data roots in the config instead")
        lock = self._loading.setdefault(name, asyncio.Lock())
        async with lock:
            model = self.registry.candidate(name, config)
            await self._load(model)
            self.registry.put(model)
        return pb.RepositoryModelLoadResponse()

    async def _load(self, model: Model) -> None:
        """Load through the Engine (storage policy, hashes, network build) and fill in shapes."""
        if model.kind == "extractor":
            assert model.extractor is not None
            loaded = await self.engine.load_extractor(model.extractor)
            model.feature_dim = int(model.extractor.feature_dim)
            model.files = {f"file.{key}": loc.key for key, loc in model.extractor.data_locations.items()}
            model.files["class_path"] = type(model.extractor).__module__ + "." + type(model.extractor).__name__
        else:
            assert model.classifier_loc is not None
            loaded = await self.engine.load_classifier(model.classifier_loc)
            model.feature_dim = int(loaded.feature_dim) or -1
            model.classes = tuple(loaded.classes)
            model.files = {"file.classifier": model.classifier_loc.key}
        model.ready, model.reason = True, ""
        logger.info("OIP model %s loaded (%s)", model.name, loaded.name)

    @rpc_method
    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest, context: Context) -> pb.RepositoryModelUnloadResponse:  # type: ignore[override]
        model = self.registry.unload(request.model_name)
        if model.kind == "classifier" and model.classifier_loc is not None:
            self.engine.runtime.forget_classifier(model.classifier_loc)
        return pb.RepositoryModelUnloadResponse()

    # ------------------------------------------------------------ inference

    @rpc_method
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:  # type: ignore[override]
        priority = request_priority(request, call_priority(context, Priority.INTERACTIVE))
        return await self._infer(request, priority, call_deadline(context), stream=False)

    @rpc_method
    async def ModelStreamInfer(  # type: ignore[override]
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Responses in completion order, each with its request's id; a failed request
        yields an error_message and the stream goes on."""
        window = asyncio.Semaphore(self.engine.config.stream_window)
        results: asyncio.Queue[Any] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()
        end = object()
        stream_priority = call_priority(context, Priority.BULK)
        deadline = call_deadline(context)

        async def one(req: pb.ModelInferRequest) -> None:
            try:
                priority = request_priority(req, stream_priority)
                response = pb.ModelStreamInferResponse(
                    infer_response=await self._infer(req, priority, deadline, stream=True))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                code, message = describe(exc)
                prefix = f"[request id: {req.id}] " if req.id else ""
                response = pb.ModelStreamInferResponse(
                    error_message=f"{prefix}{message}",
                    infer_response=pb.ModelInferResponse(
                        model_name=req.model_name, model_version=req.model_version, id=req.id))
            finally:
                window.release()
            await results.put(response)

        async def read() -> None:
            try:
                async for req in request_iterator:
                    await window.acquire()
                    task = asyncio.create_task(one(req))
                    running.add(task)
                    task.add_done_callback(running.discard)
                if running:
                    await asyncio.gather(*list(running))
                await results.put(end)
            except Exception as exc:
                await results.put(exc)

        reader = asyncio.create_task(read())
        try:
            while True:
                item = await results.get()
                if item is end:
                    break
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    async def _infer(self, request: pb.ModelInferRequest, priority: int,
                     call_deadline: float | None, *, stream: bool) -> pb.ModelInferResponse:
        model = self.registry.ready(request.model_name, request.model_version)
        timer = Timer()
        ok, count = False, 0
        try:
            priority = self.engine.priority(priority)
            deadline = request_deadline(request, call_deadline)
            inputs = tensors.read_inputs(request, model.inputs(), model.name)
            requested = [o.name for o in request.outputs]
            known = {t.name for t in model.outputs()}
            for name in requested:
                if name not in known:
                    raise invalid(f"unexpected inference output '{name}' for model '{model.name}'")
            timer.stage("compute_input")
            enter = self.engine.admission.enter if stream else self.engine.admission.try_enter
            async with enter(priority):
                timer.stage("queue")
                if model.kind == "classifier":
                    outputs, count = await self._classify(model, inputs, priority)
                else:
                    outputs, count = await self._image(model, request, inputs, priority, deadline)
            timer.stage("compute_infer")
            response = pb.ModelInferResponse(model_name=model.name, model_version=VERSION,
                                             id=request.id)
            for name, value in outputs.items():
                if (not requested and not (model.kind == "pipeline" and name == "FEATURES")) \
                        or name in requested:
                    tensors.add_output(response, name, value)
            timer.stage("compute_output")
            ok = True
            return response
        finally:
            self.stats.record(model.name, VERSION, timer, ok, count)

    def _image_source(self, inputs: dict[str, Any], model: str) -> tuple[DataLocation | bytes, str]:
        if ("IMAGE" in inputs) == ("IMAGE_PATH" in inputs):
            raise invalid(f"model '{model}' needs exactly one of the inputs 'IMAGE' (encoded"
                          " image) and 'IMAGE_PATH' (a location under the data roots)")
        if "IMAGE" in inputs:
            data = inputs["IMAGE"][0]
            if not data:
                raise invalid("input 'IMAGE' is empty")
            return data, ""
        path = inputs["IMAGE_PATH"][0].decode("utf-8", errors="replace")
        loc = location_from_text(path)
        return loc, loc.key

    def _named(self, request: Any, inputs: dict[str, Any], what: str, kind: str) -> Model:
        value = _parameter(request.parameters, what)
        tensor = inputs.get(what.upper())
        if tensor is not None:
            value = tensor[0].decode("utf-8", errors="replace")
        if not isinstance(value, str) or not value:
            raise invalid(f"model '{PIPELINE}' needs the {what} to use: a request parameter"
                          f" '{what}' or an input '{what.upper()}' naming a loaded {kind} model")
        model = self.registry.ready(value)
        if model.kind != kind:
            raise invalid(f"{what} '{value}' is a {model.kind} model, not an {kind}"
                          if kind == "extractor" else
                          f"{what} '{value}' is a {model.kind} model, not a {kind}")
        return model

    async def _image(self, model: Model, request: Any, inputs: dict[str, Any], priority: int,
                     deadline: float | None) -> tuple[dict[str, Any], int]:
        points = inputs["POINTS"]
        rowcols = [(int(r), int(c)) for r, c in points.tolist()]
        if not rowcols:
            raise invalid("input 'POINTS' is empty; give at least one (row, col)")
        image, key = self._image_source(inputs, model.name)
        if model.kind == "extractor":
            extractor, classifier_loc = model, None
        else:
            extractor = self._named(request, inputs, "extractor", "extractor")
            classifier_loc = self._named(request, inputs, "classifier", "classifier").classifier_loc
        assert extractor.extractor is not None
        job = ImageJob(extractor.extractor, rowcols, image, key or request.id or "IMAGE",
                       classifier_loc=classifier_loc)
        result = await self.engine.run_image(job, priority=priority, deadline=deadline)
        features = np.asarray(result.features, dtype=np.float32)
        if model.kind == "extractor":
            return {"FEATURES": features}, len(rowcols)
        assert result.scores is not None and result.classes is not None
        return self._scored(result.scores, result.classes, features), len(rowcols)

    @staticmethod
    def _scored(scores: Any, classes: Any, features: Any = None) -> dict[str, Any]:
        scores = np.asarray(scores, dtype=np.float32)
        labels = _labels(classes)
        out = {"SCORES": scores, "LABELS": labels,
               "PREDICTIONS": [labels[i] for i in np.argmax(scores, axis=1)]}
        if features is not None:
            out["FEATURES"] = features
        return out

    async def _classify(self, model: Model, inputs: dict[str, Any],
                        priority: int) -> tuple[dict[str, Any], int]:
        features = np.asarray(inputs["FEATURES"], dtype=np.float32)
        if len(features) == 0:
            raise invalid("input 'FEATURES' is empty; give at least one row")
        loc = model.classifier_loc
        assert loc is not None

        def score() -> tuple[Any, Any]:
            clf = self.engine.runtime.classifier(loc)
            return pipeline.score(clf, features, model.name), clf.classes_.tolist()

        scores, classes = await self.engine.call(score, priority=priority)
        return self._scored(scores, classes), len(features)


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
