"""``edgephi serve`` on bad settings exits 78 naming them (a port in use, an unknown key, a missing model), and
``python -m edgephi.cli`` argument errors exit 2. Parsing the settings themselves is tests/unit/test_config.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from edgephi.exit_codes import ExitCode


def test_serve_on_a_port_in_use_exits_78_naming_the_fix(artifact: Path, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPHI_")}
        env.update({"EDGEPHI_MODEL": str(artifact), "EDGEPHI_PORT": str(port), "EDGEPHI_MAX_MODEL_LEN": "2048"})
        proc = subprocess.run(
            [sys.executable, "-m", "edgephi.cli", "serve"], env=env, capture_output=True, text=True, timeout=120
        )
    assert proc.returncode == ExitCode.CONFIG, proc.stderr[-2000:]
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr and "EDGEPHI_PORT" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_with_the_metrics_port_in_use_exits_78(artifact: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPHI_")}
        env.update(
            {
                "EDGEPHI_MODEL": str(artifact),
                "EDGEPHI_PORT": "0",
                "EDGEPHI_METRICS_PORT": str(port),
                "EDGEPHI_MAX_MODEL_LEN": "2048",
            }
        )
        proc = subprocess.run(
            [sys.executable, "-m", "edgephi.cli", "serve"], env=env, capture_output=True, text=True, timeout=120
        )
    assert proc.returncode == ExitCode.CONFIG, proc.stderr[-2000:]
    assert f"cannot serve metrics on 127.0.0.1:{port}" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["info", "--port", "99999"], "not a TCP port"),
        (["health", "--token-file", "/nonexistent/token"], "--token-file /nonexistent/token"),
    ],
)
def test_cli_argument_errors_exit_2_with_the_fix(args: list[str], expected: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "edgephi.cli", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == ExitCode.USAGE, proc.stderr
    assert expected in proc.stderr and "Traceback" not in proc.stderr


def test_serve_with_bad_config_exits_78_without_loading(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPHI_")}
    env["EDGEPHI_PROT"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "edgephi.cli", "serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == ExitCode.CONFIG
    assert "EDGEPHI_PROT" in proc.stderr and "EDGEPHI_PORT" in proc.stderr


def test_serve_with_missing_model_exits_78(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPHI_")}
    env.update({"EDGEPHI_MODEL": str(tmp_path / "nope"), "EDGEPHI_PORT": "0"})
    proc = subprocess.run(
        [sys.executable, "-m", "edgephi.cli", "serve"], env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == ExitCode.CONFIG, proc.stderr[-2000:]
    assert "does not exist" in proc.stderr and str(tmp_path / "nope") in proc.stderr
