"""Shared, cached test models: the tiny Phi-4 stand-in and its W4A16 quantization.

Both are cached under ``$EDGEPHI_CACHE_DIR`` or the repository's git-ignored ``.cache/`` (the same root as
tests/conftest.py's ``dev_models``, so the bf16 build is shared), so only the first test run pays for training
(~4 min on 2 idle cores) and quantization (~1 min). Test modules wrap these helpers in session fixtures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gc
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgephi import devmodel
from edgephi.artifacts.autoround import AutoRoundParams, quantize

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Quick quantization settings for tests (the production defaults take far longer).
TEST_AUTOROUND = AutoRoundParams(iters=8, nsamples=16, seqlen=256, batch_size=8, low_gpu_mem_usage=False)


def cache_root() -> Path:
    """``$EDGEPHI_CACHE_DIR`` or ``<repo>/.cache``."""
    env = os.environ.get("EDGEPHI_CACHE_DIR")
    return Path(env) if env else REPO_ROOT / ".cache"


def tiny_model_dir() -> Path:
    """The default-spec tiny Phi-4 stand-in (bf16), built once and cached."""
    return devmodel.build(cache_root())


def quantized_model_dir(export_format: str = "auto_gptq", **overrides: Any) -> Path:
    """The tiny model quantized W4A16 (group 128, sym) with :data:`TEST_AUTOROUND` (``overrides`` applied),
    built once and cached under a name with a digest of the parameters."""
    src = tiny_model_dir()
    params = dataclasses.replace(TEST_AUTOROUND, **overrides, export_format=export_format)
    key = hashlib.sha256(json.dumps(params.to_json(), sort_keys=True).encode()).hexdigest()[:10]
    out = cache_root() / f"{src.name}-w4g128-{export_format}-{key}"
    if out.is_dir():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.is_dir():
            with third_party_pipes_collected():
                quantize(src, out, params)
    return out


@contextlib.contextmanager
def third_party_pipes_collected() -> Iterator[None]:
    """Run in-process auto-round with its unclosed pipes dropped from the unraisable-exception hook.

    auto-round preprocesses calibration data in a forked ``multiprocessing`` child and leaves the objects
    holding its pipes to the garbage collector; under ``filterwarnings = error`` their ResourceWarning, raised
    whenever a collection happens to run inside a test, fails that test. Only ResourceWarnings raised while
    auto-round runs (and the collection right after it) are dropped; every other unraisable exception is passed on.
    """
    hook = sys.unraisablehook

    def drop_resource_warnings(unraisable: Any) -> None:
        if not isinstance(unraisable.exc_value, ResourceWarning):
            hook(unraisable)

    sys.unraisablehook = drop_resource_warnings
    try:
        yield
        gc.collect()
    finally:
        sys.unraisablehook = hook


_VLLM_SCRIPT = textwrap.dedent(
    """
    import json, os, resource, sys, time

    def main():
        t0 = time.monotonic()
        from vllm import LLM, SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        llm = LLM(model=sys.argv[1], max_model_len=1024, dtype="bfloat16", enforce_eager=True,
                  kv_cache_memory_bytes=256 << 20, seed=0)
        load_s = time.monotonic() - t0
        requests = json.loads(sys.argv[2])
        params = [
            SamplingParams(
                temperature=0.0,
                max_tokens=r.get("max_tokens", 24),
                ignore_eos=r.get("ignore_eos", False),
                structured_outputs=StructuredOutputsParams(choice=r["choice"]) if r.get("choice") else None,
            )
            for r in requests
        ]
        t1 = time.monotonic()
        outs = llm.generate([r["prompt"] for r in requests], params)
        result = {
            "load_seconds": load_s,
            "generate_seconds": time.monotonic() - t1,
            "texts": [o.outputs[0].text for o in outs],
            "token_ids": [list(o.outputs[0].token_ids) for o in outs],
            "finish_reasons": [o.outputs[0].finish_reason for o in outs],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "children_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        }
        print("EDGEPHI_RESULT " + json.dumps(result), flush=True)
        llm.llm_engine.engine_core.shutdown()  # stop the engine-core process before leaving
        os._exit(0)  # skip the slow interpreter teardown; the caller kills any leftover in our session

    if __name__ == "__main__":
        main()
    """
)


def vllm_generate(model_dir: Path, requests: list[dict[str, Any]], timeout: float = 900) -> dict[str, Any]:
    """Load ``model_dir`` in vLLM (CPU, bf16, eager) in a fresh subprocess and run greedy ``requests``.

    Each request is ``{"prompt": str, "max_tokens": int (default 24), "ignore_eos": bool (default False: stop at
    the end-of-sequence tokens), "choice": [str, ...] (optional, constrains the output to one of these strings
    through vLLM's structured outputs)}``.
    Returns ``texts``, ``token_ids``, ``finish_reasons`` (one per request), ``load_seconds``,
    ``generate_seconds`` and peak RSS figures in MiB. Raises AssertionError with vLLM's output tail on failure.
    """
    with tempfile.TemporaryFile("w+", encoding="utf-8") as log:
        # Own session (process group): vLLM forks engine-core/worker processes; whatever is left of them
        # after the result (or a timeout) is killed with the group, and nothing holds our pipes open.
        proc = subprocess.Popen(
            [sys.executable, "-c", _VLLM_SCRIPT, str(model_dir), json.dumps(requests)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.seek(0)
        output = log.read()
    for line in output.splitlines():
        if line.startswith("EDGEPHI_RESULT "):
            result: dict[str, Any] = json.loads(line.removeprefix("EDGEPHI_RESULT "))
            return result
    raise AssertionError(f"vLLM failed on {model_dir} (rc {proc.returncode}):\n{output[-12000:]}")


def write_phi4_chat_files(d: Path) -> None:
    """Phi-4's current tokenizer_config.json (its chat tokens, with Phi-4's ids, and chat template) and
    generation_config.json: what `edgephi fetch` checks (edgephi.artifacts.chat_format), without a vocabulary."""
    from edgephi import phi4

    tokens = {phi4.ENDOFTEXT_ID: phi4.ENDOFTEXT, phi4.END_OF_TURN_ID: phi4.IM_END, phi4.PAD_ID: phi4.PAD}
    (d / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": {str(i): {"content": c, "special": True} for i, c in tokens.items()},
        "chat_template": phi4.CHAT_TEMPLATE, "eos_token": phi4.IM_END}))  # fmt: skip
    (d / "generation_config.json").write_text(json.dumps({
        "eos_token_id": [phi4.END_OF_TURN_ID, phi4.ENDOFTEXT_ID], "pad_token_id": phi4.PAD_ID}))  # fmt: skip
