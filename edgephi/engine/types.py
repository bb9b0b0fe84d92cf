"""The engine's domain types: what goes in (a validated :class:`GenerationRequest`), what comes out
(:class:`Delta` s), what is served (:class:`ModelInfo`), and the errors an engine raises.

Transport-neutral: both front doors and the generation service speak these; only the vLLM adapter
(:mod:`edgephi.engine.vllm`) turns them into vLLM's own types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "cancelled"]


class EngineRequestError(ValueError):
    """The engine refused a request's parameters (a check our validation does not make)."""


class EngineDeadError(RuntimeError):
    """The engine process died or errored; nothing more can be generated in this process."""


class EngineLoadError(RuntimeError):
    """The engine could not be started. ``exit_code`` is 78 (EX_CONFIG) when the settings or the artifact are
    wrong, so that systemd does not restart-loop on them, and 1 for other failures."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Sampling:
    """Validated sampling options with the server defaults already applied (see :mod:`edgephi.validation`)."""

    max_tokens: int
    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request: prompt token ids (each in ``[0, vocab_size)``) and sampling options."""

    prompt_token_ids: tuple[int, ...]
    sampling: Sampling


@dataclass
class Delta:
    """One streamed step: new text and token ids since the previous step.

    ``finish_reason`` is set on the last delta only, together with the usage counts.
    """

    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class ModelInfo:
    """What is being served (GetModelInfo)."""

    model_name: str
    model_path: str
    quantization: str
    weight_bits: int
    group_size: int
    max_context_tokens: int
    vocab_size: int
    artifact_digest: str
    engine_version: str
    kv_capacity_tokens: int  # KV-cache blocks × block size (0 when the engine does not report it)


@dataclass
class EngineStats:
    """Engine-side counters for metrics and tests (not part of the gRPC API)."""

    unfinished_requests: int
    kv_cache_usage: float | None = None
    extra: dict[str, float] = field(default_factory=dict)
