"""The engine interface, alone in its module (as vLLM keeps ``vllm/engine/protocol.py``): what the generation
service, the watchdog and the daemon need from an inference engine and its tokenizer.

Implementations: :class:`edgephi.engine.vllm.VllmEngine` (production) and :class:`edgephi.testing.FakeEngine`
(tests of everything above the engine, in-process and in milliseconds).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Protocol

from edgephi.engine.types import Delta, EngineStats, GenerationRequest, ModelInfo


class Tokenizer(Protocol):
    """The model's tokenizer as validation needs it."""

    vocab_size: int
    end_of_turn_id: int | None
    max_token_chars: int  # longest text one token can stand for (bounds characters per token)
    special_tokens: tuple[str, ...]  # every special token's text: chat content may not contain them

    def encode(self, text: str) -> list[int]: ...

    def render_chat_text(self, messages: Sequence[tuple[str, str]]) -> str: ...


class Engine(Protocol):
    """What the generation service, the watchdog and the daemon need from an inference engine."""

    @property
    def info(self) -> ModelInfo:
        """What is served (fixed once loaded)."""
        ...

    @property
    def tokenizer(self) -> Tokenizer:
        """The served model's tokenizer (used from one thread at a time)."""
        ...

    def generate(self, request: GenerationRequest, request_id: str) -> AsyncGenerator[Delta, None]:
        """Stream deltas; closing the generator (``aclose``) or cancelling its consumer aborts the request in
        the engine. The last delta has ``finish_reason`` and the usage counts.

        Raises:
            EngineDeadError: the engine died during the request.
            EngineRequestError: the engine refused the request's parameters.
        """
        ...

    async def abort(self, request_id: str) -> None: ...

    async def check_health(self) -> None:
        """Raise :class:`EngineDeadError` if the engine cannot serve any more."""
        ...

    def stats(self) -> EngineStats: ...

    def core_pids(self) -> list[int]:
        """PIDs of the engine-core process(es), for the watchdog's liveness check."""
        ...
