"""systemd readiness and liveness: sd_notify messages and the loop that decides whether to ping.

Why our own sd_notify: the protocol is a single ``AF_UNIX`` datagram of ``KEY=VALUE`` lines sent to
``$NOTIFY_SOCKET`` (sd_notify(3), "stable interface"); the PyPI ``sdnotify`` package has not been released
since 2017 and ``systemd-python`` needs libsystemd headers to build. The few lines below also let us take the
socket out of the environment at start-up, so vLLM's child processes can never inherit it
(``NotifyAccess=main``).

Liveness (``WATCHDOG=1``) is sent only when the engine is alive *and making progress*:
  1. vLLM has not flagged itself errored and every engine-core process exists (else: dead);
  2. no engine-core process is stopped (SIGSTOP, ``T`` state) (else: wedged);
  3. progress: a token was produced since the last tick while streams are running, or — when idle — a
     one-token probe generation completes within ``probe_timeout_s`` (else: wedged).
A wedged engine makes us stop pinging, so systemd kills and restarts the service after ``WatchdogSec``.
A dead engine is reported to the caller at once (streams end with UNAVAILABLE, the daemon exits non-zero).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import psutil

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify datagrams to the socket systemd gave us; a no-op when not run by systemd."""

    def __init__(self, address: str | None, watchdog_usec: int | None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        if address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_env(cls) -> Notifier:
        """Take ``NOTIFY_SOCKET`` and ``WATCHDOG_USEC`` out of the environment (children must not see them).

        ``WATCHDOG_USEC`` is honoured only when ``WATCHDOG_PID`` is unset or names this process (sd_notify(3)).
        """
        address = os.environ.pop("NOTIFY_SOCKET", None)
        usec = os.environ.pop("WATCHDOG_USEC", None)
        pid = os.environ.pop("WATCHDOG_PID", None)
        watchdog = int(usec) if usec and (pid is None or int(pid) == os.getpid()) else None
        return cls(address, watchdog)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def close(self) -> None:
        """Close the socket; later calls are no-ops."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def send(self, **fields: str | int) -> None:
        """Send ``KEY=VALUE`` lines (``ready=1`` → ``READY=1``). Errors are logged, never raised."""
        if self._sock is None or self.address is None:
            return
        payload = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        addr = self.address
        if addr.startswith("@"):
            addr = "\0" + addr[1:]  # abstract namespace socket
        try:
            self._sock.sendto(payload, addr)
        except OSError as exc:
            log.warning("sd_notify failed: %s", exc)

    def ready(self, status: str) -> None:
        self.send(ready=1, status=status)

    def status(self, status: str) -> None:
        self.send(status=status)

    def extend_timeout(self, seconds: float) -> None:
        self.send(extend_timeout_usec=int(seconds * 1_000_000))

    def stopping(self, status: str) -> None:
        self.send(stopping=1, status=status)

    def ping(self) -> None:
        self.send(watchdog=1)


class Verdict(enum.Enum):
    ALIVE = "alive"
    WEDGED = "wedged"
    DEAD = "dead"


@dataclass
class Probe:
    """The engine facts the liveness check reads; functions so tests can drive real processes."""

    check_health: Callable[[], Awaitable[None]]  # raises if the engine errored or its core process died
    core_pids: Callable[[], list[int]]
    tokens_generated: Callable[[], int]  # monotonically increasing count of streamed tokens
    probe_generation: Callable[[], Awaitable[None]]  # one-token generation, bypassing admission


class Liveness:
    """Decides, once per tick, whether the engine is alive, wedged or dead (see module docstring)."""

    def __init__(self, probe: Probe, probe_timeout_s: float) -> None:
        self.probe = probe
        self.probe_timeout_s = probe_timeout_s
        self._last_tokens = probe.tokens_generated()
        self.reason = ""

    async def check(self) -> Verdict:
        """This tick's verdict. ALIVE only if the engine is healthy *now*: health is read again last, so tokens
        counted before a core died (or a probe answered just before) never vouch for a dead engine."""
        if await self._dead():
            return Verdict.DEAD
        for pid in self.probe.core_pids():
            with contextlib.suppress(psutil.NoSuchProcess):
                if psutil.Process(pid).status() == psutil.STATUS_STOPPED:
                    self.reason = f"engine-core process {pid} is stopped"
                    return Verdict.WEDGED
        tokens = self.probe.tokens_generated()
        progressed = tokens != self._last_tokens
        self._last_tokens = tokens
        if not progressed:
            # No token since the last tick (idle, or a long prefill): a bounded one-token probe decides.
            try:
                await asyncio.wait_for(self.probe.probe_generation(), self.probe_timeout_s)
            except TimeoutError:
                self.reason = f"probe generation took longer than {self.probe_timeout_s:g} s"
                return Verdict.WEDGED
            except Exception as exc:
                if await self._dead(cause=exc):
                    return Verdict.DEAD
                self.reason = f"probe generation failed: {exc}"
                return Verdict.WEDGED
        if await self._dead():
            return Verdict.DEAD
        return Verdict.ALIVE

    async def _dead(self, cause: Exception | None = None) -> bool:
        try:
            await self.probe.check_health()
        except Exception as exc:
            self.reason = f"engine dead: {cause or exc}"
            return True
        return False


async def run_watchdog(
    liveness: Liveness,
    notifier: Notifier,
    interval_s: float,
    on_dead: Callable[[str], None],
    on_miss: Callable[[str], None],
    status: Callable[[], str] | None = None,
    on_alive: Callable[[], None] | None = None,
) -> None:
    """Ping systemd every ``interval_s`` while the engine is alive; call ``on_dead`` once and return if it dies.

    ``interval_s`` is half of ``WATCHDOG_USEC`` under systemd (sd_watchdog_enabled(3) recommends pinging
    at half the timeout). A liveness check that raises counts as a miss (no ping, ``on_miss``), so systemd's
    watchdog still restarts a daemon whose check keeps failing.
    """
    while True:
        started = time.monotonic()
        try:
            verdict = await liveness.check()
        except Exception as exc:  # a bug in a check must not end the watchdog silently: no ping, say why
            log.exception("watchdog: liveness check failed")
            liveness.reason = f"liveness check failed: {type(exc).__name__}: {exc}"
            verdict = Verdict.WEDGED
        if verdict is Verdict.ALIVE:
            if on_alive is not None:
                on_alive()
            if status is not None:
                notifier.send(watchdog=1, status=status())
            else:
                notifier.ping()
        elif verdict is Verdict.DEAD:
            log.error("watchdog: %s", liveness.reason)
            on_dead(liveness.reason)
            return
        else:
            log.error("watchdog: not pinging systemd: %s", liveness.reason)
            on_miss(liveness.reason)
        await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - started)))
