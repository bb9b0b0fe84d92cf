"""The chat-format verdict and fix (:mod:`edgephi.artifacts.chat_format`) on synthetic artifact directories with
Phi-4's old and new tokenizer/generation configs, and the manifest's ``chat_format`` section."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from edgephi import phi4
from edgephi.artifacts import chat_format as cf
from edgephi.artifacts import manifest as mf

OLD_TEMPLATE = phi4.CHAT_TEMPLATE.split("{% if add_generation_prompt %}")[0]


def _write(root: Path, name: str, data: Any) -> None:
    (root / name).write_text(json.dumps(data) if not isinstance(data, str) else data, encoding="utf-8")


def make_phi4(
    root: Path, *, eos: Any = (phi4.END_OF_TURN_ID,), template: str = phi4.CHAT_TEMPLATE, im_end: bool = True,
    pad: int | None = phi4.PAD_ID,
) -> Path:  # fmt: skip
    """A Phi-4-shaped artifact: real ids, tokenizer.json's added tokens, tokenizer_config, generation_config."""
    root.mkdir(parents=True, exist_ok=True)
    added = [(phi4.ENDOFTEXT_ID, phi4.ENDOFTEXT), (100264, phi4.IM_START), (100266, phi4.IM_SEP),
             (phi4.PAD_ID, phi4.PAD)]  # fmt: skip
    if im_end:
        added.append((phi4.END_OF_TURN_ID, phi4.IM_END))
    _write(root, "tokenizer.json", {"added_tokens": [{"id": i, "content": c, "special": True} for i, c in added],
                                    "model": {"type": "BPE", "vocab": {"a": 0}}})  # fmt: skip
    _write(root, "tokenizer_config.json", {"chat_template": template, "eos_token": phi4.ENDOFTEXT})
    gen: dict[str, Any] = {
        "bos_token_id": phi4.ENDOFTEXT_ID,
        "eos_token_id": eos if isinstance(eos, int) else list(eos),
    }
    if pad is not None:
        gen["pad_token_id"] = pad
    _write(root, "generation_config.json", gen)
    (root / "model.safetensors").write_bytes(b"\0" * 16)
    return root


def test_new_config_is_ok(tmp_path: Path) -> None:
    root = make_phi4(tmp_path / "a", eos=(phi4.END_OF_TURN_ID,))
    v = cf.inspect(root)
    assert v.ok and v.end_of_turn_id == phi4.END_OF_TURN_ID and v.generation_prompt, v.line()
    before = {p.name: p.read_bytes() for p in root.iterdir()}
    assert cf.fix(root) == []
    assert {p.name: p.read_bytes() for p in root.iterdir()} == before  # nothing rewritten


def test_old_config_eos_endoftext_only_is_fixed(tmp_path: Path) -> None:
    root = make_phi4(tmp_path / "a", eos=phi4.ENDOFTEXT_ID, pad=None)
    v = cf.inspect(root)
    assert not v.ok and not v.refused
    assert any("generation_config.json: eos_token_id 100257 lacks <|im_end|> (id 100265)" in p for p in v.fixable)
    fixes = cf.fix(root)
    gen = json.loads((root / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [phi4.END_OF_TURN_ID, phi4.ENDOFTEXT_ID]
    assert gen["pad_token_id"] == phi4.PAD_ID and gen["bos_token_id"] == phi4.ENDOFTEXT_ID
    assert [(f.file, f.field, f.was) for f in fixes] == [
        ("generation_config.json", "eos_token_id", phi4.ENDOFTEXT_ID),
        ("generation_config.json", "pad_token_id", None),
    ]
    assert cf.inspect(root).ok


def test_old_template_without_generation_prompt_is_replaced(tmp_path: Path) -> None:
    root = make_phi4(tmp_path / "a", template=OLD_TEMPLATE)
    assert any("has no add_generation_prompt branch" in p for p in cf.inspect(root).fixable)
    fixes = cf.fix(root)
    assert [(f.file, f.field) for f in fixes] == [("tokenizer_config.json", "chat_template")]
    conf = json.loads((root / "tokenizer_config.json").read_text())
    assert conf["chat_template"] == phi4.CHAT_TEMPLATE and conf["eos_token"] == phi4.ENDOFTEXT


def test_missing_generation_config_is_created(tmp_path: Path) -> None:
    root = make_phi4(tmp_path / "a")
    (root / "generation_config.json").unlink()
    cf.fix(root)
    gen = json.loads((root / "generation_config.json").read_text())
    assert gen == {"eos_token_id": [phi4.END_OF_TURN_ID, phi4.ENDOFTEXT_ID], "pad_token_id": phi4.PAD_ID}


def test_no_im_end_token_is_refused_with_the_reason(tmp_path: Path) -> None:
    root = make_phi4(tmp_path / "a", im_end=False, eos=phi4.ENDOFTEXT_ID)
    v = cf.inspect(root)
    assert v.refused == [
        "tokenizer.json: no <|im_end|> token in the vocabulary (added_tokens): a chat turn cannot end on it"
    ]
    with pytest.raises(cf.ChatFormatError, match=re.escape("no <|im_end|> token")):
        cf.fix(root)
    assert json.loads((root / "generation_config.json").read_text())["eos_token_id"] == phi4.ENDOFTEXT_ID


def test_unreadable_generation_config_is_refused(tmp_path: Path) -> None:
    root = make_phi4(tmp_path / "a")
    (root / "generation_config.json").write_text("{not json")
    assert [r.split(":")[0] for r in cf.inspect(root).refused] == ["generation_config.json"]


def test_standin_ids_come_from_its_tokenizer(tmp_path: Path) -> None:
    """A small vocabulary numbers the tokens differently: the fix uses its ids, never Phi-4's."""
    root = tmp_path / "tiny"
    root.mkdir()
    toks = [phi4.ENDOFTEXT, phi4.IM_START, phi4.IM_SEP, phi4.IM_END, phi4.PAD]
    _write(root, "tokenizer.json", {"added_tokens": [{"id": i, "content": c, "special": True}
                                                     for i, c in enumerate(toks)]})  # fmt: skip
    _write(root, "tokenizer_config.json", {"chat_template": phi4.CHAT_TEMPLATE})
    _write(root, "generation_config.json", {"eos_token_id": 0, "pad_token_id": 4})
    cf.fix(root)
    assert json.loads((root / "generation_config.json").read_text())["eos_token_id"] == [3, 0]


def test_phi4_vocabulary_with_wrong_ids_is_refused(tmp_path: Path) -> None:
    root = make_phi4(tmp_path / "a")
    tok = json.loads((root / "tokenizer.json").read_text())
    for t in tok["added_tokens"]:
        if t["content"] == phi4.PAD:
            t["id"] = 100350
    _write(root, "tokenizer.json", tok)
    assert cf.inspect(root).refused == ["tokenizer.json: <|dummy_85|> is id 100350, Phi-4's is 100349"]


def test_manifest_records_the_chat_files_and_verifies_them(tmp_path: Path) -> None:
    root = make_phi4(tmp_path / "a", eos=phi4.ENDOFTEXT_ID)
    fixes, section = cf.apply(root)
    assert section["fixed"] == [f.to_json() for f in fixes] and section["ok"] is True
    assert {e["path"] for e in section["files"]} == {
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    for e in section["files"]:
        assert e["sha256"] == mf.sha256_file(root / e["path"])
    data = mf.new_manifest("a", root, show_progress=False, chat_format=section)
    mf.write_atomic(root / mf.MANIFEST, data)
    assert mf.verify(root, show_progress=False) == []
    # a section digest that disagrees with `files` is a problem
    data["chat_format"]["files"][0]["sha256"] = "0" * 64
    mf.write_atomic(root / mf.MANIFEST, data)
    assert any(p.startswith("chat_format: ") for p in mf.verify(root, show_progress=False))


def test_old_manifest_without_the_section_still_verifies(tmp_path: Path) -> None:
    root = make_phi4(tmp_path / "a")
    data = mf.new_manifest("a", root, show_progress=False)
    assert "chat_format" not in data
    mf.write_atomic(root / mf.MANIFEST, data)
    assert mf.verify(root, show_progress=False) == []


# --------------------------------------------------------------------------------- fetch (local directory source)


def _published(root: Path) -> str:
    """Write the manifest a publisher would (no chat_format section); return its sha256 (the --sha256 pin)."""
    mf.write_atomic(root / mf.MANIFEST, mf.new_manifest(root.name, root, show_progress=False))
    return mf.artifact_digest(root).removeprefix("sha256:")


def test_fetch_fixes_an_old_config_and_records_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from edgephi.cli import main

    monkeypatch.setattr("signal.signal", lambda *a: None)
    src = make_phi4(tmp_path / "old-phi4", eos=phi4.ENDOFTEXT_ID)
    pin = _published(src)
    code = main(["fetch", str(src), "--sha256", pin, "--store", str(tmp_path / "store")])
    assert code == 0, capsys.readouterr().err
    art = tmp_path / "store" / "old-phi4"
    assert json.loads((art / "generation_config.json").read_text())["eos_token_id"] == [100265, 100257]
    data = mf.load(art)
    assert data["chat_format"]["fixed"][0]["field"] == "eos_token_id"
    assert data["chat_format"]["fixed_from"] == "sha256:" + pin
    assert mf.verify(art, show_progress=False) == []
    assert json.loads((src / "generation_config.json").read_text())["eos_token_id"] == phi4.ENDOFTEXT_ID  # source
    code = main(["verify", str(art), "--store", str(tmp_path / "store")])
    assert code == 0 and "chat format: ends a turn on <|im_end|> (id 100265)" in capsys.readouterr().out


def test_fetch_keeps_a_correct_artifact_byte_for_byte(tmp_path: Path) -> None:
    from edgephi.artifacts.fetch import fetch
    from edgephi.artifacts.store import Store

    src = make_phi4(tmp_path / "new-phi4")
    pin = _published(src)
    art = fetch(Store(tmp_path / "store"), str(src), pin, show_progress=False)
    assert mf.artifact_digest(art) == "sha256:" + pin  # the published digest, untouched


def test_fetch_refuses_an_artifact_without_im_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from edgephi.cli import main
    from edgephi.exit_codes import ExitCode

    monkeypatch.setattr("signal.signal", lambda *a: None)
    src = make_phi4(tmp_path / "no-im-end", im_end=False)
    pin = _published(src)
    code = main(["fetch", str(src), "--sha256", pin, "--store", str(tmp_path / "store")])
    err = capsys.readouterr().err
    assert code == ExitCode.REFUSED, err
    assert "tokenizer.json: no <|im_end|> token" in err and "nothing was installed" in err
    assert not (tmp_path / "store" / "no-im-end").exists()


def test_verify_reports_an_old_config_in_place(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgephi.cli import main
    from edgephi.exit_codes import ExitCode

    art = make_phi4(tmp_path / "store" / "old", eos=phi4.ENDOFTEXT_ID)
    _published(art)
    assert main(["verify", str(art), "--store", str(tmp_path / "store")]) == ExitCode.FAILED
    err = capsys.readouterr().err
    assert "generation_config.json: eos_token_id 100257 lacks <|im_end|>" in err and "edgephi serve" in err


def test_odd_shapes_do_not_crash(tmp_path: Path) -> None:
    root = make_phi4(tmp_path / "a")
    _write(root, "tokenizer.json", {"model": "tiny", "added_tokens": "x"})
    assert any("no <|im_end|> token" in r for r in cf.inspect(root).refused)
