"""The gRPC door's server interceptors: bearer-token authentication, and the guard in front of every handler.

* :class:`BearerTokenInterceptor`: calls without ``authorization: Bearer <token>`` get ``UNAUTHENTICATED``;
  ``grpc.health.v1.Health`` stays open so that probes work without the token; everything else, reflection
  (v1 and v1alpha) included, needs it. The comparison is :func:`edgephi.security.token_matches` (constant
  time). A call with more than one ``authorization`` header is refused, not judged by one of them (which one a
  proxy or another server would pick differs). Every refusal is counted
  (``edgephi_auth_failures_total{reason}``: ``missing``, ``invalid``, ``duplicate``) and logged at WARNING,
  rate-limited, never the credential (:class:`edgephi.security.AuthFailureLog`).
* :class:`HandlerGuardInterceptor`: the last line between a handler and what reaches the client.

  - grpc deserializes a request before our handler runs; a protobuf ``DecodeError`` there (invalid UTF-8 in a
    ``string`` field, a truncated or foreign message) would surface as ``UNKNOWN "Unexpected <class
    'google.protobuf.message.DecodeError'>"`` with a logged traceback. The guard wraps the request deserializer
    of every unary-request method so that such a message gets ``INVALID_ARGUMENT`` naming ``request`` and the
    method.
  - Every handler it wraps gets a context whose status messages (``abort``, ``set_details``) are capped at
    :data:`~edgephi.grpc_door.status.MAX_DETAILS_WIRE_BYTES` on the wire
    (:func:`~edgephi.grpc_door.status.bounded_details`), whoever writes them: a message that echoed a large
    input whole would exceed grpc's metadata limit and reach the client as ``RESOURCE_EXHAUSTED``.
  - An exception a handler lets escape gets ``UNKNOWN`` as from grpc itself, but with a bounded message (grpc's
    own would carry ``str(exc)`` whole), and is logged with its traceback.
  - A handler's abort is re-raised without the tracebacks that tie it to the handler's frames: grpc holds it in a
    reference cycle, and through them the refused request stayed in memory until a full GC (:func:`_released`).

Order: authentication first, so an unauthenticated caller learns nothing, not even whether its bytes parse.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError

from edgephi.errors import RequestError, clip, quote
from edgephi.grpc_door.status import bounded_details
from edgephi.metrics import Metrics
from edgephi.security import AuthFailureLog, token_matches

log = logging.getLogger(__name__)

OPEN_SERVICES = ("/grpc.health.v1.Health/",)
AUTH_HEADER = "authorization"
DENIED = {
    "missing": "missing bearer token",
    "invalid": "invalid bearer token",
    "duplicate": "more than one authorization header; send exactly one",
}


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Rejects calls without exactly one ``authorization: Bearer <token>`` with ``UNAUTHENTICATED`` (health
    exempt); counts each refusal in ``metrics`` (when given) and logs it through ``failures``."""

    def __init__(self, token: bytes, metrics: Metrics | None = None, failures: AuthFailureLog | None = None) -> None:
        self._expected = b"Bearer " + token
        if failures is None:
            count = (lambda reason: metrics.auth_failures.labels(reason).inc()) if metrics is not None else None
            failures = AuthFailureLog(count)
        self.failures = failures

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method = details.method or ""
        if method.startswith(OPEN_SERVICES):
            return await continuation(details)
        given = [value for key, value in details.invocation_metadata or () if key == AUTH_HEADER]
        if len(given) > 1:
            reason = "duplicate"
        elif not given or not given[0]:
            reason = "missing"
        else:
            value = given[0]
            if token_matches(value.encode() if isinstance(value, str) else bytes(value), self._expected):
                return await continuation(details)
            reason = "invalid"
        self.failures.counted(reason)
        return _deny(method, reason, self.failures)


def _deny(method: str, reason: str, failures: AuthFailureLog) -> grpc.RpcMethodHandler[Any, Any]:
    message = DENIED[reason]

    # ``del request``: the request's bytes (up to 4 MiB) must not stay in the abort's reference cycle (see
    # :func:`_released`).
    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        del request
        failures.failed(reason, method, context.peer())
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        del request
        failures.failed(reason, method, context.peer())
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
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


class BoundedContext:
    """A handler's servicer context whose status messages are capped (:func:`bounded_details`); everything else
    is the wrapped context's."""

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._context = context

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> NoReturn:
        await self._context.abort(code, bounded_details(details), trailing_metadata)
        raise AssertionError("abort returned")  # pragma: no cover - the wrapped abort raises

    def set_details(self, details: str) -> None:
        self._context.set_details(bounded_details(details))


def _released(abort: BaseException) -> BaseException:
    """``abort`` (a handler's ``AbortError``) without the tracebacks that tie it to the handler's frames.

    grpc keeps the ``AbortError`` in a reference cycle (its traceback holds grpc's frame that holds it), and
    through the traceback our handlers' frames, whose locals hold the request and the domain error (whose own
    traceback holds them again): every refused request stayed in memory until Python's cyclic GC ran a full
    collection, which with vLLM's millions of long-lived objects is rare. The fuzz test saw the daemon's RSS
    climb by tens of MiB from refused multi-MB requests. The tracebacks are of no use once the status is set.
    """
    error = abort.__context__
    for _ in range(8):  # a short chain: the domain error, what it was raised from
        if error is None:
            break
        if isinstance(error, RequestError):
            error.__traceback__ = None
        error = error.__context__
    return abort.with_traceback(None)


async def _unexpected(method: str, exc: Exception, context: BoundedContext) -> NoReturn:
    log.error("%s: unexpected error in handler", quote(method, 100), exc_info=exc)
    await context.abort(grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc)}: {exc}")


def _guard(method: str, handler: Any) -> Any:
    """``handler`` (grpc's ``_RpcMethodHandler`` namedtuple) with its behaviour wrapped: a bounded context, and
    an escaping exception answered by :func:`_unexpected`. grpc picks the calling convention of a streaming
    response (yielded messages vs ``context.write``) by whether the behaviour is an async generator function;
    the wrapper keeps it."""
    kind = (
        ("stream" if handler.request_streaming else "unary")
        + "_"
        + ("stream" if handler.response_streaming else "unary")
    )
    inner = getattr(handler, kind)
    if inner is None:
        return handler

    if inspect.isasyncgenfunction(inner):

        async def generator(request: Any, context: Any) -> AsyncIterator[Any]:
            bounded = BoundedContext(context)
            try:
                async for item in inner(request, bounded):
                    yield item
            except grpc.aio.BaseError as exc:  # AbortError: the handler's status
                request = None  # referenced by this frame, which the re-raised error's traceback holds
                raise _released(exc)  # noqa: B904 - the same exception, re-raised
            except Exception as exc:
                await _unexpected(method, exc, bounded)

        return handler._replace(**{kind: generator})

    async def coroutine(request: Any, context: Any) -> Any:
        bounded = BoundedContext(context)
        try:
            result = inner(request, bounded)
            return await result if inspect.isawaitable(result) else result
        except grpc.aio.BaseError as exc:  # AbortError: the handler's status
            request = result = None  # referenced by this frame, which the re-raised error's traceback holds
            raise _released(exc)  # noqa: B904 - the same exception, re-raised
        except Exception as exc:
            await _unexpected(method, exc, bounded)

    return handler._replace(**{kind: coroutine})


class HandlerGuardInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Answers ``INVALID_ARGUMENT`` ("request: ...") for request bytes that do not parse; caps every status
    message; answers an escaping exception with a bounded ``UNKNOWN`` (see the module's docstring)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler: Any = await continuation(details)  # a namedtuple (grpc's _RpcMethodHandler)
        if handler is None:  # no such method: grpc answers UNIMPLEMENTED
            return None  # type: ignore[return-value]
        method = details.method or ""
        if handler.request_streaming or handler.request_deserializer is None:
            return _guard(method, handler)  # type: ignore[no-any-return]

        async def refuse(request: _Undecodable, context: Any) -> None:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request: not a valid message for {method} ({clip(request.reason, 200)})",
            )

        if not handler.response_streaming:
            inner_unary = handler.unary_unary

            async def unary_unary(request: Any, context: Any) -> Any:
                if isinstance(request, _Undecodable):
                    await refuse(request, context)
                result = inner_unary(request, context)
                return await result if inspect.isawaitable(result) else result

            checked = handler._replace(unary_unary=unary_unary)
        else:
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
            checked = handler._replace(unary_stream=wrapped)
        return _guard(method, checked._replace(request_deserializer=_safe(handler.request_deserializer)))  # type: ignore[no-any-return]
