"""What every call of the served protocols goes through, one grpc.aio server interceptor each.

- `BearerTokenInterceptor`: calls without the configured token are refused
  (UNAUTHENTICATED) before anything else sees them, unknown methods too.
- `CallLogInterceptor`: one log line and the call metrics per call
  (`server.logs.CallLog`), and the request id in the trailing metadata.
- `ErrorInterceptor`: a failure becomes its status (`server.errors.describe`):
  library categories their codes, anything else INTERNAL with a reference id.

grpc.aio interceptors see only the handler, not the messages, so the last
two wrap the handler's behaviour; a streamed call is wrapped the same way
as a unary one. Health and reflection pass through untouched.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from server import metrics
from server.errors import describe, request_locations
from server.logs import CallLog

HEALTH_SERVICE = "/grpc.health.v1.Health/"
AUTH_HEADER = "authorization"
# The services whose calls are logged, counted and error-mapped.
SERVED = ("/spacer.v1.Spacer/", "/inference.GRPCInferenceService/")

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]]
Behaviour = Callable[..., Any]


def _kind(handler: grpc.RpcMethodHandler) -> str:
    return metrics.grpc_type(handler.request_streaming, handler.response_streaming)


class _HandlerWrapper(grpc.aio.ServerInterceptor):
    """Wraps the behaviour of each served method's handler with `unary` or `stream`."""

    def unary(self, method: str, handler: grpc.RpcMethodHandler, behaviour: Behaviour) -> Behaviour:
        raise NotImplementedError

    def stream(self, method: str, handler: grpc.RpcMethodHandler, behaviour: Behaviour) -> Behaviour:
        raise NotImplementedError

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        full = handler_call_details.method or ""
        if handler is None or not full.startswith(SERVED):
            return handler
        method = full.rsplit("/", 1)[-1]
        if handler.response_streaming:
            field = "stream_stream" if handler.request_streaming else "unary_stream"
            return handler._replace(**{field: self.stream(method, handler, getattr(handler, field))})
        field = "stream_unary" if handler.request_streaming else "unary_unary"
        return handler._replace(**{field: self.unary(method, handler, getattr(handler, field))})


# ---------------------------------------------------------------- auth


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without ``authorization: Bearer <token>`` with UNAUTHENTICATED.

    The health service stays open: load balancers probe it without credentials.
    A method the server lacks gets UNAUTHENTICATED too (not UNIMPLEMENTED),
    so a caller without the token cannot tell which methods exist. A call
    carrying more than one authorization header is refused whatever they
    hold: proxies and servers disagree on which one counts. Every refusal is
    counted (`metrics.record_rejected`).
    """

    def __init__(self, token: str, open_prefixes: tuple[str, ...] = (HEALTH_SERVICE,)):
        self._expected = f"Bearer {token}".encode()
        self._open_prefixes = open_prefixes

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        async def deny_stream(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        self._deny = {
            (False, False): grpc.unary_unary_rpc_method_handler(deny),
            (False, True): grpc.unary_stream_rpc_method_handler(deny),
            (True, False): grpc.stream_unary_rpc_method_handler(deny_stream),
            (True, True): grpc.stream_stream_rpc_method_handler(deny_stream),
        }

    def _authorized(self, metadata: Any) -> bool:
        given = [value for key, value in metadata or () if key == AUTH_HEADER]
        if len(given) != 1:
            return False
        value = given[0].encode() if isinstance(given[0], str) else given[0]
        # Constant time, so response timing does not reveal the token.
        return hmac.compare_digest(value, self._expected)

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method or ""
        handler = await continuation(handler_call_details)
        if method.startswith(self._open_prefixes) or self._authorized(
            handler_call_details.invocation_metadata
        ):
            return handler
        if handler is None:
            # Unknown method: refused like a real one. A handler that reads
            # nothing suits any call shape the client may use.
            metrics.record_rejected(metrics.UNKNOWN_METHOD, "UNAUTHENTICATED")
            return self._deny[(True, True)]
        metrics.record_rejected(method.rsplit("/", 1)[-1], "UNAUTHENTICATED")
        return self._deny[(handler.request_streaming, handler.response_streaming)]


# ---------------------------------------------------------------- call log and metrics


class CallLogInterceptor(_HandlerWrapper):
    """One log line and one set of metrics per call, with its status as the client saw it.

    Cancellation (client cancel or deadline) propagates, so the work the
    call started is stopped.
    """

    def unary(self, method: str, handler: grpc.RpcMethodHandler, behaviour: Behaviour) -> Behaviour:
        async def logged(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = CallLog(method, context, _kind(handler))
            request = _count_requests(call, request, handler.request_streaming)
            try:
                response = await behaviour(request, context)
            except BaseException as exc:
                _finish_failed(call, context, exc)
                raise
            call.sent_one(response)
            call.finish_ok()
            return response

        return logged

    def stream(self, method: str, handler: grpc.RpcMethodHandler, behaviour: Behaviour) -> Behaviour:
        async def logged(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call = CallLog(method, context, _kind(handler))
            request = _count_requests(call, request, handler.request_streaming)
            try:
                async for item in behaviour(request, context):
                    call.sent_one(item)
                    yield item
            except BaseException as exc:
                _finish_failed(call, context, exc)
                raise
            call.finish_ok()

        return logged


def _count_requests(call: CallLog, request: Any, streamed_in: bool) -> Any:
    if streamed_in:
        return call.requests(request)
    call.received_one(request)
    return request


def _finish_failed(call: CallLog, context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    if isinstance(exc, asyncio.CancelledError):
        call.finish(call.cancelled_status())
    elif isinstance(exc, grpc.aio.AbortError):
        call.finish(call.aborted_status(), context.details() or "")
    elif isinstance(exc, Exception):
        # Only reached when error mapping is not installed beneath this log.
        call.finish("UNKNOWN", type(exc).__name__)


# ---------------------------------------------------------------- error mapping


def _token_of(request: Any) -> str:
    return str(getattr(request, "job_token", "") or "")


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, request: Any) -> None:
    status, message = describe(exc, _token_of(request), request_locations(request))
    await context.abort(status, message)


class ErrorInterceptor(_HandlerWrapper):
    """Aborts a failed call with the status of its error; internals never reach the client."""

    def unary(self, method: str, handler: grpc.RpcMethodHandler, behaviour: Behaviour) -> Behaviour:
        async def mapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await behaviour(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _abort(context, exc, request)

        return mapped

    def stream(self, method: str, handler: grpc.RpcMethodHandler, behaviour: Behaviour) -> Behaviour:
        async def mapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for item in behaviour(request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _abort(context, exc, request)

        return mapped


def interceptors(token: str | None) -> list[grpc.aio.ServerInterceptor]:
    """The server's interceptors, outermost first: auth, call log, error mapping."""
    chain: list[grpc.aio.ServerInterceptor] = [CallLogInterceptor(), ErrorInterceptor()]
    if token is not None:
        chain.insert(0, BearerTokenInterceptor(token))
    return chain
