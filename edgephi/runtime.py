"""The daemon's shared state: lifecycle, engine, admission, open streams, health and metrics.

Lifecycle (health ``SERVING`` only in ``serving``)::

    loading ──▶ serving ◀──▶ guarded (memory soft limit: new requests RESOURCE_EXHAUSTED)
                   │
                   ├──▶ draining (SIGTERM / hard memory limit: new requests UNAVAILABLE) ──▶ stopped
                   └──▶ dead (engine died: open streams UNAVAILABLE at once, exit non-zero)
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from edgephi.admission import Admission
from edgephi.config import Settings
from edgephi.convert import Limits
from edgephi.engine import Engine
from edgephi.metrics import Metrics
from edgephi.watchdog import Notifier

log = logging.getLogger(__name__)
SERVICE_NAME = "edgephi.v1.InferenceService"
PROBE_RESERVE_TOKENS = 256


class State(enum.Enum):
    LOADING = "loading"
    SERVING = "serving"
    GUARDED = "guarded"
    DRAINING = "draining"
    DEAD = "dead"
    STOPPED = "stopped"


class StreamEnd(enum.Enum):
    CLIENT = "client"  # cancelled by the client or its deadline
    DRAIN = "drain"
    ENGINE_DEAD = "engine_dead"


@dataclass
class OpenStream:
    request_id: str
    task: asyncio.Task[object] | None
    started: float = field(default_factory=time.monotonic)
    end: StreamEnd = StreamEnd.CLIENT
    detail: str = ""

    def end_message(self) -> str:
        if self.end is StreamEnd.DRAIN:
            return f"server shutting down: stream aborted after the drain grace ({self.detail}); retry elsewhere"
        return f"engine died: {self.detail}; the service will restart"


class Runtime:
    """Owned by the server; the servicer, the watchdog and the guards read and change it."""

    def __init__(self, settings: Settings, notifier: Notifier) -> None:
        self.settings = settings
        self.notifier = notifier
        self.health = HealthServicer()
        self.metrics = Metrics()
        self.admission = Admission(settings.max_concurrent_streams, settings.max_queued_requests)
        self.engine: Engine | None = None
        self.limits: Limits = Limits(0, 0, 0, 0.0, 0, 0)
        self.state = State.LOADING
        self.streams: dict[str, OpenStream] = {}
        self._no_streams = asyncio.Event()
        self._no_streams.set()
        self.tokens_generated = 0
        self.guard_reason = ""
        self.stalled_reason = ""
        self.stop_requested = asyncio.Event()
        self.exit_code = 0
        self.metrics.add_engine_gauges(self._gauges)

    # --- lifecycle ---------------------------------------------------------------------------------------
    @property
    def accepting(self) -> bool:
        return self.state in (State.SERVING, State.GUARDED)

    async def set_state(self, state: State, status: str = "") -> None:
        if self.state in (State.DEAD, State.STOPPED) and state not in (State.DEAD, State.STOPPED):
            return
        self.state = state
        await self._publish_health()
        log.info("state: %s%s", state.value, f" ({status})" if status else "")
        self.notifier.status(status or self.status_line())

    async def set_stalled(self, reason: str) -> None:
        """The watchdog saw no progress (``reason``) or, with ``""``, progress again. While stalled, health
        is ``NOT_SERVING`` (readiness: send new work elsewhere) and new requests get ``UNAVAILABLE``; open
        streams go on, and systemd's watchdog decides about liveness."""
        if bool(reason) == bool(self.stalled_reason):
            self.stalled_reason = reason
            return
        self.stalled_reason = reason
        log.warning("engine %s", f"not making progress: {reason}" if reason else "making progress again")
        await self._publish_health()

    async def _publish_health(self) -> None:
        serving = self.state is State.SERVING and not self.stalled_reason
        code = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, code)

    def attach(self, engine: Engine) -> None:
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

    def status_line(self) -> str:
        return f"{self.state.value}: {self.admission.running} streams running, {self.admission.queued} queued" + (
            f"; guarded: {self.guard_reason}" if self.state is State.GUARDED else ""
        )

    def refusal(self) -> tuple[grpc.StatusCode, str] | None:
        """Why a new request must be refused now (memory guard, stalled engine), or None."""
        if self.stalled_reason:
            return grpc.StatusCode.UNAVAILABLE, f"engine not making progress ({self.stalled_reason}); retry later"
        if self.state is State.GUARDED:
            return grpc.StatusCode.RESOURCE_EXHAUSTED, f"memory guard: {self.guard_reason}; retry later"
        return None

    def request_stop(self, code: int = 0) -> None:
        self.exit_code = self.exit_code or code
        self.stop_requested.set()

    # --- streams -----------------------------------------------------------------------------------------
    def open_stream(self, request_id: str) -> OpenStream:
        stream = OpenStream(request_id, asyncio.current_task())
        self.streams[request_id] = stream
        self._no_streams.clear()
        return stream

    def close_stream(self, request_id: str) -> None:
        self.streams.pop(request_id, None)
        if not self.streams:
            self._no_streams.set()

    def end_streams(self, end: StreamEnd, detail: str) -> int:
        """Cancel every open stream's handler; each then aborts its engine request and ends with UNAVAILABLE."""
        n = 0
        for stream in list(self.streams.values()):
            if stream.task is not None and not stream.task.done():
                stream.end, stream.detail = end, detail
                stream.task.cancel()
                n += 1
        return n

    async def drain(self, grace_s: float) -> int:
        """Wait up to ``grace_s`` for open streams to finish, then end the rest; returns how many were ended."""
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
            "serving": 1.0 if self.state is State.SERVING else 0.0,
            "tokens_in_flight": float(self.admission.tokens),
        }
        if self.engine is not None:
            out["engine_unfinished_requests"] = float(self.engine.stats().unfinished_requests)
            if self.engine.info.kv_capacity_tokens:
                out["kv_cache_capacity_tokens"] = float(self.engine.info.kv_capacity_tokens)
                out["kv_cache_reserved_ratio"] = self.admission.tokens / self.engine.info.kv_capacity_tokens
        return out
