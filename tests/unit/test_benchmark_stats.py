"""The benchmarks' pure helpers: statistics, tables, log parsing, result merging (no vLLM, no subprocess)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from benchmarks import gpu_accept, gpu_bench, harness
from edgephi import testing

# ------------------------------------------------------------------------------------------------------
# workload and statistics


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
        ([1.0, 2.0, 3.0, 4.0], 0, 1.0),
        ([1.0, 2.0, 3.0, 4.0], 100, 4.0),
        ([1.0, 2.0, 3.0, 4.0], 99, 3.97),  # numpy's default (linear): 1 + 3 * 0.99
        ([4.0, 1.0, 3.0, 2.0], 25, 1.75),  # order does not matter
        ([7.0], 99, 7.0),
        ([0.0, 10.0], 90, 9.0),
    ],
)
def test_percentile_interpolates_linearly(values: list[float], q: float, expected: float) -> None:
    assert harness.percentile(values, q) == pytest.approx(expected)


def test_percentile_of_nothing_is_nan() -> None:
    assert math.isnan(harness.percentile([], 50))


def test_timing_ttft_and_tpot() -> None:
    t = harness.Timing(sent=10.0, first=10.5, last=12.5, tokens=5)
    assert t.ttft == pytest.approx(0.5)
    assert t.tpot == pytest.approx(0.5)  # (last - first) / (tokens - 1)
    assert harness.Timing(sent=0.0, first=1.0, last=1.0, tokens=1).tpot is None


def test_prompts_are_seeded_in_range_and_never_repeat() -> None:
    w = harness.Workload(prompt_len=16, token_lo=5, token_hi=50, seed=3)
    a, b = harness.PromptSource(w), harness.PromptSource(w)
    first = [a.next() for _ in range(20)]
    assert first == [b.next() for _ in range(20)]
    assert all(len(p) == 16 and all(5 <= t < 50 for t in p) for p in first)
    assert len({tuple(p) for p in first}) == len(first)


def test_workload_round_trips_through_json_types() -> None:
    w = harness.Workload(concurrency=(1, 2, 8), output_len=7)
    as_json = {**w.to_dict(), "concurrency": list(w.concurrency)}
    assert harness.Workload.from_dict(as_json) == w


def test_smoke_workload_is_the_gpu_one_at_toy_sizes() -> None:
    s, g = gpu_bench.SMOKE_WORKLOAD, gpu_bench.GPU_WORKLOAD
    assert s.prompt_len < g.prompt_len and s.output_len < g.output_len and max(s.concurrency) < max(g.concurrency)
    assert (s.token_lo, s.seed, s.request_timeout_s) == (g.token_lo, g.seed, g.request_timeout_s)


def test_budget_counts_down() -> None:
    b = harness.Budget(100.0)
    assert 99.0 < b.left() <= 100.0
    assert b.elapsed() + b.left() == pytest.approx(100.0)


# ------------------------------------------------------------------------------------------------------
# tables


@pytest.mark.parametrize(
    ("value", "digits", "text"),
    [(None, 1, "–"), (float("nan"), 1, "–"), (1234.5678, 2, "1,234.57"), (393216, 0, "393,216"), ("warm", 0, "warm")],
)
def test_fmt(value: Any, digits: int, text: str) -> None:
    assert harness.fmt(value, digits) == text


@pytest.mark.parametrize(
    ("a", "b", "text"),
    [(1.0, 2.0, "0.500"), (3, 3, "1.000"), (1.0, 0.0, "–"), (None, 1.0, "–"), (1.0, "x", "–"), (True, 1.0, "–")],
)
def test_ratio(a: Any, b: Any, text: str) -> None:
    assert harness.ratio(a, b) == text


def test_get_follows_dotted_paths() -> None:
    d = {"concurrency": {"4": {"agg_tok_s": 12.5}}, "tpot_ms": 3.0}
    assert harness.get(d, "concurrency.4.agg_tok_s") == 12.5
    assert harness.get(d, "tpot_ms") == 3.0
    assert harness.get(d, "concurrency.16.agg_tok_s") is None
    assert harness.get(d, "tpot_ms.x") is None


def test_concurrency_rows() -> None:
    rows = harness.concurrency_rows((1, 4, 16))
    assert [r[1] for r in rows] == [
        "concurrency.1.agg_tok_s",
        "concurrency.4.agg_tok_s",
        "concurrency.16.agg_tok_s",
        "concurrency.16.ttft_p50_ms",
        "concurrency.16.tpot_ms",
    ]
    assert rows[0][0] == "aggregate tok/s, 1 stream" and rows[1][0] == "aggregate tok/s, 4 streams"


def test_side_by_side_has_a_column_per_system_and_ratio_columns() -> None:
    runs = {"inproc": {"tpot_ms": 5.0, "c": {"x": 2}}, "daemon": {"tpot_ms": 5.5, "c": {"x": 3}}}
    rows: list[harness.Row] = [("TPOT (ms)", "tpot_ms", 2), ("x", "c.x", 0), ("absent", "nope", 1)]
    table = harness.side_by_side(rows, runs, ["inproc", "daemon", "serve"], [("daemon", "inproc")], {"daemon": "D"})
    lines = table.splitlines()
    assert lines[0] == "| figure | inproc | D | serve | daemon/inproc |"
    assert lines[1] == "|---|---|---|---|---|"
    assert lines[2] == "| TPOT (ms) | 5.00 | 5.50 | – | 1.100 |"
    assert lines[3] == "| x | 2 | 3 | – | 1.500 |"
    assert lines[4] == "| absent | – | – | – | – |"


def _system(name: str, ok: bool = True, **figures: Any) -> dict[str, Any]:
    return {"system": name, "ok": ok, "error": None if ok else "RuntimeError: boom\nmore", **figures}


def test_gpu_bench_markdown_renders_measured_systems_and_ratios() -> None:
    figures: dict[str, Any] = {
        "ttft_p50_ms": 20.0,
        "decode_tok_s_b1": 200.0,
        "concurrency": {"1": {"agg_tok_s": 190.0}},
    }
    results = {
        "mode": "gpu",
        "date": "2026-12-02",
        "versions": {"vllm": "0.26.0"},
        "prep": {
            "device": "H200",
            "checkpoint_bytes": 2**33,
            "copy_rate_gb_s": 4000.0,
            "bytes_per_token": 8e9,
            "decode_bound_tok_s": 500.0,
        },
        "workload": {"prompt_len": 128, "output_len": 256, "concurrency": [1, 4, 16]},
        "profiles": {
            "12GiB": {
                "settings": {"model": "/m", "max_model_len": 16384, "log_level": "INFO"},
                "systems": {
                    "daemon": _system("daemon", **{**figures, "ttft_p50_ms": 25.0}),
                    "inproc": _system("inproc", **figures),
                    "serve": _system("serve", ok=False),
                    "daemon_restart": _system("daemon_restart", start_to_ready_s=50.0, compile_cache="warm (loaded)"),
                },
            }
        },
    }
    md = gpu_bench.render_markdown(results)
    assert md.startswith("### GPU benchmark, 2026-12-02 (H200, vLLM 0.26.0)")
    assert "#### 12GiB card (max_model_len=16384)" in md
    head = "| figure | in-process AsyncLLM | edgephi daemon (gRPC) | vllm serve (HTTP) | daemon/inproc | daemon/serve |"
    assert head in md
    assert "| TTFT p50 (ms), batch 1 | 20.0 | 25.0 | – | 1.250 | – |" in md
    assert "| aggregate tok/s, 1 stream | 190.0 | 190.0 | – | 1.000 | – |" in md
    assert "16 streams" not in md  # rows no system has are left out
    assert "restart on the warm cache 50.0 s (warm (loaded)" in md
    assert "serve: not measured: RuntimeError: boom" in md


# ------------------------------------------------------------------------------------------------------
# engine logs, command lines, environments

ENGINE_LOG = """\
INFO Using FLASH_ATTN attention backend
INFO Model loading took 8.51 GiB and 3.2 seconds
INFO Using MarlinLinearKernel for GPTQMarlinLinearMethod
INFO torch.compile takes 35.5 s in total
INFO Available KV cache memory: 2.29 GiB
INFO Model profiling: 0.98 GiB for peak activation
INFO GPU KV cache size: 23,504 tokens
INFO Maximum concurrency for 16,384 tokens per request: 1.43x
INFO Graph capturing finished in 12 secs, took 0.50 GiB
INFO init engine (profile, create kv cache, warmup model) took 20.4 seconds
INFO GPU KV cache size: 24,000 tokens
"""


def test_parse_engine_log_takes_the_last_of_each_figure() -> None:
    got = harness.parse_engine_log(ENGINE_LOG)
    assert got == {
        "kv_cache_tokens": 24_000,
        "max_concurrency_at_max_len": 1.43,
        "weights_gib": 8.51,
        "linear_kernels": ["MarlinLinearKernel"],
        "attention_backend": "FLASH_ATTN",
        "graph_capture_s": 12.0,
        "torch_compile_s": 35.5,
        "engine_init_s": 20.4,
        "kv_cache_gib": 2.29,
        "profiled_activation_gib": 0.98,
        "compile_cache": "cold (compiled)",
    }
    warm = harness.parse_engine_log("Directly load the compiled graph(s)\ntorch.compile takes 3.1 s in total")
    assert warm["compile_cache"] == "warm (loaded)"
    assert harness.parse_engine_log("nothing here") == {}


def test_serve_flags() -> None:
    flags = harness.serve_flags(
        {
            "max_model_len": 2048,
            "enforce_eager": False,
            "enable_prefix_caching": False,
            "trust_remote_code": True,
            "kv_cache_dtype": None,
            "compilation_config": {"level": 3},
        }
    )
    assert flags == [
        "--max-model-len",
        "2048",
        "--no-enable-prefix-caching",
        "--trust-remote-code",
        "--compilation-config",
        '{"level": 3}',
    ]


def test_settings_env() -> None:
    env = testing.settings_env(
        {"max_model_len": 2048, "enforce_eager": True, "kv_cache_space_gib": None, "engine_extra_args": {"a": 1}}
    )
    assert env == {
        "EDGEPHI_MAX_MODEL_LEN": "2048",
        "EDGEPHI_ENFORCE_EAGER": "true",
        "EDGEPHI_ENGINE_EXTRA_ARGS": '{"a": 1}',
    }


def test_settings_override() -> None:
    got = testing._settings_override(" ENFORCE_EAGER=false, edgephi_max_model_len=4096 ,")
    assert got == {"EDGEPHI_ENFORCE_EAGER": "false", "EDGEPHI_MAX_MODEL_LEN": "4096"}
    with pytest.raises(ValueError, match="not NAME=VALUE"):
        testing._settings_override("ENFORCE_EAGER")


def test_engine_env() -> None:
    cpu = harness.engine_env(cpu=True)
    assert cpu["VLLM_NO_USAGE_STATS"] == "1" and cpu["HF_HUB_OFFLINE"] == "1"
    assert "VLLM_USE_FLASHINFER_SAMPLER" not in cpu and "VLLM_CACHE_ROOT" not in cpu
    gpu = harness.engine_env(cpu=False, compile_cache=Path("/c"))
    assert gpu["VLLM_USE_FLASHINFER_SAMPLER"] == "0"
    assert (gpu["VLLM_CACHE_ROOT"], gpu["TORCHINDUCTOR_CACHE_DIR"], gpu["TRITON_CACHE_DIR"]) == (
        "/c/vllm",
        "/c/inductor",
        "/c/triton",
    )


def test_system_run_records_a_failure() -> None:
    said: list[str] = []
    run = harness.SystemRun("serve", figures={"wall_s": 1.0})
    run.failed(RuntimeError("x" * 5000), said.append)
    d = run.to_dict()
    assert d["system"] == "serve" and d["ok"] is False and d["wall_s"] == 1.0
    assert len(d["error"]) == 3000 and said and said[0].startswith("  serve: FAILED: ")


# ------------------------------------------------------------------------------------------------------
# gpu_accept: merging parts, pytest's report


GPU = {"name": "NVIDIA H200", "driver": "570.1", "compute_cap": "9.0", "memory_total_mib": "143771"}


def _part(name: str, passed: bool, commit: str = "abc") -> dict[str, Any]:
    checks = [{"name": "environment", "ok": True, "detail": "fine", "seconds": 0.2},
              {"name": "doctor", "ok": passed, "detail": "a | b\nc", "seconds": 1.0}]  # fmt: skip
    return {
        "date": "2026-12-02",
        "part": name,
        "commit": commit,
        "gpu": GPU,
        "versions": {},
        "budget_s": 560,
        "elapsed_s": 300.0,
        "passed": passed,
        "checks": checks,
    }


def test_merge_parts() -> None:
    merged = gpu_accept.merge_parts([_part("serving", True), _part("setup", True)])
    assert merged["passed"] and merged["commit"] == "abc" and merged["gpu"] == GPU
    assert "warning" not in merged and [p["part"] for p in merged["parts"]] == ["serving", "setup"]
    assert not gpu_accept.merge_parts([_part("serving", True), _part("setup", False)])["passed"]
    assert (
        "different commits" in gpu_accept.merge_parts([_part("serving", True), _part("setup", True, "def")])["warning"]
    )


def test_render_parts() -> None:
    md = gpu_accept.render([_part("serving", True), _part("setup", False)])
    assert md.startswith(
        "# GPU acceptance 2026-12-02 (commit abc)\n\nNVIDIA H200, driver 570.1, compute capability 9.0"
    )
    assert "| serving | doctor | PASS | 1.0 | a / b c |" in md
    assert "| setup | doctor | FAIL | 1.0 | a / b c |" in md
    assert "- part `setup`: 300.0 s of a 560 s budget; FAILED" in md


def test_junit_cases(tmp_path: Path) -> None:
    xml = tmp_path / "r.xml"
    xml.write_text(
        """<?xml version="1.0"?><testsuites><testsuite>
        <testcase classname="tests.integration.test_serving" name="test_a" time="1.26"/>
        <testcase classname="tests.integration.test_serving" name="test_b" time="0.1">
          <failure message="assert 1 == 2">trace</failure></testcase>
        <testcase classname="tests.integration.test_watchdog" name="test_c" time="3">
          <properties><property name="ping_interval_max_s" value="1.5"/></properties>
          <skipped message="no GPU"/></testcase>
        </testsuite></testsuites>"""
    )
    cases = gpu_accept.junit_cases(xml)
    assert [(c["test"], c["outcome"], c["seconds"]) for c in cases] == [
        ("test_serving::test_a", "passed", 1.3),
        ("test_serving::test_b", "failed", 0.1),
        ("test_watchdog::test_c", "skipped", 3.0),
    ]
    assert cases[1]["message"] == "assert 1 == 2"
    assert cases[2]["properties"] == {"ping_interval_max_s": "1.5"} and cases[2]["message"] == "no GPU"
