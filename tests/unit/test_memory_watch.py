"""The runtime memory watch (edgephi/memory_watch.py): soft/hard levels with hysteresis on fake readings, limits
from settings, and the watch loop driven by a fake reader with a short interval."""

from __future__ import annotations

import asyncio
import os

import pytest

from edgephi import memory_watch as mw
from edgephi.config import Settings

GiB = 2**30
MiB = 2**20


def rss(gib: float, available_gib: float = 64.0) -> mw.MemoryReading:
    return mw.MemoryReading(rss_bytes=int(gib * GiB), available_bytes=int(available_gib * GiB))


def avail(gib: float) -> mw.MemoryReading:
    return mw.MemoryReading(rss_bytes=GiB, available_bytes=int(gib * GiB))


def rss_watch() -> mw.MemoryWatch:
    return mw.MemoryWatch(soft_rss=4 * GiB, hard_rss=6 * GiB, soft_available=None, hard_available=None)


def test_rss_levels_ok_soft_hard_with_reasons() -> None:
    w = rss_watch()
    assert w.classify(rss(3.0)) == mw.Level.OK and w.reason == ""
    assert w.classify(rss(4.0)) == mw.Level.SOFT  # at the limit counts
    assert w.reason == "service RSS 4.00 GiB ≥ soft limit 4.00 GiB"
    assert w.classify(rss(6.5)) == mw.Level.HARD
    assert w.reason == "service RSS 6.50 GiB ≥ hard limit 6.00 GiB"


def test_soft_clears_only_past_the_recovery_margin() -> None:
    w = rss_watch()
    assert w.classify(rss(4.5)) == mw.Level.SOFT
    # just under the limit, inside the 256 MiB margin: still soft (no flapping at the limit)
    assert w.classify(mw.MemoryReading(4 * GiB - 100 * MiB, 64 * GiB)) == mw.Level.SOFT
    assert w.reason.startswith("service RSS 4.50 GiB")  # the reason of the trip stays until it clears
    assert w.classify(mw.MemoryReading(4 * GiB - w.RECOVER_MARGIN, 64 * GiB)) == mw.Level.SOFT  # the edge
    assert w.classify(mw.MemoryReading(4 * GiB - w.RECOVER_MARGIN - 1, 64 * GiB)) == mw.Level.OK
    assert w.reason == ""
    assert w.classify(rss(4.0)) == mw.Level.SOFT  # and trips again


def test_hard_does_not_recover_to_ok() -> None:
    """The daemon drains and exits at the hard limit; a reading that drops meanwhile does not clear it."""
    w = rss_watch()
    assert w.classify(rss(7.0)) == mw.Level.HARD
    assert w.classify(rss(1.0)) == mw.Level.HARD
    assert w.reason == "service RSS 7.00 GiB ≥ hard limit 6.00 GiB"


def test_available_memory_floors_and_their_recovery() -> None:
    w = mw.MemoryWatch(soft_rss=None, hard_rss=None, soft_available=2 * GiB, hard_available=1 * GiB)
    assert w.classify(avail(8.0)) == mw.Level.OK
    assert w.classify(avail(2.0)) == mw.Level.SOFT  # at the floor counts
    assert w.reason == "host available 2.00 GiB ≤ soft floor 2.00 GiB"
    assert w.classify(avail(2.2)) == mw.Level.SOFT  # inside the margin above the floor
    assert w.classify(avail(2.3)) == mw.Level.OK  # 2.3 GiB > 2 GiB + 256 MiB
    assert w.classify(avail(0.5)) == mw.Level.HARD
    assert w.reason == "host available 0.50 GiB ≤ hard floor 1.00 GiB"


def test_recovery_needs_every_limit_on_the_safe_side() -> None:
    w = mw.MemoryWatch(soft_rss=4 * GiB, hard_rss=None, soft_available=2 * GiB, hard_available=None)
    assert w.classify(rss(5.0, available_gib=8.0)) == mw.Level.SOFT
    # RSS well below its limit, but available memory only just above its floor: not recovered
    assert w.classify(rss(1.0, available_gib=2.1)) == mw.Level.SOFT
    assert w.classify(rss(1.0, available_gib=3.0)) == mw.Level.OK


def test_limits_come_from_settings_in_gib_and_no_limits_means_no_watch(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("EDGEPHI_")]:
        monkeypatch.delenv(key)
    assert mw.watch_from_settings(Settings()) is None
    w = mw.watch_from_settings(Settings(memory_soft_limit_gib=1.5, min_available_hard_gib=0.5))
    assert w is not None
    assert (w.soft_rss, w.hard_rss, w.soft_available, w.hard_available) == (int(1.5 * GiB), None, None, GiB // 2)


def test_read_memory_reads_this_process_tree() -> None:
    reading = mw.read_memory(os.getpid())
    assert reading.rss_bytes > 0 and reading.available_bytes > 0
    assert mw.tree_rss(2**31 - 1) == 0  # no such process: nothing resident


async def test_watch_loop_reports_each_level_change_once() -> None:
    """A fake reader walks OK → SOFT → SOFT → OK → HARD; the loop calls back on changes only (sync and async)."""
    readings = [rss(1.0), rss(4.5), rss(4.6), rss(2.0), rss(7.0)]
    read_count = 0

    def read() -> mw.MemoryReading:
        nonlocal read_count
        reading = readings[min(read_count, len(readings) - 1)]
        read_count += 1
        return reading

    changes: list[tuple[str, str]] = []
    hard = asyncio.Event()

    async def on_change(level: str, reason: str) -> None:  # a coroutine: the loop awaits it
        changes.append((level, reason))
        if level == mw.Level.HARD:
            hard.set()

    task = asyncio.create_task(mw.run_memory_watch(rss_watch(), read, 0.001, on_change))
    try:
        await asyncio.wait_for(hard.wait(), timeout=10)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert changes == [
        ("soft", "service RSS 4.50 GiB ≥ soft limit 4.00 GiB"),
        ("ok", ""),
        ("hard", "service RSS 7.00 GiB ≥ hard limit 6.00 GiB"),
    ]
    assert read_count >= len(readings)


async def test_watch_loop_accepts_a_plain_callback_and_keeps_reading() -> None:
    seen: list[str] = []
    reads = 0
    loop = asyncio.get_running_loop()
    enough = asyncio.Event()

    def read() -> mw.MemoryReading:  # runs in a worker thread (asyncio.to_thread)
        nonlocal reads
        reads += 1
        if reads == 6:
            loop.call_soon_threadsafe(enough.set)
        return avail(0.1 if reads >= 3 else 8.0)

    def on_change(level: str, reason: str) -> None:
        seen.append(level)

    watch = mw.MemoryWatch(None, None, soft_available=2 * GiB, hard_available=1 * GiB)
    task = asyncio.create_task(mw.run_memory_watch(watch, read, 0.001, on_change))
    try:
        await asyncio.wait_for(enough.wait(), timeout=10)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert seen == ["hard"]  # one change, however many readings repeat it
