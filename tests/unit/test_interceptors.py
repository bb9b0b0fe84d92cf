"""The gRPC door's interceptors in-process: bearer-token authentication (health open) and undecodable request
bytes answered INVALID_ARGUMENT instead of grpc's UNKNOWN."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2

from edgephi.v1 import inference_pb2 as pb
from tests.unit.harness import grpc_door

TOKEN = b"s3cret-token-0123456789"
UNDECODABLE = b"\x0a\x03\xff\xfe\x41"  # field 1 (text) holding invalid UTF-8


@pytest.mark.parametrize(
    ("metadata", "details"),
    [
        ((), "missing bearer token"),
        ((("authorization", "Bearer wrong-token-0123456789"),), "invalid bearer token"),
        ((("authorization", TOKEN.decode()),), "invalid bearer token"),  # no "Bearer " scheme
    ],
)
async def test_calls_without_the_token_are_unauthenticated(metadata: tuple[tuple[str, str], ...], details: str) -> None:
    async with grpc_door(token=TOKEN) as door:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await door.stub.CountTokens(pb.CountTokensRequest(text="hi"), metadata=metadata)
        assert (err.value.code(), err.value.details()) == (grpc.StatusCode.UNAUTHENTICATED, details)
        call = door.stub.Generate(pb.GenerateRequest(text="hi"), metadata=metadata)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert door.engine.requests == []


async def test_the_token_opens_the_api_and_health_needs_none() -> None:
    async with grpc_door(token=TOKEN) as door:
        auth = (("authorization", f"Bearer {TOKEN.decode()}"),)
        r = await door.stub.CountTokens(pb.CountTokensRequest(text="four"), metadata=auth)
        assert r.token_count == 4
        h = await door.health.Check(health_pb2.HealthCheckRequest())
        assert h.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("method", ["CountTokens", "Generate"])
async def test_undecodable_bytes_are_invalid_argument(method: str) -> None:
    async with grpc_door() as door:
        path = f"/edgephi.v1.InferenceService/{method}"
        if method == "Generate":
            call = door.channel.unary_stream(path, request_serializer=bytes, response_deserializer=bytes)(UNDECODABLE)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
        else:
            unary = door.channel.unary_unary(path, request_serializer=bytes, response_deserializer=bytes)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await unary(UNDECODABLE)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (err.value.details() or "").startswith(f"request: not a valid message for {path} (")
        assert (await door.stub.CountTokens(pb.CountTokensRequest(text="ok"))).token_count == 2


async def test_authentication_comes_before_decoding() -> None:
    async with grpc_door(token=TOKEN) as door:
        unary = door.channel.unary_unary(
            "/edgephi.v1.InferenceService/CountTokens", request_serializer=bytes, response_deserializer=bytes
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await unary(UNDECODABLE)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
