"""One place that turns library exceptions into gRPC status codes.

`status_for` maps an exception to (code, message); `describe` adds the
client-safe wording. `server.interceptors.ErrorInterceptor` aborts every
failed call with it; a stream's failed item carries it in its reply.
Unexpected exceptions become INTERNAL with a generic message and a logged
traceback, so internals never leak to clients.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any

import grpc

from server.logs import quote
from spacer_core import crop
from spacer_core import exceptions as spacer_exc

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
    if isinstance(exc, spacer_exc.URLDownloadError) and not isinstance(exc, spacer_exc.AccessDeniedError):
        # A refused URL (URLRefusedError) is also an AccessDeniedError: the
        # category table below makes it PERMISSION_DENIED.
        return _url_status(exc), str(exc)
    if isinstance(exc, crop.InternalCropError):
        return None
    for category, code in _STATUS_BY_CATEGORY:
        if isinstance(exc, category):
            return code, str(exc)
    return None


# Storage errors (a bare boto 404, a refused connection) often do not say
# which file they were about; for these the request's locations are added.
_NAME_THE_FILES = {
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
}

_MAX_LISTED = 6


def describe(
    exc: BaseException, context: str = "", locations: Sequence[str] = ()
) -> tuple[grpc.StatusCode, str]:
    """Status and client-safe message; logs a traceback for unexpected errors.

    `context` (an image key, job token or file) prefixes the message unless
    the library message already names it. `locations` (the request's files,
    as text) are appended to storage errors that name none of them.
    """
    known = status_for(exc)
    if known is None:
        ref = uuid.uuid4().hex[:12]
        logger.error("internal error ref=%s context=%s", ref, quote(context), exc_info=exc)
        return grpc.StatusCode.INTERNAL, f"internal error (ref {ref}); see server log"
    status, message = known
    if status == grpc.StatusCode.PERMISSION_DENIED:
        message = _name_the_field(message, locations)
    if context and context not in message:
        message = f"{_clip(context)}: {message}"
    if status in _NAME_THE_FILES and locations:
        keys = [loc.rsplit("/", 1)[-1] or loc for loc in locations]
        if not any(key in message for key in keys):
            shown = ", ".join(_clip(loc) for loc in locations[:_MAX_LISTED])
            more = len(locations) - _MAX_LISTED
            if more > 0:
                shown += f" and {more} more"
            message = f"{message} (request locations: {shown})"
    return status, _sendable(message)


def _sendable(message: str, limit: int = 2048) -> str:
    """`message` as a status detail gRPC can send: valid UTF-8 (a client's lone
    surrogate escaped, not an encoding error that leaves the call unanswered)
    and short enough for any client's metadata limit."""
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return _clip(message, limit)


def _clip(text: str, limit: int = 256) -> str:
    """`text`, cut to `limit` characters: a reply never echoes a huge client string whole."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _name_the_field(message: str, locations: Sequence[str]) -> str:
    """Prefix the request field whose location the message is about, when it names none."""
    for entry in locations:
        name, _, where = entry.partition("=")
        key = where.rsplit("/", 1)[-1] if where.startswith("s3://") else where
        if key and key in message:
            return message if message.startswith(name) else f"{name}: {message}"
    return message


def request_locations(message: Any) -> list[str]:
    """Every DataLocation in a protobuf request, as 'field=s3://bucket/key' text."""
    found: list[str] = []

    def walk(msg: Any, prefix: str) -> None:
        if msg.DESCRIPTOR.full_name == "spacer.v1.DataLocation":
            if msg.key:
                where = {
                    "s3": f"s3://{msg.bucket_name}/{msg.key}",
                    "memory": f"memory:{msg.key}",
                }.get(msg.storage_type, msg.key)
                found.append(f"{prefix}={where}")
            return
        for field, value in msg.ListFields():
            if field.message_type is None:
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
        walk(message, "")
    return found
