"""A tiny, locally trained stand-in for Phi-4, for tests and demos on machines without a model hub.

edgephi serves a 4-bit Phi-4 through vLLM. Phi-4's weights cannot be downloaded on the dev and CI machines,
so :func:`build` trains, in a few minutes on a laptop-class CPU, a small ``Phi3ForCausalLM`` (the architecture
Phi-4 uses) that keeps everything about Phi-4 the serving stack can notice:

* the architecture and its fused ``qkv_proj`` / ``gate_up_proj`` linears, grouped-query attention with Phi-4's
  4:1 query:KV head ratio and head dimension 128, RoPE theta 250000;
* every linear width a multiple of 128, so group-128 W4A16 quantization reaches every decoder linear layer;
* a byte-level BPE tokenizer (``tokenizer.json``, loadable by ``transformers.AutoTokenizer`` and by vLLM) with
  Phi-4's special tokens (``<|endoftext|>``, ``<|im_start|>``, ``<|im_sep|>``, ``<|im_end|>``, pad
  ``<|dummy_85|>``), Phi-4's chat template and Phi-4's end-of-turn conventions (``eos_token`` is ``<|im_end|>``;
  ``generation_config.json`` stops on ``<|im_end|>`` and ``<|endoftext|>``).

The training text is the prose of the train split of the running Python's standard-library docstrings
(:mod:`edgephi.artifacts.corpus`, which also gives auto-round its calibration text and the quality gate its
held-out text; this module imports it, never the reverse): doctest examples, code and tables dropped, wrapped
lines joined (:func:`prose`), half of the documents wrapped as Phi-4 chat turns (summary → rest) so the model
learns to close a turn with ``<|im_end|>``. About two minutes of training on 2 CPU cores buys docstring-like
English (``Return the number of …``), not answers: prompt it with docstring openings. Training is seeded and
single-process; the result is deterministic for a given Python standard library, library versions and CPU
thread count. Builds are cached by a digest of the spec (see :func:`build`).

:func:`build_dev_artifact` adds the stand-in's W4A16 auto-round artifact (what tests, demos and benchmarks
serve); :func:`describe` says in one line what the stand-in is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from edgephi import phi4
from edgephi.artifacts.autoround import AutoRoundParams
from edgephi.artifacts.corpus import stdlib_documents

__all__ = [
    "BOS_TOKEN",
    "BUILDER_VERSION",
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "IM_END",
    "IM_SEP",
    "IM_START",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "TinySpec",
    "build",
    "build_dev_artifact",
    "default_cache_root",
    "describe",
    "dev_artifact_params",
    "format_chat",
    "heldout_perplexity",
    "prose",
    "spec_digest",
    "training_documents",
    "weights_digest",
]

logger = logging.getLogger(__name__)

#: Bump whenever the build procedure changes in a way that changes the output (invalidates caches).
BUILDER_VERSION = 3

#: Phi-4's special tokens (:mod:`edgephi.phi4`). ``<|endoftext|>`` is BOS and the document separator,
#: ``<|im_end|>`` ends a turn.
BOS_TOKEN = phi4.ENDOFTEXT
IM_START = phi4.IM_START
IM_SEP = phi4.IM_SEP
IM_END = phi4.IM_END
EOS_TOKEN = IM_END
PAD_TOKEN = phi4.PAD  # Phi-4's pad token
SPECIAL_TOKENS: tuple[str, ...] = (BOS_TOKEN, IM_START, IM_SEP, IM_END, PAD_TOKEN)

#: Phi-4's chat template, verbatim.
CHAT_TEMPLATE = phi4.CHAT_TEMPLATE

_QUANT_ALIGN = 128  # every linear width is a multiple of this (group-128 quantization)
_METADATA_FILE = "edgephi_devmodel.json"


@dataclasses.dataclass(frozen=True)
class TinySpec:
    """Everything that determines a tiny checkpoint; its digest names the cache directory.

    Model shape (Phi-4 keeps ``hidden_size == num_attention_heads * head_dim`` with ``head_dim`` 128 and four
    query heads per KV head). All linear widths (``hidden_size``, ``intermediate_size``, the fused QKV width
    ``(num_attention_heads + 2 * num_key_value_heads) * head_dim``) must be multiples of 128.

    Attributes:
        hidden_size: residual width, in features.
        num_hidden_layers: decoder layers.
        num_attention_heads: query heads.
        num_key_value_heads: key/value heads (grouped-query attention).
        head_dim: features per head.
        intermediate_size: MLP width, in features (the fused ``gate_up_proj`` is twice this).
        tokenizer_vocab_size: target size of the byte-level BPE vocabulary, special tokens included; the
            model's ``vocab_size`` is the tokenizer's length rounded up to a multiple of 128.
        max_position_embeddings: context length, in tokens.
        rope_theta: RoPE base.
        rms_norm_eps: RMSNorm epsilon.
        train_steps: optimizer steps.
        batch_size: sequences per step.
        seq_len: tokens per training sequence.
        learning_rate: peak AdamW learning rate (linear warm-up, cosine decay to 10 %).
        warmup_steps: warm-up steps.
        weight_decay: AdamW weight decay.
        chat_fraction: fraction (0..1) of multi-paragraph documents wrapped as a Phi-4 user/assistant exchange
            (the summary paragraph as the user turn, the rest as the assistant's).
        prose_only: train (tokenizer and model) on :func:`prose` of each docstring rather than its raw text: with
            this little training, text that is all English sentences is what makes replies read as text.
        corpus_max_chars: cap on the standard-library text read, in characters.
        seed: seeds the corpus shuffle, the weight init and the batches.
    """

    hidden_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 1
    head_dim: int = 128
    intermediate_size: int = 1024
    tokenizer_vocab_size: int = 4096
    max_position_embeddings: int = 4096
    rope_theta: float = 250000.0
    rms_norm_eps: float = 1e-5
    train_steps: int = 560
    batch_size: int = 4
    seq_len: int = 128
    learning_rate: float = 6e-4
    warmup_steps: int = 30
    weight_decay: float = 0.01
    chat_fraction: float = 0.5
    prose_only: bool = True
    corpus_max_chars: int = 2_000_000
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.hidden_size != self.num_attention_heads * self.head_dim:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must equal num_attention_heads * head_dim "
                f"({self.num_attention_heads} * {self.head_dim})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        widths = {
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "qkv width": (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim,
        }
        for name, width in widths.items():
            if width % _QUANT_ALIGN:
                raise ValueError(f"{name} ({width}) must be a multiple of {_QUANT_ALIGN}")
        if self.tokenizer_vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError("tokenizer_vocab_size must cover the 256 byte symbols plus the special tokens")
        if min(self.num_hidden_layers, self.train_steps, self.batch_size, self.seq_len) < 1:
            raise ValueError("num_hidden_layers, train_steps, batch_size and seq_len must be >= 1")
        if not 0.0 <= self.chat_fraction <= 1.0:
            raise ValueError("chat_fraction must be within [0, 1]")


def default_cache_root() -> Path:
    """Where built checkpoints are cached: ``$EDGEPHI_CACHE_DIR`` if set, else ``~/.cache/edgephi``."""
    env = os.environ.get("EDGEPHI_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "edgephi"


def spec_digest(spec: TinySpec) -> str:
    """Short (12 hex chars) sha256 over the spec's fields, :data:`BUILDER_VERSION` and the Python version.

    The Python version is included because the training text is that Python's standard library.
    """
    payload = {
        "spec": dataclasses.asdict(spec),
        "builder_version": BUILDER_VERSION,
        "python": ".".join(map(str, sys.version_info[:3])),
    }
    blob = json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def weights_digest(model_dir: Path) -> str:
    """sha256 hex digest of ``model_dir/model.safetensors``. Raises FileNotFoundError if absent."""
    h = hashlib.sha256()
    with open(Path(model_dir) / "model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- chat text


def format_chat(user: str, assistant: str, system: str | None = None) -> str:
    """Render one exchange exactly as Phi-4's chat template does (each turn closed by ``<|im_end|>``)."""
    parts = [f"{IM_START}system{IM_SEP}{system}{IM_END}"] if system is not None else []
    parts.append(f"{IM_START}user{IM_SEP}{user}{IM_END}")
    parts.append(f"{IM_START}assistant{IM_SEP}{assistant}{IM_END}")
    return "".join(parts)


_DOCTEST_LINE = re.compile(r"^\s*(>>>|\.\.\.)(\s|$)")
_STRUCTURED_LINE = re.compile(r"^(\s|[-*+] |\d+[.)] |\w[\w ]{0,30}:\s*$)")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
#: A paragraph whose characters are less than this fraction letters and spaces is code or a table, not prose.
_MIN_PROSE_LETTERS = 0.85


def prose(doc: str) -> str:
    """The English prose of one docstring: what the stand-in trains on (with ``TinySpec.prose_only``).

    Paragraphs (separated by blank lines) holding a doctest line (``>>>``/``...``), and paragraphs that are less
    than 85 % letters and spaces (code, tables, numbers), are dropped; a paragraph of plain wrapped lines is
    joined onto one line (docstrings wrap at ~72 columns, and a model this small would otherwise spend its few
    steps on where the line breaks fall); lists, headed sections and indented blocks keep their lines, without
    their indentation (runs of spaces are what a model this small falls into and repeats).

    Returns:
        The kept paragraphs separated by blank lines; ``""`` when nothing is left.
    """
    kept = []
    for para in _PARAGRAPH_BREAK.split(doc):
        lines = [line.rstrip() for line in para.splitlines() if line.strip()]
        if not lines or any(_DOCTEST_LINE.match(line) for line in lines):
            continue
        joined = " ".join(line.strip() for line in lines)
        if sum(c.isalpha() or c == " " for c in joined) < _MIN_PROSE_LETTERS * len(joined):
            continue
        structured = any(_STRUCTURED_LINE.match(line) for line in lines)
        kept.append("\n".join(line.strip() for line in lines) if structured else joined)
    return "\n\n".join(kept)


def training_documents(split: str, spec: TinySpec) -> list[str]:
    """The documents of ``split`` as ``spec`` trains on them: the corpus's docstrings, or their :func:`prose`
    (documents left shorter than 40 characters dropped). Raises ValueError for an unknown split."""
    docs = stdlib_documents(split, spec.corpus_max_chars)
    if not spec.prose_only:
        return docs
    return [text for text in map(prose, docs) if len(text) >= 40]


def _training_samples(docs: Sequence[str], spec: TinySpec) -> list[str]:
    """Plain documents and Phi-4 chat exchanges (the summary paragraph as the user turn), shuffled."""
    rng = random.Random(spec.seed)
    samples = []
    for doc in docs:
        first, _, rest = doc.partition("\n\n" if spec.prose_only else "\n")
        rest = rest.strip()
        if rest and rng.random() < spec.chat_fraction:
            samples.append(format_chat(first.strip(), rest))
        else:
            samples.append(doc)
    rng.shuffle(samples)
    return samples


# ------------------------------------------------------------------------------------------------ tokenizer


def _train_tokenizer(docs: Sequence[str], vocab_size: int) -> Any:
    """Byte-level BPE (GPT-2 / Phi-4 style) with Phi-4's special tokens at ids 0..4."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return tok


def _save_tokenizer(tok: Any, out_dir: Path, model_max_length: int) -> Any:
    """Write tokenizer.json + tokenizer_config.json (chat template inside it) and return the HF tokenizer."""
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=BOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
        chat_template=CHAT_TEMPLATE,
    )
    hf_tok.save_pretrained(str(out_dir), save_jinja_files=False)
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["chat_template"] = CHAT_TEMPLATE  # Phi-4 ships it here; keep one source of truth
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["add_bos_token"] = False
    cfg["add_eos_token"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "chat_template.jinja").unlink(missing_ok=True)
    return hf_tok


# -------------------------------------------------------------------------------------------------- training


def _token_stream(samples: Sequence[str], tok: Any) -> list[int]:
    bos = tok.token_to_id(BOS_TOKEN)
    ids: list[int] = []
    for enc in tok.encode_batch(list(samples), add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(bos)
    return ids


def _lr_at(step: int, spec: TinySpec) -> float:
    if step < spec.warmup_steps:
        return spec.learning_rate * (step + 1) / spec.warmup_steps
    progress = (step - spec.warmup_steps) / max(1, spec.train_steps - spec.warmup_steps)
    return spec.learning_rate * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def _make_model(spec: TinySpec, vocab_size: int, tok: Any) -> Any:
    import torch
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

    bos, im_end, pad = (tok.token_to_id(t) for t in (BOS_TOKEN, IM_END, PAD_TOKEN))
    config = Phi3Config(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        original_max_position_embeddings=spec.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        rms_norm_eps=spec.rms_norm_eps,
        hidden_act="silu",
        tie_word_embeddings=False,
        sliding_window=None,
        bos_token_id=bos,
        eos_token_id=im_end,
        pad_token_id=pad,
    )
    torch.manual_seed(spec.seed)
    model = Phi3ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=bos, eos_token_id=[im_end, bos], pad_token_id=pad, do_sample=False
    )
    return model


def _train(model: Any, stream: Sequence[int], spec: TinySpec) -> float:
    """Next-token training on consecutive windows of the token stream; returns the last-10-step mean loss."""
    import torch

    window = spec.seq_len + 1
    n_windows = len(stream) // window
    if n_windows < spec.batch_size:
        raise ValueError(f"corpus too small: {n_windows} windows of {window} tokens")
    data = torch.tensor(stream[: n_windows * window], dtype=torch.long).view(n_windows, window)
    gen = torch.Generator().manual_seed(spec.seed)
    order = torch.randperm(n_windows, generator=gen)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.learning_rate,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    model.train()
    losses: list[float] = []
    t0 = time.monotonic()
    for step in range(spec.train_steps):
        idx = torch.arange(step * spec.batch_size, (step + 1) * spec.batch_size) % n_windows
        batch = data[order[idx]]
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, spec)
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % 10 == 0 or step == spec.train_steps - 1:
            logger.info(
                "tiny-phi3 train step %d/%d loss %.3f (%.0f tok/s)",
                step + 1,
                spec.train_steps,
                losses[-1],
                (step + 1) * spec.batch_size * spec.seq_len / max(1e-9, time.monotonic() - t0),
            )
    model.eval()
    tail = losses[-10:]
    return sum(tail) / len(tail)


def _perplexity(model: Any, token_ids: Sequence[int], seq_len: int) -> float:
    import torch

    if len(token_ids) < 2:
        raise ValueError("need at least 2 tokens to measure perplexity")
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(token_ids) - 1, seq_len):
            chunk = torch.tensor(token_ids[start : start + seq_len + 1], dtype=torch.long)[None]
            if chunk.shape[1] < 2:
                break
            logits = model(input_ids=chunk[:, :-1]).logits.float()
            nll += float(
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"
                )
            )
            count += chunk.shape[1] - 1
    return math.exp(nll / count)


def heldout_perplexity(model_dir: Path, max_tokens: int = 8192, seq_len: int = 128) -> float:
    """Perplexity (per token, >= 1) of the bf16 checkpoint in ``model_dir`` on held-out stdlib docstrings, in the
    form it was trained on (their :func:`prose` when its spec says ``prose_only``).

    Uses transformers on CPU (float32 compute). ``max_tokens`` caps the text scored (the held-out documents,
    each followed by ``<|endoftext|>``), scored in consecutive windows of ``seq_len`` tokens; the defaults are
    what :func:`build` records as ``heldout_perplexity_bf16`` for the default spec. Uniform guessing scores
    the vocabulary size. Raises OSError if ``model_dir`` is not a checkpoint.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    # bf16 weights, float32 compute: exact same weights, and much faster than bf16 matmuls on CPUs without
    # native bf16 (AVX2)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    meta_path = Path(model_dir) / _METADATA_FILE
    recorded = json.loads(meta_path.read_text(encoding="utf-8"))["spec"] if meta_path.is_file() else {}
    spec = TinySpec(prose_only=bool(recorded.get("prose_only", False)))
    ids = _token_stream(training_documents("heldout", spec), tok.backend_tokenizer)[:max_tokens]
    return _perplexity(model, ids, seq_len)


# ----------------------------------------------------------------------------------------------------- build


def _build_into(out_dir: Path, spec: TinySpec) -> dict[str, Any]:
    import torch

    t_start = time.monotonic()
    train_docs = training_documents("train", spec)
    heldout_docs = training_documents("heldout", spec)
    logger.info(
        "tiny-phi3 corpus: %d train documents (%d chars), %d held out",
        len(train_docs),
        sum(map(len, train_docs)),
        len(heldout_docs),
    )
    tok = _train_tokenizer(train_docs, spec.tokenizer_vocab_size)
    hf_tok = _save_tokenizer(tok, out_dir, spec.max_position_embeddings)
    vocab_size = -(-len(hf_tok) // _QUANT_ALIGN) * _QUANT_ALIGN
    t_tok = time.monotonic()
    logger.info("tiny-phi3 tokenizer: %d tokens (model vocab %d), %.1fs", len(hf_tok), vocab_size, t_tok - t_start)

    stream = _token_stream(_training_samples(train_docs, spec), tok)
    heldout_ids = _token_stream(heldout_docs, tok)[:8192]
    threads = _cpu_count()
    with _torch_threads(threads):
        model = _make_model(spec, vocab_size, tok)
        n_params = sum(p.numel() for p in model.parameters())
        logger.info("tiny-phi3 model: %.1fM parameters, %d training tokens available", n_params / 1e6, len(stream))
        final_loss = _train(model, stream, spec)
        t_train = time.monotonic()
        model = model.to(torch.bfloat16).to(torch.float32)  # score the bf16 weights, in fast fp32 compute
        ppl = _perplexity(model, heldout_ids, spec.seq_len)
        model = model.to(torch.bfloat16)  # lossless: these values are bf16 already
    logger.info(
        "tiny-phi3 trained in %.1fs on %d threads: final loss %.3f, held-out perplexity %.1f (uniform %d)",
        t_train - t_tok,
        threads,
        final_loss,
        ppl,
        vocab_size,
    )
    model.save_pretrained(str(out_dir))
    meta = {
        "spec": dataclasses.asdict(spec),
        "spec_digest": spec_digest(spec),
        "builder_version": BUILDER_VERSION,
        "python": ".".join(map(str, sys.version_info[:3])),
        "torch": torch.__version__,
        "parameters": n_params,
        "vocab_size": vocab_size,
        "tokenizer_size": len(hf_tok),
        "train_tokens": spec.train_steps * spec.batch_size * spec.seq_len,
        "train_threads": threads,
        "train_seconds": round(t_train - t_tok, 1),
        "final_train_loss": round(final_loss, 4),
        "heldout_perplexity_bf16": round(ppl, 2),
    }
    (out_dir / _METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def build(cache_root: Path | None = None, spec: TinySpec = TinySpec()) -> Path:
    """Build (or reuse) the tiny Phi-4 stand-in and return its checkpoint directory.

    The directory ``cache_root/tiny-phi3-<spec_digest(spec)>`` holds a bfloat16 Hugging Face checkpoint
    (``config.json`` with ``Phi3ForCausalLM``, ``model.safetensors``, ``generation_config.json``), the
    tokenizer (``tokenizer.json``, ``tokenizer_config.json`` with Phi-4's chat template) and
    ``edgephi_devmodel.json`` (spec, training time, final loss, held-out perplexity).

    If that directory exists it is returned at once. Otherwise the build (about 3 minutes with the default
    spec on 2 CPU cores, ~1.5 GB RSS) runs in a temporary directory beside it, which is renamed into place
    only when complete, so an interrupted build never leaves a partial checkpoint. Concurrent builders of
    the same spec serialize on a lock file; torch's thread count is set to the usable CPUs while training.

    Args:
        cache_root: parent directory of the cache; defaults to :func:`default_cache_root`. Created if needed.
        spec: the model, tokenizer and training parameters.

    Returns:
        Path of the checkpoint directory.

    Raises:
        OSError: the cache root cannot be created or written.
        ValueError: the standard library yielded too little text for ``spec``.
    """
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    name = f"tiny-phi3-{spec_digest(spec)}"
    final = root / name
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():  # another process finished it while we waited
            return final
        for stale in root.glob(f".{name}.tmp-*"):  # left by builders that died (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            logger.info("building %s in %s", name, root)
            _build_into(tmp, spec)
            os.chmod(tmp, 0o755)  # mkdtemp made it 0700; the checkpoint is meant to be shared (e.g. a service user)
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():  # not "someone put it there meanwhile" (bypassing the lock)
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


# ------------------------------------------------------------------------------------- the 4-bit dev artifact


def dev_artifact_params(iters: int = 32) -> AutoRoundParams:
    """The auto-round knobs of the dev artifact: W4A16 g128 symmetric, GPTQ export, ``iters`` SignRound
    iterations over 32 samples of 256 tokens (about a minute on 2 CPU cores; production uses 256 x 128 x 2048)."""
    return AutoRoundParams(iters=iters, nsamples=32, seqlen=256, batch_size=4, low_gpu_mem_usage=False)


def build_dev_artifact(cache_dir: Path | None = None, iters: int = 32) -> tuple[Path, Path]:
    """Build (or reuse) the tiny Phi-4 stand-in and its W4A16 g128 auto-round artifact: ``(bf16, w4a16)``.

    Tests, demos and benchmarks serve the second. Both are cached under ``cache_dir`` (default
    :func:`default_cache_root`): the bf16 checkpoint as :func:`build` names it, the artifact beside it as
    ``<bf16 name>-w4a16-g128-it<iters>``, quantized with :func:`dev_artifact_params` (``iters``) and calibrated
    on the local corpus. Concurrent builders serialize on a lock file; a finished artifact is returned at once.

    Raises:
        OSError: the cache cannot be written.
        ValueError: ``iters`` < 0.
    """
    from edgephi.artifacts.autoround import quantize

    params = dev_artifact_params(iters)
    bf16 = build(cache_dir)
    out = bf16.parent / f"{bf16.name}-w4a16-g{params.group_size}-it{iters}"
    if out.is_dir():
        return bf16, out
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.is_dir():  # another process may have finished it while we waited
            quantize(bf16, out, params)
    return bf16, out


def describe(model_dir: Path) -> str:
    """One line saying what the stand-in in ``model_dir`` is (for demos): size, architecture, training, and that
    it is not Phi-4. ``model_dir`` is a checkpoint :func:`build` made, or an artifact quantized from one.

    Raises:
        FileNotFoundError: ``model_dir`` is neither (no ``edgephi_devmodel.json`` there or in its source).
    """
    model_dir = Path(model_dir)
    quantized = ""
    if not (model_dir / _METADATA_FILE).is_file():
        from edgephi.artifacts.autoround import read_metadata

        qmeta = read_metadata(model_dir)
        if not qmeta.get("source"):
            raise FileNotFoundError(f"{model_dir}: no {_METADATA_FILE} (not a tiny Phi-4 stand-in)")
        quantized = (
            f", served here quantized to W{qmeta.get('bits', 4)}A16 g{qmeta.get('group_size', 128)} by auto-round "
            f"({qmeta.get('iters', '?')} iterations)"
        )
        model_dir = Path(str(qmeta["source"]))
        if not (model_dir / _METADATA_FILE).is_file():
            raise FileNotFoundError(f"{model_dir}: no {_METADATA_FILE} (not a tiny Phi-4 stand-in)")
    meta = json.loads((model_dir / _METADATA_FILE).read_text(encoding="utf-8"))
    spec = meta.get("spec", {})
    text = (
        "the prose of Python standard-library docstrings"
        if spec.get("prose_only")
        else ("Python standard-library docstrings")
    )
    return (
        f"{model_dir.name} is a stand-in, not Phi-4: a {meta['parameters'] / 1e6:.1f}M-parameter Phi3ForCausalLM "
        f"(Phi-4's architecture and tokenizer conventions), randomly initialised and trained for "
        f"{spec.get('train_steps', '?')} steps ({meta['train_tokens'] / 1000:.0f}k tokens, "
        f"{meta['train_seconds']:.0f} s on {meta['train_threads']} CPU threads) on {text}{quantized}: it writes "
        f"docstring-like English, it does not follow instructions"
    )


def _main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Build the tiny Phi-4 stand-in checkpoint and print its path.")
    parser.add_argument("--cache-root", type=Path, default=None)
    parser.add_argument("--describe", type=Path, metavar="MODEL_DIR",
                        help="print one line saying what the stand-in (or its artifact) in MODEL_DIR is")  # fmt: skip
    args = parser.parse_args(argv)
    if args.describe is not None:
        print(describe(args.describe))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    print(build(args.cache_root))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
