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

Model names are one short token (`check_name`): every RPC that takes one
checks it first, so no reply that lists models can be inflated by names.
Clients share the models: a config may not take a name the repository
provides, or that another config holds, unless the operator allows it.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from server.errors import FieldLocation, RequestError, invalid, register_location_reader
from server.oip.tensors import TensorSpec
from spacer_core.data_classes import DataLocation, parse_json
from spacer_core.exceptions import InvalidInputError
from spacer_core.extractors import FeatureExtractor, resolve_class_path

logger = logging.getLogger(__name__)

VERSION = "1"
PIPELINE = "spacer_pipeline"
EFFICIENTNET = "spacer_core.extractors.efficientnet.EfficientNetExtractor"
VGG16 = "spacer_core.extractors.vgg16.VGG16CaffeExtractor"

IMAGE = TensorSpec("IMAGE", "BYTES", (1,), optional=True)
IMAGE_PATH = TensorSpec("IMAGE_PATH", "BYTES", (1,), optional=True)
POINTS = TensorSpec("POINTS", "INT32", (-1, 2))


MAX_NAME_CHARS = 128
# Letters, digits, '.', '_' and '-', not starting with '.': a file stem in
# the repository, a metric label, a log field, all without escaping.
_NAME = re.compile(rf"[A-Za-z0-9_-][A-Za-z0-9._-]{{0,{MAX_NAME_CHARS - 1}}}")
# Models loaded from a config (clients' models) held at once, by default.
DEFAULT_MAX_CONFIG_MODELS = 64


def valid_name(name: str) -> bool:
    """Whether `name` can name a model (see `check_name`)."""
    return bool(_NAME.fullmatch(name))


def check_name(name: str, what: str = "model_name") -> str:
    """`name` when it can name a model; INVALID_ARGUMENT naming the field `what` otherwise.

    1 to 128 characters of A-Z a-z 0-9 '.' '_' '-', not starting with '.'.
    """
    if not valid_name(name):
        shown = repr(name[:40]) + (f"... ({len(name)} characters)" if len(name) > 40 else "")
        raise invalid(
            f"{what}: {shown} is not a model name: 1 to {MAX_NAME_CHARS} characters of"
            " A-Z a-z 0-9 '.' '_' '-', not starting with '.'"
        )
    return name


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
    # The config it was built from, canonical JSON ("" for repository files).
    config: str = ""
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
    canonical = json.dumps(data, sort_keys=True)
    if "extractor" in data:
        return Model(
            name,
            "extractor",
            extractor=_extractor(data["extractor"], "extractor"),
            source=source,
            config=canonical,
        )
    return Model(
        name,
        "classifier",
        classifier_loc=_location(data["classifier"], "classifier"),
        source=source,
        config=canonical,
    )


def _inside(path: Path, folder: Path) -> bool:
    # A symlink leading out of the repository is not the operator's model,
    # and listing it would tell clients which files exist elsewhere.
    try:
        return path.resolve().is_relative_to(folder)
    except (OSError, RuntimeError):
        return False


def scan_repository(folder: Path) -> dict[str, Model]:
    """The models of a repository folder, by name (file stem), none loaded."""
    found: dict[str, Model] = {}
    real = folder.resolve()
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not _inside(path, real) or not path.is_file():
            continue
        name, suffix = path.stem, path.suffix.lower()
        if not valid_name(name):
            logger.debug("model repository: %r is not a model name, not listed", path.name)
            continue
        fs = DataLocation("filesystem", str(path))
        model: Model | None = None
        if suffix in (".pt", ".pth"):
            model = Model(
                name, "extractor", extractor=resolve_class_path(EFFICIENTNET)(data_locations={"weights": fs})
            )
        elif (
            suffix == ".caffemodel"
            and _inside(path.with_suffix(".prototxt"), real)
            and path.with_suffix(".prototxt").is_file()
        ):
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

    def __init__(
        self,
        repository: Path | None,
        *,
        allow_override: bool = False,
        max_config_models: int = DEFAULT_MAX_CONFIG_MODELS,
    ):
        self.repository = repository
        # Whether a config may replace a repository model or another config's model.
        self.allow_override = allow_override
        self.max_config_models = max_config_models
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

    def find(self, name: str, what: str = "model_name") -> Model | None:
        """The model `name` (checked: INVALID_ARGUMENT naming `what`), None when unknown or empty."""
        if not name:
            return None
        return self._models.get(check_name(name, what))

    def ready(self, name: str, version: str = "", what: str = "model_name") -> Model:
        """The loaded model `name`; NOT_FOUND or UNAVAILABLE otherwise, as Triton says it."""
        model = self.find(name, what)
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
        """What RepositoryModelLoad(name, config) would load.

        A config may not take a name the repository provides or another
        config holds (ALREADY_EXISTS) unless the operator allows overrides,
        nor add a model past `max_config_models` (RESOURCE_EXHAUSTED).
        """
        check_name(name)
        if name == PIPELINE:
            raise invalid(f"'{PIPELINE}' is built in and always loaded")
        if config is not None:
            built = model_from_config(name, config)
            self.rescan()
            self._check_room(built)
            return built
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

    def _check_room(self, model: Model) -> None:
        """Refuse a config model that would replace a shared one, or one too many."""
        current = self._models.get(model.name)
        if current is not None and not self.allow_override:
            if current.source == "repository":
                raise RequestError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"failed to load '{model.name}': the model repository provides a model of that"
                    " name, which a config may not replace (the server allows that only with"
                    " --allow-model-override)",
                )
            if current.source == "config" and current.config != model.config:
                raise RequestError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"failed to load '{model.name}': a model of that name is already loaded from"
                    " another config; unload it first, or choose another name",
                )
        if current is None or current.source != "config":
            held = sum(1 for m in self._models.values() if m.source == "config")
            if held >= self.max_config_models:
                raise RequestError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"failed to load '{model.name}': {held} models loaded from a config already"
                    f" (at most {self.max_config_models}, --max-config-models); unload one first",
                )

    def put(self, model: Model) -> None:
        """Add or replace a loaded model (a config's is checked again: loads run concurrently)."""
        if model.source == "config" and self._models.get(model.name) is not model:
            self._check_room(model)
        self._models[model.name] = model

    def unload(self, name: str) -> Model:
        model = self.find(name)
        if model is None:
            raise not_found(name)
        if model.kind == "pipeline":
            raise invalid(f"'{PIPELINE}' is built in and cannot be unloaded")
        model.ready = False
        model.reason = "unloaded"
        if model.source == "config":
            del self._models[name]
        return model


def inference_locations(request: Any) -> list[FieldLocation]:
    """The location an OIP inference request names in its IMAGE_PATH input, as its field."""
    found: list[FieldLocation] = []
    for tensor in request.inputs:
        if tensor.name == "IMAGE_PATH" and tensor.contents.bytes_contents:
            text = tensor.contents.bytes_contents[0].decode("utf-8", errors="replace")
            try:
                loc: DataLocation | None = location_from_text(text)
            except Exception:  # the request itself is refused; nothing to match
                loc = None
            found.append(FieldLocation("input 'IMAGE_PATH'", loc, text))
    return found


register_location_reader("inference.ModelInferRequest", inference_locations)
