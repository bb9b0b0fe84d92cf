"""The generation service's domain errors: why a request was refused or a stream ended early.

Transport-neutral. Each front door turns them into its own statuses in one table (the gRPC door:
:mod:`edgephi.grpc_door.status`); the message is written for the client and is sent as it is.

Messages are bounded: a message that shows a client's value shows it through :func:`quote` (at most
:data:`QUOTE_CHARS` characters of it, escaped), and every message is cut at :data:`MAX_MESSAGE_CHARS`. A client
must never get back a status message as large as what it sent: gRPC carries the message in a trailer
(``grpc-message``), and a 20,000-character chat role echoed whole overflowed grpc's metadata limit, so the
client saw ``RESOURCE_EXHAUSTED`` instead of ``INVALID_ARGUMENT`` (the gRPC door's own last-line cap is in
:mod:`edgephi.grpc_door.status`).
"""

from __future__ import annotations

# How many characters of a client's value a message quotes: enough to recognise it.
QUOTE_CHARS = 64
# The longest message a RequestError carries (characters); longer ones are cut. The longest message written
# here is about 200 characters; this cap is for text from elsewhere (an engine's refusal, an exception).
MAX_MESSAGE_CHARS = 512
ELLIPSIS = "…"
_ESCAPES = {"\\": "\\\\", "'": "\\'"}


def quote(value: str, limit: int = QUOTE_CHARS) -> str:
    """``value`` quoted for an error message or a log line, at most ``limit`` characters of it.

    Non-printable characters (controls, format characters such as U+202E, unpaired surrogates) are escaped
    (``\\x00``, ``\\u202e``) and escapes count toward ``limit``. A longer value is cut and says so with its
    length: ``'rrrr…' (20000 characters)``. The result is at most ``limit + 30`` characters.
    """
    pieces: list[str] = []
    size = 0
    for ch in value[:limit]:
        piece = _ESCAPES.get(ch) or (ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii"))
        if size + len(piece) > limit:
            break
        pieces.append(piece)
        size += len(piece)
    shown = "'" + "".join(pieces)
    if len(pieces) == len(value):
        return shown + "'"
    return f"{shown}{ELLIPSIS}' ({len(value)} characters)"


def clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` cut to at most ``limit`` characters (the cut marked with ``…`` and the original length)."""
    if len(text) <= limit:
        return text
    suffix = f"{ELLIPSIS} ({len(text)} characters)"
    return text[: max(limit - len(suffix), 0)] + suffix


class RequestError(Exception):
    """Base: a request the service did not (fully) serve; ``str(exc)`` is the client-facing message, at most
    :data:`MAX_MESSAGE_CHARS` characters (:func:`clip`)."""

    def __init__(self, message: str = "") -> None:
        super().__init__(clip(message))


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
