"""The benchmarks' CPU smoke modes, end to end on the tiny W4A16 stand-in (real vLLM, one system at a time).

* ``python -m benchmarks.gpu_bench --cpu-smoke``: the GPU benchmark's whole logic at toy sizes: prep (checkpoint
  figures, copy rate), then the edgephi daemon (through ``edgephi.testing.run_daemon``), vLLM in-process and
  ``vllm serve``, each started, measured and stopped; the table has every system's column and the daemon's
  ratios to the other two. ``daemon_restart`` (the daemon's start again, no workload) is left out for time.
  Three engine starts: ~3 minutes on 2 busy cores.
* ``python -m benchmarks.gpu_accept --cpu-smoke``: its checks that need no daemon of their own (environment,
  artifact, doctor), then ``report`` merging the part. Its other checks are covered elsewhere or cannot run
  here: ``serving_tests`` runs tests/integration itself, ``quantize`` is tests/integration/test_quantize.py,
  ``vram_budget_*`` starts daemons the way the gpu_bench smoke does, ``ansible_preflight`` needs Ansible's venv,
  and ``gpu_released`` looks machine-wide for vLLM processes (this session's own daemon among them).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from benchmarks.harness import REPO, clean_env

pytestmark = pytest.mark.slow

SYSTEMS = ("daemon", "inproc", "serve")
# The figures every measured system promises (dotted paths into its results), each a positive number.
FIGURES = (
    "start_to_ready_s",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "ttft_mean_ms",
    "tpot_ms",
    "decode_tok_s_b1",
    "e2e_tok_s_b1",
    "concurrency.1.agg_tok_s",
    "concurrency.4.agg_tok_s",
    "concurrency.4.ttft_p50_ms",
    "kv_cache_tokens",
    "peak_rss_gib",
    "fraction_of_bound",
)
# Table rows whose ratio columns (daemon/inproc, daemon/serve) must be finite and positive.
RATIO_ROWS = (
    "start-to-ready (s)",
    "TTFT p50 (ms), batch 1",
    "TTFT mean (ms), batch 1",
    "decode tok/s, batch 1",
    "aggregate tok/s, 1 stream",
    "aggregate tok/s, 4 streams",
)


def _run(args: list[str], log: Path, timeout: float) -> None:
    with log.open("wb") as f:
        rc = subprocess.run(
            [sys.executable, "-m", *args],
            cwd=REPO,
            env=clean_env({}),
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        ).returncode
    assert rc == 0, f"{args[0]} exited {rc}:\n{log.read_text(errors='replace')[-6000:]}"


def _one(out_dir: Path, pattern: str) -> dict[str, Any]:
    found = sorted(out_dir.glob(pattern))
    assert len(found) == 1, (pattern, sorted(p.name for p in out_dir.iterdir()))
    data: dict[str, Any] = json.loads(found[0].read_text())
    return data


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _figure(d: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        d = d.get(part) if isinstance(d, dict) else None  # type: ignore[assignment]
    return d


def _table(md: str) -> tuple[list[str], list[list[str]]]:
    """The first markdown table: its header cells and its rows' cells."""
    lines = [line for line in md.splitlines() if line.startswith("|")]
    head, _, *rows = ([c.strip() for c in line.strip("|").split("|")] for line in lines)
    return head, rows


def test_gpu_bench_cpu_smoke(artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _run(
        [
            "benchmarks.gpu_bench",
            "--cpu-smoke",
            "--model",
            str(artifact),
            "--systems",
            ",".join(SYSTEMS),
            "--workdir",
            str(tmp_path / "work"),
            "--out-dir",
            str(out),
        ],
        tmp_path / "gpu_bench.log",
        timeout=600,
    )
    results = _one(out, "gpu-smoke-*.json")
    assert results["mode"] == "cpu-smoke"
    assert results["stubs"] == "existing stubs import"
    prep = results["prep"]
    for key in ("copy_rate_gb_s", "bytes_per_token", "decode_bound_tok_s", "checkpoint_bytes"):
        assert _positive(prep[key]), (key, prep)
    assert results["workload"]["concurrency"] == [1, 4]

    (profile,) = results["profiles"].values()
    systems = profile["systems"]
    assert sorted(systems) == sorted(SYSTEMS)
    for name in SYSTEMS:
        d = systems[name]
        assert d["ok"], (name, d.get("error"))
        assert d["exit_code"] == 0, (name, d["exit_code"])  # stopped by SIGTERM: a clean exit
        bad = {path: _figure(d, path) for path in FIGURES if not _positive(_figure(d, path))}
        assert not bad, (name, bad)
        for c in ("1", "4"):
            assert d["concurrency"][c]["requests"] == int(c) * results["workload"]["requests_per_stream"]
    daemon = systems["daemon"]
    assert _positive(daemon["server_ttft_mean_ms"]) and daemon["server_ttft_mean_ms"] <= daemon["ttft_mean_ms"]
    assert daemon["command"].endswith("-m edgephi.cli serve") and "EDGEPHI_HOST=127.0.0.1" in daemon["command"]

    md = (out / next(out.glob("gpu-smoke-*.json")).with_suffix(".md").name).read_text()
    head, table = _table(md.split("####", 1)[1])
    rows = {r[0]: r[1:] for r in table}
    labels = ["in-process AsyncLLM", "edgephi daemon (gRPC)", "vllm serve (HTTP)"]
    assert head == ["figure", *labels, "daemon/inproc", "daemon/serve"]
    for label in RATIO_ROWS:
        cells = rows[label]
        assert all(c != "–" for c in cells[:3]), (label, cells)
        ratios = [float(c) for c in cells[3:]]
        assert all(_positive(r) for r in ratios), (label, cells)
    with tarfile.open(next(out.glob("gpu-smoke-*-logs.tar.gz"))) as tar:
        names = tar.getnames()
    assert {"prep.log", *(f"runs/{next(iter(results['profiles']))}/{s}.log" for s in SYSTEMS)} <= set(names)


def test_gpu_accept_cpu_smoke(artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    checks = ("environment", "artifact", "doctor")
    _run(
        [
            "benchmarks.gpu_accept",
            "--part",
            "serving",
            "--cpu-smoke",
            "--model",
            str(artifact),
            "--only",
            ",".join(checks),
            "--commit",
            "test",
            "--workdir",
            str(tmp_path / "work"),
            "--out-dir",
            str(out),
            "--budget-s",
            "300",
        ],
        tmp_path / "gpu_accept.log",
        timeout=300,
    )
    part = _one(out, "gpu-accept-*-serving-cpu-smoke.json")
    assert part["mode"] == "cpu-smoke" and part["only"] == ",".join(checks)
    assert [c["name"] for c in part["checks"]] == list(checks)
    assert part["passed"], part["checks"]
    figures = {c["name"]: c["figures"] for c in part["checks"]}
    assert figures["environment"]["stubs"] == "existing stubs import"
    assert {"vllm", "torch", "grpcio"} <= set(figures["environment"]["versions"])
    assert _positive(figures["artifact"]["bytes_per_token"]) and figures["artifact"]["cached"]
    assert "[ok  ] artifact" in figures["doctor"]["output"]

    _run(
        [
            "benchmarks.gpu_accept",
            "report",
            str(next(out.glob("*-serving-cpu-smoke.json"))),
            "--out-dir",
            str(out / "m"),
        ],
        tmp_path / "report.log",
        timeout=60,
    )
    merged = _one(out / "m", "gpu-accept-*.json")
    assert merged["passed"] and merged["commit"] == "test" and len(merged["parts"]) == 1
    head, rows = _table(next((out / "m").glob("*.md")).read_text())
    assert head == ["part", "check", "result", "seconds", "detail"]
    assert [(r[0], r[1], r[2]) for r in rows] == [("serving", c, "PASS") for c in checks]
