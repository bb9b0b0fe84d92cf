"""Fuzzed requests against the real daemon (issue 14, item 6): hypothesis generates well over 1,000 requests,
sent in small concurrent batches, with random field values, extreme numbers, odd Unicode, huge inputs, and
random or mutated bytes on the wire. Every request must end OK or with a clear INVALID_ARGUMENT /
RESOURCE_EXHAUSTED (admission limits, grpc's 4 MiB message cap): never INTERNAL or UNKNOWN, and never a hang (a
deadline). Afterwards the engine is the same processes, health is SERVING, an ordinary request works, and the
daemon's RSS has grown less than 10 %.

Bounded: ``FUZZ_EXAMPLES`` hypothesis examples of 1-3 requests each, ``derandomize=True`` and no example
database (the same requests every run), generation capped (``max_tokens`` is mostly 1-8; unset, i.e. the
server's default of 256, or an extreme value now and then), each call under a deadline. The figures (requests,
statuses by code, seconds, RSS before/after) are printed (``pytest -s``) and recorded as properties (junit XML).
"""

from __future__ import annotations

import collections
import json
import math
import operator
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import psutil
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgephi.client import Client, sampling
from edgephi.phi4 import CHAT_CONTROL_TOKENS, CHAT_ROLES
from edgephi.testing import Daemon
from edgephi.v1 import inference_pb2 as pb

FUZZ_EXAMPLES = 1000  # hypothesis examples; each sends 1-3 requests at once
MIN_REQUESTS = 1000
CALL_TIMEOUT_S = 60.0
MAX_RSS_GROWTH = 0.10
ALLOWED = {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}
SERVICE = "/edgephi.v1.InferenceService/"

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
F32_MAX = 3.4028234663852886e38
F32_EXTREMES = [0.0, -0.0, 1e-45, 1.1754943508222875e-38, F32_MAX, -F32_MAX, math.inf, -math.inf, math.nan]
F32_EDGES = [1.0, 2.0, 2.000000238418579, 0.9999999403953552, 1e-5, -2.0, -2.000000238418579, 0.5]
# Odd Unicode: controls, bidi overrides, zero-width and BOM, noncharacters, the last code point, a lone
# combining mark, a ZWJ sequence, private use, replacement character, and text that looks like chat markup.
ODD = [
    "\x00", "\x07", "\r\n", "\u202e", "\u2066", "\u200b", "\u200d", "\ufeff", "\ufffe", "\uffff", "\U0010ffff",
    "\u0301", "👩\u200d👩\u200d👧", "\ue000", "\ufffd", "e\u0301\u0301\u0301", "𝕏", "ﷺ", "<|", "|>", "<|im_", "\\",
]  # fmt: skip
SPECIAL = [*CHAT_CONTROL_TOKENS, "<|dummy_85|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
HUGE_PIECES = ["a", "日", "\u202e", "😀", "<|im_end|>", " ", "\x00", "a<|im_sep|>"]
HUGE_SIZES = [2_000, 20_000, 200_000, 1_500_000]  # 1.5 M × "日" is 4.5 MB: over grpc's 4 MiB request cap


# --- strategies ---------------------------------------------------------------------------------------------


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of ``choices``, each drawn with the given weight."""
    table = [s for weight, s in choices for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(lambda i: table[i])


def maybe(strategy: st.SearchStrategy[Any], unset: int = 1, set_: int = 2) -> st.SearchStrategy[Any]:
    return weighted((unset, st.none()), (set_, strategy))


def repeat(piece: str, size: int) -> str:
    """``piece`` repeated to exactly ``size`` characters."""
    return (piece * (size // len(piece) + 1))[:size]


def texts(max_pieces: int = 8, special: int = 3, min_pieces: int = 0) -> st.SearchStrategy[str]:
    """Text of random pieces (any code point, odd Unicode, ASCII, chat markup: ``special`` in 60 pieces), or now
    and then a huge one (up to 1.5 M characters)."""
    piece = weighted(
        (24, st.text(st.characters(codec="utf-8"), max_size=24)),
        (12, st.sampled_from(ODD)),
        (special, st.sampled_from(SPECIAL)),
        (24 - special, st.text(st.characters(codec="ascii"), max_size=24)),
    )
    small = st.lists(piece, min_size=min_pieces, max_size=max_pieces).map("".join)
    huge = st.builds(repeat, st.sampled_from(HUGE_PIECES), st.sampled_from(HUGE_SIZES))
    return weighted((30, small), (1, huge))


def f32(low: float, high: float) -> st.SearchStrategy[float]:
    """A float32: mostly in ``[low, high]`` (the valid range), else an extreme, an edge, or any float32."""
    return weighted(
        (12, st.floats(low, high, width=32)),
        (1, st.sampled_from(F32_EXTREMES)),
        (1, st.sampled_from(F32_EDGES)),
        (1, st.floats(width=32)),
    )


def int32(small: st.SearchStrategy[int], extremes: list[int]) -> st.SearchStrategy[int]:
    return weighted((12, small), (1, st.sampled_from(extremes)), (1, st.integers(*INT32)))


SEEDS = weighted((3, st.integers(0, 2**32)), (2, st.integers(*INT64)), (1, st.sampled_from(INT64)))


@st.composite
def sampling_options(draw: st.DrawFn, vocab: int) -> pb.SamplingOptions:
    opts = pb.SamplingOptions()
    # max_tokens: mostly 1-8 so that generation stays fast; unset (the server's default) or extreme now and then.
    mt = draw(
        weighted(
            (12, st.integers(1, 8)),
            (2, st.none()),
            (1, st.sampled_from([0, -1, *INT32, 2048, 4096, 10**6])),
            (1, st.integers(*INT32)),
        )
    )
    values: dict[str, Any] = {
        "max_tokens": mt,
        "temperature": draw(maybe(f32(0.0, 2.0))),
        "top_p": draw(maybe(f32(0.0, 1.0))),
        "top_k": draw(maybe(int32(st.integers(-2, 8), [vocab - 1, vocab, vocab + 1, 100_352, *INT32]))),
        "repetition_penalty": draw(maybe(f32(0.5, 2.0))),
        "presence_penalty": draw(maybe(f32(-2.0, 2.0))),
        "frequency_penalty": draw(maybe(f32(-2.0, 2.0))),
        "min_tokens": draw(maybe(int32(st.integers(0, 8), [0, 256, 2048, *INT32]), unset=3, set_=1)),
        "seed": draw(maybe(SEEDS)),
        "ignore_eos": draw(maybe(st.booleans())),
    }  # fmt: skip
    for name, value in values.items():
        if value is not None:
            setattr(opts, name, value)
    stops = weighted((6, st.just([])), (3, st.lists(texts(3), max_size=4)), (1, st.lists(texts(3), max_size=12)))
    opts.stop.extend(draw(stops))
    return opts


@st.composite
def chat_messages(draw: st.DrawFn) -> list[pb.ChatMessage]:
    role = weighted(
        (40, st.sampled_from(CHAT_ROLES)), (1, texts(2)), (1, st.sampled_from(["User", "tool", "", "system\x00"]))
    )
    n = draw(weighted((1, st.just(0)), (10, st.integers(1, 4)), (1, st.integers(5, 40)), (1, st.just(2_000))))
    if n > 40:  # many turns: one drawn message repeated (drawing 2,000 is slow)
        return [pb.ChatMessage(role=draw(role), content=draw(texts(2)))] * n
    return [pb.ChatMessage(role=draw(role), content=draw(texts(special=1))) for _ in range(n)]


def token_ids(vocab: int) -> st.SearchStrategy[list[int]]:
    """Mostly ids in the vocabulary (the edges included); else lists with ids outside it, or very long lists."""
    valid = weighted((8, st.integers(0, vocab - 1)), (1, st.sampled_from([0, 1, 2, 3, 4, vocab - 1])))
    one = weighted((8, valid), (1, st.sampled_from([vocab, vocab + 1, -1, 100_351, *INT32])), (1, st.integers(*INT32)))
    many = st.builds(operator.mul, st.lists(valid, min_size=1, max_size=3), st.sampled_from([700, 5_000]))
    return weighted((10, st.lists(valid, max_size=40)), (3, st.lists(one, max_size=40)), (1, many))


@dataclass(frozen=True)
class Call:
    method: str
    request: Message | bytes  # bytes: sent as they are

    def show(self) -> str:
        text = repr(self.request if isinstance(self.request, bytes) else str(self.request))
        return f"{self.method} {text[:300]}{'…' if len(text) > 300 else ''} ({len(text)} chars)"


@st.composite
def generate_requests(draw: st.DrawFn, vocab: int) -> pb.GenerateRequest:
    req = pb.GenerateRequest(sampling=draw(sampling_options(vocab)))
    which = draw(st.sampled_from(["text"] * 5 + ["token_ids"] * 4 + ["none"]))
    if which == "text":
        req.text = draw(texts(min_pieces=1))
    elif which == "token_ids":
        req.token_ids.ids.extend(draw(token_ids(vocab)))
    return req


@st.composite
def count_tokens_requests(draw: st.DrawFn) -> pb.CountTokensRequest:
    which = draw(st.sampled_from(["text", "chat", "none"]))
    if which == "text":
        return pb.CountTokensRequest(text=draw(texts()))
    if which == "chat":
        return pb.CountTokensRequest(chat=pb.ChatMessages(messages=draw(chat_messages())))
    return pb.CountTokensRequest()


@st.composite
def wire_requests(draw: st.DrawFn, vocab: int) -> Call:
    """Random bytes, or a valid request's bytes with bytes flipped, inserted or cut (a mutation fuzzer)."""
    method = draw(st.sampled_from(["Generate", "Chat", "CountTokens", "GetModelInfo"]))
    if draw(st.booleans()):
        return Call(method, draw(st.binary(max_size=300)))
    valid: Message
    if method == "Generate":
        valid = draw(generate_requests(vocab))
    elif method == "Chat":
        valid = pb.ChatRequest(messages=draw(chat_messages()), sampling=draw(sampling_options(vocab)))
    elif method == "CountTokens":
        valid = draw(count_tokens_requests())
    else:
        valid = pb.GetModelInfoRequest()
    data = bytearray(valid.SerializeToString())
    for at, byte, op in draw(
        st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 255), st.sampled_from("fic")), max_size=4)
    ):
        at = at % (len(data) + 1)
        if op == "f" and at < len(data):
            data[at] = byte
        elif op == "i":
            data.insert(at, byte)
        else:
            del data[at:]
    return Call(method, bytes(data))


def chat_call(request: pb.ChatRequest) -> Call:
    return Call("Chat", request)


def calls(vocab: int) -> st.SearchStrategy[Call]:
    return weighted(
        (5, generate_requests(vocab).map(lambda r: Call("Generate", r))),
        (5, st.builds(pb.ChatRequest, messages=chat_messages(), sampling=sampling_options(vocab)).map(chat_call)),
        (3, count_tokens_requests().map(lambda r: Call("CountTokens", r))),
        (1, st.just(Call("GetModelInfo", pb.GetModelInfoRequest()))),
        (4, wire_requests(vocab)),
    )  # fmt: skip


# --- sending ------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    call: Call
    code: str
    details: str
    messages: int


def send(client: Client, call: Call) -> Outcome:
    streaming = call.method in ("Generate", "Chat")
    messages = 0
    try:
        if isinstance(call.request, bytes):
            path = SERVICE + call.method
            kind = client.channel.unary_stream if streaming else client.channel.unary_unary
            rpc: Callable[..., Any] = kind(path, request_serializer=None, response_deserializer=None)
        else:
            rpc = getattr(client.stub, call.method)
        result = rpc(call.request, timeout=CALL_TIMEOUT_S)
        if streaming:
            for _ in result:
                messages += 1
    except grpc.RpcError as exc:
        return Outcome(call, exc.code().name, exc.details() or "", messages)
    return Outcome(call, "OK", "", messages)


def rss(pid: int) -> tuple[int, int]:
    """``(the daemon's own RSS, the RSS of the daemon and its children: engine core and workers)`` in bytes."""
    proc = psutil.Process(pid)
    own = proc.memory_info().rss
    children = sum(c.memory_info().rss for c in proc.children(recursive=True))
    return own, own + children


def engine_pids(pid: int) -> set[int]:
    return {c.pid for c in psutil.Process(pid).children(recursive=True)}


def ordinary_requests(client: Client) -> None:
    """One of each method, all valid: the engine serves, and everything the daemon needs is loaded."""
    msgs = list(client.generate("Hello there", sampling(max_tokens=4, ignore_eos=True), timeout=CALL_TIMEOUT_S))
    assert sum(len(m.token_ids) for m in msgs) == 4
    assert list(client.chat([("user", "hi")], sampling(max_tokens=2), timeout=CALL_TIMEOUT_S))
    assert client.count_tokens("counting") > 0
    assert client.model_info().max_context_tokens > 0


def test_fuzzed_requests_get_clear_statuses_and_leave_the_daemon_healthy(
    daemon: Daemon, record_property: Callable[[str, object], None]
) -> None:
    with daemon.client() as client, ThreadPoolExecutor(max_workers=3) as pool:
        vocab = client.model_info().vocab_size
        for _ in range(5):  # warm up: first-use allocations (sampler paths, tokenizer caches) are not a leak
            ordinary_requests(client)
        before = rss(daemon.proc.pid)
        engine_before = engine_pids(daemon.proc.pid)
        codes: collections.Counter[str] = collections.Counter()
        by_method: collections.Counter[str] = collections.Counter()
        refused: collections.Counter[str] = collections.Counter()  # INVALID_ARGUMENT by the field it names
        sample_details: dict[str, str] = {}  # the first refusal message per method and code, for the record
        rss_series: list[float] = []  # the daemon's RSS (MiB) every 100 batches: flat, not climbing
        started = time.monotonic()

        @settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(batch=st.lists(calls(vocab), min_size=1, max_size=3))
        def one_batch(batch: list[Call]) -> None:
            for out in pool.map(lambda call: send(client, call), batch):
                codes[out.code] += 1
                key = f"{out.call.method}:{out.code}"
                by_method[key] += 1
                if out.details:
                    sample_details.setdefault(key, out.details[:160])
                if out.code == "INVALID_ARGUMENT":
                    refused[re.sub(r"\[\d+\]", "[i]", out.details.partition(":")[0])[:40]] += 1
                assert out.code in ALLOWED, f"{out.code} {out.details[:500]!r} for {out.call.show()}"
            assert daemon.proc.poll() is None, "the daemon died"
            if sum(by_method.values()) // 200 > len(rss_series):
                rss_series.append(round(rss(daemon.proc.pid)[0] / 2**20, 1))

        one_batch()
        seconds = time.monotonic() - started

        time.sleep(1.0)  # let the last streams' buffers go
        after = rss(daemon.proc.pid)
        assert client.health() == "SERVING"
        assert engine_pids(daemon.proc.pid) == engine_before, "the engine's processes changed (it died or restarted)"
        ordinary_requests(client)

    requests = sum(codes.values())
    figures = {
        "requests": requests,
        "seconds": round(seconds, 1),
        "statuses": dict(codes.most_common()),
        "by_method": dict(sorted(by_method.items())),
        "invalid_argument_by_field": dict(refused.most_common()),
        "daemon_rss_mib_before": round(before[0] / 2**20, 1),
        "daemon_rss_mib_after": round(after[0] / 2**20, 1),
        "tree_rss_mib_before": round(before[1] / 2**20, 1),
        "tree_rss_mib_after": round(after[1] / 2**20, 1),
        "daemon_rss_mib_every_200_requests": rss_series,
        "sample_details": sample_details,
    }
    print("\nfuzz figures:", json.dumps(figures, indent=1))
    for name, value in figures.items():
        record_property(f"fuzz_{name}", value)
    assert requests >= MIN_REQUESTS
    assert set(codes) <= ALLOWED
    growth = (after[0] - before[0]) / before[0]
    assert growth <= MAX_RSS_GROWTH, f"daemon RSS grew {growth:.1%}: {figures}"
