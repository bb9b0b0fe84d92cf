"""The generation service's domain errors: why a request was refused or a stream ended early.

Transport-neutral. Each front door turns them into its own statuses in one table (the gRPC door:
:mod:`edgephi.grpc_door.status`); the message is written for the client and is sent as it is.
"""

from __future__ import annotations


class RequestError(Exception):
    """Base: a request the service did not (fully) serve; ``str(exc)`` is the client-facing message."""


class InvalidArgument(RequestError, ValueError):
    """A request field is invalid. ``field`` is its path in the request (e.g. ``sampling.top_p``,
    ``messages[2].role``); the message starts with it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class Overloaded(RequestError):
    """Admission control refused the request at once: every stream slot and queue place is taken, or the KV
    cache cannot hold its tokens; the message says which limit was hit."""


class MemoryGuarded(RequestError):
    """The memory guard's soft limit is tripped: new requests are shed until memory recovers."""


class NotServing(RequestError):
    """The server is loading, draining, stopped, or its engine is not making progress; retry elsewhere/later."""


class StreamAborted(RequestError):
    """The server ended an open stream: a drain outlasted its grace, or the engine died."""


class ReaderStalled(RequestError):
    """The client read nothing for ``stream_write_timeout_s``: the stream was aborted and its slot freed."""


class EngineFailed(RequestError):
    """The engine raised something unexpected for this request (logged with its traceback)."""
