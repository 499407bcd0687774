"""Data passed into and out of tasks, each able to turn itself into JSON-ready data.

Formats on disk are pyspacer's, so files written here load in pyspacer and
the other way round.
"""

from __future__ import annotations

import hashlib
import json
import sys
import zipfile
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from io import BytesIO
from pprint import pformat
from typing import Any, TypeAlias

import numpy as np

from spacer_core import limits
from spacer_core.exceptions import (
    InvalidDataError,
    InvalidInputError,
    PreconditionError,
    RowColumnMismatchError,
    RowColumnMissingError,
    SpacerError,
)
from spacer_core.locations import Location
from spacer_core.locations import require as _require
from spacer_core.storage import RemoteStorage, load_bytes, open_local, storage_factory, store_bytes  # noqa: F401  (pyspacer names)

# Labels may be ints or strings (anything scikit-learn accepts as a target).
LabelId: TypeAlias = int | str
Annotation: TypeAlias = tuple[int, int, LabelId]
FeatureLabelPair: TypeAlias = tuple[np.ndarray, LabelId]
FeatureLabelBatch: TypeAlias = tuple[list[np.ndarray], list[LabelId]]


def parse_json(raw: str | bytes, failure: str) -> Any:
    """Client JSON as Python data; every parse failure is an `InvalidDataError`
    "``failure`` (why)", where ``failure`` names the input ("job_msg_json is not JSON").

    The one parser for JSON a client sends or names (RunJob, feature files,
    model configs, pyspacer message files): malformed text, bad UTF-8, nesting
    too deep for the parser (RecursionError) and integers past Python's digit
    limit (ValueError) all become the client's input error.
    """
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw
        return json.loads(text)
    except RecursionError:
        why = "nested too deeply"
    except UnicodeDecodeError:
        why = "not UTF-8 text"
    except json.JSONDecodeError as err:
        why = str(err)
    except ValueError:  # an integer longer than Python's limit on digits
        why = f"an integer has more than {sys.get_int_max_str_digits()} digits"
    raise InvalidDataError(f"{failure} ({why}).")


def deserialize_input(cls: Any, data: Any, what: str) -> Any:
    """``cls.deserialize(data)`` for client data: a missing field or a value of the wrong type
    is an `InvalidDataError` naming ``what`` (never a bare KeyError/TypeError/AttributeError)."""
    try:
        return cls.deserialize(data)
    except (InvalidDataError, InvalidInputError) as err:
        if type(err) in (
            InvalidDataError,
            InvalidInputError,
        ):  # plain: say where; specific kinds stay as they are
            raise type(err)(f"{what}: {err}") from None
        raise
    except SpacerError:
        raise
    except KeyError as err:
        raise InvalidDataError(f"{what}: missing field {err}.") from None
    except RecursionError:
        raise InvalidDataError(f"{what} is nested too deeply.") from None
    except (TypeError, AttributeError, ValueError, IndexError):
        # Python's text here ("'list' object has no attribute 'items'") describes our code, not the input.
        raise InvalidDataError(f"{what}: a field has the wrong type or value.") from None


# Rows and columns travel as int32 (gRPC) and index images: 0..2**31-1.
MAX_POINT_INDEX = 2**31 - 1


def _point_indices(values: Any, name: str) -> np.ndarray:
    """Point rows or columns as int64, each a whole number in 0..MAX_POINT_INDEX."""
    try:
        raw = np.asarray(values).reshape(-1)
    except (TypeError, ValueError, OverflowError) as err:
        raise InvalidDataError(f"Point {name} must be whole numbers ({err}).") from None
    if raw.size == 0:
        return raw.astype(np.int64)
    if raw.dtype.kind == "O":  # Python ints too large for int64, or mixed values
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in raw):
            raise InvalidDataError(f"Point {name} must be whole numbers.")
        if min(raw) < 0 or max(raw) > MAX_POINT_INDEX:
            raise InvalidDataError(f"A point's {name[:-1]} is outside 0..{MAX_POINT_INDEX}.")
        return raw.astype(np.int64)
    if raw.dtype.kind not in "iu":
        raise InvalidDataError(f"Point {name} must be whole numbers, got {raw.dtype} values.")
    if int(raw.min()) < 0 or int(raw.max()) > MAX_POINT_INDEX:
        raise InvalidDataError(f"A point's {name[:-1]} is outside 0..{MAX_POINT_INDEX}.")
    return raw.astype(np.int64)


class DataClass(ABC):
    """Base: JSON (de)serialization and load/store through DataLocations."""

    @classmethod
    def load(cls, loc: DataLocation) -> Any:
        """Read a JSON document at ``loc`` and deserialize it."""
        raw = load_bytes(loc).getvalue()
        data = parse_json(raw, f"{loc.key}: not a JSON {cls.__name__}")
        return deserialize_input(cls, data, f"{loc.key} (a {cls.__name__})")

    def store(self, loc: DataLocation) -> None:
        """Write this object's JSON to ``loc``."""
        store_bytes(loc, json.dumps(self.serialize()).encode("utf-8"))

    @classmethod
    @abstractmethod
    def example(cls) -> Any:
        """A small valid instance, for tests and documentation."""

    @classmethod
    def deserialize(cls, data: Any) -> Any:
        """Build an instance from ``serialize()``'s output."""
        return cls(**data)

    def serialize(self) -> Any:
        """JSON-ready form of this object (dicts, lists, str, numbers)."""
        return dict(self.__dict__)

    def _repr_fields(self) -> dict[str, Any]:
        """The attributes pyspacer's instance of this class holds (what repr shows)."""
        return dict(vars(self))

    def __repr__(self) -> str:
        # pyspacer prints the attribute dict; people and tests read that text.
        return pformat(self._repr_fields())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DataClass):
            return NotImplemented
        mine, theirs = self.__dict__, other.__dict__
        return mine.keys() == theirs.keys() and all(mine[k] == theirs[k] for k in mine)


class DataLocation(Location, DataClass):
    """Where a piece of data lives: a path, a memory key, a URL or an S3 key."""

    __hash__ = Location.__hash__
    __repr__ = DataClass.__repr__


class ImageLabels(DataClass):
    """Annotations (row, col, label) per image, keyed by the image's feature location."""

    def __init__(self, data: Mapping[DataLocation, Sequence[Annotation]] | None = None):
        self._data: dict[DataLocation, list[Annotation]] = {}
        self.label_count_per_class: Counter[LabelId] = Counter()
        self.has_remote_data = False
        self.filesystem_cache: str | None = None
        # pyspacer 0.5.0 keyed labels by bare feature keys; their storage
        # comes from the training message's features_loc (see resolve_keys).
        self.bare_keys: set[str] = set()
        # What made each feature file read so far (None: unknown origin), so
        # a trainer can refuse a mix of extractors without reading files twice.
        self._provenance: dict[DataLocation, FeatureProvenance | None] = {}
        for feature_loc, annotations in (data or {}).items():
            if isinstance(feature_loc, str):
                self.bare_keys.add(feature_loc)
                feature_loc = DataLocation("filesystem", feature_loc)
            self.add_image(feature_loc, annotations)

    def resolve_keys(self, features_loc: DataLocation | None) -> ImageLabels:
        """A copy where bare string keys take `features_loc`'s storage type and bucket (0.5.0's form)."""
        if not self.bare_keys or features_loc is None:
            return self
        resolved = ImageLabels()
        for loc, annotations in self._data.items():
            if loc.key in self.bare_keys and loc.storage_type == "filesystem":
                loc = DataLocation(features_loc.storage_type, loc.key, features_loc.bucket_name)
            resolved.add_image(loc, annotations)
        return resolved

    def add_image(self, feature_loc: DataLocation, image_annotations: Sequence[Annotation]) -> None:
        """Add (or replace) one image's annotations."""
        if not isinstance(feature_loc, DataLocation):
            raise InvalidDataError(f"ImageLabels keys must be DataLocations, got {feature_loc!r}.")
        if feature_loc in self._data:
            self.label_count_per_class.subtract(label for _, _, label in self._data[feature_loc])
            self.label_count_per_class += Counter()  # drop zero counts
        annotations = list(image_annotations)
        self._data[feature_loc] = annotations
        self.label_count_per_class.update(label for _, _, label in annotations)
        self.has_remote_data = self.has_remote_data or feature_loc.is_remote

    def set_filesystem_cache(self, dir_path: str | None) -> None:
        """Cache remote feature files under ``dir_path`` when loading them."""
        self.filesystem_cache = dir_path

    @property
    def classes_set(self) -> set[LabelId]:
        return set(self.label_count_per_class)

    @property
    def label_count(self) -> int:
        return sum(self.label_count_per_class.values())

    @classmethod
    def example(cls) -> ImageLabels:
        return cls(
            {
                DataLocation("filesystem", "img1.features"): [(100, 200, 3), (101, 200, 2)],
                DataLocation("filesystem", "img2.features"): [(100, 202, 3), (101, 200, 3)],
                DataLocation("filesystem", "img3.features"): [(100, 202, 3), (101, 200, 3)],
                DataLocation("filesystem", "img4.features"): [(100, 202, 3), (101, 200, 3)],
            }
        )

    def serialize(self) -> dict[str, list[Annotation]]:
        # JSON object keys must be strings, so each location is its JSON text.
        return {json.dumps(loc.serialize()): annotations for loc, annotations in self._data.items()}

    @classmethod
    def deserialize(cls, data: Mapping[str, Any], features_loc: DataLocation | None = None) -> ImageLabels:
        """Read pyspacer 0.14's form, or 0.5.0's ``{"data": {feature_key: [[r, c, label]]}}``.

        0.5.0 keys are bare feature keys; ``features_loc`` gives their
        storage type and bucket (default: filesystem).
        """
        if is_legacy_image_labels(data):
            base = features_loc or DataLocation("filesystem", "")
            return cls(
                {
                    DataLocation(base.storage_type, key, base.bucket_name): _annotations(key, annotations)
                    for key, annotations in data["data"].items()
                }
            )
        labels = cls()
        for serialized_loc, annotations in data.items():
            failure = f"ImageLabels key {serialized_loc[:200]!r} is not a serialized DataLocation"
            loc = deserialize_input(DataLocation, parse_json(serialized_loc, failure), failure)
            labels.add_image(loc, _annotations(serialized_loc, annotations))
        return labels

    def keys(self) -> Iterable[DataLocation]:
        return self._data.keys()

    def items(self) -> Iterable[tuple[DataLocation, list[Annotation]]]:
        return self._data.items()

    def filter_classes(self, accepted_classes: Iterable[LabelId]) -> ImageLabels:
        """A copy keeping only labels in ``accepted_classes`` (images left empty are dropped)."""
        accepted = set(accepted_classes)
        filtered = ImageLabels()
        for loc, annotations in self._data.items():
            kept = [a for a in annotations if a[2] in accepted]
            if kept:
                filtered.add_image(loc, kept)
        return filtered

    def _ordered_keys(self, random_seed: int | None) -> list[DataLocation]:
        keys = list(self._data)
        if random_seed is not None:
            # The global generator, seeded, as pyspacer does: identical image
            # order, and identical global state for code that runs after.
            np.random.seed(random_seed)
            np.random.shuffle(keys)  # type: ignore[arg-type]
        return keys

    def load_features(self, feature_loc: DataLocation) -> ImageFeatures:
        """The features of one image, honouring this set's filesystem cache."""
        features = ImageFeatures.load(feature_loc, self.filesystem_cache)
        self._provenance[feature_loc] = features.provenance
        return features

    def loaded_provenance(self) -> dict[DataLocation, FeatureProvenance | None]:
        """What made each feature file loaded through this set so far (None: unknown origin)."""
        return dict(self._provenance)

    def load_arrays_in_batches(
        self, batch_size: int | None = 1000, random_seed: int | None = None
    ) -> Generator[tuple[np.ndarray, list[LabelId]], None, None]:
        """Like load_data_in_batches, but each batch is an (n, dim) float64 array and its labels."""
        feats: list[np.ndarray] = []
        labels: list[LabelId] = []
        buffered = 0
        for loc in self._ordered_keys(random_seed):
            x, y = self.load_features(loc).match_arrays(self._data[loc], source=loc.key)
            feats.append(x)
            labels.extend(y)
            buffered += len(y)
            while batch_size and buffered > batch_size:
                block = np.concatenate(feats)
                yield block[:batch_size], labels[:batch_size]
                feats, labels = [block[batch_size:]], labels[batch_size:]
                buffered -= batch_size
        if buffered:
            yield np.concatenate(feats), labels

    def load_data_in_batches(
        self, batch_size: int | None = 1000, random_seed: int | None = None
    ) -> Generator[Iterator[tuple[Any, ...]], None, None]:
        """Yield batches as pyspacer does: each unpacks to (feature vectors, labels).

        Images are visited in key order, or shuffled by ``random_seed``. An
        image's points may straddle two batches; only about one batch of
        features is held at a time.
        """
        feats: list[np.ndarray] = []
        labels: list[LabelId] = []
        for loc in self._ordered_keys(random_seed):
            x, y = self.load_features(loc).match_arrays(self._data[loc], source=loc.key)
            # Row views of the image's matrix: no copying of vectors.
            feats.extend(x)
            labels.extend(y)
            while batch_size and len(feats) > batch_size:
                yield iter((tuple(feats[:batch_size]), tuple(labels[:batch_size])))
                del feats[:batch_size], labels[:batch_size]
        if feats:
            yield iter((tuple(feats), tuple(labels)))

    def load_all_data(self, random_seed: int | None = None) -> FeatureLabelBatch:
        """Everything as one batch (features, labels)."""
        return next(self.load_data_in_batches(batch_size=None, random_seed=random_seed))  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, loc: DataLocation) -> list[Annotation]:
        return self._data[loc]

    def __contains__(self, loc: object) -> bool:
        return loc in self._data

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ImageLabels):
            return NotImplemented
        return self._data == other._data

    def _repr_fields(self) -> dict[str, Any]:
        fields = dict(vars(self))
        del fields["bare_keys"]  # ours alone (0.5.0's bare keys)
        del fields["_provenance"]  # ours alone
        return fields


def is_legacy_image_labels(data: Any) -> bool:
    """Whether ``data`` is pyspacer 0.5.0's ImageLabels JSON."""
    return isinstance(data, Mapping) and set(data) == {"data"} and isinstance(data["data"], Mapping)


def _annotations(where: str, raw: Any) -> list[Annotation]:
    if not isinstance(raw, (list, tuple)):
        raise InvalidDataError(f"{where}: annotations must be a list, got {type(raw).__name__}.")
    out = []
    for entry in raw:
        if not isinstance(entry, (list, tuple)) or len(entry) != 3:
            raise InvalidDataError(f"{where}: annotation {entry!r} is not [row, col, label].")
        out.append((entry[0], entry[1], entry[2]))
    return out


class PointFeatures(DataClass):
    """The feature vector of one point (row/col None in legacy files)."""

    def __init__(self, row: int | None, col: int | None, data: Any):
        self.row = row
        self.col = col
        self.data = np.asarray(data, dtype=float)

    @classmethod
    def example(cls) -> PointFeatures:
        return cls(row=100, col=100, data=np.array([1.1, 1.3, 1.12]))

    def serialize(self) -> dict[str, Any]:
        return {"row": self.row, "col": self.col, "data": self.data.tolist()}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PointFeatures):
            return NotImplemented
        return (
            self.row == other.row
            and self.col == other.col
            and self.data.shape == other.data.shape
            and bool(np.allclose(self.data, other.data))
        )


class ProvenanceMismatchError(PreconditionError):
    """Features or a classifier were made with other weights than the ones in use."""


def points_sha256(rows: Sequence[int] | np.ndarray, cols: Sequence[int] | np.ndarray) -> str:
    """A digest of (row, col) points in order: equal for the same points, whatever their array type."""
    digest = hashlib.sha256(b"rowcols:")
    digest.update(np.asarray(rows, dtype="<i8").tobytes())
    digest.update(b"|")
    digest.update(np.asarray(cols, dtype="<i8").tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class FeatureProvenance:
    """What made a feature file: the extractor class, a sha256 of its weights, and its points.

    ``weights_sha256`` is the sha256 of the extractor's weights file (for
    extractors with several files, one digest of all of them; empty for
    extractors without files). ``points_sha256`` is `points_sha256` of the
    file's rows and columns.
    """

    extractor: str
    weights_sha256: str
    points_sha256: str = ""
    # "fast" when a reduced-precision network made (most of) the features; "" for exact.
    precision: str = ""

    def same_source(self, other: FeatureProvenance) -> bool:
        """Whether both were computed by the same extractor with the same weights (points aside)."""
        return self.extractor == other.extractor and self.weights_sha256 == other.weights_sha256

    def source(self) -> dict[str, str]:
        """The extractor and weights digest as plain strings (what a classifier records)."""
        return {"extractor": self.extractor, "weights_sha256": self.weights_sha256}

    def describe(self) -> str:
        """Short text for messages: the extractor and the start of its weights digest."""
        weights = self.weights_sha256[:12] + "..." if self.weights_sha256 else "(none)"
        made = f" in {self.precision} precision" if self.precision else ""
        return f"{self.extractor} weights sha256 {weights}{made}"

    def to_json(self) -> str:
        fields = {
            "extractor": self.extractor,
            "weights_sha256": self.weights_sha256,
            "points_sha256": self.points_sha256,
        }
        if self.precision:  # exact files stay as before
            fields["precision"] = self.precision
        return json.dumps(fields, sort_keys=True)

    @classmethod
    def from_mapping(cls, data: Any, source: str) -> FeatureProvenance:
        """Read the form `to_json` writes (or a classifier's ``spacer_features_`` dict)."""
        if not isinstance(data, Mapping):
            raise InvalidDataError(f"{source}: provenance must be a JSON object, got {type(data).__name__}.")
        fields = {}
        for name in ("extractor", "weights_sha256", "points_sha256", "precision"):
            value = data.get(name, "")
            if not isinstance(value, str) or len(value) > 200:
                raise InvalidDataError(f"{source}: provenance field {name!r} must be short text.")
            fields[name] = value
        if not fields["extractor"]:
            raise InvalidDataError(f"{source}: provenance names no extractor.")
        return cls(**fields)


# Leading bytes of a zip archive (what savez_compressed writes).
_ZIP_MAGIC = b"PK\x03\x04"
# zlib level for feature files we write (see ImageFeatures.to_bytes); any level reads back the same.
FEATURE_FILE_COMPRESSLEVEL = 3
# The earliest time a zip entry can carry; fixed so output is reproducible.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
# The npz member holding FeatureProvenance as JSON text. pyspacer reads only
# the members it names (meta, rows, cols, feat), so it ignores this one.
_PROVENANCE_MEMBER = "provenance"
# A provenance member is a few hundred bytes; anything near this is not one.
_MAX_PROVENANCE_BYTES = 64 * 1024


def _npz_bytes(arrays: Mapping[str, np.ndarray], compresslevel: int) -> bytes:
    """An npz archive (what np.load reads) of ``arrays``, deflated at ``compresslevel``."""
    out = BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info._compresslevel = compresslevel  # type: ignore[attr-defined]  # public as compress_level from 3.13
            # numpy always forces zip64 here (numpy gh-10776); so do we.
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
    return out.getvalue()


class ImageFeatures(DataClass):
    """Feature vectors for the points of one image.

    Held as one (npoints, feature_dim) float64 array plus row/col arrays;
    ``point_features`` gives pyspacer's per-point view.
    """

    def __init__(
        self,
        point_features: Sequence[PointFeatures],
        valid_rowcol: bool,
        feature_dim: int,
        npoints: int,
    ):
        _require(len(point_features) > 0, "ImageFeatures needs at least one point.")
        _require(
            len(point_features) == npoints,
            f"npoints is {npoints} but {len(point_features)} point features were given.",
        )
        feat = np.stack([np.asarray(pf.data, dtype=float) for pf in point_features])
        rows = [pf.row for pf in point_features] if valid_rowcol else None
        cols = [pf.col for pf in point_features] if valid_rowcol else None
        self._init_arrays(feat, rows, cols, feature_dim)

    def _init_arrays(self, feat: np.ndarray, rows: Any, cols: Any, feature_dim: int | None = None) -> None:
        feat = np.asarray(feat, dtype=np.float64)
        _require(
            feat.ndim == 2 and feat.shape[0] > 0,
            f"Features must be a non-empty 2-d array, got shape {feat.shape}.",
        )
        _require(
            feature_dim is None or feat.shape[1] == feature_dim,
            f"feature_dim is {feature_dim} but the vectors have {feat.shape[1]} values.",
        )
        self._feat = feat
        self._rows: np.ndarray | None
        self._cols: np.ndarray | None
        self.valid_rowcol = rows is not None
        if self.valid_rowcol:
            self._rows = _point_indices(rows, "rows")
            self._cols = _point_indices(cols, "cols")
            _require(
                self._rows.size == feat.shape[0] and self._cols.size == feat.shape[0],
                "rows, cols and features must have the same number of points.",
            )
            # A repeated position maps to its last occurrence, as in pyspacer.
            self._rchash = {(int(r), int(c)): i for i, (r, c) in enumerate(zip(self._rows, self._cols))}
        else:
            self._rows = self._cols = None
            self._rchash = {}
        self._point_features: list[PointFeatures] | None = None
        # What made these features; None for files of unknown origin (pyspacer's).
        self.provenance: FeatureProvenance | None = None

    @classmethod
    def from_arrays(
        cls,
        feat: np.ndarray,
        rows: Sequence[int] | np.ndarray | None = None,
        cols: Sequence[int] | np.ndarray | None = None,
    ) -> ImageFeatures:
        """Build from a (npoints, dim) array and row/col arrays (None for legacy order-only features)."""
        if (rows is None) != (cols is None):
            raise InvalidDataError("Give both rows and cols, or neither.")
        obj = cls.__new__(cls)
        obj._init_arrays(feat, rows, cols)
        return obj

    @property
    def npoints(self) -> int:
        return int(self._feat.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self._feat.shape[1])

    @property
    def feat(self) -> np.ndarray:
        """All vectors, (npoints, feature_dim) float64, in point order."""
        return self._feat

    @property
    def rows(self) -> np.ndarray | None:
        return self._rows

    @property
    def cols(self) -> np.ndarray | None:
        return self._cols

    @property
    def point_features(self) -> list[PointFeatures]:
        if self._point_features is None:
            if self.valid_rowcol:
                assert self._rows is not None and self._cols is not None
                rcs: Iterable[tuple[int | None, int | None]] = zip(self._rows.tolist(), self._cols.tolist())
            else:
                rcs = [(None, None)] * self.npoints
            self._point_features = [PointFeatures(r, c, v) for (r, c), v in zip(rcs, self._feat)]
        return self._point_features

    def _index(self, rowcol: tuple[int, int]) -> int:
        if not self.valid_rowcol:
            raise InvalidInputError("Method not supported for legacy features")
        return self._rchash[(rowcol[0], rowcol[1])]

    def __getitem__(self, rowcol: tuple[int, int]) -> np.ndarray:
        """The vector at (row, col); KeyError if absent."""
        return self._feat[self._index(rowcol)]

    def get_array(self, rowcol: tuple[int, int]) -> np.ndarray:
        """The vector at (row, col) as a (1, dim) array, ready for ``clf.predict_proba``."""
        return self[rowcol].reshape(1, -1)

    def match_arrays(
        self, labels_data: Sequence[Annotation], source: str | None = None
    ) -> tuple[np.ndarray, list[LabelId]]:
        """Features (n, dim) and labels for each (row, col, label), in annotation order."""
        where = f"{source}: " if source else ""
        if not self.valid_rowcol:
            if source:
                raise RowColumnMissingError(
                    f"{source}: Features without rowcols are no longer supported for training."
                )
            raise RowColumnMissingError
        index = []
        for row, col, _ in labels_data:
            i = self._rchash.get((row, col))
            if i is None:
                raise RowColumnMismatchError(
                    f"{where}The labels' row-column positions don't match"
                    f" those of the feature vector (example: {(row, col)})."
                )
            index.append(i)
        return self._feat[np.asarray(index, dtype=np.intp)], [label for _, _, label in labels_data]

    def match_with_annotations(
        self, labels_data: Sequence[Annotation]
    ) -> Generator[FeatureLabelPair, None, None]:
        """Yield (feature vector, label) for each annotation; errors if a position is missing."""
        x, y = self.match_arrays(labels_data)
        yield from zip(x, y)

    @classmethod
    def example(cls) -> ImageFeatures:
        return cls.from_arrays(
            np.array([[1.1, 1.3, 1.12], [1.9, 1.3, 1.12]]), rows=[100, 120], cols=[100, 110]
        )

    @classmethod
    def deserialize(cls, data: Any) -> ImageFeatures:
        """Read the legacy JSON form: a list of per-point vectors, no rows/cols."""
        if not isinstance(data, list):
            raise InvalidDataError("Deserialize only supported for legacy format")
        _require(len(data) > 0, "Empty features file.")
        return cls.from_arrays(np.asarray(data, dtype=np.float64))

    def serialize(self) -> Any:
        raise NotImplementedError("Use .store() and .load() methods instead.")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ImageFeatures):
            return NotImplemented
        return (
            self.valid_rowcol == other.valid_rowcol
            and self._feat.shape == other._feat.shape
            and bool(np.allclose(self._feat, other._feat))
            and self._same_positions(other)
        )

    def _same_positions(self, other: ImageFeatures) -> bool:
        if self._rows is None or other._rows is None or self._cols is None or other._cols is None:
            return self._rows is None and other._rows is None
        return bool(np.array_equal(self._rows, other._rows) and np.array_equal(self._cols, other._cols))

    def _repr_fields(self) -> dict[str, Any]:
        # pyspacer holds a list of PointFeatures, and the (row, col) index
        # only when rows and columns are valid.
        fields: dict[str, Any] = {
            "point_features": self.point_features,
            "valid_rowcol": self.valid_rowcol,
            "feature_dim": self.feature_dim,
            "npoints": self.npoints,
        }
        if self.valid_rowcol:
            fields["_rchash"] = self._rchash
        return fields

    @classmethod
    def make_random(cls, point_labels: Sequence[LabelId], feature_dim: int) -> ImageFeatures:
        """Random vectors whose values lean on each point's label (for tests)."""
        feat = np.stack([hash(label) + np.random.randn(feature_dim) for label in point_labels])
        idx = list(range(len(point_labels)))
        return cls.from_arrays(feat, rows=idx, cols=idx)

    # --- file format -----------------------------------------------------

    def to_bytes(self, compresslevel: int = FEATURE_FILE_COMPRESSLEVEL) -> bytes:
        """The ``.featurevector`` bytes: an npz archive as pyspacer writes and reads.

        Same members, dtypes and deflate compression as pyspacer's
        ``np.savez_compressed``, but at zlib level ``compresslevel`` and with
        a fixed timestamp, so equal features give equal bytes. The default,
        3, writes about 4x faster than savez's level 6 for ~3% more bytes and
        reads as fast (level 1 writes faster still but reads 1.5x slower,
        and training reads each file every epoch).
        """
        if self.valid_rowcol:
            assert self._rows is not None and self._cols is not None
            for name, values in (("row", self._rows), ("column", self._cols)):
                if values.size and (values.min() < 0 or values.max() > np.iinfo(np.uint16).max):
                    raise InvalidInputError(f"A {name} outside 0..65535 cannot be stored in a feature file.")
            rows = self._rows.astype(np.uint16)
            cols = self._cols.astype(np.uint16)
        else:
            rows = cols = np.array([])
        meta = np.array([int(self.valid_rowcol), self.npoints, self.feature_dim], dtype=np.int64)
        arrays: dict[str, np.ndarray] = {"meta": meta, "rows": rows, "cols": cols, "feat": self._feat}
        if self.provenance is not None:
            arrays[_PROVENANCE_MEMBER] = np.array(self.provenance.to_json())
        return _npz_bytes(arrays, compresslevel)

    @classmethod
    def from_bytes(cls, raw: bytes, source: str = "<bytes>") -> ImageFeatures:
        """Parse a ``.featurevector`` (npz, or the legacy JSON list)."""
        if raw[:4] == _ZIP_MAGIC:
            try:
                limits.current().check_npz(raw, source)  # sizes, before anything is inflated
                with np.load(BytesIO(raw), allow_pickle=False) as npz:
                    meta, feat = npz["meta"], npz["feat"]
                    if int(meta[0]):
                        features = cls.from_arrays(feat, rows=npz["rows"], cols=npz["cols"])
                    else:
                        features = cls.from_arrays(feat)
                    features.provenance = _npz_provenance(npz, source)
                    return features
            except (KeyError, ValueError, OSError, zipfile.BadZipFile, InvalidDataError) as err:
                raise InvalidDataError(f"{source}: not a valid feature file ({err}).") from err
        data = parse_json(raw, f"{source}: not a feature file, neither npz nor JSON")
        try:
            return cls.deserialize(data)
        except (InvalidDataError, ValueError, TypeError) as err:
            raise InvalidDataError(f"{source}: not a valid legacy feature file ({err}).") from err

    @classmethod
    def provenance_from_bytes(cls, raw: bytes, source: str = "<bytes>") -> FeatureProvenance | None:
        """The provenance of a ``.featurevector`` without reading its features (None: unknown origin)."""
        if raw[:4] != _ZIP_MAGIC:
            return None  # the legacy JSON form never carries one
        try:
            limits.current().check_npz(raw, source)
            with np.load(BytesIO(raw), allow_pickle=False) as npz:
                return _npz_provenance(npz, source)
        except (KeyError, ValueError, OSError, zipfile.BadZipFile) as err:
            raise InvalidDataError(f"{source}: not a valid feature file ({err}).") from err

    @classmethod
    def load_provenance(cls, loc: DataLocation) -> FeatureProvenance | None:
        """The provenance recorded in the feature file at ``loc`` (None: unknown origin).

        A local file is read no further than its provenance member, so checking
        a folder of feature files costs little more than listing it.
        """
        if loc.storage_type != "filesystem":
            return cls.provenance_from_bytes(load_bytes(loc).getvalue(), source=loc.key)
        with open_local(loc) as f:
            if f.read(4) != _ZIP_MAGIC:
                return None
            f.seek(0)
            try:
                with zipfile.ZipFile(f) as archive:
                    try:
                        info = archive.getinfo(_PROVENANCE_MEMBER + ".npy")
                    except KeyError:
                        return None
                    if info.file_size > _MAX_PROVENANCE_BYTES:
                        raise InvalidDataError(f"{loc.key}: the feature file's provenance is too large.")
                    value = np.lib.format.read_array(BytesIO(archive.read(info)), allow_pickle=False)
            except (ValueError, OSError, zipfile.BadZipFile) as err:
                raise InvalidDataError(f"{loc.key}: not a valid feature file ({err}).") from err
        return _provenance_value(value, loc.key)

    @classmethod
    def load(cls, loc: DataLocation, filesystem_cache: str | None = None) -> ImageFeatures:
        """Read features from ``loc``; remote files may be cached under ``filesystem_cache``."""
        return cls.from_bytes(load_bytes(loc, filesystem_cache).getvalue(), source=loc.key)

    def store(self, loc: DataLocation) -> None:
        """Write the npz feature file to ``loc``."""
        store_bytes(loc, self.to_bytes())


def _npz_provenance(npz: Any, source: str) -> FeatureProvenance | None:
    if _PROVENANCE_MEMBER not in npz.files:
        return None
    return _provenance_value(npz[_PROVENANCE_MEMBER], source)


def _provenance_value(value: np.ndarray, source: str) -> FeatureProvenance:
    if value.dtype.kind != "U" or value.shape != ():
        raise InvalidDataError(f"{source}: the feature file's provenance is not a text value.")
    return FeatureProvenance.from_mapping(
        parse_json(str(value.item()), f"{source}: unreadable provenance"), source
    )


class ValResults(DataClass):
    """Validation results; ``gt`` and ``est`` are indices into ``classes``."""

    def __init__(
        self, scores: Sequence[float], gt: Sequence[int], est: Sequence[int], classes: Sequence[LabelId]
    ):
        _require(len(gt) == len(est) == len(scores), "scores, gt and est must have the same length.")
        if gt:
            _require(0 <= min(gt) and max(gt) < len(classes), "gt holds an index outside classes.")
            _require(0 <= min(est) and max(est) < len(classes), "est holds an index outside classes.")
        self.scores = scores
        self.gt = gt
        self.est = est
        self.classes = classes

    @classmethod
    def example(cls) -> ValResults:
        return cls(scores=[0.9, 0.8, 0.7], gt=[0, 1, 0], est=[0, 1, 1], classes=[121, 1222])

    @classmethod
    def deserialize(cls, data: Mapping[str, Any]) -> ValResults:
        return cls(scores=data["scores"], gt=data["gt"], est=data["est"], classes=data["classes"])
