"""What a Hugging Face checkpoint directory holds, read from its safetensors headers alone.

``edgephi quantize`` must refuse an unservable configuration and check the disk before any work starts, and the
quality gate must pick a device before it loads a model: both need tensor names, dtypes and shapes, which the
first bytes of every ``*.safetensors`` file give (an 8-byte little-endian header length, then a JSON header),
without torch and without reading the weights. This module reads them; :mod:`.build` and :mod:`.gate` use it.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

__all__ = ["DTYPE_BYTES", "decoder_linears", "parameter_count", "safetensors_header", "tensor_shapes"]

#: Bytes per element of the safetensors dtypes a checkpoint may hold.
DTYPE_BYTES: dict[str, int] = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                               "U8": 1, "BOOL": 1}  # fmt: skip

_BLOCK_RE = re.compile(r"\.layers\.\d+\.")


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of one safetensors file: ``{tensor name: {"dtype", "shape", "data_offsets"}}``.

    The ``__metadata__`` entry is dropped.

    Raises:
        OSError: unreadable file.
        struct.error: shorter than the 8-byte length prefix.
        ValueError: the header is not JSON (``json.JSONDecodeError``) or not UTF-8.
    """
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header: dict[str, Any] = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def tensor_shapes(model_dir: Path) -> dict[str, tuple[str, list[int]]]:
    """``{tensor name: (safetensors dtype, shape)}`` over every ``*.safetensors`` file of ``model_dir``.

    Empty when the directory holds no safetensors file. Raises what :func:`safetensors_header` raises.
    """
    out: dict[str, tuple[str, list[int]]] = {}
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        for name, info in safetensors_header(shard).items():
            out[name] = (str(info["dtype"]), [int(d) for d in info["shape"]])
    return out


def decoder_linears(tensors: dict[str, tuple[str, list[int]]]) -> dict[str, tuple[int, int]]:
    """The linear layers auto-round quantizes: every 2-D ``*.weight`` inside a decoder block (a name containing
    ``.layers.N.``) → ``(out_features, in_features)``, keyed by the module name (``.weight`` removed).

    Embeddings, norms and ``lm_head`` are not decoder-block linears and are left out.
    """
    return {
        name.removesuffix(".weight"): (shape[0], shape[1])
        for name, (_dtype, shape) in tensors.items()
        if name.endswith(".weight") and len(shape) == 2 and _BLOCK_RE.search(name)
    }


def parameter_count(model_dir: Path) -> int:
    """Number of elements over every tensor of the checkpoint (packed int32 words count as one each)."""
    total = 0
    for _dtype, shape in tensor_shapes(model_dir).values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total
