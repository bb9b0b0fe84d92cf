"""LAN security: bearer token (UNAUTHENTICATED), TLS and mTLS handshakes on loopback with certificates made here."""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgephi.client import Client, Connection, sampling
from edgephi.exit_codes import ExitCode
from edgephi.security import read_token
from edgephi.testing import Daemon, run_daemon
from edgephi.v1 import inference_pb2 as pb

TOKEN = "s3cret-token-0123456789abcdef"


def _cert(
    name: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        import ipaddress

        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    return cert, key


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[str, str]:
    path.mkdir(parents=True, exist_ok=True)
    (path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (path / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(path / "cert.pem"), str(path / "key.pem")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("pki")
    ca = _cert("edgephi-test-ca", None, ca=True)
    other_ca = _cert("someone-else-ca", None, ca=True)
    out = {}
    out["ca"], _ = _write(d / "ca", *ca)
    out["server_cert"], out["server_key"] = _write(d / "server", *_cert("localhost", ca, server=True))
    out["client_cert"], out["client_key"] = _write(d / "client", *_cert("lan-client", ca))
    out["rogue_cert"], out["rogue_key"] = _write(d / "rogue", *_cert("rogue", other_ca))
    token = d / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    out["token"] = str(token)
    return out


@pytest.fixture(scope="module")
def secure_daemon(artifact: Path, pki: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """mTLS + bearer token. The security layer sits in front of the engine, so most checks need no READY."""
    with run_daemon(
        artifact,
        tmp_path_factory.mktemp("secure"),
        wait_ready=False,
        auth_token_file=pki["token"],
        tls_cert_file=pki["server_cert"],
        tls_key_file=pki["server_key"],
        tls_client_ca_file=pki["ca"],
    ) as d:
        yield d


def _client(
    d: Daemon, pki: dict[str, str], *, token: str | None = TOKEN, mtls: bool = True, rogue: bool = False
) -> Client:
    who = "rogue" if rogue else "client"
    return Client(
        Connection(
            "localhost",
            d.port,
            token,
            pki["ca"],
            pki[f"{who}_cert"] if mtls else None,
            pki[f"{who}_key"] if mtls else None,
        )
    )


def _wait_serving(c: Client) -> None:
    import time

    deadline = time.monotonic() + 300
    while c.health() != "SERVING":
        assert time.monotonic() < deadline
        time.sleep(0.3)


def test_mtls_with_token_generates(secure_daemon: Daemon, pki: dict[str, str]) -> None:
    with _client(secure_daemon, pki) as c:
        _wait_serving(c)
        msgs = list(c.generate("hello", sampling(max_tokens=3, ignore_eos=True), timeout=60))
        assert sum(len(m.token_ids) for m in msgs) == 3


@pytest.mark.parametrize("token", [None, "wrong-token-0123456789abcdef", TOKEN + "x", ""])
def test_missing_or_wrong_token_is_unauthenticated(
    secure_daemon: Daemon, pki: dict[str, str], token: str | None
) -> None:
    with _client(secure_daemon, pki, token=token or None) as c:
        for call in (
            lambda: list(c.generate("hi", sampling(max_tokens=1), timeout=10)),
            lambda: c.model_info(),
            lambda: c.count_tokens("hi"),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        raw = c.stub.Chat(
            pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="x")]),
            timeout=10,
            metadata=[("authorization", "Basic " + TOKEN)],
        )
        with pytest.raises(grpc.RpcError) as err:
            list(raw)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Health stays open for probes.
        assert c.health() in ("SERVING", "NOT_SERVING")


@pytest.mark.parametrize("who", ["no client certificate", "certificate from another CA"])
def test_mtls_refuses_unknown_clients(secure_daemon: Daemon, pki: dict[str, str], who: str) -> None:
    kw = {"mtls": False} if who == "no client certificate" else {"rogue": True}
    with _client(secure_daemon, pki, **kw) as c:  # type: ignore[arg-type]
        with pytest.raises(grpc.RpcError) as err:
            c.health(timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails


def test_plaintext_client_cannot_talk_to_tls_server(secure_daemon: Daemon) -> None:
    with Client(Connection("127.0.0.1", secure_daemon.port, TOKEN)) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.health(timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_token_never_logged(secure_daemon: Daemon) -> None:
    assert TOKEN not in secure_daemon.log()


def test_server_tls_only(artifact: Path, pki: dict[str, str], tmp_path: Path) -> None:
    """TLS without client certificates: a client that trusts the CA connects; health answers during loading."""
    with run_daemon(
        artifact, tmp_path, wait_ready=False, tls_cert_file=pki["server_cert"], tls_key_file=pki["server_key"]
    ) as d:
        with Client(Connection("localhost", d.port, None, pki["ca"])) as c:
            assert c.health() in ("SERVING", "NOT_SERVING")
        os.killpg(d.proc.pid, signal.SIGKILL)  # no need to wait for the engine: the handshake was the point
        d.proc.wait(10)


def test_group_readable_token_file_is_refused(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o640)
    from edgephi.config import ConfigError

    with pytest.raises(ConfigError, match="chmod 600"):
        read_token(token)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPHI_")}
    env.update({"EDGEPHI_AUTH_TOKEN_FILE": str(token), "EDGEPHI_MODEL": str(tmp_path)})
    proc = subprocess.run(
        [sys.executable, "-m", "edgephi.cli", "serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == ExitCode.CONFIG
    assert "chmod 600" in proc.stderr and TOKEN not in proc.stderr


def test_auth_failures_are_counted_and_logged_and_two_headers_refused(
    secure_daemon: Daemon, pki: dict[str, str]
) -> None:
    """Every refused authentication shows in /metrics by reason and in the log (never the token); a call with two
    ``authorization`` headers is refused even when one of them is right."""
    right = ("authorization", f"Bearer {TOKEN}")
    wrong = ("authorization", "Bearer wrong-token-0123456789abcdef")
    before = secure_daemon.metrics()
    with _client(secure_daemon, pki, token=None) as c:
        for metadata, details in [
            ([right, wrong], "more than one authorization header; send exactly one"),
            ([wrong, right], "more than one authorization header; send exactly one"),
            ([right, right], "more than one authorization header; send exactly one"),
            ([wrong], "invalid bearer token"),
            ([], "missing bearer token"),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                c.stub.CountTokens(pb.CountTokensRequest(text="hi"), timeout=10, metadata=metadata)
            assert (err.value.code(), err.value.details()) == (grpc.StatusCode.UNAUTHENTICATED, details)
        assert c.stub.CountTokens(pb.CountTokensRequest(text="hi"), timeout=10, metadata=[right]).token_count > 0
    after = secure_daemon.metrics()

    def counted(reason: str) -> float:
        key = f'edgephi_auth_failures_total{{reason="{reason}"}}'
        return after[key] - before[key]

    assert {r: counted(r) for r in ("missing", "invalid", "duplicate")} == {"missing": 1, "invalid": 1, "duplicate": 3}
    log = secure_daemon.log()
    assert "authentication failed (" in log  # the first failure of an interval is logged (rate-limited after)
    assert TOKEN not in log and "wrong-token" not in log
