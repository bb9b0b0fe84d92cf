"""Bounded status messages on the real daemon: a grpcio (C core) client that sends a 20,000-character chat role
gets INVALID_ARGUMENT naming the field, not RESOURCE_EXHAUSTED "received metadata size exceeds hard limit" (the
whole role echoed back in ``grpc-message`` used to overflow grpc's 16 KiB metadata limit)."""

from __future__ import annotations

import grpc
import pytest

from edgephi.errors import QUOTE_CHARS
from edgephi.grpc_door.status import MAX_DETAILS_WIRE_BYTES, wire_bytes
from edgephi.testing import Daemon
from edgephi.v1 import inference_pb2 as pb

HUGE = 20_000


@pytest.mark.parametrize("role", ["r" * HUGE, "日\u202e😀\x00" * (HUGE // 4)], ids=["ascii", "odd-unicode"])
def test_a_huge_unknown_role_is_invalid_argument_not_resource_exhausted(daemon: Daemon, role: str) -> None:
    chat = [pb.ChatMessage(role="user", content="hi"), pb.ChatMessage(role=role, content="hi")]
    with daemon.client() as c:
        with pytest.raises(grpc.RpcError) as err:
            list(c.stub.Chat(pb.ChatRequest(messages=chat), timeout=30))
        details = err.value.details() or ""
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, details
        assert details.startswith("messages[1].role: unknown role '")
        assert f"({HUGE} characters)" in details
        assert len(details) < QUOTE_CHARS + 150 and wire_bytes(details) <= MAX_DETAILS_WIRE_BYTES
        with pytest.raises(grpc.RpcError) as err:
            c.stub.CountTokens(pb.CountTokensRequest(chat=pb.ChatMessages(messages=chat)), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (err.value.details() or "").startswith("chat.messages[1].role: unknown role '")
        # The daemon is fine afterwards.
        assert c.count_tokens("still serving") > 0
