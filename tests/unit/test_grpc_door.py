"""The gRPC door over the fake engine, in-process on 127.0.0.1 port 0: proto ⇄ domain, one status per domain
error, health following readiness, cancellation and server-side stream ends."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2

from edgephi.engine.fake import FakeEngine
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
from edgephi.grpc_door.status import STATUS_OF, status_of
from edgephi.v1 import inference_pb2 as pb
from edgephi.v1 import inference_pb2_grpc as pb_grpc
from tests.unit.harness import grpc_door, wait_until

S = pb.SamplingOptions
OK, UNAVAILABLE = "OK", grpc.StatusCode.UNAVAILABLE


async def _read(call: grpc.aio.UnaryStreamCall[object, pb.GenerateResponse]) -> list[pb.GenerateResponse]:
    out: list[pb.GenerateResponse] = []
    while (msg := await call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
        assert isinstance(msg, (pb.GenerateResponse, pb.ChatResponse))
        out.append(msg)  # type: ignore[arg-type]
    return out


async def _status(call: grpc.aio.UnaryStreamCall[object, pb.GenerateResponse]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _read(call)
    return info.value.code(), info.value.details() or ""


def test_every_domain_error_has_a_status() -> None:
    domain = {cls for cls in vars(__import__("edgephi.errors").errors).values()
              if isinstance(cls, type) and issubclass(cls, RequestError) and cls is not RequestError}  # fmt: skip
    assert domain == set(STATUS_OF)
    assert status_of(InvalidArgument("x", "y")) is grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(Overloaded("busy")) is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_of(MemoryGuarded("m")) is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_of(ReaderStalled("r")) is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_of(NotServing("n")) is UNAVAILABLE
    assert status_of(StreamAborted("s")) is UNAVAILABLE
    assert status_of(EngineFailed("e")) is grpc.StatusCode.INTERNAL
    assert status_of(RequestError("unlisted")) is grpc.StatusCode.INTERNAL


async def test_generate_streams_text_token_ids_and_usage() -> None:
    async with grpc_door(FakeEngine(reply="hello there")) as door:
        msgs = await _read(door.stub.Generate(pb.GenerateRequest(text="hi", sampling=S(max_tokens=5))))
        assert "".join(m.text for m in msgs) == "hello"
        assert [t for m in msgs for t in m.token_ids] == list(b"hello")
        last = msgs[-1]
        assert last.finish_reason == pb.FINISH_REASON_LENGTH
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (2, 5)
        assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])
        assert door.counter("Generate", OK) == 1


async def test_token_id_prompts_and_chat() -> None:
    engine = FakeEngine(reply="fine")
    async with grpc_door(engine) as door:
        msgs = await _read(door.stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[104, 105]))))
        assert engine.requests[-1][1].prompt_token_ids == (104, 105)
        assert msgs[-1].finish_reason == pb.FINISH_REASON_STOP
        chat = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="hi")])
        replies = await _read(door.stub.Chat(chat))
        assert "".join(m.text for m in replies) == "fine"
        assert engine.requests[-1][0].startswith("chat-")
        assert engine.requests[-1][1].sampling.stop_token_ids == (engine.tokenizer.end_of_turn_id,)


async def test_count_tokens_and_model_info() -> None:
    async with grpc_door(FakeEngine(max_context_tokens=400)) as door:
        r = await door.stub.CountTokens(pb.CountTokensRequest(text="four"))
        assert (r.token_count, r.max_context_tokens) == (4, 400)
        info = await door.stub.GetModelInfo(pb.GetModelInfoRequest())
        assert (info.model_name, info.max_context_tokens, info.engine_version) == ("fake", 400, "fake")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await door.stub.CountTokens(pb.CountTokensRequest())
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == "input: set either text or chat"
        assert door.counter("CountTokens", "INVALID_ARGUMENT") == 1


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.GenerateRequest(), "prompt"),
        (pb.GenerateRequest(text=" "), "text"),
        (pb.GenerateRequest(text="hi", sampling=S(top_p=2.0)), "sampling.top_p"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[999])), "token_ids.ids[0]"),
    ],
)
async def test_invalid_fields_are_invalid_argument_naming_the_proto_path(
    request_: pb.GenerateRequest, field: str
) -> None:
    async with grpc_door() as door:
        code, details = await _status(door.stub.Generate(request_))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(f"{field}: ")
        assert door.engine.requests == []


async def test_loading_is_unavailable_and_health_follows_readiness() -> None:
    engine = FakeEngine()
    async with grpc_door(engine, serving=False) as door:
        code, details = await _status(door.stub.Generate(pb.GenerateRequest(text="hi")))
        assert (code, details) == (UNAVAILABLE, "not serving: loading; retry later")
        for service in ("", "edgephi.v1.InferenceService"):
            h = await door.health.Check(health_pb2.HealthCheckRequest(service=service))
            assert h.status == health_pb2.HealthCheckResponse.NOT_SERVING
        door.state.attach(engine)
        await door.state.serving()
        h = await door.health.Check(health_pb2.HealthCheckRequest(service=""))
        assert h.status == health_pb2.HealthCheckResponse.SERVING
        await door.state.guarded("RSS 9 GiB > soft 8 GiB")
        h = await door.health.Check(health_pb2.HealthCheckRequest(service=""))
        assert h.status == health_pb2.HealthCheckResponse.NOT_SERVING
        code, details = await _status(door.stub.Generate(pb.GenerateRequest(text="hi")))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "memory guard: RSS 9 GiB" in details


async def test_admission_limit_is_resource_exhausted_at_once() -> None:
    hold = asyncio.Event()
    async with grpc_door(FakeEngine(hold=hold), max_concurrent_streams=1, max_queued_requests=1) as door:
        calls = [door.stub.Generate(pb.GenerateRequest(text="hi")) for _ in range(2)]
        assert await wait_until(lambda: door.state.admission.queued == 1)
        code, details = await _status(door.stub.Generate(pb.GenerateRequest(text="hi")))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "1/1 streams running and 1/1 queued" in details
        hold.set()
        for call in calls:
            assert (await _read(call))[-1].finish_reason == pb.FINISH_REASON_STOP
        assert door.counter("Generate", "RESOURCE_EXHAUSTED") == 1 and door.counter("Generate", OK) == 2


async def test_client_cancel_aborts_the_engine_request() -> None:
    engine = FakeEngine(reply="x" * 10_000, token_delay_s=0.002)
    async with grpc_door(engine) as door:
        call = door.stub.Generate(pb.GenerateRequest(text="hi"))
        first = await call.read()
        assert first.text == "x"
        call.cancel()
        assert await wait_until(lambda: engine.aborted and not door.state.streams)
        assert engine.aborted and not engine.running
        assert door.state.streams == {} and door.state.admission.running == 0
        assert door.counter("Generate", "CANCELLED") == 1


async def test_drain_past_grace_and_engine_death_end_streams_unavailable() -> None:
    engine = FakeEngine(reply="x" * 10_000, token_delay_s=0.002)
    async with grpc_door(engine) as door:
        call = door.stub.Generate(pb.GenerateRequest(text="hi"))
        await call.read()
        await door.state.draining()
        assert await door.state.drain(0.05) == 1
        code, details = await _status(call)
        assert code == UNAVAILABLE and details.startswith("server shutting down: stream aborted after the drain grace")
    engine = FakeEngine(reply="x" * 10_000, token_delay_s=0.002)
    async with grpc_door(engine) as door:
        call = door.stub.Generate(pb.GenerateRequest(text="hi"))
        await call.read()
        door.state.engine_dead("engine-core process(es) [9] exited")
        code, details = await _status(call)
        assert (code, details) == (
            UNAVAILABLE,
            "engine died: engine-core process(es) [9] exited; the service will restart",
        )
        assert engine.aborted


async def test_engine_failure_mid_stream_is_internal() -> None:
    engine = FakeEngine(reply="abcdef", fail_after=3, failure=RuntimeError("CUDA error: illegal address"))
    async with grpc_door(engine) as door:
        code, details = await _status(door.stub.Generate(pb.GenerateRequest(text="hi")))
        assert (code, details) == (grpc.StatusCode.INTERNAL, "engine error: RuntimeError")
        assert door.counter("Generate", "INTERNAL") == 1


async def test_a_stalled_reader_loses_its_stream_and_frees_its_slot() -> None:
    engine = FakeEngine(reply="x" * 20_000, max_context_tokens=20_000, kv_capacity_tokens=40_000)
    async with grpc_door(engine, stream_write_timeout_s=0.3, max_model_len=20_000) as door:
        options = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{door.port}", options=options) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            # 19,000 messages, never read: HTTP/2 flow control blocks the server's writes.
            call = stub.Generate(pb.GenerateRequest(text="hi", sampling=S(max_tokens=19_000)))
            await call.wait_for_connection()
            assert await wait_until(lambda: engine.aborted, timeout_s=10)
            assert engine.aborted and not engine.running
            assert door.state.streams == {} and door.state.admission.running == 0
            assert await wait_until(lambda: door.counter("Generate", "RESOURCE_EXHAUSTED") == 1)
            call.cancel()
