"""LAN security, transport-neutral: the bearer token and the TLS / mTLS material every front door uses.

The token is read once from a file that only the service user may read (mode 0600 or 0400 — a group- or
world-readable token file is refused at start-up). It is compared with ``hmac.compare_digest`` (constant time)
and never logged. The gRPC door checks it in :mod:`edgephi.grpc_door.interceptors`.
"""

from __future__ import annotations

import hmac
import stat
from dataclasses import dataclass
from pathlib import Path

from edgephi.config import ConfigError, Settings


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


def token_matches(given: bytes, expected: bytes) -> bool:
    """Whether a presented credential equals the expected one, in constant time (``hmac.compare_digest``)."""
    return hmac.compare_digest(given, expected)


@dataclass(frozen=True)
class TlsMaterial:
    """PEM bytes for a TLS server: its key and certificate, and the CA that client certificates must chain to
    (mTLS) or None."""

    key: bytes
    cert: bytes
    client_ca: bytes | None


def tls_material(settings: Settings) -> TlsMaterial | None:
    """The TLS key/certificate (and client CA for mTLS) named by the settings, or None for plaintext.

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
    return TlsMaterial(key=pair[0], cert=pair[1], client_ca=root)
