"""The keepalive policy on the real daemon, with real grpcio clients in their own processes.

* A client that pings every 10 s (common, to keep NAT and firewall state alive) keeps its connection across
  an idle minute under the default settings: no GOAWAY ``too_many_pings`` (grpc's own server default allows
  one ping per 5 minutes, and none without calls). Its pings, and the server's acks, are counted from grpc's
  ``http_keepalive`` trace.
* A client that vanishes: it runs in a network namespace of its own, joined to the daemon by a veth pair,
  and an nftables rule in that namespace then drops every packet between the two (no FIN, no RST: a pulled
  cable, a suspended laptop, a NAT entry gone). Mid-stream, its engine request is aborted and its slot freed
  within keepalive time + timeout; waiting in the queue (nothing in flight to it, so only the daemon's own
  unanswered ping can tell), its request leaves the queue as fast.

The second test needs root, iproute2 and nft (scripts/ci-ansible-deps.sh installs nftables): without them
it is skipped here and fails in CI. It only touches what it creates (a namespace, a veth pair, a table in
that namespace) and removes them whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

from edgephi.client import Client, Connection, sampling
from edgephi.testing import Daemon, run_daemon
from edgephi.v1 import inference_pb2 as pb
from edgephi.v1 import inference_pb2_grpc as pb_grpc

IN_CI = os.environ.get("CI", "").lower() in ("true", "1", "yes")
CLIENT_PING_S = 10
IDLE_S = 65.0

# What a NAT-keepalive client typically sets: ping every 10 s, with or without calls, without limit.
_IDLE_CLIENT = """
import json, sys, time, grpc
from edgephi.v1 import inference_pb2 as pb, inference_pb2_grpc as pb_grpc
target, ping_ms, idle_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
states = []
channel = grpc.insecure_channel(target, options=[
    ("grpc.keepalive_time_ms", ping_ms),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
])
channel.subscribe(lambda state: states.append(state.name), try_to_connect=True)
stub = pb_grpc.InferenceServiceStub(channel)
stub.CountTokens(pb.CountTokensRequest(text="hi"), timeout=30)
time.sleep(idle_s)
n = stub.CountTokens(pb.CountTokensRequest(text="hi there"), timeout=30).token_count
print(json.dumps({"states": states, "token_count": n}), flush=True)
channel.close()
"""


@pytest.mark.slow
def test_a_client_pinging_every_10_s_keeps_its_connection_across_an_idle_minute(
    daemon: Daemon, record_property: Any
) -> None:
    env = {**os.environ, "GRPC_TRACE": "http_keepalive", "GRPC_VERBOSITY": "DEBUG"}
    args = [f"127.0.0.1:{daemon.port}", str(CLIENT_PING_S * 1000), str(IDLE_S)]
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-c", _IDLE_CLIENT, *args], env=env, capture_output=True, text=True, timeout=IDLE_S + 120
    )
    idle = time.monotonic() - started
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    # grpc's http_keepalive trace: every ping frame the client sent, and each keepalive ping the server acked.
    pings = len(re.findall(r"CLIENT\[[^\]]*\]: Ping \d+ sent", run.stderr))
    acked = run.stderr.count("Finish keepalive ping")
    record_property("client_pings_sent", pings)
    record_property("keepalive_pings_acked", acked)
    record_property("idle_s", round(idle, 1))
    # Connected once, then READY throughout: a GOAWAY would have taken the channel to IDLE (and the second
    # call would have reconnected).
    states = result["states"]
    assert "READY" in states and states[states.index("READY") + 1 :] == [], states
    assert result["token_count"] > 0
    assert "too_many_pings" not in run.stderr and "GOAWAY" not in run.stderr
    assert acked >= IDLE_S // CLIENT_PING_S - 1, f"{acked} pings acked: the client did not ping as configured"


# --- a peer that vanishes mid-stream -----------------------------------------------------------------------

KEEPALIVE_TIME_S = 2.0
KEEPALIVE_TIMEOUT_S = 2.0
MARGIN_S = 20.0  # the handler's cancellation, the engine abort and the metrics scrape, on 2 loaded cores
MAX_TOKENS = 2000

_STREAM_CLIENT = """
import sys, grpc
from edgephi.v1 import inference_pb2 as pb, inference_pb2_grpc as pb_grpc
channel = grpc.insecure_channel(sys.argv[1])  # no keepalive of its own: it will never notice the drop
sampling = pb.SamplingOptions(max_tokens=int(sys.argv[2]), ignore_eos=True)
stream = pb_grpc.InferenceServiceStub(channel).Generate(pb.GenerateRequest(text="Once upon a time", sampling=sampling))
next(stream)
print("streaming", flush=True)
try:
    for _ in stream:
        pass
    print("finished", flush=True)
except grpc.RpcError as exc:
    print("ended", exc.code().name, flush=True)
"""


@dataclass
class ClientNamespace:
    name: str
    server_ip: str  # on the host's end of the veth pair: the daemon listens here
    client_ip: str

    def run(self, *cmd: str, input: str | None = None) -> None:
        _sh("ip", "netns", "exec", self.name, *cmd, input=input)

    def allow_everything_again(self) -> None:
        self.run("nft", "delete", "table", "inet", "edgephi_test_drop")

    def drop_everything_between(self) -> None:
        """An nftables table in the client's namespace that drops every packet to and from the daemon."""
        rules = f"""
        table inet edgephi_test_drop {{
            chain input {{ type filter hook input priority 0; ip saddr {self.server_ip} drop; }}
            chain output {{ type filter hook output priority 0; ip daddr {self.server_ip} drop; }}
        }}
        """
        self.run("nft", "-f", "-", input=rules)


def _sh(*cmd: str, input: str | None = None) -> None:
    done = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {done.returncode}: {done.stderr.strip()}")


def _need_netns_tools() -> None:
    missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
    why = ""
    if os.geteuid() != 0:
        why = "needs root (network namespaces, nftables)"
    elif missing:
        why = f"needs {' and '.join(missing)} (nftables: scripts/ci-ansible-deps.sh installs it)"
    if why:
        if IN_CI:
            pytest.fail(why)
        pytest.skip(why)


@contextlib.contextmanager
def client_namespace() -> Iterator[ClientNamespace]:
    """A network namespace joined to this one by a veth pair on a /30 of 10.213.0.0/16 of its own; removed,
    with the pair and its nftables table, on exit."""
    tag = f"{os.getpid() % 0x10000:04x}{secrets.token_hex(2)}"
    name, host_end, ns_end = f"epk{tag}", f"epk{tag}h", f"epk{tag}c"
    net = f"10.213.{secrets.randbelow(256)}.{secrets.randbelow(64) * 4}"
    base = net.rsplit(".", 1)[0]
    last = int(net.rsplit(".", 1)[1])
    ns = ClientNamespace(name, f"{base}.{last + 1}", f"{base}.{last + 2}")
    try:
        _sh("ip", "netns", "add", name)
        _sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end)
        _sh("ip", "link", "set", ns_end, "netns", name)
        _sh("ip", "addr", "add", f"{ns.server_ip}/30", "dev", host_end)
        _sh("ip", "link", "set", host_end, "up")
        ns.run("ip", "addr", "add", f"{ns.client_ip}/30", "dev", ns_end)
        ns.run("ip", "link", "set", ns_end, "up")
        ns.run("ip", "link", "set", "lo", "up")
    except RuntimeError as exc:
        _remove(name, host_end)
        if IN_CI:
            pytest.fail(f"cannot set up a network namespace: {exc}")
        pytest.skip(f"cannot set up a network namespace here: {exc}")
    try:
        yield ns
    finally:
        _remove(name, host_end)


def _remove(name: str, host_end: str) -> None:
    for cmd in (("ip", "link", "del", host_end), ("ip", "netns", "del", name)):  # the pair goes with either end
        subprocess.run(cmd, capture_output=True, timeout=30)


def _wait_serving(host: str, d: Daemon, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    with Client(Connection(host, d.port)) as c:
        while True:
            assert d.proc.poll() is None, d.log()[-3000:]
            assert time.monotonic() < deadline, d.log()[-3000:]
            with contextlib.suppress(grpc.RpcError):
                if c.health() == "SERVING":
                    return
            time.sleep(0.2)


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().strip() if ready else ""


def _engine_core(d: Daemon) -> psutil.Process:
    for p in psutil.Process(d.proc.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline()):
                return p
    raise AssertionError("no VLLM::EngineCore process under the daemon")


def _wait_until_freed(d: Daemon, gauges: tuple[str, ...], since: float) -> tuple[float, dict[str, float]]:
    """Poll /metrics until every gauge is 0; return the seconds since ``since`` and the last scrape."""
    bound = KEEPALIVE_TIME_S + KEEPALIVE_TIMEOUT_S + MARGIN_S
    while True:
        m = d.metrics()
        if all(m[g] == 0 for g in gauges):
            return time.monotonic() - since, m
        held = {k: v for k, v in m.items() if k.startswith(("edgephi_streams", "edgephi_engine", "edgephi_requests"))}
        assert time.monotonic() - since < bound, f"still held {bound:g} s after the drop: {held}"
        time.sleep(0.1)


def test_a_vanished_peer_is_dropped_and_its_engine_request_aborted(
    artifact: Path, tmp_path: Path, record_property: Any
) -> None:
    """Twice, against one daemon with one slot: a client that vanishes mid-stream (tokens in flight to it: the
    unacknowledged data ends the connection; the engine core is frozen right after the drop, so that only an
    abort can end its request), then one that vanishes while its request waits in the queue behind another
    client's stream (nothing in flight to it: only the server's unanswered ping can tell)."""
    _need_netns_tools()
    cancelled = 'edgephi_requests_total{code="CANCELLED",method="Generate"}'
    with (
        client_namespace() as ns,
        run_daemon(
            artifact,
            tmp_path,
            wait_ready=False,
            host=ns.server_ip,
            keepalive_time_s=KEEPALIVE_TIME_S,
            keepalive_timeout_s=KEEPALIVE_TIMEOUT_S,
            # Far beyond the bound, so that only the keepalive policy can end the stream in time.
            stream_write_timeout_s=600,
            max_concurrent_streams=1,
        ) as d,
    ):
        _wait_serving(ns.server_ip, d)
        target = f"{ns.server_ip}:{d.port}"
        argv = ["ip", "netns", "exec", ns.name, sys.executable, "-c", _STREAM_CLIENT, target, str(MAX_TOKENS)]

        # 1. Mid-stream.
        client = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            assert _read_line(client, 300) == "streaming", d.log()[-3000:]
            assert d.wait_metric("edgephi_streams_running", 1.0, timeout=60) == 1.0
            ns.drop_everything_between()
            dropped = time.monotonic()
            # Freeze the engine core at once, so that it cannot finish the request on its own: from here on
            # only an abort (in the daemon's process) ends it, however fast the engine.
            core = _engine_core(d)
            core.suspend()
            try:
                assert d.metrics()["edgephi_engine_unfinished_requests"] == 1.0, "finished before the drop"
                gauges = ("edgephi_streams_running", "edgephi_engine_unfinished_requests")
                freed_s, m = _wait_until_freed(d, gauges, dropped)
            finally:
                core.resume()
            record_property("mid_stream_drop_to_slot_freed_s", round(freed_s, 2))
            # Cut short by the server (cancelled), and the client never left: it still waits behind the rule.
            assert m.get(cancelled) == 1.0, m
            assert m.get('edgephi_requests_total{code="OK",method="Generate"}', 0.0) == 0.0, m
            assert client.poll() is None
        finally:
            client.kill()
            client.communicate(timeout=30)  # reaps it and closes its pipe
        _wait_serving(ns.server_ip, d, timeout=180)  # the watchdog saw the frozen core: ready again once it runs

        # 2. Queued: another client holds the one slot (it reads nothing through a 1 KiB window, so its stream
        # cannot end whatever the engine's speed); the vanished client's request waits and is sent nothing.
        ns.allow_everything_again()
        slow = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
        with grpc.insecure_channel(target, options=slow) as channel:
            request = pb.GenerateRequest(text="Once", sampling=sampling(max_tokens=MAX_TOKENS, ignore_eos=True))
            holder = pb_grpc.InferenceServiceStub(channel).Generate(request, timeout=300)
            next(holder)
            client = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            try:
                assert d.wait_metric("edgephi_streams_queued", 1.0, timeout=180) == 1.0, d.log()[-3000:]
                ns.drop_everything_between()
                freed_s, m = _wait_until_freed(d, ("edgephi_streams_queued",), time.monotonic())
                record_property("queued_drop_to_freed_s", round(freed_s, 2))
                assert m.get(cancelled) == 2.0, m
                assert m["edgephi_streams_running"] == 1.0, m  # the other client's stream goes on
                assert client.poll() is None
            finally:
                client.kill()
                client.communicate(timeout=30)
            holder.cancel()
        with Client(Connection(ns.server_ip, d.port)) as c:
            assert c.count_tokens("still here") > 0
