"""The gRPC methods of ``edgephi.v1.InferenceService``: thin — convert, admit, call the engine, convert back.

Status codes:
  INVALID_ARGUMENT    a request field is bad (the message starts with the field's proto path)
  RESOURCE_EXHAUSTED  admission limit (streams + queue) or a memory guard refused the request; or the client
                      read nothing for ``stream_write_timeout_s`` and the stream was aborted
  UNAVAILABLE         engine loading, draining or dead; or the stream was aborted by a drain past its grace
  INTERNAL            anything else the engine raised (logged with its traceback)

Tokenization and chat rendering run on one worker thread, off the event loop, so that a long prompt cannot
stall other streams, health checks or the watchdog.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from edgephi import convert
from edgephi.admission import Overloaded
from edgephi.convert import InvalidArgument
from edgephi.engine import Engine, EngineDeadError, EngineRequestError, GenerationRequest
from edgephi.runtime import Runtime, StreamEnd
from edgephi.v1 import inference_pb2 as pb
from edgephi.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
Resp = TypeVar("Resp", pb.GenerateResponse, pb.ChatResponse)
T = TypeVar("T")
# How long a stalled reader's final status may take to queue before the handler gives up on it (s).
ABORT_SEND_TIMEOUT_S = 1.0
# grpc's own signals (context.abort, a write after the RPC ended) pass through untouched.
_GRPC_ERRORS = (grpc.aio.AbortError, grpc.aio.UsageError, grpc.aio.InternalError, asyncio.InvalidStateError)
Ctx = grpc.aio.ServicerContext[Any, Any]


class InferenceServicer(pb_grpc.InferenceServiceServicer):  # type: ignore[misc]
    """Implements the public API over a :class:`Runtime` (engine + admission + lifecycle)."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        # One thread: the tokenizer is not shared across threads, and requests are tokenized in arrival order.
        self._tokenize = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="edgephi-tokenize")

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._tokenize, fn, *args)

    # The streaming methods are coroutines that call context.write(), not async generators: a server-side
    # end (drain past grace, engine death) cancels the handler task, and with a generator that cancel can
    # land in grpc's own send, outside our code, leaving the RPC without a status until the server stops.
    async def Generate(self, request: pb.GenerateRequest, context: Ctx) -> None:
        await self._stream("Generate", request, context, convert.generate_request, pb.GenerateResponse)

    async def Chat(self, request: pb.ChatRequest, context: Ctx) -> None:
        await self._stream("Chat", request, context, convert.chat_request, pb.ChatResponse)

    async def CountTokens(self, request: pb.CountTokensRequest, context: Ctx) -> pb.CountTokensResponse:
        engine = await self._engine_or_abort(context, "CountTokens")
        refusal = self.rt.refusal()
        if refusal is not None:
            await self._abort(context, "CountTokens", refusal[0], refusal[1])
        try:
            n = await self._off_loop(convert.count_tokens, request, engine.tokenizer, self.rt.limits)
        except InvalidArgument as exc:
            await self._abort(context, "CountTokens", grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self.rt.metrics.requests.labels("CountTokens", "OK").inc()
        return pb.CountTokensResponse(token_count=n, max_context_tokens=engine.info.max_context_tokens)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: Ctx) -> pb.GetModelInfoResponse:
        engine = await self._engine_or_abort(context, "GetModelInfo")
        i = engine.info
        self.rt.metrics.requests.labels("GetModelInfo", "OK").inc()
        return pb.GetModelInfoResponse(
            model_name=i.model_name,
            quantization=i.quantization,
            max_context_tokens=i.max_context_tokens,
            vocab_size=i.vocab_size,
            artifact_digest=i.artifact_digest,
            engine_version=i.engine_version,
            weight_bits=i.weight_bits,
            group_size=i.group_size,
        )

    # ------------------------------------------------------------------------------------------------------

    async def _stream(
        self,
        method: str,
        request: object,
        context: Ctx,
        parse: Callable[..., GenerationRequest],
        response_type: type[Resp],
    ) -> None:
        received = time.perf_counter()
        engine = await self._engine_or_abort(context, method)
        refusal = self.rt.refusal()
        if refusal is not None:
            await self._abort(context, method, refusal[0], refusal[1])
        try:
            gen_req = await self._off_loop(parse, request, engine.tokenizer, self.rt.limits)
        except InvalidArgument as exc:
            await self._abort(context, method, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        request_id = f"{method.lower()}-{uuid.uuid4().hex}"
        stream = self.rt.open_stream(request_id)
        first_at = last_at = 0.0
        n_tokens = 0
        final: Resp | None = None
        try:
            async with self.rt.admission.slot(len(gen_req.prompt_token_ids) + gen_req.sampling.max_tokens):
                async for delta in engine.generate(gen_req, request_id):
                    if delta.token_ids:
                        now = time.perf_counter()
                        if not first_at:
                            first_at = now
                            self.rt.metrics.ttft.observe(now - received)
                        last_at = now
                        n_tokens += len(delta.token_ids)
                        self.rt.tokens_generated += len(delta.token_ids)
                    msg = response_type()
                    convert.fill_response(msg, delta)
                    if delta.finish_reason is not None:
                        final = msg  # written after the slot is released, see below
                        continue
                    await self._write(context, msg)
            # The engine request is finished: the slot is already free when the client reads the last message,
            # so a client that sends its next request at once is never refused by its own previous one.
            if final is not None:
                await self._write(context, final)
        except Overloaded as exc:
            await self._abort(context, method, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except EngineDeadError as exc:
            await self._abort(context, method, grpc.StatusCode.UNAVAILABLE, f"engine died: {exc}")
        except _StalledReader:
            # Leaving the `async with` above closed engine.generate, which aborted the engine request. The
            # status queues behind the data the client is not reading, so it may never go out: the stream is
            # closed for the drain first, and the abort is bounded (grpc cancels the call at shutdown).
            timeout = self.rt.settings.stream_write_timeout_s
            log.warning("%s: client read nothing for %g s; stream aborted", request_id, timeout)
            self.rt.close_stream(request_id)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._abort(
                        context,
                        method,
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"stream aborted: the client read nothing for {timeout:g} s (EDGEPHI_STREAM_WRITE_TIMEOUT_S)",
                    ),
                    ABORT_SEND_TIMEOUT_S,
                )
            return
        except _GRPC_ERRORS:
            raise
        except EngineRequestError as exc:  # the engine refused a parameter that validation let through
            await self._abort(context, method, grpc.StatusCode.INVALID_ARGUMENT, f"sampling: {exc}")
        except Exception as exc:
            log.exception("%s: engine error", request_id)
            await self._abort(context, method, grpc.StatusCode.INTERNAL, f"engine error: {type(exc).__name__}")
        except asyncio.CancelledError:
            # Client cancel / deadline: the engine request was already aborted by engine.generate. A server-
            # side end (drain past grace, engine death) cancels this task too, and says why.
            if stream.end is StreamEnd.CLIENT:
                left = context.time_remaining()
                code = "DEADLINE_EXCEEDED" if left is not None and left <= 0 else "CANCELLED"
                self.rt.metrics.requests.labels(method, code).inc()
                raise
            await self._abort(context, method, grpc.StatusCode.UNAVAILABLE, stream.end_message())
        finally:
            self.rt.close_stream(request_id)
            self.rt.metrics.completion_tokens.inc(n_tokens)
            self.rt.metrics.prompt_tokens.inc(len(gen_req.prompt_token_ids))
            if n_tokens > 1:
                self.rt.metrics.tpot.observe((last_at - first_at) / (n_tokens - 1))
        self.rt.metrics.requests.labels(method, "OK").inc()

    async def _write(self, context: Ctx, msg: object) -> None:
        """``context.write`` bounded by ``stream_write_timeout_s`` (HTTP/2 flow control blocks it while the
        client reads nothing); a stalled reader must not hold an admission slot or KV cache forever."""
        try:
            # asyncio.timeout, not wait_for: no extra Task per streamed message on the hot path.
            async with asyncio.timeout(self.rt.settings.stream_write_timeout_s):
                await context.write(msg)
        except TimeoutError:
            raise _StalledReader from None

    async def _engine_or_abort(self, context: Ctx, method: str) -> Engine:
        engine = self.rt.engine
        if engine is None or not self.rt.accepting:
            await self._abort(
                context, method, grpc.StatusCode.UNAVAILABLE, f"not serving: {self.rt.state.value}; retry later"
            )
        assert engine is not None  # context.abort raised otherwise
        return engine

    async def _abort(
        self,
        context: Ctx,
        method: str,
        code: grpc.StatusCode,
        message: str,
    ) -> None:
        self.rt.metrics.requests.labels(method, code.name).inc()
        await context.abort(code, message)


class _StalledReader(Exception):
    """The client did not read the stream for ``stream_write_timeout_s``."""
