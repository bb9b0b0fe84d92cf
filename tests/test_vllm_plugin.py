"""The portable W4A16 CPU GEMM (edgephi.vllm_plugin) against a float reference, on vLLM's own weight layout."""

from __future__ import annotations

import pytest
import torch

from edgephi.vllm_plugin import dequantize_blocked_w4, register


@pytest.mark.parametrize(("k", "n", "group"), [(256, 64, 128), (512, 1024, 128), (128, 32, 128)])
def test_gemm_matches_reference(k: int, n: int, group: int) -> None:
    register()
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.quantization.utils.quant_utils import pack_quantized_values_into_int32
    from vllm.scalar_type import scalar_types

    gen = torch.Generator().manual_seed(k + n)
    q = torch.randint(0, 16, (k, n), dtype=torch.int32, generator=gen)
    scales = (torch.rand(k // group, n, generator=gen) * 0.1).to(torch.bfloat16)
    reference_w = (q.float() - 8) * scales.float().repeat_interleave(group, 0)
    # The blocked layout exactly as vLLM's CPUWNA16LinearKernel._process_gptq_weights_w4a16 builds it.
    packed = pack_quantized_values_into_int32(q, scalar_types.uint4b8, 1)
    packed = packed.view(k, -1, 2).permute(1, 0, 2).reshape(-1, k * 2).contiguous()
    assert torch.equal(dequantize_blocked_w4(packed, scales), reference_w)

    x = torch.randn(3, 7, k, generator=gen).to(torch.bfloat16)
    bias = torch.randn(n, generator=gen).to(torch.bfloat16)
    out = ops.cpu_gemm_wna16(input=x, q_weight=packed, scales=scales, zeros=None, bias=bias, pack_factor=8,
                             isa_hint="vec")
    expected = x.float() @ reference_w + bias.float()
    assert out.shape == (3, 7, n)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="does not match"):
        dequantize_blocked_w4(torch.zeros(3, 8, dtype=torch.int32), torch.zeros(1, 64))
