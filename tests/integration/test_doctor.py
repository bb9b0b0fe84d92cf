"""``edgephi doctor`` on this box: a servable artifact passes; a missing or tampered one fails with the fix."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


def doctor(model: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPHI_")}
    env.update({"EDGEPHI_MODEL": str(model), "EDGEPHI_PORT": "0", "EDGEPHI_MAX_MODEL_LEN": "2048"})
    return subprocess.run(
        [sys.executable, "-m", "edgephi.cli", "doctor", *extra], env=env, capture_output=True, text=True, timeout=60
    )


def test_doctor_passes_on_the_dev_artifact(artifact: Path) -> None:
    out = doctor(artifact, "--cpu-only")
    assert out.returncode == 0, out.stdout
    assert "[ok  ] artifact" in out.stdout and "[ok  ] memory" in out.stdout and "can serve" in out.stdout
    assert "[ok  ] chat format: ends a turn on <|im_end|>" in out.stdout


def test_doctor_names_missing_artifact_and_gpu(tmp_path: Path) -> None:
    out = doctor(tmp_path / "missing")
    assert out.returncode == 1
    assert "[FAIL] artifact" in out.stdout and "edgephi fetch" in out.stdout
    assert "[FAIL] gpu" in out.stdout  # no NVIDIA GPU on this machine (or no NVML)
    assert "cannot serve" in out.stdout


def test_doctor_detects_tampered_weights(artifact: Path, tmp_path: Path) -> None:
    copy = tmp_path / "artifact"
    shutil.copytree(artifact, copy, ignore=shutil.ignore_patterns("manifest.json"))
    files = [
        {"path": p.name, "size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in sorted(copy.iterdir())
        if p.is_file()
    ]
    (copy / "manifest.json").write_text(json.dumps({"files": files}))
    assert doctor(copy, "--cpu-only").returncode == 0
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    out = doctor(copy, "--cpu-only")
    assert out.returncode == 1
    assert "manifest mismatch" in out.stdout and weights.name in out.stdout
