"""Pure proto ⇄ domain conversions. Validation happens here, once, at the edge.

Every check raises :class:`InvalidArgument` naming the offending field by its proto path (e.g.
``sampling.top_p``); the servicer turns that into gRPC ``INVALID_ARGUMENT``. Nothing downstream re-checks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from edgephi.engine import CHAT_ROLES, Delta, GenerationRequest, Sampling, Tokenizer
from edgephi.v1 import inference_pb2 as pb

_FINISH = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "cancelled": pb.FINISH_REASON_CANCELLED,
}
MAX_SEED = 2**63 - 1
# vLLM's SamplingParams accepts temperatures in [0, 2] (vllm/sampling_params.py, _verify_args).
MAX_TEMPERATURE = 2.0
# A prompt longer than this many characters per context token is first tokenized only up to that length: if
# that prefix alone overflows the context, the prompt is refused without tokenizing the rest (a multi-MiB
# prompt would otherwise cost seconds of tokenizer time and memory for a certain refusal).
PROBE_CHARS_PER_TOKEN = 16
# Every chat turn renders to at least <|im_start|>, a role, <|im_sep|> and <|im_end|>: 4 tokens.
MIN_TOKENS_PER_CHAT_MESSAGE = 4
# Phi-4's chat control tokens: message content containing them could forge turns (prompt injection).
CHAT_CONTROL_TOKENS = ("<|im_start|>", "<|im_sep|>", "<|im_end|>", "<|endoftext|>")


class InvalidArgument(ValueError):
    """A request field is invalid. ``field`` is its proto path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Limits:
    """Server-side bounds and defaults a request is checked against."""

    max_context_tokens: int
    vocab_size: int
    default_max_tokens: int
    default_temperature: float
    max_stop_strings: int
    max_stop_string_chars: int


def sampling_from_proto(
    opts: pb.SamplingOptions, prompt_tokens: int, limits: Limits, prompt_field: str = "prompt"
) -> Sampling:
    """Validate ``opts`` and apply server defaults to unset fields.

    ``max_tokens`` unset → ``min(default_max_tokens, context left after the prompt)``; set → must fit
    ``prompt_tokens + max_tokens <= max_context_tokens``.

    Raises:
        InvalidArgument: naming ``sampling.<field>``.
    """
    room = limits.max_context_tokens - prompt_tokens
    if room <= 0:
        raise InvalidArgument(
            prompt_field,
            f"prompt is {prompt_tokens} tokens; the context holds {limits.max_context_tokens} (prompt + max_tokens)",
        )

    if opts.HasField("max_tokens"):
        if opts.max_tokens <= 0:
            raise InvalidArgument("sampling.max_tokens", f"must be > 0, got {opts.max_tokens}")
        if opts.max_tokens > room:
            raise InvalidArgument(
                "sampling.max_tokens",
                f"prompt ({prompt_tokens} tokens) + max_tokens ({opts.max_tokens}) exceeds the context of "
                f"{limits.max_context_tokens} tokens; ask for at most {room}",
            )
        max_tokens = opts.max_tokens
    else:
        max_tokens = min(limits.default_max_tokens, room)

    temperature = limits.default_temperature
    if opts.HasField("temperature"):
        temperature = _finite("sampling.temperature", opts.temperature)
        if not 0 <= temperature <= MAX_TEMPERATURE:
            raise InvalidArgument("sampling.temperature", f"must be in [0, {MAX_TEMPERATURE:g}], got {temperature:g}")
    top_p = 1.0
    if opts.HasField("top_p"):
        top_p = _finite("sampling.top_p", opts.top_p)
        if not 0 < top_p <= 1:
            raise InvalidArgument("sampling.top_p", f"must be in (0, 1], got {top_p:g}")
    top_k = 0
    if opts.HasField("top_k"):
        if opts.top_k < -1:
            raise InvalidArgument("sampling.top_k", f"must be -1, 0 (disabled) or >= 1, got {opts.top_k}")
        top_k = max(opts.top_k, 0)
    rep = 1.0
    if opts.HasField("repetition_penalty"):
        rep = _finite("sampling.repetition_penalty", opts.repetition_penalty)
        if rep <= 0:
            raise InvalidArgument("sampling.repetition_penalty", f"must be > 0, got {rep:g}")
    presence = _penalty(opts, "presence_penalty")
    frequency = _penalty(opts, "frequency_penalty")
    min_tokens = 0
    if opts.HasField("min_tokens"):
        if not 0 <= opts.min_tokens <= max_tokens:
            raise InvalidArgument(
                "sampling.min_tokens", f"must be in [0, max_tokens={max_tokens}], got {opts.min_tokens}"
            )
        min_tokens = opts.min_tokens
    seed = None
    if opts.HasField("seed"):
        if opts.seed < 0:
            raise InvalidArgument("sampling.seed", f"must be >= 0, got {opts.seed}")
        seed = opts.seed

    stops = tuple(opts.stop)
    if len(stops) > limits.max_stop_strings:
        raise InvalidArgument("sampling.stop", f"at most {limits.max_stop_strings} stop strings, got {len(stops)}")
    for i, s in enumerate(stops):
        if not s:
            raise InvalidArgument(f"sampling.stop[{i}]", "must not be empty")
        if len(s) > limits.max_stop_string_chars:
            raise InvalidArgument(
                f"sampling.stop[{i}]", f"at most {limits.max_stop_string_chars} characters, got {len(s)}"
            )

    return Sampling(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop=stops,
        seed=seed,
        repetition_penalty=rep,
        presence_penalty=presence,
        frequency_penalty=frequency,
        ignore_eos=opts.ignore_eos if opts.HasField("ignore_eos") else False,
        min_tokens=min_tokens,
    )


def _finite(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise InvalidArgument(name, f"must be a finite number, got {value}")
    return float(value)


def _penalty(opts: pb.SamplingOptions, name: str) -> float:
    if not opts.HasField(name):
        return 0.0
    value = _finite(f"sampling.{name}", getattr(opts, name))
    if not -2 <= value <= 2:
        raise InvalidArgument(f"sampling.{name}", f"must be in [-2, 2], got {value:g}")
    return value


def generate_request(req: pb.GenerateRequest, tokenizer: Tokenizer, limits: Limits) -> GenerationRequest:
    """Validate a ``GenerateRequest`` and tokenize its prompt.

    Raises:
        InvalidArgument: empty prompt (``text``/``token_ids``), ids outside ``[0, vocab_size)``
            (``token_ids.ids[i]``), or a bad sampling field.
    """
    which = req.WhichOneof("prompt")
    if which == "text":
        if not req.text.strip():
            raise InvalidArgument("text", "prompt text must not be empty")
        ids = encode_bounded(tokenizer, req.text, limits.max_context_tokens, "text")
        if not ids:
            raise InvalidArgument("text", "prompt text tokenizes to no tokens")
    elif which == "token_ids":
        ids = list(req.token_ids.ids)
        if not ids:
            raise InvalidArgument("token_ids.ids", "must not be empty")
        for i, t in enumerate(ids):
            if not 0 <= t < limits.vocab_size:
                raise InvalidArgument(
                    f"token_ids.ids[{i}]", f"token id {t} is outside the vocabulary [0, {limits.vocab_size})"
                )
    else:
        raise InvalidArgument("prompt", "set either text or token_ids")
    return GenerationRequest(tuple(ids), sampling_from_proto(req.sampling, len(ids), limits))


def encode_bounded(tokenizer: Tokenizer, text: str, max_tokens: int, field: str) -> list[int]:
    """Token ids of ``text``; a text far longer than ``max_tokens`` is refused after tokenizing a prefix.

    Raises:
        InvalidArgument: naming ``field``, when ``text`` is longer than ``max_tokens × max_token_chars``
            characters, or its first ``max_tokens × PROBE_CHARS_PER_TOKEN`` characters alone are more than
            ``max_tokens`` tokens.
    """
    most = max_tokens * tokenizer.max_token_chars
    if len(text) > most:  # cannot be max_tokens tokens or fewer: no token stands for more characters
        raise InvalidArgument(
            field,
            f"prompt is {len(text)} characters, more than the context of {max_tokens} tokens can hold "
            f"(at most {tokenizer.max_token_chars} characters per token)",
        )
    probe = max_tokens * PROBE_CHARS_PER_TOKEN
    if len(text) > probe:
        head = len(tokenizer.encode(text[:probe]))
        if head > max_tokens:
            raise InvalidArgument(
                field,
                f"prompt is {len(text)} characters, more than the context of {max_tokens} tokens "
                f"({head} tokens in its first {probe} characters alone)",
            )
    return tokenizer.encode(text)


def chat_messages(
    messages: Sequence[pb.ChatMessage],
    field: str = "messages",
    max_context_tokens: int | None = None,
    special_tokens: Sequence[str] = CHAT_CONTROL_TOKENS,
) -> list[tuple[str, str]]:
    """Validate chat messages: non-empty list, known roles, no chat control tokens in the content.

    Raises:
        InvalidArgument: ``messages`` empty or with more turns than the context can hold (each takes at least
            ``MIN_TOKENS_PER_CHAT_MESSAGE`` tokens), ``messages[i].role`` not one of system/user/assistant, or
            ``messages[i].content`` containing a special token (``special_tokens``, by default
            ``CHAT_CONTROL_TOKENS``; the servicer passes the tokenizer's whole list): it could forge turns.
    """
    if not messages:
        raise InvalidArgument(field, "must contain at least one message")
    if max_context_tokens is not None and len(messages) * MIN_TOKENS_PER_CHAT_MESSAGE > max_context_tokens:
        raise InvalidArgument(
            field,
            f"{len(messages)} messages cannot fit the context of {max_context_tokens} tokens "
            f"(each takes at least {MIN_TOKENS_PER_CHAT_MESSAGE})",
        )
    pattern = _special_pattern(tuple(special_tokens))
    out = []
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            raise InvalidArgument(
                f"{field}[{i}].role", f"unknown role {m.role!r}; expected one of {', '.join(CHAT_ROLES)}"
            )
        found = pattern.search(m.content) if pattern is not None else None
        if found:
            raise InvalidArgument(
                f"{field}[{i}].content",
                f"contains the special token {found.group(0)}, which could forge a chat turn; remove it "
                "(use Generate for raw prompts)",
            )
        out.append((m.role, m.content))
    return out


@functools.lru_cache(maxsize=8)
def _special_pattern(tokens: tuple[str, ...]) -> re.Pattern[str] | None:
    return re.compile("|".join(map(re.escape, sorted(tokens, key=len, reverse=True)))) if tokens else None


def chat_request(req: pb.ChatRequest, tokenizer: Tokenizer, limits: Limits) -> GenerationRequest:
    """Validate a ``ChatRequest`` and render it with the chat template; the turn ends at ``<|im_end|>``."""
    msgs = chat_messages(req.messages, "messages", limits.max_context_tokens, tokenizer.special_tokens)
    text = tokenizer.render_chat_text(msgs)
    ids = encode_bounded(tokenizer, text, limits.max_context_tokens, "messages")
    sampling = sampling_from_proto(req.sampling, len(ids), limits, "messages")
    if tokenizer.end_of_turn_id is not None:
        sampling = dataclasses.replace(sampling, stop_token_ids=(tokenizer.end_of_turn_id,))
    return GenerationRequest(tuple(ids), sampling)


def count_tokens(req: pb.CountTokensRequest, tokenizer: Tokenizer, limits: Limits) -> int:
    """Token count of a text or a rendered chat.

    Raises:
        InvalidArgument: neither ``text`` nor ``chat`` set, a bad chat message, or an input so long that a
            prefix alone overflows the context (see :func:`encode_bounded`).
    """
    which = req.WhichOneof("input")
    if which == "text":
        return len(encode_bounded(tokenizer, req.text, limits.max_context_tokens, "text"))
    if which == "chat":
        msgs = chat_messages(req.chat.messages, "chat.messages", limits.max_context_tokens, tokenizer.special_tokens)
        return len(
            encode_bounded(tokenizer, tokenizer.render_chat_text(msgs), limits.max_context_tokens, "chat.messages")
        )
    raise InvalidArgument("input", "set either text or chat")


def fill_response(msg: pb.GenerateResponse | pb.ChatResponse, delta: Delta) -> None:
    """Copy a :class:`Delta` into a (new) ``GenerateResponse`` or ``ChatResponse``."""
    msg.text = delta.text
    msg.token_ids.extend(delta.token_ids)
    if delta.finish_reason is not None:
        msg.finish_reason = _FINISH[delta.finish_reason]
        msg.usage.prompt_tokens = delta.prompt_tokens
        msg.usage.completion_tokens = delta.completion_tokens
