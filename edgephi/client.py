"""A small synchronous client for the CLI, tests and benchmarks (any gRPC client works: grpcurl too)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgephi.v1 import inference_pb2 as pb
from edgephi.v1 import inference_pb2_grpc as pb_grpc


@dataclass
class Connection:
    """Where the daemon is and how to reach it."""

    host: str = "127.0.0.1"
    port: int = 50051
    token: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def channel(self) -> grpc.Channel:
        target = f"{self.host}:{self.port}"
        if self.ca_file is None:
            return grpc.insecure_channel(target)
        from pathlib import Path

        creds = grpc.ssl_channel_credentials(
            root_certificates=Path(self.ca_file).read_bytes(),
            private_key=Path(self.key_file).read_bytes() if self.key_file else None,
            certificate_chain=Path(self.cert_file).read_bytes() if self.cert_file else None,
        )
        return grpc.secure_channel(target, creds)

    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []


def sampling(
    *,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    ignore_eos: bool | None = None,
) -> pb.SamplingOptions:
    """Build ``SamplingOptions`` leaving every ``None`` unset (server default)."""
    opts = pb.SamplingOptions(stop=list(stop))
    for name, value in (
        ("max_tokens", max_tokens),
        ("temperature", temperature),
        ("top_p", top_p),
        ("top_k", top_k),
        ("seed", seed),
        ("ignore_eos", ignore_eos),
    ):
        if value is not None:
            setattr(opts, name, value)
    return opts


class Client:
    """Blocking stubs with the connection's credentials attached to every call."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.channel = conn.channel()
        self.stub = pb_grpc.InferenceServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def generate(
        self, prompt: str, opts: pb.SamplingOptions | None = None, timeout: float | None = None
    ) -> Iterator[pb.GenerateResponse]:
        req = pb.GenerateRequest(text=prompt, sampling=opts or pb.SamplingOptions())
        return self.stub.Generate(req, timeout=timeout, metadata=self.conn.metadata())  # type: ignore[no-any-return]

    def chat(
        self, messages: Sequence[tuple[str, str]], opts: pb.SamplingOptions | None = None, timeout: float | None = None
    ) -> Iterator[pb.ChatResponse]:
        req = pb.ChatRequest(
            messages=[pb.ChatMessage(role=r, content=c) for r, c in messages], sampling=opts or pb.SamplingOptions()
        )
        return self.stub.Chat(req, timeout=timeout, metadata=self.conn.metadata())  # type: ignore[no-any-return]

    def health(self, service: str = "", timeout: float = 5.0) -> str:
        """``SERVING`` / ``NOT_SERVING`` / ... for ``service`` ("" = the whole server)."""
        resp = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    def model_info(self, timeout: float = 10.0) -> pb.GetModelInfoResponse:
        resp: pb.GetModelInfoResponse = self.stub.GetModelInfo(
            pb.GetModelInfoRequest(), timeout=timeout, metadata=self.conn.metadata()
        )
        return resp

    def count_tokens(self, text: str, timeout: float = 10.0) -> int:
        resp = self.stub.CountTokens(pb.CountTokensRequest(text=text), timeout=timeout, metadata=self.conn.metadata())
        return int(resp.token_count)
