"""LAN security: TLS / mTLS server credentials and a bearer-token interceptor.

The token is read once from a file that only the service user may read (mode 0600 or 0400 — a group- or
world-readable token file is refused at start-up). It is compared with ``hmac.compare_digest`` (constant time)
and never logged. ``grpc.health.v1.Health`` stays open so that probes work without the token; everything else,
reflection included, needs it.
"""

from __future__ import annotations

import hmac
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from edgephi.config import ConfigError, Settings

OPEN_SERVICES = ("/grpc.health.v1.Health/",)


def read_token(path: Path) -> bytes:
    """The bearer token in ``path`` (surrounding whitespace stripped).

    Raises:
        ConfigError: file missing, empty, or readable by group/others.
    """
    try:
        st = path.stat()
        raw = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"EDGEPHI_AUTH_TOKEN_FILE: cannot read {path}: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"EDGEPHI_AUTH_TOKEN_FILE: {path} is accessible to group/others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run: chmod 600 {path}"
        )
    if len(raw) < 16:
        raise ConfigError(f"EDGEPHI_AUTH_TOKEN_FILE: token in {path} is shorter than 16 bytes")
    return raw


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Rejects calls without ``authorization: Bearer <token>`` with ``UNAUTHENTICATED`` (health exempt)."""

    def __init__(self, token: bytes) -> None:
        self._expected = b"Bearer " + token

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method = details.method or ""
        if method.startswith(OPEN_SERVICES):
            return await continuation(details)
        given = b""
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else bytes(value)
                break
        if hmac.compare_digest(given, self._expected):
            return await continuation(details)
        return _deny(method, "missing bearer token" if not given else "invalid bearer token")


def _deny(method: str, reason: str) -> grpc.RpcMethodHandler[Any, Any]:
    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)
        yield  # pragma: no cover - makes this an async generator

    # Server-streaming methods need a streaming handler so the status reaches the client properly.
    if method.endswith(("/Generate", "/Chat", "/ServerReflectionInfo")):
        return grpc.unary_stream_rpc_method_handler(stream)
    return grpc.unary_unary_rpc_method_handler(unary)


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from the cert/key files (and client CA for mTLS), or None for plaintext.

    Raises:
        ConfigError: only one of cert/key given, a client CA without TLS, or unreadable files.
    """
    cert, key, ca = settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
    if cert is None and key is None:
        if ca is not None:
            raise ConfigError("EDGEPHI_TLS_CLIENT_CA_FILE needs EDGEPHI_TLS_CERT_FILE and EDGEPHI_TLS_KEY_FILE")
        return None
    if cert is None or key is None:
        raise ConfigError("set both EDGEPHI_TLS_CERT_FILE and EDGEPHI_TLS_KEY_FILE (or neither)")
    try:
        pair = (key.read_bytes(), cert.read_bytes())
        root = ca.read_bytes() if ca is not None else None
    except OSError as exc:
        raise ConfigError(f"TLS file {exc.filename}: {exc.strerror}") from None
    return grpc.ssl_server_credentials([pair], root_certificates=root, require_client_auth=root is not None)
