"""What OIP requests do: run a model through the Engine, load and unload models.

The servicer (server/oip/servicer.py) only converts the protocol's messages
and calls this; every image goes through `Engine.run_image`, as spacer.v1's
do, under the same admission, priorities, batcher, storage policy and limits.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from server import metrics
from server._proto.inference import grpc_service_pb2 as pb
from server.dataplane import Engine
from server.errors import invalid
from server.oip import tensors
from server.oip.models import PIPELINE, VERSION, Model, Registry, location_from_text
from server.oip.stats import Stats, Timer
from spacer_core import pipeline
from spacer_core.data_classes import DataLocation
from spacer_core.inference import Priority
from spacer_core.pipeline import ImageJob

logger = logging.getLogger(__name__)


def parameter(params: Any, name: str) -> Any:
    """A request parameter's value, whichever field of the oneof carries it; None when absent."""
    if name not in params:
        return None
    value = params[name]
    which = value.WhichOneof("parameter_choice")
    return None if which is None else getattr(value, which)


def request_priority(request: Any) -> Priority | None:
    """Triton's "priority" parameter: 0 or absent -> None (the call's), 1 -> INTERACTIVE, >1 -> BULK."""
    value = parameter(request.parameters, "priority")
    if value is None or value == 0:
        return None
    if isinstance(value, (str, bytes, float)) or value < 0:
        raise invalid(f"parameter 'priority' must be a non-negative integer, got {value!r}")
    return Priority.INTERACTIVE if value == 1 else Priority.BULK


def request_deadline(request: Any, call_deadline: float | None) -> float | None:
    """The earlier of the call's deadline and Triton's "timeout" parameter (microseconds)."""
    value = parameter(request.parameters, "timeout")
    if value is None or value == 0:
        return call_deadline
    if isinstance(value, (str, bytes, float)) or value < 0:
        raise invalid(f"parameter 'timeout' must be a non-negative integer (us), got {value!r}")
    own = time.monotonic() + value / 1e6
    return own if call_deadline is None else min(own, call_deadline)


def _labels(classes: Any) -> list[bytes]:
    return [str(c).encode() for c in classes]


class DataPlane:
    """Runs and loads the registry's models with the server's Engine; keeps their statistics."""

    def __init__(self, engine: Engine, registry: Registry):
        self.engine = engine
        self.registry = registry
        self.stats = Stats()

    async def load(self, model: Model) -> None:
        """Load through the Engine (storage policy, hashes, network build) and fill in shapes."""
        if model.kind == "extractor":
            assert model.extractor is not None
            loaded = await self.engine.load_extractor(model.extractor)
            model.feature_dim = int(model.extractor.feature_dim)
            model.files = {f"file.{key}": loc.key for key, loc in model.extractor.data_locations.items()}
            model.files["class_path"] = (
                type(model.extractor).__module__ + "." + type(model.extractor).__name__
            )
        else:
            assert model.classifier_loc is not None
            loaded = await self.engine.load_classifier(model.classifier_loc)
            model.feature_dim = int(loaded.feature_dim) or -1
            model.classes = tuple(loaded.classes)
            model.files = {"file.classifier": model.classifier_loc.key}
        model.ready, model.reason = True, ""
        logger.info("OIP model %s loaded (%s)", model.name, loaded.name)

    def unload(self, name: str) -> None:
        model = self.registry.unload(name)
        if model.source == "config":
            # A client's model leaves no statistics behind, so names tried over time
            # do not grow ModelStatistics' memory or /metrics.
            self.stats.forget(model.name, VERSION)
        if model.kind == "classifier" and model.classifier_loc is not None:
            self.engine.runtime.forget_classifier(model.classifier_loc)

    async def infer(
        self, request: pb.ModelInferRequest, priority: int, call_deadline: float | None, *, stream: bool
    ) -> pb.ModelInferResponse:
        model = self.registry.ready(request.model_name, request.model_version)
        timer = Timer()
        ok, count = False, 0
        try:
            deadline = request_deadline(request, call_deadline)
            inputs = tensors.read_inputs(
                request, model.inputs(), model.name, self.engine.runtime.settings.limits
            )
            requested = [o.name for o in request.outputs]
            known = {t.name for t in model.outputs()}
            for name in requested:
                if name not in known:
                    raise invalid(f"unexpected inference output '{name}' for model '{model.name}'")
            timer.stage("compute_input")
            async with self.engine.admit(priority, wait=stream):
                timer.stage("queue")
                if model.kind == "classifier":
                    outputs, count = await self._classify(model, inputs, priority)
                else:
                    outputs, count = await self._image(model, request, inputs, priority, deadline)
            timer.stage("compute_infer")
            response = pb.ModelInferResponse(model_name=model.name, model_version=VERSION, id=request.id)
            for name, value in outputs.items():
                if (
                    not requested and not (model.kind == "pipeline" and name == "FEATURES")
                ) or name in requested:
                    tensors.add_output(response, name, value)
            timer.stage("compute_output")
            ok = True
            return response
        finally:
            self.stats.record(model.name, VERSION, timer, ok, count)

    def _image_source(self, inputs: dict[str, Any], model: str) -> tuple[DataLocation | bytes, str]:
        if ("IMAGE" in inputs) == ("IMAGE_PATH" in inputs):
            raise invalid(
                f"model '{model}' needs exactly one of the inputs 'IMAGE' (encoded"
                " image) and 'IMAGE_PATH' (a location under the data roots)"
            )
        if "IMAGE" in inputs:
            data = inputs["IMAGE"][0]
            if not data:
                raise invalid("input 'IMAGE' is empty")
            return data, ""
        path = inputs["IMAGE_PATH"][0].decode("utf-8", errors="replace")
        loc = location_from_text(path)
        return loc, loc.key

    def _named(self, request: Any, inputs: dict[str, Any], what: str, kind: str) -> Model:
        value = parameter(request.parameters, what)
        tensor = inputs.get(what.upper())
        if tensor is not None:
            value = tensor[0].decode("utf-8", errors="replace")
        if not isinstance(value, str) or not value:
            raise invalid(
                f"model '{PIPELINE}' needs the {what} to use: a request parameter"
                f" '{what}' or an input '{what.upper()}' naming a loaded {kind} model"
            )
        model = self.registry.ready(value, what=f"{what} (parameter or input '{what.upper()}')")
        if model.kind != kind:
            raise invalid(
                f"{what} '{value}' is a {model.kind} model, not an {kind}"
                if kind == "extractor"
                else f"{what} '{value}' is a {model.kind} model, not a {kind}"
            )
        return model

    async def _image(
        self, model: Model, request: Any, inputs: dict[str, Any], priority: int, deadline: float | None
    ) -> tuple[dict[str, Any], int]:
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
        job = ImageJob(
            extractor.extractor, rowcols, image, key or request.id or "IMAGE", classifier_loc=classifier_loc
        )
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
        out = {
            "SCORES": scores,
            "LABELS": labels,
            "PREDICTIONS": [labels[i] for i in np.argmax(scores, axis=1)],
        }
        if features is not None:
            out["FEATURES"] = features
        return out

    async def _classify(
        self, model: Model, inputs: dict[str, Any], priority: int
    ) -> tuple[dict[str, Any], int]:
        features = np.asarray(inputs["FEATURES"], dtype=np.float32)
        if len(features) == 0:
            raise invalid("input 'FEATURES' is empty; give at least one row")
        loc = model.classifier_loc
        assert loc is not None

        def score() -> tuple[Any, Any]:
            clf = self.engine.runtime.classifier(loc)
            return pipeline.score(clf, features, model.name), clf.classes_.tolist()

        scores, classes = await self.engine.call(score, priority=priority)
        metrics.count_points(len(features))
        return self._scored(scores, classes), len(features)
