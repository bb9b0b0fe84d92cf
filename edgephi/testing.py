"""Test and benchmark support shipped with the package: the real ``edgephi serve`` daemon as a subprocess on
127.0.0.1 port 0 (:func:`run_daemon`), used by tests/ and benchmarks/ alike."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from edgephi.client import Client, Connection

# vLLM's CPU build with a tiny model loads in ~20-60 s on 2 cores (slower while other work runs).
LOAD_TIMEOUT_S = 300.0
SETTINGS_OVERRIDE = "EDGEPHI_TEST_DAEMON_SETTINGS"


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    log_path: Path
    port: int
    metrics_port: int | None
    env: dict[str, str]
    health_seen: list[str] = field(default_factory=list)

    def client(self, **kw: object) -> Client:
        return Client(Connection("127.0.0.1", self.port, **kw))  # type: ignore[arg-type]

    def metrics(self) -> dict[str, float]:
        """Scrape the Prometheus endpoint; ``{"name{labels}": value}``."""
        assert self.metrics_port is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def wait_metric(self, name: str, value: float, timeout: float = 10.0) -> float:
        """Poll (bounded) until metric ``name`` equals ``value``; return the last value seen."""
        deadline = time.monotonic() + timeout
        seen = float("nan")
        while time.monotonic() < deadline:
            seen = self.metrics().get(name, float("nan"))
            if seen == value:
                return seen
            time.sleep(0.1)
        return seen

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)


def _settings_override(text: str) -> dict[str, str]:
    """``$EDGEPHI_TEST_DAEMON_SETTINGS`` ("ENFORCE_EAGER=false,MAX_MODEL_LEN=4096") as ``EDGEPHI_*`` variables:
    the test daemons' defaults above, changed for another machine (the GPU acceptance run turns CUDA graphs on).
    A test's own settings still win."""
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"{SETTINGS_OVERRIDE}: {item!r} is not NAME=VALUE")
        out["EDGEPHI_" + name.strip().upper().removeprefix("EDGEPHI_")] = value.strip()
    return out


def _read_ports(port_file: Path) -> tuple[int, int | None] | None:
    try:
        data = json.loads(port_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return int(data["grpc"]), data.get("metrics")


@contextlib.contextmanager
def run_daemon(model: Path, workdir: Path, *, wait_ready: bool = True, **settings: object) -> Iterator[Daemon]:
    """Run ``edgephi serve`` on ``model``; yields once health is ``SERVING`` (or once listening if not wait_ready).

    ``settings`` become ``EDGEPHI_<NAME>`` variables. The daemon gets SIGTERM on exit (then SIGKILL).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / "ports.json"
    port_file.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPHI_")}
    env.update(
        {
            "EDGEPHI_MODEL": str(model),
            "EDGEPHI_PORT": "0",
            "EDGEPHI_METRICS_PORT": "0",
            "EDGEPHI_PORT_FILE": str(port_file),
            "EDGEPHI_MAX_MODEL_LEN": "2048",
            "EDGEPHI_KV_CACHE_SPACE_GIB": "1",
            "EDGEPHI_ENFORCE_EAGER": "true",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(_settings_override(os.environ.get(SETTINGS_OVERRIDE, "")))
    env.update({f"EDGEPHI_{k.upper()}": str(v) for k, v in settings.items()})
    log_path = workdir / "daemon.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgephi.cli", "serve"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    daemon = None
    try:
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        ports = None
        while ports is None:
            if proc.poll() is not None:
                raise RuntimeError(f"daemon exited {proc.returncode} before listening:\n{log_path.read_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError("daemon did not start listening")
            time.sleep(0.1)
            ports = _read_ports(port_file)
        daemon = Daemon(proc, log_path, ports[0], ports[1], env)
        if wait_ready:
            with daemon.client() as c:
                while True:
                    if proc.poll() is not None:
                        raise RuntimeError(f"daemon exited {proc.returncode}:\n{daemon.log()[-5000:]}")
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"daemon not SERVING in {LOAD_TIMEOUT_S} s:\n{daemon.log()[-5000:]}")
                    with contextlib.suppress(grpc.RpcError):
                        status = c.health()
                        if not daemon.health_seen or daemon.health_seen[-1] != status:
                            daemon.health_seen.append(status)
                        if status == "SERVING":
                            break
                    time.sleep(0.2)
        yield daemon
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log.close()
