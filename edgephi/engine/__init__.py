"""The inference engine: domain types (:mod:`.types`), the interface (:mod:`.protocol`), the Hugging Face
tokenizer (:mod:`.tokenizer`) and the vLLM adapter (:mod:`.vllm`, imported on its own: it pulls in psutil and,
lazily, vLLM)."""

from edgephi.engine.protocol import Engine, Tokenizer
from edgephi.engine.types import (
    Delta,
    EngineDeadError,
    EngineLoadError,
    EngineRequestError,
    EngineStats,
    FinishReason,
    GenerationRequest,
    ModelInfo,
    Sampling,
)

__all__ = [
    "Delta",
    "Engine",
    "EngineDeadError",
    "EngineLoadError",
    "EngineRequestError",
    "EngineStats",
    "FinishReason",
    "GenerationRequest",
    "ModelInfo",
    "Sampling",
    "Tokenizer",
]
