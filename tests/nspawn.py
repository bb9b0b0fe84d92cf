"""A real systemd (PID 1) in a systemd-nspawn guest, for tests.

The guest is the host's own ``/`` under a read-only overlay with a tmpfs upper layer: it boots in well
under a second, sees the host's files (the repo, ``/work/main/.venv``, ``/usr/bin/python3``), and every
change made in it (units, users, files) vanishes at teardown. See /work/shared/systemd-testing.md.

    from nspawn import Guest                       # tests/ is on sys.path under pytest

    with Guest(private_network=True) as g:
        g.install_unit(UNIT_TEXT, "demo.service")
        g.systemctl("start", "demo.service")
        assert g.show("demo.service", "ActiveState") == "active"
        g.in_netns(["grpcurl", "-plaintext", "127.0.0.1:50051", "list"])   # host binary, guest network

Pitfalls handled here: each guest gets its own cgroup directory (nspawn --keep-unit uses the caller's
cgroup); the guest's ``/tmp`` is a fresh tmpfs (host paths under /tmp need ``binds=``); systemd units the
host has enabled (postgresql, timers) are disabled in the overlay so boot stays fast and host ports stay
free; leftovers of a crashed earlier run are cleaned up on the next start. No systemd manager is ever
started outside nspawn, nothing is created under the host's /run/systemd, and only processes started
here (by recorded PID, checked against their start time) are ever killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import multiprocessing
import os
import pickle
import re
import shlex
import shutil
import signal
import subprocess
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "BASE_DIR",
    "Guest",
    "GuestCommandError",
    "NspawnError",
    "NspawnUnavailable",
    "available",
    "cleanup_stale",
    "edgephi_unit_text",
    "require",
]

T = TypeVar("T")

#: Host directory holding one subdirectory per guest (tmpfs + overlay mounts, console log, PID records).
BASE_DIR = Path("/run/edgephi-nspawn")
_CGROUP_FS = Path("/sys/fs/cgroup")
_REPO = Path(__file__).resolve().parent.parent
_GUEST_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
    "SYSTEMD_LOG_COLOR": "0",
    "TERM": "dumb",
}
# Host units whose enablement is dropped inside the guest (only the *.wants links in the overlay).
_HOST_WANTS_DIRS = ("multi-user.target.wants", "graphical.target.wants", "timers.target.wants")
_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9-]{0,40}$")
_counter = itertools.count(1)


class NspawnError(RuntimeError):
    """The guest could not be set up, booted or torn down."""


class NspawnUnavailable(NspawnError):
    """systemd-nspawn cannot run here (see :func:`available`)."""


class GuestCommandError(subprocess.CalledProcessError):
    """A command in the guest exited non-zero; str() includes its output."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n--- stdout ---\n{self.stdout or ''}\n--- stderr ---\n{self.stderr or ''}"


# --------------------------------------------------------------------------------------------------
# availability, stale cleanup


def available() -> str | None:
    """None if a guest can be booted here, else the reason why not."""
    if os.geteuid() != 0:
        return "not running as root (systemd-nspawn, mount and cgroups need it)"
    for tool in ("systemd-nspawn", "nsenter", "mount", "umount", "mountpoint"):
        if shutil.which(tool) is None:
            hint = " (apt-get install systemd-container; see scripts/ci-systemd-deps.sh)"
            return f"{tool} not found{hint if tool == 'systemd-nspawn' else ''}"
    if not Path("/usr/lib/systemd/systemd").exists():
        return "/usr/lib/systemd/systemd missing: the host's / cannot boot as a guest"
    try:
        filesystems = Path("/proc/filesystems").read_text()
    except OSError as e:
        return f"cannot read /proc/filesystems: {e}"
    if "overlay" not in filesystems and subprocess.run(["modprobe", "overlay"], capture_output=True).returncode:
        return "kernel has no overlay filesystem"
    if not _cgroup_hierarchies():
        return "no writable cgroup hierarchy found under /sys/fs/cgroup"
    return None


def require() -> None:
    """For tests: skip when no guest can run here, but FAIL in CI (CI=true), where one must run."""
    import pytest

    reason = available()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"systemd-nspawn guest unavailable in CI: {reason}", pytrace=False)
    pytest.skip(f"systemd-nspawn guest unavailable: {reason}")


def _cgroup_hierarchies() -> list[Path]:
    """The hierarchies a guest needs its own directory in: name=systemd and unified (hybrid), or the
    single cgroup2 mount (unified)."""
    if (_CGROUP_FS / "cgroup.controllers").exists():
        return [_CGROUP_FS]
    return [p for p in (_CGROUP_FS / "systemd", _CGROUP_FS / "unified") if (p / "cgroup.procs").exists()]


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks): tells a PID from a reused one."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start_time: str | None) -> bool:
    return start_time is not None and _start_time(pid) == start_time


def _is_mountpoint(path: Path) -> bool:
    return subprocess.run(["mountpoint", "-q", str(path)]).returncode == 0


def _umount(path: Path) -> None:
    for _ in range(50):
        if not _is_mountpoint(path):
            return
        if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
            continue
        time.sleep(0.1)
    if _is_mountpoint(path):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
    if _is_mountpoint(path):
        raise NspawnError(f"cannot unmount {path}")


def _cgroup_dirs(name: str) -> list[Path]:
    return [h / name for h in _cgroup_hierarchies()]


def _cgroup_procs(name: str) -> set[int]:
    """Host PIDs of every process in the guest's cgroup subtrees."""
    pids: set[int] = set()
    for top in _cgroup_dirs(name):
        if not top.exists():
            continue
        for dirpath, _dirs, files in os.walk(top):
            if "cgroup.procs" in files:
                with contextlib.suppress(OSError):
                    pids.update(int(x) for x in (Path(dirpath) / "cgroup.procs").read_text().split())
    return pids


def _remove_cgroups(name: str) -> None:
    for top in _cgroup_dirs(name):
        if not top.exists():
            continue
        for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda t: -t[0].count("/")):
            for _ in range(20):
                try:
                    os.rmdir(dirpath)
                    break
                except FileNotFoundError:
                    break
                except OSError:  # EBUSY while the last process is still being reaped
                    time.sleep(0.05)
            else:
                raise NspawnError(f"cannot remove cgroup {dirpath}: {sorted(_cgroup_procs(name))} in it")


def _read_record(d: Path, fname: str) -> list[tuple[int, str]]:
    """[(pid, start_time), …] from a record file written by _write_record."""
    try:
        words = (d / fname).read_text().split()
    except OSError:
        return []
    return [(int(words[i]), words[i + 1]) for i in range(0, len(words) - 1, 2)]


def _write_record(d: Path, fname: str, pids: Iterable[int]) -> None:
    (d / fname).write_text(" ".join(f"{p} {_start_time(p)}" for p in pids) + "\n")


def _teardown_dir(name: str) -> None:
    """Remove everything a guest called NAME left behind: its recorded processes (only those, by PID
    and start time), any process still in its cgroup directories, its mounts, cgroups and directory."""
    d = BASE_DIR / name
    for pid, st in _read_record(d, "pids"):  # nspawn first (it asks the guest to stop), then the leader
        if _alive(pid, st):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while (pids := _cgroup_procs(name)) and time.monotonic() < deadline:
        for pid in pids:  # processes in this guest's own cgroup: ours by construction
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    # What nspawn keeps on the host and leaves behind when killed (or, on a /run that is not a tmpfs,
    # even when not): its image lock (named after the root's device:inode) and propagation directory.
    nspawn_run = Path("/run/systemd/nspawn")
    root = d / "fs" / "root"
    if _is_mountpoint(root):
        root_stat = root.stat()
        with contextlib.suppress(FileNotFoundError):
            (nspawn_run / "locks" / f"inode-{root_stat.st_dev}:{root_stat.st_ino}").unlink()
    propagate = nspawn_run / "propagate" / name
    if propagate.exists():
        _umount(propagate)
        shutil.rmtree(propagate, ignore_errors=True)
    _umount(root)
    _umount(d / "fs")
    _remove_cgroups(name)
    shutil.rmtree(d, ignore_errors=True)


def cleanup_stale() -> list[str]:
    """Tear down the leftovers of guests whose owning process is gone (a killed test run). Returns
    their names."""
    cleaned: list[str] = []
    if not BASE_DIR.is_dir():
        return cleaned
    for d in BASE_DIR.iterdir():
        owner = _read_record(d, "owner")
        if owner and _alive(*owner[0]):
            continue
        with contextlib.suppress(OSError):  # a guest being set up right now has no owner record yet
            if not owner and time.time() - d.stat().st_mtime < 60:
                continue
        _teardown_dir(d.name)
        cleaned.append(d.name)
    return cleaned


def edgephi_unit_text(exec_start: str | None = None, path: Path | None = None) -> str:
    """The repo's systemd/edgephi.service, with ExecStart= replaced when exec_start is given (the one
    line a test needs to change)."""
    text = (path or _REPO / "systemd" / "edgephi.service").read_text()
    if exec_start is None:
        return text
    new, n = re.subn(r"(?m)^ExecStart=.*$", lambda _m: f"ExecStart={exec_start}", text)
    if n != 1:
        raise ValueError(f"expected exactly one ExecStart= line, found {n}")
    return new


# --------------------------------------------------------------------------------------------------
# setns for call_in_netns

_CLONE_NEWNET = 0x40000000


def _netns_child(netns_path: str, func: Callable[..., Any], args: tuple[Any, ...], conn: Any) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(netns_path, os.O_RDONLY)
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({netns_path}): {os.strerror(err)}")
        os.close(fd)
        result: tuple[bool, Any] = (True, func(*args))
    except BaseException as e:
        result = (False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    try:
        conn.send_bytes(pickle.dumps(result))
    except Exception as e:  # unpicklable result
        conn.send_bytes(pickle.dumps((False, f"result not picklable: {e}")))
    conn.close()


# --------------------------------------------------------------------------------------------------


class Guest:
    """A booted systemd-nspawn guest. Use as a context manager (or call start()/stop()).

    name:               machine name (default ``ephi-<pid>-<n>``); also its cgroup and BASE_DIR entry.
    private_network:    own network namespace with only ``lo``; reach it with in_netns()/call_in_netns().
    binds / rw_binds:   host paths made visible in the guest, read-only / writable. Each is ``"/path"``
                        or ``("/host/path", "/guest/path")``. Needed for host paths under /tmp (the
                        guest's /tmp is its own tmpfs); everything else of the host's / is visible
                        already (as a writable copy-on-write overlay).
    disable_host_units: drop the host's enabled services/timers (postgresql, apt-daily, …) from the
                        guest's boot: faster, and they do not grab host ports without private_network.
    boot_timeout:       seconds to reach ``running``/``degraded``.
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        private_network: bool = False,
        binds: Sequence[str | tuple[str, str]] = (),
        rw_binds: Sequence[str | tuple[str, str]] = (),
        disable_host_units: bool = True,
        boot_timeout: float = 30.0,
        tmpfs_size: str = "4G",
        nspawn_args: Sequence[str] = (),
    ) -> None:
        self.name = name or f"ephi-{os.getpid()}-{next(_counter)}"
        if not _NAME_RE.match(self.name):
            raise ValueError(f"bad guest name {self.name!r} (letters, digits, '-', at most 41)")
        self.private_network = private_network
        self.binds = list(binds)
        self.rw_binds = list(rw_binds)
        self.disable_host_units = disable_host_units
        self.boot_timeout = boot_timeout
        self.tmpfs_size = tmpfs_size
        self.nspawn_args = list(nspawn_args)
        self.dir = BASE_DIR / self.name
        #: host path of the guest's root directory (the overlay); files under /tmp, /run, /dev and
        #: /proc of the guest are NOT here (the guest mounts its own), use write_file()/read_file().
        self.root = self.dir / "fs" / "root"
        self.console_path = self.dir / "console.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._leader: int | None = None
        #: seconds from launching nspawn to ``is-system-running`` answering running/degraded
        self.boot_seconds: float | None = None
        #: what ``is-system-running --wait`` said (``running`` or ``degraded``)
        self.boot_state: str | None = None
        #: the console output, kept after teardown (for failure messages)
        self.console_log = ""

    # ---- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> Guest:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def leader(self) -> int:
        """Host PID of the guest's systemd (PID 1 inside)."""
        if self._leader is None:
            raise NspawnError(f"guest {self.name} is not running")
        return self._leader

    @property
    def nspawn_pid(self) -> int:
        if self._proc is None:
            raise NspawnError(f"guest {self.name} is not running")
        return self._proc.pid

    def start(self) -> None:
        reason = available()
        if reason is not None:
            raise NspawnUnavailable(reason)
        cleanup_stale()
        if self.dir.exists():
            raise NspawnError(f"guest {self.name} already exists (owned by a live process)")
        try:
            self._setup()
            self._boot()
        except BaseException:
            self.stop()
            raise

    def _setup(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _write_record(self.dir, "owner", [os.getpid()])
        fs = self.dir / "fs"
        fs.mkdir(exist_ok=True)
        if not _is_mountpoint(fs):
            _check(["mount", "-t", "tmpfs", "-o", f"size={self.tmpfs_size},mode=0755", "tmpfs", str(fs)])
        for sub in ("upper", "work", "root"):
            (fs / sub).mkdir(exist_ok=True)
        if not _is_mountpoint(self.root):
            opts = f"lowerdir=/,upperdir={fs / 'upper'},workdir={fs / 'work'}"
            _check(["mount", "-t", "overlay", "overlay", "-o", opts, str(self.root)])
        if self.disable_host_units:
            for wants in _HOST_WANTS_DIRS:
                d = self.root / "etc/systemd/system" / wants
                if d.is_dir():
                    for link in d.iterdir():
                        if link.is_symlink() and not link.name.endswith(".target"):
                            link.unlink()  # a whiteout in the upper layer; the host is untouched
        for cg in _cgroup_dirs(self.name):
            cg.mkdir(exist_ok=True)

    def _nspawn_cmd(self) -> list[str]:
        cmd = [
            "systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--console=passive",
            "-M", self.name, "-D", str(self.root),
        ]  # fmt: skip
        if self.private_network:
            cmd.append("--private-network")
        for opt, binds in (("--bind-ro", self.binds), ("--bind", self.rw_binds)):
            for b in binds:
                src, dst = (b, b) if isinstance(b, str) else b
                cmd.append(f"{opt}={src}:{dst}")
        cmd += self.nspawn_args
        cmd.append("-b")
        return cmd

    def _boot(self) -> None:
        cgprocs = " ".join(str(cg / "cgroup.procs") for cg in _cgroup_dirs(self.name))
        # The shell moves itself into the guest's own cgroups, then becomes nspawn (same PID).
        script = 'for f in $EPHI_CGPROCS; do echo $$ > "$f" || exit 97; done; exec "$@"'
        t0 = time.monotonic()
        with open(self.console_path, "wb") as console:
            self._proc = subprocess.Popen(
                ["/bin/sh", "-c", script, "sh", *self._nspawn_cmd()],
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                start_new_session=True, env={**_GUEST_ENV, "EPHI_CGPROCS": cgprocs},
            )  # fmt: skip
        _write_record(self.dir, "pids", [self._proc.pid])
        deadline = t0 + self.boot_timeout
        # LEADER = nspawn's child once it has exec'd systemd (an intermediate child comes first).
        while self._leader is None:
            self._raise_if_exited("before systemd started")
            for child in _children(self._proc.pid):
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                        self._leader = child
            if self._leader is None:
                if time.monotonic() > deadline:
                    raise NspawnError(f"guest {self.name}: no systemd after {self.boot_timeout}s" + self._tail())
                time.sleep(0.01)
        _write_record(self.dir, "pids", [self._proc.pid, self._leader])
        # Until systemd has its private socket up, systemctl fails: retry.
        while True:
            self._raise_if_exited("while booting")
            left = deadline - time.monotonic()
            if left <= 0:
                raise NspawnError(f"guest {self.name}: not booted after {self.boot_timeout}s" + self._tail())
            try:
                r = self.run(["systemctl", "is-system-running", "--wait"], check=False, timeout=left)
            except subprocess.TimeoutExpired:
                continue
            state = r.stdout.strip()
            if state in ("running", "degraded"):
                self.boot_state = state
                break
            time.sleep(0.02)
        self.boot_seconds = time.monotonic() - t0

    def _raise_if_exited(self, when: str) -> None:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise NspawnError(f"systemd-nspawn for {self.name} exited ({self._proc.returncode}) {when}" + self._tail())

    def _tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n--- console ---\n" + self.console_path.read_text(errors="replace")[-4000:]
        return ""

    def stop(self, timeout: float = 15.0) -> None:
        """Power the guest off and remove every trace of it. Idempotent; never raises for a guest that
        is already gone, raises NspawnError if something could not be cleaned up."""
        proc, self._proc = self._proc, None
        leader, self._leader = self._leader, None
        if proc is not None:
            if proc.poll() is None and leader is not None:
                with contextlib.suppress(Exception):
                    subprocess.run(
                        ["nsenter", "-t", str(leader), "-a", "systemctl", "poweroff", "--no-block"],
                        env=_GUEST_ENV, capture_output=True, timeout=5,
                    )  # fmt: skip
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                # nspawn forwards SIGTERM to the guest as a poweroff request; then force.
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    if leader is not None:  # PID 1 of the guest: killing it ends every guest process
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(leader, signal.SIGKILL)
                    proc.kill()
                    proc.wait(timeout=10)
        with contextlib.suppress(OSError):
            self.console_log = self.console_path.read_text(errors="replace")
        if self.dir.exists():
            _teardown_dir(self.name)
        else:
            _remove_cgroups(self.name)

    # ---- commands ----------------------------------------------------------------------------------

    def command(self, cmd: str | Sequence[str]) -> list[str]:
        """argv running CMD in all of the guest's namespaces (a str goes through /bin/sh -c)."""
        argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        return ["nsenter", "-t", str(self.leader), "-a", *argv]

    def run(
        self,
        cmd: str | Sequence[str],
        *,
        check: bool = True,
        timeout: float | None = 30.0,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run CMD inside the guest (as root, in its mount/pid/net/… namespaces); text output."""
        argv = self.command(cmd)
        r = subprocess.run(
            argv, input=input, capture_output=True, text=True, timeout=timeout,
            env={**_GUEST_ENV, **(env or {})},
        )  # fmt: skip
        if check and r.returncode != 0:
            raise GuestCommandError(r.returncode, argv, r.stdout, r.stderr)
        return r

    def systemctl(self, *args: str, check: bool = True, timeout: float | None = 30.0) -> str:
        """``systemctl --no-pager ARGS`` in the guest; returns stdout."""
        return self.run(["systemctl", "--no-pager", *args], check=check, timeout=timeout).stdout

    def show(self, unit: str, prop: str) -> str:
        """One property of a unit (``systemctl show -p PROP --value UNIT``)."""
        return self.systemctl("show", "-p", prop, "--value", unit).rstrip("\n")

    def props(self, unit: str, *props: str) -> dict[str, str]:
        """Several properties at once, as a dict."""
        out = self.systemctl("show", *(f"--property={p}" for p in props), unit)
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(
        self, unit: str | None = None, *, since: str | None = None, output: str = "short-precise",
        args: Sequence[str] = (),
    ) -> str:  # fmt: skip
        """The guest's journal (``journalctl -u UNIT``); since: a journalctl time (``-10s``, a date)."""
        cmd = ["journalctl", "--no-pager", "-q", "-o", output]
        if unit:
            cmd += ["-u", unit]
        if since:
            cmd += ["--since", since]
        return self.run([*cmd, *args]).stdout

    def journal_entries(self, unit: str | None = None, *, args: Sequence[str] = ()) -> list[dict[str, Any]]:
        """Journal entries as dicts (``-o json``): MESSAGE, _PID, __MONOTONIC_TIMESTAMP (µs, the host's
        CLOCK_MONOTONIC: compare with time.monotonic()*1e6 or *TimestampMonotonic properties)."""
        return [json.loads(line) for line in self.journal(unit, output="json", args=args).splitlines()]

    def write_file(self, path: str, data: str | bytes, mode: int = 0o644, owner: str | None = None) -> None:
        """Write a file in the guest (parents created), through the guest so /run, /tmp work too."""
        raw = data.encode() if isinstance(data, str) else data
        script = 'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod "$2" "$1"'
        if owner:
            script += ' && chown "$3" "$1"'
        argv = self.command(["/bin/sh", "-c", script, "sh", path, f"{mode:o}", owner or ""])
        r = subprocess.run(argv, input=raw, capture_output=True, env=_GUEST_ENV, timeout=30)
        if r.returncode:
            raise GuestCommandError(r.returncode, argv, r.stdout.decode(), r.stderr.decode())

    def read_file(self, path: str) -> str:
        return self.run(["cat", path]).stdout

    def exists(self, path: str) -> bool:
        return self.run(["test", "-e", path], check=False).returncode == 0

    def install_unit(self, text: str, name: str, *, reload: bool = True) -> None:
        """Write /etc/systemd/system/NAME in the guest and daemon-reload."""
        self.write_file(f"/etc/systemd/system/{name}", text)
        if reload:
            self.systemctl("daemon-reload")

    def ensure_user(self, user: str, *, home: str = "/nonexistent") -> None:
        """Create a system user+group in the guest if missing (e.g. ``edgephi`` for its unit)."""
        if self.run(["getent", "passwd", user], check=False).returncode == 0:
            return
        self.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", home,
                  "--shell", "/usr/sbin/nologin", user])  # fmt: skip

    def expose_host_venv(self, venv: str | Path = _REPO / ".venv") -> str:
        """Let non-root service users (``User=edgephi``) run the host's venv in the guest: its python
        links into /root/.pyenv and /root is 0700, so give every ancestor directory o+x (in the
        guest's overlay only). Returns the venv's bin/python path. The unit's ProtectHome=read-only
        keeps /root visible; ProtectHome=yes would hide it."""
        python = Path(venv) / "bin" / "python"
        dirs: set[Path] = set()
        for target in (python, python.resolve()):
            dirs.update(p for p in target.parents if p != Path("/"))
        self.run(["chmod", "o+x", *sorted(map(str, dirs))])
        return str(python)

    def pids_of(self, unit: str) -> list[int]:
        """PIDs (as the guest numbers them) of every process in UNIT's cgroup."""
        cg = self.show(unit, "ControlGroup")
        if not cg:
            return []
        return sorted(int(p) for p in self._read_guest_procs(cg).split())

    def host_pids_of(self, unit: str) -> list[int]:
        """Host PIDs of every process in UNIT's cgroup (for /proc/PID inspection from the host)."""
        cg = self.show(unit, "ControlGroup")
        pids: set[int] = set()
        if cg:
            for top in _cgroup_dirs(self.name):
                with contextlib.suppress(OSError):
                    pids |= {int(p) for p in (top / "payload" / cg.lstrip("/") / "cgroup.procs").read_text().split()}
        return sorted(pids)

    def host_pids(self) -> list[int]:
        """Host PIDs of every process of this guest (nspawn itself included)."""
        return sorted(_cgroup_procs(self.name))

    def _read_guest_procs(self, cg: str) -> str:
        script = (
            'for h in unified systemd ""; do f="/sys/fs/cgroup/$h$1/cgroup.procs"; '
            '[ -r "$f" ] && exec cat "$f"; done; exit 0'
        )
        return self.run(["/bin/sh", "-c", script, "sh", cg]).stdout

    # ---- waiting ----------------------------------------------------------------------------------------

    @staticmethod
    def wait_for(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05, what: str = "") -> T:
        """Poll PREDICATE until it returns something truthy; return that. TimeoutError after TIMEOUT."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}")
            time.sleep(interval)

    def wait_state(self, unit: str, active_state: str, timeout: float = 10.0, sub_state: str | None = None) -> None:
        """Wait until UNIT's ActiveState (and SubState, if given) are as asked."""

        def ok() -> bool:
            p = self.props(unit, "ActiveState", "SubState")
            return p.get("ActiveState") == active_state and (sub_state is None or p.get("SubState") == sub_state)

        self.wait_for(ok, timeout, what=f"{unit} {active_state}/{sub_state or '*'}")

    # ---- reaching a --private-network guest ------------------------------------------------------------

    @property
    def netns_path(self) -> str:
        return f"/proc/{self.leader}/ns/net"

    def netns_command(self, cmd: Sequence[str]) -> list[str]:
        """argv running a HOST command (host files, host venv) in the guest's network namespace."""
        return ["nsenter", f"--net={self.netns_path}", "--", *cmd]

    def in_netns(self, cmd: Sequence[str], *, check: bool = True, timeout: float | None = 60.0,
                 **kwargs: Any) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """subprocess.run of a host command inside the guest's network namespace (text output)."""
        kwargs.setdefault("capture_output", True)
        return subprocess.run(self.netns_command(cmd), check=check, timeout=timeout, text=True, **kwargs)

    def popen_in_netns(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """subprocess.Popen of a host command inside the guest's network namespace."""
        return subprocess.Popen(self.netns_command(cmd), **kwargs)

    def call_in_netns(self, func: Callable[..., T], *args: Any, timeout: float = 60.0) -> T:
        """Call FUNC(*ARGS) in a forked child that joined the guest's network namespace (e.g. a gRPC
        client reaching 127.0.0.1:50051 inside the guest); returns its (picklable) result, re-raises
        its failure as NspawnError. Create channels/sockets inside FUNC, not before."""
        ctx = multiprocessing.get_context("fork")
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_netns_child, args=(self.netns_path, func, args, child), daemon=True)
        p.start()
        child.close()
        try:
            if not parent.poll(timeout):
                raise TimeoutError(f"call_in_netns({func!r}) took more than {timeout}s")
            ok, value = pickle.loads(parent.recv_bytes())
        finally:
            if p.is_alive():
                p.kill()
            p.join(5)
            parent.close()
        if not ok:
            raise NspawnError(f"call_in_netns({getattr(func, '__name__', func)}) failed: {value}")
        return value  # type: ignore[no-any-return]


# --------------------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _check(argv: list[str]) -> None:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode:
        raise NspawnError(f"{shlex.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
