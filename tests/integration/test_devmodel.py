"""The tiny Phi-4 stand-in: cached and deterministic builds, Phi-4 tokenizer conventions, a usable model.

The spec and cache-key rules (pure logic) are in tests/unit/test_devmodel_spec.py."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from edgephi import devmodel
from edgephi.devmodel import (
    BOS_TOKEN,
    CHAT_TEMPLATE,
    IM_END,
    IM_SEP,
    IM_START,
    PAD_TOKEN,
    TinySpec,
)
from tests._models import tiny_model_dir, vllm_generate

# A spec small enough to build twice in a few seconds (every width still a multiple of 128).
MICRO = TinySpec(
    hidden_size=128,
    num_hidden_layers=1,
    num_attention_heads=1,
    num_key_value_heads=1,
    head_dim=128,
    intermediate_size=128,
    tokenizer_vocab_size=384,
    train_steps=3,
    batch_size=2,
    seq_len=32,
    corpus_max_chars=100_000,
    seed=7,
)

NON_ASCII = "héllo wörld 日本語 🙂"


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return tiny_model_dir()


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture(scope="session")
def hf_model(model_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16)
    model.eval()
    return model


# ----------------------------------------------------------------------------------------- build and cache


def test_build_is_cached_and_deterministic(tmp_path: Path) -> None:
    a = devmodel.build(tmp_path / "a", MICRO)
    b = devmodel.build(tmp_path / "b", MICRO)
    assert a.name == b.name == f"tiny-phi3-{devmodel.spec_digest(MICRO)}"
    assert devmodel.weights_digest(a) == devmodel.weights_digest(b)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()

    mtime = (a / "model.safetensors").stat().st_mtime_ns
    assert devmodel.build(tmp_path / "a", MICRO) == a
    assert (a / "model.safetensors").stat().st_mtime_ns == mtime  # cached: not rebuilt
    # the build went through a temp dir that was renamed away: nothing else is left beside it
    assert sorted(p.name for p in (tmp_path / "a").iterdir() if not p.name.endswith(".lock")) == [a.name]


# ----------------------------------------------------------------------------------- checkpoint and config


def test_checkpoint_layout_matches_phi4_conventions(model_dir: Path) -> None:
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (model_dir / name).is_file(), name
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["Phi3ForCausalLM"]
    assert config["dtype"] == "bfloat16"
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    assert head_dim == 128
    assert config["num_attention_heads"] == 4 * config["num_key_value_heads"]
    assert config["vocab_size"] % 128 == 0
    assert config["rope_parameters"]["rope_theta"] == 250000.0
    qkv = (config["num_attention_heads"] + 2 * config["num_key_value_heads"]) * head_dim
    for width in (config["hidden_size"], config["intermediate_size"], qkv):
        assert width % 128 == 0

    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == CHAT_TEMPLATE
    assert tok_cfg["eos_token"] == IM_END
    assert tok_cfg["bos_token"] == BOS_TOKEN

    vocab = json.loads((model_dir / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in vocab}
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert sorted(gen["eos_token_id"]) == sorted([ids[IM_END], ids[BOS_TOKEN]])
    assert gen["bos_token_id"] == ids[BOS_TOKEN]
    assert config["eos_token_id"] == ids[IM_END]

    meta = json.loads((model_dir / "edgephi_devmodel.json").read_text())
    assert meta["spec_digest"] == devmodel.spec_digest(TinySpec())


# --------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_non_ascii(tokenizer: Any) -> None:
    for text in (NON_ASCII, "  indented\n\ttabs\r\n", "x = {'k': [1, 2]}  # ok"):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    # no BOS/EOS added implicitly (Phi-4 adds none)
    assert tokenizer.encode("hi") == tokenizer.encode("hi", add_special_tokens=False)


def test_special_tokens_are_single_tokens(tokenizer: Any) -> None:
    for token in (BOS_TOKEN, IM_START, IM_SEP, IM_END, PAD_TOKEN):
        ids = tokenizer.encode(token, add_special_tokens=False)
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids) == [token]
    assert tokenizer.eos_token == IM_END
    assert tokenizer.pad_token == PAD_TOKEN
    assert len(tokenizer) <= json.loads((tiny_model_dir() / "config.json").read_text())["vocab_size"]


def test_chat_template_renders_phi4_format(tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Sort a list?"},
        {"role": "assistant", "content": "Use sorted()."},
        {"role": "user", "content": "Thanks"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system<|im_sep|>You are terse.<|im_end|>"
        "<|im_start|>user<|im_sep|>Sort a list?<|im_end|>"
        "<|im_start|>assistant<|im_sep|>Use sorted().<|im_end|>"
        "<|im_start|>user<|im_sep|>Thanks<|im_end|>"
        "<|im_start|>assistant<|im_sep|>"
    )
    assert rendered == devmodel.format_chat("Sort a list?", "Use sorted().", system="You are terse.") + (
        "<|im_start|>user<|im_sep|>Thanks<|im_end|><|im_start|>assistant<|im_sep|>"
    )
    closed = tokenizer.apply_chat_template(messages[:3], tokenize=False)
    assert closed.endswith("Use sorted().<|im_end|>")
    assert closed.count(IM_END) == 3


# ------------------------------------------------------------------------------------------------- model


def _greedy(hf_model: Any, tokenizer: Any, prompt: str, n: int) -> list[int]:
    import torch

    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
    with torch.no_grad():
        out = hf_model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return [int(t) for t in out[0, ids.shape[1] :]]


@pytest.mark.parametrize("prompt", ["Return the number of", "Create a new", "This module provides"])
def test_greedy_continuation_is_not_degenerate(hf_model: Any, tokenizer: Any, prompt: str) -> None:
    new = _greedy(hf_model, tokenizer, prompt, 24)
    text = tokenizer.decode(new)
    assert len(new) == 24
    assert len(set(new)) >= 6, (prompt, text)
    longest_run = max(sum(1 for _ in g) for _, g in itertools.groupby(new))
    assert longest_run <= 4, (prompt, text)
    assert text.strip(), (prompt, text)


def test_model_ends_assistant_turn_with_im_end(hf_model: Any, tokenizer: Any) -> None:
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Return the absolute value of a number."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    new = _greedy(hf_model, tokenizer, prompt, 160)
    assert tokenizer.convert_tokens_to_ids(IM_END) in new, tokenizer.decode(new)


def test_heldout_perplexity_is_far_below_uniform(model_dir: Path) -> None:
    meta = json.loads((model_dir / "edgephi_devmodel.json").read_text())
    ppl = devmodel.heldout_perplexity(model_dir, seq_len=meta["spec"]["seq_len"])
    assert ppl == pytest.approx(meta["heldout_perplexity_bf16"], rel=0.15)
    assert ppl < meta["vocab_size"] / 10, ppl


def test_vllm_serves_it_and_detokenizes_non_ascii(model_dir: Path, tokenizer: Any) -> None:
    # Structured outputs force the model to spell NON_ASCII token by token (byte-level pieces that split
    # UTF-8 characters): vLLM's incremental detokenizer must reassemble the exact string.
    result = vllm_generate(
        model_dir,
        [
            {"prompt": "Return the number of", "ignore_eos": True},
            {"prompt": "Say it:", "choice": [NON_ASCII], "max_tokens": 48},
        ],
    )
    assert result["texts"][1] == NON_ASCII
    assert result["finish_reasons"][1] == "stop"
    assert len(set(result["token_ids"][0])) >= 6, result["texts"][0]
    assert result["texts"][0] == tokenizer.decode(result["token_ids"][0], skip_special_tokens=True)
