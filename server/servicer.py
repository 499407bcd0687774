"""spacer.v1.Spacer: validate, translate, call spacer_core, translate back."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc

from server import convert
from server._proto.spacer.v1 import spacer_pb2 as pb
from server._proto.spacer.v1 import spacer_pb2_grpc as pb_grpc
from server.engine import Engine
from server.errors import describe, invalid, request_locations, rpc_method
from server.security import redact_job_error
from server.streams import windowed
from spacer_core import tasks
from spacer_core.data_classes import parse_json
from spacer_core.exceptions import InvalidInputError
from spacer_core.inference import Priority
from spacer_core.messages import ClassifyFeaturesMsg, JobMsg
from spacer_core.storage import require_writable

logger = logging.getLogger(__name__)
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


class TrainingCancelled(Exception):
    """Raised from the progress callback to stop a training whose call ended."""


_PRIORITY_FIELD = {pb.PRIORITY_INTERACTIVE: Priority.INTERACTIVE, pb.PRIORITY_BULK: Priority.BULK}
_PRIORITY_METADATA = {"interactive": Priority.INTERACTIVE, "bulk": Priority.BULK}


def call_priority(context: Any, default: Priority) -> Priority:
    """The call's `x-priority` metadata ("interactive" or "bulk"), else `default`."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-priority":
            text = value.decode() if isinstance(value, bytes) else str(value)
            if text.strip().lower() not in _PRIORITY_METADATA:
                raise invalid(f"x-priority metadata must be 'interactive' or 'bulk', got {text!r}")
            return _PRIORITY_METADATA[text.strip().lower()]
    return default


def request_priority(request: Any, fallback: Priority) -> Priority:
    """The request's priority field; `fallback` (the call's priority) when unspecified."""
    return _PRIORITY_FIELD.get(request.priority, fallback)


def call_deadline(context: Any) -> float | None:
    """The call's deadline as a time.monotonic() instant; None when the client set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class SpacerServicer(pb_grpc.SpacerServicer):
    """The Spacer service: translate requests, call the library through `engine`, translate back."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def _check_sizes(self, request: Any) -> None:
        convert.check_sizes(request, self.engine.runtime.settings.limits)

    async def _classify_one(
        self, req: pb.ClassifyImageRequest, priority: int, deadline: float | None, *, wait: bool
    ) -> pb.ClassifyResponse:
        self._check_sizes(req)
        job = convert.image_job(req, classify=True)
        result = await self.engine.run_image(job, priority=priority, deadline=deadline, wait=wait)
        return convert.classify_response(result, req.job_token)

    # ------------------------------------------------------------ unary

    @rpc_method
    async def ExtractFeatures(
        self, request: pb.ExtractFeaturesRequest, context: Context
    ) -> pb.ExtractFeaturesResponse:  # type: ignore[override]
        self._check_sizes(request)
        feature_loc = convert.optional_location(request, "feature_loc")
        if feature_loc is None and not request.return_features:
            raise invalid("feature_loc is required unless return_features is set")
        if feature_loc is not None:
            with convert.field("feature_loc"):
                require_writable(feature_loc)
        job = convert.image_job(request, feature_loc=feature_loc)
        priority = self.engine.priority(
            request_priority(request, call_priority(context, Priority.INTERACTIVE))
        )
        async with self.engine.admission.try_enter(priority):
            result = await self.engine.run_image(
                job, priority=priority, deadline=call_deadline(context), wait=False
            )
        return pb.ExtractFeaturesResponse(
            job_token=request.job_token,
            extractor_loaded_remotely=result.loaded_remotely,
            runtime=float(result.runtime),
            features=convert.features_proto(result) if request.return_features else None,
        )

    @rpc_method
    async def ClassifyFeatures(
        self, request: pb.ClassifyFeaturesRequest, context: Context
    ) -> pb.ClassifyResponse:  # type: ignore[override]
        self._check_sizes(request)
        msg = ClassifyFeaturesMsg(
            job_token=request.job_token,
            feature_loc=convert.location(request.feature_loc, "feature_loc"),
            classifier_loc=convert.location(request.classifier_loc, "classifier_loc"),
        )
        result = await self.engine.call(tasks.classify_features, msg)
        return convert.classify_return_response(result, request.job_token)

    @rpc_method
    async def ClassifyImage(self, request: pb.ClassifyImageRequest, context: Context) -> pb.ClassifyResponse:  # type: ignore[override]
        priority = self.engine.priority(
            request_priority(request, call_priority(context, Priority.INTERACTIVE))
        )
        async with self.engine.admission.try_enter(priority):
            return await self._classify_one(request, priority, call_deadline(context), wait=False)

    @rpc_method
    async def RunJob(self, request: pb.RunJobRequest, context: Context) -> pb.RunJobResponse:  # type: ignore[override]
        data = parse_json(request.job_msg_json, "job_msg_json is not JSON")
        if not isinstance(data, dict):
            raise invalid("job_msg_json must be a JSON object (a pyspacer JobMsg)")
        convert.check_json_trainers(data)
        self.engine.runtime.settings.limits.check_json(data)
        try:
            job = JobMsg.deserialize(data)
        except (AssertionError, InvalidInputError) as exc:
            raise invalid(f"job_msg_json is not a valid JobMsg: {exc}") from None
        limits = self.engine.runtime.settings.limits
        for i, task in enumerate(job.tasks):
            limits.check_task(task, f"job_msg_json.tasks[{i}]")
        result = await self.engine.call_long(tasks.process_job, job, deadline=call_deadline(context))
        if not result.ok and result.error_message:
            # The library reply carries a traceback; clients get its last line, redacted.
            tokens = ",".join(task.job_token for task in job.tasks)
            result.error_message = redact_job_error(result.error_message, tokens)
        return pb.RunJobResponse(
            job_return_msg_json=json.dumps(result.serialize()),
            ok=bool(result.ok),
            error_message=result.error_message or "",
        )

    @rpc_method
    async def LoadModel(self, request: pb.LoadModelRequest, context: Context) -> pb.LoadedModel:  # type: ignore[override]
        self._check_sizes(request)
        which = request.WhichOneof("model")
        if which == "extractor":
            model = await self.engine.load_extractor(convert.extractor(request.extractor))
        elif which == "classifier_loc":
            loc = convert.location(request.classifier_loc, "classifier_loc")
            model = await self.engine.load_classifier(loc)
        else:
            raise invalid("set extractor or classifier_loc")
        return convert.loaded_proto(model)

    @rpc_method
    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:  # type: ignore[override]
        models = self.engine.runtime.loaded_models()
        return pb.ListModelsResponse(models=[convert.loaded_proto(m) for m in models])

    # ------------------------------------------------------------ streams

    @rpc_method
    async def ClassifyImages(  # type: ignore[override]
        self, request_iterator: AsyncIterator[pb.ClassifyImageRequest], context: Context
    ) -> AsyncIterator[pb.ClassifyImagesResponse]:
        """Results are yielded as images finish; a failed image yields an error item."""
        stream_priority = call_priority(context, Priority.BULK)
        deadline = call_deadline(context)

        async def one(req: pb.ClassifyImageRequest) -> pb.ClassifyImagesResponse:
            try:
                priority = self.engine.priority(request_priority(req, stream_priority))
                async with self.engine.admission.enter(priority):
                    return pb.ClassifyImagesResponse(
                        job_token=req.job_token,
                        result=await self._classify_one(req, priority, deadline, wait=True),
                    )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                code, message = describe(exc, req.job_token, request_locations(req))
                return pb.ClassifyImagesResponse(
                    job_token=req.job_token,
                    error=pb.Error(code=code.value[0], code_name=code.name, message=message),
                )

        async for response in windowed(request_iterator, one, self.engine.config.stream_window):
            yield response

    @rpc_method
    async def TrainClassifier(  # type: ignore[override]
        self, request: pb.TrainClassifierRequest, context: Context
    ) -> AsyncIterator[pb.TrainClassifierResponse]:
        """Streams one TrainProgress per epoch, then the TrainResult."""
        self._check_sizes(request)
        msg = convert.train_msg(request, request.trainer or "minibatch")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[pb.TrainProgress] = asyncio.Queue()
        stop = threading.Event()

        def progress(epoch: int, ref_accuracy: float, elapsed: float) -> None:
            # The trainer's callback, run in the training thread after each
            # epoch (0-based); a cancelled call stops training here.
            if stop.is_set():
                raise TrainingCancelled(f"{request.job_token}: training cancelled")
            update = pb.TrainProgress(
                epoch=int(epoch) + 1,
                nbr_epochs=request.nbr_epochs,
                ref_accuracy=float(ref_accuracy),
                elapsed=float(elapsed),
            )
            loop.call_soon_threadsafe(events.put_nowait, update)

        self.engine.runtime.settings.limits.check_task(msg)
        work = asyncio.ensure_future(
            self.engine.call_long(tasks.train_classifier, msg, progress, deadline=call_deadline(context))
        )
        getter: asyncio.Future[pb.TrainProgress] | None = None
        try:
            while not work.done() or not events.empty():
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, work}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield pb.TrainClassifierResponse(job_token=request.job_token, progress=getter.result())
                getter.cancel()
            result = work.result()
        finally:
            # Call over (done, failed, cancelled or past its deadline): stop training.
            stop.set()
            work.cancel()
            if getter is not None:
                getter.cancel()
        yield pb.TrainClassifierResponse(
            job_token=request.job_token,
            result=pb.TrainResult(
                acc=float(result.acc),
                pc_accs=[float(a) for a in result.pc_accs],
                ref_accs=[float(a) for a in result.ref_accs],
                runtime=float(result.runtime),
                model_loc=request.model_loc,
                valresult_loc=request.valresult_loc,
            ),
        )


def add_to_server(servicer: SpacerServicer, server: grpc.aio.Server) -> None:
    pb_grpc.add_SpacerServicer_to_server(servicer, server)
