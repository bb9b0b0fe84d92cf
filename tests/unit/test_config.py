"""Settings (edgephi/config.py): EDGEPHI_* variables and the env file, unknown keys rejected with a suggestion,
bad values named, and the one place settings become vLLM engine arguments. In-process; ``edgephi serve``'s exit
78 on these is tests/integration/test_config.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgephi.config import CLI_ENV_KEYS, PROBE_SEATS, ConfigError, Settings, engine_args, load_settings


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in list(os.environ):
        if key.startswith("EDGEPHI_"):
            monkeypatch.delenv(key)
    return monkeypatch


def test_defaults_without_any_setting(clean_env: pytest.MonkeyPatch) -> None:
    s = load_settings()
    assert s.model == "/var/lib/edgephi/models/current" and (s.host, s.port) == ("127.0.0.1", 50051)
    assert s.vram_budget_gib is None and s.memory_hard_limit_gib is None and s.metrics_port is None


def test_env_and_file(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env_file = tmp_path / "edgephi.env"
    env_file.write_text("EDGEPHI_PORT=6000\nEDGEPHI_MAX_CONCURRENT_STREAMS=4\n")
    clean_env.setenv("EDGEPHI_MAX_MODEL_LEN", "4096")
    s = load_settings(env_file)
    assert (s.port, s.max_concurrent_streams, s.max_model_len) == (6000, 4, 4096)
    args = engine_args(s)
    assert args["max_num_seqs"] == 4 + PROBE_SEATS and args["max_model_len"] == 4096  # + the probe's seat


def test_the_environment_wins_over_the_env_file_and_overrides_win_over_both(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env_file = tmp_path / "edgephi.env"
    env_file.write_text("EDGEPHI_PORT=6000\nEDGEPHI_DRAIN_GRACE_S=5\n")
    clean_env.setenv("EDGEPHI_PORT", "7000")
    s = load_settings(env_file)
    assert (s.port, s.drain_grace_s) == (7000, 5.0)
    assert load_settings(env_file, port=8000).port == 8000


def test_a_missing_env_file_is_named(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"env file .*absent.env does not exist \(set --env-file or EDGEPHI_ENV_FILE\)"
    ):
        load_settings(tmp_path / "absent.env")


def test_unknown_env_var_is_named_with_suggestion(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("EDGEPHI_MAX_CONCURENT_STREAMS", "4")
    expected = r"EDGEPHI_MAX_CONCURENT_STREAMS.*did you mean EDGEPHI_MAX_CONCURRENT_STREAMS\?"
    with pytest.raises(ConfigError, match=expected):
        load_settings()


def test_every_unknown_variable_is_named_and_a_stranger_gets_no_suggestion(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("EDGEPHI_PROT", "1")
    clean_env.setenv("EDGEPHI_ZZZZZZ", "1")
    with pytest.raises(ConfigError) as err:
        load_settings()
    msg = str(err.value)
    assert msg == "unknown setting(s) in environment: EDGEPHI_PROT (did you mean EDGEPHI_PORT?), EDGEPHI_ZZZZZZ"


def test_unknown_key_in_env_file_is_named_as_written(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env_file = tmp_path / "edgephi.env"
    env_file.write_text("EDGEPHI_PORTT=1\n")
    with pytest.raises(ConfigError) as err:
        load_settings(env_file)
    # the key as written in the file, with the suggestion for it (not EDGEPHI_EDGEPHI_PORTT)
    assert str(err.value).endswith(f"in env file {env_file}: EDGEPHI_PORTT (did you mean EDGEPHI_PORT?)")


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("EDGEPHI_PORT", "70000", "EDGEPHI_PORT"),
        ("EDGEPHI_MAX_CONCURRENT_STREAMS", "0", "EDGEPHI_MAX_CONCURRENT_STREAMS"),
        ("EDGEPHI_DEFAULT_MAX_TOKENS", "999999", "EDGEPHI_DEFAULT_MAX_TOKENS"),
        ("EDGEPHI_GPU_MEMORY_UTILIZATION", "1.5", "EDGEPHI_GPU_MEMORY_UTILIZATION"),
        ("EDGEPHI_LOG_LEVEL", "bogus", "EDGEPHI_LOG_LEVEL"),
        ("EDGEPHI_ENGINE_EXTRA_ARGS", "{bad json", "JSON object"),
        ("EDGEPHI_DRAIN_GRACE_S", "inf", "EDGEPHI_DRAIN_GRACE_S"),
        ("EDGEPHI_DEFAULT_TEMPERATURE", "3", "EDGEPHI_DEFAULT_TEMPERATURE"),
        ("EDGEPHI_PORT_FILE", "/nonexistent-dir/ports.json", "EDGEPHI_PORT_FILE"),
        ("EDGEPHI_STREAM_WRITE_TIMEOUT_S", "0", "EDGEPHI_STREAM_WRITE_TIMEOUT_S"),
        ("EDGEPHI_KEEPALIVE_TIME_S", "0", "EDGEPHI_KEEPALIVE_TIME_S"),
        ("EDGEPHI_KEEPALIVE_TIMEOUT_S", "inf", "EDGEPHI_KEEPALIVE_TIMEOUT_S"),
        ("EDGEPHI_MIN_CLIENT_PING_INTERVAL_S", "-1", "EDGEPHI_MIN_CLIENT_PING_INTERVAL_S"),
        ("EDGEPHI_VRAM_BUDGET_GIB", "-1", "EDGEPHI_VRAM_BUDGET_GIB"),
        ("EDGEPHI_MAX_MODEL_LEN", "lots", "EDGEPHI_MAX_MODEL_LEN"),
    ],
)
def test_bad_values_are_named(clean_env: pytest.MonkeyPatch, key: str, value: str, expected: str) -> None:
    clean_env.setenv(key, value)
    with pytest.raises(ConfigError, match=expected) as err:
        load_settings()
    assert str(err.value).startswith("invalid configuration: ")


def test_checks_across_settings_name_both(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("EDGEPHI_MAX_MODEL_LEN", "1024")
    clean_env.setenv("EDGEPHI_DEFAULT_MAX_TOKENS", "1024")
    with pytest.raises(ConfigError, match=r"EDGEPHI_DEFAULT_MAX_TOKENS \(1024\) must be below EDGEPHI_MAX_MODEL_LEN"):
        load_settings()
    clean_env.delenv("EDGEPHI_DEFAULT_MAX_TOKENS")
    clean_env.setenv("EDGEPHI_MEMORY_SOFT_LIMIT_GIB", "8")
    clean_env.setenv("EDGEPHI_MEMORY_HARD_LIMIT_GIB", "6")
    with pytest.raises(ConfigError, match="EDGEPHI_MEMORY_SOFT_LIMIT_GIB must be below EDGEPHI_MEMORY_HARD_LIMIT_GIB"):
        load_settings()


def test_client_variables_and_lowercase_level_are_accepted(clean_env: pytest.MonkeyPatch) -> None:
    for key in CLI_ENV_KEYS:  # read by the CLI, not the daemon, but allowed beside it (one env file for both)
        clean_env.setenv(key, "x")
    clean_env.setenv("EDGEPHI_CLIENT_PORT", "50052")
    clean_env.setenv("EDGEPHI_LOG_LEVEL", "debug")
    assert load_settings().log_level == "DEBUG"


def test_engine_args_carry_the_settings_and_the_escape_hatch_last(clean_env: pytest.MonkeyPatch) -> None:
    s = Settings(
        model="/m",
        max_model_len=2048,
        kv_cache_dtype="fp8",
        kv_cache_space_gib=1.5,
        max_num_batched_tokens=512,
        engine_extra_args={"enforce_eager": True, "seed": 7},
    )
    args = engine_args(s)
    assert args["model"] == "/m" and args["max_model_len"] == 2048 and args["kv_cache_dtype"] == "fp8"
    assert args["kv_cache_memory_bytes"] == int(1.5 * 2**30) and args["max_num_batched_tokens"] == 512
    assert args["max_num_seqs"] == s.max_concurrent_streams + PROBE_SEATS
    assert args["enforce_eager"] is True and args["seed"] == 7  # extra args override
    plain = engine_args(Settings(model="/m"))
    assert "kv_cache_memory_bytes" not in plain and "max_num_batched_tokens" not in plain
