"""Assembles and runs the daemon: grpc.aio server, health, reflection, metrics, engine, watchdog, drain.

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
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from edgephi import memory_watch, preflight
from edgephi.config import ConfigError, Settings
from edgephi.decode import DecodeGuardInterceptor
from edgephi.engine import Engine, EngineLoadError, GenerationRequest, Sampling, VllmEngine
from edgephi.exit_codes import ExitCode
from edgephi.runtime import Runtime, State, StreamEnd
from edgephi.security import BearerTokenInterceptor, read_token, server_credentials
from edgephi.servicer import InferenceServicer
from edgephi.v1 import inference_pb2, inference_pb2_grpc
from edgephi.watchdog import Liveness, Notifier, Probe, run_watchdog

log = logging.getLogger(__name__)

# How much start-up time to ask systemd for at a time while the engine loads (EXTEND_TIMEOUT_USEC).
LOAD_EXTEND_S = 60.0
# Watchdog tick when systemd did not ask for one (health still follows the liveness verdict).
DEFAULT_TICK_S = 5.0
EXIT_ENGINE_DEAD = ExitCode.FAILED
EXIT_MEMORY = ExitCode.MEMORY


async def build_server(
    rt: Runtime, creds: grpc.ServerCredentials | None, token: bytes | None
) -> tuple[grpc.aio.Server, int]:
    """Create the grpc.aio server with our service, health and reflection; bind; return it and its port.

    Raises:
        ConfigError: the address cannot be bound (port in use, address not on this host).
    """
    # Auth first: an unauthenticated caller learns nothing, not even whether its bytes parse.
    interceptors: list[Any] = [BearerTokenInterceptor(token)] if token else []
    interceptors.append(DecodeGuardInterceptor())
    server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(rt), server)
    health_pb2_grpc.add_HealthServicer_to_server(rt.health, server)
    names = (
        inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    address = f"{rt.settings.host}:{rt.settings.port}"
    try:
        port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc raises RuntimeError("Failed to bind to address ...")
        port = 0
        detail = str(exc)
    else:
        detail = ""
    if port == 0:
        raise ConfigError(
            f"cannot listen on {address}: the port is in use or the address is not on this host ({detail}); "
            "stop the other process or set EDGEPHI_PORT / EDGEPHI_HOST"
        )
    return server, port


async def serve(settings: Settings, notifier: Notifier | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT or engine death; return the process exit code."""
    notifier = notifier or Notifier.from_env()
    # Configuration checks, all before anything starts (ConfigError → exit 78): security, then memory.
    creds = server_credentials(settings)
    token = read_token(settings.auth_token_file) if settings.auth_token_file else None
    fit = preflight.preflight(settings)  # ConfigError → exit 78 (no restart loop)
    for change in fit.changes:
        log.warning("memory preflight: fitted to EDGEPHI_VRAM_BUDGET_GIB: %s", change)
    settings = fit.settings
    rt = Runtime(settings, notifier)
    await rt.set_state(State.LOADING, "loading: starting")
    server, port = await build_server(rt, creds, token)
    await server.start()
    log.info("gRPC listening on %s:%d", settings.host, port)
    metrics_port = None
    if settings.metrics_port is not None:
        from prometheus_client import start_http_server

        try:
            httpd, _ = start_http_server(settings.metrics_port, settings.metrics_host, registry=rt.metrics.registry)
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
        loop.add_signal_handler(sig, rt.request_stop)

    try:
        return await _run(rt, settings, notifier)
    except EngineLoadError as exc:
        if rt.stop_requested.is_set() and rt.state is State.LOADING:
            log.info("stopped while loading; the engine's start was abandoned")
            return rt.exit_code
        log.error("%s", exc)
        notifier.status(str(exc)[:200])
        rt.exit_code = exc.exit_code
        return exc.exit_code
    finally:
        await server.stop(grace=1.0)
        rt.state = State.STOPPED
        log.info("stopped (exit %d)", rt.exit_code)


async def _run(rt: Runtime, settings: Settings, notifier: Notifier) -> int:
    extender = asyncio.create_task(_extend_while_loading(rt, notifier))
    abandon = asyncio.create_task(_abandon_load_on_stop(rt))
    started = time.monotonic()
    try:
        async with VllmEngine.start(settings) as engine:
            extender.cancel()
            abandon.cancel()
            rt.attach(engine)
            await _warm_up(engine)
            load_s = time.monotonic() - started
            if rt.stop_requested.is_set():
                return rt.exit_code
            await rt.set_state(State.SERVING)
            notifier.ready(f"serving {engine.info.model_name} (loaded in {load_s:.1f} s)")
            log.info("ready in %.1f s: %s", load_s, engine.info)
            tasks = [asyncio.create_task(_watch(rt, engine, notifier))]
            watch = memory_watch.watch_from_settings(settings)
            if watch is not None:
                tasks.append(asyncio.create_task(_guard_memory(rt, watch)))
            await rt.stop_requested.wait()
            for task in tasks:
                task.cancel()
            if rt.state is not State.DEAD:
                notifier.stopping("draining")
                await rt.set_state(State.DRAINING, "draining")
                await rt.drain(settings.drain_grace_s)
            notifier.status("stopping engine")
    finally:
        extender.cancel()
        abandon.cancel()
    return rt.exit_code


async def _abandon_load_on_stop(rt: Runtime) -> None:
    """SIGTERM while loading: nothing is served yet, so instead of waiting out a load of minutes, stop the
    engine's processes; the load then fails at once and the daemon exits 0 (systemd's stop stays quick)."""
    await rt.stop_requested.wait()
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


async def _extend_while_loading(rt: Runtime, notifier: Notifier) -> None:
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


async def _watch(rt: Runtime, engine: Engine, notifier: Notifier) -> None:
    tick = notifier.watchdog_usec / 2e6 if notifier.watchdog_usec else DEFAULT_TICK_S
    probe_timeout = max(1.0, (notifier.watchdog_usec / 1e6) if notifier.watchdog_usec else 2 * DEFAULT_TICK_S)
    liveness = Liveness(
        Probe(
            check_health=engine.check_health,
            core_pids=engine.core_pids,
            tokens_generated=lambda: rt.tokens_generated,
            probe_generation=lambda: _one_token(engine),
        ),
        probe_timeout_s=probe_timeout,
    )

    def on_dead(reason: str) -> None:
        rt.state = State.DEAD
        ended = rt.end_streams(StreamEnd.ENGINE_DEAD, reason)
        log.error("engine dead (%s): ended %d open stream(s); exiting %d", reason, ended, EXIT_ENGINE_DEAD)
        # STOPPING=1: we are exiting (1, for a restart); without it systemd's watchdog, no longer pinged,
        # can SIGABRT us during the engine shutdown and record Result=watchdog instead of exit-code.
        notifier.stopping(f"engine dead: {reason}")
        asyncio.get_running_loop().create_task(rt.set_state(State.DEAD))
        rt.request_stop(EXIT_ENGINE_DEAD)

    pending: set[asyncio.Task[None]] = set()

    def later(coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        pending.add(task)
        task.add_done_callback(pending.discard)

    def on_miss(reason: str) -> None:
        rt.metrics.watchdog_misses.inc()
        notifier.status(f"engine not making progress: {reason}")
        later(rt.set_stalled(reason))  # readiness: NOT_SERVING until progress resumes

    def on_alive() -> None:
        if rt.stalled_reason:
            later(rt.set_stalled(""))

    await run_watchdog(liveness, notifier, tick, on_dead, on_miss, rt.status_line, on_alive)


async def _guard_memory(rt: Runtime, watch: memory_watch.MemoryWatch) -> None:
    """Soft limit: NOT_SERVING and RESOURCE_EXHAUSTED for new requests; hard limit: drain and exit 75."""

    async def on_change(level: str, reason: str) -> None:
        if level == memory_watch.Level.OK:
            log.warning("memory guard: recovered")
            rt.guard_reason = ""
            await rt.set_state(State.SERVING)
            return
        rt.metrics.guard_trips.labels(level).inc()
        if level == memory_watch.Level.SOFT:
            log.warning("memory guard: soft limit: %s; shedding new requests", reason)
            rt.guard_reason = reason
            await rt.set_state(State.GUARDED)
        else:
            log.error("memory guard: hard limit: %s; draining and exiting %d for a restart", reason, EXIT_MEMORY)
            rt.guard_reason = reason
            rt.request_stop(EXIT_MEMORY)

    pid = os.getpid()
    await memory_watch.run_memory_watch(
        watch, lambda: memory_watch.read_memory(pid), rt.settings.memory_check_interval_s, on_change
    )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
