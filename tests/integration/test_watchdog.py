"""sd_notify and the engine-health watchdog, with the real daemon talking to a real AF_UNIX datagram socket.

The test plays systemd's side of the documented protocol (sd_notify(3)): it binds ``NOTIFY_SOCKET`` and sets
``WATCHDOG_USEC``, then reads what the daemon sends while the real engine-core process is stopped, resumed
and killed. tests/system/test_systemd_service.py repeats the cases under a real systemd.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

from edgephi.client import sampling
from edgephi.testing import Daemon, run_daemon

WATCHDOG_USEC = 2_000_000  # pings expected every 1 s


class NotifyListener:
    """Collects ``(monotonic time, {KEY: VALUE})`` for every datagram sent to the socket."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()

    def times(self, key: str, since: float = 0.0) -> list[float]:
        return [t for t, f in self.messages if key in f and t >= since]

    def wait_for(self, key: str, since: float = 0.0, timeout: float = 30.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.times(key, since)
            if found:
                return found[0]
            time.sleep(0.05)
        raise AssertionError(f"no {key} within {timeout} s; got {[f for _, f in self.messages][-5:]}")


@contextlib.contextmanager
def notified_daemon(artifact: Path, tmp_path: Path) -> Iterator[tuple[Daemon, NotifyListener]]:
    listener = NotifyListener(tmp_path / "notify.sock")
    old = {k: os.environ.get(k) for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    os.environ["NOTIFY_SOCKET"] = str(tmp_path / "notify.sock")
    os.environ["WATCHDOG_USEC"] = str(WATCHDOG_USEC)
    try:
        with run_daemon(artifact, tmp_path / "d", wait_ready=False) as d:
            for k, v in old.items():  # only the daemon gets them
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            yield d, listener
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        listener.close()


def engine_core(d: Daemon) -> psutil.Process:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for p in psutil.Process(d.proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline()):
                    return p
        time.sleep(0.2)
    raise AssertionError("no VLLM::EngineCore process under the daemon")


def test_ready_pings_wedge_and_death(artifact: Path, tmp_path: Path, record_property: Any) -> None:
    """Timings are recorded as test properties (seconds; the GPU acceptance run reports them)."""
    with notified_daemon(artifact, tmp_path) as (d, n), d.client() as c:
        ready_at = n.wait_for("READY", timeout=300)
        # READY only after the engine answered: health SERVING by then, and loading status/extend came first.
        assert c.health() == "SERVING"
        assert n.times("EXTEND_TIMEOUT_USEC") and min(n.times("EXTEND_TIMEOUT_USEC")) < ready_at
        assert any(f.get("STATUS", "").startswith("loading") for _, f in n.messages)
        # vLLM's engine-core and worker processes never see NOTIFY_SOCKET (NotifyAccess=main).
        children = psutil.Process(d.proc.pid).children(recursive=True)
        assert children
        for p in children:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
                assert "NOTIFY_SOCKET" not in p.environ(), p.name()
        # Pings every WATCHDOG_USEC/2 while healthy.
        time.sleep(3.5)
        pings = n.times("WATCHDOG", since=ready_at)
        assert len(pings) >= 2, n.messages[-5:]
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        record_property("ping_interval_max_s", round(max(gaps), 3) if gaps else None)
        assert any("serving" in f.get("STATUS", "") for _, f in n.messages)

        # Wedged engine: engine-core stopped with SIGSTOP → no more pings.
        core = engine_core(d)
        core.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        time.sleep(3 * WATCHDOG_USEC / 1e6)
        late = n.times("WATCHDOG", since=stopped_at + 0.2)
        assert late == [], f"pinged while the engine core was stopped: {late}"
        assert d.metrics()["edgephi_watchdog_misses_total"] >= 1
        # Readiness follows: NOT_SERVING, and new requests UNAVAILABLE, while no progress is made.
        assert c.health() == "NOT_SERVING"
        last_ping = max(n.times("WATCHDOG"), default=stopped_at)
        record_property("sigstop_to_last_ping_s", round(last_ping - stopped_at, 3))
        with pytest.raises(grpc.RpcError) as err:
            list(c.generate("hi", sampling(max_tokens=2), timeout=30))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "progress" in (err.value.details() or "")
        resumed_at = time.monotonic()
        core.send_signal(signal.SIGCONT)
        first = n.wait_for("WATCHDOG", since=resumed_at, timeout=10)  # alive again → pings resume
        record_property("sigcont_to_ping_s", round(first - resumed_at, 3))
        deadline = time.monotonic() + 10
        while c.health() != "SERVING":
            assert time.monotonic() < deadline, d.log()[-2000:]
            time.sleep(0.1)

        # Dead engine: SIGKILL the engine core mid-stream → stream UNAVAILABLE at once, daemon exits 1.
        stream = c.generate("Once upon a time", sampling(max_tokens=1900, ignore_eos=True))
        next(stream)
        killed_at = time.monotonic()
        engine_core(d).kill()
        with pytest.raises(grpc.RpcError) as err:
            list(stream)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        record_property("sigkill_to_unavailable_s", round(time.monotonic() - killed_at, 3))
        assert time.monotonic() - killed_at < 3 * WATCHDOG_USEC / 1e6 + 5
        assert d.proc.wait(60) == 1, d.log()[-3000:]
        record_property("sigkill_to_exit_s", round(time.monotonic() - killed_at, 3))
        # A real death still says why at ERROR (only a clean stop is quiet: test_lifecycle.py).
        dead = [line for line in d.log().splitlines() if "ERROR" in line and "engine dead (" in line]
        assert dead and ("exited" in dead[0] or "EngineCore" in dead[0]), d.log()[-3000:]
        assert not n.times("WATCHDOG", since=killed_at + WATCHDOG_USEC / 1e6)
