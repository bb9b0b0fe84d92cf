"""Memory preflight (edgephi/preflight.py): Phi-4's KV arithmetic, fitting to a VRAM budget, and refusals that name
the settings that would fit. Artifacts are fake directories (a config.json and a sparse weights file); NVML and
the CPU-only check are stubbed, so the verdicts do not depend on this machine."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from edgephi import preflight as pf
from edgephi.config import ConfigError, Settings

GiB = 2**30
KiB = 2**10

# Phi-4's published shape (40 layers, 10 KV heads, head dim 128) with 8.5 GiB of int4 weights.
PHI4 = pf.ModelShape(weights_bytes=int(8.5 * GiB), layers=40, kv_heads=10, head_dim=128)
PHI4_CONFIG = {
    "num_hidden_layers": 40,
    "num_attention_heads": 40,
    "num_key_value_heads": 10,
    "hidden_size": 5120,
    "max_position_embeddings": 16384,
}


def fake_artifact(root: Path, weights_bytes: int = 64 * 2**20, **config: Any) -> Path:
    """A directory preflight can measure: ``config.json`` and a sparse ``model.safetensors`` of that size."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({**PHI4_CONFIG, **config}))
    with (root / "model.safetensors").open("wb") as f:
        f.truncate(weights_bytes)
    return root


@pytest.fixture(autouse=True)
def no_live_readings(monkeypatch: pytest.MonkeyPatch) -> None:
    """No NVML, a box with a GPU and no EDGEPHI_* variables, unless a test says otherwise: no verdict depends on
    this machine."""
    for key in [k for k in os.environ if k.startswith("EDGEPHI_")]:
        monkeypatch.delenv(key)
    monkeypatch.setattr(pf, "gpu_state", lambda index=0: None)
    monkeypatch.setattr(pf, "cpu_only_host", lambda: False)


# ------------------------------------------------------------------------------------------- arithmetic


def test_phi4_kv_bytes_per_token_matches_model_card_math() -> None:
    assert PHI4.kv_bytes_per_token("auto") == 204_800  # 2 × 40 × 10 × 128 × 2 B ≈ 200 KiB/token in bf16
    assert PHI4.kv_bytes_per_token("bfloat16") == 204_800
    assert PHI4.kv_bytes_per_token("fp8") == 102_400
    assert PHI4.kv_bytes_per_token("fp8_e5m2") == 102_400
    assert PHI4.kv_bytes_per_token("something-new") == 204_800  # unknown dtypes count as 16-bit (safe side)


def test_need_is_weights_plus_overhead_plus_kv_for_the_context() -> None:
    overhead = int(pf.RUNTIME_OVERHEAD_GIB * GiB)
    assert pf.need_bytes(PHI4, "auto", 0) == PHI4.weights_bytes + overhead
    assert pf.need_bytes(PHI4, "auto", 16384) == PHI4.weights_bytes + overhead + 16384 * 200 * KiB
    assert pf.need_bytes(PHI4, "fp8", 16384) == PHI4.weights_bytes + overhead + 16384 * 100 * KiB


def test_shape_is_read_from_config_and_weight_files(tmp_path: Path) -> None:
    model = fake_artifact(tmp_path / "m", weights_bytes=3 * GiB)
    (model / "model-00002.safetensors").write_bytes(b"\0" * 1000)
    shape = pf.read_shape(model)
    assert shape == pf.ModelShape(3 * GiB + 1000, layers=40, kv_heads=10, head_dim=128, max_positions=16384)
    # RoPE scaling: vLLM derives a longer context than max_position_embeddings, so there is no limit to check
    scaled = fake_artifact(tmp_path / "scaled", rope_scaling={"type": "longrope"}, head_dim=96)
    assert pf.read_shape(scaled).max_positions is None and pf.read_shape(scaled).head_dim == 96


# ------------------------------------------------------------------------------------- fitting to a budget


def test_16gib_keeps_the_requested_settings_and_pins_the_kv_cache() -> None:
    fit = pf.fit_to_budget(Settings(max_model_len=16384), PHI4, 16.0)
    assert fit.settings.kv_cache_dtype == "auto" and fit.settings.max_model_len == 16384
    assert fit.changes == (f"kv_cache_space_gib → {16.0 - 8.5 - pf.RUNTIME_OVERHEAD_GIB:.2f} (pinned to the budget)",)
    # The KV cache gets what the budget leaves after weights and runtime overhead.
    assert fit.settings.kv_cache_space_gib == pytest.approx(16.0 - 8.5 - pf.RUNTIME_OVERHEAD_GIB, abs=1e-3)
    assert fit.need_bytes == pf.need_bytes(PHI4, "auto", 16384) and fit.budget_bytes == 16 * GiB


def test_12gib_switches_to_fp8_and_keeps_the_full_context() -> None:
    fit = pf.fit_to_budget(Settings(max_model_len=16384), PHI4, 12.0)
    assert fit.settings.kv_cache_dtype == "fp8"
    assert fit.settings.max_model_len == 16384  # 8.5 + 1.25 + 16384 × 100 KiB = 11.31 GiB ≤ 12
    assert "kv_cache_dtype auto → fp8" in fit.changes
    assert fit.need_bytes <= 12 * GiB


def test_11gib_also_shortens_the_context_to_a_multiple_of_1024() -> None:
    fit = pf.fit_to_budget(Settings(max_model_len=16384), PHI4, 11.0)
    # room for KV: 11 − 8.5 − 1.25 = 1.25 GiB = 13,107 fp8 tokens → 12,288 (12 × 1024)
    assert fit.settings.kv_cache_dtype == "fp8" and fit.settings.max_model_len == 12288
    assert "max_model_len 16384 → 12288" in fit.changes
    assert fit.need_bytes == pf.need_bytes(PHI4, "fp8", 12288) <= 11 * GiB
    assert fit.settings.default_max_tokens == 256  # still below half the context


def test_a_short_fitted_context_caps_the_default_max_tokens() -> None:
    fit = pf.fit_to_budget(Settings(max_model_len=16384, default_max_tokens=4000), PHI4, 10.3)
    assert fit.settings.max_model_len == 5120  # (10.3 − 9.75) GiB / 100 KiB = 5,767 → 5,120
    assert fit.settings.default_max_tokens == 2560  # half the context


def test_an_explicit_kv_cache_size_is_kept() -> None:
    fit = pf.fit_to_budget(Settings(max_model_len=4096, kv_cache_space_gib=2.0), PHI4, 16.0)
    assert fit.settings.kv_cache_space_gib == 2.0 and fit.changes == ()


def test_refusal_names_the_shortfall_and_the_settings_that_fit() -> None:
    with pytest.raises(ConfigError) as err:
        pf.fit_to_budget(Settings(model="/models/phi-4"), PHI4, 8.0)
    msg = str(err.value)
    # 2,048 fp8 tokens need 8.5 + 1.25 + 0.195 = 9.95 GiB: 1.95 GiB more than the 8 GiB budget
    assert msg.startswith("memory preflight: /models/phi-4 needs 9.95 GiB (weights 8.50 GiB + runtime 1.25 GiB")
    assert "EDGEPHI_VRAM_BUDGET_GIB is 8: short by 1.95 GiB" in msg
    assert "Fits: EDGEPHI_VRAM_BUDGET_GIB=10 with EDGEPHI_MAX_MODEL_LEN=2048 EDGEPHI_KV_CACHE_DTYPE=fp8" in msg


# ------------------------------------------------------------------------------- preflight of an artifact


def test_a_budget_sets_the_device_share_of_the_card(tmp_path: Path) -> None:
    model = fake_artifact(tmp_path / "m", max_position_embeddings=4096)
    gpu = pf.GpuState(total_bytes=24 * GiB, free_bytes=23 * GiB, others=())
    fit = pf.preflight(
        Settings(model=str(model), max_model_len=4096, vram_budget_gib=16.0), gpu=gpu, available_ram=64 * GiB
    )
    assert fit.settings.gpu_memory_utilization == round(16 / 24, 4)
    assert fit.changes[-1] == "gpu_memory_utilization → 0.6667 of 24.0 GiB"


def test_preflight_refuses_when_the_gpu_is_held_by_others(tmp_path: Path) -> None:
    model = fake_artifact(tmp_path / "m", max_position_embeddings=4096)
    gpu = pf.GpuState(total_bytes=16 * GiB, free_bytes=1 * GiB, others=("4242 ollama (14.5 GiB)",))
    with pytest.raises(ConfigError) as err:
        pf.preflight(Settings(model=str(model), max_model_len=4096, gpu_memory_utilization=0.9), gpu=gpu)
    msg = str(err.value)
    assert "vLLM would take 14.40 GiB of device memory but only 1.00 GiB is free" in msg
    assert "other processes on the GPU: 4242 ollama (14.5 GiB)" in msg and "set EDGEPHI_VRAM_BUDGET_GIB=" in msg


def test_preflight_refuses_when_host_ram_is_short(tmp_path: Path) -> None:
    model = fake_artifact(tmp_path / "m", weights_bytes=GiB, max_position_embeddings=4096)
    with pytest.raises(ConfigError) as err:
        pf.preflight(Settings(model=str(model), max_model_len=4096), available_ram=2 * GiB)
    # the weights pass through host memory while loading, plus 2 GiB of process overhead
    assert "loading needs about 3.00 GiB of host RAM but 2.00 GiB is available" in str(err.value)
    assert "EDGEPHI_KV_CACHE_SPACE_GIB" in str(err.value)
    assert pf.preflight(Settings(model=str(model), max_model_len=4096), available_ram=4 * GiB).changes == ()


def test_preflight_names_a_missing_model_path_and_a_too_long_context(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"EDGEPHI_MODEL: .*absent does not exist; install an artifact"):
        pf.preflight(Settings(model=str(tmp_path / "absent")), available_ram=64 * GiB)
    model = fake_artifact(tmp_path / "m", max_position_embeddings=4096)
    with pytest.raises(ConfigError, match=r"EDGEPHI_MAX_MODEL_LEN=16384 is longer .* set EDGEPHI_MAX_MODEL_LEN=4096"):
        pf.preflight(Settings(model=str(model)), available_ram=64 * GiB)


def test_a_hub_id_is_left_to_vllm() -> None:
    settings = Settings(model="microsoft/phi-4")
    assert pf.preflight(settings, available_ram=64 * GiB) == pf.Fit(settings, (), 0, None)


@pytest.mark.parametrize("config", ["{not json", '{"num_hidden_layers": 2}', '{"num_attention_heads": "lots"}'])
def test_preflight_refuses_a_broken_config_json(tmp_path: Path, config: str) -> None:
    (tmp_path / "config.json").write_text(config)
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(ConfigError, match=r"not a usable model config.*re-fetch or re-quantize"):
        pf.preflight(Settings(model=str(tmp_path)), available_ram=64 * GiB)
    with pytest.raises(ConfigError, match="is a file; point it at the artifact's directory"):
        pf.preflight(Settings(model=str(tmp_path / "config.json")), available_ram=64 * GiB)


def test_preflight_refuses_a_directory_without_config_or_weights(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"has no config\.json"):
        pf.preflight(Settings(model=str(tmp_path)), available_ram=64 * GiB)
    (tmp_path / "config.json").write_text(json.dumps(PHI4_CONFIG))
    with pytest.raises(ConfigError, match=r"has no \*.safetensors weights"):
        pf.preflight(Settings(model=str(tmp_path)), available_ram=64 * GiB)


def test_cpu_only_box_gets_a_kv_cache_size_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pf, "cpu_only_host", lambda: True)
    model = fake_artifact(tmp_path / "m", max_position_embeddings=4096)
    fit = pf.preflight(Settings(model=str(model), max_model_len=2048), available_ram=8 * GiB)
    assert fit.settings.kv_cache_space_gib == 2.0  # a quarter of the 8 GiB available
    assert any(c.startswith("no GPU: kv_cache_space_gib → 2.0 GiB") for c in fit.changes)
    big = pf.preflight(Settings(model=str(model), max_model_len=2048), available_ram=64 * GiB)
    assert big.settings.kv_cache_space_gib == pf.CPU_KV_MAX_GIB
    mine = pf.preflight(Settings(model=str(model), max_model_len=2048, kv_cache_space_gib=1.5), available_ram=64 * GiB)
    assert mine.settings.kv_cache_space_gib == 1.5 and not mine.changes
    # the KV cache lives in host RAM there, so it counts against the available memory
    with pytest.raises(ConfigError, match="host RAM"):
        pf.preflight(Settings(model=str(model), max_model_len=2048, kv_cache_space_gib=8.0), available_ram=9 * GiB)
