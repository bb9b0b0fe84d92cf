"""The gRPC door in-process over a :class:`~edgephi.engine.fake.FakeEngine`: the real servicer, interceptors,
health and reflection on a real grpc.aio server at 127.0.0.1 port 0, the real generation service and server
state — only the engine is fake (as uvicorn's tests run the real server in-process)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from edgephi.config import Settings
from edgephi.engine.fake import FakeEngine
from edgephi.grpc_door.server import build_server
from edgephi.service import GenerationService
from edgephi.state import ServerState
from edgephi.v1 import inference_pb2_grpc as pb_grpc
from edgephi.watchdog import Notifier


@dataclass
class InProcessDoor:
    state: ServerState
    service: GenerationService
    engine: FakeEngine
    port: int
    channel: grpc.aio.Channel
    stub: Any  # pb_grpc.InferenceServiceStub
    health: Any  # health_pb2_grpc.HealthStub

    def counter(self, method: str, code: str) -> float:
        """``edgephi_requests_total{method, code}`` from the state's metrics registry."""
        value = self.state.metrics.registry.get_sample_value("edgephi_requests_total", {"method": method, "code": code})
        return value or 0.0


@contextlib.asynccontextmanager
async def grpc_door(
    engine: FakeEngine | None = None,
    *,
    serving: bool = True,
    token: bytes | None = None,
    **settings: Any,
) -> AsyncIterator[InProcessDoor]:
    """Start the gRPC door on 127.0.0.1 port 0 over ``engine`` (a new :class:`FakeEngine` if None).

    ``serving=False`` leaves the state ``loading`` with no engine attached; ``settings`` override
    :class:`Settings` fields (small admission limits by default: 2 streams, 1 queued).
    """
    engine = engine or FakeEngine()
    values: dict[str, Any] = {
        "model": "/nonexistent/fake",
        "host": "127.0.0.1",
        "port": 0,
        "max_model_len": 512,
        "default_max_tokens": 64,
        "max_concurrent_streams": 2,
        "max_queued_requests": 1,
    }
    values.update(settings)
    st = ServerState(Settings(**values), Notifier(None, None))
    service = GenerationService(st)
    server, port = await build_server(service, None, token)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        if serving:
            st.attach(engine)
            await st.serving()
        yield InProcessDoor(
            st,
            service,
            engine,
            port,
            channel,
            pb_grpc.InferenceServiceStub(channel),
            health_pb2_grpc.HealthStub(channel),
        )
    finally:
        await channel.close(None)
        await server.stop(None)
        service.close()


async def wait_until(predicate: Callable[[], object], timeout_s: float = 5.0, interval_s: float = 0.005) -> bool:
    """Poll ``predicate`` (bounded: at most ``timeout_s`` seconds); return whether it became true."""
    for _ in range(int(timeout_s / interval_s)):
        if predicate():
            return True
        await asyncio.sleep(interval_s)
    return bool(predicate())
