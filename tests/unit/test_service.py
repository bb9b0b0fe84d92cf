"""GenerationService over the fake engine: refuse → validate → admit → stream → account, and every way a stream
ends (finished, closed by the caller, cancelled, drained, engine death, engine errors)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from edgephi.config import Settings
from edgephi.engine.fake import FakeEngine
from edgephi.engine.types import Delta, EngineDeadError, EngineRequestError
from edgephi.errors import EngineFailed, InvalidArgument, MemoryGuarded, NotServing, Overloaded, StreamAborted
from edgephi.service import GenerationService
from edgephi.state import ServerState, StreamEnd
from edgephi.validation import ChatMessage, ChatPrompt, SamplingInput, TextPrompt
from edgephi.watchdog import Notifier
from tests.unit.harness import wait_until


@contextlib.asynccontextmanager
async def service(engine: FakeEngine, *, serving: bool = True, **settings: object) -> AsyncIterator[GenerationService]:
    values: dict[str, object] = {"model": "/nonexistent", "max_concurrent_streams": 1, "max_queued_requests": 0}
    values.update(settings)
    st = ServerState(Settings(**values), Notifier(None, None))  # type: ignore[arg-type]
    svc = GenerationService(st)
    if serving:
        st.attach(engine)
        await st.serving()
    try:
        yield svc
    finally:
        svc.close()


async def collect(svc: GenerationService, text: str = "hi", **sampling: object) -> list[Delta]:
    stream = svc.generate(TextPrompt(text), SamplingInput(**sampling))  # type: ignore[arg-type]
    async with contextlib.aclosing(stream):
        return [d async for d in stream]


def sample(svc: GenerationService, name: str, labels: dict[str, str] | None = None) -> float:
    return svc.state.metrics.registry.get_sample_value(name, labels or {}) or 0.0


async def test_stream_concatenates_to_the_reply_and_accounts_it() -> None:
    engine = FakeEngine(reply="hello world")
    async with service(engine) as svc:
        deltas = await collect(svc, "hi")
        assert "".join(d.text for d in deltas) == "hello world"
        last = deltas[-1]
        assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == ("stop", 2, 11)
        assert all(d.finish_reason is None for d in deltas[:-1])
        assert sample(svc, "edgephi_completion_tokens_total") == 11
        assert sample(svc, "edgephi_prompt_tokens_total") == 2
        assert sample(svc, "edgephi_time_to_first_token_seconds_count") == 1
        assert sample(svc, "edgephi_time_per_output_token_seconds_count") == 1
        assert svc.state.tokens_generated == 11
        assert svc.state.streams == {} and svc.state.admission.running == 0


async def test_max_tokens_and_stop_strings_finish_the_stream() -> None:
    async with service(FakeEngine(reply="one two three")) as svc:
        assert "".join(d.text for d in await collect(svc, max_tokens=3)) == "one"
        assert (await collect(svc, max_tokens=3))[-1].finish_reason == "length"
        deltas = await collect(svc, stop=("two",))
        assert "".join(d.text for d in deltas) == "one " and deltas[-1].finish_reason == "stop"


async def test_the_last_delta_comes_after_the_slot_is_free() -> None:
    """A client that sends its next request on reading the last message is never refused by its own previous
    one: with one slot and no queue, the next request is admitted while the previous stream's last delta is
    being handled."""
    async with service(FakeEngine(reply="ab")) as svc:
        stream = svc.generate(TextPrompt("x"), SamplingInput())
        async with contextlib.aclosing(stream):
            async for delta in stream:
                if delta.finish_reason is not None:
                    assert svc.state.admission.running == 0
                    assert "".join(d.text for d in await collect(svc)) == "ab"


async def test_refusals_come_before_validation() -> None:
    async with service(FakeEngine(), serving=False) as svc:
        with pytest.raises(NotServing, match="not serving: loading"):
            await collect(svc, "")
        with pytest.raises(NotServing):
            await svc.count_tokens(TextPrompt("x"))
        with pytest.raises(NotServing):
            svc.model_info()
    async with service(FakeEngine()) as svc:
        await svc.state.guarded("RSS high")
        with pytest.raises(MemoryGuarded):
            await collect(svc, "")
        await svc.state.serving()
        with pytest.raises(InvalidArgument, match=r"^text: prompt text must not be empty$"):
            await collect(svc, "")


async def test_count_tokens_and_model_info() -> None:
    engine = FakeEngine(max_context_tokens=300)
    async with service(engine) as svc:
        assert await svc.count_tokens(TextPrompt("four")) == (4, 300)
        chat = ChatPrompt((ChatMessage("user", "hi"),), "chat.messages")
        n, _ = await svc.count_tokens(chat)
        assert n == len(engine.tokenizer.encode(engine.tokenizer.render_chat_text([("user", "hi")])))
        assert svc.model_info() is engine.info


async def test_chat_requests_stop_on_the_end_of_turn_id() -> None:
    engine = FakeEngine(reply="ok")
    async with service(engine) as svc:
        stream = svc.generate(ChatPrompt((ChatMessage("user", "hi"),)), SamplingInput(), kind="chat")
        async with contextlib.aclosing(stream):
            assert "".join([d.text async for d in stream]) == "ok"
        request_id, request = engine.requests[-1]
        assert request_id.startswith("chat-")
        assert request.sampling.stop_token_ids == (engine.tokenizer.end_of_turn_id,)


async def test_admission_refuses_when_the_only_slot_is_taken() -> None:
    hold = asyncio.Event()
    async with service(FakeEngine(hold=hold)) as svc:
        first = asyncio.create_task(collect(svc))
        assert await wait_until(lambda: svc.state.admission.running)
        with pytest.raises(Overloaded, match="1/1 streams running and 0/0 queued"):
            await collect(svc)
        hold.set()
        assert (await first)[-1].finish_reason == "stop"


async def test_closing_the_stream_aborts_the_engine_request_and_frees_everything() -> None:
    engine = FakeEngine(reply="x" * 100, token_delay_s=0.001)
    async with service(engine) as svc:
        stream = svc.generate(TextPrompt("x"), SamplingInput())
        got = [await stream.__anext__() for _ in range(3)]
        assert len(got) == 3 and engine.running
        await stream.aclose()
        request_id = engine.requests[-1][0]
        assert engine.aborted == [request_id] and not engine.running
        assert svc.state.streams == {} and svc.state.admission.running == 0 and svc.state.admission.tokens == 0
        assert sample(svc, "edgephi_completion_tokens_total") == 3


async def test_client_cancel_aborts_and_propagates() -> None:
    engine = FakeEngine(reply="x" * 1000, token_delay_s=0.001)
    async with service(engine) as svc:
        task = asyncio.create_task(collect(svc))
        assert await wait_until(lambda: engine.running)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert engine.aborted and not engine.running and svc.state.streams == {}


@pytest.mark.parametrize("end", [StreamEnd.DRAIN, StreamEnd.ENGINE_DEAD])
async def test_a_server_side_end_becomes_stream_aborted_with_the_reason(end: StreamEnd) -> None:
    engine = FakeEngine(reply="x" * 1000, token_delay_s=0.001)
    async with service(engine) as svc:
        task = asyncio.create_task(collect(svc))
        assert await wait_until(lambda: engine.running)
        if end is StreamEnd.DRAIN:
            assert await svc.state.drain(0.0) == 1
            expected = "server shutting down: stream aborted after the drain grace (0 s); retry elsewhere"
        else:
            svc.state.engine_dead("engine-core process(es) [7] exited")
            expected = "engine died: engine-core process(es) [7] exited; the service will restart"
        with pytest.raises(StreamAborted) as info:
            await task
        assert str(info.value) == expected
        assert engine.aborted and svc.state.streams == {}


@pytest.mark.parametrize(
    ("failure", "error", "message"),
    [
        (EngineDeadError("core exited"), StreamAborted, "engine died: core exited"),
        (EngineRequestError("top_k too large"), InvalidArgument, "sampling: top_k too large"),
        (RuntimeError("CUDA error"), EngineFailed, "engine error: RuntimeError"),
    ],
)
async def test_engine_errors_become_domain_errors(failure: Exception, error: type[Exception], message: str) -> None:
    engine = FakeEngine(reply="abcdef", fail_after=2, failure=failure)
    async with service(engine) as svc:
        with pytest.raises(error) as info:
            await collect(svc)
        assert str(info.value) == message
        assert svc.state.streams == {} and svc.state.admission.running == 0


async def test_a_dead_engine_refuses_at_once() -> None:
    engine = FakeEngine()
    engine.die("gone")
    async with service(engine) as svc:
        with pytest.raises(StreamAborted, match="engine died: gone"):
            await collect(svc)
