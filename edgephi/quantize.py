"""W4A16 weight-only quantization of a Hugging Face causal LM with Intel auto-round, fully offline.

:func:`quantize` turns a bf16/fp16 checkpoint directory into a 4-bit (by default) checkpoint that vLLM serves
directly (``auto_gptq`` export: GPTQ-packed ``qweight``/``qzeros``/``scales``, ``quantization_config`` in
``config.json``). The defaults follow the origin article: 4 bits, groups of 128, symmetric, 256 SignRound
iterations over 128 calibration samples of 2048 tokens, ``lm_head`` left unquantized.

auto-round's default calibration set is fetched from a model hub, which edgephi never reaches: calibration
text comes from :func:`local_calibration_texts` (the Python standard library's docstrings, present on every
machine) or from the user's files (:func:`load_calibration_files`).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from edgephi.devmodel import stdlib_documents

__all__ = [
    "EXPORT_FORMATS",
    "TOKENIZER_FILES",
    "load_calibration_files",
    "local_calibration_texts",
    "quantize",
]

logger = logging.getLogger(__name__)

#: Export formats quantize() has been checked with (auto-round accepts more; see its docs).
EXPORT_FORMATS: tuple[str, ...] = ("auto_gptq", "auto_round")

#: Files copied verbatim from the source checkpoint so the quantized directory serves on its own.
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
)

_METADATA_FILE = "edgephi_quantize.json"
_DOC_SEPARATOR = "\n\n"


def local_calibration_texts(n: int = 128, min_chars: int = 12_288, split: str = "train") -> list[str]:
    """Offline calibration texts: standard-library docstrings joined into ``n`` texts of >= ``min_chars`` chars.

    Deterministic: documents of ``split`` (default "train", so the quality gate's held-out text stays unseen;
    see :func:`edgephi.devmodel.stdlib_documents`) are taken in their
    fixed order and concatenated, separated by blank lines, until each text reaches ``min_chars`` characters.
    auto-round drops any sample shorter than its ``seqlen`` tokens; byte-level BPE tokenizers average 3-4.5
    characters per token on this text, so ``min_chars = 6 * seqlen`` is safe (the default suits 2048).

    Args:
        n: number of texts wanted (>= 1).
        min_chars: minimum length of each text, in characters (>= 1).
        split: "train" (default), "heldout" or "all".

    Returns:
        Up to ``n`` texts (fewer only if the standard library runs out of text, about 1.7 M characters).

    Raises:
        ValueError: ``n`` or ``min_chars`` < 1.
    """
    if n < 1 or min_chars < 1:
        raise ValueError("n and min_chars must be >= 1")
    docs = stdlib_documents(split, max_chars=max(2_000_000, n * (min_chars + 4096)))
    return _join_chars(docs, n, min_chars)


def load_calibration_files(paths: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Read user calibration text (UTF-8) from files.

    A ``.jsonl`` file yields one text per line: the line's ``"text"`` field (lines that are not JSON objects
    with a string ``"text"`` are skipped). Any other file is one text. Blank texts are dropped. Short texts are
    fine: :func:`quantize` joins consecutive texts until each sample reaches its ``seqlen`` tokens.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: no non-blank text was found.
    """
    texts: list[str] = []
    for p in map(Path, paths):
        raw = p.read_text(encoding="utf-8")
        if p.suffix == ".jsonl":
            for line in raw.splitlines():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(obj, dict) and isinstance(obj.get("text"), str):
                    texts.append(obj["text"])
        else:
            texts.append(raw)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("no calibration text found in the given files")
    return texts


def _join_chars(texts: Sequence[str], n: int, min_chars: int) -> list[str]:
    out: list[str] = []
    buf: list[str] = []
    size = 0
    for text in texts:
        buf.append(text)
        size += len(text) + len(_DOC_SEPARATOR)
        if size - len(_DOC_SEPARATOR) >= min_chars:
            out.append(_DOC_SEPARATOR.join(buf))
            buf, size = [], 0
            if len(out) == n:
                break
    return out


def _fit_calibration(texts: Sequence[str], tokenizer: Any, seqlen: int, nsamples: int) -> list[str]:
    """Join consecutive texts so that each of (up to) ``nsamples`` samples has >= ``seqlen`` tokens."""

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    samples: list[str] = []
    buf: list[str] = []
    approx = 0
    for text in texts:
        buf.append(text)
        approx += n_tokens(text) + 1
        if approx >= seqlen:
            joined = _DOC_SEPARATOR.join(buf)
            if n_tokens(joined) >= seqlen:
                samples.append(joined)
                buf, approx = [], 0
                if len(samples) == nsamples:
                    break
    if not samples:
        raise ValueError(f"calibration text too short: not even one sample of {seqlen} tokens")
    if len(samples) < nsamples:
        logger.warning("only %d calibration samples of %d tokens (wanted %d)", len(samples), seqlen, nsamples)
    return samples


def _peak_rss_mib() -> float:
    # ru_maxrss is KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cast_leftover_fp32(folder: Path) -> None:
    """Store unquantized float32 tensors in the checkpoint's declared dtype.

    On CPUs without bf16 support auto-round tunes in float32, and its immediate-saving path writes the
    unquantized tensors (embeddings, norms, ``lm_head``) as float32 while ``config.json`` declares float16
    (the GPTQ convention). Cast them to the declared dtype: half the size, and what a GPU run writes.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    name = config.get("dtype") or config.get("torch_dtype") or "float16"
    target = getattr(torch, str(name), None)
    if not isinstance(target, torch.dtype) or target == torch.float32:
        return
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is no mapping
        if not any(t.dtype == torch.float32 for t in tensors.values()):
            continue
        tensors = {k: t.to(target) if t.dtype == torch.float32 else t for k, t in tensors.items()}
        tmp = shard.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={**metadata, "format": "pt"})
        os.replace(tmp, shard)
        del tensors


def _make_readable(folder: Path) -> None:
    # auto-round's shard writer creates 0600 files and mkdtemp 0700 dirs; a serving user must read them
    os.chmod(folder, 0o755)
    for p in folder.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)


def _copy_tokenizer_files(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    # auto-round's tokenizer.save_pretrained may have split the chat template out of tokenizer_config.json;
    # keep the source's layout (one source of truth).
    if not (src / "chat_template.jinja").exists():
        (dst / "chat_template.jinja").unlink(missing_ok=True)


def quantize(
    src: Path,
    out: Path,
    *,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    iters: int = 256,
    nsamples: int = 128,
    seqlen: int = 2048,
    batch_size: int = 8,
    gradient_accumulate_steps: int = 1,
    low_gpu_mem_usage: bool = False,
    export_format: str = "auto_gptq",
    calibration_texts: list[str] | None = None,
    device: str | None = None,
    quant_lm_head: bool = False,
) -> Path:
    """Quantize the checkpoint in ``src`` with auto-round (SignRound) and write it to ``out``.

    The work happens in a temporary directory beside ``out`` (same filesystem), renamed to ``out`` only once
    the export is complete, so ``out`` is either absent or a full checkpoint. The tokenizer files and
    ``generation_config.json`` of ``src`` are copied in, so vLLM can serve ``out`` on its own; an
    ``edgephi_quantize.json`` records the parameters, the auto-round version, wall time and peak RSS.

    Cost: roughly proportional to ``iters * nsamples * seqlen`` per decoder layer; with ``iters=8,
    nsamples=16, seqlen=256`` the tiny dev model (:mod:`edgephi.devmodel`) takes well under a minute on
    2 CPU cores. Memory: the model plus the cached block inputs (``nsamples * seqlen * hidden_size`` floats).

    Args:
        src: Hugging Face checkpoint directory (config.json, safetensors weights, tokenizer files).
        out: directory to create; its parent is created if needed. Must not exist.
        bits: weight bits (4 for W4A16).
        group_size: input channels sharing one scale (128; -1 for per-channel).
        sym: symmetric quantization (no zero points); vLLM's GPTQ kernels on CPU need ``sym=True``.
        iters: SignRound optimization steps per block (0 = plain round-to-nearest).
        nsamples: calibration samples.
        seqlen: tokens per calibration sample; shorter texts are joined until long enough.
        batch_size: calibration samples per optimization step.
        gradient_accumulate_steps: optimization steps accumulated per update.
        low_gpu_mem_usage: offload cached activations to CPU (slower; only matters on a GPU).
        export_format: auto-round export format, e.g. ``"auto_gptq"`` (default) or ``"auto_round"``.
        calibration_texts: calibration text; defaults to :func:`local_calibration_texts`.
        device: torch device for tuning (``"cpu"``, ``"cuda"``, ``"cuda:0"``...); default: first CUDA
            device if available, else CPU.
        quant_lm_head: also quantize ``lm_head`` (default: keep it in 16-bit, as Phi-4 W4A16 builds do).

    Returns:
        ``out``.

    Raises:
        FileExistsError: ``out`` already exists.
        FileNotFoundError: ``src`` has no ``config.json``.
        ValueError: the calibration text cannot fill one sample of ``seqlen`` tokens, or a bad argument.
    """
    import torch
    from auto_round import AutoRound, RTNConfig, SignRoundConfig
    from auto_round.version import __version__ as auto_round_version
    from transformers import AutoTokenizer

    src, out = Path(src), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists")
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} is not a checkpoint directory (no config.json)")
    if bits < 1 or nsamples < 1 or seqlen < 1 or batch_size < 1 or iters < 0:
        raise ValueError("bits, nsamples, seqlen and batch_size must be >= 1, iters >= 0")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"

    t0 = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    calibration_source = "user" if calibration_texts is not None else "stdlib-docstrings"
    if calibration_texts is None:
        calibration_texts = local_calibration_texts(nsamples, min_chars=seqlen * 6)
    samples = _fit_calibration(calibration_texts, tokenizer, seqlen, nsamples)
    logger.info(
        "quantizing %s: W%dA16 group %d sym=%s, %d iters, %d samples x %d tokens, format %s, device %s",
        src,
        bits,
        group_size,
        sym,
        iters,
        len(samples),
        seqlen,
        export_format,
        device,
    )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        alg_config: Any
        if iters > 0:
            alg_config = SignRoundConfig(
                iters=iters,
                gradient_accumulate_steps=gradient_accumulate_steps,
                bits=bits,
                group_size=group_size,
                sym=sym,
            )
        else:
            alg_config = RTNConfig(disable_opt_rtn=True, bits=bits, group_size=group_size, sym=sym)
        autoround = AutoRound(
            str(src),
            tokenizer=tokenizer,
            scheme="W4A16",
            alg_configs=alg_config,
            nsamples=len(samples),
            seqlen=seqlen,
            batch_size=min(batch_size, len(samples)),
            low_gpu_mem_usage=low_gpu_mem_usage,
            dataset=samples,
            device_map=device,
            quant_lm_head=quant_lm_head,
        )
        _, folders = autoround.quantize_and_save(str(tmp / "export"), format=export_format)
        folder = Path(folders if isinstance(folders, str | os.PathLike) else folders[0])
        _cast_leftover_fp32(folder)
        _copy_tokenizer_files(src, folder)
        seconds = time.monotonic() - t0
        meta = {
            "source": str(src),
            "auto_round_version": auto_round_version,
            "export_format": export_format,
            "bits": bits,
            "group_size": group_size,
            "sym": sym,
            "iters": iters,
            "nsamples": len(samples),
            "seqlen": seqlen,
            "batch_size": batch_size,
            "gradient_accumulate_steps": gradient_accumulate_steps,
            "quant_lm_head": quant_lm_head,
            "device": device,
            "calibration": calibration_source,
            "seconds": round(seconds, 1),
            "peak_rss_mib": round(_peak_rss_mib()),
            "python": ".".join(map(str, sys.version_info[:3])),
            "torch": torch.__version__,
        }
        (folder / _METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _make_readable(folder)
        os.rename(folder, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("quantized %s -> %s in %.1fs (peak RSS %.0f MiB)", src, out, seconds, _peak_rss_mib())
    return out
