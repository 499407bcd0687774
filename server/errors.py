"""One place that turns library exceptions into gRPC status codes.

`status_for` maps an exception to (code, message); `describe` adds the
client-safe wording: the job token, and the request field a refused
location came from, found by comparing the error's `location` with the
request's (`request_locations`), never by reading the message.
`server.interceptors.ErrorInterceptor` aborts every failed call with it; a
stream's failed item carries it in its reply.
Unexpected exceptions become INTERNAL with a generic message and a logged
traceback, so internals never leak to clients.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from server.logs import quote
from spacer_core import crop
from spacer_core import exceptions as spacer_exc
from spacer_core.data_classes import DataLocation

logger = logging.getLogger("server.rpc")


class RequestError(Exception):
    """A request the servicer rejects before calling the library."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> RequestError:
    """INVALID_ARGUMENT with message."""
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


# Library error categories and their status codes, most specific first. Only
# library types are mapped: any other exception is a bug, reported as INTERNAL.
_STATUS_BY_CATEGORY: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (spacer_exc.DataNotFoundError, grpc.StatusCode.NOT_FOUND),
    (spacer_exc.AccessDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (spacer_exc.ResourceLimitError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (spacer_exc.PreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (spacer_exc.InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (spacer_exc.UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (spacer_exc.DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    # The Rust decoder's own types: undecodable bytes, a crop it cannot serve.
    (crop.ImageDecodeError, grpc.StatusCode.INVALID_ARGUMENT),
    (crop.PatchError, grpc.StatusCode.INVALID_ARGUMENT),
)


def _url_status(exc: spacer_exc.URLDownloadError) -> grpc.StatusCode:
    if exc.http_status == 404:
        return grpc.StatusCode.NOT_FOUND
    if exc.http_status is not None and 400 <= exc.http_status < 500:
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.UNAVAILABLE


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """(code, message) for a request or library error; None for an unexpected one."""
    if isinstance(exc, RequestError):
        return exc.code, exc.message
    # A URL error's str() is pyspacer's, with Python exception names; clients get the plain reason.
    text = exc.public_message if isinstance(exc, spacer_exc.URLDownloadError) else str(exc)
    if isinstance(exc, spacer_exc.URLDownloadError) and not isinstance(
        exc, (spacer_exc.AccessDeniedError, spacer_exc.InvalidInputError)
    ):
        # A refused URL (URLRefusedError) is also an AccessDeniedError, a
        # malformed one an InvalidInputError: the table below maps those.
        return _url_status(exc), text
    if isinstance(exc, crop.InternalCropError):
        return None
    for category, code in _STATUS_BY_CATEGORY:
        if isinstance(exc, category):
            return code, text
    return None


# What storage raises. One of these that carries no location (a bare boto
# 404, a refused connection met by code that did not know the location) could
# be about any of the request's files, so the reply lists them.
_STORAGE_ERRORS: tuple[type[BaseException], ...] = (
    spacer_exc.StorageKeyError,
    spacer_exc.StorageFileNotFoundError,
    spacer_exc.StorageMissingObjectError,
    spacer_exc.StorageUnavailableError,
    spacer_exc.StorageRequestError,
    spacer_exc.URLDownloadError,
    spacer_exc.AccessDeniedError,
)

_MAX_LISTED = 6


@dataclass(frozen=True)
class FieldLocation:
    """A location given in a request, and the request field it was given in.

    `location` is the library's DataLocation for it (None when the request
    names a storage type the library does not have: such a request is refused
    before any work, so no library error can be about it). `text` is the
    location as a person writes it.
    """

    field: str
    location: DataLocation | None
    text: str

    def __str__(self) -> str:
        return f"{self.field}={self.text}"


def describe(
    exc: BaseException, context: str = "", locations: Sequence[FieldLocation | str] = ()
) -> tuple[grpc.StatusCode, str]:
    """Status and client-safe message; logs a traceback for unexpected errors.

    `context` (the job token, chosen by the RPC) prefixes the message.
    `locations` are the request's locations (`request_locations`): a refusal
    names the field whose location it is about, and a storage error that is
    about no particular location lists them. Plain strings are listed as they
    are and never matched.
    """
    known = status_for(exc)
    if known is None:
        ref = uuid.uuid4().hex[:12]
        logger.error("internal error ref=%s context=%s", ref, quote(context), exc_info=exc)
        return grpc.StatusCode.INTERNAL, f"internal error (ref {ref}); see server log"
    status, message = known
    about = getattr(exc, "location", None)
    # A refused or unusable location is named by the request field that holds it.
    if about is not None and status in _NAMED_STATUSES:
        # A classifier that does not load is about the field that asked for a
        # classifier, even when the same file is also given in another field.
        classifier = isinstance(exc, (spacer_exc.ClassifierFileError, spacer_exc.UnsafePickleError))
        name = field_of(about, locations, prefer=_CLASSIFIER_FIELDS if classifier else ())
        if name:
            message = f"{name}: {message}"
    if context:
        message = f"{_clip(context)}: {message}"
    if isinstance(exc, _STORAGE_ERRORS) and about is None and locations:
        shown = ", ".join(_clip(str(loc)) for loc in locations[:_MAX_LISTED])
        more = len(locations) - _MAX_LISTED
        if more > 0:
            shown += f" and {more} more"
        message = f"{message} (request locations: {shown})"
    return status, _sendable(message)


_CLASSIFIER_FIELDS = ("classifier_loc", "previous_model_locs[")


# Statuses about the input itself, whose message names the request field at fault.
_NAMED_STATUSES = (
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
)


def field_of(
    location: object, locations: Sequence[FieldLocation | str], prefer: Sequence[str] = ()
) -> str | None:
    """The first request field whose location equals `location` (None: no field holds it).

    A field whose name starts with one of `prefer` comes before the others.
    """
    matching = [
        entry.field
        for entry in locations
        if isinstance(entry, FieldLocation) and entry.location is not None and entry.location == location
    ]
    preferred = [name for name in matching if name.startswith(tuple(prefer))] if prefer else []
    found = preferred or matching
    return found[0] if found else None


def _sendable(message: str, limit: int = 2048) -> str:
    """`message` as a status detail gRPC can send: valid UTF-8 (a client's lone
    surrogate escaped, not an encoding error that leaves the call unanswered)
    and short enough for any client's metadata limit."""
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return _clip(message, limit)


def _clip(text: str, limit: int = 256) -> str:
    """`text`, cut to `limit` characters: a reply never echoes a huge client string whole."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def as_location(loc: Any) -> DataLocation:
    """The library's DataLocation for a spacer.v1.DataLocation (InvalidDataError for an unknown storage type).

    The one conversion: the locations jobs are built from and the ones
    errors are matched against are equal by construction.
    """
    return DataLocation(loc.storage_type, loc.key, loc.bucket_name or None)


_LOCATION = "spacer.v1.DataLocation"
_HOLDS_LOCATION: dict[str, bool] = {_LOCATION: True}


def message_type_reaches(desc: Any, hit: Callable[[Any], bool], known: dict[str, bool]) -> bool:
    """Whether messages of type `desc` have, at any depth, a field for which `hit` is true.

    Answers are remembered per message type in `known` (the schema does not
    change), so walking a request can skip lists that cannot hold the field.
    """
    answer = known.get(desc.full_name)
    if answer is None:
        seen, todo, answer = {desc.full_name}, [desc], False
        while todo and not answer:
            for field in todo.pop().fields:
                if hit(field):
                    answer = True
                    break
                child = field.message_type
                if child is not None and child.full_name not in seen:
                    seen.add(child.full_name)
                    todo.append(child)
        known[desc.full_name] = answer
    return answer


def _may_hold_location(desc: Any) -> bool:
    """Whether messages of this type can hold a DataLocation, at any depth."""
    return message_type_reaches(
        desc,
        lambda field: field.message_type is not None and field.message_type.full_name == _LOCATION,
        _HOLDS_LOCATION,
    )


def request_locations(message: Any) -> list[FieldLocation]:
    """Every DataLocation in a protobuf request with a key, and the field that holds it.

    Lists that cannot hold one (points, annotations) are not walked: a
    refused request may carry millions of them.
    """
    found: list[FieldLocation] = []

    def walk(msg: Any, prefix: str) -> None:
        if msg.DESCRIPTOR.full_name == "spacer.v1.DataLocation":
            if msg.key:
                try:
                    loc: DataLocation | None = as_location(msg)
                except spacer_exc.InvalidInputError:
                    loc = None
                text = {
                    "s3": f"s3://{msg.bucket_name}/{msg.key}",
                    "memory": f"memory:{msg.key}",
                }.get(msg.storage_type, msg.key)
                found.append(FieldLocation(prefix, loc, text))
            return
        for field, value in msg.ListFields():
            if field.message_type is None or not _may_hold_location(field.message_type):
                continue
            name = f"{prefix}.{field.name}" if prefix else field.name
            if field.message_type.GetOptions().map_entry:
                for key, item in value.items():
                    if hasattr(item, "DESCRIPTOR"):
                        walk(item, f"{name}[{key}]")
            elif field.is_repeated:
                for i, item in enumerate(value):
                    walk(item, f"{name}[{i}]")
            else:
                walk(value, name)

    if hasattr(message, "DESCRIPTOR"):
        reader = _LOCATION_READERS.get(message.DESCRIPTOR.full_name)
        if reader is not None:
            return reader(message)
        walk(message, "")
    return found


# Readers of the locations in requests of other protocols, by message name: a
# protocol package registers its own here, so this module needs none of them.
_LOCATION_READERS: dict[str, Callable[[Any], list[FieldLocation]]] = {}


def register_location_reader(message_name: str, reader: Callable[[Any], list[FieldLocation]]) -> None:
    """Let `request_locations` read requests of type `message_name` with `reader`."""
    _LOCATION_READERS[message_name] = reader
