"""The keepalive policy in-process, with real grpcio clients that ping on a timer, time scaled down: clients
ping every second (grpc's floor for a client's pings without data), the server allowing 0.5 s, so that what
a 10 s client does over a minute happens here in seconds. tests/integration/test_keepalive.py runs it at full
scale on the real daemon."""

from __future__ import annotations

import asyncio

import grpc

from edgephi.config import Settings
from edgephi.engine.fake import FakeEngine
from edgephi.grpc_door.server import channel_options
from edgephi.v1 import inference_pb2 as pb
from edgephi.v1 import inference_pb2_grpc as pb_grpc
from tests.unit.harness import grpc_door, wait_until

PING_EVERY_S = 1.0
# grpc forgives the first ping after data and 2 strikes, and sends GOAWAY at the next: 4 pings without data
# from the server show a too_many_pings; a phase of the test lasts PHASE_S, so two phases see 4 or more.
PHASE_S = 2.3


def pinging_channel(port: int) -> grpc.aio.Channel:
    """A client that pings every PING_EVERY_S, with or without calls, without limit (a common NAT-keepalive
    configuration, scaled down from 10 s)."""
    return grpc.aio.insecure_channel(
        f"127.0.0.1:{port}",
        options=[
            ("grpc.keepalive_time_ms", int(PING_EVERY_S * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ],
    )


class StateLog:
    """Every connectivity state a channel goes through (a GOAWAY takes a READY channel to IDLE)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.states = [channel.get_state()]
        self._task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while True:
            await self.channel.wait_for_state_change(self.states[-1])
            self.states.append(self.channel.get_state())

    def close(self) -> list[grpc.ChannelConnectivity]:
        self._task.cancel()
        return self.states


def test_settings_become_grpc_channel_arguments() -> None:
    opts = dict(channel_options(Settings(model="m")))
    assert opts == {
        "grpc.so_reuseport": 0,
        "grpc.keepalive_time_ms": 30_000,
        "grpc.keepalive_timeout_ms": 10_000,
        "grpc.keepalive_permit_without_calls": 1,
        "grpc.http2.min_ping_interval_without_data_ms": 5_000,
        "grpc.http2.max_pings_without_data": 0,
    }
    scaled = dict(channel_options(Settings(model="m", keepalive_time_s=0.5, min_client_ping_interval_s=0)))
    assert scaled["grpc.keepalive_time_ms"] == 500 and scaled["grpc.http2.min_ping_interval_without_data_ms"] == 0


async def test_a_client_pinging_on_a_timer_keeps_its_connection_idle_and_mid_call() -> None:
    """Four pings or more with no data from the server in between, first on an idle connection, then with a
    call in flight that sends nothing yet: the connection stays READY and the call completes. Beside it, the
    control: the same client under grpc's server default (300 s between pings) is sent GOAWAY
    too_many_pings, so a dropped connection would show."""
    hold = asyncio.Event()
    async with (
        grpc_door(FakeEngine(reply="ok", hold=hold), min_client_ping_interval_s=PING_EVERY_S / 2) as door,
        grpc_door(min_client_ping_interval_s=300) as strict,
    ):

        async def ours() -> list[grpc.ChannelConnectivity]:
            channel = pinging_channel(door.port)
            stub = pb_grpc.InferenceServiceStub(channel)
            assert (await stub.CountTokens(pb.CountTokensRequest(text="hi"))).token_count == 2
            log = StateLog(channel)
            await asyncio.sleep(PHASE_S)  # idle: no call in flight
            call = stub.Generate(pb.GenerateRequest(text="hi"))
            assert await wait_until(lambda: door.engine.running)
            await asyncio.sleep(PHASE_S)  # a call in flight whose engine request waits: nothing sent yet
            hold.set()
            assert "".join([m.text async for m in call]) == "ok"
            assert (await stub.CountTokens(pb.CountTokensRequest(text="hi"))).token_count == 2
            states = log.close()
            await channel.close(None)
            return states

        async def grpc_default() -> list[grpc.ChannelConnectivity]:
            channel = pinging_channel(strict.port)
            await pb_grpc.InferenceServiceStub(channel).CountTokens(pb.CountTokensRequest(text="hi"))
            log = StateLog(channel)
            await wait_until(lambda: len(log.states) > 1, timeout_s=2 * PHASE_S + 1)
            states = log.close()
            await channel.close(None)
            return states

        kept, control = await asyncio.gather(ours(), grpc_default())
    assert kept == [grpc.ChannelConnectivity.READY], "the connection was dropped (GOAWAY too_many_pings?)"
    assert control[0] is grpc.ChannelConnectivity.READY and grpc.ChannelConnectivity.IDLE in control[1:], control
