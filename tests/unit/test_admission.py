"""Admission control: slots, a FIFO queue, refusal at once beyond both, and the KV-cache token budget."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from edgephi.admission import Admission
from edgephi.errors import Overloaded


async def _hold(adm: Admission, release: asyncio.Event, order: list[str], name: str, tokens: int = 0) -> None:
    async with adm.slot(tokens):
        order.append(name)
        await release.wait()


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_slots_then_queue_then_refusal() -> None:
    adm = Admission(max_running=2, max_queued=1)
    release = asyncio.Event()
    order: list[str] = []
    tasks = [asyncio.create_task(_hold(adm, release, order, n)) for n in "abc"]
    await _settle()
    assert (adm.running, adm.queued, order) == (2, 1, ["a", "b"])
    with pytest.raises(Overloaded, match=r"2/2 streams running and 1/1 queued"):
        async with adm.slot():
            pass
    release.set()
    await asyncio.gather(*tasks)
    assert order == ["a", "b", "c"]
    assert (adm.running, adm.queued) == (0, 0)


async def test_queue_is_fifo_and_a_freed_slot_passes_straight_to_the_next_waiter() -> None:
    adm = Admission(max_running=1, max_queued=3)
    gates = {n: asyncio.Event() for n in "abcd"}
    order: list[str] = []
    tasks = {n: asyncio.create_task(_hold(adm, gates[n], order, n)) for n in "abcd"}
    await _settle()
    assert order == ["a"] and adm.queued == 3
    for n in "abc":
        gates[n].set()
        await tasks[n]
        await _settle()
        assert adm.running == 1  # never drops to 0 between holders: no newcomer can jump the queue
    gates["d"].set()
    await tasks["d"]
    assert order == ["a", "b", "c", "d"]
    assert adm.running == 0


async def test_a_cancelled_waiter_gives_its_place_back() -> None:
    adm = Admission(max_running=1, max_queued=1)
    release = asyncio.Event()
    order: list[str] = []
    first = asyncio.create_task(_hold(adm, release, order, "a"))
    waiter = asyncio.create_task(_hold(adm, release, order, "b"))
    await _settle()
    assert adm.queued == 1
    waiter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiter
    assert adm.queued == 0
    release.set()
    await first
    assert order == ["a"] and adm.running == 0


async def test_kv_token_budget_refuses_before_queueing_and_is_given_back() -> None:
    adm = Admission(max_running=4, max_queued=4, token_capacity=100)
    release = asyncio.Event()
    order: list[str] = []
    held = asyncio.create_task(_hold(adm, release, order, "a", tokens=70))
    await _settle()
    assert adm.tokens == 70
    with pytest.raises(Overloaded, match=r"70 tokens in flight \+ 31 requested exceed the KV cache's 100 tokens"):
        async with adm.slot(31):
            pass
    assert adm.tokens == 70 and adm.queued == 0
    async with adm.slot(30):
        assert adm.tokens == 100
    release.set()
    await held
    assert adm.tokens == 0


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="max_running must be > 0"):
        Admission(0, 1)
    with pytest.raises(ValueError):
        Admission(1, -1)
