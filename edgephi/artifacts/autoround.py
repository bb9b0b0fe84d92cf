"""One auto-round run: its parameters, the named parameter sets (profiles), and the run itself.

:func:`quantize` turns a bf16/fp16 checkpoint directory into a 4-bit (by default) checkpoint that vLLM serves
directly (``auto_gptq`` export: GPTQ-packed ``qweight``/``qzeros``/``scales``, ``quantization_config`` in
``config.json``), fully offline. Every knob of a run is one field of one frozen :class:`AutoRoundParams`: a
profile (:data:`PROFILES`, ``edgephi quantize --profile``) gives the knobs, command-line flags override some
(:meth:`AutoRoundParams.from_profile`), :func:`quantize` hands them to auto-round, and
:meth:`AutoRoundParams.to_json` records them, under the same names, in ``edgephi_quantize.json`` and in the
artifact manifest's ``quantization`` section. The defaults follow the origin article: 4 bits, groups of 128,
symmetric, 256 SignRound iterations over 128 calibration samples of 2048 tokens, ``lm_head`` left unquantized.

auto-round's default calibration set is fetched from a model hub, which edgephi never reaches: calibration
text comes from :mod:`.corpus` (the standard library's docstrings, train split) or from the user's files.

Importing this module imports neither torch nor auto-round (:func:`quantize` does).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edgephi.artifacts.corpus import DOC_SEPARATOR, local_calibration_texts

__all__ = [
    "EXPORT_FORMATS",
    "METADATA_FILE",
    "PROFILES",
    "TOKENIZER_FILES",
    "AutoRoundParams",
    "Profile",
    "quantize",
    "read_metadata",
]

logger = logging.getLogger(__name__)

#: Export formats edgephi serves and :func:`quantize` has been checked with (auto-round accepts more).
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

#: What :func:`quantize` writes beside the weights: the parameters, versions, wall time and peak RSS.
METADATA_FILE = "edgephi_quantize.json"


@dataclasses.dataclass(frozen=True)
class AutoRoundParams:
    """Every knob of one auto-round run (defaults: the ``default`` profile, auto-round's recipe for Phi-4).

    The field names are the ``edgephi quantize`` flags (``--group-size`` is ``group_size``...), the keys of
    ``edgephi_quantize.json`` and of the manifest's ``quantization`` section.

    Attributes:
        bits: weight bits (4 for W4A16).
        group_size: input channels sharing one scale (128; -1 for one scale per output channel).
        sym: symmetric quantization (no zero points); vLLM's GPTQ loader and CPU kernels need it.
        iters: SignRound optimization steps per decoder block; 0 = plain round-to-nearest (RTN).
        nsamples: calibration samples.
        seqlen: tokens per calibration sample (shorter texts are joined until long enough).
        batch_size: calibration samples per optimization step (at most ``nsamples``).
        gradient_accumulate_steps: optimization steps accumulated per weight update.
        low_gpu_mem_usage: keep cached block inputs on the CPU (less VRAM, slower; no effect on a CPU run).
        export_format: auto-round export format, one of :data:`EXPORT_FORMATS` for an artifact edgephi serves.
        quant_lm_head: also quantize ``lm_head`` (edgephi serves it in 16 bits: the pipeline refuses this).
        device: torch device for tuning (``"cpu"``, ``"cuda"``, ``"cuda:0"``...); None: the first CUDA device
            when there is one, else the CPU.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    iters: int = 256
    nsamples: int = 128
    seqlen: int = 2048
    batch_size: int = 8
    gradient_accumulate_steps: int = 1
    low_gpu_mem_usage: bool = True
    export_format: str = "auto_gptq"
    quant_lm_head: bool = False
    device: str | None = None

    @classmethod
    def from_profile(cls, profile: str, **overrides: Any) -> AutoRoundParams:
        """The knobs of :data:`PROFILES` ``[profile]``, with every override that is not None applied.

        None means "not given" (an ``argparse`` default), so ``from_profile("12gb", iters=args.iters)`` keeps the
        profile's iterations unless ``--iters`` was given.

        Raises:
            KeyError: unknown profile.
            TypeError: an override that is not a field.
        """
        return PROFILES[profile].params().with_overrides(**overrides)

    def with_overrides(self, **overrides: Any) -> AutoRoundParams:
        """A copy with every override that is not None applied. Raises TypeError for an unknown field."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AutoRoundParams:
        """The parameters recorded in ``data`` (an ``edgephi_quantize.json`` or a manifest ``quantization``
        section): the fields present are read, other keys ignored, missing fields take their defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def scheme(self) -> str:
        """``"W4A16"`` for 4 bits: weight bits, 16-bit activations."""
        return f"W{self.bits}A16"

    def to_json(self) -> dict[str, Any]:
        """The fields as a JSON object, in declaration order (what the metadata and the manifest record)."""
        return dataclasses.asdict(self)

    def problems(self) -> list[str]:
        """Why auto-round cannot run with these values (empty: it can). Whether vLLM can serve the result is
        :func:`edgephi.artifacts.build.check_config`'s question."""
        reasons = []
        if self.bits < 1 or self.iters < 0 or min(self.nsamples, self.seqlen, self.batch_size,
                                                   self.gradient_accumulate_steps) < 1:  # fmt: skip
            reasons.append("bits >= 1, iters >= 0; nsamples, seqlen, batch size and gradient accumulation >= 1")
        if self.batch_size > self.nsamples >= 1:
            reasons.append(f"batch size {self.batch_size} > nsamples {self.nsamples}")
        return reasons


@dataclasses.dataclass(frozen=True)
class Profile(AutoRoundParams):
    """A named set of auto-round knobs (``edgephi quantize --profile``), sized by auto-round's documented cost
    for a 14B model: the knobs (every :class:`AutoRoundParams` field) plus what the profile is for.

    Attributes:
        vram_14b_gib: GPU memory (GiB) auto-round documents for a 14B model with these knobs; None: not tuned.
        note: one line shown by ``edgephi quantize --help``.
    """

    vram_14b_gib: float | None = None
    note: str = ""

    def params(self) -> AutoRoundParams:
        """The knobs alone."""
        return AutoRoundParams(**{f.name: getattr(self, f.name) for f in dataclasses.fields(AutoRoundParams)})


#: ``--profile``: auto-round documents ~22 GB of VRAM for a 14B model with its defaults (batch 8), ~11 GB with
#: ``low_gpu_mem_usage`` and ~7 GB with ``low_gpu_mem_usage`` + batch 1 + gradient accumulation 8 (same effective
#: batch, slower). ``default`` therefore fits a 16 GB card and ``12gb`` a 12 GB card. Knobs not named here are
#: :class:`AutoRoundParams`' defaults.
PROFILES: dict[str, Profile] = {
    "default": Profile(
        vram_14b_gib=11.0, note="auto-round's recipe with low_gpu_mem_usage: ~11 GB VRAM for 14B, fits a 16 GB card"
    ),
    "16gb": Profile(vram_14b_gib=11.0, note="same as default"),
    "12gb": Profile(
        batch_size=1,
        gradient_accumulate_steps=8,
        vram_14b_gib=7.0,
        note="low_gpu_mem_usage + batch 1 + gradient accumulation 8: ~7 GB VRAM for 14B, fits a 12 GB card",
    ),
    "24gb": Profile(
        low_gpu_mem_usage=False, vram_14b_gib=22.0, note="auto-round's defaults, fastest: ~22 GB VRAM for 14B"
    ),
    "rtn": Profile(
        iters=0,
        nsamples=8,
        seqlen=512,
        note="round-to-nearest (iters 0): minutes instead of hours, no tuning, lower quality",
    ),
}


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
            joined = DOC_SEPARATOR.join(buf)
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


def read_metadata(model_dir: Path) -> dict[str, Any]:
    """``model_dir``'s ``edgephi_quantize.json`` (what :func:`quantize` recorded); ``{}`` when there is none.

    Raises:
        ValueError: the file is not JSON (``json.JSONDecodeError``).
    """
    path = Path(model_dir) / METADATA_FILE
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def quantize(
    src: Path,
    out: Path,
    params: AutoRoundParams = AutoRoundParams(),
    *,
    calibration_texts: Sequence[str] | None = None,
) -> Path:
    """Quantize the checkpoint in ``src`` with auto-round (SignRound, or RTN for ``iters=0``) into ``out``.

    The work happens in a temporary directory beside ``out`` (same filesystem), renamed to ``out`` only once
    the export is complete, so ``out`` is either absent or a full checkpoint. The tokenizer files and
    ``generation_config.json`` of ``src`` are copied in, so vLLM can serve ``out`` on its own; an
    ``edgephi_quantize.json`` (:data:`METADATA_FILE`) records ``params`` (:meth:`AutoRoundParams.to_json`; its
    ``nsamples`` is the number of samples actually used, ``device`` the device actually used), the
    auto-round version, the calibration source, wall time (``seconds``) and peak RSS (``peak_rss_mib``).

    Cost: roughly proportional to ``iters * nsamples * seqlen`` per decoder layer; with ``iters=8,
    nsamples=16, seqlen=256`` the tiny dev model (:mod:`edgephi.devmodel`) takes well under a minute on
    2 CPU cores. Memory: the model plus the cached block inputs (``nsamples * seqlen * hidden_size`` floats).

    Args:
        src: Hugging Face checkpoint directory (config.json, safetensors weights, tokenizer files).
        out: directory to create; its parent is created if needed. Must not exist.
        params: the run's knobs (see :class:`AutoRoundParams`).
        calibration_texts: calibration text, any lengths (consecutive texts are joined into samples of
            ``params.seqlen`` tokens); default: :func:`edgephi.artifacts.corpus.local_calibration_texts`.

    Returns:
        ``out``.

    Raises:
        FileExistsError: ``out`` already exists.
        FileNotFoundError: ``src`` has no ``config.json``.
        ValueError: ``params.problems()`` is not empty, or the calibration text cannot fill one sample of
            ``params.seqlen`` tokens.
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
    problems = params.problems()
    if problems:
        raise ValueError("; ".join(problems))
    device = params.device or ("cuda" if torch.cuda.is_available() else "cpu")

    t0 = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    calibration_source = "user" if calibration_texts is not None else "stdlib-docstrings"
    if calibration_texts is None:
        calibration_texts = local_calibration_texts(params.nsamples, min_chars=params.seqlen * 6)
    samples = _fit_calibration(calibration_texts, tokenizer, params.seqlen, params.nsamples)
    logger.info("quantizing %s: %s, %d samples x %d tokens, device %s", src, params, len(samples), params.seqlen,
                device)  # fmt: skip

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        alg_config: Any
        if params.iters > 0:
            alg_config = SignRoundConfig(
                iters=params.iters,
                gradient_accumulate_steps=params.gradient_accumulate_steps,
                bits=params.bits,
                group_size=params.group_size,
                sym=params.sym,
            )
        else:
            alg_config = RTNConfig(disable_opt_rtn=True, bits=params.bits, group_size=params.group_size,
                                   sym=params.sym)  # fmt: skip
        autoround = AutoRound(
            str(src),
            tokenizer=tokenizer,
            scheme="W4A16",
            alg_configs=alg_config,
            nsamples=len(samples),
            seqlen=params.seqlen,
            batch_size=min(params.batch_size, len(samples)),
            low_gpu_mem_usage=params.low_gpu_mem_usage,
            dataset=samples,
            device_map=device,
            quant_lm_head=params.quant_lm_head,
        )
        _, folders = autoround.quantize_and_save(str(tmp / "export"), format=params.export_format)
        folder = Path(folders if isinstance(folders, str | os.PathLike) else folders[0])
        _cast_leftover_fp32(folder)
        _copy_tokenizer_files(src, folder)
        seconds = time.monotonic() - t0
        meta = {
            "source": str(src),
            "auto_round_version": auto_round_version,
            **params.to_json(),
            "nsamples": len(samples),
            "device": device,
            "calibration": calibration_source,
            "seconds": round(seconds, 1),
            "peak_rss_mib": round(_peak_rss_mib()),
            "python": ".".join(map(str, sys.version_info[:3])),
            "torch": torch.__version__,
        }
        (folder / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _make_readable(folder)
        os.rename(folder, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("quantized %s -> %s in %.1fs (peak RSS %.0f MiB)", src, out, seconds, _peak_rss_mib())
    return out
