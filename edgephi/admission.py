"""Admission control: a bounded number of running streams, a bounded queue, refusal at once beyond both.

A request that cannot run and cannot queue is refused immediately (:class:`~edgephi.errors.Overloaded`; gRPC
``RESOURCE_EXHAUSTED``) rather than left waiting: on an edge box a fast "busy" is more useful to a client than an
unbounded wait. The number of running streams is vLLM's ``max_num_seqs`` less the watchdog probe's seat, so
everything admitted is scheduled by the engine at once and the probe still finds a seat.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator

from edgephi.errors import Overloaded

__all__ = ["Admission", "Overloaded"]


class Admission:
    """FIFO admission with ``max_running`` slots and ``max_queued`` waiting places.

    Not thread-safe: use from one event loop.
    """

    def __init__(self, max_running: int, max_queued: int, token_capacity: int | None = None) -> None:
        if max_running <= 0 or max_queued < 0:
            raise ValueError("max_running must be > 0 and max_queued >= 0")
        self.max_running = max_running
        self.max_queued = max_queued
        self.token_capacity = token_capacity  # KV-cache tokens; None = unbounded
        self.tokens = 0  # prompt + max_tokens of every admitted (running or queued) request
        self.running = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @contextlib.asynccontextmanager
    async def slot(self, tokens: int = 0) -> AsyncIterator[None]:
        """Hold a running slot for the body; wait in the queue if none is free.

        ``tokens`` (prompt + max_tokens) counts against the KV-cache capacity while admitted.

        Raises:
            Overloaded: all slots busy and the queue full, or the tokens in flight would exceed the KV-cache
                capacity (raised before any waiting).
            asyncio.CancelledError: cancelled while queued (the place is given back).
        """
        if self.token_capacity is not None and self.tokens + tokens > self.token_capacity:
            raise Overloaded(
                f"server busy: {self.tokens} tokens in flight + {tokens} requested exceed the KV cache's "
                f"{self.token_capacity} tokens; retry later or lower max_tokens"
            )
        self.tokens += tokens
        try:
            async with self._slot():
                yield
        finally:
            self.tokens -= tokens

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        if self.running >= self.max_running or self._waiters:
            if len(self._waiters) >= self.max_queued:
                raise Overloaded(
                    f"server busy: {self.running}/{self.max_running} streams running and "
                    f"{len(self._waiters)}/{self.max_queued} queued; retry later"
                )
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut  # resolved by _release, which hands its slot over (running stays counted)
            except BaseException:
                if fut.done() and not fut.cancelled():
                    self._release()  # the slot was handed to us just as we were cancelled
                else:
                    self._waiters.remove(fut)
                raise
        else:
            self.running += 1
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # slot passes straight to the next waiter
                return
        self.running -= 1
