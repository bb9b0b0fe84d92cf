"""Memory guards: preflight fit/refusal, and soft/hard trips of the running daemon's host-RAM watch."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import psutil
import pytest

from edgephi import guards
from edgephi.client import sampling
from edgephi.config import ConfigError, Settings
from edgephi.exit_codes import ExitCode
from edgephi.testing import run_daemon

GiB = 2**30

# Phi-4's published shape (40 layers, 10 KV heads, head dim 128) with 8.5 GiB of int4 weights.
PHI4 = guards.ModelShape(weights_bytes=int(8.5 * GiB), layers=40, kv_heads=10, head_dim=128)


def test_phi4_kv_bytes_per_token_matches_model_card_math() -> None:
    assert PHI4.kv_bytes_per_token("auto") == 204_800  # ≈ 200 KiB/token in bf16
    assert PHI4.kv_bytes_per_token("fp8") == 102_400


def test_fit_keeps_settings_that_fit() -> None:
    fit = guards.fit_to_budget(Settings(max_model_len=4096), PHI4, 16.0)
    assert [c for c in fit.changes if not c.startswith("kv_cache_space_gib")] == []
    assert fit.settings.max_model_len == 4096 and fit.settings.kv_cache_dtype == "auto"
    # The KV cache is pinned to what the budget leaves after weights and runtime overhead.
    assert fit.settings.kv_cache_space_gib == pytest.approx(16.0 - 8.5 - guards.RUNTIME_OVERHEAD_GIB, abs=1e-3)


def test_fit_12gib_switches_to_fp8_and_keeps_full_context() -> None:
    fit = guards.fit_to_budget(Settings(max_model_len=16384), PHI4, 12.0)
    assert fit.settings.kv_cache_dtype == "fp8"
    assert fit.settings.max_model_len == 16384  # 8.5 + 1.25 + 16384 × 100 KiB = 11.31 GiB ≤ 12
    assert fit.need_bytes <= 12 * GiB


def test_fit_shortens_context_when_fp8_is_not_enough() -> None:
    fit = guards.fit_to_budget(Settings(max_model_len=16384), PHI4, 11.0)
    assert fit.settings.kv_cache_dtype == "fp8"
    assert 2048 <= fit.settings.max_model_len < 16384 and fit.settings.max_model_len % 1024 == 0
    assert fit.need_bytes <= 11 * GiB
    assert any("max_model_len" in c for c in fit.changes)


def test_refusal_names_shortfall_and_settings_that_fit() -> None:
    with pytest.raises(ConfigError) as err:
        guards.fit_to_budget(Settings(), PHI4, 8.0)
    msg = str(err.value)
    assert "short by" in msg and "EDGEPHI_VRAM_BUDGET_GIB=" in msg and "EDGEPHI_MAX_MODEL_LEN=2048" in msg


def test_preflight_refuses_when_gpu_is_held_by_others(artifact: Path) -> None:
    # Fake on purpose: no GPU here, so the NVML reading (free memory, other processes) is supplied.
    gpu = guards.GpuState(total_bytes=16 * GiB, free_bytes=1 * GiB, others=("4242 ollama (14.5 GiB)",))
    with pytest.raises(ConfigError) as err:
        guards.preflight(Settings(model=str(artifact), gpu_memory_utilization=0.9), gpu=gpu)
    assert "4242 ollama (14.5 GiB)" in str(err.value) and "EDGEPHI_VRAM_BUDGET_GIB" in str(err.value)


def test_preflight_refuses_when_host_ram_is_short(artifact: Path) -> None:
    with pytest.raises(ConfigError, match="host RAM"):
        guards.preflight(Settings(model=str(artifact)), gpu=None, available_ram=100 * 2**20)


def test_preflight_names_a_missing_model_path_and_a_too_long_context(artifact: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"EDGEPHI_MODEL: .* does not exist; install an artifact"):
        guards.preflight(Settings(model=str(tmp_path / "absent")), gpu=None, available_ram=64 * GiB)
    # The stand-in's config.json says max_position_embeddings 4096; the default context is 16384.
    with pytest.raises(ConfigError, match=r"EDGEPHI_MAX_MODEL_LEN=16384 is longer .* set EDGEPHI_MAX_MODEL_LEN=4096"):
        guards.preflight(Settings(model=str(artifact)), gpu=None, available_ram=64 * GiB)


@pytest.mark.parametrize("config", ["{not json", '{"num_hidden_layers": 2}', '{"num_attention_heads": "lots"}'])
def test_preflight_refuses_a_broken_config_json(tmp_path: Path, config: str) -> None:
    (tmp_path / "config.json").write_text(config)
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(ConfigError, match="not a usable model config"):
        guards.preflight(Settings(model=str(tmp_path)), gpu=None, available_ram=64 * GiB)
    with pytest.raises(ConfigError, match="is a file"):
        guards.preflight(Settings(model=str(tmp_path / "config.json")), gpu=None, available_ram=64 * GiB)


@pytest.mark.skipif(not guards.cpu_only_host(), reason="sizes the KV cache only where vLLM runs on the CPU")
def test_cpu_only_box_gets_a_kv_cache_size_by_default(artifact: Path) -> None:
    fit = guards.preflight(Settings(model=str(artifact), max_model_len=2048), gpu=None, available_ram=8 * GiB)
    assert fit.settings.kv_cache_space_gib == 2.0  # a quarter of the 8 GiB available
    assert any("kv_cache_space_gib" in c for c in fit.changes)
    big = guards.preflight(Settings(model=str(artifact), max_model_len=2048), gpu=None, available_ram=64 * GiB)
    assert big.settings.kv_cache_space_gib == guards.CPU_KV_MAX_GIB
    mine = guards.preflight(
        Settings(model=str(artifact), max_model_len=2048, kv_cache_space_gib=1.5), gpu=None, available_ram=64 * GiB
    )
    assert mine.settings.kv_cache_space_gib == 1.5 and not mine.changes


def test_serve_refuses_too_small_budget_with_exit_78(artifact: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPHI_")}
    env.update({"EDGEPHI_MODEL": str(artifact), "EDGEPHI_VRAM_BUDGET_GIB": "0.01", "EDGEPHI_PORT": "0"})
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "edgephi.cli", "serve"], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == ExitCode.CONFIG, proc.stderr[-2000:]
    assert "memory preflight" in proc.stderr and "short by" in proc.stderr
    assert time.monotonic() - started < 60  # refused before loading the engine


def test_soft_limit_sheds_and_recovers_then_hard_limit_exits(artifact: Path, tmp_path: Path) -> None:
    """Host available memory is pushed below the floors by really allocating memory in this process."""
    # The daemon itself takes D ≈ 2-3 GiB of the available memory while loading (engine, 1 GiB KV cache).
    # Floors sit below base - D; ballasts push below them whatever D is in [0, 4.25) GiB.
    base = psutil.virtual_memory().available
    soft_floor = (base - 4.5 * GiB) / GiB
    hard_floor = (base - 9.0 * GiB) / GiB
    assert hard_floor > 1, "test needs ~10 GiB of free host RAM"
    with (
        run_daemon(
            artifact,
            tmp_path,
            min_available_soft_gib=f"{soft_floor:.3f}",
            min_available_hard_gib=f"{hard_floor:.3f}",
            memory_check_interval_s=0.25,
        ) as d,
        d.client() as c,
    ):
        assert c.health() == "SERVING"
        ballast = b"\x01" * int(4.5 * GiB)  # really touches the pages
        deadline = time.monotonic() + 20
        while c.health() != "NOT_SERVING":
            assert time.monotonic() < deadline, d.log()[-2000:]
            time.sleep(0.1)
        with pytest.raises(grpc.RpcError) as err:
            list(c.generate("hi", sampling(max_tokens=2)))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "memory guard" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:  # tokenizing costs memory too
            c.count_tokens("hi")
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        del ballast
        deadline = time.monotonic() + 20
        while c.health() != "SERVING":
            assert time.monotonic() < deadline, d.log()[-2000:]
            time.sleep(0.1)
        assert list(c.generate("hi", sampling(max_tokens=2, ignore_eos=True)))
        assert d.metrics()['edgephi_guard_trips_total{level="soft"}'] >= 1

        ballast = b"\x01" * int(9 * GiB)
        code = d.proc.wait(60)
        del ballast
        assert code == ExitCode.MEMORY, d.log()[-2000:]
        assert "hard limit" in d.log()
