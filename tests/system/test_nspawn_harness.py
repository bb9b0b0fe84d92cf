"""The systemd-nspawn harness (tests/nspawn.py) against a real systemd 252: sd_notify READY/WATCHDOG,
watchdog kill + restart, private networking, clean teardown and stale-leftover cleanup.

Skips where no guest can run (not root, no systemd-container) but FAILS when CI=true: CI runs as root
and installs systemd-container (scripts/ci-systemd-deps.sh), so a skip there would hide a broken setup.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    from tests import nspawn
except ImportError:  # tests/ itself is on sys.path (pytest's rootdir-less "prepend" import mode)
    import nspawn  # type: ignore[import-not-found,no-redef]

Guest = nspawn.Guest

IN_CI = os.environ.get("CI", "").lower() in ("true", "1", "yes")

# A Type=notify service in ~40 lines of stdlib Python: READY=1 after a "load" longer than WatchdogSec,
# then WATCHDOG=1 every WATCHDOG_USEC/2 until SIGUSR1 stops the pings. Each ping's CLOCK_MONOTONIC
# (the clock of the journal's __MONOTONIC_TIMESTAMP, there is no time namespace) goes to a file.
NOTIFY_SCRIPT = textwrap.dedent(
    """\
    import os, signal, socket, sys, time

    def notify(msg):
        addr = os.environ["NOTIFY_SOCKET"]
        if addr.startswith("@"):
            addr = "\\0" + addr[1:]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(msg.encode())

    pinging = True
    def stop_pinging(signum, frame):
        global pinging
        pinging = False
    signal.signal(signal.SIGUSR1, stop_pinging)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))

    notify("STATUS=loading")
    time.sleep(float(sys.argv[1]))
    notify("READY=1\\nSTATUS=serving")
    assert int(os.environ["WATCHDOG_PID"]) == os.getpid()
    interval = int(os.environ["WATCHDOG_USEC"]) / 2e6
    record = os.path.join(os.environ["STATE_DIRECTORY"], f"last-ping-{os.getpid()}")
    while True:
        if pinging:
            notify("WATCHDOG=1")
            with open(record + ".tmp", "w") as f:
                f.write(repr(time.monotonic()))
            os.replace(record + ".tmp", record)
        time.sleep(interval)
    """
)

PRE_READY_S = 1.5  # longer than WatchdogSec: the watchdog is armed only from READY=1 on
WATCHDOG_S = 1
UNIT = textwrap.dedent(
    f"""\
    [Unit]
    Description=nspawn harness test: sd_notify READY + watchdog

    [Service]
    Type=notify
    NotifyAccess=main
    ExecStart=/usr/bin/python3 /opt/wdtest/notify.py {PRE_READY_S}
    WatchdogSec={WATCHDOG_S}
    Restart=on-failure
    RestartSec=100ms
    StateDirectory=wdtest
    LimitCORE=0
    """
)


def _stamp(entries: list[dict[str, object]], needle: str) -> list[float]:
    """CLOCK_MONOTONIC seconds of the journal entries whose MESSAGE contains NEEDLE."""
    return [int(str(e["__MONOTONIC_TIMESTAMP"])) / 1e6 for e in entries if needle in str(e.get("MESSAGE", ""))]


@pytest.fixture(scope="module")
def guest() -> Iterator[nspawn.Guest]:
    nspawn.require()
    with Guest(private_network=True) as g:
        yield g


def test_nspawn_is_available_in_ci() -> None:
    """Never skipped: in CI the harness must be usable."""
    reason = nspawn.available()
    if IN_CI:
        assert reason is None, f"CI=true but no systemd-nspawn guest can run: {reason}"
    elif reason is not None:
        pytest.skip(reason)


def test_require_fails_in_ci_and_skips_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nspawn, "available", lambda: "no systemd-nspawn (simulated)")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="simulated"):
        nspawn.require()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="simulated"):
        nspawn.require()


@pytest.mark.systemd
def test_boot(guest: nspawn.Guest) -> None:
    assert guest.boot_state == "running", guest.systemctl("--failed", check=False)
    assert guest.boot_seconds is not None and guest.boot_seconds < 10
    assert guest.run(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"
    assert guest.run(["systemd-detect-virt", "--container"], check=False).stdout.strip() == "systemd-nspawn"
    # the host's enabled services stay out of the guest; the repo's venv is visible
    assert "postgresql" not in guest.systemctl("list-units", "--type=service", "--state=active")
    assert guest.exists(str(Path(sys.executable)))
    print(f"\nguest boot: {guest.boot_seconds:.2f} s")


@pytest.mark.systemd
def test_notify_ready_then_watchdog_kill_and_restart(guest: nspawn.Guest) -> None:
    unit = "wdtest.service"
    guest.write_file("/opt/wdtest/notify.py", NOTIFY_SCRIPT, 0o755)
    guest.install_unit(UNIT, unit)

    t0 = time.monotonic()
    guest.systemctl("start", unit)  # blocks until READY=1
    start_s = time.monotonic() - t0
    p = guest.props(unit, "ActiveState", "SubState", "StatusText", "NRestarts", "MainPID", "WatchdogUSec")
    assert (p["ActiveState"], p["SubState"], p["StatusText"]) == ("active", "running", "serving"), p
    assert start_s >= PRE_READY_S, f"systemctl start returned {start_s:.2f} s in, before READY=1"
    # no watchdog during the (longer than WatchdogSec) load before READY=1
    assert p["NRestarts"] == "0" and p["WatchdogUSec"] == f"{WATCHDOG_S}s", p
    first_pid = int(p["MainPID"])
    assert guest.pids_of(unit) == [first_pid]
    assert len(guest.host_pids_of(unit)) == 1

    # pings keep it alive past WatchdogSec
    time.sleep(WATCHDOG_S * 1.3)
    assert guest.props(unit, "NRestarts", "MainPID") == {"NRestarts": "0", "MainPID": str(first_pid)}

    guest.systemctl("kill", "--kill-who=main", "--signal=SIGUSR1", unit)
    guest.wait_for(lambda: guest.show(unit, "NRestarts") == "1", timeout=10, what="a watchdog restart")
    guest.wait_state(unit, "active", sub_state="running", timeout=10)  # READY again after the reload
    second_pid = int(guest.show(unit, "MainPID"))
    assert second_pid != first_pid

    def both_starts_journaled() -> list[dict[str, object]]:
        entries = guest.journal_entries(unit)
        return entries if len(_stamp(entries, "Started ")) == 2 else []

    entries = guest.wait_for(both_starts_journaled, timeout=5, what="the journal of both starts")
    text = "\n".join(str(e.get("MESSAGE")) for e in entries)
    assert "Watchdog timeout" in text and "Failed with result 'watchdog'" in text, text
    assert "Killing process" in text and "SIGABRT" in text, text
    last_ping = float(guest.read_file(f"/var/lib/wdtest/last-ping-{first_pid}"))
    (watchdog_at,) = _stamp(entries, "Watchdog timeout")
    restarted_at = _stamp(entries, "Started ")[-1]
    kill_latency = watchdog_at - last_ping
    back_after = restarted_at - watchdog_at
    print(f"\nwatchdog: SIGABRT {kill_latency:.2f} s after the last ping (WatchdogSec={WATCHDOG_S}), "
          f"READY again {back_after:.2f} s later (RestartSec=100ms + {PRE_READY_S} s load); "
          f"systemctl start took {start_s:.2f} s")  # fmt: skip
    assert WATCHDOG_S * 0.9 <= kill_latency <= WATCHDOG_S + 1.0
    assert back_after < PRE_READY_S + 3

    guest.systemctl("stop", unit)
    assert guest.props(unit, "ActiveState", "Result") == {"ActiveState": "inactive", "Result": "success"}
    assert guest.pids_of(unit) == []


@pytest.mark.systemd
def test_private_network_reached_through_netns(guest: nspawn.Guest) -> None:
    # a listener on the guest's 127.0.0.1, started as a transient unit
    guest.run(["systemd-run", "--unit=echo-listener", "--property=Type=exec", "/usr/bin/python3", "-c",
               "import socket; s=socket.create_server(('127.0.0.1', 47011)); c,_=s.accept(); "
               "c.sendall(b'hello from the guest'); c.close()"])  # fmt: skip

    def fetch() -> bytes:
        with socket.create_connection(("127.0.0.1", 47011), timeout=5) as s:
            return s.recv(100)

    def connect_when_listening() -> bytes | None:
        try:
            return guest.call_in_netns(fetch, timeout=10)
        except nspawn.NspawnError:
            return None

    assert guest.wait_for(connect_when_listening, timeout=10, what="the guest listener") == b"hello from the guest"
    # the host's own network does not have it
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", 47011), timeout=1).close()
    # a host command in the guest's netns sees only lo
    out = guest.in_netns(["cat", "/proc/net/dev"]).stdout
    assert [ln.split(":")[0].strip() for ln in out.splitlines()[2:]] == ["lo"]


@pytest.mark.systemd
def test_teardown_leaves_nothing(tmp_path: Path) -> None:
    nspawn.require()
    (tmp_path / "hello").write_text("from the host's /tmp")
    g = Guest(binds=[(str(tmp_path), "/mnt/hosttmp")])
    with g:
        assert g.read_file("/mnt/hosttmp/hello") == "from the host's /tmp"
        assert g.run("touch /mnt/hosttmp/x", check=False).returncode != 0  # --bind-ro
        g.write_file("/etc/edgephi-harness-marker", "guest only")
        g.run(["systemd-run", "--unit=sleeper", "/bin/sleep", "300"])
        host_pids = g.host_pids()
        leader, nspawn_pid, root = g.leader, g.nspawn_pid, g.root
        assert leader in host_pids and nspawn_pid in host_pids and len(host_pids) >= 4
    _assert_gone(g.name, host_pids, root)
    assert not Path("/etc/edgephi-harness-marker").exists()
    assert "Powering off" in g.console_log  # the guest's console, kept after teardown
    g.stop()  # idempotent


def _running(pid: int) -> bool:
    """Exists and is not a zombie (an orphan whose reaper is slow still counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _assert_gone(name: str, pids: list[int], root: Path) -> None:
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(nspawn.BASE_DIR / name) not in mounts
    assert not (nspawn.BASE_DIR / name).exists()
    assert not root.exists()
    assert not (Path("/run/systemd/nspawn/propagate") / name).exists()
    assert not Path("/run/systemd/system").exists()  # never on the host
    for h in ("systemd", "unified", ""):
        assert not (Path("/sys/fs/cgroup") / h / name).exists()
    alive = [p for p in pids if _running(p)]
    assert not alive, f"left running: {alive}"
    # nothing anywhere on the host is still in a cgroup of this guest
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and _running(int(proc.name)):
            try:
                cg = (proc / "cgroup").read_text()
            except OSError:
                continue
            assert f"/{name}/" not in cg and not cg.rstrip().endswith(f"/{name}"), (proc.name, cg)


@pytest.mark.systemd
def test_stale_guest_of_a_killed_run_is_cleaned_up() -> None:
    """A test run killed mid-way leaves a booted guest; the next start (cleanup_stale) removes it."""
    nspawn.require()
    name = f"ephi-stale-{os.getpid()}"
    here = str(Path(nspawn.__file__).parent)
    code = (f"import sys, os; sys.path.insert(0, {here!r}); import nspawn; g = nspawn.Guest({name!r}); "
            "g.start(); print(g.leader, g.nspawn_pid, flush=True); os._exit(0)")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    leader, nspawn_pid = map(int, r.stdout.split())
    assert Path(f"/proc/{leader}").exists(), "the orphaned guest should still be running"
    pids = sorted(nspawn._cgroup_procs(name))
    cleaned = nspawn.cleanup_stale()
    assert name in cleaned or not (nspawn.BASE_DIR / name).exists()  # (or a concurrent run cleaned it)
    _assert_gone(name, [*pids, leader, nspawn_pid], nspawn.BASE_DIR / name / "fs" / "root")
