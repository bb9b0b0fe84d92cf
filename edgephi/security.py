"""LAN security, transport-neutral: the bearer token and the TLS / mTLS material every front door uses.

The token is read once from a file that only the service user may read (mode 0600 or 0400 — a group- or
world-readable token file is refused at start-up). It is compared with ``hmac.compare_digest`` (constant time)
and never logged. The gRPC door checks it in :mod:`edgephi.grpc_door.interceptors`.

Failed authentications are visible: each is counted (``edgephi_auth_failures_total{reason}``) and logged at
WARNING by :class:`AuthFailureLog`, at most once per :data:`AUTH_LOG_INTERVAL_S` with the number left out in
between (a client retrying a wrong token in a loop must not flood the journal), naming the reason, the method
and the peer, never the credential.
"""

from __future__ import annotations

import hmac
import logging
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgephi.config import ConfigError, Settings
from edgephi.errors import quote

log = logging.getLogger(__name__)

# Why an authentication failed: no (or an empty) credential, a wrong one, or more than one presented.
AUTH_FAILURE_REASONS = ("missing", "invalid", "duplicate")
# At most one WARNING per this many seconds about failed authentications.
AUTH_LOG_INTERVAL_S = 10.0


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


class AuthFailureLog:
    """Counts failed authentications and logs them at WARNING, rate-limited; never the credential.

    ``count(reason)`` is called for every failure (the daemon increments ``edgephi_auth_failures_total``);
    :meth:`failed` logs one line per ``interval_s`` at most, and the next line it writes says how many failures
    it left out since the previous one. Not thread-safe: the gRPC door calls it from its event loop.
    """

    def __init__(
        self,
        count: Callable[[str], None] | None = None,
        *,
        interval_s: float = AUTH_LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger = log,
    ) -> None:
        self._count = count
        self._interval_s = interval_s
        self._clock = clock
        self._log = logger
        self._last: float | None = None
        self.suppressed = 0

    def counted(self, reason: str) -> None:
        """Count one failure (``reason`` is one of :data:`AUTH_FAILURE_REASONS`)."""
        if self._count is not None:
            self._count(reason)

    def failed(self, reason: str, method: str, peer: str) -> bool:
        """Log one failure (already :meth:`counted`) unless one was logged less than ``interval_s`` ago;
        return whether it was logged. ``method`` is the client's (bounded here); ``peer`` its address."""
        now = self._clock()
        if self._last is not None and now - self._last < self._interval_s:
            self.suppressed += 1
            return False
        left_out = ""
        if self.suppressed:
            left_out = f"; {self.suppressed} more failure(s) since the previous warning were not logged"
        self._log.warning(
            "authentication failed (%s) for %s from %s%s", reason, quote(method, 100), quote(peer, 100), left_out
        )
        self._last, self.suppressed = now, 0
        return True


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
