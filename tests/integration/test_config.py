"""Settings: EDGEPHI_* variables and env file, unknown keys rejected, bad values named; exit 78 from serve."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from edgephi.config import PROBE_SEATS, ConfigError, engine_args, load_settings
from edgephi.exit_codes import ExitCode


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in list(os.environ):
        if key.startswith("EDGEPHI_"):
            monkeypatch.delenv(key)
    return monkeypatch


def test_env_and_file(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env_file = tmp_path / "edgephi.env"
    env_file.write_text("EDGEPHI_PORT=6000\nEDGEPHI_MAX_CONCURRENT_STREAMS=4\n")
    clean_env.setenv("EDGEPHI_MAX_MODEL_LEN", "4096")
    s = load_settings(env_file)
    assert (s.port, s.max_concurrent_streams, s.max_model_len) == (6000, 4, 4096)
    args = engine_args(s)
    assert args["max_num_seqs"] == 4 + PROBE_SEATS and args["max_model_len"] == 4096  # + the probe's seat


def test_unknown_env_var_is_named_with_suggestion(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("EDGEPHI_MAX_CONCURENT_STREAMS", "4")
    expected = r"EDGEPHI_MAX_CONCURENT_STREAMS.*did you mean EDGEPHI_MAX_CONCURRENT_STREAMS\?"
    with pytest.raises(ConfigError, match=expected):
        load_settings()


def test_unknown_key_in_env_file(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env_file = tmp_path / "edgephi.env"
    env_file.write_text("EDGEPHI_PORTT=1\n")
    with pytest.raises(ConfigError, match="EDGEPHI_PORTT"):
        load_settings(env_file)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("EDGEPHI_PORT", "70000", "EDGEPHI_PORT"),
        ("EDGEPHI_MAX_CONCURRENT_STREAMS", "0", "EDGEPHI_MAX_CONCURRENT_STREAMS"),
        ("EDGEPHI_DEFAULT_MAX_TOKENS", "999999", "EDGEPHI_DEFAULT_MAX_TOKENS"),
        ("EDGEPHI_GPU_MEMORY_UTILIZATION", "1.5", "EDGEPHI_GPU_MEMORY_UTILIZATION"),
    ],
)
def test_bad_values_are_named(clean_env: pytest.MonkeyPatch, key: str, value: str, expected: str) -> None:
    clean_env.setenv(key, value)
    with pytest.raises(ConfigError, match=expected):
        load_settings()


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("EDGEPHI_LOG_LEVEL", "bogus", "EDGEPHI_LOG_LEVEL"),
        ("EDGEPHI_ENGINE_EXTRA_ARGS", "{bad json", "JSON object"),
        ("EDGEPHI_DRAIN_GRACE_S", "inf", "EDGEPHI_DRAIN_GRACE_S"),
        ("EDGEPHI_DEFAULT_TEMPERATURE", "3", "EDGEPHI_DEFAULT_TEMPERATURE"),
        ("EDGEPHI_PORT_FILE", "/nonexistent-dir/ports.json", "EDGEPHI_PORT_FILE"),
        ("EDGEPHI_STREAM_WRITE_TIMEOUT_S", "0", "EDGEPHI_STREAM_WRITE_TIMEOUT_S"),
        ("EDGEPHI_KEEPALIVE_TIME_S", "0", "EDGEPHI_KEEPALIVE_TIME_S"),
        ("EDGEPHI_KEEPALIVE_TIMEOUT_S", "inf", "EDGEPHI_KEEPALIVE_TIMEOUT_S"),
        ("EDGEPHI_MIN_CLIENT_PING_INTERVAL_S", "-1", "EDGEPHI_MIN_CLIENT_PING_INTERVAL_S"),
    ],
)
def test_more_bad_values_are_config_errors(clean_env: pytest.MonkeyPatch, key: str, value: str, expected: str) -> None:
    clean_env.setenv(key, value)
    with pytest.raises(ConfigError, match=expected):
        load_settings()


def test_client_variables_and_lowercase_level_are_accepted(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("EDGEPHI_CLIENT_PORT", "50052")
    clean_env.setenv("EDGEPHI_CLIENT_HOST", "10.0.0.2")
    clean_env.setenv("EDGEPHI_LOG_LEVEL", "debug")
    assert load_settings().log_level == "DEBUG"


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
    assert proc.returncode == 2, proc.stderr
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
