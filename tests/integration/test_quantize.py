"""auto-round W4A16 quantization of the tiny Phi-4 stand-in, and serving the result with vLLM on CPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open

from edgephi.artifacts.autoround import AutoRoundParams, quantize
from tests._models import (
    quantized_model_dir,
    tiny_model_dir,
    vllm_generate,
)

DECODER_LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


FORMATS = ("auto_gptq", "auto_round")


@pytest.fixture(scope="session", params=FORMATS)
def quantized(request: pytest.FixtureRequest) -> tuple[str, Path]:
    """(export format, quantized checkpoint dir). For auto_gptq, the artifact the serving tests use
    (conftest's ``dev_models``) when that fixture exists; otherwise a quick one of our own."""
    fmt: str = request.param
    if fmt == "auto_gptq":
        try:
            return fmt, Path(request.getfixturevalue("dev_models")[1])
        except pytest.FixtureLookupError:
            pass
    return fmt, quantized_model_dir(fmt)


def _tensors(model_dir: Path) -> dict[str, str]:
    """Tensor name -> safetensors dtype string (e.g. "I32", "F16") over all shards."""
    out: dict[str, str] = {}
    for shard in model_dir.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is no mapping
                out[name] = str(f.get_slice(name).get_dtype())
    return out


# -------------------------------------------------------------------------------------------------- refusals


def test_quantize_refuses_existing_output_and_short_calibration(tmp_path: Path) -> None:
    src = tiny_model_dir()
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError):
        quantize(src, tmp_path / "exists", AutoRoundParams(iters=0, nsamples=1, seqlen=32, batch_size=1))
    with pytest.raises(ValueError, match="too short"):
        rtn = AutoRoundParams(iters=0, nsamples=1, seqlen=256, batch_size=1)
        quantize(src, tmp_path / "q", rtn, calibration_texts=["far too short"])
    with pytest.raises(ValueError, match="batch size 8 > nsamples 1"):
        quantize(src, tmp_path / "q", AutoRoundParams(iters=0, nsamples=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]  # no temp dir left behind


# ------------------------------------------------------------------------------------------------ artifact


def test_quantization_config(quantized: tuple[str, Path]) -> None:
    fmt, qdir = quantized
    config = json.loads((qdir / "config.json").read_text())
    q = config["quantization_config"]
    assert q["bits"] == 4
    assert q["group_size"] == 128
    assert q["sym"] is True
    if fmt == "auto_gptq":
        assert q["quant_method"] == "gptq"
        assert q["lm_head"] is False
    else:
        assert q["quant_method"] == "auto-round"
        assert q["packing_format"] == "auto_round:auto_gptq"
    meta = json.loads((qdir / "edgephi_quantize.json").read_text())
    assert meta["bits"] == 4 and meta["export_format"] == fmt and meta["iters"] == q["iters"]
    # the run's parameters are recorded under their own names and read back as the same object
    recorded = AutoRoundParams.from_json(meta)
    assert (recorded.bits, recorded.group_size, recorded.sym, recorded.export_format) == (4, 128, True, fmt)


def test_every_decoder_linear_is_quantized_and_lm_head_is_not(quantized: tuple[str, Path]) -> None:
    _, qdir = quantized
    config = json.loads((qdir / "config.json").read_text())
    tensors = _tensors(qdir)
    for layer in range(config["num_hidden_layers"]):
        for linear in DECODER_LINEARS:
            prefix = f"model.layers.{layer}.{linear}"
            assert {f"{prefix}.qweight", f"{prefix}.scales", f"{prefix}.qzeros"} <= tensors.keys(), prefix
            assert f"{prefix}.weight" not in tensors, prefix
            assert tensors[f"{prefix}.qweight"] == "I32"
    assert tensors["lm_head.weight"] in ("F16", "BF16")
    assert not any(n.startswith("lm_head.") and n != "lm_head.weight" for n in tensors)
    # nothing is left in float32 (auto-round tunes in fp32 on CPUs without bf16)
    assert "F32" not in tensors.values()


def test_artifact_is_self_contained_and_readable(quantized: tuple[str, Path]) -> None:
    _, qdir = quantized
    src = tiny_model_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (qdir / name).read_bytes() == (src / name).read_bytes(), name
    assert qdir.stat().st_mode & 0o755 == 0o755
    for p in qdir.iterdir():
        assert p.stat().st_mode & 0o644 == 0o644, p


def _serve_and_check(qdir: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(qdir))
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Return the absolute value of a number."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    result = vllm_generate(
        qdir, [{"prompt": "Return the number of", "ignore_eos": True}, {"prompt": chat, "max_tokens": 64}]
    )
    for text, ids in zip(result["texts"], result["token_ids"], strict=True):
        assert ids, result
        assert text.strip(), result
    # vLLM's detokenization agrees with the HF tokenizer's
    assert result["texts"][0] == tok.decode(result["token_ids"][0], skip_special_tokens=True)
    return result


def test_vllm_cpu_serves_the_quantized_model(quantized: tuple[str, Path]) -> None:
    """auto_gptq (the default) and auto_round (vLLM's INC path: Intel's ARK kernels if auto-round-lib is
    installed, else the same GPTQ W4A16 GEMM). On AVX2-only CPUs the GEMM is edgephi.vllm_plugin's."""
    _serve_and_check(quantized[1])
