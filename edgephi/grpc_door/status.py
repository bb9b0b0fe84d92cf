"""The one table from the generation service's domain errors to gRPC status codes.

INVALID_ARGUMENT    a request field is bad (the message starts with the field's proto path)
RESOURCE_EXHAUSTED  admission control (streams + queue, KV-cache tokens) or the memory guard refused the
                    request; or the client read nothing for ``stream_write_timeout_s`` and the stream ended
UNAVAILABLE         not serving (loading, draining, dead, engine not making progress); or the server ended
                    the stream (drain past its grace, engine death)
INTERNAL            anything else the engine raised (logged with its traceback)
"""

from __future__ import annotations

import grpc

from edgephi.errors import (
    EngineFailed,
    InvalidArgument,
    MemoryGuarded,
    NotServing,
    Overloaded,
    ReaderStalled,
    RequestError,
    StreamAborted,
)

STATUS_OF: dict[type[RequestError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    MemoryGuarded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ReaderStalled: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotServing: grpc.StatusCode.UNAVAILABLE,
    StreamAborted: grpc.StatusCode.UNAVAILABLE,
    EngineFailed: grpc.StatusCode.INTERNAL,
}


def status_of(exc: RequestError) -> grpc.StatusCode:
    """The status for ``exc`` (its nearest class in :data:`STATUS_OF`; ``INTERNAL`` for an unlisted one)."""
    for cls in type(exc).__mro__:
        code = STATUS_OF.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL
