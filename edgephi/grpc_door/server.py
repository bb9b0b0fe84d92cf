"""The gRPC server: our service, ``grpc.health.v1`` (readiness from the server state), reflection, TLS.

Health answers ``SERVING`` exactly when :attr:`edgephi.state.ServerState.ready` (for ``""`` and
``edgephi.v1.InferenceService``); it stays open without the bearer token so that probes work.
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from edgephi.config import ConfigError
from edgephi.grpc_door.interceptors import BearerTokenInterceptor, DecodeGuardInterceptor
from edgephi.grpc_door.servicer import InferenceServicer
from edgephi.security import TlsMaterial
from edgephi.service import GenerationService
from edgephi.v1 import inference_pb2, inference_pb2_grpc

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


def credentials(tls: TlsMaterial) -> grpc.ServerCredentials:
    """grpc server credentials from PEM material (client certificates required when it has a client CA)."""
    return grpc.ssl_server_credentials(
        [(tls.key, tls.cert)], root_certificates=tls.client_ca, require_client_auth=tls.client_ca is not None
    )


async def build_server(
    service: GenerationService, tls: TlsMaterial | None, token: bytes | None
) -> tuple[grpc.aio.Server, int]:
    """Create the grpc.aio server with our service, health and reflection; bind; return it and its port (the
    bound one when the settings ask for port 0). Health follows the server state's readiness from now on.

    Raises:
        ConfigError: the address cannot be bound (port in use, address not on this host).
    """
    settings = service.state.settings
    # Auth first: an unauthenticated caller learns nothing, not even whether its bytes parse.
    interceptors: list[Any] = [BearerTokenInterceptor(token, service.state.metrics)] if token else []
    interceptors.append(DecodeGuardInterceptor())
    server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(
        InferenceServicer(service, settings.stream_write_timeout_s), server
    )
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)

    async def publish(ready: bool) -> None:
        code = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await health.set(name, code)

    await service.state.on_readiness(publish)
    names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    address = f"{settings.host}:{settings.port}"
    try:
        port = server.add_secure_port(address, credentials(tls)) if tls else server.add_insecure_port(address)
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
