"""Pure proto ⇄ domain conversions for the gRPC door: request messages become the validation layer's inputs
(field names are the proto paths, e.g. ``sampling.top_p``), engine deltas become response messages."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from edgephi.engine.types import Delta
from edgephi.v1 import inference_pb2 as pb
from edgephi.validation import (
    ChatMessage,
    ChatPrompt,
    MissingPrompt,
    Prompt,
    SamplingInput,
    TextPrompt,
    TokenIdsPrompt,
)

_FINISH = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "cancelled": pb.FINISH_REASON_CANCELLED,
}
_OPTIONAL = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "min_tokens",
    "seed",
    "ignore_eos",
)


def sampling_input(opts: pb.SamplingOptions) -> SamplingInput:
    """``SamplingOptions`` as the client set them (unset ``optional`` fields → ``None``)."""
    given = {name: getattr(opts, name) for name in _OPTIONAL if opts.HasField(name)}
    return SamplingInput(stop=tuple(opts.stop), prefix="sampling.", **given)


def generate_prompt(req: pb.GenerateRequest) -> Prompt:
    which = req.WhichOneof("prompt")
    if which == "text":
        return TextPrompt(req.text, "text")
    if which == "token_ids":
        return TokenIdsPrompt(tuple(req.token_ids.ids), "token_ids.ids")
    return MissingPrompt("prompt", "text or token_ids")


def chat_prompt(messages: Iterable[Any], field: str = "messages") -> ChatPrompt:
    """Repeated ``ChatMessage`` → :class:`ChatPrompt` named ``field`` in errors."""
    return ChatPrompt(tuple(ChatMessage(m.role, m.content) for m in messages), field)


def count_tokens_input(req: pb.CountTokensRequest) -> TextPrompt | ChatPrompt | MissingPrompt:
    which = req.WhichOneof("input")
    if which == "text":
        return TextPrompt(req.text, "text")
    if which == "chat":
        return chat_prompt(req.chat.messages, "chat.messages")
    return MissingPrompt("input", "text or chat")


def fill_response(msg: pb.GenerateResponse | pb.ChatResponse, delta: Delta) -> None:
    """Copy a :class:`Delta` into a (new) ``GenerateResponse`` or ``ChatResponse``."""
    msg.text = delta.text
    msg.token_ids.extend(delta.token_ids)
    if delta.finish_reason is not None:
        msg.finish_reason = _FINISH[delta.finish_reason]
        msg.usage.prompt_tokens = delta.prompt_tokens
        msg.usage.completion_tokens = delta.completion_tokens
