"""Translation between spacer.v1 protobuf messages and spacer_core's types.

Checks of meaning (storage types, buckets, points, limits, paths) live in
spacer_core; this module only reports which request field a library error
was about and builds the replies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from google.protobuf.message import Message

from server._proto.spacer.v1 import spacer_pb2 as pb
from server.errors import as_location, invalid, message_type_reaches
from spacer_core.data_classes import DataLocation, ImageLabels, LabelId
from spacer_core.exceptions import InvalidInputError
from spacer_core.extractors import FeatureExtractor, resolve_class_path
from spacer_core.inference import Priority
from spacer_core.limits import Limits
from spacer_core.messages import ClassifyReturnMsg, TrainClassifierMsg, TrainingTaskLabels
from spacer_core.pipeline import ImageJob, ImageResult
from spacer_core.runtime import LoadedModel
from spacer_core.train_classifier import is_registered_trainer


@contextlib.contextmanager
def field(what: str) -> Iterator[None]:
    """Name the request field in a library InvalidInputError raised inside."""
    try:
        yield
    except InvalidInputError as exc:
        raise invalid(f"{what}: {exc}") from None


_PRIORITY_FIELD = {pb.PRIORITY_INTERACTIVE: Priority.INTERACTIVE, pb.PRIORITY_BULK: Priority.BULK}


def request_priority(request: Any) -> Priority | None:
    """The request's priority field; None when unspecified (the call's then decides).

    An enum value the schema does not define (a newer client's, or a bogus
    number) is refused like a bogus x-priority header, not quietly ignored.
    """
    value = request.priority
    if value == pb.PRIORITY_UNSPECIFIED:
        return None
    if value not in _PRIORITY_FIELD:
        raise invalid(
            f"priority: {value} is not a Priority (PRIORITY_UNSPECIFIED, PRIORITY_INTERACTIVE or PRIORITY_BULK)"
        )
    return _PRIORITY_FIELD[value]


def check_counts(msg: Message, limits: Limits) -> None:
    """Check a request's point and annotation counts from its list lengths alone.

    Runs before anything walks or converts those lists, so an oversized
    request costs a few length reads, not a pass over every item.
    """
    if isinstance(msg, (pb.ClassifyImageRequest, pb.ExtractFeaturesRequest)):
        image = msg.image_loc.key if msg.WhichOneof("image") == "image_loc" else "image_bytes"
        limits.check_point_count(len(msg.rowcols), "rowcols", image)
    elif isinstance(msg, pb.TrainClassifierRequest):
        per_image = [
            (f"labels.{name}.images[{i}].annotations", len(image.annotations))
            for name in ("train", "ref", "val")
            for i, image in enumerate(getattr(msg.labels, name).images)
        ]
        limits.check_training_counts(per_image, "labels")


_NAMED: dict[str, bool] = {}


def _holds_names(desc: Any) -> bool:
    """Whether messages of this type can hold a `job_token` or `key` string, at any depth."""
    return message_type_reaches(desc, lambda field: field.name in ("job_token", "key"), _NAMED)


def check_sizes(msg: Message, limits: Limits, where: str = "") -> None:
    """Check a request's counts, then every `job_token` and location `key` in it, before any work.

    Lists of messages that cannot hold either (points, annotations) are
    not walked.
    """
    check_counts(msg, limits)
    stack: list[tuple[str, Message]] = [(where, msg)]
    while stack:
        path, item = stack.pop()
        for desc, value in item.ListFields():
            name = f"{path}.{desc.name}" if path else desc.name
            if desc.name == "job_token" and isinstance(value, str):
                limits.check_token(value, name)
            elif desc.name == "key" and isinstance(value, str):
                limits.check_key(value, name)
            elif desc.type == desc.TYPE_MESSAGE and _holds_names(desc.message_type):
                if desc.message_type.GetOptions().map_entry:
                    stack.extend(
                        (f"{name}[{k!r}]", child) for k, child in value.items() if isinstance(child, Message)
                    )
                elif desc.is_repeated:
                    stack.extend((f"{name}[{i}]", child) for i, child in enumerate(value))
                else:
                    stack.append((name, value))


def location(loc: pb.DataLocation, what: str) -> DataLocation:
    """A DataLocation from `loc`; `what` names the field in errors.

    Built with `server.errors.as_location`, as `request_locations` builds
    its field map, so a library error's `location` names its field.
    """
    if not loc.storage_type and not loc.key:
        raise invalid(f"{what} is required")
    if not loc.key:
        raise invalid(f"{what}: key is empty")
    with field(what):
        return as_location(loc)


def optional_location(parent: Message, name: str) -> DataLocation | None:
    """The DataLocation in parent.<name>, or None when the field is unset."""
    return location(getattr(parent, name), name) if parent.HasField(name) else None


def extractor(ext: pb.Extractor) -> FeatureExtractor:
    """The FeatureExtractor a request describes (class paths: ours, pyspacer's or registered)."""
    if not ext.class_path:
        raise invalid("extractor.class_path is required")
    with field("extractor.class_path"):
        cls = resolve_class_path(ext.class_path)
    locations = {
        name: location(loc, f"extractor.data_locations[{name}]") for name, loc in ext.data_locations.items()
    }
    with field("extractor"):
        return cls(data_locations=locations, data_hashes=dict(ext.data_hashes))


def image_job(
    req: pb.ExtractFeaturesRequest | pb.ClassifyImageRequest,
    *,
    feature_loc: DataLocation | None = None,
    classify: bool = False,
) -> ImageJob:
    """The pipeline job for one image request; inline bytes go to the pipeline as they are.

    With `classify`, the request's classifier_loc scores the features.
    """
    source = req.WhichOneof("image")
    if source == "image_loc":
        loc = location(req.image_loc, "image_loc")
        image: DataLocation | bytes = loc
        name = loc.key
    elif source == "image_bytes":
        if not req.image_bytes:
            raise invalid("image_bytes is empty")
        # Named by its field: the RPC puts the job token before every error message.
        image, name = req.image_bytes, "image_bytes"
    else:
        raise invalid("an image is required: set image_loc or image_bytes")
    rowcols = [(p.row, p.col) for p in req.rowcols]
    if not rowcols:
        raise invalid("rowcols is empty; give at least one (row, col)")
    if not req.HasField("extractor"):
        raise invalid("extractor is required")
    classifier_loc = location(req.classifier_loc, "classifier_loc") if classify else None
    return ImageJob(
        extractor(req.extractor), rowcols, image, name, feature_loc=feature_loc, classifier_loc=classifier_loc
    )


def labels(images: pb.ImageLabels, what: str) -> ImageLabels:
    data: dict[DataLocation, list[tuple[int, int, int | str]]] = {}
    for i, image in enumerate(images.images):
        loc = location(image.feature_loc, f"labels.{what}.images[{i}].feature_loc")
        annotations = data.setdefault(loc, [])
        for j, ann in enumerate(image.annotations):
            if not ann.HasField("label") or ann.label.WhichOneof("value") is None:
                raise invalid(
                    f"labels.{what}: point ({ann.row}, {ann.col}) of {loc.key} has no label (annotation {j})"
                )
            annotations.append((ann.row, ann.col, label_value(ann.label)))
    return ImageLabels(data)


def check_trainer(name: str, what: str = "trainer") -> None:
    """Refuse a trainer that is not built in or registered, before anything imports it.

    Library callers may name any importable class path, as in pyspacer;
    a client must not make the server import a module of its choice.
    """
    if not is_registered_trainer(name):
        raise invalid(
            f"{what}: unknown trainer {name!r}; the server accepts 'minibatch' and"
            " trainers registered with register_trainer_class()"
        )


def check_json_trainers(data: Any) -> None:
    """Apply check_trainer to every trainer a pyspacer JSON job names."""
    tasks = data.get("tasks") if isinstance(data, dict) else None
    for i, task in enumerate(tasks if isinstance(tasks, list) else []):
        if not isinstance(task, dict):
            continue
        what = f"tasks[{i}]"
        if "trainer_name" in task:
            check_trainer(str(task["trainer_name"]), f"{what}.trainer_name")
        trainer = task.get("trainer")
        if isinstance(trainer, dict):
            check_trainer(str(trainer.get("class_path", "")), f"{what}.trainer.class_path")
        elif trainer is not None:
            check_trainer(str(trainer), f"{what}.trainer")


def train_msg(req: pb.TrainClassifierRequest, trainer: str) -> TrainClassifierMsg:
    """The library's training message; `trainer` is already resolved by the caller's rules.

    A trainer given by name must be built in or registered (see check_trainer).
    """
    if req.nbr_epochs < 1:
        raise invalid(f"nbr_epochs must be >= 1, got {req.nbr_epochs}")
    if not req.HasField("labels"):
        raise invalid("labels is required (train, ref and val sets)")
    if isinstance(trainer, str):
        check_trainer(trainer)
    for name in ("train", "ref", "val"):
        if not any(image.annotations for image in getattr(req.labels, name).images):
            # The library would only say how many classes were left after preprocessing.
            raise invalid(f"labels.{name}: no annotated images; train, ref and val each need some")
    task_labels = TrainingTaskLabels(
        train=labels(req.labels.train, "train"),
        ref=labels(req.labels.ref, "ref"),
        val=labels(req.labels.val, "val"),
    )
    with field("train request"):
        return TrainClassifierMsg(
            job_token=req.job_token,
            trainer=trainer,
            nbr_epochs=req.nbr_epochs,
            clf_type=req.clf_type,
            labels=task_labels,
            previous_model_locs=[
                location(loc, f"previous_model_locs[{i}]") for i, loc in enumerate(req.previous_model_locs)
            ],
            model_loc=location(req.model_loc, "model_loc"),
            valresult_loc=location(req.valresult_loc, "valresult_loc"),
            feature_cache_dir=req.feature_cache_dir or TrainClassifierMsg.FeatureCache.AUTO,
        )


# ---------------------------------------------------------------- replies


def label_value(label: pb.Label) -> int | str:
    return label.id if label.WhichOneof("value") == "id" else label.name


def label_proto(value: LabelId) -> pb.Label:
    if isinstance(value, str):
        return pb.Label(name=value)
    return pb.Label(id=int(value))


def _point_scores(
    rowcols: Sequence[tuple[int | None, int | None]], scores: np.ndarray | list[list[float]]
) -> list[pb.PointScores]:
    return [
        pb.PointScores(row=int(row or 0), col=int(col or 0), scores=row_scores)
        for (row, col), row_scores in zip(rowcols, np.asarray(scores, np.float64).tolist())
    ]


def classify_response(result: ImageResult, job_token: str) -> pb.ClassifyResponse:
    """An image's scores -> ClassifyResponse."""
    assert result.scores is not None and result.classes is not None
    return pb.ClassifyResponse(
        job_token=job_token,
        runtime=float(result.runtime),
        scores=_point_scores(result.rowcols, result.scores),
        classes=[label_proto(c) for c in result.classes],
        valid_rowcol=True,
    )


def classify_return_response(msg: ClassifyReturnMsg, job_token: str) -> pb.ClassifyResponse:
    """pyspacer's ClassifyReturnMsg (from classify_features) -> ClassifyResponse."""
    return pb.ClassifyResponse(
        job_token=job_token,
        runtime=float(msg.runtime),
        scores=_point_scores([(r, c) for r, c, _ in msg.scores], [s for _, _, s in msg.scores]),
        classes=[label_proto(c) for c in msg.classes],
        valid_rowcol=bool(msg.valid_rowcol),
    )


def features_proto(result: ImageResult) -> pb.ImageFeatures:
    """An image's features -> ImageFeatures (float32, packed)."""
    features = np.asarray(result.features, dtype=np.float32)
    return pb.ImageFeatures(
        point_features=[
            pb.PointFeatures(row=int(r), col=int(c), data=row)
            for (r, c), row in zip(result.rowcols, features.tolist())
        ],
        valid_rowcol=True,
        feature_dim=int(features.shape[1]),
        npoints=int(features.shape[0]),
    )


def loaded_proto(model: LoadedModel) -> pb.LoadedModel:
    return pb.LoadedModel(
        kind=model.kind,
        name=model.name,
        classes=[label_proto(c) for c in model.classes],
        feature_dim=model.feature_dim,
        load_seconds=model.load_seconds,
        extractor_class=model.extractor_class,
        weights_sha256=model.weights_sha256,
        loaded_by=model.loaded_by,
        last_used=model.last_used,
    )
