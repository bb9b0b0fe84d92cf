"""The text the quantize pipeline reads: calibration text for auto-round, held-out text for the quality gate.

edgephi never reaches a model hub, so its default text is one every machine has: the docstrings of the running
Python's standard library, read with :mod:`ast` (never imported), in a fixed order, split once and for all into
a *train* split (auto-round calibration, and the tiny dev stand-in's training text) and a *held-out* split (the
quality gate's evaluation text). Both users must agree on that split, or the gate would score text the model
or the calibration has seen; this module is the one place that defines it. Production code
(:mod:`.autoround`, :mod:`.build`, :mod:`.gate`) and the dev stand-in (:mod:`edgephi.devmodel`) import it; it
imports neither. User calibration files (``--calibration``) are read here too.

Importing this module imports nothing outside the standard library.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

__all__ = [
    "DOC_SEPARATOR",
    "HELDOUT_EVERY",
    "HELDOUT_SOURCE",
    "SPLITS",
    "TRAIN_SOURCE",
    "heldout_texts",
    "join_texts",
    "load_calibration_files",
    "local_calibration_texts",
    "stdlib_documents",
]

#: The splits :func:`stdlib_documents` knows.
SPLITS: tuple[str, ...] = ("train", "heldout", "all")
#: Every ``HELDOUT_EVERY``-th document (the last of each run of 20) is held out.
HELDOUT_EVERY = 20
#: Docstrings shorter than this (characters, stripped) are skipped.
MIN_DOC_CHARS = 40
#: What joins two documents into one text (calibration samples, training streams).
DOC_SEPARATOR = "\n\n"
#: How manifests and gate results name the two splits.
TRAIN_SOURCE = "stdlib-docstrings:train (edgephi.artifacts.corpus.stdlib_documents)"
HELDOUT_SOURCE = "stdlib-docstrings:heldout (edgephi.artifacts.corpus.stdlib_documents)"

_STDLIB_SKIP_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idle_test",
        "__pycache__",
        "turtledemo",
        "lib2to3",
        "ensurepip",
    }
)


# ------------------------------------------------------------------------------------------------- stdlib


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not _STDLIB_SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


@functools.lru_cache(maxsize=1)
def _all_docstrings() -> tuple[str, ...]:
    return tuple(_iter_docstrings())


def _iter_docstrings() -> Iterator[str]:
    for path in _stdlib_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node, clean=True)
                if doc and len(doc.strip()) >= MIN_DOC_CHARS:
                    yield doc.strip()


def stdlib_documents(split: str = "train", max_chars: int = 2_000_000) -> list[str]:
    """Docstrings of the running Python's standard library, in a fixed order (deterministic).

    Files under ``sysconfig.get_paths()['stdlib']`` are parsed with :mod:`ast` in sorted path order (tests,
    ``site-packages`` and a few demo packages skipped); module, class and function docstrings of at least
    :data:`MIN_DOC_CHARS` characters are kept. Every :data:`HELDOUT_EVERY`-th document is held out (minus those
    whose text also occurs in the rest). The first call parses the standard library (a few seconds); the
    result is cached for the process.

    Args:
        split: ``"train"`` (19 of every 20 documents), ``"heldout"`` (the others, less any duplicated in
            ``"train"``) or ``"all"``.
        max_chars: stop once the documents read (all splits together) reach this many characters (the whole
            standard library is about 1.7 M characters).

    Returns:
        The documents of ``split``, each a stripped docstring; ``"train"`` and ``"heldout"`` never share a text.

    Raises:
        ValueError: unknown ``split``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be 'train', 'heldout' or 'all', not {split!r}")
    docs: list[str] = []
    total = 0
    for doc in _all_docstrings():
        if total >= max_chars:
            break
        total += len(doc)
        docs.append(doc)
    if split == "all":
        return docs
    train = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    if split == "train":
        return train
    seen = set(train)  # the stdlib repeats some docstrings verbatim: keep held-out text truly unseen
    return [d for i, d in enumerate(docs) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1 and d not in seen]


def heldout_texts(exclude: Sequence[str] = ()) -> list[str]:
    """The quality gate's default text: the held-out split, minus every document found inside ``exclude``.

    ``exclude`` is the calibration text the artifact was made with (user files may quote the standard library):
    a held-out document that occurs verbatim in any of those texts is dropped, so the gate scores unseen text.
    """
    docs = stdlib_documents("heldout")
    if not exclude:
        return docs
    blob = "\n\x00\n".join(exclude)
    return [d for d in docs if d not in blob]


# ---------------------------------------------------------------------------------------------- calibration


def join_texts(texts: Iterable[str], n: int, min_chars: int) -> list[str]:
    """Join consecutive ``texts`` (with :data:`DOC_SEPARATOR`) into up to ``n`` texts of >= ``min_chars`` chars.

    A trailing remainder shorter than ``min_chars`` is dropped; fewer than ``n`` texts come back when ``texts``
    run out.
    """
    out: list[str] = []
    buf: list[str] = []
    size = 0
    for text in texts:
        buf.append(text)
        size += len(text) + len(DOC_SEPARATOR)
        if size - len(DOC_SEPARATOR) >= min_chars:
            out.append(DOC_SEPARATOR.join(buf))
            buf, size = [], 0
            if len(out) == n:
                break
    return out


def local_calibration_texts(n: int = 128, min_chars: int = 12_288, split: str = "train") -> list[str]:
    """Offline calibration texts: standard-library docstrings joined into ``n`` texts of >= ``min_chars`` chars.

    Deterministic: documents of ``split`` (default ``"train"``, so the quality gate's held-out text stays
    unseen) are taken in their fixed order and joined by :func:`join_texts`. auto-round drops any sample shorter
    than its ``seqlen`` tokens; byte-level BPE tokenizers average 3-4.5 characters per token on this text, so
    ``min_chars = 6 * seqlen`` is safe (the default suits 2048).

    Args:
        n: number of texts wanted (>= 1).
        min_chars: minimum length of each text, in characters (>= 1).
        split: ``"train"`` (default), ``"heldout"`` or ``"all"``.

    Returns:
        Up to ``n`` texts (fewer only if the standard library runs out of text, about 1.7 M characters).

    Raises:
        ValueError: ``n`` or ``min_chars`` < 1, or an unknown ``split``.
    """
    if n < 1 or min_chars < 1:
        raise ValueError("n and min_chars must be >= 1")
    docs = stdlib_documents(split, max_chars=max(2_000_000, n * (min_chars + 4096)))
    return join_texts(docs, n, min_chars)


def load_calibration_files(paths: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Read user calibration text (UTF-8) from files, in order.

    A ``.jsonl`` file yields one text per line: the line's ``"text"`` field (lines that are not JSON objects
    with a string ``"text"`` are skipped). Any other file is one text. Blank texts are dropped. Short texts are
    fine: auto-round's samples are joined from consecutive texts until each reaches its ``seqlen`` tokens.

    Raises:
        FileNotFoundError: a path does not exist.
        UnicodeDecodeError: a file is not UTF-8.
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
