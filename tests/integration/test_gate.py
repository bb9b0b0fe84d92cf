"""The quality gate's building blocks: GPTQ dequantization, checked against auto-round's own packers and
inference kernels.

The zero-point conventions and the held-out text (pure logic) are in tests/unit/test_gate_rules.py and
tests/unit/test_corpus.py; the gate on real artifacts (good passes, noise fails and is not promoted) is in
tests/integration/test_artifacts.py, which shares its freshly quantized artifact."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from edgephi.artifacts.gate import GateError, dequantize_gptq


def _packed_layer(packer: str, bits: int, group: int, in_f: int = 256, out_f: int = 384) -> tuple[Any, torch.Tensor]:
    """A random linear layer quantized and packed by auto-round's packer ``packer``; (QuantLinear, w_int - zp)."""
    if packer == "zp":  # GPTQ v1 packing (stored zero point = zp - 1): auto_gptq and auto_round:auto_gptq
        from auto_round_extension.torch.qlinear_torch_zp import QuantLinear  # type: ignore[import-untyped]
    else:  # plain packing: auto_round / auto_round:gptqmodel
        from auto_round_extension.torch.qlinear_torch import QuantLinear  # type: ignore[import-untyped]
    gen = torch.Generator().manual_seed(bits * 1000 + group)
    maxq = 2**bits - 1
    groups = in_f // group
    linear = torch.nn.Linear(in_f, out_f, bias=False)
    scales = torch.rand(out_f, groups, generator=gen) * 0.02 + 0.005
    zeros = torch.randint(1, maxq + 1, (out_f, groups), generator=gen)  # zp 0 is not representable in v1 packing
    q = torch.randint(0, maxq + 1, (out_f, in_f), generator=gen)
    zr, sr = zeros.repeat_interleave(group, 1), scales.repeat_interleave(group, 1)
    with torch.no_grad():
        linear.weight.copy_((q - zr).float() * sr)
    layer = QuantLinear(bits, group, in_f, out_f, False, g_idx=True)
    layer.device = torch.device("cpu")  # auto-round's exporter sets this before packing
    layer.pack(linear, scales, zeros.clone(), None)
    return layer, linear.weight.detach().clone()


@pytest.mark.parametrize("packer", ["zp", "plain"])
@pytest.mark.parametrize(("bits", "group"), [(4, 128), (4, 32), (8, 128), (2, 64)])
def test_dequantize_reproduces_auto_rounds_packed_weights(packer: str, bits: int, group: int) -> None:
    layer, expected = _packed_layer(packer, bits, group)
    q: Any = layer
    w = dequantize_gptq(q.qweight, q.qzeros, q.scales, getattr(q, "g_idx", None),
                        zero_offset=1 if packer == "zp" else 0, in_features=256)  # fmt: skip
    assert w.shape == expected.shape
    # scales are stored as fp16, so compare with the fp16-rounded scales' precision
    torch.testing.assert_close(w, expected, rtol=2e-3, atol=1e-4)
    # the wrong zero-point convention is off by one quantization step everywhere
    wrong = dequantize_gptq(q.qweight, q.qzeros, q.scales, None,
                            zero_offset=0 if packer == "zp" else 1, in_features=256)  # fmt: skip
    assert (wrong - expected).abs().mean() > 1e-3


@pytest.mark.parametrize("packer", ["zp", "plain"])
def test_dequantized_matmul_matches_auto_rounds_inference_kernel(packer: str) -> None:
    """auto-round's own torch QuantLinear.forward (an independent unpacking) gives the same outputs.

    Square layer: the zero-point kernel's g_idx path assumes in_features == out_features."""
    layer, _ = _packed_layer(packer, 4, 128, out_f=256)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(1)).half()
    with torch.no_grad():
        y_kernel = layer(x).float()
    q: Any = layer
    w = dequantize_gptq(q.qweight, q.qzeros, q.scales, None,
                        zero_offset=1 if packer == "zp" else 0, in_features=256)  # fmt: skip
    y = x.float() @ w.t()
    torch.testing.assert_close(y, y_kernel, rtol=2e-2, atol=2e-2)


def test_dequantize_refuses_a_packing_it_cannot_read() -> None:
    with pytest.raises(GateError, match=r"unsupported|pack"):
        dequantize_gptq(torch.zeros(16, 8, dtype=torch.int32), torch.zeros(2, 1, dtype=torch.int32),
                        torch.ones(2, 8), None, in_features=100)  # fmt: skip
    with pytest.raises(GateError, match="in_features unknown"):
        dequantize_gptq(torch.zeros(16, 8, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32),
                        torch.ones(1, 8), None)  # fmt: skip
