"""The gRPC server: our service, ``grpc.health.v1`` (readiness from the server state), reflection (v1 and
v1alpha, :mod:`.reflection`), TLS, and the HTTP/2 keepalive policy (:func:`channel_options`).

Health answers ``SERVING`` exactly when :attr:`edgephi.state.ServerState.ready` (for ``""`` and
``edgephi.v1.InferenceService``); it stays open without the bearer token so that probes work.
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from edgephi.config import ConfigError, Settings
from edgephi.grpc_door import reflection
from edgephi.grpc_door.interceptors import BearerTokenInterceptor, HandlerGuardInterceptor
from edgephi.grpc_door.servicer import InferenceServicer
from edgephi.security import TlsMaterial
from edgephi.service import GenerationService
from edgephi.v1 import inference_pb2, inference_pb2_grpc

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


def channel_options(settings: Settings) -> list[tuple[str, int]]:
    """grpc core channel arguments for the server: ours, then the keepalive policy.

    Defaults from grpc's doc/keepalive.md (server side): keepalive pings every 2 h, answered within 20 s; no
    client pings on a connection without calls; client pings closer than 5 min apart are strikes, and after
    2 strikes the next one gets GOAWAY ``too_many_pings`` (strikes reset when the server sends data or
    headers). A client pinging every 10 s to keep NAT state alive, common on a LAN, is cut off within 30 s.
    Ours:

    * ``grpc.keepalive_time_ms`` / ``grpc.keepalive_timeout_ms`` = ``keepalive_time_s`` /
      ``keepalive_timeout_s`` (30 s / 10 s): the server pings a connection it heard nothing from for
      ``keepalive_time_s`` and closes it when the ack is not back within ``keepalive_timeout_s``; grpc also
      sets the socket's ``TCP_USER_TIMEOUT`` to the timeout (gRFC A18), so a peer that stops acknowledging
      data mid-stream is dropped as fast. Dropping the connection cancels its calls: streams end, engine
      requests are aborted, slots are freed.
    * ``grpc.keepalive_permit_without_calls`` = 1: pings without calls are fine, both ways (the server pings
      idle connections, and a client's pings on one are judged by the interval below, not by the 2 h that
      grpc applies otherwise).
    * ``grpc.http2.min_ping_interval_without_data_ms`` = ``min_client_ping_interval_s`` (5 s; grpc's constant
      ``GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS``): closer client pings are strikes.
    * ``grpc.http2.max_pings_without_data`` = 0: no cap on the server's own pings while it sends no data
      (current grpc caps only clients; older releases capped servers too, at 2).
    * ``grpc.so_reuseport`` = 0: a second daemon on the same port fails to bind instead of sharing it.
    """

    def ms(seconds: float) -> int:
        return max(0, round(seconds * 1000))

    return [
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", max(1, ms(settings.keepalive_time_s))),
        ("grpc.keepalive_timeout_ms", max(1, ms(settings.keepalive_timeout_s))),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", ms(settings.min_client_ping_interval_s)),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def credentials(tls: TlsMaterial) -> grpc.ServerCredentials:
    """grpc server credentials from PEM material (client certificates required when it has a client CA)."""
    return grpc.ssl_server_credentials(
        [(tls.key, tls.cert)], root_certificates=tls.client_ca, require_client_auth=tls.client_ca is not None
    )


async def build_server(
    service: GenerationService, tls: TlsMaterial | None, token: bytes | None
) -> tuple[grpc.aio.Server, int]:
    """Create the grpc.aio server with our service, health and reflection (v1 and v1alpha) and the keepalive
    policy of :func:`channel_options`; bind; return it and its port (the bound one when the settings ask for
    port 0). Health follows the server state's readiness from now on.

    Raises:
        ConfigError: the address cannot be bound (port in use, address not on this host).
    """
    settings = service.state.settings
    # Auth first: an unauthenticated caller learns nothing, not even whether its bytes parse.
    interceptors: list[Any] = [BearerTokenInterceptor(token, service.state.metrics)] if token else []
    interceptors.append(HandlerGuardInterceptor())
    server = grpc.aio.server(interceptors=interceptors, options=channel_options(settings))
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
    reflection.enable(server, (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name))
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
