"""Translation between spacer.v1 protobuf messages and spacer_core's classes.

Requests are checked here (missing fields, storage types, data roots) so
that servicers only validate, translate and call spacer_core. Library
modules are imported lazily: the transport layer loads without them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from server._proto.spacer.v1 import spacer_pb2 as pb
from server.errors import DataRootError, invalid

STORAGE_TYPES = ("filesystem", "s3", "memory", "url")


class Translator:
    """Converts messages both ways; enforces the configured data roots."""

    def __init__(self, data_roots: tuple[Path, ...] = ()):
        self.data_roots = tuple(Path(os.path.realpath(r)) for r in data_roots)

    # ------------------------------------------------------------ locations

    def check_root(self, storage_type: str, key: str, what: str) -> None:
        """Raise DataRootError when a filesystem key is outside every data root."""
        if storage_type != "filesystem" or not self.data_roots:
            return
        path = Path(os.path.realpath(key))
        if not any(path.is_relative_to(root) for root in self.data_roots):
            raise DataRootError(f"{what} {key!r} is outside the server's allowed data roots")

    def location(self, loc: pb.DataLocation, what: str, *, required: bool = True) -> Any:
        """A spacer_core DataLocation from loc; `what` names the field in errors."""
        from spacer_core.data_classes import DataLocation

        if not loc.storage_type and not loc.key:
            if required:
                raise invalid(f"{what} is required")
            return None
        if loc.storage_type not in STORAGE_TYPES:
            raise invalid(
                f"{what}: storage_type must be one of {STORAGE_TYPES}, got {loc.storage_type!r}"
            )
        if not loc.key:
            raise invalid(f"{what}: key is empty")
        if loc.storage_type == "s3" and not loc.bucket_name:
            raise invalid(f"{what}: s3 storage needs bucket_name")
        self.check_root(loc.storage_type, loc.key, what)
        return DataLocation(loc.storage_type, loc.key, loc.bucket_name or None)

    def optional_location(self, parent: Any, field: str) -> Any:
        """The DataLocation in parent.field, or None when the field is unset."""
        if not parent.HasField(field):
            return None
        return self.location(getattr(parent, field), field)

    def check_json_locations(self, data: Any, what: str = "job") -> None:
        """Apply the data-root check to every location inside a pyspacer JSON message."""
        for loc in _json_locations(data):
            self.check_root(loc.get("storage_type", ""), str(loc.get("key", "")), what)

    # ------------------------------------------------------------ pieces

    def extractor(self, ext: pb.Extractor) -> Any:
        """A spacer_core FeatureExtractor from its pyspacer-style description."""
        from spacer_core.extractors import FeatureExtractor

        if not ext.class_path:
            raise invalid("extractor.class_path is required")
        data = {
            "class_path": ext.class_path,
            "data_locations": {
                name: self.location(loc, f"extractor.data_locations[{name}]").serialize()
                for name, loc in ext.data_locations.items()
            },
            "data_hashes": dict(ext.data_hashes),
        }
        try:
            return FeatureExtractor.deserialize(data)
        except (ImportError, AttributeError) as exc:
            raise invalid(f"extractor.class_path {ext.class_path!r} cannot be loaded: {exc}")

    @staticmethod
    def rowcols(points: Any, what: str = "rowcols") -> list[tuple[int, int]]:
        if not points:
            raise invalid(f"{what} is empty; give at least one (row, col)")
        return [(p.row, p.col) for p in points]

    def labels(self, labels: pb.ImageLabels, what: str) -> Any:
        from spacer_core.data_classes import ImageLabels

        data: dict[Any, list[tuple[int, int, int | str]]] = {}
        for i, image in enumerate(labels.images):
            loc = self.location(image.feature_loc, f"labels.{what}.images[{i}].feature_loc")
            annotations = data.setdefault(loc, [])
            for j, ann in enumerate(image.annotations):
                if not ann.HasField("label") or ann.label.WhichOneof("value") is None:
                    raise invalid(
                        f"labels.{what}: point ({ann.row}, {ann.col}) of {loc.key} has no label"
                        f" (annotation {j})"
                    )
                annotations.append((ann.row, ann.col, label_value(ann.label)))
        return ImageLabels(data)

    # ------------------------------------------------------------ requests

    def extract_msg(self, req: pb.ExtractFeaturesRequest, image_loc: Any, feature_loc: Any) -> Any:
        from spacer_core.messages import ExtractFeaturesMsg

        return ExtractFeaturesMsg(
            job_token=req.job_token,
            extractor=self.extractor_required(req),
            rowcols=self.rowcols(req.rowcols),
            image_loc=image_loc,
            feature_loc=feature_loc,
        )

    def classify_image_msg(self, req: pb.ClassifyImageRequest, image_loc: Any) -> Any:
        from spacer_core.messages import ClassifyImageMsg

        return ClassifyImageMsg(
            job_token=req.job_token,
            extractor=self.extractor_required(req),
            rowcols=self.rowcols(req.rowcols),
            image_loc=image_loc,
            classifier_loc=self.location(req.classifier_loc, "classifier_loc"),
        )

    def classify_features_msg(self, req: pb.ClassifyFeaturesRequest) -> Any:
        from spacer_core.messages import ClassifyFeaturesMsg

        return ClassifyFeaturesMsg(
            job_token=req.job_token,
            feature_loc=self.location(req.feature_loc, "feature_loc"),
            classifier_loc=self.location(req.classifier_loc, "classifier_loc"),
        )

    def train_msg(self, req: pb.TrainClassifierRequest) -> Any:
        from spacer_core.messages import TrainClassifierMsg, TrainingTaskLabels

        if req.nbr_epochs < 1:
            raise invalid(f"nbr_epochs must be >= 1, got {req.nbr_epochs}")
        if req.clf_type not in ("LR", "MLP"):
            raise invalid(f"clf_type must be 'LR' or 'MLP', got {req.clf_type!r}")
        if not req.HasField("labels"):
            raise invalid("labels is required (train, ref and val sets)")
        labels = TrainingTaskLabels(
            train=self.labels(req.labels.train, "train"),
            ref=self.labels(req.labels.ref, "ref"),
            val=self.labels(req.labels.val, "val"),
        )
        cache_dir = req.feature_cache_dir or TrainClassifierMsg.FeatureCache.AUTO
        return TrainClassifierMsg(
            job_token=req.job_token,
            trainer=req.trainer or "minibatch",
            nbr_epochs=req.nbr_epochs,
            clf_type=req.clf_type,
            labels=labels,
            previous_model_locs=[
                self.location(loc, f"previous_model_locs[{i}]")
                for i, loc in enumerate(req.previous_model_locs)
            ],
            model_loc=self.location(req.model_loc, "model_loc"),
            valresult_loc=self.location(req.valresult_loc, "valresult_loc"),
            feature_cache_dir=cache_dir,
        )

    def extractor_required(self, req: Any) -> Any:
        if not req.HasField("extractor"):
            raise invalid("extractor is required")
        return self.extractor(req.extractor)


# ---------------------------------------------------------------- responses


def label_value(label: pb.Label) -> int | str:
    return label.id if label.WhichOneof("value") == "id" else label.name


def label_proto(value: Any) -> pb.Label:
    if isinstance(value, str):
        return pb.Label(name=value)
    return pb.Label(id=int(value))


def location_proto(loc: Any) -> pb.DataLocation:
    return pb.DataLocation(
        storage_type=loc.storage_type, key=loc.key, bucket_name=loc.bucket_name or ""
    )


def classify_response(msg: Any, job_token: str) -> pb.ClassifyResponse:
    """pyspacer ClassifyReturnMsg -> ClassifyResponse."""
    return pb.ClassifyResponse(
        job_token=job_token,
        runtime=float(msg.runtime),
        scores=[
            pb.PointScores(
                row=int(row) if row is not None else 0,
                col=int(col) if col is not None else 0,
                scores=np.asarray(scores, dtype=np.float64).tolist(),
            )
            for row, col, scores in msg.scores
        ],
        classes=[label_proto(c) for c in msg.classes],
        valid_rowcol=bool(msg.valid_rowcol),
    )


def features_proto(features: Any) -> pb.ImageFeatures:
    """spacer_core ImageFeatures -> ImageFeatures (float32, packed)."""
    return pb.ImageFeatures(
        point_features=[
            pb.PointFeatures(
                row=int(pf.row) if pf.row is not None else 0,
                col=int(pf.col) if pf.col is not None else 0,
                data=np.asarray(pf.data, dtype=np.float32).tolist(),
            )
            for pf in features.point_features
        ],
        valid_rowcol=bool(features.valid_rowcol),
        feature_dim=int(features.feature_dim),
        npoints=int(features.npoints),
    )


def _json_locations(data: Any) -> Iterator[dict[str, Any]]:
    """Every DataLocation-shaped dict in a pyspacer JSON message.

    ImageLabels use JSON-encoded locations as dict keys, so keys that parse
    as JSON objects are searched too.
    """
    if isinstance(data, dict):
        if "storage_type" in data and "key" in data:
            yield data
        for key, value in data.items():
            if isinstance(key, str) and key.startswith("{"):
                try:
                    yield from _json_locations(json.loads(key))
                except json.JSONDecodeError:
                    pass
            yield from _json_locations(value)
    elif isinstance(data, list):
        for item in data:
            yield from _json_locations(item)
