"""Server reflection in-process: a client that speaks only ``grpc.reflection.v1`` (as current grpcurl does
first) lists the services and resolves ``edgephi.v1.InferenceService``; v1alpha still answers; both stay
behind the bearer token."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor
from google.protobuf.message_factory import GetMessageClass
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha

from edgephi.grpc_door import reflection
from tests.unit.harness import InProcessDoor, grpc_door

TOKEN = b"s3cret-token-0123456789"
AUTH = (("authorization", f"Bearer {TOKEN.decode()}"),)
V1_PATH = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
V1ALPHA_PATH = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"

# The v1 messages, from the v1 file the server registers (a v1-only client's own classes).
_V1 = reflection.v1_file()
Request = GetMessageClass(_V1.message_types_by_name["ServerReflectionRequest"])
Response = GetMessageClass(_V1.message_types_by_name["ServerReflectionResponse"])


def _shape(d: Descriptor) -> list[tuple[Any, ...]]:
    """What decides a message's encoding: each field's number, name, type, repetition and oneof, and the same
    for the messages it holds."""
    out: list[tuple[Any, ...]] = []
    for f in sorted(d.fields, key=lambda f: f.number):
        oneof = f.containing_oneof.name if f.containing_oneof else ""
        nested = _shape(f.message_type) if f.message_type is not None else []
        out.append((f.number, f.name, f.type, f.is_repeated, oneof, nested))
    return out


def test_v1_is_v1alpha_under_a_new_package() -> None:
    assert _V1.package == "grpc.reflection.v1" and _V1.name == "grpc/reflection/v1/reflection.proto"
    method = _V1.services_by_name["ServerReflection"].methods_by_name["ServerReflectionInfo"]
    assert method.input_type.full_name == "grpc.reflection.v1.ServerReflectionRequest"
    assert method.output_type.full_name == "grpc.reflection.v1.ServerReflectionResponse"
    for name, alpha in v1alpha.DESCRIPTOR.message_types_by_name.items():
        assert _shape(_V1.message_types_by_name[name]) == _shape(alpha), name
    assert reflection.v1_file() is _V1  # registered once


async def _ask(door: InProcessDoor, path: str, requests: Iterable[Any], metadata: Any = AUTH) -> list[Any]:
    call = door.channel.stream_stream(
        path, request_serializer=lambda m: m.SerializeToString(), response_deserializer=Response.FromString
    )(iter(requests), metadata=metadata)
    return [r async for r in call]


async def test_a_v1_only_client_lists_and_resolves_the_service() -> None:
    async with grpc_door(token=TOKEN) as door:
        listed, found, own = await _ask(
            door,
            V1_PATH,
            [
                Request(list_services=""),
                Request(file_containing_symbol="edgephi.v1.InferenceService"),
                Request(file_containing_symbol="grpc.reflection.v1.ServerReflection"),
            ],
        )
        names = {s.name for s in listed.list_services_response.service}
        assert names == {
            "edgephi.v1.InferenceService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        }
        files = [
            descriptor_pb2.FileDescriptorProto.FromString(b)
            for b in found.file_descriptor_response.file_descriptor_proto
        ]
        service = next(s for f in files if f.package == "edgephi.v1" for s in f.service)
        assert service.name == "InferenceService"
        assert {"Generate", "Chat", "CountTokens", "GetModelInfo"} <= {m.name for m in service.method}
        (v1,) = [
            descriptor_pb2.FileDescriptorProto.FromString(b) for b in own.file_descriptor_response.file_descriptor_proto
        ]
        assert v1.package == "grpc.reflection.v1" and v1.service[0].name == "ServerReflection"


async def test_v1alpha_still_answers() -> None:
    async with grpc_door() as door:
        call = door.channel.stream_stream(
            V1ALPHA_PATH,
            request_serializer=v1alpha.ServerReflectionRequest.SerializeToString,
            response_deserializer=v1alpha.ServerReflectionResponse.FromString,
        )(iter([v1alpha.ServerReflectionRequest(list_services="")]))
        (listed,) = [r async for r in call]
        assert "edgephi.v1.InferenceService" in {s.name for s in listed.list_services_response.service}


@pytest.mark.parametrize("path", [V1_PATH, V1ALPHA_PATH])
async def test_reflection_needs_the_token(path: str) -> None:
    async with grpc_door(token=TOKEN) as door:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _ask(door, path, [Request(list_services="")], metadata=())
        assert (err.value.code(), err.value.details()) == (grpc.StatusCode.UNAUTHENTICATED, "missing bearer token")
        assert len(await _ask(door, path, [Request(list_services="")])) == 1
