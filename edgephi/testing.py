"""Test and benchmark support shipped with the package: the real ``edgephi serve`` daemon as a subprocess on
127.0.0.1 port 0 (:func:`run_daemon`), used by tests/ and benchmarks/ alike.

Importing this module does not import the gRPC stubs (``edgephi.v1``): the benchmarks import it before they
have made sure the stubs import on the machine they run on."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgephi.client import Client

# vLLM's CPU build with a tiny model loads in ~20-60 s on 2 cores (slower while other work runs).
LOAD_TIMEOUT_S = 300.0
SETTINGS_OVERRIDE = "EDGEPHI_TEST_DAEMON_SETTINGS"
# The test daemons' engine settings: small context, a 1 GiB CPU KV cache, no CUDA graphs (fast start).
TEST_DEFAULTS: dict[str, str] = {
    "EDGEPHI_MAX_MODEL_LEN": "2048",
    "EDGEPHI_KV_CACHE_SPACE_GIB": "1",
    "EDGEPHI_ENFORCE_EAGER": "true",
}


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    log_path: Path
    port: int
    metrics_port: int | None
    env: dict[str, str]
    health_seen: list[str] = field(default_factory=list)
    listen_s: float = float("nan")  # seconds from the start of the process to its port file
    ready_s: float | None = None  # ... to health SERVING (None without wait_ready)

    def client(self, **kw: object) -> Client:
        from edgephi.client import Client, Connection

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
        """Send ``sig`` (SIGKILL to the whole session past ``timeout``); return the exit code."""
        return stop_process(self.proc, sig, timeout)

    def kill_leftovers(self) -> None:
        """SIGKILL whatever is left of the daemon's session (vLLM's engine-core and workers) once it exited."""
        kill_session(self.proc.pid)


def kill_session(pid: int) -> None:
    """SIGKILL the session (process group) ``pid`` leads, if anything of it is left."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
    """Send ``sig`` to a process started with ``start_new_session=True`` unless it has exited; past ``timeout``,
    SIGKILL its whole session. Returns its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_session(proc.pid)
            proc.wait(10)
    return int(proc.returncode)


def settings_env(settings: Mapping[str, object]) -> dict[str, str]:
    """``EDGEPHI_*`` variables from settings (``max_model_len=2048`` → ``EDGEPHI_MAX_MODEL_LEN=2048``): None is
    left out, booleans become true/false, dicts and lists JSON."""
    out = {}
    for k, v in settings.items():
        if v is None:
            continue
        if isinstance(v, bool):
            text = "true" if v else "false"
        elif isinstance(v, dict | list):
            text = json.dumps(v)
        else:
            text = str(v)
        out[f"EDGEPHI_{k.upper()}"] = text
    return out


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


def _wait_serving(daemon: Daemon, deadline: float, timeout: float) -> None:
    import grpc

    proc = daemon.proc
    with daemon.client() as c:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"daemon exited {proc.returncode}:\n{daemon.log()[-5000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"daemon not SERVING in {timeout:.0f} s:\n{daemon.log()[-5000:]}")
            with contextlib.suppress(grpc.RpcError):
                status = c.health(timeout=2.0)
                if not daemon.health_seen or daemon.health_seen[-1] != status:
                    daemon.health_seen.append(status)
                if status == "SERVING":
                    return
            time.sleep(0.2)


@contextlib.contextmanager
def run_daemon(
    model: Path,
    workdir: Path,
    *,
    wait_ready: bool = True,
    test_defaults: bool = True,
    extra_env: Mapping[str, str] | None = None,
    log_name: str = "daemon",
    ready_timeout_s: float = LOAD_TIMEOUT_S,
    on_spawn: Callable[[subprocess.Popen[bytes]], object] | None = None,
    **settings: object,
) -> Iterator[Daemon]:
    """Run ``edgephi serve`` on ``model``; yields once health is ``SERVING`` (or once listening if not wait_ready).

    ``settings`` become ``EDGEPHI_<NAME>`` variables (see :func:`settings_env`), over the test daemons' engine
    settings (:data:`TEST_DEFAULTS`, changed by ``$EDGEPHI_TEST_DAEMON_SETTINGS``) unless ``test_defaults`` is
    false (the benchmarks: only the settings given). The environment is this process's without its ``EDGEPHI_*``
    variables, plus ``extra_env``. The log is ``workdir/<log_name>.log``; ``on_spawn`` is called with the process
    as soon as it is started. The daemon gets SIGTERM on exit (then SIGKILL to its session).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / f"{log_name}.ports.json"
    port_file.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPHI_")}
    env.update(extra_env or {})
    env.update(
        {
            "EDGEPHI_MODEL": str(model),
            "EDGEPHI_PORT": "0",
            "EDGEPHI_METRICS_PORT": "0",
            "EDGEPHI_PORT_FILE": str(port_file),
            "PYTHONUNBUFFERED": "1",
        }
    )
    if test_defaults:
        env.update(TEST_DEFAULTS)
        env.update(_settings_override(os.environ.get(SETTINGS_OVERRIDE, "")))
    env.update(settings_env(settings))
    log_path = workdir / f"{log_name}.log"
    with log_path.open("wb") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgephi.cli", "serve"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            if on_spawn is not None:
                on_spawn(proc)
            deadline = t0 + ready_timeout_s
            ports = None
            while ports is None:
                if proc.poll() is not None:
                    raise RuntimeError(f"daemon exited {proc.returncode} before listening:\n{log_path.read_text()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"daemon did not start listening in {ready_timeout_s:.0f} s")
                time.sleep(0.1)
                ports = _read_ports(port_file)
            daemon = Daemon(proc, log_path, ports[0], ports[1], env, listen_s=time.monotonic() - t0)
            if wait_ready:
                _wait_serving(daemon, deadline, ready_timeout_s)
                daemon.ready_s = time.monotonic() - t0
            yield daemon
        finally:
            stop_process(proc)
