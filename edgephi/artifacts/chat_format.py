"""Does an artifact end a chat turn on ``<|im_end|>``? Read its tokenizer and generation-config files, say so,
fix what can be fixed, and name what cannot.

Microsoft changed Phi-4's files after release: ``generation_config.json`` now ends a turn with ``<|im_end|>``
(id 100265) and pads with ``<|dummy_85|>`` (id 100349), and the chat template gained an ``add_generation_prompt``
branch. Copies quantized before that still say ``eos_token_id: 100257`` (``<|endoftext|>``) only, so a consumer
that stops on the generation config's eos (vLLM's defaults, transformers' ``generate``) runs every reply to
``max_tokens``. The rules (:func:`inspect`), with ids read from the artifact's own tokenizer (the stand-in's
small vocabulary numbers them differently; only :func:`inspect`'s Phi-4 check uses the real ids):

* ``<|im_end|>`` must be one token of the vocabulary, marked special: otherwise the artifact is refused
  (nothing in the config can make a model stop on a token it does not have);
* ``generation_config.json``'s ``eos_token_id`` must include that id: otherwise :func:`fix` rewrites it to
  ``[<|im_end|>, <|endoftext|>]`` (and ``pad_token_id`` to ``<|dummy_85|>``'s id when missing), creating the
  file if there is none;
* the chat template must have the ``add_generation_prompt`` branch (edgephi renders prompts with it): otherwise
  :func:`fix` puts Phi-4's current template (:data:`edgephi.phi4.CHAT_TEMPLATE`) in its place;
* with Phi-4's vocabulary (``<|im_end|>`` is id 100265 there) the ids must be Phi-4's: a mismatch is refused.

Pure: reads JSON files only (no transformers); :func:`fix` writes the rewritten files atomically.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgephi import phi4
from edgephi.artifacts import manifest as mf

__all__ = [
    "CHAT_FILES",
    "GENERATION_CONFIG",
    "SECTION",
    "TOKENIZER",
    "TOKENIZER_CONFIG",
    "ChatFormatError",
    "Fix",
    "Verdict",
    "apply",
    "fix",
    "inspect",
    "section",
]

GENERATION_CONFIG = "generation_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER = "tokenizer.json"
TEMPLATE_FILE = "chat_template.jinja"
#: The files that decide how a chat is rendered and where it ends (recorded with their digests in the manifest).
CHAT_FILES = (
    GENERATION_CONFIG,
    TOKENIZER,
    TOKENIZER_CONFIG,
    TEMPLATE_FILE,
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)
#: The manifest section written by :func:`section`.
SECTION = "chat_format"


class ChatFormatError(ValueError):
    """The artifact cannot end a chat on ``<|im_end|>`` and cannot be fixed: the reasons name file and field.

    Attributes:
        reasons: one sentence per problem.
    """

    def __init__(self, reasons: list[str]) -> None:
        self.reasons = reasons
        super().__init__("; ".join(reasons))


@dataclass(frozen=True)
class Fix:
    """One field rewritten by :func:`fix`."""

    file: str
    field: str
    was: Any
    now: Any
    why: str

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "field": self.field, "was": self.was, "now": self.now, "why": self.why}

    def line(self) -> str:
        return f"{self.file}: {self.field} {self.was!r} -> {self.now!r} ({self.why})"


@dataclass
class Verdict:
    """What :func:`inspect` found.

    Attributes:
        end_of_turn_id: ``<|im_end|>``'s id in this vocabulary (None: no such token).
        endoftext_id: ``<|endoftext|>``'s id (None: no such token).
        pad_id: ``<|dummy_85|>``'s id (None: no such token).
        eos_token_id: ``generation_config.json``'s ``eos_token_id`` as a list (empty: missing).
        pad_token_id: ``generation_config.json``'s ``pad_token_id``.
        generation_prompt: the chat template has the ``add_generation_prompt`` branch.
        refused: problems :func:`fix` cannot repair (file and field named).
        fixable: problems :func:`fix` repairs.
    """

    end_of_turn_id: int | None = None
    endoftext_id: int | None = None
    pad_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    generation_prompt: bool = False
    refused: list[str] = field(default_factory=list)
    fixable: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Ends a turn on ``<|im_end|>`` as it is."""
        return not self.refused and not self.fixable

    def line(self) -> str:
        if self.refused:
            return "refused: " + "; ".join(self.refused)
        if self.fixable:
            return "needs a fix: " + "; ".join(self.fixable)
        return (
            f"ends a turn on {phi4.END_OF_TURN} (id {self.end_of_turn_id}): generation_config eos_token_id "
            f"{self.eos_token_id}, chat template with add_generation_prompt"
        )


def _read_json(path: Path, refused: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        refused.append(f"{path.name}: unreadable ({exc})")
        return None
    if not isinstance(data, dict):
        refused.append(f"{path.name}: not a JSON object")
        return None
    return data


def _token_table(root: Path, refused: list[str]) -> dict[str, tuple[int, bool]]:
    """``{content: (id, special)}`` for the added tokens (tokenizer.json, tokenizer_config.json's
    ``added_tokens_decoder``, added_tokens.json), plus plain vocabulary entries of the tokens looked for."""
    table: dict[str, tuple[int, bool]] = {}
    wanted = (phi4.IM_END, phi4.ENDOFTEXT, phi4.PAD)
    tok = _read_json(root / TOKENIZER, refused)
    if tok is not None:
        model = tok.get("model")
        vocab = model.get("vocab") if isinstance(model, dict) else None
        if isinstance(vocab, dict):
            for w in wanted:
                if isinstance(vocab.get(w), int):
                    table[w] = (vocab[w], False)
        added_tokens = tok.get("added_tokens")
        for t in added_tokens if isinstance(added_tokens, list) else []:
            if isinstance(t, dict) and isinstance(t.get("id"), int) and isinstance(t.get("content"), str):
                table[t["content"]] = (t["id"], bool(t.get("special")))
    conf = _read_json(root / TOKENIZER_CONFIG, refused)
    decoder = (conf or {}).get("added_tokens_decoder")
    for key, t in (decoder if isinstance(decoder, dict) else {}).items():
        if isinstance(t, dict) and isinstance(t.get("content"), str) and str(key).isdigit():
            old = table.get(t["content"])
            table[t["content"]] = (int(key), bool(t.get("special")) or (old is not None and old[1]))
    added = _read_json(root / "added_tokens.json", refused)
    for content, i in (added or {}).items():
        if isinstance(i, int) and content not in table:
            table[content] = (i, content in phi4.CHAT_CONTROL_TOKENS)
    return table


def _template(root: Path, refused: list[str]) -> tuple[str | None, str]:
    """The chat template and where it lives (``chat_template.jinja`` wins, as in transformers)."""
    jinja = root / TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8"), TEMPLATE_FILE
    conf = _read_json(root / TOKENIZER_CONFIG, refused) or {}
    tmpl = conf.get("chat_template")
    if isinstance(tmpl, list):  # named templates: [{"name": "default", "template": ...}]
        tmpl = next((t.get("template") for t in tmpl if isinstance(t, dict) and t.get("name") == "default"), None)
    return (tmpl if isinstance(tmpl, str) else None), TOKENIZER_CONFIG


def _ids(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def inspect(root: Path) -> Verdict:
    """The verdict on the artifact in ``root`` (rules in the module docstring). Reads files only."""
    v = Verdict()
    table = _token_table(root, v.refused)
    if not (root / TOKENIZER).is_file() and not (root / TOKENIZER_CONFIG).is_file():
        v.refused.append(f"no {TOKENIZER} or {TOKENIZER_CONFIG}: no tokenizer to end a turn with")
        return v
    eot = table.get(phi4.IM_END)
    if eot is None:
        v.refused.append(
            f"{TOKENIZER}: no {phi4.IM_END} token in the vocabulary (added_tokens): a chat turn cannot end on it"
        )
    else:
        v.end_of_turn_id = eot[0]
        if not eot[1]:
            v.refused.append(f"{TOKENIZER}: added_tokens {phi4.IM_END} (id {eot[0]}) is not marked special")
    v.endoftext_id = table[phi4.ENDOFTEXT][0] if phi4.ENDOFTEXT in table else None
    v.pad_id = table[phi4.PAD][0] if phi4.PAD in table else None
    if v.end_of_turn_id == phi4.END_OF_TURN_ID:  # Phi-4's own vocabulary: its ids are known
        for name, want, got in (
            (phi4.ENDOFTEXT, phi4.ENDOFTEXT_ID, v.endoftext_id),
            (phi4.PAD, phi4.PAD_ID, v.pad_id),
        ):
            if got is not None and got != want:
                v.refused.append(f"{TOKENIZER}: {name} is id {got}, Phi-4's is {want}")
    gen = _read_json(root / GENERATION_CONFIG, v.refused)
    if gen is not None:
        v.eos_token_id = _ids(gen.get("eos_token_id"))
        pad = gen.get("pad_token_id")
        v.pad_token_id = pad if isinstance(pad, int) and not isinstance(pad, bool) else None
    if v.end_of_turn_id is not None:
        if gen is None and not (root / GENERATION_CONFIG).exists():
            v.fixable.append(f"no {GENERATION_CONFIG}: its eos_token_id must include {v.end_of_turn_id}")
        elif gen is not None and v.end_of_turn_id not in v.eos_token_id:
            v.fixable.append(
                f"{GENERATION_CONFIG}: eos_token_id {gen.get('eos_token_id')!r} lacks {phi4.IM_END} "
                f"(id {v.end_of_turn_id}): replies would run to max_tokens"
            )
    tmpl, where = _template(root, v.refused)
    v.generation_prompt = tmpl is not None and "add_generation_prompt" in tmpl
    if not v.generation_prompt:
        v.fixable.append(
            f"{where}: chat_template {'missing' if tmpl is None else 'has no add_generation_prompt branch'}"
        )
    v.refused = list(dict.fromkeys(v.refused))
    return v


def fix(root: Path) -> list[Fix]:
    """Rewrite what :func:`inspect` finds fixable in ``root`` (nothing when it is fine); return what changed.

    Raises:
        ChatFormatError: the artifact cannot be fixed (no ``<|im_end|>`` token, unreadable files, wrong ids).
    """
    v = inspect(root)
    if v.refused:
        raise ChatFormatError(v.refused)
    assert v.end_of_turn_id is not None
    fixes: list[Fix] = []
    eot = v.end_of_turn_id
    if eot not in v.eos_token_id:
        path = root / GENERATION_CONFIG
        gen: dict[str, Any] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        want = [eot, *([v.endoftext_id] if v.endoftext_id is not None and v.endoftext_id != eot else [])]
        why = f"{phi4.IM_END} (id {eot}) ends a chat turn; without it replies run to max_tokens"
        fixes.append(Fix(GENERATION_CONFIG, "eos_token_id", gen.get("eos_token_id"), want, why))
        gen["eos_token_id"] = want
        if v.pad_id is not None and v.pad_token_id is None:
            fixes.append(Fix(GENERATION_CONFIG, "pad_token_id", gen.get("pad_token_id"), v.pad_id,
                             f"Phi-4 pads with {phi4.PAD}"))  # fmt: skip
            gen["pad_token_id"] = v.pad_id
        _write_text(path, json.dumps(gen, indent=2) + "\n")
    if not v.generation_prompt:
        jinja = root / TEMPLATE_FILE
        was: Any
        if jinja.is_file():
            was = jinja.read_text(encoding="utf-8")
            _write_text(jinja, phi4.CHAT_TEMPLATE)
            where = TEMPLATE_FILE
        else:
            path = root / TOKENIZER_CONFIG
            conf = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
            was = conf.get("chat_template")
            conf["chat_template"] = phi4.CHAT_TEMPLATE
            _write_text(path, json.dumps(conf, indent=2, ensure_ascii=False) + "\n")
            where = TOKENIZER_CONFIG
        fixes.append(Fix(where, "chat_template", was, "Phi-4's current template (edgephi.phi4.CHAT_TEMPLATE)",
                         "prompts are rendered with add_generation_prompt"))  # fmt: skip
    after = inspect(root)
    if not after.ok:  # pragma: no cover - fix repairs every fixable problem inspect reports
        raise ChatFormatError(after.refused + after.fixable)
    return fixes


def section(root: Path, fixes: list[Fix] | None = None) -> dict[str, Any]:
    """The manifest's ``chat_format`` section: the verdict's ids, the chat files and their sha256, what
    :func:`fix` changed (and why)."""
    v = inspect(root)
    files = [{"path": name, "sha256": mf.sha256_file(root / name)} for name in CHAT_FILES if (root / name).is_file()]
    return {
        "end_of_turn": phi4.IM_END,
        "end_of_turn_id": v.end_of_turn_id,
        "eos_token_id": v.eos_token_id,
        "pad_token_id": v.pad_token_id,
        "generation_prompt": v.generation_prompt,
        "ok": v.ok,
        "fixed": [f.to_json() for f in fixes or []],
        "files": files,
    }


def apply(root: Path) -> tuple[list[Fix], dict[str, Any]]:
    """:func:`fix` then :func:`section`: what quantize and fetch run on a candidate before its manifest."""
    fixes = fix(root)
    return fixes, section(root, fixes)


def _write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
