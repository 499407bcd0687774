"""FeatureExtractor: the base of every extractor, its data files and its JSON form.

An extractor is described by the DataLocations of its files (network weights
and so on) plus optional sha256 hashes of them; that description is what
messages carry (`{class_path, data_locations, data_hashes}`).

Loading the files follows pyspacer: local files (filesystem, memory) are
checked against `data_hashes` on every load, and a mismatch raises
HashMismatchError. Two differences: remote files (url, s3) are cached in
`config.EXTRACTORS_CACHE_DIR/sha256/` under the digest of their content
(not their filename, which any URL can share) and a cached copy is used
only after it matches the expected digest, so nothing is written for a
mismatch; and the hash of a local file is remembered per file version
(path, inode, size, mtime), so an unchanged multi-megabyte weights file is
not re-hashed for every image.
"""

from __future__ import annotations

import abc
import hashlib
import inspect
import os
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import import_module
from io import BytesIO
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from spacer_core import config, limits, runtime
from spacer_core.crop import CROP_SIZE, crop_array_into_chw, to_rgb_array
from spacer_core.data_classes import DataLocation, FeatureProvenance, ImageFeatures, points_sha256

# Re-exported: pyspacer's extractors.base offers these names to its importers.
from spacer_core.data_classes import PointFeatures as PointFeatures
from spacer_core.exceptions import (
    ConfigError,
    HashMismatchError,
    InvalidDataError,
    InvalidInputError,
)
from spacer_core.extractors.class_paths import KNOWN_CLASS_PATHS, canonical_class_path
from spacer_core.extractors.utils import crop_patches as crop_patches
from spacer_core.inference.network import NetworkSpec
from spacer_core.storage import load_bytes, open_local, write_file_atomic
from spacer_core.storage import storage_factory as storage_factory
from spacer_core.task_io import ExtractFeaturesReturnMsg

RowCol = tuple[int, int]


@dataclass(frozen=True)
class ExtractorData:
    """One extractor file, located and hash-checked; `read()` gives its bytes.

    A file read again later (to build a network) is checked against
    `sha256` once more: the bytes a network is built from are the bytes
    that were verified, or nothing is built.
    """

    key: str
    sha256: str
    remote_loaded: bool
    path: str | None = None
    blob: bytes | None = None
    loc: DataLocation | None = None

    def read(self) -> bytes:
        if self.blob is not None:
            return self.blob
        if self.loc is not None:
            data = load_bytes(self.loc).getvalue()  # under the storage policy
        else:
            assert self.path is not None
            with open(self.path, "rb") as f:
                data = f.read()
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise HashMismatchError(f"The extractor's '{self.key}' file changed while it was being loaded.")
        return data


_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class FeatureExtractor(abc.ABC):
    """Base class: crops patches at points and turns them into feature vectors.

    Subclasses name the files they need in DATA_LOCATION_KEYS and implement
    `feature_dim`, and either `network()` (a network the pipeline runs on
    float32 patches, batched across callers by the runtime) or `extract_rgb`
    (uint8 RGB pixels and points -> features, for extractors without one).
    """

    DATA_LOCATION_KEYS: ClassVar[list[str]] = []
    CROP_SIZE: ClassVar[int] = CROP_SIZE
    # The class path serialize() writes: where pyspacer 0.14.0 defines the
    # same extractor, so pyspacer can read our messages. Set per class; a
    # subclass without its own falls back to its real module path.
    PYSPACER_CLASS_PATH: ClassVar[str | None] = None

    def __init__(
        self,
        data_locations: Mapping[str, DataLocation],
        data_hashes: Mapping[str, str] | None = None,
        **kwargs: Any,
    ):
        # Extra keyword arguments are accepted and ignored, as pyspacer does,
        # so messages with fields from other versions still load.
        self.data_locations = dict(data_locations)
        for key in self.DATA_LOCATION_KEYS:
            if key not in self.data_locations:
                raise InvalidInputError(f"{key} must be present in data_locations for {type(self).__name__}.")
        self.data_hashes = dict(data_hashes or {})

    # --- extraction ---------------------------------------------------------

    def __call__(
        self, im: Image.Image, rowcols: Sequence[RowCol]
    ) -> tuple[ImageFeatures, ExtractFeaturesReturnMsg]:
        """Features at each (row, col) of `im`, in order, and the run's return message."""
        return self._extract(rowcols, lambda points: self.extract_image(im, points))

    def call_rgb(
        self, rgb: np.ndarray, rowcols: Sequence[RowCol]
    ) -> tuple[ImageFeatures, ExtractFeaturesReturnMsg]:
        """As calling the extractor, on pixels already decoded to uint8 HxWx3 RGB.

        For images decoded by `spacer_core.crop.decode_image` (Rust), which
        gives the same pixels as Pillow's `convert('RGB')`.
        """
        return self._extract(rowcols, lambda points: self.extract_rgb(rgb, points))

    def _extract(
        self, rowcols: Sequence[RowCol], run: Callable[[list[RowCol]], tuple[np.ndarray, bool]]
    ) -> tuple[ImageFeatures, ExtractFeaturesReturnMsg]:
        start = time.time()
        points = [(int(r), int(c)) for r, c in rowcols]
        if not points:
            raise InvalidInputError(f"{type(self).__name__} needs at least one (row, col) point.")
        feats, loaded_remotely = run(points)
        rows, cols = [p[0] for p in points], [p[1] for p in points]
        features = ImageFeatures.from_arrays(feats, rows, cols)
        features.provenance = self.feature_provenance(rows, cols)
        return features, ExtractFeaturesReturnMsg(
            extractor_loaded_remotely=loaded_remotely, runtime=time.time() - start
        )

    def extract_image(self, im: Image.Image, rowcols: Sequence[RowCol]) -> tuple[np.ndarray, bool]:
        """Pillow image and points -> ((N, feature_dim) features, loaded-remotely flag)."""
        with config.log_entry_and_exit("conversion to RGB"):
            rgb = to_rgb_array(im)
        return self.extract_rgb(rgb, rowcols)

    def extract_rgb(self, rgb: np.ndarray, rowcols: Sequence[RowCol]) -> tuple[np.ndarray, bool]:
        """uint8 HxWx3 image and points -> ((N, feature_dim) features, loaded-remotely flag).

        Network extractors crop into the network's float32 input and run it
        in the current runtime, a batch at a time.
        """
        found = self.network()
        if found is None:
            raise NotImplementedError(f"{type(self).__name__} implements neither network() nor extract_rgb()")
        net, loaded_remotely = found
        active = runtime.current()
        batch_size = active.settings.batcher.max_batch_size or active.backend(net).preferred_batch_size
        feats = np.empty((len(rowcols), net.feature_dim), dtype=np.float32)
        buffer = np.empty((min(len(rowcols), batch_size), 3, self.CROP_SIZE, self.CROP_SIZE), np.float32)
        with config.log_entry_and_exit("forward pass through net"):
            for start in range(0, len(rowcols), batch_size):
                points = rowcols[start : start + batch_size]
                batch = buffer[: len(points)]
                crop_array_into_chw(rgb, points, batch, self.CROP_SIZE)
                feats[start : start + len(points)] = active.features(net, batch)
        return feats, loaded_remotely

    def network(self) -> tuple[NetworkSpec, bool] | None:
        """The network that turns float32 (N, 3, 224, 224) patches into features, and
        whether its files came from remote storage; None for extractors without one.

        Extractors with a network are batchable: the pipeline crops straight
        into the network's input and the runtime batches patches across calls.
        """
        return None

    def weights_sha256(self) -> str:
        """The sha256 of the files this extractor computes with (one digest of all of
        them when there are several; empty when it has none)."""
        found = self.network()
        if found is not None:
            return found[0].key  # the digest the network is cached under
        shas = [self.resolve_data(key).sha256 for key in sorted(self.DATA_LOCATION_KEYS)]
        if len(shas) <= 1:
            return "".join(shas)
        return hashlib.sha256(":".join(shas).encode()).hexdigest()

    def feature_provenance(
        self, rows: Sequence[int], cols: Sequence[int], weights_sha256: str | None = None
    ) -> FeatureProvenance:
        """What features of this extractor at these points record about their origin."""
        sha = self.weights_sha256() if weights_sha256 is None else weights_sha256
        return FeatureProvenance(type(self).__name__, sha, points_sha256(rows, cols))

    @property
    def batchable(self) -> bool:
        """Whether patches of this extractor can be batched across calls (it has a network)."""
        return type(self).network is not FeatureExtractor.network

    @property
    @abc.abstractmethod
    def feature_dim(self) -> int:
        """Length of each feature vector."""

    # --- JSON form ----------------------------------------------------------

    def serialize(self) -> dict[str, Any]:
        cls = type(self)
        class_path = cls.__dict__.get("PYSPACER_CLASS_PATH") or f"{cls.__module__}.{cls.__name__}"
        return {
            "class_path": class_path,
            "data_locations": {key: loc.serialize() for key, loc in self.data_locations.items()},
            "data_hashes": dict(self.data_hashes),
        }

    @staticmethod
    def deserialize(data: Mapping[str, Any]) -> FeatureExtractor:
        """Rebuild an extractor from its JSON form; pyspacer 0.5.0+ class paths are understood."""
        if not isinstance(data, Mapping) or "class_path" not in data:
            raise InvalidDataError(f"An extractor must be a JSON object with a class_path, got {data!r}")
        fields = dict(data)
        extractor_class = resolve_class_path(fields.pop("class_path"))
        locations = fields.get("data_locations") or {}
        fields["data_locations"] = {key: DataLocation.deserialize(loc) for key, loc in locations.items()}
        return extractor_class(**fields)

    def __repr__(self) -> str:
        return str(self.serialize())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FeatureExtractor):
            return NotImplemented
        return self.serialize() == other.serialize()

    __hash__ = None  # type: ignore[assignment]

    # --- data files ---------------------------------------------------------

    def _check_data_hash(self, sha256: str, key: str) -> None:
        expected = self.data_hashes.get(key)
        if expected is not None and sha256 != expected:
            raise HashMismatchError(f"Hash doesn't match for extractor's '{key}' file/blob.")

    @staticmethod
    def _cache_root() -> Path:
        if not config.EXTRACTORS_CACHE_DIR:
            raise ConfigError(
                "Must define EXTRACTORS_CACHE_DIR to load extractor files/blobs into the filesystem."
            )
        return Path(config.EXTRACTORS_CACHE_DIR)

    def data_filepath_for_cache(self, key: str) -> Path:
        """Where the file of `key` is put on local disk by filename (memory blobs; pyspacer's layout)."""
        return self._cache_root() / self.data_locations[key].filename

    @classmethod
    def content_cache_path(cls, sha256: str) -> Path:
        """Where a downloaded file with this sha256 is cached: named by content, not by URL or key."""
        if not _SHA256_HEX.match(sha256):
            raise InvalidInputError(f"Not a sha256 hex digest: {sha256!r}")
        folder = cls._cache_root() / "sha256"
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        return folder / sha256

    def _expected_sha256(self, key: str) -> str | None:
        # The message's hash or, without one, what this runtime last downloaded.
        expected = self.data_hashes.get(key)
        if expected is None:
            expected = runtime.current().remote_hashes.get(self.data_locations[key])
        # Anything but a digest never names a cache file (no '../' lookups).
        return expected if expected is not None and _SHA256_HEX.match(expected) else None

    def decache_remote_loaded_file(self, key: str) -> None:
        """Remove the cached copy of a remote file, if there is one."""
        if not self.data_locations[key].is_remote:
            return
        expected = self._expected_sha256(key)
        paths = [self.data_filepath_for_cache(key)]
        if expected is not None:
            paths.append(self.content_cache_path(expected))
        for path in paths:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass

    def resolve_data(self, key: str) -> ExtractorData:
        """Locate and hash-check the file of `key`, downloading remote files into the cache."""
        loc = self.data_locations[key]
        if loc.storage_type == "filesystem":
            with open_local(loc) as f:  # policy-checked, opened once
                sha = runtime.current().file_hashes.digest(loc.key, f)
            self._check_data_hash(sha, key)
            return ExtractorData(key, sha, False, path=loc.key, loc=loc)
        if not loc.is_remote:
            blob = load_bytes(loc).getvalue()
            sha = hashlib.sha256(blob).hexdigest()
            self._check_data_hash(sha, key)
            return ExtractorData(key, sha, False, blob=blob)

        # Remote files are cached by content. A cached copy is used only when
        # its digest matches the expected one; without a hash in the message
        # nothing on disk is trusted until this process has downloaded the
        # file once and knows its digest.
        self._cache_root()  # no download without somewhere to keep it
        expected = self._expected_sha256(key)
        if expected is not None:
            cached = self.content_cache_path(expected)
            if cached.exists():
                if runtime.current().file_hashes.sha256(str(cached)) == expected:
                    return ExtractorData(key, expected, False, path=str(cached))
                cached.unlink(missing_ok=True)  # damaged: fetched again
        data = load_bytes(loc).getvalue()
        sha = hashlib.sha256(data).hexdigest()
        self._check_data_hash(sha, key)
        cached = self.content_cache_path(sha)
        write_file_atomic(cached, data)
        runtime.current().remote_hashes.put(loc, sha)
        return ExtractorData(key, sha, True, path=str(cached))

    def load_datastream(self, key: str) -> tuple[BytesIO, bool]:
        """The (hash-checked) content of `key`'s file, and whether it came from remote storage."""
        data = self.resolve_data(key)
        return BytesIO(data.read()), data.remote_loaded

    def load_data_into_filesystem(self, key: str) -> tuple[str, bool]:
        """A local path holding `key`'s file, and whether it came from remote storage."""
        data = self.resolve_data(key)
        if data.path is not None:
            return data.path, data.remote_loaded
        # Memory blobs go to the cache directory for tools that need a path.
        cached = self.data_filepath_for_cache(key)
        write_file_atomic(cached, data.read())
        return str(cached), False


class DummyExtractor(FeatureExtractor):
    """Ignores the image and returns uniform random features in [0, 1).

    Draws are seeded from Python's `random` module, so `random.seed()` makes
    them repeatable as with pyspacer. Match `feature_dim` to a classifier's
    to feed it these features.
    """

    PYSPACER_CLASS_PATH: ClassVar[str | None] = "spacer.extractors.base.DummyExtractor"

    def __init__(
        self,
        data_locations: Mapping[str, DataLocation] | None = None,
        feature_dim: int = 4096,
        **kwargs: Any,
    ):
        super().__init__(data_locations or {}, **kwargs)
        if isinstance(feature_dim, bool) or not isinstance(feature_dim, int) or feature_dim < 1:
            raise InvalidInputError(f"DummyExtractor feature_dim must be a positive int, got {feature_dim!r}")
        self._feature_dim = feature_dim

    @property
    def feature_dim(self) -> int:
        return self._feature_dim

    def extract_image(self, im: Image.Image, rowcols: Sequence[RowCol]) -> tuple[np.ndarray, bool]:
        # The pixels are never looked at, so the image is not even decoded.
        return self.extract_rgb(np.empty((0, 0, 3), np.uint8), rowcols)

    def extract_rgb(self, rgb: np.ndarray, rowcols: Sequence[RowCol]) -> tuple[np.ndarray, bool]:
        limits.current().check_feature_dim(self._feature_dim, "DummyExtractor feature_dim")
        rng = np.random.default_rng(random.getrandbits(64))
        return rng.random((len(rowcols), self._feature_dim)), False

    def serialize(self) -> dict[str, Any]:
        data = super().serialize()
        data["feature_dim"] = self._feature_dim
        return data


# Extractor classes defined outside spacer_core, registered by their users.
_REGISTERED: dict[str, type[FeatureExtractor]] = {}


def register_extractor_class(class_path: str, extractor_class: type) -> None:
    """Let messages name `extractor_class` (a FeatureExtractor subclass) by `class_path`."""
    if not (isinstance(extractor_class, type) and issubclass(extractor_class, FeatureExtractor)):
        raise TypeError(f"{extractor_class!r} is not a FeatureExtractor subclass")
    _REGISTERED[class_path] = extractor_class


def resolve_class_path(class_path: object) -> type[FeatureExtractor]:
    """The FeatureExtractor subclass that `class_path` names; InvalidDataError if none.

    Only this package's modules are imported: a class path in a message must
    not make the process import arbitrary (pyspacer or third-party) code.
    """
    if not isinstance(class_path, str) or "." not in class_path:
        raise InvalidDataError(f"Extractor class_path must be a dotted path string, got {class_path!r}")
    found: object = _REGISTERED.get(class_path)
    module_path, class_name = canonical_class_path(class_path).rsplit(".", 1)
    if found is None and (module_path == "spacer_core" or module_path.startswith("spacer_core.")):
        try:
            found = getattr(import_module(module_path), class_name, None)
        except ImportError:
            found = None
    if isinstance(found, type) and issubclass(found, FeatureExtractor):
        if inspect.isabstract(found):
            # A base class: it names no network and cannot be built.
            raise InvalidDataError(
                f"Extractor class_path {class_path!r} names an abstract class, not an extractor"
            )
        return found
    raise InvalidDataError(
        f"Unknown extractor class_path {class_path!r}; expected one of {sorted(KNOWN_CLASS_PATHS)},"
        " a FeatureExtractor subclass in spacer_core, or a path given to register_extractor_class()"
    )
