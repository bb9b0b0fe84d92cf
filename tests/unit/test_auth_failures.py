"""Failed authentications are visible and unambiguous: counted in ``edgephi_auth_failures_total{reason}``,
logged at WARNING at most once per interval with the number left out (never the token), and a call with two
``authorization`` headers is refused whichever of them is right."""

from __future__ import annotations

import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2

from edgephi.security import AUTH_FAILURE_REASONS, AuthFailureLog
from edgephi.v1 import inference_pb2 as pb
from tests.unit.harness import InProcessDoor, grpc_door

TOKEN = "s3cret-token-0123456789"
WRONG = "wrong-token-9876543210"
RIGHT = ("authorization", f"Bearer {TOKEN}")
BAD = ("authorization", f"Bearer {WRONG}")


def failures(door: InProcessDoor, reason: str) -> float:
    value = door.state.metrics.registry.get_sample_value("edgephi_auth_failures_total", {"reason": reason})
    assert value is not None, f"edgephi_auth_failures_total{{reason={reason!r}}} is not exported"
    return value


@pytest.mark.parametrize(
    "metadata", [(RIGHT, BAD), (BAD, RIGHT), (RIGHT, RIGHT)], ids=["right-first", "right-last", "both-right"]
)
async def test_two_authorization_headers_are_refused(metadata: tuple[tuple[str, str], ...]) -> None:
    async with grpc_door(token=TOKEN.encode()) as door:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await door.stub.CountTokens(pb.CountTokensRequest(text="hi"), metadata=metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert err.value.details() == "more than one authorization header; send exactly one"
        call = door.stub.Generate(pb.GenerateRequest(text="hi"), metadata=metadata)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert door.engine.requests == []
        assert failures(door, "duplicate") == 2


async def test_failures_are_counted_by_reason_and_successes_are_not() -> None:
    async with grpc_door(token=TOKEN.encode()) as door:
        assert {r: failures(door, r) for r in AUTH_FAILURE_REASONS} == dict.fromkeys(AUTH_FAILURE_REASONS, 0.0)
        cases = [((), "missing"), ((("authorization", ""),), "missing"), ((BAD,), "invalid"), ((BAD, BAD), "duplicate")]
        for metadata, _ in cases:
            with pytest.raises(grpc.aio.AioRpcError):
                await door.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata)
        await door.stub.CountTokens(pb.CountTokensRequest(text="ok"), metadata=(RIGHT,))
        await door.health.Check(health_pb2.HealthCheckRequest())  # open, not a failure
        assert {r: failures(door, r) for r in AUTH_FAILURE_REASONS} == {"missing": 2, "invalid": 1, "duplicate": 1}


async def test_failures_are_logged_rate_limited_and_never_with_the_token(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="edgephi.security")
    async with grpc_door(token=TOKEN.encode()) as door:
        for metadata in [(BAD,)] * 20 + [(RIGHT, BAD)]:
            with pytest.raises(grpc.aio.AioRpcError):
                await door.stub.CountTokens(pb.CountTokensRequest(text="hi"), metadata=metadata)
        assert failures(door, "invalid") == 20
    warnings = [r for r in caplog.records if r.name == "edgephi.security" and r.levelno == logging.WARNING]
    assert len(warnings) == 1  # 21 failures within one interval: one line
    line = warnings[0].getMessage()
    assert "authentication failed (invalid)" in line
    assert "/edgephi.v1.InferenceService/CountTokens" in line and "127.0.0.1" in line
    assert TOKEN not in caplog.text and WRONG not in caplog.text


def test_the_next_warning_says_how_many_were_left_out(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="edgephi.security")
    now = [100.0]
    counted: list[str] = []
    log = AuthFailureLog(counted.append, interval_s=10.0, clock=lambda: now[0])
    for reason in ("invalid", "missing", "missing", "invalid"):
        log.counted(reason)
    assert log.failed("invalid", "/a/B", "ipv4:10.0.0.7:5000")
    assert not log.failed("missing", "/a/B", "ipv4:10.0.0.7:5001")
    now[0] += 9.9
    assert not log.failed("missing", "/a/B", "ipv4:10.0.0.7:5002")
    now[0] += 0.1
    assert log.failed("invalid", "/a/" + "C" * 10_000, "ipv4:10.0.0.8:5003")
    assert counted == ["invalid", "missing", "missing", "invalid"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "not logged" not in lines[0]
    assert "2 more failure(s) since the previous warning were not logged" in lines[1]
    assert "(10003 characters)" in lines[1] and len(lines[1]) < 400  # the client's method name is bounded
