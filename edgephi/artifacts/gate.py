"""The quality gate: does a 4-bit artifact still behave like its 16-bit source on text it never saw?

Two figures on held-out text (by default the held-out split of the standard-library docstrings,
:func:`edgephi.artifacts.corpus.heldout_texts`: never used to train the tiny stand-in, never used for
calibration by ``edgephi quantize``, and any held-out document found inside user calibration text is dropped):

* ``ppl_ratio``: perplexity of the 4-bit model / perplexity of the 16-bit reference (1.0 = no loss);
* ``top1_agreement``: the fraction of positions where both models' most likely next token is the same.

The gate passes when ``ppl_ratio <= max_ppl_ratio`` and ``top1_agreement >= min_top1``.

How the 4-bit model is evaluated: transformers on this machine cannot run GPTQ kernels on CPU (that needs
gptqmodel/optimum), so the artifact's packed tensors are dequantized into a plain 16-bit model of the same
architecture, a well-defined transform that gives exactly the weights the 4-bit kernels multiply with
(vLLM's W4A16 kernels dequantize in the same way inside the GEMM). For every module ``P`` with ``P.qweight``:

* ``qweight`` int32 ``[in * bits / 32, out]``: value ``j`` of word ``[r, o]`` (bits ``j*bits .. j*bits+bits-1``)
  is the quantized weight ``q[in = r * 32/bits + j, o]``;
* ``qzeros`` int32 ``[groups, out * bits / 32]``: packed the same way along ``out``; the zero point is the stored
  value + 1 for GPTQ v1 packing (``quant_method: gptq`` without ``checkpoint_format: gptq_v2``, and auto-round's
  ``packing_format: auto_round:auto_gptq``), the stored value itself otherwise (``auto_round``,
  ``auto_round:gptqmodel``, GPTQ v2); symmetric 4-bit gives zero point 8;
* ``scales`` ``[groups, out]``, ``g_idx`` ``[in]`` (group of each input channel; ``in // group_size`` if absent);
* ``P.weight[o, i] = (q[i, o] - zero[g_idx[i], o]) * scales[g_idx[i], o]``.

Everything else (embeddings, norms, the 16-bit ``lm_head``, biases) is loaded as stored.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgephi.artifacts.checkpoint import parameter_count
from edgephi.artifacts.corpus import HELDOUT_SOURCE, heldout_texts
from edgephi.artifacts.manifest import utc_now

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_MAX_PPL_RATIO",
    "DEFAULT_MIN_TOP1",
    "GateError",
    "GateResult",
    "Thresholds",
    "dequantize_gptq",
    "evaluate",
    "load_dequantized",
    "zero_point_offset",
]

logger = logging.getLogger(__name__)

#: Defaults. The tiny stand-in's W4A16 artifact (4 iterations) scores a ratio of ~1.003 and ~97 % agreement; the
#: same artifact with its packed weights replaced by noise ~24 and < 1 %. Published W4A16 g128 builds of 14B
#: models lose a few percent of perplexity (ratio ~1.02-1.06) and agree on ~90 % of next tokens, so these
#: defaults leave room for a real Phi-4 while catching a broken export, a wrong packing or a bad calibration.
DEFAULT_MAX_PPL_RATIO = 1.15
DEFAULT_MIN_TOP1 = 0.80
DEFAULT_MAX_TOKENS = 8192
DEFAULT_SEQ_LEN = 512


class GateError(RuntimeError):
    """The gate could not run (unreadable artifact or reference, unsupported packing, too little text)."""


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Pass when ``ppl_ratio <= max_ppl_ratio`` and ``top1_agreement >= min_top1``."""

    max_ppl_ratio: float = DEFAULT_MAX_PPL_RATIO
    min_top1: float = DEFAULT_MIN_TOP1


@dataclasses.dataclass
class GateResult:
    """One gate evaluation, as recorded in the manifest's ``gate`` section (:meth:`to_json`).

    ``ppl_*`` are per-token perplexities (>= 1) over ``tokens`` held-out tokens; ``top1_agreement`` is a fraction
    (0..1); ``seconds`` is the wall time of the whole evaluation; ``evaluated_at`` is UTC ISO 8601.
    """

    passed: bool
    ppl_ratio: float
    top1_agreement: float
    ppl_quantized: float
    ppl_reference: float
    tokens: int
    thresholds: Thresholds
    reference: str
    eval_text: dict[str, Any]
    device: str
    dtype: str
    seconds: float
    method: str = "transformers, GPTQ tensors dequantized to a 16-bit model (edgephi.artifacts.gate)"
    evaluated_at: str = ""

    def to_json(self) -> dict[str, Any]:
        """The fields as JSON (thresholds nested), the float figures rounded to 4 decimals."""
        d = dataclasses.asdict(self)
        for key in ("ppl_ratio", "top1_agreement", "ppl_quantized", "ppl_reference", "seconds"):
            d[key] = round(float(d[key]), 4)
        return d

    def line(self) -> str:
        """One human-readable line: verdict, both figures against their thresholds, tokens, seconds."""
        verdict = "PASSED" if self.passed else "FAILED"
        return (
            f"gate {verdict}: perplexity ratio {self.ppl_ratio:.4f} (4-bit {self.ppl_quantized:.3f} / 16-bit "
            f"{self.ppl_reference:.3f}; max {self.thresholds.max_ppl_ratio}), top-1 agreement "
            f"{self.top1_agreement:.2%} (min {self.thresholds.min_top1:.0%}), {self.tokens} held-out tokens, "
            f"{self.seconds:.1f}s"
        )


# ------------------------------------------------------------------------------------------- dequantization


def zero_point_offset(quantization_config: dict[str, Any]) -> int:
    """What to add to a stored zero point (see the module docstring).

    Raises:
        GateError: a packing this module cannot dequantize (AWQ, non-integer data types, ...).
    """
    method = str(quantization_config.get("quant_method", "")).lower()
    data_type = str(quantization_config.get("data_type", "int")).lower()
    if data_type not in ("int", ""):
        raise GateError(f"cannot dequantize data_type {data_type!r} (integer GPTQ packing only)")
    if method == "gptq":
        return 0 if str(quantization_config.get("checkpoint_format", "gptq")).lower() == "gptq_v2" else 1
    if method in ("auto-round", "intel/auto-round", "auto_round"):
        packing = str(quantization_config.get("packing_format", "auto_round:auto_gptq")).lower()
        if "awq" in packing:
            raise GateError(f"cannot dequantize packing_format {packing!r} (AWQ)")
        return 1 if "gptq" in packing and "gptqmodel" not in packing else 0
    raise GateError(f"cannot dequantize quant_method {method!r} (GPTQ-packed auto_gptq / auto_round only)")


def _unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unpack int32 ``words`` holding ``32 // bits`` values each along ``dim`` (value j at bits j*bits)."""
    import torch

    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
    mask = (1 << bits) - 1
    w = words.to(torch.int32).unsqueeze(dim + 1 if dim >= 0 else dim)
    shape = [1] * w.dim()
    shape[dim + 1 if dim >= 0 else dim] = per
    vals = (w >> shifts.view(shape)) & mask
    new_shape = list(words.shape)
    new_shape[dim] = words.shape[dim] * per
    return vals.reshape(new_shape)


def dequantize_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    *,
    zero_offset: int = 1,
    in_features: int | None = None,
) -> torch.Tensor:
    """A GPTQ-packed linear layer's float32 weight ``[out, in]`` (see the module docstring for the layout).

    ``bits`` is inferred from the shapes (2, 4 or 8; 3-bit packing straddles words and is not supported).

    Raises:
        GateError: inconsistent shapes.
    """
    import torch

    groups, out = scales.shape
    if in_features is None:
        in_features = int(g_idx.numel()) if g_idx is not None else None
    if in_features is None:
        raise GateError("in_features unknown (no g_idx)")
    if qweight.shape[0] == 0 or in_features % qweight.shape[0]:
        raise GateError(f"qweight {tuple(qweight.shape)} does not pack {in_features} input features")
    per = in_features // qweight.shape[0]
    if per not in (4, 8, 16) or qweight.shape[1] != out or qzeros.shape != (groups, out // per):
        raise GateError(
            f"unsupported packing: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
            f"scales {tuple(scales.shape)}, {in_features} inputs"
        )
    bits = 32 // per
    q = _unpack(qweight, bits, 0)  # [in, out]
    z = _unpack(qzeros, bits, 1).to(torch.float32) + zero_offset  # [groups, out]
    if g_idx is None:
        g_idx = torch.arange(in_features, dtype=torch.int64) // (in_features // groups)
    g = g_idx.to(torch.int64)
    if int(g.max()) >= groups or int(g.min()) < 0:
        raise GateError("g_idx out of range of the scale groups")
    w = (q.to(torch.float32) - z[g]) * scales.to(torch.float32)[g]
    return w.t().contiguous()


def _shards(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [model_dir / n for n in names]
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise GateError(f"{model_dir}: no *.safetensors weights")
    return shards


def _iter_tensors(model_dir: Path) -> Iterator[tuple[str, Any]]:
    from safetensors import safe_open

    for shard in _shards(model_dir):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is no mapping
                yield key, f.get_tensor(key)


def _config_without_quantization(model_dir: Path) -> tuple[Any, dict[str, Any]]:
    from transformers import AutoConfig

    raw = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    qc = raw.get("quantization_config")
    if not isinstance(qc, dict):
        qfile = model_dir / "quantization_config.json"
        qc = json.loads(qfile.read_text(encoding="utf-8")) if qfile.is_file() else None
    if not isinstance(qc, dict):
        raise GateError(f"{model_dir}: no quantization_config (is it a 4-bit artifact?)")
    config = AutoConfig.from_pretrained(str(model_dir))
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    return config, qc


def load_dequantized(artifact: Path, *, dtype: str = "bfloat16", device: str = "cpu") -> Any:
    """The artifact as a plain transformers causal LM with dequantized 16-bit weights (eval mode).

    Raises:
        GateError: no quantization config, unsupported packing, or tensors that do not fit the architecture.
    """
    import torch
    from accelerate import init_empty_weights  # type: ignore[import-untyped]
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    config, qc = _config_without_quantization(artifact)
    offset = zero_point_offset(qc)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    expected = {k: v.shape for k, v in model.state_dict().items()}

    packed: dict[str, dict[str, Any]] = {}
    state: dict[str, Any] = {}
    for key, tensor in _iter_tensors(artifact):
        prefix, _, leaf = key.rpartition(".")
        if leaf in ("qweight", "qzeros", "scales", "g_idx"):
            packed.setdefault(prefix, {})[leaf] = tensor
        else:
            state[key] = tensor.to(torch_dtype) if tensor.is_floating_point() else tensor
    n_quantized = 0
    for prefix in list(packed):
        parts = packed.pop(prefix)  # free the packed tensors as we go
        missing = {"qweight", "qzeros", "scales"} - parts.keys()
        if missing:
            raise GateError(f"{prefix}: packed weight without {', '.join(sorted(missing))}")
        shape = expected.get(f"{prefix}.weight")
        if shape is None:
            raise GateError(f"{prefix}: packed weight for a module the architecture does not have")
        w = dequantize_gptq(parts["qweight"], parts["qzeros"], parts["scales"], parts.get("g_idx"),
                            zero_offset=offset, in_features=int(shape[1]))  # fmt: skip
        if tuple(w.shape) != tuple(shape):
            raise GateError(f"{prefix}: dequantized {tuple(w.shape)}, the model expects {tuple(shape)}")
        state[f"{prefix}.weight"] = w.to(torch_dtype)
        n_quantized += 1
    if not n_quantized:
        raise GateError(f"{artifact}: no GPTQ-packed tensors (qweight/qzeros/scales) found")
    result = model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing_keys = [k for k in result.missing_keys if not (getattr(config, "tie_word_embeddings", False)
                                                            and k == "lm_head.weight")]  # fmt: skip
    if missing_keys or result.unexpected_keys:
        raise GateError(f"{artifact}: missing tensors {missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise GateError(f"{artifact}: tensors never loaded: {still_meta[:5]}")
    logger.info("dequantized %d GPTQ-packed modules of %s (zero-point offset %d)", n_quantized, artifact, offset)
    return model.to(device).eval()


def _placement(reference: Path, device: str | None, dtype: str | None) -> tuple[str, str]:
    """The gate's (device, dtype) when not given (see :func:`evaluate`)."""
    import torch

    params = parameter_count(reference)
    if device is None:
        device = "cpu"
        if torch.cuda.is_available():
            free, _total = torch.cuda.mem_get_info()
            if free >= 1.25 * 2 * params:
                device = "cuda"
            else:
                logger.info("gate on CPU: the 16-bit model (%.1f GiB) does not fit the GPU's %.1f GiB free",
                            2 * params / 2**30, free / 2**30)  # fmt: skip
    if dtype is None:
        dtype = "float32" if device == "cpu" and params <= 3_000_000_000 else "bfloat16"
    return device, dtype


def _load_reference(reference: Path, *, dtype: str, device: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    config = json.loads((reference / "config.json").read_text(encoding="utf-8"))
    if config.get("quantization_config"):
        raise GateError(f"{reference} is quantized: the reference must be the 16-bit source checkpoint")
    model = AutoModelForCausalLM.from_pretrained(str(reference), dtype=getattr(torch, dtype))
    return model.to(device).eval()


# ------------------------------------------------------------------------------------------------ eval text


def _token_stream(tokenizer: Any, texts: Sequence[str], max_tokens: int) -> list[int]:
    sep = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if sep is not None:
            ids.append(int(sep))
        if len(ids) >= max_tokens + 1:
            break
    return ids[: max_tokens + 1]


def _windows(ids: Sequence[int], seq_len: int) -> list[list[int]]:
    """Consecutive windows of ``seq_len + 1`` tokens sharing one token (each predicts ``seq_len`` targets)."""
    out = []
    for start in range(0, len(ids) - 1, seq_len):
        chunk = list(ids[start : start + seq_len + 1])
        if len(chunk) >= 2:
            out.append(chunk)
    return out


def _score(model: Any, windows: Sequence[list[int]], device: str, desc: str) -> tuple[float, list[Any]]:
    """Summed next-token NLL over all windows and each window's argmax predictions."""
    import torch
    from tqdm import tqdm

    nll = 0.0
    argmax = []
    with torch.inference_mode():
        for chunk in tqdm(windows, desc=desc, unit="window", leave=False, disable=None):
            x = torch.tensor(chunk, dtype=torch.long, device=device)[None]
            logits = model(input_ids=x[:, :-1]).logits.float()[0]
            nll += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
            argmax.append(logits.argmax(-1).cpu())
            del logits
    return nll, argmax


def evaluate(
    artifact: Path,
    reference: Path,
    *,
    thresholds: Thresholds = Thresholds(),
    texts: Sequence[str] | None = None,
    exclude_texts: Sequence[str] = (),
    text_source: str | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    seq_len: int = DEFAULT_SEQ_LEN,
    device: str | None = None,
    dtype: str | None = None,
) -> GateResult:
    """Score the 4-bit ``artifact`` against its 16-bit ``reference`` (see the module docstring).

    One model is in memory at a time: the reference first (its NLL and argmax predictions kept), then the
    dequantized artifact.

    Args:
        artifact: 4-bit artifact directory (GPTQ-packed safetensors, tokenizer, config).
        reference: the 16-bit checkpoint it was made from.
        thresholds: pass criteria.
        texts: evaluation text; default :func:`edgephi.artifacts.corpus.heldout_texts` of ``exclude_texts``.
        exclude_texts: text the evaluation must not overlap (the calibration set).
        text_source: how to describe ``texts`` in the result.
        max_tokens: tokens scored (the text is cut there).
        seq_len: tokens per forward pass.
        device: torch device; default CUDA when one has room for the 16-bit model (free memory >= 1.25 x its
            size), else CPU (a 14B reference does not fit a 16 GB card: the gate then runs on the host).
        dtype: torch dtype both models run in; default bfloat16 on CUDA and for models over 3B parameters,
            float32 for small models on CPU (CPUs without native bf16 run bfloat16 matmuls many times slower).

    Raises:
        GateError: a model cannot be loaded, or there are fewer than 256 tokens of text.
    """
    import hashlib

    from transformers import AutoTokenizer

    t0 = time.monotonic()
    artifact, reference = Path(artifact), Path(reference)
    for d, what in ((artifact, "artifact"), (reference, "reference")):
        if not (d / "config.json").is_file():
            raise GateError(f"{what} {d} is not a model directory (no config.json)")
    device, dtype = _placement(reference, device, dtype)
    if texts is None:
        texts = heldout_texts(exclude_texts)
        text_source = text_source or HELDOUT_SOURCE
    tokenizer = AutoTokenizer.from_pretrained(str(artifact))
    ids = _token_stream(tokenizer, texts, max_tokens)
    if len(ids) < 257:
        raise GateError(f"only {len(ids)} tokens of evaluation text (need at least 257)")
    windows = _windows(ids, seq_len)
    n_tokens = sum(len(w) - 1 for w in windows)

    ref_model = _load_reference(reference, dtype=dtype, device=device)
    ref_nll, ref_top = _score(ref_model, windows, device, "gate: 16-bit reference")
    del ref_model
    q_model = load_dequantized(artifact, dtype=dtype, device=device)
    q_nll, q_top = _score(q_model, windows, device, "gate: 4-bit artifact")
    del q_model

    agree = sum(int((a == b).sum()) for a, b in zip(ref_top, q_top, strict=True))
    ppl_ref = math.exp(ref_nll / n_tokens)
    ppl_q = math.exp(min(q_nll / n_tokens, 700.0))
    ratio = ppl_q / ppl_ref
    top1 = agree / n_tokens
    passed = ratio <= thresholds.max_ppl_ratio and top1 >= thresholds.min_top1 and math.isfinite(ratio)
    digest = hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()
    eval_text = {"source": text_source or "user", "documents": len(texts), "sha256": digest,
                 "excluded_overlap": bool(exclude_texts), "seq_len": seq_len}  # fmt: skip
    result = GateResult(
        passed=passed,
        ppl_ratio=ratio,
        top1_agreement=top1,
        ppl_quantized=ppl_q,
        ppl_reference=ppl_ref,
        tokens=n_tokens,
        thresholds=thresholds,
        reference=str(reference),
        eval_text=eval_text,
        device=device,
        dtype=dtype,
        seconds=time.monotonic() - t0,
        evaluated_at=utc_now(),
    )
    logger.info("%s", result.line())
    return result
