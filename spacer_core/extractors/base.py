"""FeatureExtractor: the base of every extractor, its data files and its JSON form.

An extractor is described by the DataLocations of its files (network weights
and so on) plus optional sha256 hashes of them; that description is what
messages carry (`{class_path, data_locations, data_hashes}`).

Loading the files follows pyspacer: local files (filesystem, memory) are
checked against `data_hashes` on every load; remote ones (url, s3) are
cached in `config.EXTRACTORS_CACHE_DIR` under their filename and checked
when downloaded; a mismatch removes the cached copy and raises
HashMismatchError. One difference: the hash of a local file is remembered
per file version (path, inode, size, mtime), so an unchanged multi-megabyte
weights file is not re-hashed for every image.
"""

from __future__ import annotations

import abc
import hashlib
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import import_module
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from PIL import Image

from spacer_core import config
from spacer_core.crop import CROP_SIZE, to_rgb_array
from spacer_core.data_classes import DataLocation, ImageFeatures, InvalidDataError
from spacer_core.exceptions import ConfigError, HashMismatchError
from spacer_core.storage import load_bytes, write_file_atomic

if TYPE_CHECKING:
    from spacer_core.messages import ExtractFeaturesReturnMsg

RowCol = tuple[int, int]


@dataclass(frozen=True)
class ExtractorData:
    """One extractor file, located and hash-checked; `read()` gives its bytes."""

    key: str
    sha256: str
    remote_loaded: bool
    path: str | None = None
    blob: bytes | None = None

    def read(self) -> bytes:
        if self.blob is not None:
            return self.blob
        assert self.path is not None
        with open(self.path, "rb") as f:
            return f.read()


class _FileHashes:
    """sha256 of local files, remembered per (path, device, inode, size, mtime)."""

    def __init__(self) -> None:
        self._known: dict[str, tuple[tuple[int, int, int, int], str]] = {}
        self._lock = threading.Lock()

    def sha256(self, path: str) -> str:
        st = os.stat(path)
        version = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            known = self._known.get(path)
        if known is not None and known[0] == version:
            return known[1]
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        sha = digest.hexdigest()
        with self._lock:
            self._known[path] = (version, sha)
        return sha


FILE_HASHES = _FileHashes()


class FeatureExtractor(abc.ABC):
    """Base class: crops patches at points and turns them into feature vectors.

    Subclasses name the files they need in DATA_LOCATION_KEYS and implement
    `feature_dim` and `extract_rgb` (uint8 RGB pixels and points -> features).
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
                raise ValueError(f"{key} must be present in data_locations for {type(self).__name__}.")
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
        from spacer_core.messages import ExtractFeaturesReturnMsg

        start = time.time()
        points = [(int(r), int(c)) for r, c in rowcols]
        if not points:
            raise ValueError(f"{type(self).__name__} needs at least one (row, col) point.")
        feats, loaded_remotely = run(points)
        features = ImageFeatures.from_arrays(feats, [p[0] for p in points], [p[1] for p in points])
        return features, ExtractFeaturesReturnMsg(
            extractor_loaded_remotely=loaded_remotely, runtime=time.time() - start
        )

    def extract_image(self, im: Image.Image, rowcols: Sequence[RowCol]) -> tuple[np.ndarray, bool]:
        """Pillow image and points -> ((N, feature_dim) features, loaded-remotely flag)."""
        with config.log_entry_and_exit("conversion to RGB"):
            rgb = to_rgb_array(im)
        return self.extract_rgb(rgb, rowcols)

    @abc.abstractmethod
    def extract_rgb(self, rgb: np.ndarray, rowcols: Sequence[RowCol]) -> tuple[np.ndarray, bool]:
        """uint8 HxWx3 image and points -> ((N, feature_dim) features, loaded-remotely flag)."""

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
        from spacer_core.extractors.class_paths import resolve_class_path

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

    def data_filepath_for_cache(self, key: str) -> Path:
        """Where the file of `key` is cached on local disk (by its filename)."""
        if not config.EXTRACTORS_CACHE_DIR:
            raise ConfigError(
                "Must define EXTRACTORS_CACHE_DIR to load extractor files/blobs into the filesystem."
            )
        return Path(config.EXTRACTORS_CACHE_DIR) / self.data_locations[key].filename

    def decache_remote_loaded_file(self, key: str) -> None:
        """Remove the cached copy of a remote file, if there is one."""
        if not self.data_locations[key].is_remote:
            return
        try:
            os.remove(self.data_filepath_for_cache(key))
        except FileNotFoundError:
            pass

    def resolve_data(self, key: str) -> ExtractorData:
        """Locate and hash-check the file of `key`, downloading remote files into the cache."""
        loc = self.data_locations[key]
        if loc.storage_type == "filesystem":
            sha = FILE_HASHES.sha256(loc.key)
            self._check_data_hash(sha, key)
            return ExtractorData(key, sha, False, path=loc.key)
        if not loc.is_remote:
            blob = load_bytes(loc).getvalue()
            sha = hashlib.sha256(blob).hexdigest()
            self._check_data_hash(sha, key)
            return ExtractorData(key, sha, False, blob=blob)

        cached = self.data_filepath_for_cache(key)
        if cached.exists():
            sha = FILE_HASHES.sha256(str(cached))
            # A cached copy that no longer matches its hash (edited, or
            # written by an older download) is fetched again, not trusted.
            if key not in self.data_hashes or sha == self.data_hashes[key]:
                return ExtractorData(key, sha, False, path=str(cached))
        data = load_bytes(loc).getvalue()
        sha = hashlib.sha256(data).hexdigest()
        try:
            self._check_data_hash(sha, key)
        except HashMismatchError:
            self.decache_remote_loaded_file(key)
            raise
        write_file_atomic(cached, data)
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
