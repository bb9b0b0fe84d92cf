"""The watchdog's liveness verdict over real processes standing in for vLLM's engine core (no vLLM: seconds).

The engine-side check is the adapter's own :class:`edgephi.engine.vllm.CoreProcesses`; the stand-in core is a real
child process that the tests stop, kill (left a zombie, as vLLM's dead core is until reaped) or reap.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Iterator

import psutil
import pytest

from edgephi.engine.types import EngineDeadError
from edgephi.engine.vllm import CoreProcesses
from edgephi.watchdog import Liveness, Probe, Verdict


@pytest.fixture
def core() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


async def until_zombie(pid: int) -> None:
    """Wait (bounded) until the kernel has finished a killed process: SIGKILL is delivered asynchronously."""
    proc = psutil.Process(pid)
    for _ in range(500):
        if proc.status() == psutil.STATUS_ZOMBIE:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"process {pid} still not dead 5 s after SIGKILL")


class Flow:
    """Tokens that keep flowing (every read counts more), and a probe generation that records its calls."""

    def __init__(self, cores: CoreProcesses) -> None:
        self.cores = cores
        self.tokens = 0
        self.flowing = True
        self.probes = 0
        self.during_probe: list[object] = []

    def tokens_generated(self) -> int:
        if self.flowing:
            self.tokens += 7
        return self.tokens

    async def check_health(self) -> None:
        self.cores.check()

    async def probe_generation(self) -> None:
        self.probes += 1
        for action in self.during_probe:
            if callable(action):
                action()

    def liveness(self) -> Liveness:
        probe = Probe(
            check_health=self.check_health,
            core_pids=lambda: self.cores.pids,
            tokens_generated=self.tokens_generated,
            probe_generation=self.probe_generation,
        )
        return Liveness(probe, probe_timeout_s=2.0)


async def test_core_killed_while_tokens_flow_is_dead_at_the_next_tick(core: subprocess.Popen[bytes]) -> None:
    flow = Flow(CoreProcesses([psutil.Process(core.pid)]))
    liveness = flow.liveness()
    assert await liveness.check() is Verdict.ALIVE
    assert flow.probes == 0  # tokens flowed: no probe needed
    core.send_signal(signal.SIGKILL)
    await until_zombie(core.pid)  # dead but not reaped, as vLLM's core is until its parent waits for it
    # tokens are still counted as "progressed" at this tick, and the verdict must still be DEAD
    assert await liveness.check() is Verdict.DEAD
    assert f"[{core.pid}]" in liveness.reason and "exited" in liveness.reason


async def test_reaped_core_is_dead(core: subprocess.Popen[bytes]) -> None:
    flow = Flow(CoreProcesses([psutil.Process(core.pid)]))
    liveness = flow.liveness()
    core.kill()
    core.wait(5)  # reaped: the PID no longer exists
    assert await liveness.check() is Verdict.DEAD


async def test_no_core_found_at_start_up_is_dead() -> None:
    flow = Flow(CoreProcesses([]))
    liveness = flow.liveness()
    assert await liveness.check() is Verdict.DEAD
    assert "no engine-core process" in liveness.reason
    with pytest.raises(EngineDeadError, match="no engine-core process"):
        CoreProcesses([]).check()


async def test_core_dying_during_the_probe_is_dead_not_alive(core: subprocess.Popen[bytes]) -> None:
    flow = Flow(CoreProcesses([psutil.Process(core.pid)]))
    flow.flowing = False  # idle: the tick asks for a one-token probe
    liveness = flow.liveness()
    assert await liveness.check() is Verdict.ALIVE
    assert flow.probes == 1

    def kill_and_wait() -> None:
        core.kill()
        core.wait(5)

    flow.during_probe.append(kill_and_wait)  # the probe "answers", but the core is gone by the ping
    assert await liveness.check() is Verdict.DEAD


async def test_stopped_core_is_wedged_then_alive_again(core: subprocess.Popen[bytes]) -> None:
    flow = Flow(CoreProcesses([psutil.Process(core.pid)]))
    liveness = flow.liveness()
    core.send_signal(signal.SIGSTOP)
    try:
        proc = psutil.Process(core.pid)
        for _ in range(100):  # bounded: the kernel marks it stopped within milliseconds
            if proc.status() == psutil.STATUS_STOPPED:
                break
            await asyncio.sleep(0.01)
        assert await liveness.check() is Verdict.WEDGED
        assert "stopped" in liveness.reason
    finally:
        core.send_signal(signal.SIGCONT)
    assert await liveness.check() is Verdict.ALIVE
