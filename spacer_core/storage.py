"""Where data lives: filesystem, process memory, URLs and S3, behind one interface.

Also the loaders and savers for images and classifiers, which pyspacer keeps
here too.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import os
import pickle
import re
import stat
import sys
import threading
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from io import BytesIO
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

from PIL import Image

from spacer_core import config, urlfetch
from spacer_core.atomic import write_atomic, write_atomic_at
from spacer_core.exceptions import (
    AccessDeniedError,
    InvalidInputError,
    MalformedURLError,
    PreconditionError,
    SpacerError,
    StorageFileNotFoundError,
    StorageKeyError,
    StorageMissingObjectError,
    StorageRequestError,
    StorageUnavailableError,
    UnknownStorageTypeError,
    URLDownloadError,  # noqa: F401  (pyspacer exposes it here)
)
from spacer_core.locations import Location
from spacer_core.urlfetch import UrlRules

if TYPE_CHECKING:
    from sklearn.calibration import CalibratedClassifierCV

# Anything store() accepts: a BytesIO (pyspacer's type), any binary file
# object, or plain bytes.
Payload = BytesIO | IO[bytes] | bytes | bytearray | memoryview


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

    def open(self, key: str) -> IO[bytes]:
        """The file at ``key``, open for reading (a regular file; a FIFO never blocks)."""
        return _regular_file(os.open(key, os.O_RDONLY | _O_CLOEXEC | os.O_NONBLOCK), key)

    def store(self, key: str, stream: Payload) -> None:
        write_file_atomic(key, _payload_bytes(stream))

    def load(self, key: str) -> BytesIO:
        with self.open(key) as f:
            return BytesIO(f.read())

    def delete(self, key: str) -> None:
        os.remove(key)

    def exists(self, key: str) -> bool:
        return os.path.exists(key)


_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | _O_CLOEXEC


def _regular_file(fd: int, key: str, hard_links: bool = True) -> IO[bytes]:
    """``fd`` as a binary file object, refused (and closed) unless it is a regular file
    (with one name, unless ``hard_links``)."""
    try:
        info = os.fstat(fd)
        mode = info.st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", key)
        if not stat.S_ISREG(mode):
            raise InvalidInputError(f"{key!r} is not a regular file", location=key)
        if not hard_links and info.st_nlink > 1:
            # Another name of this file may lie outside the roots; the path check cannot see it.
            # The message says nothing of the file's content.
            raise AccessDeniedError(
                f"{key!r} has more than one hard link; files under the data roots are read only"
                " through their one name (the operator may allow hard links)",
                location=key,
            )
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


class ConfinedFileSystemStorage(FileSystemStorage):
    """Files under fixed root directories, each opened once and without a race.

    The key is resolved (``realpath``) and must lie under a root; the file is
    then reached from the root's directory descriptor one component at a
    time with ``O_NOFOLLOW`` (``openat``), along the resolved path. A symlink
    swapped in after the check is never followed: the open fails instead.
    Writes go to a temporary file in the directory reached that way and are
    renamed within it, so they land there or nowhere. Unless
    ``allow_hard_links``, a file with more than one hard link is not read:
    a link to an outside file passes every path check.
    """

    def __init__(
        self, roots: Sequence[Path], read_only: Sequence[Path] = (), *, allow_hard_links: bool = False
    ):
        self.roots = tuple(roots)
        self.read_only = tuple(read_only)
        self.allow_hard_links = allow_hard_links

    def _outside(self, key: str) -> AccessDeniedError:
        return AccessDeniedError(f"{key!r} is outside the allowed data roots", location=key)

    @contextlib.contextmanager
    def _parent(self, key: str, create: bool = False, write: bool = False) -> Iterator[tuple[int, str]]:
        """(descriptor of the key's resolved parent directory, file name), the walk race-free."""
        real = Path(os.path.realpath(key))
        root = next((r for r in self.roots if real.is_relative_to(r)), None)
        if root is None:
            raise self._outside(key)
        if write:
            # Checked on the very path walked below, so a symlink swapped in
            # after the policy's check cannot steer a write into these folders.
            refuse_read_only(self.read_only, real, key)
        parts = real.relative_to(root).parts
        if not parts:
            raise IsADirectoryError(errno.EISDIR, "is a directory", key)
        fd = os.open(root, _O_DIR)
        try:
            for part in parts[:-1]:
                try:
                    child = self._open_dir(fd, part, key)
                except FileNotFoundError:
                    if not create:
                        raise
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o777, dir_fd=fd)
                    child = self._open_dir(fd, part, key)
                os.close(fd)
                fd = child
            yield fd, parts[-1]
        finally:
            os.close(fd)

    def _open_dir(self, dir_fd: int, name: str, key: str) -> int:
        try:
            return os.open(name, _O_DIR | os.O_NOFOLLOW, dir_fd=dir_fd)
        except OSError as err:
            if err.errno == errno.ENOTDIR and not stat.S_ISLNK(
                os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
            ):
                raise  # a file where the path names a folder: a bad path, not an escape
            if err.errno in (errno.ELOOP, errno.ENOTDIR):
                # A symlink where the checked path had a folder: swapped in after the check.
                raise self._outside(key) from None
            raise

    def open(self, key: str) -> IO[bytes]:
        with self._parent(key) as (dir_fd, name):
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _O_CLOEXEC, dir_fd=dir_fd)
            except OSError as err:
                if err.errno == errno.ELOOP:
                    raise self._outside(key) from None
                raise
        return _regular_file(fd, key, self.allow_hard_links)

    def store(self, key: str, stream: Payload) -> None:
        with self._parent(key, create=True, write=True) as (dir_fd, name):
            write_atomic_at(dir_fd, name, _payload_bytes(stream))

    def delete(self, key: str) -> None:
        with self._parent(key, write=True) as (dir_fd, name):
            os.unlink(name, dir_fd=dir_fd)

    def exists(self, key: str) -> bool:
        try:
            with self._parent(key) as (dir_fd, name):
                os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True


def write_file_atomic(path: str | os.PathLike[str], data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` to ``path`` atomically (`spacer_core.atomic.write_atomic`: same-folder
    temporary, fsync, rename; new files 0o644 minus the umask), creating parent folders."""
    write_atomic(path, data)


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
            raise StorageKeyError(f"No blob with key {key!r} in memory storage.", location=key) from None

    def delete(self, key: str) -> None:
        with self._lock:
            try:
                del self.blobs[key]
            except KeyError:
                raise StorageKeyError(f"No blob with key {key!r} in memory storage.", location=key) from None

    def exists(self, key: str) -> bool:
        return key in self.blobs


class RemoteStorage(Storage):
    """Storage across the network; loads may go through a local file cache."""

    def load(self, key: str, filesystem_cache: str | None = None) -> BytesIO:
        """Load ``key``; with ``filesystem_cache``, keep a copy at ``<cache>/<key>`` and reuse it."""
        if not filesystem_cache:
            return self._load_remote(key)
        cache_path = cache_path_for(filesystem_cache, key)
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


def cache_path_for(cache_dir: str | os.PathLike[str], key: str) -> str:
    """``<cache_dir>/<key>`` (pyspacer's cache layout), refused if it would lie outside ``cache_dir``.

    A remote key is chosen by whoever wrote the message: ``..`` segments, an
    absolute key or a symlink in the cache must not turn a download into a
    write elsewhere on disk.
    """
    root = Path(os.path.realpath(cache_dir))
    path = Path(os.path.realpath(Path(root, key)))
    if path == root or not path.is_relative_to(root):
        raise AccessDeniedError(f"{key!r}: the key leads outside the local cache folder", location=key)
    return str(path)


class URLStorage(RemoteStorage):
    """Read-only HTTP(S) access; the key is the URL.

    Fetches go through spacer_core.urlfetch under ``rules`` (default: the
    class attribute ``default_rules``, which refuses private addresses).
    """

    # Applies to connecting and to each idle gap while reading.
    TIMEOUT = 20.0
    default_rules = UrlRules()

    def __init__(self, rules: UrlRules | None = None):
        self.rules = rules if rules is not None else self.default_rules

    def store(self, key: str, stream: Payload) -> None:
        raise TypeError("Store operation not supported for URL storage.")

    def delete(self, key: str) -> None:
        raise TypeError("Delete operation not supported for URL storage.")

    def _load_remote(self, key: str) -> BytesIO:
        return BytesIO(urlfetch.fetch(key, self.rules, self.TIMEOUT))

    def exists(self, key: str) -> bool:
        """Best effort: True when a HEAD request succeeds."""
        return urlfetch.exists(key, self.rules, self.TIMEOUT)


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
    """The Storage for a Location's ``storage_type`` (and bucket, for s3).

    The objects it returns read and write without consulting the storage
    policy; the library itself goes through the location functions below.
    """
    if storage_type == "filesystem":
        return FileSystemStorage()
    if storage_type == "memory":
        return _global_memory_storage()
    if storage_type == "url":
        return URLStorage()
    if storage_type == "s3":
        if bucket_name is None:
            raise InvalidInputError("bucket_name must be a string for s3 storage")
        return S3Storage(bucket_name=bucket_name)
    raise UnknownStorageTypeError(
        f"Unknown storage type {storage_type!r}; expected one of {config.STORAGE_TYPES}."
    )


# --- the policy seam ----------------------------------------------------------

Access = Literal["read", "write", "delete"]


class StoragePolicy:
    """Decides which locations may be read, written or deleted.

    The base class allows everything (pyspacer's behaviour, the library's
    default). Subclasses refuse with `AccessDeniedError`; a refusal never
    says whether the location exists.

    `url_rules` are the rules url storage fetches under while this policy is
    active; None keeps `URLStorage.default_rules`.

    `read_only` are folders (resolved) whose files may be read but never
    written or deleted, whatever `check` allows; the storage gate enforces
    them for every policy (`refuse_read_only`).
    """

    url_rules: UrlRules | None = None
    read_only: tuple[Path, ...] = ()

    def check(self, loc: Location, access: Access) -> None:
        """Raise AccessDeniedError when `access` to `loc` is not allowed."""

    def describe(self) -> str:
        return "any location"

    def filesystem_roots(self) -> tuple[Path, ...] | None:
        """The directories filesystem locations are confined to (None: not confined)."""
        return None

    def hard_links_allowed(self) -> bool:
        """Whether a file under the roots with more than one hard link may be read."""
        return True


ALLOW_ALL = StoragePolicy()


def _resolved_folders(folders: Sequence[str | os.PathLike[str]]) -> tuple[Path, ...]:
    return tuple(Path(os.path.realpath(f)) for f in folders)


def refuse_read_only(read_only: Sequence[Path], real: Path, loc: Location | str) -> None:
    """Raise AccessDeniedError when the resolved path `real` lies in one of the `read_only` folders."""
    for folder in read_only:
        if real.is_relative_to(folder):
            key = loc.key if isinstance(loc, Location) else loc
            raise AccessDeniedError(
                f"{key!r} lies in a read-only folder: it may be read, not written", location=loc
            )


class DataRootsPolicy(StoragePolicy):
    """Filesystem locations only under the given directories (symlinks resolved).

    Other storage types are left to `others` (allowed by default). Files
    under `read_only` folders may be read, never written or deleted.
    A file with more than one hard link is not read unless `allow_hard_links`: its
    other name may lie outside the roots, and no path check can tell.
    """

    def __init__(
        self,
        roots: Sequence[str | os.PathLike[str]],
        others: StoragePolicy = ALLOW_ALL,
        *,
        read_only: Sequence[str | os.PathLike[str]] = (),
        allow_hard_links: bool = False,
    ):
        if not roots:
            raise ValueError("DataRootsPolicy needs at least one root")
        self.roots = tuple(Path(os.path.realpath(r)) for r in roots)
        self.others = others
        self.read_only = _resolved_folders(read_only)
        self.allow_hard_links = allow_hard_links

    def check(self, loc: Location, access: Access) -> None:
        if loc.storage_type != "filesystem":
            self.others.check(loc, access)
            return
        # realpath resolves `..` and every symlink, also of a path that does
        # not exist yet (a file about to be written).
        path = Path(os.path.realpath(loc.key))
        if not any(path.is_relative_to(root) for root in self.roots):
            raise AccessDeniedError(f"{loc.key!r} is outside the allowed data roots", location=loc)

    def describe(self) -> str:
        text = "filesystem under " + ", ".join(map(str, self.roots))
        if self.read_only:
            text += " (read-only: " + ", ".join(map(str, self.read_only)) + ")"
        if not self.allow_hard_links:
            text += " (hard-linked files refused)"
        return text

    def filesystem_roots(self) -> tuple[Path, ...] | None:
        return self.roots

    def hard_links_allowed(self) -> bool:
        return self.allow_hard_links


# Names Python may import or run: a client never needs to write one.
_CODE_SUFFIXES = frozenset({".py", ".pyc", ".pyo", ".pyw", ".pth", ".so", ".pyd"})


def _importable(key: str) -> bool:
    # normpath first: "server.py/" and "server.py/." name the file server.py.
    return os.path.splitext(os.path.normpath(key))[1].lower() in _CODE_SUFFIXES


class ClientPolicy(StoragePolicy):
    """What the clients of a server may reach, for every storage type.

    roots: filesystem locations must resolve under one of these directories
        (None: any path the process can reach).
    s3_buckets: the buckets s3 locations may name (None: any bucket).
    allow_memory: whether `memory` locations may be named; off by default,
        since the process-wide memory store is shared by every caller.
    url_rules: what url locations may fetch (`UrlRules`; private addresses
        refused unless `allow_private`).
    read_only: folders clients may read from but never write to (a served
        model repository).
    allow_hard_links: read files under `roots` that have more than one hard
        link (off by default: see `DataRootsPolicy`).
    """

    def __init__(
        self,
        roots: Sequence[str | os.PathLike[str]] | None,
        *,
        s3_buckets: Sequence[str] | None = None,
        allow_memory: bool = False,
        url_rules: UrlRules = UrlRules(),  # noqa: B008 (frozen, shared safely)
        read_only: Sequence[str | os.PathLike[str]] = (),
        allow_hard_links: bool = False,
    ):
        self.read_only = _resolved_folders(read_only)
        self.filesystem = (
            DataRootsPolicy(roots, read_only=read_only, allow_hard_links=allow_hard_links)
            if roots is not None
            else None
        )
        self.s3_buckets = frozenset(s3_buckets) if s3_buckets is not None else None
        self.allow_memory = allow_memory
        self.url_rules: UrlRules = url_rules

    def check(self, loc: Location, access: Access) -> None:
        if loc.storage_type == "filesystem":
            if access == "write" and _importable(loc.key):
                # A data root may be a working directory Python imports from.
                raise AccessDeniedError(
                    f"{loc.key!r}: clients may not write Python code files "
                    f"({', '.join(sorted(_CODE_SUFFIXES))})",
                    location=loc,
                )
            if self.filesystem is not None:
                self.filesystem.check(loc, access)
        elif loc.storage_type == "memory":
            if not self.allow_memory:
                raise AccessDeniedError(
                    f"{loc.describe()!r}: memory storage is not available to clients", location=loc
                )
        elif loc.storage_type == "s3":
            if self.s3_buckets is not None and loc.bucket_name not in self.s3_buckets:
                raise AccessDeniedError(
                    f"{loc.describe()!r}: bucket {loc.bucket_name!r} is not allowed", location=loc
                )

    def describe(self) -> str:
        parts = [self.filesystem.describe() if self.filesystem else "filesystem anywhere"]
        if self.read_only and self.filesystem is None:
            parts.append("read-only " + ", ".join(map(str, self.read_only)))
        parts.append(
            "s3 buckets " + ", ".join(sorted(self.s3_buckets))
            if self.s3_buckets is not None
            else "any s3 bucket"
        )
        parts.append("private urls " + ("allowed" if self.url_rules.allow_private else "refused"))
        parts.append("memory " + ("allowed" if self.allow_memory else "refused"))
        return "; ".join(parts)

    def filesystem_roots(self) -> tuple[Path, ...] | None:
        return self.filesystem.roots if self.filesystem is not None else None

    def hard_links_allowed(self) -> bool:
        return self.filesystem is None or self.filesystem.allow_hard_links


_policy: ContextVar[StoragePolicy | None] = ContextVar("spacer_storage_policy", default=None)


def active_policy() -> StoragePolicy:
    """The policy that applies to storage access from this context."""
    return _policy.get() or ALLOW_ALL


def policy_scope(policy: StoragePolicy) -> contextlib.AbstractContextManager[StoragePolicy]:
    """Apply `policy` to every storage access made in this context (and copies of it)."""
    return config.scoped(_policy, policy)


def check_access(loc: Location, access: Access) -> None:
    """Raise AccessDeniedError unless the active policy allows `access` to `loc`.

    For code that must open a local file itself (a path handed to another
    library); everything else goes through the functions below, which check.
    """
    _allowed(loc, access)


def _allowed(loc: Location, access: Access, *, names_a_file: bool = False) -> StoragePolicy:
    """The checks every access passes, in one place: the key, the active policy, its read-only folders.

    `names_a_file`: the location is a file to read or write (not a folder such as a
    feature cache), so its key may not name a folder and a URL must be well formed.
    """
    _check_key(loc)  # first: the checks below read the key as text
    if names_a_file:
        _check_file_key(loc)
        if loc.storage_type == "url":
            _check_url(loc)
    policy = active_policy()
    policy.check(loc, access)
    if access != "read" and policy.read_only and loc.storage_type == "filesystem":
        refuse_read_only(policy.read_only, Path(os.path.realpath(loc.key)), loc)
    return policy


# --- outputs of one request ----------------------------------------------------

# A request's locations by field name: one location, or several under one name
# (the feature files of a label set, a list of previous models).
NamedLocations = Mapping[str, "Location | Iterable[Location] | None"]


def normalised(loc: Location) -> tuple[str, str, str]:
    """What `loc` names, for comparing locations: storage type, bucket, and the key
    (a filesystem key with `..` and every symlink resolved)."""
    key = loc.key
    if loc.storage_type == "filesystem" and isinstance(key, str) and key and "\0" not in key:
        key = os.path.realpath(key)
    return (loc.storage_type, loc.bucket_name or "", key)


def _named(fields: NamedLocations) -> Iterator[tuple[str, Location]]:
    for name, value in fields.items():
        if value is None:
            continue
        if isinstance(value, Location):
            yield name, value
        else:
            yield from ((name, loc) for loc in value)


def check_outputs(inputs: NamedLocations, outputs: NamedLocations) -> None:
    """Refuse a request whose outputs name one of its inputs or each other.

    An output written over an input destroys the data the request reads
    (or has just read), and two outputs at one place leave only the last.
    Each output is first checked against the active policy for writing, so
    the comparison never speaks about a location the caller may not write.
    Raises InvalidInputError naming both fields.
    """
    seen: dict[tuple[str, str, str], str] = {}
    written: dict[tuple[str, str, str], Location] = {}
    for name, loc in _named(outputs):
        require_writable(loc)
        check_access(loc, "write")
        where = normalised(loc)
        if where in seen:
            raise InvalidInputError(
                f"{name} and {seen[where]} name the same location {loc.describe()!r}: "
                "each output needs a location of its own",
                location=loc,
            )
        seen[where] = name
        written[where] = loc
    if not seen:
        return
    for name, loc in _named(inputs):
        where = normalised(loc)
        output = seen.get(where)
        if output is not None:
            raise InvalidInputError(
                f"{output} names the same location as {name} ({loc.describe()!r}): "
                "an output may not overwrite an input of the same request",
                location=written[where],
            )


# The bucket names boto accepts (legacy names included); it refuses others
# with its own exception types, deep inside a call.
_S3_BUCKET = re.compile(r"[A-Za-z0-9._-]{1,255}")


def _check_key(loc: Location) -> None:
    """Refuse a location no store could take, before any store sees it."""
    if not isinstance(loc.key, str) or not isinstance(loc.bucket_name, (str, type(None))):
        raise InvalidInputError(
            f"{loc.storage_type} location: the key must be text and the bucket text or null, "
            f"not {type(loc.key).__name__} and {type(loc.bucket_name).__name__}",
            location=loc,
        )
    for text in (loc.key, loc.bucket_name or ""):
        # No file system, bucket or URL takes a NUL (Python refuses it with a
        # ValueError deep inside os or http.client), nor a lone surrogate.
        if "\0" in text:
            raise InvalidInputError(f"{loc.key!r}: a location may not contain a NUL character", location=loc)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInputError(
                f"{text!r}: a location must be valid Unicode text", location=loc
            ) from None
    if loc.storage_type == "s3" and not _S3_BUCKET.fullmatch(loc.bucket_name or ""):
        raise InvalidInputError(f"{loc.bucket_name!r}: not a valid S3 bucket name", location=loc)


def _check_file_key(loc: Location) -> None:
    """Refuse a file location whose key names a folder: "x.pkl/" must not read or replace x.pkl.

    Path resolution drops a trailing "/" or "/.", so without this check the
    file before it would be used. URLs keep theirs: a path ending in "/" is a
    resource like any other there.
    """
    key = loc.key
    if loc.storage_type == "filesystem":
        if key.endswith("/") or key.rsplit("/", 1)[-1] in (".", ".."):
            raise InvalidInputError(
                f"{key!r}: a file name cannot end in '/', '/.' or '/..' (that names a folder)", location=loc
            )
    elif loc.storage_type == "s3" and key.endswith("/"):
        raise InvalidInputError(f"{key!r}: an S3 object key for a file cannot end in '/'", location=loc)


def _check_url(loc: Location) -> None:
    """Refuse a url location that is not a URL (no scheme, no host) as bad input: no retry can fetch it."""
    problem = urlfetch.url_syntax_problem(loc.key)
    if problem is not None:
        raise MalformedURLError(
            f"Failed to download from the URL '{loc.key}'.", ValueError(problem), location=loc, reason=problem
        )


# OS errors that a location itself causes (not the machine's state).
_BAD_PATH_ERRNOS = {
    errno.ENAMETOOLONG: "name too long",
    errno.ELOOP: "too many symbolic links",
    errno.ENOTDIR: "a part of the path is not a directory",
    errno.EINVAL: "not a valid path",
    errno.EEXIST: "a part of the path is a file, not a directory",
}


@contextlib.contextmanager
def _access(loc: Location, access: Access) -> Iterator[Storage]:
    """The one gate to storage: checks the policy, then maps store errors to library ones."""
    policy = _allowed(loc, access, names_a_file=True)
    storage = storage_factory(loc.storage_type, loc.bucket_name)
    roots = policy.filesystem_roots() if loc.storage_type == "filesystem" else None
    if roots is not None:
        # Opened from the roots without following a symlink after the check.
        storage = ConfinedFileSystemStorage(
            roots, policy.read_only, allow_hard_links=policy.hard_links_allowed()
        )
    if isinstance(storage, URLStorage) and policy.url_rules is not None:
        storage = URLStorage(policy.url_rules)
    try:
        with _located(loc):
            yield storage
    except SpacerError:
        raise
    except FileNotFoundError as err:
        raise StorageFileNotFoundError(f"{loc.describe()}: file not found", location=loc) from err
    except IsADirectoryError as err:
        raise InvalidInputError(f"{loc.describe()}: is a directory, not a file", location=loc) from err
    except PermissionError as err:
        raise AccessDeniedError(f"{loc.describe()}: permission denied", location=loc) from err
    except OSError as err:
        if err.errno in _BAD_PATH_ERRNOS:
            raise InvalidInputError(
                f"{loc.describe()}: {_BAD_PATH_ERRNOS[err.errno]}", location=loc
            ) from None
        _raise_boto_error(loc, err)
        raise
    except Exception as err:
        _raise_boto_error(loc, err)
        raise


@contextlib.contextmanager
def _located(loc: Location) -> Iterator[None]:
    """Mark library errors raised inside as being about `loc`.

    Code below this point (a store, the image decoder, the unpickler) knows
    only a key or a name; an error it raised with no location, or with just
    `loc`'s key, is about `loc` itself.
    """
    try:
        yield
    except SpacerError as err:
        if err.location is None or err.location == loc.key:
            err.location = loc
        raise


def _raise_boto_error(loc: Location, err: Exception) -> None:
    """Re-raise a botocore error as the library's; returns for anything else."""
    botocore = sys.modules.get("botocore.exceptions")
    if botocore is None:
        return
    where = loc.describe()
    if isinstance(err, botocore.ClientError):
        error = err.response.get("Error", {})
        code = str(error.get("Code", ""))
        http = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound") or http == 404:
            raise StorageMissingObjectError(
                f"{where}: no such object ({code or http})", location=loc
            ) from err
        if code in ("403", "AccessDenied") or http == 403:
            raise AccessDeniedError(f"{where}: access denied by S3 ({code or http})", location=loc) from err
        if http is not None and int(http) >= 500:
            raise StorageUnavailableError(f"{where}: S3 answered {http} ({code})", location=loc) from err
        raise StorageRequestError(f"{where}: S3 refused the request: {code or http}", location=loc) from err
    if isinstance(
        err,
        (
            botocore.EndpointConnectionError,
            botocore.ConnectionError,
            botocore.ReadTimeoutError,
            botocore.ConnectTimeoutError,
        ),
    ):
        raise StorageUnavailableError(f"{where}: S3 endpoint unreachable", location=loc) from err
    if isinstance(err, botocore.NoCredentialsError):
        raise StorageRequestError(f"{where}: no AWS credentials configured", location=loc) from err


def load_bytes(loc: Location, filesystem_cache: str | None = None) -> BytesIO:
    """The content at ``loc`` (remote locations may use ``filesystem_cache``)."""
    with _access(loc, "read") as storage:
        if isinstance(storage, RemoteStorage):
            return storage.load(loc.key, filesystem_cache)
        return storage.load(loc.key)


@contextlib.contextmanager
def open_local(loc: Location) -> Iterator[IO[bytes]]:
    """The local file at ``loc`` (filesystem storage), opened once under the active policy.

    What is read from it, and its ``os.fstat``, belong to the one file that
    passed the check, whatever happens to the path meanwhile.
    """
    if loc.storage_type != "filesystem":
        raise InvalidInputError(f"{loc.describe()}: not a local file", location=loc)
    with _access(loc, "read") as storage:
        assert isinstance(storage, FileSystemStorage)
        with storage.open(loc.key) as f:
            yield f


def fd_version(f: IO[bytes]) -> tuple[int, int, int, int, int]:
    """(device, inode, size, mtime, ctime) of an open file: changes whenever the file is replaced or rewritten.

    ctime is there because a writer can put mtime back (utime) but not ctime:
    a file rewritten in place with its size and mtime kept still gets a new version.
    """
    st = os.fstat(f.fileno())
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def require_writable(loc: Location) -> None:
    """Raise InvalidInputError for a location of a read-only storage type, or one naming a folder."""
    _check_key(loc)
    _check_file_key(loc)
    if not loc.is_writable:
        raise InvalidInputError(f"{loc.describe()}: {loc.storage_type} storage is read-only", location=loc)


# What the leading bytes of a file say it holds. Only kinds the library reads
# or writes are named; a file of no known kind may be replaced by anything.
_IMAGE = "an image"
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", _IMAGE),
    (b"\x89PNG\r\n\x1a\n", _IMAGE),
    (b"GIF8", _IMAGE),
    (b"II*\x00", _IMAGE),
    (b"MM\x00*", _IMAGE),
    (b"PK\x03\x04", "a feature file (npz)"),
    *((b"\x80" + bytes([protocol]), "a pickle (a classifier)") for protocol in range(2, 6)),
)


# Feature files were JSON before pyspacer 0.6: features stored anew may replace them.
_FEATURE_FORMATS = {"JSON", "a feature file (npz)"}


def content_kind(head: bytes | bytearray | memoryview) -> str | None:
    """What data starting with `head` holds, as a phrase ("an image", ...); None: no known kind."""
    head = bytes(head[:16])
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return _IMAGE
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if head.lstrip()[:1] in (b"{", b"["):
        return "JSON"
    return None


def _refuse_other_kind(storage: Storage, loc: Location, data: bytes | bytearray | memoryview) -> None:
    """Refuse to replace a local file of one known kind with data of another.

    A feature file written over an image, or a classifier over a feature
    file, is a mistaken (or hostile) location, and the old content is lost
    for good; a file replaced by its own kind (features re-extracted, a
    classifier retrained) is the ordinary case.
    """
    if not isinstance(storage, FileSystemStorage):
        return
    try:
        with storage.open(loc.key) as f:
            head = f.read(16)
    except (OSError, SpacerError):
        return  # nothing there (or nothing readable): the write decides
    old, new = content_kind(head), content_kind(data)
    if old is not None and new is not None and {old, new} - _FEATURE_FORMATS and old != new:
        raise PreconditionError(
            f"{loc.describe()!r} holds {old}; writing {new} there would destroy it: choose another location",
            location=loc,
        )


def store_bytes(loc: Location, data: Payload) -> None:
    """Save ``data`` at ``loc``; an existing local file of another kind is never replaced."""
    require_writable(loc)
    with _access(loc, "write") as storage:
        payload = _payload_bytes(data)
        _refuse_other_kind(storage, loc, payload)
        storage.store(loc.key, payload)


def delete_data(loc: Location) -> None:
    """Remove the data at ``loc``."""
    with _access(loc, "delete") as storage:
        storage.delete(loc.key)


def data_exists(loc: Location) -> bool:
    """Whether ``loc`` holds data."""
    with _access(loc, "read") as storage:
        return storage.exists(loc.key)


def file_version(loc: Location) -> Hashable:
    """A token that changes whenever the data at ``loc`` is replaced (None: unknown).

    Local files give `fd_version`; memory blobs their identity; remote
    data has no cheap version and gives None.
    """
    with _access(loc, "read") as storage:
        if loc.storage_type == "filesystem":
            with storage.open(loc.key) as f:  # type: ignore[attr-defined]
                return fd_version(f)
        if isinstance(storage, MemoryStorage):
            return id(storage.get_bytes(loc.key))
    return None


def store_image(loc: Location, img: Image.Image) -> None:
    """Save ``img`` at ``loc`` as JPEG."""
    stream = BytesIO()
    img.save(stream, "JPEG")
    store_bytes(loc, stream)


def load_image(loc: Location) -> Image.Image:
    """Open the image at ``loc`` with Pillow (lazily decoded; truncated files allowed).

    Only survey photo formats are opened (`spacer_core.images.SURVEY_FORMATS`).
    """
    from spacer_core.images import open_image

    data = load_bytes(loc)
    with _located(loc):
        return open_image(data, name=loc.key)


def store_classifier(loc: Location, clf: CalibratedClassifierCV) -> None:
    """Pickle a fitted classifier to ``loc`` (protocol 2, readable by every pyspacer)."""
    if not hasattr(clf, "calibrated_classifiers_"):
        raise InvalidInputError("Only fitted classifiers can be stored.")
    store_bytes(loc, pickle.dumps(clf, protocol=2))


def load_classifier(loc: Location) -> CalibratedClassifierCV:
    """Unpickle the classifier at ``loc``, upgrading pickles from older scikit-learn.

    Not cached here: the tasks keep loaded classifiers in their runtime
    (`spacer_core.runtime`), which reloads a classifier whose file changed.
    """
    from spacer_core.legacy import load_classifier_bytes

    data = load_bytes(loc).getvalue()
    with _located(loc):
        return load_classifier_bytes(data, source=loc.key)


# pyspacer's load_classifier is an lru_cache; code may call its cache_clear().
load_classifier.cache_clear = lambda: None  # type: ignore[attr-defined]


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
