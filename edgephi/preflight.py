"""Memory preflight: fit the settings to device memory (VRAM via NVML) and host RAM (psutil) before loading.

Refusals are :class:`~edgephi.config.ConfigError` (``edgephi serve`` exits 78); the runtime watch of host RAM
while serving is :mod:`edgephi.memory_watch`.

Preflight model (all sizes in bytes; GiB = 2**30):
  weights   = sum of the artifact's ``*.safetensors`` sizes (≈ what the engine keeps resident)
  kv/token  = 2 (K and V) × layers × kv_heads × head_dim × bytes(kv dtype) — for Phi-4 in bf16:
              2 × 40 × 10 × 128 × 2 = 204,800 B ≈ 200 KiB/token (the figure in the Phi-4 model card math)
  overhead  = activations, CUDA graphs, allocator slack: ``RUNTIME_OVERHEAD_GIB`` (measured on the H200 with
              the 12 GiB profile: 11.89 GiB budget − 8.51 GiB weights − 23,504 fp8 KV tokens ≈ 1.1 GiB)
  need      = weights + overhead + kv/token × max_model_len (at least one full-context sequence)
With a VRAM budget, :func:`fit_to_budget` keeps the requested settings if they fit, else switches the KV cache
to fp8 (half the bytes), else shortens the context to what fits (a multiple of 1,024, at least
``MIN_CONTEXT``), else refuses naming the shortfall and the settings that would fit.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from edgephi.config import ConfigError, Settings

log = logging.getLogger(__name__)
GiB = 2**30
RUNTIME_OVERHEAD_GIB = 1.25
MIN_CONTEXT = 2048
KV_BYTES = {"auto": 2, "bfloat16": 2, "float16": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}


@dataclass(frozen=True)
class ModelShape:
    weights_bytes: int
    layers: int
    kv_heads: int
    head_dim: int
    max_positions: int | None = None  # config.json max_position_embeddings, when no RoPE scaling extends it

    def kv_bytes_per_token(self, kv_cache_dtype: str) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * KV_BYTES.get(kv_cache_dtype, 2)


def read_shape(model_dir: Path) -> ModelShape:
    """Shape facts from ``config.json`` and the weight files of a local artifact.

    Raises:
        ConfigError: no ``config.json`` or no weights in ``model_dir``.
    """
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"EDGEPHI_MODEL: {model_dir} has no config.json (not a model artifact)")
    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    if weights == 0:
        raise ConfigError(f"EDGEPHI_MODEL: {model_dir} has no *.safetensors weights")
    try:
        return _shape_from_config(json.loads(cfg_path.read_text()), weights)
    except (ValueError, KeyError, TypeError, ZeroDivisionError) as exc:  # JSONDecodeError is a ValueError
        raise ConfigError(
            f"EDGEPHI_MODEL: {cfg_path} is not a usable model config ({type(exc).__name__}: {exc}); "
            "re-fetch or re-quantize the artifact"
        ) from None


def _shape_from_config(cfg: dict[str, Any], weights: int) -> ModelShape:
    heads = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    positions = cfg.get("max_position_embeddings")
    rope_type = (cfg.get("rope_parameters") or {}).get("rope_type", "default")
    extended = bool(cfg.get("rope_scaling")) or rope_type != "default"  # RoPE scaling: vLLM derives a longer one
    max_positions = int(positions) if positions and not extended else None
    return ModelShape(
        weights, int(cfg["num_hidden_layers"]), int(cfg.get("num_key_value_heads", heads)), head_dim, max_positions
    )


@dataclass(frozen=True)
class Fit:
    """The outcome of preflight: settings to use and what was changed (human-readable)."""

    settings: Settings
    changes: tuple[str, ...]
    need_bytes: int
    budget_bytes: int | None


def need_bytes(shape: ModelShape, kv_cache_dtype: str, context: int) -> int:
    return shape.weights_bytes + int(RUNTIME_OVERHEAD_GIB * GiB) + shape.kv_bytes_per_token(kv_cache_dtype) * context


def fit_to_budget(settings: Settings, shape: ModelShape, budget_gib: float) -> Fit:
    """Fit context length and KV dtype into ``budget_gib`` of device memory (see module docstring).

    Raises:
        ConfigError: even ``MIN_CONTEXT`` tokens with an fp8 KV cache do not fit; the message names the
            shortfall in GiB and the budget that would fit.
    """
    budget = int(budget_gib * GiB)
    changes: list[str] = []
    kv_dtype, context = settings.kv_cache_dtype, settings.max_model_len
    if need_bytes(shape, kv_dtype, context) > budget and KV_BYTES.get(kv_dtype, 2) > 1:
        kv_dtype = "fp8"
        changes.append(f"kv_cache_dtype {settings.kv_cache_dtype} → fp8")
    if need_bytes(shape, kv_dtype, context) > budget:
        room = budget - need_bytes(shape, kv_dtype, 0)
        fits = (room // shape.kv_bytes_per_token(kv_dtype)) // 1024 * 1024 if room > 0 else 0
        if fits < MIN_CONTEXT:
            short = need_bytes(shape, kv_dtype, MIN_CONTEXT) - budget
            raise ConfigError(
                f"memory preflight: {settings.model} needs {need_bytes(shape, kv_dtype, MIN_CONTEXT) / GiB:.2f} GiB "
                f"(weights {shape.weights_bytes / GiB:.2f} GiB + runtime {RUNTIME_OVERHEAD_GIB} GiB + "
                f"{MIN_CONTEXT} tokens of fp8 KV) but EDGEPHI_VRAM_BUDGET_GIB is {budget_gib:g}: short by "
                f"{short / GiB:.2f} GiB. Fits: EDGEPHI_VRAM_BUDGET_GIB="
                f"{math.ceil(need_bytes(shape, kv_dtype, MIN_CONTEXT) / GiB * 10) / 10:g} with "
                f"EDGEPHI_MAX_MODEL_LEN={MIN_CONTEXT} EDGEPHI_KV_CACHE_DTYPE=fp8, or a smaller artifact"
            )
        changes.append(f"max_model_len {settings.max_model_len} → {fits}")
        context = int(fits)
    default_max = min(settings.default_max_tokens, context // 2)
    update: dict[str, object] = {
        "kv_cache_dtype": kv_dtype,
        "max_model_len": context,
        "default_max_tokens": default_max,
    }
    if settings.kv_cache_space_gib is None:
        # Pin the KV cache to what the budget leaves: vLLM 0.26 profiles activations smaller when it loads a
        # warm compile cache and then sizes the KV cache ~0.9 GiB past a gpu_memory_utilization budget
        # (measured on the H200, benchmarks/README.md).
        kv_gib = (budget - need_bytes(shape, kv_dtype, 0)) / GiB
        update["kv_cache_space_gib"] = round(kv_gib, 3)
        changes.append(f"kv_cache_space_gib → {kv_gib:.2f} (pinned to the budget)")
    fitted = settings.model_copy(update=update)
    return Fit(fitted, tuple(changes), need_bytes(shape, kv_dtype, context), budget)


@dataclass(frozen=True)
class GpuState:
    total_bytes: int
    free_bytes: int
    others: tuple[str, ...]  # "pid name (GiB)" of other processes holding memory on the device


def gpu_state(index: int = 0) -> GpuState | None:
    """Free/total device memory and other processes on it via NVML, or None without an NVIDIA GPU/driver."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        others = []
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            try:
                name = psutil.Process(proc.pid).name()
            except psutil.Error:
                name = "?"
            used = (proc.usedGpuMemory or 0) / GiB
            others.append(f"{proc.pid} {name} ({used:.1f} GiB)")
        return GpuState(int(mem.total), int(mem.free), tuple(others))
    finally:
        pynvml.nvmlShutdown()


# Largest KV cache the CPU backend gets when EDGEPHI_KV_CACHE_SPACE_GIB is unset (a quarter of free RAM below it).
CPU_KV_MAX_GIB = 4.0


def cpu_only_host() -> bool:
    """True on a box with no NVIDIA device nodes: vLLM runs its CPU backend there."""
    return not Path("/dev/nvidiactl").exists() and not Path("/dev/nvidia0").exists()


def preflight(settings: Settings, gpu: GpuState | None = None, available_ram: int | None = None) -> Fit:
    """Check (and with a VRAM budget, fit) the settings against device and host memory before loading.

    ``gpu``/``available_ram`` default to live readings (NVML, psutil).

    Raises:
        ConfigError: a local model path that does not exist; ``max_model_len`` beyond the model's
            ``max_position_embeddings``; or the model cannot fit (the message names the shortfall and settings
            that would fit).
    """
    model = Path(settings.model)
    if model.exists() and not model.is_dir():
        raise ConfigError(f"EDGEPHI_MODEL: {settings.model} is a file; point it at the artifact's directory")
    if not model.is_dir():
        if settings.model.startswith(("/", ".", "~")):
            raise ConfigError(
                f"EDGEPHI_MODEL: {settings.model} does not exist; install an artifact with `edgephi quantize` or "
                "`edgephi fetch` (or `make demo` for the tiny stand-in), or point EDGEPHI_MODEL at one"
            )
        return Fit(settings, (), 0, None)  # hub id: vLLM resolves it; nothing to measure up front
    shape = read_shape(model)
    gpu = gpu if gpu is not None else gpu_state()
    fit = Fit(settings, (), need_bytes(shape, settings.kv_cache_dtype, settings.max_model_len), None)
    if settings.vram_budget_gib is not None:
        fit = fit_to_budget(settings, shape, settings.vram_budget_gib)
        if gpu is not None:
            util = min(0.99, settings.vram_budget_gib * GiB / gpu.total_bytes)
            fit = Fit(
                fit.settings.model_copy(update={"gpu_memory_utilization": round(util, 4)}),
                (*fit.changes, f"gpu_memory_utilization → {util:.4f} of {gpu.total_bytes / GiB:.1f} GiB"),
                fit.need_bytes,
                fit.budget_bytes,
            )
    if gpu is not None:
        want = int(fit.settings.gpu_memory_utilization * gpu.total_bytes)
        if want > gpu.free_bytes:
            held = f"; other processes on the GPU: {', '.join(gpu.others)}" if gpu.others else ""
            raise ConfigError(
                f"memory preflight: vLLM would take {want / GiB:.2f} GiB of device memory but only "
                f"{gpu.free_bytes / GiB:.2f} GiB is free{held}. Stop them, or set EDGEPHI_VRAM_BUDGET_GIB="
                f"{gpu.free_bytes / GiB * 0.95:.1f}"
            )
    available = available_ram if available_ram is not None else psutil.virtual_memory().available
    if gpu is None and fit.settings.kv_cache_space_gib is None and cpu_only_host():
        # vLLM's CPU backend would otherwise try to reserve gpu_memory_utilization (90 %) of the host's RAM.
        kv_gib = round(max(0.5, min(CPU_KV_MAX_GIB, available / GiB / 4)), 2)
        fit = Fit(
            fit.settings.model_copy(update={"kv_cache_space_gib": kv_gib}),
            (
                *fit.changes,
                f"no GPU: kv_cache_space_gib → {kv_gib} GiB of host RAM (set EDGEPHI_KV_CACHE_SPACE_GIB to choose)",
            ),
            fit.need_bytes,
            fit.budget_bytes,
        )
    # Host RAM: the weights pass through host memory while loading; the CPU backend also keeps KV there.
    host_need = shape.weights_bytes + 2 * GiB
    if gpu is None and fit.settings.kv_cache_space_gib is not None:
        host_need += int(fit.settings.kv_cache_space_gib * GiB)
    if host_need > available:
        raise ConfigError(
            f"memory preflight: loading needs about {host_need / GiB:.2f} GiB of host RAM but "
            f"{available / GiB:.2f} GiB is available; free memory or lower EDGEPHI_KV_CACHE_SPACE_GIB"
        )
    max_len = fit.settings.max_model_len
    if shape.max_positions is not None and max_len > shape.max_positions:
        raise ConfigError(
            f"EDGEPHI_MAX_MODEL_LEN={max_len} is longer than the model's context ({shape.max_positions} tokens, "
            f"max_position_embeddings in {model}/config.json); set EDGEPHI_MAX_MODEL_LEN={shape.max_positions} "
            "or less"
        )
    return fit
