"""Where data lives: filesystem, process memory, URLs and S3, behind one interface.

Also the loaders and savers for images and classifiers, which pyspacer keeps
here too.
"""

from __future__ import annotations

import abc
import os
import pickle
import tempfile
import threading
import urllib.request
from collections import OrderedDict
from http.client import HTTPException
from io import BytesIO
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Hashable, Union
from urllib.error import URLError

from PIL import Image

from spacer_core import config
from spacer_core.exceptions import URLDownloadError

if TYPE_CHECKING:
    from sklearn.calibration import CalibratedClassifierCV

    from spacer_core.data_classes import DataLocation

# Anything store() accepts: a BytesIO (pyspacer's type), any binary file
# object, or plain bytes.
Payload = Union[BytesIO, IO[bytes], bytes, bytearray, memoryview]


def _payload_bytes(stream: Payload) -> bytes | bytearray | memoryview:
    if isinstance(stream, (bytes, bytearray, memoryview)):
        return stream
    if isinstance(stream, BytesIO):
        return stream.getbuffer()
    stream.seek(0)
    return stream.read()


class Storage(abc.ABC):
    """A keyed blob store."""

    @abc.abstractmethod
    def store(self, key: str, stream: Payload) -> None:
        """Save the whole content of ``stream`` under ``key``."""

    @abc.abstractmethod
    def load(self, key: str) -> BytesIO:
        """Return the content under ``key``."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether ``key`` holds content."""


class FileSystemStorage(Storage):
    """Files on local disk; the key is the path."""

    def store(self, key: str, stream: Payload) -> None:
        write_file_atomic(key, _payload_bytes(stream))

    def load(self, key: str) -> BytesIO:
        with open(key, "rb") as f:
            return BytesIO(f.read())

    def delete(self, key: str) -> None:
        os.remove(key)

    def exists(self, key: str) -> bool:
        return os.path.exists(key)


def _current_umask() -> int:
    # os.umask can only be read by setting it; done once, at import, before
    # any threads of ours exist.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def write_file_atomic(path: str | os.PathLike[str], data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never a part.

    Parent directories are created as needed. The file gets the permissions
    a plain ``open(path, 'wb')`` would give it (mkstemp's are owner-only).
    """
    target = Path(path)
    parent = target.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            f.write(data)
        os.replace(tmp_name, target)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise


class MemoryStorage(Storage):
    """Blobs held in this process's memory (tests, and chaining tasks without disk)."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def store(self, key: str, stream: Payload) -> None:
        data = bytes(_payload_bytes(stream))
        with self._lock:
            self.blobs[key] = data

    def load(self, key: str) -> BytesIO:
        return BytesIO(self.get_bytes(key))

    def get_bytes(self, key: str) -> bytes:
        """The stored bytes object itself (no copy)."""
        try:
            return self.blobs[key]
        except KeyError:
            raise KeyError(f"No blob with key {key!r} in memory storage.") from None

    def delete(self, key: str) -> None:
        with self._lock:
            try:
                del self.blobs[key]
            except KeyError:
                raise KeyError(f"No blob with key {key!r} in memory storage.") from None

    def exists(self, key: str) -> bool:
        return key in self.blobs


class RemoteStorage(Storage):
    """Storage across the network; loads may go through a local file cache."""

    def load(self, key: str, filesystem_cache: str | None = None) -> BytesIO:
        """Load ``key``; with ``filesystem_cache``, keep a copy at ``<cache>/<key>`` and reuse it."""
        if not filesystem_cache:
            return self._load_remote(key)
        cache_path = str(Path(filesystem_cache, key))
        local = FileSystemStorage()
        if local.exists(cache_path):
            return local.load(cache_path)
        stream = self._load_remote(key)
        local.store(cache_path, stream)
        stream.seek(0)
        return stream

    @abc.abstractmethod
    def _load_remote(self, key: str) -> BytesIO:
        """Fetch ``key`` from the remote store."""


class URLStorage(RemoteStorage):
    """Read-only HTTP(S) access; the key is the URL."""

    # Applies to connecting and to each idle gap while reading.
    TIMEOUT = 20.0

    def store(self, key: str, stream: Payload) -> None:
        raise TypeError("Store operation not supported for URL storage.")

    def delete(self, key: str) -> None:
        raise TypeError("Delete operation not supported for URL storage.")

    def _load_remote(self, key: str) -> BytesIO:
        try:
            response = urllib.request.urlopen(key, timeout=self.TIMEOUT)
        except (TimeoutError, URLError, ValueError, HTTPException, OSError) as err:
            raise URLDownloadError(f"Failed to download from the URL '{key}'.", err) from err
        try:
            with response:
                return BytesIO(response.read())
        except (TimeoutError, HTTPException, OSError) as err:
            raise URLDownloadError(f"Couldn't read the full response from the URL '{key}'.", err) from err

    def exists(self, key: str) -> bool:
        """Best effort: True when a HEAD request succeeds."""
        try:
            request = urllib.request.Request(key, method="HEAD")
        except ValueError:
            return False
        try:
            with urllib.request.urlopen(request, timeout=self.TIMEOUT):
                return True
        except (TimeoutError, URLError, HTTPException, OSError):
            return False


class S3Storage(RemoteStorage):
    """Objects in one S3 bucket (or an S3-compatible store at AWS_ENDPOINT_URL)."""

    def __init__(self, bucket_name: str):
        from boto3.s3.transfer import TransferConfig

        self.bucket_name = bucket_name
        # Threaded transfers fail at interpreter shutdown and gain nothing
        # for feature-sized objects.
        self.transfer_config = TransferConfig(use_threads=False)

    @staticmethod
    def _s3() -> Any:
        from spacer_core.aws import get_s3_resource

        return get_s3_resource()

    def store(self, key: str, stream: Payload) -> None:
        self._s3().Bucket(self.bucket_name).put_object(Body=bytes(_payload_bytes(stream)), Key=key)

    def _load_remote(self, key: str) -> BytesIO:
        stream = BytesIO()
        self._s3().Object(self.bucket_name, key).download_fileobj(stream, Config=self.transfer_config)
        stream.seek(0)
        return stream

    def delete(self, key: str) -> None:
        self._s3().Object(self.bucket_name, key).delete()

    def exists(self, key: str) -> bool:
        """False only when S3 answers 404; any other error propagates."""
        import botocore.exceptions

        try:
            self._s3().Object(self.bucket_name, key).load()
        except botocore.exceptions.ClientError as err:
            if err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return False
            raise
        return True


_memory_storage: MemoryStorage | None = None
_memory_lock = threading.Lock()


def clear_memory_storage() -> None:
    """Drop everything held in the process-wide memory storage."""
    global _memory_storage
    with _memory_lock:
        _memory_storage = None


def _global_memory_storage() -> MemoryStorage:
    global _memory_storage
    with _memory_lock:
        if _memory_storage is None:
            _memory_storage = MemoryStorage()
        return _memory_storage


def storage_factory(storage_type: str, bucket_name: str | None = None) -> Storage:
    """The Storage for a DataLocation's ``storage_type`` (and bucket, for s3)."""
    if storage_type == "filesystem":
        return FileSystemStorage()
    if storage_type == "memory":
        return _global_memory_storage()
    if storage_type == "url":
        return URLStorage()
    if storage_type == "s3":
        if bucket_name is None:
            raise ValueError("bucket_name must be a string for s3 storage")
        return S3Storage(bucket_name=bucket_name)
    raise ValueError(f"Unknown storage type {storage_type!r}; expected one of {config.STORAGE_TYPES}.")


def _storage_for(loc: DataLocation) -> Storage:
    return storage_factory(loc.storage_type, loc.bucket_name)


def load_bytes(loc: DataLocation, filesystem_cache: str | None = None) -> BytesIO:
    """The content at ``loc`` (remote locations may use ``filesystem_cache``)."""
    storage = _storage_for(loc)
    if isinstance(storage, RemoteStorage):
        return storage.load(loc.key, filesystem_cache)
    return storage.load(loc.key)


def store_bytes(loc: DataLocation, data: Payload) -> None:
    """Save ``data`` at ``loc``."""
    _storage_for(loc).store(loc.key, data)


def store_image(loc: DataLocation, img: Image.Image) -> None:
    """Save ``img`` at ``loc`` as JPEG."""
    stream = BytesIO()
    img.save(stream, "JPEG")
    _storage_for(loc).store(loc.key, stream)


def load_image(loc: DataLocation) -> Image.Image:
    """Open the image at ``loc`` with Pillow (lazily decoded; truncated files allowed)."""
    return Image.open(_storage_for(loc).load(loc.key))


def store_classifier(loc: DataLocation, clf: CalibratedClassifierCV) -> None:
    """Pickle a fitted classifier to ``loc`` (protocol 2, readable by every pyspacer)."""
    if not hasattr(clf, "calibrated_classifiers_"):
        raise ValueError("Only fitted classifiers can be stored.")
    _storage_for(loc).store(loc.key, pickle.dumps(clf, protocol=2))
    _classifier_cache.forget(loc)


class _ClassifierCache:
    """A few recently loaded classifiers, reloaded when a local file changes.

    pyspacer caches by location alone, which serves a stale model after a
    file is overwritten; local files and memory blobs are therefore keyed on
    their current state too. Remote locations are keyed on location alone.
    """

    def __init__(self, maxsize: int = 3):
        self.maxsize = maxsize
        self._entries: OrderedDict[DataLocation, tuple[Hashable, Any, CalibratedClassifierCV]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _version(loc: DataLocation) -> tuple[Hashable, Any]:
        # Returns (version token, object kept alive with the entry).
        if loc.storage_type == "filesystem":
            st = os.stat(loc.key)
            return (st.st_mtime_ns, st.st_size, st.st_ino), None
        if loc.storage_type == "memory":
            blob = _global_memory_storage().get_bytes(loc.key)
            # Holding the blob keeps its id from being reused while cached.
            return id(blob), blob
        return None, None

    def get(self, loc: DataLocation) -> CalibratedClassifierCV:
        from spacer_core.legacy import load_classifier_bytes

        version, keepalive = self._version(loc)
        with self._lock:
            entry = self._entries.get(loc)
            if entry is not None and entry[0] == version:
                self._entries.move_to_end(loc)
                return entry[2]
        if loc.storage_type == "memory":
            data: bytes = keepalive
        else:
            data = _storage_for(loc).load(loc.key).getvalue()
        clf = load_classifier_bytes(data, source=loc.key)
        with self._lock:
            self._entries[loc] = (version, keepalive, clf)
            self._entries.move_to_end(loc)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        return clf

    def forget(self, loc: DataLocation) -> None:
        with self._lock:
            self._entries.pop(loc, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_classifier_cache = _ClassifierCache()


def load_classifier(loc: DataLocation) -> CalibratedClassifierCV:
    """Unpickle the classifier at ``loc``, upgrading pickles from older scikit-learn.

    Recently loaded classifiers are cached (``load_classifier.cache_clear()``
    empties the cache, as with pyspacer's lru_cache).
    """
    return _classifier_cache.get(loc)


load_classifier.cache_clear = _classifier_cache.clear  # type: ignore[attr-defined]


def __getattr__(name: str) -> Any:
    # pyspacer exposes these here; importing them lazily keeps scikit-learn
    # and boto3 out of processes that never load a classifier or touch S3.
    if name == "ClassifierUnpickler":
        from spacer_core.legacy import ClassifierUnpickler

        return ClassifierUnpickler
    if name == "get_s3_resource":
        from spacer_core.aws import get_s3_resource

        return get_s3_resource
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
