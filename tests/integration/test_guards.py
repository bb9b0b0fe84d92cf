"""Memory guards on the real daemon: a preflight refusal exits 78 before loading, and the host-RAM watch sheds at
the soft floor, recovers, and drains and exits 75 at the hard one. The preflight arithmetic and the watch's
levels are tests/unit/test_preflight.py and tests/unit/test_memory_watch.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import psutil
import pytest

from edgephi.client import sampling
from edgephi.exit_codes import ExitCode
from edgephi.testing import run_daemon

GiB = 2**30


def test_serve_refuses_too_small_budget_with_exit_78(artifact: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPHI_")}
    env.update({"EDGEPHI_MODEL": str(artifact), "EDGEPHI_VRAM_BUDGET_GIB": "0.01", "EDGEPHI_PORT": "0"})
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "edgephi.cli", "serve"], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == ExitCode.CONFIG, proc.stderr[-2000:]
    assert "memory preflight" in proc.stderr and "short by" in proc.stderr
    assert time.monotonic() - started < 60  # refused before loading the engine


def test_soft_limit_sheds_and_recovers_then_hard_limit_exits(artifact: Path, tmp_path: Path) -> None:
    """Host available memory is pushed below the floors by really allocating memory in this process."""
    # The daemon itself takes D ≈ 2-3 GiB of the available memory while loading (engine, 1 GiB KV cache).
    # Floors sit below base - D; ballasts push below them whatever D is in [0, 4.25) GiB.
    base = psutil.virtual_memory().available
    soft_floor = (base - 4.5 * GiB) / GiB
    hard_floor = (base - 9.0 * GiB) / GiB
    assert hard_floor > 1, "test needs ~10 GiB of free host RAM"
    with (
        run_daemon(
            artifact,
            tmp_path,
            min_available_soft_gib=f"{soft_floor:.3f}",
            min_available_hard_gib=f"{hard_floor:.3f}",
            memory_check_interval_s=0.25,
        ) as d,
        d.client() as c,
    ):
        assert c.health() == "SERVING"
        ballast = b"\x01" * int(4.5 * GiB)  # really touches the pages
        deadline = time.monotonic() + 20
        while c.health() != "NOT_SERVING":
            assert time.monotonic() < deadline, d.log()[-2000:]
            time.sleep(0.1)
        with pytest.raises(grpc.RpcError) as err:
            list(c.generate("hi", sampling(max_tokens=2)))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "memory guard" in (err.value.details() or "")
        with pytest.raises(grpc.RpcError) as err:  # tokenizing costs memory too
            c.count_tokens("hi")
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        del ballast
        deadline = time.monotonic() + 20
        while c.health() != "SERVING":
            assert time.monotonic() < deadline, d.log()[-2000:]
            time.sleep(0.1)
        assert list(c.generate("hi", sampling(max_tokens=2, ignore_eos=True)))
        assert d.metrics()['edgephi_guard_trips_total{level="soft"}'] >= 1

        ballast = b"\x01" * int(9 * GiB)
        code = d.proc.wait(60)
        del ballast
        assert code == ExitCode.MEMORY, d.log()[-2000:]
        assert "hard limit" in d.log()
