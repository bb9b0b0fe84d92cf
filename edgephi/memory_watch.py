"""The runtime memory watch: the service's process-tree RSS and the host's available RAM against soft/hard limits.

Soft: the daemon sheds new requests (health ``NOT_SERVING``, ``RESOURCE_EXHAUSTED``) until the reading recovers;
hard: it drains and exits 75 (``ExitCode.MEMORY``) for systemd to restart it. Limits come from the
``EDGEPHI_MEMORY_*_LIMIT_GIB`` / ``EDGEPHI_MIN_AVAILABLE_*_GIB`` settings; the fit before loading is
:mod:`edgephi.preflight`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from edgephi.config import Settings

GiB = 2**30


def tree_rss(pid: int) -> int:
    """Resident set size in bytes of process ``pid`` and all its descendants (vLLM's engine core, workers)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


@dataclass
class MemoryReading:
    rss_bytes: int
    available_bytes: int


class Level:
    OK = "ok"
    SOFT = "soft"
    HARD = "hard"


class MemoryWatch:
    """Classifies readings against soft/hard limits with hysteresis: a soft trip clears only once the reading
    is ``RECOVER_MARGIN`` (256 MiB) back on the safe side, so a reading hovering at the limit does not flap.

    Limits (bytes, None = off): ``soft_rss``/``hard_rss`` on the service's process tree; ``soft_available``/
    ``hard_available`` as minimum system available memory.
    """

    RECOVER_MARGIN = 256 * 2**20

    def __init__(
        self, soft_rss: int | None, hard_rss: int | None, soft_available: int | None, hard_available: int | None
    ) -> None:
        self.soft_rss, self.hard_rss = soft_rss, hard_rss
        self.soft_available, self.hard_available = soft_available, hard_available
        self.level = Level.OK
        self.reason = ""

    def classify(self, r: MemoryReading) -> str:
        def gi(b: int) -> str:
            return f"{b / GiB:.2f} GiB"

        if self.hard_rss is not None and r.rss_bytes >= self.hard_rss:
            self.level, self.reason = Level.HARD, f"service RSS {gi(r.rss_bytes)} ≥ hard limit {gi(self.hard_rss)}"
        elif self.hard_available is not None and r.available_bytes <= self.hard_available:
            self.level, self.reason = (
                Level.HARD,
                f"host available {gi(r.available_bytes)} ≤ hard floor {gi(self.hard_available)}",
            )
        elif self.soft_rss is not None and r.rss_bytes >= self.soft_rss:
            self.level, self.reason = Level.SOFT, f"service RSS {gi(r.rss_bytes)} ≥ soft limit {gi(self.soft_rss)}"
        elif self.soft_available is not None and r.available_bytes <= self.soft_available:
            self.level, self.reason = (
                Level.SOFT,
                f"host available {gi(r.available_bytes)} ≤ soft floor {gi(self.soft_available)}",
            )
        elif self.level == Level.SOFT:
            rss_ok = self.soft_rss is None or r.rss_bytes < self.soft_rss - self.RECOVER_MARGIN
            avail_ok = self.soft_available is None or r.available_bytes > self.soft_available + self.RECOVER_MARGIN
            if rss_ok and avail_ok:
                self.level, self.reason = Level.OK, ""
        return self.level


def watch_from_settings(settings: Settings) -> MemoryWatch | None:
    def b(v: float | None) -> int | None:
        return int(v * GiB) if v is not None else None

    w = MemoryWatch(
        b(settings.memory_soft_limit_gib),
        b(settings.memory_hard_limit_gib),
        b(settings.min_available_soft_gib),
        b(settings.min_available_hard_gib),
    )
    if all(x is None for x in (w.soft_rss, w.hard_rss, w.soft_available, w.hard_available)):
        return None
    return w


def read_memory(pid: int) -> MemoryReading:
    return MemoryReading(tree_rss(pid), int(psutil.virtual_memory().available))


async def run_memory_watch(
    watch: MemoryWatch,
    read: Callable[[], MemoryReading],
    interval_s: float,
    on_change: Callable[[str, str], object],
) -> None:
    """Every ``interval_s``: classify a reading; call ``on_change(level, reason)`` when the level changes."""
    level = Level.OK
    while True:
        started = time.monotonic()
        new = watch.classify(await asyncio.to_thread(read))
        if new != level:
            level = new
            result = on_change(new, watch.reason)
            if asyncio.iscoroutine(result):
                await result
        await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - started)))
