"""``manifest.json``: what an artifact is made of, where it came from, and how it scored.

Format (``"format": "edgephi-artifact/1"``; unknown keys are kept and ignored)::

    {
      "format": "edgephi-artifact/1",
      "name": "phi4-w4a16",
      "created": "2026-11-29T21:30:00Z",
      "source": {"model": "microsoft/phi-4", "revision": "<commit>", "files_sha256": "<digest of the source files>"},
      "quantization": {"tool": "auto-round", "auto_round_version": "0.16.1", "scheme": "W4A16", "bits": 4,
                       "group_size": 128, "sym": true, "iters": 256, ..., "calibration": {...},
                       "seconds": 5400.0, "peak_rss_mib": 30000},
      "gate": {"passed": true, "ppl_ratio": 1.02, "top1_agreement": 0.93, ...},
      "chat_format": {"end_of_turn": "<|im_end|>", "end_of_turn_id": 100265, "eos_token_id": [100265, 100257],
                      "ok": true, "fixed": [{"file", "field", "was", "now", "why"}, ...],
                      "files": [{"path": "generation_config.json", "sha256": "<hex>"}, ...]},
      "files": [{"path": "config.json", "size": 1234, "sha256": "<hex>"}, ...]
    }

``chat_format`` (written by :mod:`edgephi.artifacts.chat_format`; absent from older manifests, which still
verify) records the tokenizer and generation-config files with their digests and what was fixed in them;
:func:`verify` checks those digests against ``files``.

``files`` lists every file of the artifact except ``manifest.json`` itself (sorted, POSIX relative paths):
:func:`edgephi.doctor.verify_manifest_files` and ``edgephi verify`` check them, and the daemon reports
``"sha256:" + sha256(manifest.json)`` as the artifact digest (GetModelInfo). Fetched archives may carry a
smaller manifest (``format``, ``name``, ``files``): only ``files`` is required.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

__all__ = [
    "FORMAT",
    "MANIFEST",
    "ManifestError",
    "artifact_digest",
    "file_entries",
    "files_digest",
    "load",
    "new_manifest",
    "sha256_file",
    "utc_now",
    "verify",
    "write_atomic",
]

FORMAT = "edgephi-artifact/1"
MANIFEST = "manifest.json"
_CHUNK = 1 << 20


class ManifestError(ValueError):
    """A missing, unreadable or malformed manifest, or files that do not match it."""


def utc_now() -> str:
    """Current UTC time as ``YYYY-MM-DDTHH:MM:SSZ``."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def sha256_file(path: Path, progress: Callable[[int], object] | None = None) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks; ``progress(n)`` is called with each chunk's size."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return h.hexdigest()


def _progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """A byte-count bar on stderr (only on a terminal; tqdm's ``disable=None``)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                disable=None if enabled else True, mininterval=0.5)  # fmt: skip


def _artifact_files(root: Path) -> list[Path]:
    """Every regular file under ``root`` except the manifest, sorted by relative POSIX path."""
    files = [p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() != MANIFEST]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def file_entries(root: Path, show_progress: bool = True) -> list[dict[str, Any]]:
    """``[{"path", "size", "sha256"}]`` for every file under ``root`` except ``manifest.json``.

    Raises:
        ManifestError: ``root`` holds a symlink or a special file (artifacts are plain files only).
    """
    for p in root.rglob("*"):
        if p.is_symlink() or not (p.is_file() or p.is_dir()):
            raise ManifestError(f"{p}: not a regular file (artifacts hold plain files and directories only)")
    files = _artifact_files(root)
    total = sum(p.stat().st_size for p in files)
    entries = []
    with _progress_bar(total, "hashing", show_progress) as bar:
        for p in files:
            entries.append({"path": p.relative_to(root).as_posix(), "size": p.stat().st_size,
                            "sha256": sha256_file(p, bar.update)})  # fmt: skip
    return entries


def new_manifest(name: str, root: Path, show_progress: bool = True, **sections: Any) -> dict[str, Any]:
    """A manifest for the artifact in ``root``: format, name, creation time, ``sections``, then ``files``."""
    data: dict[str, Any] = {"format": FORMAT, "name": name, "created": utc_now()}
    data.update({k: v for k, v in sections.items() if v is not None})
    data["files"] = file_entries(root, show_progress)
    return data


def write_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file in the same directory and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load(root: Path) -> dict[str, Any]:
    """Read and check the shape of ``root/manifest.json``.

    Raises:
        ManifestError: missing, not JSON, no ``files`` list, or an entry with a bad path, size or digest.
    """
    path = root / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{root}: no {MANIFEST}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: unreadable ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        raise ManifestError(f"{path}: no 'files' list")
    seen: set[str] = set()
    for entry in data["files"]:
        if not isinstance(entry, dict):
            raise ManifestError(f"{path}: a 'files' entry is not an object")
        rel, size, digest = entry.get("path"), entry.get("size"), entry.get("sha256")
        if not isinstance(rel, str) or not _safe_relpath(rel):
            raise ManifestError(f"{path}: unsafe or malformed file path {rel!r}")
        if rel in seen or rel == MANIFEST:
            raise ManifestError(f"{path}: {rel!r} listed twice or lists the manifest itself")
        seen.add(rel)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestError(f"{path}: {rel}: bad size {size!r}")
        if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ManifestError(f"{path}: {rel}: bad sha256 {digest!r} (64 lower-case hex digits)")
    return data


def _safe_relpath(rel: str) -> bool:
    p = PurePosixPath(rel)
    return (
        bool(rel)
        and not p.is_absolute()
        and "\\" not in rel
        and all(part not in ("", ".", "..") for part in rel.split("/"))
    )


def verify(root: Path, *, strict: bool = True, show_progress: bool = True) -> list[str]:
    """Check every file listed in ``root/manifest.json`` (size, then sha256); return the problems found.

    With ``strict`` a file present in ``root`` but not listed is a problem too (nothing unverified gets served),
    and so is a symlink or special file.

    Raises:
        ManifestError: the manifest itself is missing or malformed (see :func:`load`).
    """
    data = load(root)
    problems: list[str] = []
    listed = {e["path"]: e for e in data["files"]}
    if strict:
        for p in root.rglob("*"):
            rel = p.relative_to(root).as_posix()
            if p.is_symlink() or not (p.is_file() or p.is_dir()):
                problems.append(f"{rel}: not a regular file")
            elif p.is_file() and rel != MANIFEST and rel not in listed:
                problems.append(f"{rel}: not listed in the manifest")
    chat = data.get("chat_format")
    if isinstance(chat, dict):
        for e in chat.get("files") or []:
            chat_rel = e.get("path") if isinstance(e, dict) else None
            if chat_rel not in listed:
                problems.append(f"chat_format: {chat_rel!r} is not in the manifest's files")
            elif e.get("sha256") != listed[chat_rel]["sha256"]:
                want = listed[chat_rel]["sha256"]
                problems.append(f"chat_format: {chat_rel}: sha256 {e.get('sha256')}, files says {want}")
    todo = []
    for rel, entry in listed.items():
        path = root / rel
        if path.is_symlink() or not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{rel}: size {path.stat().st_size}, manifest says {entry['size']}")
        else:
            todo.append((rel, path, entry["sha256"]))
    with _progress_bar(sum(e["size"] for e in listed.values()), "verifying", show_progress) as bar:
        for rel, path, digest in todo:
            got = sha256_file(path, bar.update)
            if got != digest:
                problems.append(f"{rel}: sha256 {got}, manifest says {digest}")
    return problems


def artifact_digest(root: Path) -> str:
    """``"sha256:" + sha256(manifest.json)``: what the daemon reports as the artifact digest."""
    return "sha256:" + hashlib.sha256((root / MANIFEST).read_bytes()).hexdigest()


def files_digest(entries: Iterable[dict[str, Any]]) -> str:
    """One sha256 over ``path size sha256`` lines of file entries (a content fingerprint of a directory)."""
    h = hashlib.sha256()
    for e in sorted(entries, key=lambda e: str(e["path"])):
        h.update(f"{e['path']} {e['size']} {e['sha256']}\n".encode())
    return h.hexdigest()
