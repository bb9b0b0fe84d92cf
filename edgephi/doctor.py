"""``edgephi doctor``: can this box serve, and if not, why — one line per check, each with the fix.

Checks: configuration, GPU + driver + compute capability (NVML), device and host memory against the
preflight model of :mod:`edgephi.preflight`, disk, artifact (present, loadable shape, manifest digests), its chat
format (does a turn end on ``<|im_end|>``: :mod:`edgephi.artifacts.chat_format`, files only; ``edgephi verify
--chat`` runs a real chat), the systemd unit, and the gRPC port.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psutil

from edgephi import preflight
from edgephi.config import ConfigError, Settings, load_settings

GiB = 2**30
# vLLM's 4-bit GPTQ kernels: Marlin needs compute capability >= 8.0 (Ampere); Machete >= 9.0 (Hopper).
MIN_COMPUTE_CAPABILITY = (8, 0)
UNIT = "edgephi.service"


@dataclass
class Check:
    name: str
    ok: bool | None  # None = not applicable / informational
    detail: str
    fix: str = ""

    def line(self) -> str:
        mark = {True: "ok  ", False: "FAIL", None: "--  "}[self.ok]
        return f"[{mark}] {self.name}: {self.detail}" + (f"\n        fix: {self.fix}" if self.fix else "")


def run_checks(env_file: Path | None, cpu_only: bool = False) -> list[Check]:
    checks: list[Check] = []
    try:
        settings = load_settings(env_file)
        checks.append(Check("config", True, f"valid ({env_file or 'environment'})"))
    except ConfigError as exc:
        checks.append(Check("config", False, str(exc), "correct the named setting in the env file"))
        settings = Settings.model_construct()  # defaults, without reading the invalid environment again
    checks.extend(_gpu(cpu_only))
    checks.append(_artifact(settings))
    checks.append(_chat_format(settings))
    checks.append(_memory(settings))
    checks.append(_disk(settings))
    checks.append(_unit())
    checks.append(_port(settings))
    return checks


def _gpu(cpu_only: bool) -> list[Check]:
    if cpu_only:
        return [Check("gpu", None, "skipped: --cpu-only (vLLM CPU backend)")]
    try:
        import pynvml
    except ImportError:
        return [Check("gpu", False, "nvidia-ml-py is not installed", "pip install 'edgephi[gpu]'")]
    try:
        pynvml.nvmlInit()
    except Exception as exc:
        return [Check("gpu", False, f"NVML unavailable: {exc}", "install the NVIDIA driver (nvidia-smi must work)")]
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        checks = [Check("driver", True, f"NVIDIA driver {driver}")]
        count = int(pynvml.nvmlDeviceGetCount())
        if count == 0:
            return [*checks, Check("gpu", False, "NVML sees no GPU", "check that `nvidia-smi` lists the GPU")]
        for index in range(count):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else str(name)
            cc = tuple(pynvml.nvmlDeviceGetCudaComputeCapability(handle))
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            ok = cc >= MIN_COMPUTE_CAPABILITY
            checks.append(
                Check(
                    "gpu" if count == 1 else f"gpu {index}",
                    ok,
                    f"{name}, compute capability {cc[0]}.{cc[1]}, VRAM {int(memory.total) // 2**20} MiB total, "
                    f"{int(memory.free) // 2**20} MiB free",
                    "" if ok else "vLLM's int4 (Marlin) kernels need compute capability >= 8.0",
                )
            )
        return checks
    finally:
        pynvml.nvmlShutdown()


def _artifact(settings: Settings) -> Check:
    model = Path(settings.model)
    if not model.exists():
        return Check(
            "artifact",
            False,
            f"{model} does not exist",
            "run `edgephi quantize` or `edgephi fetch`, or set EDGEPHI_MODEL",
        )
    try:
        shape = preflight.read_shape(model.resolve())
    except ConfigError as exc:
        return Check("artifact", False, str(exc), "point EDGEPHI_MODEL at a complete artifact")
    manifest = model / "manifest.json"
    if not manifest.is_file():
        return Check("artifact", True, f"{model.resolve()} ({shape.weights_bytes / GiB:.2f} GiB), no manifest")
    bad = verify_manifest_files(model)
    if bad:
        return Check(
            "artifact",
            False,
            f"manifest mismatch: {', '.join(bad[:3])}",
            "re-fetch or re-quantize; `edgephi models use` a good artifact",
        )
    return Check("artifact", True, f"{model.resolve()} verified against manifest.json")


def _chat_format(settings: Settings) -> Check:
    from edgephi.artifacts import chat_format

    model = Path(settings.model)
    if not model.is_dir():
        return Check("chat format", None, "no artifact to read")
    verdict = chat_format.inspect(model)
    if verdict.refused:
        return Check("chat format", False, "; ".join(verdict.refused), "fetch or quantize a Phi-4 artifact")
    if verdict.fixable:
        return Check(
            "chat format",
            None,
            "; ".join(verdict.fixable) + " (edgephi serve still stops on <|im_end|>: it passes it as a stop token)",
            "re-fetch or re-quantize with this edgephi (it fixes the files)",
        )
    return Check("chat format", True, verdict.line() + " (`edgephi verify --chat` runs one)")


def verify_manifest_files(model: Path) -> list[str]:
    """Files whose size or sha256 differ from ``manifest.json``'s ``files`` entries (empty when all match)."""
    data = json.loads((model / "manifest.json").read_text())
    bad = []
    for entry in data.get("files", []):
        path = model / entry["path"]
        if not path.is_file() or path.stat().st_size != entry.get("size", -1):
            bad.append(entry["path"])
            continue
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != entry.get("sha256"):
            bad.append(entry["path"])
    return bad


def _memory(settings: Settings) -> Check:
    try:
        fit = preflight.preflight(settings)
    except ConfigError as exc:
        return Check("memory", False, str(exc), "apply the settings named above")
    if fit.need_bytes == 0:
        return Check("memory", None, "not estimated: no local artifact to measure")
    changes = f"; fitted: {', '.join(fit.changes)}" if fit.changes else ""
    avail = psutil.virtual_memory().available / GiB
    return Check(
        "memory",
        True,
        f"needs ≈ {fit.need_bytes / GiB:.2f} GiB on the device; host has {avail:.1f} GiB available{changes}",
    )


def _disk(settings: Settings) -> Check:
    path = Path(settings.model)
    while not path.exists() and path != path.parent:
        path = path.parent
    free = shutil.disk_usage(path).free / GiB
    ok = free >= 2
    return Check("disk", ok, f"{free:.1f} GiB free at {path}", "" if ok else "free disk space (≥ 2 GiB for caches)")


def _unit() -> Check:
    if shutil.which("systemctl") is None:
        return Check("unit", None, "systemctl not found")
    proc = subprocess.run(
        ["systemctl", "show", UNIT, "-p", "LoadState,ActiveState,SubState,NRestarts"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    if proc.returncode != 0:
        return Check("unit", None, f"systemd not reachable: {proc.stderr.strip().splitlines()[0][:120]}")
    props = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    if props.get("LoadState") != "loaded":
        return Check("unit", False, f"{UNIT} not installed", "provision with ansible/site.yml")
    return Check(
        "unit",
        props.get("ActiveState") == "active",
        f"{props.get('ActiveState')}/{props.get('SubState')}, restarts {props.get('NRestarts')}",
        "" if props.get("ActiveState") == "active" else f"journalctl -u {UNIT} -n 50",
    )


def _port(settings: Settings) -> Check:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((settings.host, settings.port))
        except OSError:
            return Check(
                "port",
                None,
                f"{settings.host}:{settings.port} in use (by the daemon if it is running)",
                f"`edgephi health --port {settings.port}` should print SERVING",
            )
    return Check("port", True, f"{settings.host}:{settings.port} free")
