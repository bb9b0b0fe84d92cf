"""The tiny stand-in's spec, cache key and one-line description, without building it (the builds are in
tests/integration/test_devmodel.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgephi import devmodel
from edgephi.artifacts.autoround import METADATA_FILE, AutoRoundParams
from edgephi.artifacts.corpus import stdlib_documents
from edgephi.devmodel import TinySpec


def test_spec_changes_the_cache_key() -> None:
    assert devmodel.spec_digest(TinySpec(train_steps=3)) != devmodel.spec_digest(TinySpec())
    assert devmodel.spec_digest(TinySpec()) == devmodel.spec_digest(TinySpec())
    assert len(devmodel.spec_digest(TinySpec())) == 12


def test_spec_rejects_widths_group128_cannot_cover() -> None:
    with pytest.raises(ValueError, match="multiple of 128"):
        TinySpec(intermediate_size=1000)
    with pytest.raises(ValueError, match="num_attention_heads"):
        TinySpec(hidden_size=384)
    with pytest.raises(ValueError, match="chat_fraction"):
        TinySpec(chat_fraction=1.5)


def test_default_cache_root_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDGEPHI_CACHE_DIR", str(tmp_path))
    assert devmodel.default_cache_root() == tmp_path
    monkeypatch.delenv("EDGEPHI_CACHE_DIR")
    assert devmodel.default_cache_root() == Path.home() / ".cache" / "edgephi"


def test_format_chat_is_phi4s_template() -> None:
    assert devmodel.format_chat("Q", "A", system="S") == (
        "<|im_start|>system<|im_sep|>S<|im_end|><|im_start|>user<|im_sep|>Q<|im_end|>"
        "<|im_start|>assistant<|im_sep|>A<|im_end|>"
    )


def test_dev_artifact_params_are_one_auto_round_parameter_object() -> None:
    p = devmodel.dev_artifact_params(32)
    assert isinstance(p, AutoRoundParams) and p.problems() == []
    assert (p.bits, p.group_size, p.sym, p.export_format, p.iters) == (4, 128, True, "auto_gptq", 32)
    assert p.nsamples * p.seqlen < AutoRoundParams().nsamples * AutoRoundParams().seqlen / 10  # a quick recipe


def _fake_standin(root: Path) -> Path:
    bf16 = root / "tiny-phi3-0123456789ab"
    bf16.mkdir(parents=True)
    meta = {
        "parameters": 13_111_808,
        "train_seconds": 134.6,
        "train_threads": 2,
        "train_tokens": 286_720,
        "spec": {"train_steps": 560, "prose_only": True},
    }
    (bf16 / "edgephi_devmodel.json").write_text(json.dumps(meta))
    return bf16


def test_describe_says_what_the_standin_is(tmp_path: Path) -> None:
    bf16 = _fake_standin(tmp_path)
    line = devmodel.describe(bf16)
    assert "\n" not in line
    assert line.startswith("tiny-phi3-0123456789ab is a stand-in, not Phi-4: a 13.1M-parameter Phi3ForCausalLM")
    assert "randomly initialised and trained for 560 steps (287k tokens, 135 s on 2 CPU threads)" in line
    assert "on the prose of Python standard-library docstrings" in line
    # an artifact quantized from it is described through its source
    art = tmp_path / "art"
    art.mkdir()
    (art / METADATA_FILE).write_text(json.dumps({"source": str(bf16), "bits": 4, "group_size": 128, "iters": 32}))
    line = devmodel.describe(art)
    assert line.startswith("tiny-phi3-0123456789ab is a stand-in, not Phi-4")
    assert "quantized to W4A16 g128 by auto-round (32 iterations)" in line


def test_describe_refuses_other_models(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a tiny Phi-4 stand-in"):
        devmodel.describe(tmp_path)
    (tmp_path / METADATA_FILE).write_text(json.dumps({"source": str(tmp_path / "phi-4")}))
    with pytest.raises(FileNotFoundError, match="not a tiny Phi-4 stand-in"):
        devmodel.describe(tmp_path)


def test_prose_keeps_sentences_and_drops_examples_code_and_tables() -> None:
    doc = (
        "Return the number of items.\n\n"
        "The count includes items that were\nadded after the last call.\n\n"
        ">>> count([1, 2])\n2\n\n"
        "x = {'a': [1, 2], 'b': (3, 4)}; y = f(x)[0]\n\n"
        "Args:\n    items: the items to count.\n\n"
        "- first\n- second"
    )
    assert devmodel.prose(doc) == (
        "Return the number of items.\n\n"
        "The count includes items that were added after the last call.\n\n"  # wrapped lines joined
        "Args:\nitems: the items to count.\n\n"  # a headed section keeps its lines, not their indentation
        "- first\n- second"
    )
    assert devmodel.prose(">>> f()\n1") == ""


def test_training_documents_follow_the_spec() -> None:
    raw = devmodel.training_documents("heldout", TinySpec(prose_only=False))
    assert raw == stdlib_documents("heldout")
    text = devmodel.training_documents("heldout", TinySpec())
    assert text and all(len(t) >= 40 and ">>>" not in t for t in text)
    assert len(text) <= len(raw)
