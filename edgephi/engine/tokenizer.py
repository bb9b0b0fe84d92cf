"""The artifact's Hugging Face tokenizer behind the :class:`~edgephi.engine.protocol.Tokenizer` interface."""

from __future__ import annotations

from collections.abc import Sequence

from edgephi.phi4 import END_OF_TURN


class HfTokenizer:
    """The artifact's Hugging Face tokenizer (the one vLLM also loads), with Phi-4's chat template."""

    def __init__(self, model: str, vocab_size: int) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(model)
        self.vocab_size = vocab_size
        eot = self._tok.convert_tokens_to_ids(END_OF_TURN)
        self.end_of_turn_id: int | None = eot if isinstance(eot, int) and eot != self._tok.unk_token_id else None
        # Byte-level BPE vocab entries hold one character per byte, so an entry's length bounds the characters
        # its token decodes to.
        self.max_token_chars = max((len(t) for t in self._tok.get_vocab()), default=1)
        added = getattr(self._tok, "added_tokens_decoder", {}) or {}
        self.special_tokens = tuple(
            sorted(
                {str(t.content) for t in added.values() if getattr(t, "special", False)}
                | {str(t) for t in self._tok.all_special_tokens}
            )
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added), each in ``[0, vocab_size)``."""
        return list(self._tok.encode(text, add_special_tokens=False))

    def render_chat_text(self, messages: Sequence[tuple[str, str]]) -> str:
        """``messages`` rendered with the chat template plus the assistant generation prompt (text, not ids)."""
        text = self._tok.apply_chat_template(
            [{"role": r, "content": c} for r, c in messages], tokenize=False, add_generation_prompt=True
        )
        return str(text)

    def render_chat(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """Token ids of :meth:`render_chat_text`."""
        return self.encode(self.render_chat_text(messages))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=True))
