"""The daemon's server state: lifecycle, readiness, the engine once loaded, admission and open streams.

Transport-neutral (no gRPC, no HTTP): front doors read readiness through :attr:`ServerState.ready` and
subscribe to its changes (:meth:`ServerState.on_readiness`); lifecycle changes only through the transition
methods below. Lifecycle (ready only in ``serving`` while the engine makes progress)::

    loading ──▶ serving ◀──▶ guarded (memory soft limit: new requests MemoryGuarded)
                   │
                   ├──▶ draining (SIGTERM / hard memory limit: new requests NotServing) ──▶ stopped
                   └──▶ dead (engine died: open streams end with StreamAborted at once, exit non-zero)

Readiness vs liveness: a stalled engine (the watchdog saw no progress) makes the server not ready — new work
goes elsewhere — while open streams go on; liveness stays systemd's call (its watchdog).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from edgephi.admission import Admission
from edgephi.config import Settings
from edgephi.engine.protocol import Engine
from edgephi.errors import MemoryGuarded, NotServing, RequestError
from edgephi.exit_codes import ExitCode
from edgephi.metrics import Metrics
from edgephi.validation import Limits
from edgephi.watchdog import Notifier

log = logging.getLogger(__name__)
#: KV-cache tokens kept back from admission for the watchdog's probe (one KV block of up to this many tokens).
PROBE_RESERVE_TOKENS = 256


class Lifecycle(enum.Enum):
    LOADING = "loading"
    SERVING = "serving"
    GUARDED = "guarded"
    DRAINING = "draining"
    DEAD = "dead"
    STOPPED = "stopped"


_TERMINAL = (Lifecycle.DEAD, Lifecycle.STOPPED)


class StreamEnd(enum.Enum):
    CLIENT = "client"  # cancelled by the client or its deadline
    DRAIN = "drain"
    ENGINE_DEAD = "engine_dead"


@dataclass
class OpenStream:
    """A generation stream in progress; ``task`` is the front door's handler task, cancelled to end it."""

    request_id: str
    task: asyncio.Task[object] | None
    started: float = field(default_factory=time.monotonic)
    end: StreamEnd = StreamEnd.CLIENT
    detail: str = ""

    def end_message(self) -> str:
        if self.end is StreamEnd.DRAIN:
            return f"server shutting down: stream aborted after the drain grace ({self.detail}); retry elsewhere"
        return f"engine died: {self.detail}; the service will restart"


ReadinessListener = Callable[[bool], Awaitable[None]]


class ServerState:
    """Owned by the daemon; the generation service, the front doors, the watchdog and the memory watch read it
    and change it through its methods. Not thread-safe: use from the event loop."""

    def __init__(self, settings: Settings, notifier: Notifier) -> None:
        self.settings = settings
        self.notifier = notifier
        self.metrics = Metrics()
        self.admission = Admission(settings.max_concurrent_streams, settings.max_queued_requests)
        self.engine: Engine | None = None
        self.limits = Limits(0, 0, 0, 0.0, 0, 0)
        self.lifecycle = Lifecycle.LOADING
        self.streams: dict[str, OpenStream] = {}
        self._no_streams = asyncio.Event()
        self._no_streams.set()
        self.tokens_generated = 0  # every token any stream received: the watchdog's progress counter
        self.guard_reason = ""
        self.stalled_reason = ""
        self.stop_requested = asyncio.Event()
        self.exit_code = 0
        self._listeners: list[ReadinessListener] = []
        self._published: bool | None = None
        self._pending: set[asyncio.Future[None]] = set()
        self.metrics.add_engine_gauges(self._gauges)

    # --- readiness -----------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Readiness: serving, and the engine making progress (health ``SERVING``, HTTP 200)."""
        return self.lifecycle is Lifecycle.SERVING and not self.stalled_reason

    @property
    def accepting(self) -> bool:
        """Whether new requests get past the lifecycle check (guarded ones are then refused by :meth:`refusal`)."""
        return self.engine is not None and self.lifecycle in (Lifecycle.SERVING, Lifecycle.GUARDED)

    async def on_readiness(self, listener: ReadinessListener) -> None:
        """Call ``listener(ready)`` now and on every change of :attr:`ready`."""
        self._listeners.append(listener)
        await listener(self.ready)

    def refusal(self) -> RequestError | None:
        """Why a new request must be refused now, or None: not serving (loading, draining, dead, stopped),
        engine not making progress, or the memory guard."""
        if not self.accepting:
            return NotServing(f"not serving: {self.lifecycle.value}; retry later")
        if self.stalled_reason:
            return NotServing(f"engine not making progress ({self.stalled_reason}); retry later")
        if self.lifecycle is Lifecycle.GUARDED:
            return MemoryGuarded(f"memory guard: {self.guard_reason}; retry later")
        return None

    # --- lifecycle transitions -----------------------------------------------------------------------------
    async def serving(self, status: str = "") -> None:
        """Loaded, or recovered from a memory guard: accept requests (no-op once draining, dead or stopped)."""
        if self.lifecycle not in (Lifecycle.LOADING, Lifecycle.SERVING, Lifecycle.GUARDED):
            return
        self.guard_reason = ""
        await self._enter(Lifecycle.SERVING, status)

    async def guarded(self, reason: str) -> None:
        """The memory guard's soft limit tripped: shed new requests (``MemoryGuarded``) until :meth:`serving`
        (no-op unless serving or guarded: loading, draining and the ends stay as they are)."""
        if self.lifecycle not in (Lifecycle.SERVING, Lifecycle.GUARDED):
            return
        self.guard_reason = reason
        await self._enter(Lifecycle.GUARDED)

    async def draining(self) -> None:
        """Stop accepting; open streams may finish (see :meth:`drain`)."""
        await self._enter(Lifecycle.DRAINING, "draining")

    def memory_exhausted(self, reason: str) -> None:
        """The memory guard's hard limit tripped: drain and exit 75 for a restart."""
        self.guard_reason = reason
        self.request_stop(ExitCode.MEMORY)

    def engine_dead(self, reason: str) -> int:
        """The engine died: refuse at once, end every open stream (``StreamAborted``), ask to stop with exit 1.
        Returns how many streams were ended. Synchronous so that nothing is admitted in between."""
        self.lifecycle = Lifecycle.DEAD
        ended = self.end_streams(StreamEnd.ENGINE_DEAD, reason)
        self._later(self._enter(Lifecycle.DEAD))
        self.request_stop(ExitCode.FAILED)
        return ended

    def stopped(self) -> None:
        self.lifecycle = Lifecycle.STOPPED

    async def set_stalled(self, reason: str) -> None:
        """The watchdog saw no progress (``reason``) or, with ``""``, progress again. While stalled the server
        is not ready and new requests get ``NotServing``; open streams go on."""
        if bool(reason) != bool(self.stalled_reason):
            log.warning("engine %s", f"not making progress: {reason}" if reason else "making progress again")
        self.stalled_reason = reason
        await self._publish()

    def request_stop(self, code: int = 0) -> None:
        """Ask the daemon to drain and exit with ``code`` (the first non-zero code asked for wins)."""
        self.exit_code = self.exit_code or code
        self.stop_requested.set()

    async def _enter(self, lifecycle: Lifecycle, status: str = "") -> None:
        if self.lifecycle in _TERMINAL and lifecycle not in _TERMINAL:
            return
        self.lifecycle = lifecycle
        log.info("state: %s%s", lifecycle.value, f" ({status})" if status else "")
        self.notifier.status(status or self.status_line())
        await self._publish()

    async def _publish(self) -> None:
        ready = self.ready
        if ready == self._published:
            return
        self._published = ready
        for listener in self._listeners:
            await listener(ready)

    def _later(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    # --- engine --------------------------------------------------------------------------------------------
    def attach(self, engine: Engine) -> None:
        """The engine is loaded: size admission's KV-token budget and the validation limits from it."""
        self.engine = engine
        if engine.info.kv_capacity_tokens > 0:
            # Keep room for the watchdog's probe (a few tokens, one KV block of up to PROBE_RESERVE_TOKENS).
            self.admission.token_capacity = max(1, engine.info.kv_capacity_tokens - PROBE_RESERVE_TOKENS)
        s = self.settings
        self.limits = Limits(
            max_context_tokens=engine.info.max_context_tokens,
            vocab_size=engine.info.vocab_size,
            default_max_tokens=s.default_max_tokens,
            default_temperature=s.default_temperature,
            max_stop_strings=s.max_stop_strings,
            max_stop_string_chars=s.max_stop_string_chars,
        )

    def detach(self) -> None:
        """The engine is shut down: forget it (nothing keeps vLLM's engine client alive past the daemon)."""
        self.engine = None

    def status_line(self) -> str:
        """One line for systemd's STATUS=: lifecycle, streams running and queued, the guard's reason."""
        return f"{self.lifecycle.value}: {self.admission.running} streams running, {self.admission.queued} queued" + (
            f"; guarded: {self.guard_reason}" if self.lifecycle is Lifecycle.GUARDED else ""
        )

    # --- streams -------------------------------------------------------------------------------------------
    def open_stream(self, request_id: str) -> OpenStream:
        """Register a stream run by the current task (the one :meth:`end_streams` cancels)."""
        stream = OpenStream(request_id, asyncio.current_task())
        self.streams[request_id] = stream
        self._no_streams.clear()
        return stream

    def close_stream(self, request_id: str) -> None:
        self.streams.pop(request_id, None)
        if not self.streams:
            self._no_streams.set()

    def end_streams(self, end: StreamEnd, detail: str) -> int:
        """Cancel every open stream's task; each aborts its engine request and ends with ``StreamAborted``."""
        n = 0
        for stream in list(self.streams.values()):
            if stream.task is not None and not stream.task.done():
                stream.end, stream.detail = end, detail
                stream.task.cancel()
                n += 1
        return n

    async def drain(self, grace_s: float) -> int:
        """Wait up to ``grace_s`` seconds for open streams to finish, then end the rest; returns how many were
        ended."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._no_streams.wait(), grace_s)
        ended = self.end_streams(StreamEnd.DRAIN, f"{grace_s:g} s")
        if ended:
            log.warning("drain: aborted %d stream(s) still running after %.1f s", ended, grace_s)
            with contextlib.suppress(TimeoutError):  # let the handlers send their status
                await asyncio.wait_for(self._no_streams.wait(), 5.0)
        return ended

    def _gauges(self) -> dict[str, float]:
        out = {
            "streams_running": float(self.admission.running),
            "streams_queued": float(self.admission.queued),
            "serving": 1.0 if self.lifecycle is Lifecycle.SERVING else 0.0,
            "tokens_in_flight": float(self.admission.tokens),
        }
        if self.engine is not None:
            out["engine_unfinished_requests"] = float(self.engine.stats().unfinished_requests)
            if self.engine.info.kv_capacity_tokens:
                out["kv_cache_capacity_tokens"] = float(self.engine.info.kv_capacity_tokens)
                out["kv_cache_reserved_ratio"] = self.admission.tokens / self.engine.info.kv_capacity_tokens
        return out
