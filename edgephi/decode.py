"""Undecodable request messages become ``INVALID_ARGUMENT``, not grpc's ``UNKNOWN`` with a logged traceback.

grpc deserializes a request before our handler runs; a protobuf ``DecodeError`` there (invalid UTF-8 in a
``string`` field, a truncated or foreign message) surfaces as ``UNKNOWN "Unexpected <class
'google.protobuf.message.DecodeError'>"``. This interceptor wraps the request deserializer of every
unary-request method so that such a message reaches a small handler that answers ``INVALID_ARGUMENT``
naming ``request`` and the message type expected.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError


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
