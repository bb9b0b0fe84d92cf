"""Bounded status messages: a refusal that shows a client's value shows at most ``QUOTE_CHARS`` characters of
it, every domain error message is clipped, and the gRPC door caps any status message on the wire, so that a
20,000-character input gets its INVALID_ARGUMENT (not grpc's RESOURCE_EXHAUSTED "received metadata size exceeds
hard limit")."""

from __future__ import annotations

import contextlib
import gc
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

import edgephi
from edgephi.engine.fake import FakeEngine
from edgephi.engine.types import EngineRequestError
from edgephi.errors import MAX_MESSAGE_CHARS, QUOTE_CHARS, InvalidArgument, StreamAborted, clip, quote
from edgephi.grpc_door.interceptors import HandlerGuardInterceptor
from edgephi.grpc_door.status import MAX_DETAILS_WIRE_BYTES, bounded_details, wire_bytes
from edgephi.phi4 import IM_START
from edgephi.v1 import inference_pb2 as pb
from tests.unit.harness import grpc_door

HUGE = 20_000
EDGEPHI = str(Path(edgephi.__file__).parent)
# quote()'s own bound: the quoted characters, the quotes, the ellipsis and " (NNNNNNN characters)".
QUOTED_MAX = QUOTE_CHARS + 30


# --- quote / clip / bounded_details ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("robot", "'robot'"),
        ("", "''"),
        ("it's", "'it\\'s'"),
        ("a\\b", "'a\\\\b'"),
        ("nul\x00 tab\t rlo\u202e", "'nul\\x00 tab\\t rlo\\u202e'"),  # controls and format characters escaped
        ("日本語", "'日本語'"),  # printable non-ASCII kept
    ],
)
def test_quote_shows_short_values_escaped(value: str, shown: str) -> None:
    assert quote(value) == shown


@pytest.mark.parametrize("char", ["r", "日", "😀", "\x00", "\u202e", "\\", "\U000e0001"])
def test_quote_bounds_long_values_and_gives_their_length(char: str) -> None:
    shown = quote(char * HUGE)
    assert len(shown) <= QUOTED_MAX
    assert shown.endswith(f"…' ({HUGE} characters)")
    assert quote(char * QUOTE_CHARS, limit=len(char.encode("unicode_escape")) * QUOTE_CHARS).endswith("'")


def test_clip_bounds_any_text() -> None:
    assert clip("short") == "short"
    cut = clip("x" * HUGE)
    assert len(cut) == MAX_MESSAGE_CHARS and cut.endswith(f"… ({HUGE} characters)")
    # Every domain error is clipped, whatever builds it.
    assert len(str(StreamAborted("engine died: " + "y" * HUGE))) <= MAX_MESSAGE_CHARS
    assert len(str(InvalidArgument("sampling", "z" * HUGE))) <= MAX_MESSAGE_CHARS


@pytest.mark.parametrize("char", ["a", "%", "é", "日", "😀", "\n", "\ud800"])
def test_bounded_details_fits_the_wire_limit(char: str) -> None:
    text = "field: " + char * HUGE
    cut = bounded_details(text)
    assert wire_bytes(cut) <= MAX_DETAILS_WIRE_BYTES
    assert cut.startswith("field: ") and cut.endswith("… (message cut)")
    cut.encode("utf-8")  # encodable: an unpaired surrogate became an escape
    assert bounded_details("field: fine") == "field: fine"


def test_wire_bytes_counts_percent_encoding() -> None:
    assert wire_bytes("abc") == 3
    assert wire_bytes("%") == 3
    assert wire_bytes("é") == 6  # two UTF-8 bytes, each %XX
    assert wire_bytes("\n") == 3


# --- every echoing refusal through the real gRPC door, with a 20,000-character input --------------------------


def _role(n: int = HUGE) -> pb.ChatMessage:
    return pb.ChatMessage(role="r" * n, content="hi")


ECHOING = [
    ("Chat role", "Chat", pb.ChatRequest(messages=[_role()]), "messages[0].role"),
    (
        "CountTokens chat role",
        "CountTokens",
        pb.CountTokensRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="x"), _role()])),
        "chat.messages[1].role",
    ),
    (
        "Chat role of odd Unicode",
        "Chat",
        pb.ChatRequest(messages=[pb.ChatMessage(role="\u202e😀日\x00" * (HUGE // 4), content="x")]),
        "messages[0].role",
    ),
    (
        "Chat content with a special token",
        "Chat",
        pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="c" * HUGE + IM_START + "c" * HUGE)]),
        "messages[0].content",
    ),
    (
        "a stop string",
        "Generate",
        pb.GenerateRequest(text="hi", sampling=pb.SamplingOptions(stop=["s" * HUGE])),
        "sampling.stop[0]",
    ),
    ("a text prompt", "Generate", pb.GenerateRequest(text="t" * HUGE), "text"),
    (
        "CountTokens text",
        "CountTokens",
        pb.CountTokensRequest(text="t" * (HUGE * 50)),
        "text",
    ),
]


async def _call(door: Any, method: str, request: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        if method in ("Generate", "Chat"):
            async for _ in getattr(door.stub, method)(request):
                pass
        else:
            await getattr(door.stub, method)(request)
    return err.value


@pytest.mark.parametrize(("name", "method", "request_", "field"), ECHOING, ids=[e[0] for e in ECHOING])
async def test_each_echoing_refusal_is_bounded_and_names_its_field(
    name: str, method: str, request_: Any, field: str
) -> None:
    async with grpc_door(max_model_len=512) as door:
        err = await _call(door, method, request_)
        details = err.details() or ""
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, details
        assert details.startswith(f"{field}: ")
        assert len(details) <= len(field) + 250  # the message around the quote is short
        assert wire_bytes(details) <= MAX_DETAILS_WIRE_BYTES


async def test_an_engine_refusal_echoing_input_is_clipped() -> None:
    engine = FakeEngine(fail_after=0, failure=EngineRequestError("bad stop: " + "s" * HUGE))
    async with grpc_door(engine) as door:
        err = await _call(door, "Generate", pb.GenerateRequest(text="hi"))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = err.details() or ""
        assert details.startswith("sampling: bad stop: ") and len(details) <= MAX_MESSAGE_CHARS


# --- the door's last line: any handler's status message is capped, an escaping exception bounded ---------------


@contextlib.asynccontextmanager
async def _guarded(handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]) -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server(interceptors=[HandlerGuardInterceptor()])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.T", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        await channel.close(None)
        await server.stop(None)


async def _abort_huge(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "field: " + "日" * HUGE)


async def _set_huge(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
    context.set_details("x" * HUGE)
    return b""


async def _raise_huge(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    raise ValueError("v" * HUGE)


async def _stream_raise_huge(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
    yield b"first"
    raise RuntimeError("w" * HUGE)


async def test_any_status_message_is_capped_on_the_wire(caplog: pytest.LogCaptureFixture) -> None:
    ident: Any = None
    handlers = {
        "Abort": grpc.unary_unary_rpc_method_handler(_abort_huge, ident, ident),
        "Set": grpc.unary_unary_rpc_method_handler(_set_huge, ident, ident),
        "Raise": grpc.unary_unary_rpc_method_handler(_raise_huge, ident, ident),
        "StreamRaise": grpc.unary_stream_rpc_method_handler(_stream_raise_huge, ident, ident),
    }
    async with _guarded(handlers) as channel:
        expected = {
            "Abort": grpc.StatusCode.INVALID_ARGUMENT,
            "Set": grpc.StatusCode.FAILED_PRECONDITION,
            "Raise": grpc.StatusCode.UNKNOWN,
        }
        for name, code in expected.items():
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await channel.unary_unary(f"/t.T/{name}", None, None)(b"x")
            assert err.value.code() == code, err.value.details()
            assert wire_bytes(err.value.details() or "") <= MAX_DETAILS_WIRE_BYTES
            assert (err.value.details() or "").endswith("… (message cut)")
        call = channel.unary_stream("/t.T/StreamRaise", None, None)(b"x")
        assert await call.read() == b"first"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.UNKNOWN
        assert (err.value.details() or "").startswith("Unexpected <class 'RuntimeError'>: www")
        assert wire_bytes(err.value.details() or "") <= MAX_DETAILS_WIRE_BYTES
    assert "unexpected error in handler" in caplog.text  # logged with its traceback


# --- a refused request is freed at once, not at the next full collection of Python's cyclic GC ------------------


def _garbage_holding(kinds: tuple[type, ...]) -> list[str]:
    """The server's frames (edgephi's code) in the cyclic garbage (collected with DEBUG_SAVEALL) whose locals hold
    an instance of ``kinds``."""
    held = []
    for obj in gc.garbage:
        if not isinstance(obj, types.FrameType) or not obj.f_code.co_filename.startswith(EDGEPHI):
            continue
        if any(isinstance(v, kinds) for v in obj.f_locals.values()):
            held.append(f"{obj.f_code.co_name} ({obj.f_code.co_filename.rsplit('/', 1)[-1]})")
    return held


@pytest.mark.parametrize("method", ["CountTokens", "Chat", "unauthenticated"])
async def test_a_refused_request_is_not_kept_in_a_reference_cycle(method: str) -> None:
    """grpc keeps a handler's AbortError in a reference cycle; its traceback used to hold our handler frames and
    with them the request (up to 4 MiB) until a full collection, rare in the daemon (vLLM's heap): the fuzz
    test's RSS climbed by tens of MiB."""
    request: Any = (
        pb.CountTokensRequest(chat=pb.ChatMessages(messages=[_role()]))
        if method != "Chat"
        else pb.ChatRequest(messages=[_role()])
    )
    token = b"s3cret-token-0123456789" if method == "unauthenticated" else None
    code = grpc.StatusCode.UNAUTHENTICATED if token else grpc.StatusCode.INVALID_ARGUMENT
    method = "CountTokens" if token else method
    async with grpc_door(token=token) as door:
        await _call(door, method, request)  # warm up
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(3):
                err = await _call(door, method, request)
                assert err.code() == code
            gc.collect()
            assert _garbage_holding((pb.CountTokensRequest, pb.ChatRequest, InvalidArgument, bytes)) == []
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
