"""Server reflection under both of its names: ``grpc.reflection.v1`` (what current grpcurl, Postman and
grpcui ask for first) and ``grpc.reflection.v1alpha`` (older tools).

grpcio-reflection (1.85) ships only v1alpha. grpc's ``grpc/reflection/v1/reflection.proto`` is the v1alpha
file under a new package: the same messages with the same field numbers (tests/unit/test_reflection.py
checks it), so one servicer answers both names, reading and writing the v1alpha messages. So that
reflection can describe its own v1 service (``grpcurl describe grpc.reflection.v1.ServerReflection``), the
v1 file is derived from the installed v1alpha descriptor and added to the default descriptor pool, unless
something (a grpcio-reflection that ships v1) registered it already.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_reflection.v1alpha import reflection, reflection_pb2

# Public as ``reflection.aio``; grpc-stubs types that name as grpc.aio, so import the module it re-exports.
from grpc_reflection.v1alpha._async import ReflectionServicer

V1ALPHA_SERVICE = reflection.SERVICE_NAME  # "grpc.reflection.v1alpha.ServerReflection"
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE = f"{V1_PACKAGE}.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"
METHOD = "ServerReflectionInfo"  # bidirectional streaming, in both versions


def v1_file() -> FileDescriptor:
    """``grpc/reflection/v1/reflection.proto`` from the default pool, added there (derived from v1alpha) if
    missing."""
    pool = descriptor_pool.Default()
    try:
        return pool.FindFileByName(V1_FILE)
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = f".{reflection_pb2.DESCRIPTOR.package}.", f".{V1_PACKAGE}."
    proto.name, proto.package = V1_FILE, V1_PACKAGE
    proto.ClearField("options")  # v1alpha's language options (java_package, ...) name the old package
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):  # message-typed fields only (setting it on a scalar is an error)
                field.type_name = field.type_name.replace(old, new)
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new)
            method.output_type = method.output_type.replace(old, new)
    pool.Add(proto)
    return pool.FindFileByName(V1_FILE)


def enable(server: grpc.aio.Server, service_names: Iterable[str]) -> tuple[str, ...]:
    """Register reflection v1 and v1alpha on ``server``, listing ``service_names`` and both reflection
    services; return every service name that reflection lists."""
    v1_file()
    names = (*service_names, V1_SERVICE, V1ALPHA_SERVICE)
    servicer = ReflectionServicer(names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        tuple(grpc.method_handlers_generic_handler(name, {METHOD: handler}) for name in (V1_SERVICE, V1ALPHA_SERVICE))
    )
    return names
