"""spacer.v1.Spacer: validate, translate, call spacer_core, translate back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc

from server import convert, metrics
from server._proto.spacer.v1 import spacer_pb2 as pb
from server._proto.spacer.v1 import spacer_pb2_grpc as pb_grpc
from server.dataplane import Engine, MemoryHold, TrainProgress
from server.errors import RequestError, describe, invalid, request_locations
from server.streams import windowed
from spacer_core.data_classes import parse_json
from spacer_core.messages import ClassifyFeaturesMsg
from spacer_core.pipeline import ImageJob
from spacer_core.storage import require_writable

logger = logging.getLogger(__name__)
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


def inline_size(job: ImageJob) -> int:
    """Bytes of a job's inline image (0 for an image read from storage)."""
    return len(job.image) if isinstance(job.image, bytes) else 0


def request_inline_size(request: Any) -> int:
    """Bytes of a request's inline image, 0 for none; reads a transient copy (protobuf hands out copies)."""
    return len(request.image_bytes) if request.WhichOneof("image") == "image_bytes" else 0


def call_deadline(context: Any) -> float | None:
    """The call's deadline as a time.monotonic() instant; None when the client set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class SpacerServicer(pb_grpc.SpacerServicer):
    """The Spacer service: translate requests, call the data plane (`engine`), translate back.

    Failures are mapped to statuses, and calls logged, by `server.interceptors`.
    """

    def __init__(self, engine: Engine):
        self.engine = engine

    def _check_sizes(self, request: Any) -> None:
        convert.check_sizes(request, self.engine.runtime.settings.limits)

    async def _classify_one(
        self, req: pb.ClassifyImageRequest, priority: int, deadline: float | None, *, wait: bool
    ) -> pb.ClassifyResponse:
        self._check_sizes(req)
        job = convert.image_job(req, classify=True)
        size = inline_size(job)
        # A stream's request was charged as it was read; a unary call's is charged here, before any
        # await, from the job's own copy of the bytes (reading the field again would copy them).
        charged = contextlib.nullcontext() if wait else self.engine.received(size, priority, wait=False)
        async with charged:
            result = await self.engine.run_image(
                job, priority=priority, deadline=deadline, wait=wait, prepaid=size
            )
        return convert.classify_response(result, req.job_token)

    # ------------------------------------------------------------ unary

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
        decide = self.engine.priorities(context.invocation_metadata(), stream=False)
        priority = decide(convert.request_priority(request))
        size = inline_size(job)
        async with self.engine.received(size, priority, wait=False), self.engine.admit(priority, wait=False):
            result = await self.engine.run_image(
                job, priority=priority, deadline=call_deadline(context), wait=False, prepaid=size
            )
        return pb.ExtractFeaturesResponse(
            job_token=request.job_token,
            extractor_loaded_remotely=result.loaded_remotely,
            runtime=float(result.runtime),
            features=convert.features_proto(result) if request.return_features else None,
        )

    async def ClassifyFeatures(
        self, request: pb.ClassifyFeaturesRequest, context: Context
    ) -> pb.ClassifyResponse:  # type: ignore[override]
        self._check_sizes(request)
        msg = ClassifyFeaturesMsg(
            job_token=request.job_token,
            feature_loc=convert.location(request.feature_loc, "feature_loc"),
            classifier_loc=convert.location(request.classifier_loc, "classifier_loc"),
        )
        result = await self.engine.classify_features(msg)
        return convert.classify_return_response(result, request.job_token)

    async def ClassifyImage(self, request: pb.ClassifyImageRequest, context: Context) -> pb.ClassifyResponse:  # type: ignore[override]
        decide = self.engine.priorities(context.invocation_metadata(), stream=False)
        priority = decide(convert.request_priority(request))
        async with self.engine.admit(priority, wait=False):
            return await self._classify_one(request, priority, call_deadline(context), wait=False)

    async def RunJob(self, request: pb.RunJobRequest, context: Context) -> pb.RunJobResponse:  # type: ignore[override]
        self.engine.runtime.settings.limits.check_job_text(request.job_msg_json)
        # Parsed off the event loop: other calls keep being served meanwhile.
        data = await asyncio.to_thread(parse_json, request.job_msg_json, "job_msg_json is not JSON")
        if not isinstance(data, dict):
            raise invalid("job_msg_json must be a JSON object (a pyspacer JobMsg)")
        convert.check_json_trainers(data)
        result = await self.engine.run_job(data, deadline=call_deadline(context))
        return pb.RunJobResponse(
            job_return_msg_json=json.dumps(result.serialize()),
            ok=bool(result.ok),
            error_message=result.error_message or "",
        )

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

    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:  # type: ignore[override]
        models = self.engine.models()
        return pb.ListModelsResponse(models=[convert.loaded_proto(m) for m in models])

    # ------------------------------------------------------------ streams

    async def ClassifyImages(  # type: ignore[override]
        self, request_iterator: AsyncIterator[pb.ClassifyImageRequest], context: Context
    ) -> AsyncIterator[pb.ClassifyImagesResponse]:
        """Results are yielded as images finish; a failed image yields an error item."""
        decide = self.engine.priorities(context.invocation_metadata(), stream=True)
        deadline = call_deadline(context)

        async def receive(req: pb.ClassifyImageRequest) -> MemoryHold:
            # Charged as each request is read; while it waits for room the stream reads no more.
            try:
                priority = decide(convert.request_priority(req))
            except RequestError:
                priority = decide(None)  # `one` answers the bad field as this item's error
            return await self.engine.receive(request_inline_size(req), priority, wait=True)

        async def one(req: pb.ClassifyImageRequest) -> pb.ClassifyImagesResponse:
            try:
                priority = decide(convert.request_priority(req))
                async with self.engine.admit(priority, wait=True):
                    return pb.ClassifyImagesResponse(
                        job_token=req.job_token,
                        result=await self._classify_one(req, priority, deadline, wait=True),
                    )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                code, message = describe(exc, req.job_token, request_locations(req))
                metrics.item_failed(code.name, message, req.job_token)
                return pb.ClassifyImagesResponse(
                    job_token=req.job_token,
                    error=pb.Error(code=code.value[0], code_name=code.name, message=message),
                )

        async for response in windowed(
            request_iterator,
            one,
            self.engine.config.stream_window,
            receive=receive,
            release=self.engine.release,
        ):
            yield response

    async def TrainClassifier(  # type: ignore[override]
        self, request: pb.TrainClassifierRequest, context: Context
    ) -> AsyncIterator[pb.TrainClassifierResponse]:
        """Streams one TrainProgress per epoch, then the TrainResult."""
        self._check_sizes(request)
        msg = convert.train_msg(request, request.trainer or "minibatch")
        result = None
        # Closed as soon as the call ends, so training stops at its next epoch.
        async with contextlib.aclosing(self.engine.train(msg, deadline=call_deadline(context))) as events:
            async for event in events:
                if not isinstance(event, TrainProgress):
                    result = event
                    continue
                progress = pb.TrainProgress(
                    epoch=event.epoch,
                    nbr_epochs=request.nbr_epochs,
                    ref_accuracy=event.ref_accuracy,
                    elapsed=event.elapsed,
                )
                yield pb.TrainClassifierResponse(job_token=request.job_token, progress=progress)
        assert result is not None  # the data plane's last event, or it raised
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
