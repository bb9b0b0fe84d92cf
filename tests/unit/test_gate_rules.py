"""The quality gate's pure rules: zero-point conventions per packing, evaluation windows, the recorded result.

Dequantization against auto-round's packers and the gate on real artifacts are in tests/integration."""

from __future__ import annotations

import pytest

from edgephi.artifacts.gate import GateError, GateResult, Thresholds, _windows, zero_point_offset


def test_zero_point_conventions() -> None:
    assert zero_point_offset({"quant_method": "gptq"}) == 1
    assert zero_point_offset({"quant_method": "gptq", "checkpoint_format": "gptq_v2"}) == 0
    assert zero_point_offset({"quant_method": "auto-round", "packing_format": "auto_round:auto_gptq"}) == 1
    assert zero_point_offset({"quant_method": "auto-round"}) == 1  # auto-round's default packing
    assert zero_point_offset({"quant_method": "auto-round", "packing_format": "auto_round"}) == 0
    assert zero_point_offset({"quant_method": "auto-round", "packing_format": "auto_round:gptqmodel"}) == 0
    assert zero_point_offset({"quant_method": "intel/auto-round", "packing_format": "auto_round"}) == 0


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"quant_method": "auto-round", "packing_format": "auto_round:auto_awq"}, "AWQ"),
        ({"quant_method": "fp8"}, "quant_method 'fp8'"),
        ({"quant_method": "gptq", "data_type": "nv_fp4"}, "data_type 'nv_fp4'"),
        ({}, "quant_method ''"),
    ],
)
def test_packings_the_gate_cannot_read(config: dict[str, str], message: str) -> None:
    with pytest.raises(GateError, match=message):
        zero_point_offset(config)


def test_windows_share_one_token_and_cover_every_target() -> None:
    ids = list(range(10))
    windows = _windows(ids, 4)
    assert windows == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9]]
    assert sum(len(w) - 1 for w in windows) == len(ids) - 1  # every token after the first is predicted once
    assert _windows([1], 4) == []


def _result(ratio: float, top1: float, passed: bool) -> GateResult:
    return GateResult(passed=passed, ppl_ratio=ratio, top1_agreement=top1, ppl_quantized=20.123456,
                      ppl_reference=19.87654, tokens=2048, thresholds=Thresholds(), reference="/ref", eval_text={},
                      device="cpu", dtype="float32", seconds=3.14159)  # fmt: skip


def test_result_json_and_line() -> None:
    r = _result(1.0123456, 0.9712345, True)
    data = r.to_json()
    assert data["ppl_ratio"] == 1.0123 and data["top1_agreement"] == 0.9712 and data["seconds"] == 3.1416
    assert data["thresholds"] == {"max_ppl_ratio": 1.15, "min_top1": 0.8}
    assert data["passed"] is True and data["tokens"] == 2048
    line = r.line()
    assert line.startswith("gate PASSED: perplexity ratio 1.0123") and "top-1 agreement 97.12%" in line
    assert "2048 held-out tokens" in line
    assert _result(3.0, 0.2, False).line().startswith("gate FAILED")
