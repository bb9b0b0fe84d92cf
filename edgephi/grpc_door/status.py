"""The one table from the generation service's domain errors to gRPC status codes.

INVALID_ARGUMENT    a request field is bad (the message starts with the field's proto path)
RESOURCE_EXHAUSTED  admission control (streams + queue, KV-cache tokens) or the memory guard refused the
                    request; or the client read nothing for ``stream_write_timeout_s`` and the stream ended
UNAVAILABLE         not serving (loading, draining, dead, engine not making progress); or the server ended
                    the stream (drain past its grace, engine death)
INTERNAL            anything else the engine raised (logged with its traceback)

Every status message the door sends is at most :data:`MAX_DETAILS_WIRE_BYTES` on the wire
(:func:`bounded_details`, applied to every handler's context by
:class:`~edgephi.grpc_door.interceptors.HandlerGuardInterceptor`): the last line behind the domain errors' own
bounds (:func:`edgephi.errors.quote`).
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

# A status message travels in the ``grpc-message`` trailer, percent-encoded: every byte outside printable ASCII,
# and "%", takes three. grpc's C core (grpcio and every client built on it) refuses received metadata over
# 16 KiB and, at random, some over 8 KiB (its defaults: GRPC_ARG_ABSOLUTE_MAX_METADATA_SIZE and
# GRPC_ARG_MAX_METADATA_SIZE, "grpc.max_metadata_size", in src/core/ext/transport/chttp2/transport/
# chttp2_transport.cc); the client then sees RESOURCE_EXHAUSTED "received metadata size exceeds ... limit"
# instead of our status, and may retry. 1 KiB, an eighth of the soft limit, leaves room for the other trailers.
MAX_DETAILS_WIRE_BYTES = 1024
_CUT = "… (message cut)"

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


def wire_bytes(details: str) -> int:
    """Bytes ``details`` takes in ``grpc-message``: its UTF-8, percent-encoded outside ``0x20``–``0x7e`` and for
    ``%``."""
    return sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in details.encode("utf-8", "backslashreplace"))


def bounded_details(details: str, limit: int = MAX_DETAILS_WIRE_BYTES) -> str:
    """``details`` if it takes at most ``limit`` bytes on the wire (:func:`wire_bytes`), else its longest head
    that fits, marked ``… (message cut)``. Unpaired surrogates (which grpc cannot encode) become escapes."""
    try:
        details.encode("utf-8")
    except UnicodeEncodeError:
        details = details.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(details) * 12 <= limit or wire_bytes(details) <= limit:  # a character takes at most 4 × 3 bytes
        return details
    budget = limit - wire_bytes(_CUT)
    size = 0
    for i, ch in enumerate(details):
        size += wire_bytes(ch)
        if size > budget:
            return details[:i] + _CUT
    return details  # pragma: no cover - unreachable: the whole text did not fit
