"""One place that turns library exceptions into gRPC status codes.

`status_for` maps an exception to (code, message); `rpc_method` wraps each
servicer method so that every failure is aborted with that status and every
call is logged as one line (method, status, duration, job token).
Unexpected exceptions become INTERNAL with a generic message and a logged
traceback, so internals never leak to clients.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import socket
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from PIL import UnidentifiedImageError

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


class QueueFullError(Exception):
    """The server admitted as much work as it is configured to hold."""


class DataRootError(PermissionError):
    """A filesystem DataLocation lies outside the configured data roots."""


def _boto_status(exc: Exception) -> tuple[grpc.StatusCode, str] | None:
    """Status of a botocore error, or None when exc is not one."""
    try:
        from botocore.exceptions import (
            ClientError,
            ConnectionError as BotoConnectionError,
            NoCredentialsError,
        )
    except ImportError:  # pragma: no cover - boto3 is a dependency
        return None
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        http = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound") or http == 404:
            return grpc.StatusCode.NOT_FOUND, str(exc)
        if code in ("403", "AccessDenied") or http == 403:
            return grpc.StatusCode.PERMISSION_DENIED, str(exc)
        if http is not None and int(http) >= 500:
            return grpc.StatusCode.UNAVAILABLE, str(exc)
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, BotoConnectionError):
        return grpc.StatusCode.UNAVAILABLE, f"storage unreachable: {exc}"
    if isinstance(exc, NoCredentialsError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    return None


def _url_status(exc: spacer_exc.URLDownloadError) -> grpc.StatusCode:
    original = exc.original_error
    http = getattr(original, "code", None) or getattr(
        getattr(original, "response", None), "status_code", None
    )
    if http == 404:
        return grpc.StatusCode.NOT_FOUND
    if isinstance(http, int) and 400 <= http < 500:
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.UNAVAILABLE


def _inference_status(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """Status of a batcher error; the module is only inspected once something loaded it."""
    batcher = sys.modules.get("spacer_core.inference.batcher")
    if batcher is None:
        return None
    if isinstance(exc, batcher.QueueFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, batcher.BatcherClosedError):
        return grpc.StatusCode.UNAVAILABLE, f"server is shutting down: {exc}"
    return None


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """(code, message) for a known failure; None for an unexpected one."""
    code = grpc.StatusCode
    inference = _inference_status(exc)
    if inference is not None:
        return inference
    if isinstance(exc, RequestError):
        return exc.code, exc.message
    if isinstance(exc, QueueFullError):
        return code.RESOURCE_EXHAUSTED, str(exc) or "server queue is full; retry later"
    if isinstance(exc, spacer_exc.DataLimitError):
        return code.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, (spacer_exc.HashMismatchError, spacer_exc.ConfigError)):
        return code.FAILED_PRECONDITION, str(exc)
    feature_dim = getattr(spacer_exc, "FeatureDimensionError", None)
    if feature_dim is not None and isinstance(exc, feature_dim):
        return code.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, (spacer_exc.RowColumnMismatchError, spacer_exc.RowColumnMissingError)):
        return code.NOT_FOUND, str(exc)
    if isinstance(exc, spacer_exc.URLDownloadError):
        return _url_status(exc), str(exc)
    if isinstance(exc, DataRootError):
        return code.PERMISSION_DENIED, str(exc)
    if isinstance(exc, FileNotFoundError):
        name = exc.filename if exc.filename is not None else str(exc)
        return code.NOT_FOUND, f"file not found: {name}"
    if isinstance(exc, KeyError):
        # Memory storage and lookups by key raise KeyError(key).
        key = exc.args[0] if exc.args else ""
        return code.NOT_FOUND, f"key not found: {key}"
    boto = _boto_status(exc) if isinstance(exc, Exception) else None
    if boto is not None:
        return boto
    if isinstance(exc, (ConnectionError, socket.timeout, TimeoutError)):
        return code.UNAVAILABLE, f"storage unreachable: {exc}"
    if isinstance(
        exc,
        (
            spacer_exc.RowColumnInvalidError,
            spacer_exc.TrainingLabelsError,
            UnidentifiedImageError,
            json.JSONDecodeError,
        ),
    ):
        return code.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, OSError) and "image file is truncated" in str(exc):
        return code.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, (ValueError, TypeError)) and not isinstance(exc, UnicodeError):
        # The library signals malformed messages with ValueError/TypeError.
        return code.INVALID_ARGUMENT, str(exc)
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
        logger.error("internal error ref=%s context=%s", ref, context, exc_info=exc)
        return grpc.StatusCode.INTERNAL, f"internal error (ref {ref}); see server log"
    status, message = known
    if context and context not in message:
        message = f"{context}: {message}"
    if status in _NAME_THE_FILES and locations:
        keys = [loc.rsplit("/", 1)[-1] or loc for loc in locations]
        if not any(key in message for key in keys):
            shown = ", ".join(locations[:_MAX_LISTED])
            more = len(locations) - _MAX_LISTED
            if more > 0:
                shown += f" and {more} more"
            message = f"{message} (request locations: {shown})"
    return status, message


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


def _token_of(request: Any) -> str:
    return str(getattr(request, "job_token", "") or "")


def rpc_method(func: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a servicer method: map exceptions to statuses, log one line per call.

    Works for coroutine methods (unary responses) and async generator
    methods (streamed responses). Cancellation (client cancel or deadline)
    propagates so the work the call started is stopped.
    """
    name = func.__name__

    def _log(status: str, start: float, token: str, detail: str = "") -> None:
        logger.info(
            "rpc method=%s status=%s duration_ms=%.1f token=%s%s",
            name,
            status,
            (time.perf_counter() - start) * 1000,
            token or "-",
            f" {detail}" if detail else "",
        )

    async def _fail(
        context: grpc.aio.ServicerContext, exc: Exception, start: float, token: str, request: Any
    ) -> None:
        status, message = describe(exc, token, request_locations(request))
        _log(status.name, start, token, f"error={message!r}")
        await context.abort(status, message)

    if inspect.isasyncgenfunction(func):

        @functools.wraps(func)
        async def stream_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext):
            start = time.perf_counter()
            token = _token_of(request)
            items = 0
            try:
                async for item in func(self, request, context):
                    items += 1
                    yield item
            except asyncio.CancelledError:
                _log("CANCELLED", start, token)
                raise
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _fail(context, exc, start, token, request)
            else:
                _log("OK", start, token, f"items={items}")

        return stream_wrapper

    @functools.wraps(func)
    async def unary_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext):
        start = time.perf_counter()
        token = _token_of(request)
        try:
            response = await func(self, request, context)
        except asyncio.CancelledError:
            _log("CANCELLED", start, token)
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _fail(context, exc, start, token, request)
        else:
            _log("OK", start, token)
            return response

    return unary_wrapper
