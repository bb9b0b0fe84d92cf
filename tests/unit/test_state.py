"""ServerState: lifecycle transitions, readiness (and its listeners), refusals, stream ends, drain."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from edgephi.config import Settings
from edgephi.engine.fake import FakeEngine
from edgephi.errors import MemoryGuarded, NotServing
from edgephi.exit_codes import ExitCode
from edgephi.state import PROBE_RESERVE_TOKENS, Lifecycle, ServerState, StreamEnd
from edgephi.watchdog import Notifier


@pytest.fixture
def st() -> ServerState:
    return ServerState(
        Settings(model="/nonexistent", max_concurrent_streams=2, max_queued_requests=1), Notifier(None, None)
    )


async def _ready_log(st: ServerState) -> list[bool]:
    seen: list[bool] = []

    async def listener(ready: bool) -> None:
        seen.append(ready)

    await st.on_readiness(listener)
    return seen


async def test_loading_refuses_then_serving_accepts(st: ServerState) -> None:
    seen = await _ready_log(st)
    refusal = st.refusal()
    assert isinstance(refusal, NotServing) and str(refusal) == "not serving: loading; retry later"
    st.attach(FakeEngine())
    await st.serving()
    assert st.refusal() is None and st.ready
    assert seen == [False, True]


async def test_attach_sizes_limits_and_keeps_kv_room_for_the_probe(st: ServerState) -> None:
    st.attach(FakeEngine(kv_capacity_tokens=4096, max_context_tokens=512))
    assert st.admission.token_capacity == 4096 - PROBE_RESERVE_TOKENS
    assert (st.limits.max_context_tokens, st.limits.vocab_size) == (512, 260)
    assert st.limits.default_max_tokens == st.settings.default_max_tokens


async def test_memory_guard_sheds_and_recovers(st: ServerState) -> None:
    seen = await _ready_log(st)
    st.attach(FakeEngine())
    await st.serving()
    await st.guarded("RSS 9 GiB > soft 8 GiB")
    refusal = st.refusal()
    assert isinstance(refusal, MemoryGuarded) and "RSS 9 GiB > soft 8 GiB" in str(refusal)
    assert "guarded: RSS 9 GiB" in st.status_line()
    await st.serving()
    assert st.refusal() is None and st.guard_reason == ""
    assert seen == [False, True, False, True]


async def test_stalled_engine_is_not_ready_but_keeps_its_lifecycle(st: ServerState) -> None:
    seen = await _ready_log(st)
    st.attach(FakeEngine())
    await st.serving()
    await st.set_stalled("no progress for 3.0 s")
    assert st.lifecycle is Lifecycle.SERVING and not st.ready
    refusal = st.refusal()
    assert isinstance(refusal, NotServing) and "not making progress (no progress for 3.0 s)" in str(refusal)
    await st.set_stalled("")
    assert st.ready and seen == [False, True, False, True]


async def test_draining_and_dead_are_not_left_by_serving(st: ServerState) -> None:
    st.attach(FakeEngine())
    await st.serving()
    await st.draining()
    await st.serving()  # e.g. the memory watch recovering during a drain
    await st.guarded("RSS between the limits again")  # or falling back from hard to soft during it
    assert st.lifecycle is Lifecycle.DRAINING and isinstance(st.refusal(), NotServing)
    st.engine_dead("core gone")
    await asyncio.sleep(0)
    await st.draining()
    assert st.lifecycle.name == "DEAD"
    st.stopped()
    assert st.lifecycle.name == "STOPPED" and not st.ready


async def _stream_task(st: ServerState, name: str, started: asyncio.Event) -> StreamEnd:
    stream = st.open_stream(name)
    started.set()
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        return stream.end
    finally:
        st.close_stream(name)
    return StreamEnd.CLIENT


async def test_engine_death_ends_every_stream_and_asks_for_exit_1(st: ServerState) -> None:
    st.attach(FakeEngine())
    await st.serving()
    started = [asyncio.Event(), asyncio.Event()]
    tasks = [asyncio.create_task(_stream_task(st, f"s{i}", started[i])) for i in range(2)]
    await asyncio.gather(*(e.wait() for e in started))
    assert st.engine_dead("engine-core process(es) [42] exited") == 2
    assert await asyncio.gather(*tasks) == [StreamEnd.ENGINE_DEAD, StreamEnd.ENGINE_DEAD]
    assert st.stop_requested.is_set() and st.exit_code == ExitCode.FAILED
    assert st.streams == {}


async def test_drain_waits_for_streams_then_ends_the_rest(st: ServerState) -> None:
    st.attach(FakeEngine())
    await st.serving()
    done = asyncio.Event()

    async def finishing() -> None:
        st.open_stream("quick")
        try:
            await done.wait()
        finally:
            st.close_stream("quick")

    quick = asyncio.create_task(finishing())
    started = asyncio.Event()
    slow = asyncio.create_task(_stream_task(st, "slow", started))
    await started.wait()
    asyncio.get_running_loop().call_later(0.01, done.set)
    ended = await st.drain(0.2)
    assert ended == 1
    assert await slow == StreamEnd.DRAIN
    await quick
    assert st.streams == {}


async def test_drain_with_no_streams_returns_at_once(st: ServerState) -> None:
    assert await asyncio.wait_for(st.drain(3600), 1.0) == 0


async def test_the_first_non_zero_exit_code_wins(st: ServerState) -> None:
    st.memory_exhausted("available 0.1 GiB < hard 0.5 GiB")
    st.request_stop(ExitCode.FAILED)
    assert st.exit_code == ExitCode.MEMORY and st.guard_reason.startswith("available 0.1")


async def test_gauges_follow_admission_and_the_engine(st: ServerState) -> None:
    engine = FakeEngine(kv_capacity_tokens=1000)
    st.attach(engine)
    await st.serving()
    engine.running.add("r1")
    async with st.admission.slot(250):
        g = st._gauges()
        assert g["streams_running"] == 1 and g["tokens_in_flight"] == 250
        assert g["engine_unfinished_requests"] == 1 and g["kv_cache_reserved_ratio"] == 0.25
        assert g["serving"] == 1.0
    with contextlib.suppress(KeyError):
        engine.running.remove("r1")
    assert st._gauges()["tokens_in_flight"] == 0
