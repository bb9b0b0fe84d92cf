"""The daemon's wiring (``edgephi serve``): server state, generation service, gRPC door, metrics, engine,
watchdog, memory watch, drain. Transport details belong to the front doors (:mod:`edgephi.grpc_door`).

Start-up order: listen first (health ``NOT_SERVING``, requests ``UNAVAILABLE``), load the engine while telling
systemd ``EXTEND_TIMEOUT_USEC``, answer a warm-up generation, then ``READY=1`` and health ``SERVING``.
SIGTERM: ``STOPPING=1``, health ``NOT_SERVING``, refuse new requests, let open streams finish up to
``drain_grace_s``, end the rest with ``UNAVAILABLE``, shut the engine down, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
import uuid
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import psutil

from edgephi import memory_watch, preflight
from edgephi.config import ConfigError, Settings
from edgephi.engine.protocol import Engine
from edgephi.engine.types import EngineLoadError, GenerationRequest, Sampling
from edgephi.exit_codes import ExitCode
from edgephi.grpc_door.server import build_server
from edgephi.security import read_token, tls_material
from edgephi.service import GenerationService
from edgephi.state import Lifecycle, ServerState
from edgephi.watchdog import Liveness, Notifier, Probe, run_watchdog

log = logging.getLogger(__name__)

# How much start-up time to ask systemd for at a time while the engine loads (EXTEND_TIMEOUT_USEC).
LOAD_EXTEND_S = 60.0
# Watchdog tick when systemd did not ask for one (health still follows the liveness verdict).
DEFAULT_TICK_S = 5.0


EngineStarter = Callable[[Settings], AbstractAsyncContextManager[Engine]]


def _vllm_engine(settings: Settings) -> AbstractAsyncContextManager[Engine]:
    from edgephi.engine.vllm import VllmEngine

    return VllmEngine.start(settings)


async def serve(
    settings: Settings, notifier: Notifier | None = None, start_engine: EngineStarter = _vllm_engine
) -> int:
    """Run the daemon until SIGTERM/SIGINT or engine death; return the process exit code (:class:`ExitCode`).

    ``start_engine`` loads the engine as an async context manager (vLLM by default; tests pass a fake).

    Raises:
        ConfigError: a setting, file, port or preflight check is wrong (the CLI exits 78).
    """
    own_notifier = notifier is None
    notifier = notifier or Notifier.from_env()
    # Configuration checks, all before anything starts (ConfigError → exit 78): security, then memory.
    tls = tls_material(settings)
    token = read_token(settings.auth_token_file) if settings.auth_token_file else None
    fit = preflight.preflight(settings)  # ConfigError → exit 78 (no restart loop)
    for change in fit.changes:
        log.warning("memory preflight: fitted to EDGEPHI_VRAM_BUDGET_GIB: %s", change)
    settings = fit.settings
    st = ServerState(settings, notifier)
    service = GenerationService(st)
    notifier.status("loading: starting")
    server, port = await build_server(service, tls, token)
    await server.start()
    log.info("gRPC listening on %s:%d", settings.host, port)
    metrics_port = None
    if settings.metrics_port is not None:
        from prometheus_client import start_http_server

        try:
            httpd, _ = start_http_server(settings.metrics_port, settings.metrics_host, registry=st.metrics.registry)
        except OSError as exc:
            await server.stop(None)
            raise ConfigError(
                f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port}: {exc.strerror or exc}; "
                "stop the other process or set EDGEPHI_METRICS_PORT / EDGEPHI_METRICS_HOST"
            ) from None
        metrics_port = httpd.server_port
        log.info("metrics on http://%s:%d/metrics", settings.metrics_host, metrics_port)
    if settings.port_file is not None:
        _write_atomic(settings.port_file, json.dumps({"grpc": port, "metrics": metrics_port}) + "\n")

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, st.request_stop)

    try:
        return await _run(st, settings, notifier, start_engine)
    except EngineLoadError as exc:
        if st.stop_requested.is_set() and st.lifecycle is Lifecycle.LOADING:
            log.info("stopped while loading; the engine's start was abandoned")
            return st.exit_code
        log.error("%s", exc)
        notifier.status(str(exc)[:200])
        st.exit_code = exc.exit_code
        return exc.exit_code
    finally:
        await server.stop(grace=1.0)
        service.close()
        st.stopped()
        log.info("stopped (exit %d)", st.exit_code)
        if own_notifier:
            notifier.close()


async def _run(st: ServerState, settings: Settings, notifier: Notifier, start_engine: EngineStarter) -> int:
    extender = asyncio.create_task(_extend_while_loading(notifier))
    abandon = asyncio.create_task(_abandon_load_on_stop(st))
    started = time.monotonic()
    try:
        async with start_engine(settings) as engine:
            extender.cancel()
            abandon.cancel()
            st.attach(engine)
            await _warm_up(engine)
            load_s = time.monotonic() - started
            if st.stop_requested.is_set():
                return st.exit_code
            await st.serving()
            notifier.ready(f"serving {engine.info.model_name} (loaded in {load_s:.1f} s)")
            log.info("ready in %.1f s: %s", load_s, engine.info)
            tasks = [asyncio.create_task(_watch(st, engine, notifier))]
            watch = memory_watch.watch_from_settings(settings)
            if watch is not None:
                tasks.append(asyncio.create_task(_guard_memory(st, watch)))
            await st.stop_requested.wait()
            for task in tasks:
                task.cancel()
            if st.lifecycle is not Lifecycle.DEAD:
                notifier.stopping("draining")
                await st.draining()
                await st.drain(settings.drain_grace_s)
            notifier.status("stopping engine")
    finally:
        st.detach()
        extender.cancel()
        abandon.cancel()
    return st.exit_code


async def _abandon_load_on_stop(st: ServerState) -> None:
    """SIGTERM while loading: nothing is served yet, so instead of waiting out a load of minutes, stop the
    engine's processes; the load then fails at once and the daemon exits 0 (systemd's stop stays quick)."""
    await st.stop_requested.wait()
    log.warning("stop requested while loading: stopping the engine's processes")
    while True:  # until the load fails (this task is cancelled then); processes may still be starting
        children = psutil.Process().children(recursive=True)
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.terminate()
        # Short: multiprocessing's resource tracker ignores SIGTERM, and asyncio.run waits for this thread.
        _, alive = await asyncio.to_thread(psutil.wait_procs, children, 2.0)
        for child in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        await asyncio.sleep(0.5)


async def _extend_while_loading(notifier: Notifier) -> None:
    t0 = time.monotonic()
    while True:
        notifier.extend_timeout(LOAD_EXTEND_S)
        notifier.status(f"loading model ({time.monotonic() - t0:.0f} s)")
        await asyncio.sleep(LOAD_EXTEND_S / 3)


def _probe_request(engine: Engine) -> GenerationRequest:
    ids = engine.tokenizer.encode("ping") or [0]
    return GenerationRequest(tuple(ids), Sampling(max_tokens=1, temperature=0.0, ignore_eos=True))


async def _one_token(engine: Engine) -> None:
    async for _ in engine.generate(_probe_request(engine), f"probe-{uuid.uuid4().hex}"):
        pass


async def _warm_up(engine: Engine) -> None:
    """One generation through the whole path before READY: readiness means "answered a request"."""
    await _one_token(engine)


async def _watch(st: ServerState, engine: Engine, notifier: Notifier) -> None:
    tick = notifier.watchdog_usec / 2e6 if notifier.watchdog_usec else DEFAULT_TICK_S
    probe_timeout = max(1.0, (notifier.watchdog_usec / 1e6) if notifier.watchdog_usec else 2 * DEFAULT_TICK_S)
    liveness = Liveness(
        Probe(
            check_health=engine.check_health,
            core_pids=engine.core_pids,
            tokens_generated=lambda: st.tokens_generated,
            probe_generation=lambda: _one_token(engine),
        ),
        probe_timeout_s=probe_timeout,
    )

    def on_dead(reason: str) -> None:
        ended = st.engine_dead(reason)
        log.error("engine dead (%s): ended %d open stream(s); exiting %d", reason, ended, ExitCode.FAILED)
        # STOPPING=1: we are exiting (1, for a restart); without it systemd's watchdog, no longer pinged,
        # can SIGABRT us during the engine shutdown and record Result=watchdog instead of exit-code.
        notifier.stopping(f"engine dead: {reason}")

    pending: set[asyncio.Task[None]] = set()

    def later(coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        pending.add(task)
        task.add_done_callback(pending.discard)

    def on_miss(reason: str) -> None:
        st.metrics.watchdog_misses.inc()
        notifier.status(f"engine not making progress: {reason}")
        later(st.set_stalled(reason))  # readiness: NOT_SERVING until progress resumes

    def on_alive() -> None:
        if st.stalled_reason:
            later(st.set_stalled(""))

    await run_watchdog(liveness, notifier, tick, on_dead, on_miss, st.status_line, on_alive)


async def _guard_memory(st: ServerState, watch: memory_watch.MemoryWatch) -> None:
    """Soft limit: not ready and ``MemoryGuarded`` for new requests; hard limit: drain and exit 75."""

    async def on_change(level: str, reason: str) -> None:
        if level == memory_watch.Level.OK:
            log.warning("memory guard: recovered")
            await st.serving()
            return
        st.metrics.guard_trips.labels(level).inc()
        if level == memory_watch.Level.SOFT:
            log.warning("memory guard: soft limit: %s; shedding new requests", reason)
            await st.guarded(reason)
        else:
            log.error("memory guard: hard limit: %s; draining and exiting %d for a restart", reason, ExitCode.MEMORY)
            st.memory_exhausted(reason)

    pid = os.getpid()
    await memory_watch.run_memory_watch(
        watch, lambda: memory_watch.read_memory(pid), st.settings.memory_check_interval_s, on_change
    )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
