"""The gRPC methods of ``edgephi.v1.InferenceService``: proto → domain, call the generation service, domain →
proto; a domain error becomes its status through :mod:`edgephi.grpc_door.status` (the codes are listed there).

Stream writes are bounded by ``stream_write_timeout_s``: HTTP/2 flow control blocks ``context.write`` while
the client reads nothing, and a stalled reader must not hold an admission slot or KV cache forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, TypeVar

import grpc

from edgephi.errors import ReaderStalled, RequestError
from edgephi.grpc_door import messages
from edgephi.grpc_door.status import status_of
from edgephi.metrics import Metrics
from edgephi.service import GenerationService
from edgephi.v1 import inference_pb2 as pb
from edgephi.v1 import inference_pb2_grpc as pb_grpc
from edgephi.validation import Prompt, SamplingInput

log = logging.getLogger(__name__)
Resp = TypeVar("Resp", pb.GenerateResponse, pb.ChatResponse)
# How long a stalled reader's final status may take to queue before the handler gives up on it (s).
ABORT_SEND_TIMEOUT_S = 1.0
Ctx = grpc.aio.ServicerContext[Any, Any]


class InferenceServicer(pb_grpc.InferenceServiceServicer):  # type: ignore[misc]
    """Implements the public API over a :class:`GenerationService`."""

    def __init__(self, service: GenerationService, write_timeout_s: float) -> None:
        self.service = service
        self.write_timeout_s = write_timeout_s

    @property
    def metrics(self) -> Metrics:
        return self.service.state.metrics

    # The streaming methods are coroutines that call context.write(), not async generators: a server-side
    # end (drain past grace, engine death) cancels the handler task, and with a generator that cancel can
    # land in grpc's own send, outside our code, leaving the RPC without a status until the server stops.
    async def Generate(self, request: pb.GenerateRequest, context: Ctx) -> None:
        sampling = messages.sampling_input(request.sampling)
        await self._stream("Generate", context, messages.generate_prompt(request), sampling, pb.GenerateResponse)

    async def Chat(self, request: pb.ChatRequest, context: Ctx) -> None:
        sampling = messages.sampling_input(request.sampling)
        await self._stream("Chat", context, messages.chat_prompt(request.messages), sampling, pb.ChatResponse)

    async def CountTokens(self, request: pb.CountTokensRequest, context: Ctx) -> pb.CountTokensResponse:
        try:
            n, max_context = await self.service.count_tokens(messages.count_tokens_input(request))
        except RequestError as exc:
            await self._abort(context, "CountTokens", exc)
        self.metrics.requests.labels("CountTokens", "OK").inc()
        return pb.CountTokensResponse(token_count=n, max_context_tokens=max_context)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: Ctx) -> pb.GetModelInfoResponse:
        try:
            i = self.service.model_info()
        except RequestError as exc:
            await self._abort(context, "GetModelInfo", exc)
        self.metrics.requests.labels("GetModelInfo", "OK").inc()
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
        context: Ctx,
        prompt: Prompt,
        sampling: SamplingInput,
        response_type: type[Resp],
    ) -> None:
        stream = self.service.generate(prompt, sampling, kind=method.lower(), received=time.perf_counter())
        try:
            async with contextlib.aclosing(stream):
                async for delta in stream:
                    msg = response_type()
                    messages.fill_response(msg, delta)
                    await self._write(context, msg)
        except ReaderStalled as exc:
            # Closing the stream aborted the engine request and freed the slot. The status queues behind the
            # data the client is not reading, so it may never go out: the abort is bounded (grpc cancels the
            # call at shutdown).
            log.warning("%s: %s", method, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._abort(context, method, exc), ABORT_SEND_TIMEOUT_S)
            return
        except RequestError as exc:
            await self._abort(context, method, exc)
        except asyncio.CancelledError:
            ended = stream.server_end()  # a drain or engine death cancelled this handler between deltas
            if ended is not None:
                await self._abort(context, method, ended)
            left = context.time_remaining()
            code = "DEADLINE_EXCEEDED" if left is not None and left <= 0 else "CANCELLED"
            self.metrics.requests.labels(method, code).inc()
            raise
        self.metrics.requests.labels(method, "OK").inc()

    async def _write(self, context: Ctx, msg: object) -> None:
        """``context.write`` bounded by ``write_timeout_s``.

        Raises:
            ReaderStalled: the client read nothing for ``write_timeout_s`` seconds.
        """
        try:
            # asyncio.timeout, not wait_for: no extra Task per streamed message on the hot path.
            async with asyncio.timeout(self.write_timeout_s):
                await context.write(msg)
        except TimeoutError:
            raise ReaderStalled(
                f"stream aborted: the client read nothing for {self.write_timeout_s:g} s "
                "(EDGEPHI_STREAM_WRITE_TIMEOUT_S)"
            ) from None

    async def _abort(self, context: Ctx, method: str, exc: RequestError) -> None:
        code = status_of(exc)
        self.metrics.requests.labels(method, code.name).inc()
        await context.abort(code, str(exc))
