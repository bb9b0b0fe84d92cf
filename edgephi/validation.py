"""Request validation, once, at the edge of the core: a client's request becomes a :class:`GenerationRequest`.

Transport-neutral: a front door turns its wire format into the input types below (:class:`SamplingInput`,
:class:`TextPrompt`, :class:`TokenIdsPrompt`, :class:`ChatPrompt`) and hands them to a
:class:`RequestValidator`. Every check raises :class:`~edgephi.errors.InvalidArgument` naming the offending
field by its path in the request (the names the inputs carry, e.g. ``sampling.top_p``, ``messages[1].role``);
nothing downstream re-checks. A message that shows a client's value shows at most
:data:`~edgephi.errors.QUOTE_CHARS` characters of it (:func:`~edgephi.errors.quote`); sizes and numbers are
given instead of text elsewhere.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass

from edgephi.engine.protocol import Tokenizer
from edgephi.engine.types import GenerationRequest, Sampling
from edgephi.errors import InvalidArgument, quote
from edgephi.phi4 import CHAT_CONTROL_TOKENS, CHAT_ROLES, MIN_TOKENS_PER_CHAT_MESSAGE

__all__ = [
    "ChatMessage",
    "ChatPrompt",
    "InvalidArgument",
    "Limits",
    "MissingPrompt",
    "RequestValidator",
    "SamplingInput",
    "TextPrompt",
    "TokenIdsPrompt",
]

MAX_SEED = 2**63 - 1
# vLLM's SamplingParams accepts temperatures in [0, 2] (vllm/sampling_params.py, _verify_args).
MAX_TEMPERATURE = 2.0
# A prompt longer than this many characters per context token is first tokenized only up to that length: if
# that prefix alone overflows the context, the prompt is refused without tokenizing the rest (a multi-MiB
# prompt would otherwise cost seconds of tokenizer time and memory for a certain refusal).
PROBE_CHARS_PER_TOKEN = 16


@dataclass(frozen=True)
class Limits:
    """Server-side bounds and defaults a request is checked against (from the engine and the settings)."""

    max_context_tokens: int
    vocab_size: int
    default_max_tokens: int
    default_temperature: float
    max_stop_strings: int
    max_stop_string_chars: int


@dataclass(frozen=True)
class SamplingInput:
    """Sampling options as the client sent them; ``None`` means "not set" (the server default applies).

    ``prefix`` is the path of these options in the request (``sampling.`` on gRPC), put before each field
    name in errors.
    """

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    min_tokens: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool | None = None
    prefix: str = "sampling."


@dataclass(frozen=True)
class TextPrompt:
    """A raw text prompt (no chat template). ``field`` names it in errors."""

    text: str
    field: str = "text"


@dataclass(frozen=True)
class TokenIdsPrompt:
    """A prompt given as token ids (each must be in ``[0, vocab_size)``). ``field`` names the id list."""

    ids: tuple[int, ...]
    field: str = "token_ids.ids"


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class ChatPrompt:
    """Chat turns, rendered with the model's chat template; the reply ends at the end-of-turn token."""

    messages: tuple[ChatMessage, ...]
    field: str = "messages"


@dataclass(frozen=True)
class MissingPrompt:
    """The request set none of its prompt fields: refused with ``<field>: set either <expected>``."""

    field: str
    expected: str


Prompt = TextPrompt | TokenIdsPrompt | ChatPrompt | MissingPrompt


class RequestValidator:
    """Checks requests against :class:`Limits` and tokenizes them with the served model's tokenizer.

    Not thread-safe (the tokenizer is not): the service calls it from its one tokenizer thread.
    """

    def __init__(self, limits: Limits, tokenizer: Tokenizer) -> None:
        self.limits = limits
        self.tokenizer = tokenizer

    def generation(self, prompt: Prompt, sampling: SamplingInput) -> GenerationRequest:
        """Validate and tokenize a prompt and its sampling options.

        A :class:`ChatPrompt` is rendered with the chat template and stops at the end-of-turn token; for the
        others a prompt that leaves no room in the context is reported under ``prompt``.

        Raises:
            InvalidArgument: naming the prompt's field (empty, too long, ids outside the vocabulary, unknown
                chat role, chat control tokens in content) or a sampling field.
        """
        if isinstance(prompt, MissingPrompt):
            raise InvalidArgument(prompt.field, f"set either {prompt.expected}")
        if isinstance(prompt, ChatPrompt):
            ids = self._chat_ids(prompt)
            request = GenerationRequest(tuple(ids), self.sampling(sampling, len(ids), prompt.field))
            if self.tokenizer.end_of_turn_id is not None:
                stops = (self.tokenizer.end_of_turn_id,)
                request = dataclasses.replace(
                    request, sampling=dataclasses.replace(request.sampling, stop_token_ids=stops)
                )
            return request
        if isinstance(prompt, TextPrompt):
            if not prompt.text.strip():
                raise InvalidArgument(prompt.field, "prompt text must not be empty")
            ids = self.encode_bounded(prompt.text, prompt.field)
            if not ids:
                raise InvalidArgument(prompt.field, "prompt text tokenizes to no tokens")
        else:
            ids = list(prompt.ids)
            if not ids:
                raise InvalidArgument(prompt.field, "must not be empty")
            for i, t in enumerate(ids):
                if not 0 <= t < self.limits.vocab_size:
                    raise InvalidArgument(
                        f"{prompt.field}[{i}]", f"token id {t} is outside the vocabulary [0, {self.limits.vocab_size})"
                    )
        return GenerationRequest(tuple(ids), self.sampling(sampling, len(ids), "prompt"))

    def count_tokens(self, prompt: TextPrompt | ChatPrompt | MissingPrompt) -> int:
        """Token count of a text or of a rendered chat (generation prompt included).

        Raises:
            InvalidArgument: a bad chat message, or an input so long that a prefix alone overflows the context
                (see :meth:`encode_bounded`).
        """
        if isinstance(prompt, MissingPrompt):
            raise InvalidArgument(prompt.field, f"set either {prompt.expected}")
        if isinstance(prompt, ChatPrompt):
            return len(self._chat_ids(prompt))
        return len(self.encode_bounded(prompt.text, prompt.field))

    def sampling(self, opts: SamplingInput, prompt_tokens: int, prompt_field: str = "prompt") -> Sampling:
        """Validate ``opts`` and apply server defaults to unset fields.

        ``max_tokens`` unset → ``min(default_max_tokens, context left after the prompt)``; set → must fit
        ``prompt_tokens + max_tokens <= max_context_tokens``.

        Raises:
            InvalidArgument: naming ``<prefix><field>``, or ``prompt_field`` when the prompt fills the context.
        """
        limits, p = self.limits, opts.prefix
        room = limits.max_context_tokens - prompt_tokens
        if room <= 0:
            raise InvalidArgument(
                prompt_field,
                f"prompt is {prompt_tokens} tokens; the context holds {limits.max_context_tokens} "
                "(prompt + max_tokens)",
            )

        if opts.max_tokens is not None:
            if opts.max_tokens <= 0:
                raise InvalidArgument(f"{p}max_tokens", f"must be > 0, got {opts.max_tokens}")
            if opts.max_tokens > room:
                raise InvalidArgument(
                    f"{p}max_tokens",
                    f"prompt ({prompt_tokens} tokens) + max_tokens ({opts.max_tokens}) exceeds the context of "
                    f"{limits.max_context_tokens} tokens; ask for at most {room}",
                )
            max_tokens = opts.max_tokens
        else:
            max_tokens = min(limits.default_max_tokens, room)

        temperature = limits.default_temperature
        if opts.temperature is not None:
            temperature = _finite(f"{p}temperature", opts.temperature)
            if not 0 <= temperature <= MAX_TEMPERATURE:
                raise InvalidArgument(f"{p}temperature", f"must be in [0, {MAX_TEMPERATURE:g}], got {temperature:g}")
        top_p = 1.0
        if opts.top_p is not None:
            top_p = _finite(f"{p}top_p", opts.top_p)
            if not 0 < top_p <= 1:
                raise InvalidArgument(f"{p}top_p", f"must be in (0, 1], got {top_p:g}")
        top_k = 0
        if opts.top_k is not None:
            if opts.top_k < -1:
                raise InvalidArgument(f"{p}top_k", f"must be -1, 0 (disabled) or >= 1, got {opts.top_k}")
            top_k = max(opts.top_k, 0)
        rep = 1.0
        if opts.repetition_penalty is not None:
            rep = _finite(f"{p}repetition_penalty", opts.repetition_penalty)
            if rep <= 0:
                raise InvalidArgument(f"{p}repetition_penalty", f"must be > 0, got {rep:g}")
        presence = _penalty(f"{p}presence_penalty", opts.presence_penalty)
        frequency = _penalty(f"{p}frequency_penalty", opts.frequency_penalty)
        min_tokens = 0
        if opts.min_tokens is not None:
            if not 0 <= opts.min_tokens <= max_tokens:
                raise InvalidArgument(
                    f"{p}min_tokens", f"must be in [0, max_tokens={max_tokens}], got {opts.min_tokens}"
                )
            min_tokens = opts.min_tokens
        if opts.seed is not None and opts.seed < 0:
            raise InvalidArgument(f"{p}seed", f"must be >= 0, got {opts.seed}")
        if opts.seed is not None and opts.seed > MAX_SEED:
            raise InvalidArgument(f"{p}seed", f"must be at most {MAX_SEED}, got {opts.seed}")

        stops = tuple(opts.stop)
        if len(stops) > limits.max_stop_strings:
            raise InvalidArgument(f"{p}stop", f"at most {limits.max_stop_strings} stop strings, got {len(stops)}")
        for i, s in enumerate(stops):
            if not s:
                raise InvalidArgument(f"{p}stop[{i}]", "must not be empty")
            if len(s) > limits.max_stop_string_chars:
                raise InvalidArgument(
                    f"{p}stop[{i}]", f"at most {limits.max_stop_string_chars} characters, got {len(s)}"
                )

        return Sampling(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            stop=stops,
            seed=opts.seed,
            repetition_penalty=rep,
            presence_penalty=presence,
            frequency_penalty=frequency,
            ignore_eos=bool(opts.ignore_eos),
            min_tokens=min_tokens,
        )

    def encode_bounded(self, text: str, field: str) -> list[int]:
        """Token ids of ``text``; a text far longer than the context is refused after tokenizing a prefix.

        Raises:
            InvalidArgument: naming ``field``, when ``text`` is longer than ``max_context_tokens ×
                max_token_chars`` characters, or its first ``max_context_tokens × PROBE_CHARS_PER_TOKEN``
                characters alone are more than ``max_context_tokens`` tokens.
        """
        max_tokens, tokenizer = self.limits.max_context_tokens, self.tokenizer
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

    def chat_messages(self, prompt: ChatPrompt) -> list[tuple[str, str]]:
        """Validate chat messages: non-empty, not more turns than the context holds, known roles, and no special
        token in any content (it could forge turns).

        Raises:
            InvalidArgument: ``<field>`` empty or with more turns than the context can hold (each takes at least
                ``MIN_TOKENS_PER_CHAT_MESSAGE`` tokens), ``<field>[i].role`` not one of system/user/assistant,
                or ``<field>[i].content`` containing one of the tokenizer's special tokens (or
                ``CHAT_CONTROL_TOKENS`` when it lists none).
        """
        field, messages = prompt.field, prompt.messages
        if not messages:
            raise InvalidArgument(field, "must contain at least one message")
        max_context = self.limits.max_context_tokens
        if len(messages) * MIN_TOKENS_PER_CHAT_MESSAGE > max_context:
            raise InvalidArgument(
                field,
                f"{len(messages)} messages cannot fit the context of {max_context} tokens "
                f"(each takes at least {MIN_TOKENS_PER_CHAT_MESSAGE})",
            )
        pattern = _special_pattern(tuple(self.tokenizer.special_tokens or CHAT_CONTROL_TOKENS))
        out = []
        for i, m in enumerate(messages):
            if m.role not in CHAT_ROLES:
                raise InvalidArgument(
                    f"{field}[{i}].role", f"unknown role {quote(m.role)}; expected one of {', '.join(CHAT_ROLES)}"
                )
            found = pattern.search(m.content) if pattern is not None else None
            if found:
                raise InvalidArgument(
                    f"{field}[{i}].content",
                    f"contains the special token {quote(found.group(0))}, which could forge a chat turn; remove it "
                    "(use Generate for raw prompts)",
                )
            out.append((m.role, m.content))
        return out

    def _chat_ids(self, prompt: ChatPrompt) -> list[int]:
        text = self.tokenizer.render_chat_text(self.chat_messages(prompt))
        return self.encode_bounded(text, prompt.field)


def _finite(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise InvalidArgument(name, f"must be a finite number, got {value}")
    return float(value)


def _penalty(name: str, value: float | None) -> float:
    if value is None:
        return 0.0
    value = _finite(name, value)
    if not -2 <= value <= 2:
        raise InvalidArgument(name, f"must be in [-2, 2], got {value:g}")
    return value


@functools.lru_cache(maxsize=8)
def _special_pattern(tokens: tuple[str, ...]) -> re.Pattern[str] | None:
    return re.compile("|".join(map(re.escape, sorted(tokens, key=len, reverse=True)))) if tokens else None
