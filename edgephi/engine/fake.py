"""A fake engine and tokenizer, shipped with the package for tests (as httpx ships ``MockTransport``).

:class:`FakeEngine` implements :class:`~edgephi.engine.protocol.Engine` in-process and in milliseconds, so that
the generation service, the front doors, the state machine and the watchdog can be tested without vLLM. It is
deterministic: the reply to a prompt is :attr:`FakeEngine.reply` (by default ``"fake reply to N tokens"``),
streamed one token (one UTF-8 byte) per delta, cut at ``max_tokens`` (``finish_reason`` "length") or at the
first stop string (``"stop"``). Knobs for fault cases: ``token_delay_s`` (seconds between deltas),
``hold`` (an :class:`asyncio.Event` each request waits on before its first delta), ``fail_after`` /
``failure`` (raise an exception after N deltas), :meth:`die` (health fails, streams raise
``EngineDeadError``). It records what it was asked (:attr:`requests`) and what was aborted (:attr:`aborted`).

:class:`FakeTokenizer` is byte-level: ids 0–255 are UTF-8 bytes, Phi-4's chat control tokens get ids 256–259,
and chat rendering follows Phi-4's template (``<|im_start|>role<|im_sep|>content<|im_end|>``).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field

from edgephi.engine.types import Delta, EngineDeadError, EngineStats, GenerationRequest, ModelInfo
from edgephi.phi4 import CHAT_CONTROL_TOKENS, END_OF_TURN, IM_END, IM_SEP, IM_START

__all__ = ["FakeEngine", "FakeTokenizer"]


class FakeTokenizer:
    """Byte-level tokenizer: one id per UTF-8 byte; Phi-4's chat control tokens are single ids from 256."""

    def __init__(self) -> None:
        self.specials = {tok: 256 + i for i, tok in enumerate(CHAT_CONTROL_TOKENS)}
        self.vocab_size = 256 + len(self.specials)
        self.end_of_turn_id: int | None = self.specials[END_OF_TURN]
        self.special_tokens: tuple[str, ...] = tuple(self.specials)
        self.max_token_chars = max(len(t) for t in self.specials)
        self._split = re.compile("(" + "|".join(map(re.escape, self.specials)) + ")")
        self.encode_calls = 0

    def encode(self, text: str) -> list[int]:
        self.encode_calls += 1
        ids: list[int] = []
        for part in self._split.split(text):
            if part in self.specials:
                ids.append(self.specials[part])
            else:
                ids.extend(part.encode())
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens dropped (as vLLM's ``skip_special_tokens``)."""
        return bytes(i for i in ids if i < 256).decode(errors="replace")

    def render_chat_text(self, messages: Sequence[tuple[str, str]]) -> str:
        turns = "".join(f"{IM_START}{role}{IM_SEP}{content}{IM_END}" for role, content in messages)
        return f"{turns}{IM_START}assistant{IM_SEP}"


@dataclass
class FakeEngine:
    """An in-process :class:`~edgephi.engine.protocol.Engine` with scripted behaviour (see the module doc)."""

    reply: str | None = None
    token_delay_s: float = 0.0
    hold: asyncio.Event | None = None
    fail_after: int | None = None
    failure: BaseException | None = None
    max_context_tokens: int = 512
    kv_capacity_tokens: int = 4096
    tokenizer: FakeTokenizer = field(default_factory=FakeTokenizer)
    requests: list[tuple[str, GenerationRequest]] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    running: set[str] = field(default_factory=set)
    dead_reason: str = ""

    def __post_init__(self) -> None:
        self.info = ModelInfo(
            model_name="fake",
            model_path="/nonexistent/fake",
            quantization="none",
            weight_bits=16,
            group_size=0,
            max_context_tokens=self.max_context_tokens,
            vocab_size=self.tokenizer.vocab_size,
            artifact_digest="sha256:" + "0" * 64,
            engine_version="fake",
            kv_capacity_tokens=self.kv_capacity_tokens,
        )

    def reply_to(self, request: GenerationRequest) -> str:
        """The full text this engine generates for ``request`` (before ``max_tokens`` and stop strings)."""
        return self.reply if self.reply is not None else f"fake reply to {len(request.prompt_token_ids)} tokens"

    async def generate(self, request: GenerationRequest, request_id: str) -> AsyncGenerator[Delta, None]:
        """Stream the reply one byte-token per delta; see the module doc for the knobs.

        Raises:
            EngineDeadError: :meth:`die` was called (before or during the request).
            BaseException: ``failure``, after ``fail_after`` deltas.
        """
        self.requests.append((request_id, request))
        if self.dead_reason:
            raise EngineDeadError(self.dead_reason)
        self.running.add(request_id)
        finished = False
        try:
            if self.hold is not None:
                await self.hold.wait()
            text = self.reply_to(request)
            sampling = request.sampling
            finish = "length"
            cut = len(text)
            for stop in sampling.stop:
                at = text.find(stop)
                if at >= 0 and at < cut:
                    cut, finish = at, "stop"
            ids = list(text[:cut].encode())
            if len(ids) > sampling.max_tokens:
                ids, finish = ids[: sampling.max_tokens], "length"
            elif finish != "stop":
                finish = "stop" if not sampling.ignore_eos else "length"
            for n, token in enumerate(ids, start=1):
                if self.fail_after is not None and n > self.fail_after and self.failure is not None:
                    raise self.failure
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                else:
                    await asyncio.sleep(0)
                if self.dead_reason:
                    raise EngineDeadError(self.dead_reason)
                last = n == len(ids)
                yield Delta(
                    text=bytes([token]).decode(errors="replace"),
                    token_ids=[token],
                    finish_reason=finish if last else None,  # type: ignore[arg-type]
                    prompt_tokens=len(request.prompt_token_ids) if last else 0,
                    completion_tokens=len(ids) if last else 0,
                )
                finished = last
            if not ids:
                finished = True
                yield Delta("", [], finish_reason="stop", prompt_tokens=len(request.prompt_token_ids))
        finally:
            self.running.discard(request_id)
            if not finished:
                await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.running.discard(request_id)

    async def check_health(self) -> None:
        if self.dead_reason:
            raise EngineDeadError(self.dead_reason)

    def stats(self) -> EngineStats:
        return EngineStats(unfinished_requests=len(self.running))

    def core_pids(self) -> list[int]:
        return []

    def die(self, reason: str = "fake engine core killed") -> None:
        """From now on health fails and every stream raises :class:`EngineDeadError`."""
        self.dead_reason = reason
