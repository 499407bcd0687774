"""The models a client can list and call, and the model repository.

Three kinds, each with one version, "1":

- an extractor, named after its weights file (or the name given to
  RepositoryModelLoad): IMAGE or IMAGE_PATH + POINTS -> FEATURES
- a classifier, named after its pickle: FEATURES -> SCORES, LABELS, PREDICTIONS
- `spacer_pipeline`, always ready: IMAGE or IMAGE_PATH + POINTS, with the
  extractor and classifier (loaded models) named in the request's
  parameters or in EXTRACTOR / CLASSIFIER inputs -> SCORES, LABELS,
  PREDICTIONS (and FEATURES when asked for)

The repository (`spacer serve --model-repository DIR`) is one folder:
`NAME.pt` / `NAME.pth` (an EfficientNet weights file), `NAME.caffemodel`
with `NAME.prototxt` (VGG16), `NAME.pkl` (a classifier) and `NAME.json` (a
model config, as RepositoryModelLoad's "config" parameter takes). Nothing
is loaded until RepositoryModelLoad names it; loading goes through the
Engine, so the storage policy applies to every file a model names.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from server.errors import RequestError, invalid
from server.oip.tensors import TensorSpec
from spacer_core.data_classes import DataLocation, parse_json
from spacer_core.exceptions import InvalidInputError
from spacer_core.extractors import FeatureExtractor, resolve_class_path

VERSION = "1"
PIPELINE = "spacer_pipeline"
EFFICIENTNET = "spacer_core.extractors.efficientnet.EfficientNetExtractor"
VGG16 = "spacer_core.extractors.vgg16.VGG16CaffeExtractor"

IMAGE = TensorSpec("IMAGE", "BYTES", (1,), optional=True)
IMAGE_PATH = TensorSpec("IMAGE_PATH", "BYTES", (1,), optional=True)
POINTS = TensorSpec("POINTS", "INT32", (-1, 2))


def not_found(name: str, version: str = "") -> RequestError:
    what = f"'{name}'" + (f" version {version}" if version else "")
    return RequestError(grpc.StatusCode.NOT_FOUND, f"Request for unknown model: {what} is not found")


@dataclass
class Model:
    """A model of the repository or one loaded from a config; `ready` once loaded."""

    name: str
    kind: str  # "extractor", "classifier" or "pipeline"
    extractor: FeatureExtractor | None = None
    classifier_loc: DataLocation | None = None
    source: str = "repository"  # or "config", "builtin"
    ready: bool = False
    reason: str = ""
    # Filled in at load: feature dimension, classes.
    feature_dim: int = -1
    classes: tuple[Any, ...] = ()
    files: dict[str, str] = field(default_factory=dict)

    @property
    def platform(self) -> str:
        return f"spacer_{self.kind}"

    def inputs(self) -> list[TensorSpec]:
        if self.kind == "extractor":
            return [IMAGE, IMAGE_PATH, POINTS]
        if self.kind == "classifier":
            return [TensorSpec("FEATURES", "FP32", (-1, self.feature_dim))]
        return [
            IMAGE,
            IMAGE_PATH,
            POINTS,
            TensorSpec("EXTRACTOR", "BYTES", (1,), optional=True),
            TensorSpec("CLASSIFIER", "BYTES", (1,), optional=True),
        ]

    def outputs(self) -> list[TensorSpec]:
        if self.kind == "extractor":
            return [TensorSpec("FEATURES", "FP32", (-1, self.feature_dim))]
        classes = len(self.classes) if self.kind == "classifier" else -1
        outputs = [
            TensorSpec("SCORES", "FP32", (-1, classes)),
            TensorSpec("LABELS", "BYTES", (classes,)),
            TensorSpec("PREDICTIONS", "BYTES", (-1,)),
        ]
        if self.kind == "pipeline":
            outputs.append(TensorSpec("FEATURES", "FP32", (-1, -1)))
        return outputs


def _extractor(data: Any, what: str) -> FeatureExtractor:
    if not isinstance(data, Mapping) or not isinstance(data.get("class_path"), str):
        raise invalid(f"{what}: expected an object with class_path, data_locations and data_hashes")
    try:
        cls = resolve_class_path(data["class_path"])
        locations = {
            key: _location(loc, f"{what}.data_locations[{key}]")
            for key, loc in dict(data.get("data_locations") or {}).items()
        }
        return cls(
            data_locations=locations,
            data_hashes=dict(data.get("data_hashes") or {}),
            **{k: v for k, v in data.items() if k not in ("class_path", "data_locations", "data_hashes")},
        )
    except RequestError:
        raise
    except Exception as exc:
        raise invalid(f"{what}: {exc}") from None


def _location(data: Any, what: str) -> DataLocation:
    """A DataLocation from a JSON object, or a path ("s3://bucket/key" and URLs too)."""
    try:
        if isinstance(data, str):
            return location_from_text(data)
        if isinstance(data, Mapping):
            # Values go as they came: the storage gate refuses a key or bucket that is not text.
            return DataLocation(
                data.get("storage_type", "filesystem"), data["key"], data.get("bucket_name") or None
            )
    except RequestError:
        raise
    except Exception as exc:
        raise invalid(f"{what}: {exc}") from None
    raise invalid(f"{what}: expected a path or a DataLocation object")


def location_from_text(text: str) -> DataLocation:
    """A filesystem path, s3://bucket/key or an http(s) URL as a DataLocation."""
    if not text:
        raise invalid("empty location")
    if text.startswith("s3://"):
        bucket, _, key = text[5:].partition("/")
        return DataLocation("s3", key, bucket)
    if text.startswith(("http://", "https://")):
        return DataLocation("url", text)
    return DataLocation("filesystem", text)


def model_from_config(name: str, text: str, source: str = "config") -> Model:
    """A model from a config: {"extractor": {...pyspacer extractor JSON...}} or
    {"classifier": {DataLocation} | "path"}."""
    try:
        data = parse_json(text, f"model '{name}': config is not JSON")
    except InvalidInputError as exc:
        raise invalid(str(exc)) from None
    if not isinstance(data, dict) or len({"extractor", "classifier"} & set(data)) != 1:
        raise invalid(f"model '{name}': config must be a JSON object with one of 'extractor' or 'classifier'")
    if "extractor" in data:
        return Model(name, "extractor", extractor=_extractor(data["extractor"], "extractor"), source=source)
    return Model(
        name, "classifier", classifier_loc=_location(data["classifier"], "classifier"), source=source
    )


def scan_repository(folder: Path) -> dict[str, Model]:
    """The models of a repository folder, by name (file stem), none loaded."""
    found: dict[str, Model] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        name, suffix = path.stem, path.suffix.lower()
        fs = DataLocation("filesystem", str(path))
        model: Model | None = None
        if suffix in (".pt", ".pth"):
            model = Model(
                name, "extractor", extractor=resolve_class_path(EFFICIENTNET)(data_locations={"weights": fs})
            )
        elif suffix == ".caffemodel" and path.with_suffix(".prototxt").is_file():
            definition = DataLocation("filesystem", str(path.with_suffix(".prototxt")))
            model = Model(
                name,
                "extractor",
                extractor=resolve_class_path(VGG16)(data_locations={"definition": definition, "weights": fs}),
            )
        elif suffix == ".pkl":
            model = Model(name, "classifier", classifier_loc=fs)
        elif suffix == ".json":
            try:
                model = model_from_config(name, path.read_text(), source="repository")
            except (RequestError, OSError) as exc:
                model = Model(name, "invalid", reason=f"{path.name}: {getattr(exc, 'message', exc)}")
        if model is not None and name not in found:
            model.reason = model.reason or "not loaded"
            found[name] = model
    return found


class Registry:
    """Models by name: the repository's, those loaded from a config, and the pipeline."""

    def __init__(self, repository: Path | None):
        self.repository = repository
        self._models: dict[str, Model] = {
            PIPELINE: Model(PIPELINE, "pipeline", source="builtin", ready=True, reason="")
        }
        self.rescan()

    def rescan(self) -> None:
        """Pick up files added to or removed from the repository folder."""
        if self.repository is None:
            return
        listed = scan_repository(self.repository)
        for name, model in list(self._models.items()):
            if model.source == "repository" and not model.ready and name not in listed:
                del self._models[name]
        for name, model in listed.items():
            if name not in self._models:
                self._models[name] = model

    def __iter__(self) -> Iterator[Model]:
        return iter(sorted(self._models.values(), key=lambda m: m.name))

    def find(self, name: str) -> Model | None:
        return self._models.get(name)

    def ready(self, name: str, version: str = "") -> Model:
        """The loaded model `name`; NOT_FOUND or UNAVAILABLE otherwise, as Triton says it."""
        model = self._models.get(name)
        if model is None or (version and version != VERSION):
            raise not_found(name, version)
        if not model.ready:
            raise RequestError(
                grpc.StatusCode.UNAVAILABLE,
                f"Request for unknown model: '{name}' has no available versions"
                " (load it with RepositoryModelLoad)",
            )
        return model

    def candidate(self, name: str, config: str | None) -> Model:
        """What RepositoryModelLoad(name, config) would load."""
        if name == PIPELINE:
            raise invalid(f"'{PIPELINE}' is built in and always loaded")
        if config is not None:
            return model_from_config(name, config)
        self.rescan()
        model = self._models.get(name)
        if model is None:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                f"failed to load '{name}': no model of that name in the model"
                " repository, and no config given",
            )
        if model.kind == "invalid":
            raise invalid(f"failed to load '{name}': {model.reason}")
        return model

    def put(self, model: Model) -> None:
        self._models[model.name] = model

    def unload(self, name: str) -> Model:
        model = self._models.get(name)
        if model is None:
            raise not_found(name)
        if model.kind == "pipeline":
            raise invalid(f"'{PIPELINE}' is built in and cannot be unloaded")
        model.ready = False
        model.reason = "unloaded"
        if model.source == "config":
            del self._models[name]
        return model
