"""The watchdog's liveness verdict (edgephi/watchdog.py) with a fake engine probe, ``run_watchdog``'s callbacks with a
fake notifier and a short tick, and the sd_notify datagrams on a real socket. No engine, no subprocess: the
daemon-level checks (SIGSTOP, SIGKILL of a real engine core) are tests/integration/test_watchdog.py."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from edgephi.watchdog import Liveness, Notifier, Probe, Verdict, run_watchdog

GONE_PID = 2**31 - 1  # no such process


class EngineDead(RuntimeError):
    pass


class FakeEngine:
    """The facts a :class:`Probe` reads, set by the test: health, core processes, tokens, the probe's outcome."""

    def __init__(self) -> None:
        self.dead: str | None = None  # check_health raises with this message when set
        self.cores = [os.getpid()]  # a live process in a running state
        self.tokens = 0
        self.probe_mode = "ok"  # ok | hang | fail | fail-and-die
        self.health_checks = 0
        self.probes = 0

    async def check_health(self) -> None:
        self.health_checks += 1
        if self.dead is not None:
            raise EngineDead(self.dead)

    async def probe_generation(self) -> None:
        self.probes += 1
        if self.probe_mode == "hang":
            await asyncio.Event().wait()  # never answers: the engine is wedged
        if self.probe_mode == "fail":
            raise RuntimeError("scheduler rejected the request")
        if self.probe_mode == "fail-and-die":  # the core dies while the probe is in flight
            self.dead = "engine core process 4242 exited"
            self.cores = [GONE_PID]
            raise RuntimeError("connection to the engine core lost")

    def probe(self) -> Probe:
        return Probe(
            check_health=self.check_health,
            core_pids=lambda: list(self.cores),
            tokens_generated=lambda: self.tokens,
            probe_generation=self.probe_generation,
        )


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


# ------------------------------------------------------------------------------------------- verdicts


async def test_progress_is_alive_without_a_probe(engine: FakeEngine) -> None:
    liveness = Liveness(engine.probe(), probe_timeout_s=5)
    engine.tokens = 17  # tokens streamed since the last tick
    assert await liveness.check() is Verdict.ALIVE
    assert engine.probes == 0
    assert engine.health_checks == 2  # health is read first and again last


async def test_idle_engine_is_alive_when_the_probe_answers(engine: FakeEngine) -> None:
    liveness = Liveness(engine.probe(), probe_timeout_s=5)
    assert await liveness.check() is Verdict.ALIVE
    assert await liveness.check() is Verdict.ALIVE
    assert engine.probes == 2  # no progress on either tick: each asks for one token


async def test_healthy_but_no_progress_and_a_hanging_probe_is_wedged(engine: FakeEngine) -> None:
    liveness = Liveness(engine.probe(), probe_timeout_s=0.05)
    engine.probe_mode = "hang"
    assert await liveness.check() is Verdict.WEDGED
    assert liveness.reason == "probe generation took longer than 0.05 s"
    # progress resumes (e.g. a long prefill finished): alive again, no probe needed
    engine.tokens += 1
    assert await liveness.check() is Verdict.ALIVE
    assert engine.probes == 1


async def test_a_failing_probe_on_a_healthy_engine_is_wedged(engine: FakeEngine) -> None:
    liveness = Liveness(engine.probe(), probe_timeout_s=5)
    engine.probe_mode = "fail"
    assert await liveness.check() is Verdict.WEDGED
    assert liveness.reason == "probe generation failed: scheduler rejected the request"


async def test_health_raising_is_dead_at_once(engine: FakeEngine) -> None:
    liveness = Liveness(engine.probe(), probe_timeout_s=5)
    engine.dead = "engine core process 4242 exited"
    engine.cores = [GONE_PID]  # its core is gone: a pid that no longer exists must not raise
    engine.tokens = 5  # tokens counted before it died do not vouch for it
    assert await liveness.check() is Verdict.DEAD
    assert liveness.reason == "engine dead: engine core process 4242 exited"
    assert engine.probes == 0


async def test_a_core_dying_during_the_probe_is_dead_with_the_probe_error_as_cause(engine: FakeEngine) -> None:
    liveness = Liveness(engine.probe(), probe_timeout_s=5)
    engine.probe_mode = "fail-and-die"
    assert await liveness.check() is Verdict.DEAD
    assert liveness.reason == "engine dead: connection to the engine core lost"


async def test_death_between_the_first_and_last_health_read_is_dead(engine: FakeEngine) -> None:
    liveness = Liveness(engine.probe(), probe_timeout_s=5)

    async def answer_then_die() -> None:  # the probe answers, then the core dies before the verdict
        engine.dead = "EngineCore died"

    liveness.probe.probe_generation = answer_then_die
    assert await liveness.check() is Verdict.DEAD
    assert liveness.reason == "engine dead: EngineCore died"


async def test_a_stopped_core_is_wedged_even_with_progress(engine: FakeEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    class StoppedCore:
        def __init__(self, pid: int) -> None:
            self.pid = pid

        def status(self) -> str:
            return psutil.STATUS_STOPPED  # as after SIGSTOP

    monkeypatch.setattr(psutil, "Process", StoppedCore)
    liveness = Liveness(engine.probe(), probe_timeout_s=5)
    engine.tokens = 3
    assert await liveness.check() is Verdict.WEDGED
    assert liveness.reason == f"engine-core process {os.getpid()} is stopped"


# ------------------------------------------------------------------------------------------ the loop


class FakeNotifier:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send(self, **fields: Any) -> None:
        self.sent.append(fields)

    def ping(self) -> None:
        self.send(watchdog=1)


class ScriptedLiveness:
    """Returns the scripted verdicts in order (then DEAD), with a reason per verdict."""

    def __init__(self, verdicts: list[Verdict]) -> None:
        self._verdicts: Iterator[Verdict] = iter(verdicts)
        self.reason = ""
        self.ticks = 0

    async def check(self) -> Verdict:
        self.ticks += 1
        verdict = next(self._verdicts, Verdict.DEAD)
        self.reason = {Verdict.ALIVE: "", Verdict.WEDGED: "probe slow", Verdict.DEAD: "core gone"}[verdict]
        return verdict


async def test_run_watchdog_pings_while_alive_misses_while_wedged_and_returns_when_dead() -> None:
    notifier = FakeNotifier()
    events: list[tuple[str, str]] = []
    liveness = ScriptedLiveness([Verdict.ALIVE, Verdict.WEDGED, Verdict.WEDGED, Verdict.ALIVE, Verdict.DEAD])
    await asyncio.wait_for(
        run_watchdog(
            liveness,  # type: ignore[arg-type]
            notifier,  # type: ignore[arg-type]
            0.001,
            on_dead=lambda reason: events.append(("dead", reason)),
            on_miss=lambda reason: events.append(("miss", reason)),
            on_alive=lambda: events.append(("alive", "")),
        ),
        timeout=10,
    )
    assert events == [
        ("alive", ""),
        ("miss", "probe slow"),
        ("miss", "probe slow"),
        ("alive", ""),
        ("dead", "core gone"),
    ]
    assert notifier.sent == [{"watchdog": 1}, {"watchdog": 1}]  # one ping per alive tick, none otherwise
    assert liveness.ticks == 5  # returned at the first DEAD: on_dead once


async def test_run_watchdog_sends_the_status_line_with_each_ping() -> None:
    notifier = FakeNotifier()
    lines = iter(["serving, 0 streams", "serving, 2 streams"])
    dead: list[str] = []
    await asyncio.wait_for(
        run_watchdog(
            ScriptedLiveness([Verdict.ALIVE, Verdict.ALIVE]),  # type: ignore[arg-type]
            notifier,  # type: ignore[arg-type]
            0.001,
            on_dead=dead.append,
            on_miss=lambda reason: pytest.fail(f"no miss expected: {reason}"),
            status=lambda: next(lines),
        ),
        timeout=10,
    )
    assert notifier.sent == [
        {"watchdog": 1, "status": "serving, 0 streams"},
        {"watchdog": 1, "status": "serving, 2 streams"},
    ]
    assert dead == ["core gone"]


async def test_run_watchdog_with_a_real_liveness_stops_at_the_engines_death(engine: FakeEngine) -> None:
    notifier = FakeNotifier()
    misses: list[str] = []
    dead: list[str] = []
    alive_ticks = 0

    def on_alive() -> None:
        nonlocal alive_ticks
        alive_ticks += 1
        if alive_ticks == 2:
            engine.probe_mode = "fail"  # next tick: wedged

    def on_miss(reason: str) -> None:
        misses.append(reason)
        engine.dead = "EngineCore_DP0 died unexpectedly"  # the tick after: dead

    await asyncio.wait_for(
        run_watchdog(Liveness(engine.probe(), 1.0), notifier, 0.001, dead.append, on_miss, on_alive=on_alive),  # type: ignore[arg-type]
        timeout=10,
    )
    assert alive_ticks == 2 and len(notifier.sent) == 2
    assert misses == ["probe generation failed: scheduler rejected the request"]
    assert dead == ["engine dead: EngineCore_DP0 died unexpectedly"]


# --------------------------------------------------------------------------------------- sd_notify


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    with tempfile.TemporaryDirectory(dir="/tmp") as d:  # AF_UNIX paths are short: not under pytest's tmp_path
        path = str(Path(d) / "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(5)
            yield sock, path


def test_notifier_takes_the_socket_out_of_the_environment_and_sends_key_value_lines(
    notify_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = Notifier.from_env()
    assert notifier.enabled and notifier.watchdog_usec == 20_000_000
    assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"} & set(os.environ)  # children never see it
    notifier.ready("serving tiny")
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving tiny"
    notifier.send(watchdog=1, status="ok")
    assert sock.recv(4096) == b"WATCHDOG=1\nSTATUS=ok"
    notifier.extend_timeout(1.5)
    assert sock.recv(4096) == b"EXTEND_TIMEOUT_USEC=1500000"
    notifier.stopping("draining")
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=draining"
    notifier.close()
    notifier.ping()  # closed: a no-op
    assert not notifier.enabled


def test_notifier_ignores_a_watchdog_meant_for_another_process_and_is_a_noop_without_systemd(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier.from_env()
    assert notifier.watchdog_usec is None and not notifier.enabled
    notifier.ping()  # nothing to send to: no error


async def test_a_raising_liveness_check_is_a_miss_not_a_silent_end(engine: FakeEngine) -> None:
    """A bug in a check (here core_pids raising) must not end the watchdog: no ping, on_miss with the cause."""
    notifier = FakeNotifier()
    events: list[tuple[str, str]] = []
    probe = engine.probe()
    calls = 0

    def core_pids() -> list[int]:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise OSError("cannot read /proc")
        engine.dead = "engine core exited"
        return []

    probe.core_pids = core_pids
    await asyncio.wait_for(
        run_watchdog(
            Liveness(probe, probe_timeout_s=1.0),
            notifier,  # type: ignore[arg-type]
            0.001,
            on_dead=lambda reason: events.append(("dead", reason)),
            on_miss=lambda reason: events.append(("miss", reason)),
        ),
        timeout=10,
    )
    assert events[:2] == [("miss", "liveness check failed: OSError: cannot read /proc")] * 2
    assert events[-1][0] == "dead" and notifier.sent == []
