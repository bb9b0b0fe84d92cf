"""Loading → serving → draining on SIGTERM, with a second real daemon (its own engine)."""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

from edgephi.client import sampling
from edgephi.testing import run_daemon
from edgephi.v1 import inference_pb2 as pb
from edgephi.v1 import inference_pb2_grpc as pb_grpc

GRACE_S = 10.0  # the 20-token short stream takes 1-4 s on the slow CPU W4A16 path, under CI load


def error_lines(log: str) -> list[str]:
    """Lines of a daemon log at ERROR (ours and vLLM's formats) or of a traceback."""
    noisy = r"\bERROR\b|\bCRITICAL\b|Traceback|Exception ignored"
    return [line for line in log.splitlines() if re.search(noisy, line)]


def test_loading_then_serving_then_sigterm_drain(artifact: Path, tmp_path: Path) -> None:
    with (
        run_daemon(artifact, tmp_path, wait_ready=False, drain_grace_s=GRACE_S, max_model_len=2048) as d,
        d.client() as c,
    ):
        # Loading: listening, but NOT_SERVING and requests are UNAVAILABLE.
        assert c.health() == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as err:
            list(c.generate("hi", sampling(max_tokens=2)))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "loading" in (err.value.details() or "")
        deadline = time.monotonic() + 300
        while c.health() != "SERVING":
            assert time.monotonic() < deadline and d.proc.poll() is None, d.log()[-3000:]
            time.sleep(0.2)
        children = psutil.Process(d.proc.pid).children(recursive=True)
        assert children, "vLLM's engine-core process should be running"

        # In flight at SIGTERM: one stream that finishes within the grace, one that cannot.
        short_result: dict[str, Any] = {}
        long_result: dict[str, Any] = {}

        def consume(stream: Iterator[pb.GenerateResponse], out: dict[str, Any]) -> None:
            try:
                out["msgs"] = list(stream)
            except grpc.RpcError as exc:
                out["error"] = exc

        # The long stream is read by a slow client (1 KiB HTTP/2 window, no BDP growth) that waits out the
        # grace: it is certainly still in flight then, whatever the engine's speed (a GPU makes 2,000 tokens
        # in ~10 s).
        slow = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
        long_channel = grpc.insecure_channel(f"127.0.0.1:{d.port}", options=slow)
        request = pb.GenerateRequest(text="Once", sampling=sampling(max_tokens=2000, ignore_eos=True))
        long_stream = pb_grpc.InferenceServiceStub(long_channel).Generate(request, timeout=GRACE_S + 120)
        short_stream = c.generate("Twice", sampling(max_tokens=20, ignore_eos=True))
        next(long_stream)
        next(short_stream)
        grace_over = threading.Event()

        def consume_after_grace() -> None:
            grace_over.wait(GRACE_S + 60)
            consume(long_stream, long_result)

        threads = [
            threading.Thread(target=consume_after_grace),
            threading.Thread(target=consume, args=(short_stream, short_result)),
        ]
        for t in threads:
            t.start()
        sent = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        threading.Timer(GRACE_S + 0.5, grace_over.set).start()
        time.sleep(0.5)
        assert c.health() == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as err:
            list(c.generate("new", sampling(max_tokens=2)))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        for t in threads:
            t.join(GRACE_S + 30)
        long_channel.close()

        assert "error" not in short_result, short_result
        assert sum(len(m.token_ids) for m in long_result.get("msgs", [])) < 2000  # tokens, not messages
        assert len(short_result["msgs"]) >= 1
        error = long_result.get("error")
        assert isinstance(error, grpc.RpcError), long_result
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "drain" in (error.details() or "")
        code = d.proc.wait(GRACE_S + 60)
        elapsed = time.monotonic() - sent
        assert code == 0, d.log()[-3000:]
        assert GRACE_S - 0.5 <= elapsed < GRACE_S + 30
        # A clean stop is quiet: no ERROR, no traceback (vLLM's "AsyncLLM output_handler failed ...
        # EngineDeadError" came from its shutdown order; see edgephi.engine.vllm.shutdown).
        assert error_lines(d.log()) == []
        # Nothing outlives the daemon.
        time.sleep(1)
        assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_sigterm_while_loading_stops_at_once(artifact: Path, tmp_path: Path) -> None:
    """Nothing is served while loading, so a stop need not wait out the load (minutes on a GPU box)."""
    with run_daemon(artifact, tmp_path, wait_ready=False) as d, d.client() as c:
        assert c.health() == "NOT_SERVING"
        deadline = time.monotonic() + 120
        while not (children := psutil.Process(d.proc.pid).children(recursive=True)):
            assert time.monotonic() < deadline and d.proc.poll() is None, d.log()[-3000:]
            time.sleep(0.1)
        time.sleep(1.0)  # the engine core is starting up
        assert c.health() == "NOT_SERVING", "loaded too fast to test a stop while loading"
        sent = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        code = d.proc.wait(60)
        elapsed = time.monotonic() - sent
        assert code == 0, d.log()[-3000:]
        assert elapsed < 20, elapsed
        assert "stopped while loading" in d.log()
        time.sleep(1)
        assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
