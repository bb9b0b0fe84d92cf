"""The order in which the vLLM adapter shuts ``AsyncLLM`` down (:func:`edgephi.engine.vllm.shutdown`), over a
stand-in with vLLM's structure: an output-handler task that logs whatever error its queue yields (vLLM's
``logger.exception("AsyncLLM output_handler failed.")``), and a ``shutdown()`` that, like vLLM's, first
closes the engine core (whose output-queue task then leaves an ``EngineDeadError`` in the queue) and only
then cancels the handler, thread-safely. Run in a worker thread, that order lets the handler log a clean
stop as a crash; the adapter cancels the handler first. No vLLM here: nothing in the adapter's module
imports it at import time."""

from __future__ import annotations

import asyncio
import time

from edgephi.engine.types import EngineDeadError
from edgephi.engine.vllm import shutdown

ENGINE_CORE_SHUTDOWN_S = 0.2  # vLLM's takes seconds (it stops the core and its workers)


class AsyncLLMStandIn:
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self.logged: list[BaseException] = []  # what the handler logged at ERROR, with its traceback
        self.shut_down = False
        self.output_handler: asyncio.Task[None] = asyncio.ensure_future(self._handle())

    async def _handle(self) -> None:
        try:
            while True:
                item = await self.queue.get()
                if isinstance(item, BaseException):
                    raise item
        except Exception as exc:
            self.logged.append(exc)

    def shutdown(self) -> None:
        """vLLM's order: the engine core first (its queue task, cancelled, queues EngineDeadError), the
        output handler last."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, EngineDeadError("engine core closed"))
        time.sleep(ENGINE_CORE_SHUTDOWN_S)
        self.loop.call_soon_threadsafe(self.output_handler.cancel)
        self.shut_down = True


async def test_a_clean_stop_cancels_the_output_handler_before_the_engine_core() -> None:
    llm = AsyncLLMStandIn()
    await shutdown(llm)
    assert llm.shut_down and llm.output_handler.cancelled()
    assert llm.logged == []


async def test_the_race_it_avoids() -> None:
    """The control: vLLM's own shutdown() from a worker thread, as before, logs the stop as a failure."""
    llm = AsyncLLMStandIn()
    await asyncio.to_thread(llm.shutdown)
    await asyncio.sleep(0)
    assert [type(e) for e in llm.logged] == [EngineDeadError]


async def test_an_engine_that_died_keeps_its_logged_cause() -> None:
    llm = AsyncLLMStandIn()
    llm.queue.put_nowait(EngineDeadError("engine core process died"))
    await asyncio.wait([llm.output_handler])
    await shutdown(llm)
    assert llm.shut_down and [str(e) for e in llm.logged] == ["engine core process died"]


async def test_before_the_first_request_there_is_no_handler() -> None:
    class NoHandler:
        output_handler = None
        shut_down = False

        def shutdown(self) -> None:
            self.shut_down = True

    llm = NoHandler()
    await shutdown(llm)
    assert llm.shut_down
