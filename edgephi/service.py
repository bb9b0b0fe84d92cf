"""The generation service: the transport-neutral core every front door calls.

One request, in order: refuse if the server cannot take it (:meth:`ServerState.refusal`), validate and tokenize
it (:class:`~edgephi.validation.RequestValidator`, on one worker thread off the event loop so that a long
prompt cannot stall other streams, health or the watchdog), admit it (:class:`~edgephi.admission.Admission`),
stream the engine's deltas, and account TTFT, TPOT and tokens in the metrics. Failures are domain errors
(:mod:`edgephi.errors`); a front door maps them to its statuses in one table and knows nothing else.

Stream ends: closing the async iterator (client gone, write timeout) or cancelling the caller's task (client
cancel, deadline) aborts the engine request; a server-side end (drain past grace, engine death) cancels the
caller's task too and surfaces as :class:`~edgephi.errors.StreamAborted` with the reason.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from typing import TypeVar

from edgephi.engine.protocol import Engine
from edgephi.engine.types import Delta, EngineDeadError, EngineRequestError, ModelInfo
from edgephi.errors import EngineFailed, InvalidArgument, NotServing, RequestError, StreamAborted
from edgephi.state import OpenStream, ServerState, StreamEnd
from edgephi.validation import ChatPrompt, MissingPrompt, Prompt, RequestValidator, SamplingInput, TextPrompt

log = logging.getLogger(__name__)
T = TypeVar("T")


class GenerationService:
    """Validate → admit → stream → account, over the :class:`ServerState`'s engine."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        # One thread: the tokenizer is not shared across threads, and requests are tokenized in arrival order.
        self._tokenize = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="edgephi-tokenize")

    def close(self) -> None:
        self._tokenize.shutdown(wait=False, cancel_futures=True)

    def model_info(self) -> ModelInfo:
        """What is served.

        Raises:
            NotServing: no engine yet, or draining/dead/stopped.
        """
        return self._engine().info

    async def count_tokens(self, prompt: TextPrompt | ChatPrompt | MissingPrompt) -> tuple[int, int]:
        """``(tokens in prompt, max context tokens)``; a chat counts as rendered for generation.

        Raises:
            NotServing, MemoryGuarded: the server cannot take requests now.
            InvalidArgument: a bad chat message, or a text too long for any context.
        """
        engine = self._admissible()
        n = await self._off_loop(self._validator(engine).count_tokens, prompt)
        return n, engine.info.max_context_tokens

    def generate(
        self, prompt: Prompt, sampling: SamplingInput, *, kind: str = "generate", received: float | None = None
    ) -> GenerationStream:
        """Open a stream of the reply to ``prompt``: deltas of text and token ids, the last with
        ``finish_reason`` and usage. Nothing runs until it is iterated; close it (``aclose``, or
        ``contextlib.aclosing``) to abort.

        ``kind`` prefixes the engine request id; ``received`` (``time.perf_counter()`` when the request arrived)
        starts the TTFT clock. The last delta is yielded after the request's admission slot is released, so a
        client that sends its next request as soon as it reads it is never refused by its own previous one.

        Iterating raises (at once for refusals, later for failures mid-stream):
            NotServing, MemoryGuarded: the server cannot take requests now.
            InvalidArgument: a bad field (validation, or a sampling value the engine refused: ``sampling``).
            Overloaded: admission control refused it (slots, queue, KV-cache tokens).
            StreamAborted: a drain outlasted its grace, or the engine died.
            EngineFailed: anything else the engine raised (logged with its traceback).
            asyncio.CancelledError: the caller's task was cancelled; the engine request was aborted. If the
                server cancelled it (drain, engine death), :meth:`GenerationStream.server_end` says why.
        """
        handle = GenerationStream()
        handle._deltas = self._run(
            handle, prompt, sampling, kind, time.perf_counter() if received is None else received
        )
        return handle

    async def _run(
        self, handle: GenerationStream, prompt: Prompt, sampling: SamplingInput, kind: str, received: float
    ) -> AsyncGenerator[Delta, None]:
        engine = self._admissible()
        request = await self._off_loop(self._validator(engine).generation, prompt, sampling)
        request_id = f"{kind}-{uuid.uuid4().hex}"
        st, metrics = self.state, self.state.metrics
        stream = handle._open = st.open_stream(request_id)
        first_at = last_at = 0.0
        n_tokens = 0
        final: Delta | None = None
        try:
            async with (
                st.admission.slot(len(request.prompt_token_ids) + request.sampling.max_tokens),
                contextlib.aclosing(engine.generate(request, request_id)) as deltas,
            ):
                async for delta in deltas:
                    if delta.token_ids:
                        now = time.perf_counter()
                        if not first_at:
                            first_at = now
                            metrics.ttft.observe(now - received)
                        last_at = now
                        n_tokens += len(delta.token_ids)
                        st.tokens_generated += len(delta.token_ids)
                    if delta.finish_reason is not None:
                        final = delta
                        continue
                    yield delta
            if final is not None:
                yield final
        except EngineDeadError as exc:
            raise StreamAborted(f"engine died: {exc}") from exc
        except EngineRequestError as exc:  # the engine refused a parameter that validation let through
            raise InvalidArgument("sampling", str(exc)) from exc
        except asyncio.CancelledError:
            if stream.end is StreamEnd.CLIENT:
                raise
            raise StreamAborted(stream.end_message()) from None
        except RequestError:  # Overloaded from admission
            raise
        except Exception as exc:
            log.exception("%s: engine error", request_id)
            raise EngineFailed(f"engine error: {type(exc).__name__}") from exc
        finally:
            st.close_stream(request_id)
            metrics.completion_tokens.inc(n_tokens)
            metrics.prompt_tokens.inc(len(request.prompt_token_ids))
            if n_tokens > 1:
                metrics.tpot.observe((last_at - first_at) / (n_tokens - 1))

    def _engine(self) -> Engine:
        engine = self.state.engine
        if engine is None or not self.state.accepting:
            raise NotServing(f"not serving: {self.state.lifecycle.value}; retry later")
        return engine

    def _admissible(self) -> Engine:
        refusal = self.state.refusal()
        if refusal is not None:
            raise refusal
        return self._engine()

    def _validator(self, engine: Engine) -> RequestValidator:
        return RequestValidator(self.state.limits, engine.tokenizer)

    async def _off_loop(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._tokenize, fn, *args)


class GenerationStream:
    """An open generation (from :meth:`GenerationService.generate`): an async iterator of :class:`Delta` s."""

    def __init__(self) -> None:
        self._deltas: AsyncGenerator[Delta, None] | None = None
        self._open: OpenStream | None = None

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> Delta:
        assert self._deltas is not None
        return await self._deltas.__anext__()

    async def aclose(self) -> None:
        """Stop the stream: aborts the engine request and frees its admission slot (no-op once finished)."""
        if self._deltas is not None:
            await self._deltas.aclose()

    def server_end(self) -> StreamAborted | None:
        """Why the server ended this stream (drain past grace, engine death), or None if it did not: for a
        front door whose task was cancelled while it was not iterating (e.g. writing to a slow client)."""
        if self._open is None or self._open.end is StreamEnd.CLIENT:
            return None
        return StreamAborted(self._open.end_message())
