"""One parameter object per auto-round run: profiles → overrides → the manifest's field names, and the checks
``edgephi quantize`` runs on it before any work (on synthetic checkpoints: safetensors headers suffice)."""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path
from typing import Any

import pytest

from edgephi.artifacts import build
from edgephi.artifacts.autoround import EXPORT_FORMATS, METADATA_FILE, PROFILES, AutoRoundParams, read_metadata
from edgephi.artifacts.checkpoint import decoder_linears, parameter_count, tensor_shapes

#: The manifest's ``quantization`` keys written since edgephi-artifact/1 (readers depend on them).
MANIFEST_KEYS = ("bits", "group_size", "sym", "iters", "nsamples", "seqlen", "batch_size", "gradient_accumulate_steps",
                 "low_gpu_mem_usage", "export_format", "quant_lm_head", "device")  # fmt: skip


def fake_checkpoint(root: Path, shapes: dict[str, list[int]], config: dict[str, Any] | None = None) -> Path:
    """A config.json and a model.safetensors whose header declares ``shapes`` (bf16; zero-filled data)."""
    root.mkdir(parents=True)
    cfg = {"architectures": ["Phi3ForCausalLM"], "max_position_embeddings": 4096, **(config or {})}
    (root / "config.json").write_text(json.dumps(cfg))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    with open(root / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + b"\0" * offset)
    return root


def tiny_shapes(in_features: int = 256) -> dict[str, list[int]]:
    return {"model.embed_tokens.weight": [512, 256], "model.layers.0.mlp.down_proj.weight": [256, in_features],
            "model.layers.0.self_attn.o_proj.weight": [256, 256], "model.layers.0.input_layernorm.weight": [256],
            "lm_head.weight": [512, 256]}  # fmt: skip


# ------------------------------------------------------------------------------------------ the object


def test_defaults_are_the_default_profile_and_the_articles_recipe() -> None:
    d = AutoRoundParams()
    assert d == PROFILES["default"].params() == AutoRoundParams.from_profile("default")
    assert (d.bits, d.group_size, d.sym, d.iters, d.nsamples, d.seqlen, d.export_format) == (
        4, 128, True, 256, 128, 2048, "auto_gptq")  # fmt: skip
    assert d.scheme == "W4A16" and AutoRoundParams(bits=8).scheme == "W8A16"


def test_frozen_and_hashable() -> None:
    p = AutoRoundParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.iters = 3  # type: ignore[misc]
    assert len({p, AutoRoundParams(), AutoRoundParams(iters=3)}) == 2


def test_profiles_follow_auto_rounds_documented_memory() -> None:
    p = PROFILES
    assert p["16gb"].params() == p["default"].params()
    assert p["default"].low_gpu_mem_usage and not p["24gb"].low_gpu_mem_usage
    assert p["default"].vram_14b_gib is not None and p["default"].vram_14b_gib <= 16
    assert p["12gb"].vram_14b_gib is not None and p["12gb"].vram_14b_gib <= 12
    assert (p["12gb"].batch_size, p["12gb"].gradient_accumulate_steps) == (1, 8)
    assert p["rtn"].iters == 0 and p["rtn"].vram_14b_gib is None
    assert all(prof.note for prof in p.values())
    assert all(prof.params().problems() == [] for prof in p.values())
    assert all(type(prof.params()) is AutoRoundParams for prof in p.values())


def test_from_profile_applies_the_overrides_given_and_ignores_none() -> None:
    params = AutoRoundParams.from_profile("12gb", iters=10, nsamples=None, low_gpu_mem_usage=None, device="cuda:1")
    assert params.iters == 10 and params.nsamples == 128 and params.low_gpu_mem_usage and params.device == "cuda:1"
    assert (params.batch_size, params.gradient_accumulate_steps) == (1, 8)
    assert AutoRoundParams.from_profile("24gb", low_gpu_mem_usage=False).low_gpu_mem_usage is False  # False is given
    with pytest.raises(KeyError):
        AutoRoundParams.from_profile("8gb")
    with pytest.raises(TypeError):
        AutoRoundParams.from_profile("default", iterations=3)


def test_to_json_keeps_the_manifest_field_names_and_round_trips() -> None:
    p = AutoRoundParams.from_profile("12gb", iters=16, device="cpu")
    data = p.to_json()
    assert tuple(data) == MANIFEST_KEYS
    assert json.loads(json.dumps(data)) == data
    # what a manifest's quantization section holds around the fields is ignored when reading it back
    section = build.quantization_section(p, {"device": "cpu", "nsamples": 100, "seconds": 1.5}, {"local_corpus": "x"})
    assert section["tool"] == "auto-round" and section["scheme"] == "W4A16" and section["nsamples_used"] == 100
    assert {k: section[k] for k in MANIFEST_KEYS} == data
    assert AutoRoundParams.from_json(section) == p
    assert AutoRoundParams.from_json({"iters": 0}) == AutoRoundParams(iters=0)


def test_problems() -> None:
    assert AutoRoundParams().problems() == []
    assert AutoRoundParams(iters=0, nsamples=1, batch_size=1).problems() == []
    assert AutoRoundParams(nsamples=4, batch_size=8).problems() == ["batch size 8 > nsamples 4"]
    for bad in ({"iters": -1}, {"bits": 0}, {"nsamples": 0}, {"seqlen": 0}, {"batch_size": 0},
                {"gradient_accumulate_steps": 0}):  # fmt: skip
        problems = AutoRoundParams(**bad).problems()  # type: ignore[arg-type]
        assert len(problems) == 1 and ">= 1" in problems[0], bad


def test_read_metadata(tmp_path: Path) -> None:
    assert read_metadata(tmp_path) == {}
    (tmp_path / METADATA_FILE).write_text(json.dumps({"iters": 4, "nsamples": 7}))
    assert read_metadata(tmp_path) == {"iters": 4, "nsamples": 7}
    (tmp_path / METADATA_FILE).write_text("{broken")
    with pytest.raises(ValueError):
        read_metadata(tmp_path)


# --------------------------------------------------------------------------------------- before any work


def test_a_servable_configuration_passes(tmp_path: Path) -> None:
    src = fake_checkpoint(tmp_path / "ok", tiny_shapes())
    assert build.check_config(src, AutoRoundParams(), target="cpu") == []
    assert build.check_config(src, AutoRoundParams(bits=8), target="gpu") == []
    assert build.check_config(src, AutoRoundParams(export_format="auto_round", bits=3, sym=False), target="gpu") == []


@pytest.mark.parametrize(
    ("params", "target", "reason"),
    [
        (AutoRoundParams(bits=3), "gpu", "vLLM loads GPTQ checkpoints only as symmetric 4 or 8 bits"),
        (AutoRoundParams(sym=False), "gpu", "vLLM loads GPTQ checkpoints only as symmetric"),
        (AutoRoundParams(bits=8), "cpu", "portable CPU W4A16 kernel"),
        (AutoRoundParams(export_format="auto_round", bits=1), "gpu", "INC loader supports bits 2-8"),
        (AutoRoundParams(export_format="gguf"), "gpu", "export format 'gguf'"),
        (AutoRoundParams(quant_lm_head=True), "gpu", "quantized lm_head"),
        (AutoRoundParams(group_size=96), "gpu", "group size 96: vLLM's W4A16 kernels take"),
        (AutoRoundParams(nsamples=4, batch_size=8), "gpu", "batch size 8 > nsamples 4"),
        (AutoRoundParams(seqlen=8192), "gpu", "seqlen 8192 > the model's max_position_embeddings 4096"),
    ],
)
def test_unservable_configurations_are_refused(tmp_path: Path, params: AutoRoundParams, target: str,
                                               reason: str) -> None:  # fmt: skip
    src = fake_checkpoint(tmp_path / "ok", tiny_shapes())
    reasons = build.check_config(src, params, target=target)
    assert any(reason in r for r in reasons), reasons


def test_group_size_must_divide_every_quantized_layer(tmp_path: Path) -> None:
    fake = fake_checkpoint(tmp_path / "fake", tiny_shapes(in_features=320))
    reasons = build.check_config(fake, AutoRoundParams(group_size=128), target="gpu")
    assert any("does not divide the in-features [320] of 1 linear layers" in r for r in reasons), reasons
    assert build.check_config(fake, AutoRoundParams(group_size=64), target="gpu") == []
    assert build.check_config(fake, AutoRoundParams(group_size=-1), target="gpu") == []


def test_sources_that_cannot_be_quantized(tmp_path: Path) -> None:
    assert build.check_config(tmp_path / "nowhere", AutoRoundParams(), target="gpu") == [
        f"{tmp_path / 'nowhere'} is not a checkpoint directory (no config.json)"
    ]
    quantized = fake_checkpoint(tmp_path / "q", tiny_shapes(), {"quantization_config": {"bits": 4}})
    assert any("already quantized" in r for r in build.check_config(quantized, AutoRoundParams(), target="gpu"))
    no_weights = tmp_path / "nw"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    assert build.check_config(no_weights, AutoRoundParams(), target="gpu") == [
        f"{no_weights}: no *.safetensors weights"
    ]
    (no_weights / "model.safetensors").write_bytes(b"\x05")
    assert "unreadable safetensors header" in build.check_config(no_weights, AutoRoundParams(), target="gpu")[0]
    no_linears = fake_checkpoint(tmp_path / "nl", {"model.embed_tokens.weight": [512, 256]})
    assert any("no decoder-block linear" in r for r in build.check_config(no_linears, AutoRoundParams(), target="gpu"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{")
    assert "unreadable" in build.check_config(tmp_path / "bad", AutoRoundParams(), target="gpu")[0]


def test_checkpoint_headers_and_size_estimate(tmp_path: Path) -> None:
    src = fake_checkpoint(tmp_path / "ok", tiny_shapes())
    tensors = tensor_shapes(src)
    assert tensors["model.layers.0.mlp.down_proj.weight"] == ("BF16", [256, 256])
    assert "__metadata__" not in tensors
    assert decoder_linears(tensors) == {"model.layers.0.mlp.down_proj": (256, 256),
                                        "model.layers.0.self_attn.o_proj": (256, 256)}  # fmt: skip
    assert parameter_count(src) == 2 * 512 * 256 + 2 * 256 * 256 + 256
    est = build.estimate_artifact_bytes(src, AutoRoundParams())
    linear = 256 * 256 // 2 + 2 * 256 * 2 * 2 + 256 * 4  # 4-bit weights, fp16 scales + zeros per group, g_idx
    assert est == 2 * linear + (2 * 512 * 256 + 256) * 2
    assert build.estimate_artifact_bytes(src, AutoRoundParams(bits=8)) > est


def test_export_formats_are_the_ones_check_config_accepts(tmp_path: Path) -> None:
    src = fake_checkpoint(tmp_path / "ok", tiny_shapes())
    for fmt in EXPORT_FORMATS:
        assert build.check_config(src, AutoRoundParams(export_format=fmt), target="cpu") == [], fmt
