"""The gRPC door's server interceptors: bearer-token authentication and undecodable-request refusal.

* :class:`BearerTokenInterceptor`: calls without ``authorization: Bearer <token>`` get ``UNAUTHENTICATED``;
  ``grpc.health.v1.Health`` stays open so that probes work without the token; everything else, reflection
  (v1 and v1alpha) included, needs it. The comparison is :func:`edgephi.security.token_matches` (constant time).
* :class:`DecodeGuardInterceptor`: grpc deserializes a request before our handler runs; a protobuf
  ``DecodeError`` there (invalid UTF-8 in a ``string`` field, a truncated or foreign message) would surface as
  ``UNKNOWN "Unexpected <class 'google.protobuf.message.DecodeError'>"`` with a logged traceback. The
  interceptor wraps the request deserializer of every unary-request method so that such a message gets
  ``INVALID_ARGUMENT`` naming ``request`` and the method.

Order: authentication first, so an unauthenticated caller learns nothing, not even whether its bytes parse.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from edgephi.security import token_matches

OPEN_SERVICES = ("/grpc.health.v1.Health/",)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Rejects calls without ``authorization: Bearer <token>`` with ``UNAUTHENTICATED`` (health exempt)."""

    def __init__(self, token: bytes) -> None:
        self._expected = b"Bearer " + token

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method = details.method or ""
        if method.startswith(OPEN_SERVICES):
            return await continuation(details)
        given = b""
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else bytes(value)
                break
        if token_matches(given, self._expected):
            return await continuation(details)
        return _deny(method, "missing bearer token" if not given else "invalid bearer token")


def _deny(method: str, reason: str) -> grpc.RpcMethodHandler[Any, Any]:
    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)
        yield  # pragma: no cover - makes this an async generator

    # A handler of the method's own kind, so that the status reaches the client properly: reflection's
    # ServerReflectionInfo (v1 and v1alpha) streams both ways; Generate and Chat stream responses.
    if method.endswith("/ServerReflectionInfo"):
        return grpc.stream_stream_rpc_method_handler(stream)
    if method.endswith(("/Generate", "/Chat")):
        return grpc.unary_stream_rpc_method_handler(stream)
    return grpc.unary_unary_rpc_method_handler(unary)


class _Undecodable:
    def __init__(self, reason: str) -> None:
        self.reason = reason


def _safe(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def wrapped(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as exc:
            return _Undecodable(str(exc) or "cannot parse")

    return wrapped


class DecodeGuardInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Answers ``INVALID_ARGUMENT`` ("request: ...") for request bytes that do not parse."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler: Any = await continuation(details)  # a namedtuple (grpc's _RpcMethodHandler)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler  # type: ignore[no-any-return]
        method = details.method or ""

        async def refuse(request: _Undecodable, context: Any) -> None:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid message for {method} ({request.reason})"
            )

        safe = _safe(handler.request_deserializer)
        if not handler.response_streaming:
            inner_unary = handler.unary_unary

            async def unary_unary(request: Any, context: Any) -> Any:
                if isinstance(request, _Undecodable):
                    await refuse(request, context)
                result = inner_unary(request, context)
                return await result if inspect.isawaitable(result) else result

            return handler._replace(request_deserializer=safe, unary_unary=unary_unary)  # type: ignore[no-any-return]
        inner_stream = handler.unary_stream

        async def stream_gen(request: Any, context: Any) -> AsyncIterator[Any]:
            if isinstance(request, _Undecodable):
                await refuse(request, context)
            async for item in inner_stream(request, context):
                yield item

        async def stream_coro(request: Any, context: Any) -> Any:
            if isinstance(request, _Undecodable):
                await refuse(request, context)
            return await inner_stream(request, context)

        # grpc picks the calling convention (yielded messages vs context.write) by this test; keep it.
        wrapped = stream_gen if inspect.isasyncgenfunction(inner_stream) else stream_coro
        return handler._replace(request_deserializer=safe, unary_stream=wrapped)  # type: ignore[no-any-return]
