"""``edgephi fetch``: install a prebuilt artifact into the store, pinned by a sha256.

Sources and what ``--sha256`` pins:

* ``http(s)://…/NAME.tar[.gz]``: the archive file. Downloaded to ``<store>/.downloads/<sha256>.part`` with httpx:
  a free-disk check as soon as the size is known (before any byte is written), a progress bar, retries with
  backoff (tenacity) on a dropped connection or a 5xx/429 answer, each retry resuming where the file ends
  (HTTP ``Range``, guarded by ``If-Range`` with the ETag / Last-Modified), so does the next run after a kill;
* a local archive (``.tar``, ``.tar.gz``, ``.tgz``): the archive file;
* a local directory, or ``hf://ORG/REPO@COMMIT`` (huggingface_hub ``snapshot_download`` at a pinned 40-hex
  commit; only when asked for, honours ``HF_HUB_OFFLINE``): ``manifest.json``'s sha256, which pins every file
  through the manifest's digests. It is also the digest the daemon reports (GetModelInfo ``artifact_digest``).

Then: safe extraction into a temp directory of the store (regular files and directories only — absolute paths,
``..``, links and device files refuse the whole archive — with tarfile's ``"data"`` filter underneath), the
manifest found at the top or in the archive's single top directory, every file verified (size, sha256; a file
the manifest does not list refuses the artifact), the chat format checked (:mod:`.chat_format`: an artifact
whose ``generation_config.json`` does not end a turn on ``<|im_end|>`` is fixed, and its manifest rewritten with
a ``chat_format`` section saying what was changed and why, so its digest differs from the published one; one
without an ``<|im_end|>`` token is refused with :class:`ChatFormatRefused`), and promotion with one rename.
Any failure leaves the store as it was: ``current`` untouched and no directory the daemon could pick up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from edgephi.artifacts import chat_format
from edgephi.artifacts import manifest as mf
from edgephi.artifacts.store import DOWNLOADS, Store, StoreError

__all__ = [
    "ChatFormatRefused",
    "DigestMismatch",
    "FetchError",
    "Source",
    "UnsafeArchive",
    "download",
    "extract_archive",
    "fetch",
    "hub_snapshot",
    "parse_source",
]

logger = logging.getLogger(__name__)

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_MARGIN = 64 << 20
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class FetchError(Exception):
    """The artifact could not be fetched or was refused; the store is unchanged."""


class DigestMismatch(FetchError):
    """The archive (or manifest) is not the one pinned by ``--sha256``."""


class ChatFormatRefused(FetchError):
    """The artifact cannot end a chat turn on ``<|im_end|>`` and cannot be fixed (the reasons name the file and
    field); nothing was installed."""


class UnsafeArchive(FetchError):
    """An archive member that could write outside the artifact (or is no regular file/directory)."""


class _Retryable(Exception):
    """A transient download problem: retry (resuming)."""


@dataclass(frozen=True)
class Source:
    """A classified ``edgephi fetch`` source (see :func:`parse_source`).

    Attributes:
        kind: ``"http"``, ``"archive"`` (local file), ``"dir"`` (local directory) or ``"hub"``.
        location: the URL, path, or ``ORG/REPO`` for the hub.
        revision: the pinned 40-hex commit (hub only).
    """

    kind: str
    location: str
    revision: str | None = None

    def default_name(self) -> str:
        """The artifact name when neither ``--name`` nor the manifest gives one: the location's last path
        component, without a query string or an archive suffix (``.tar``, ``.tar.gz``, ``.tgz``)."""
        base = self.location.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]
        for suffix in _ARCHIVE_SUFFIXES:
            if base.endswith(suffix):
                return base[: -len(suffix)]
        return base


def parse_source(source: str, revision: str | None = None) -> Source:
    """Classify ``source``: an http(s) URL, ``hf://ORG/REPO[@COMMIT]``, a local archive or directory.

    Raises:
        FetchError: none of those, or a hub source without a pinned 40-hex commit.
    """
    if source.startswith(("http://", "https://")):
        return Source("http", source)
    if source.startswith("hf://"):
        repo, _, rev = source.removeprefix("hf://").partition("@")
        rev = rev or revision or ""
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
            raise FetchError(f"bad hub repo {repo!r}: hf://ORG/REPO@COMMIT")
        if not _COMMIT.match(rev):
            raise FetchError(f"hub source {source!r}: pin a 40-hex commit (hf://{repo}@<commit>), not {rev!r}")
        return Source("hub", repo, rev)
    path = Path(source)
    if path.is_dir():
        return Source("dir", str(path))
    if path.is_file():
        return Source("archive", str(path))
    raise FetchError(f"{source}: not an http(s) URL, hf://ORG/REPO@COMMIT, directory or archive file")


def normalize_digest(digest: str) -> str:
    """``--sha256`` as 64 lower-case hex digits (surrounding blanks, an optional ``sha256:`` prefix and upper case
    accepted). Raises FetchError for anything else."""
    d = digest.strip().lower().removeprefix("sha256:")
    if not _HEX64.match(d):
        raise FetchError(f"--sha256 {digest!r}: expected 64 hex digits")
    return d


# ------------------------------------------------------------------------------------------------- download


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes START-END/TOTAL`` or ``bytes */TOTAL`` → (start, total)."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _unpacked_estimate(archive_size: int, name: str) -> int:
    # safetensors barely compress: a .tar.gz unpacks to about its own size; allow 10 % on top
    return int(archive_size * 1.1)


def _download_once(client: Any, url: str, part: Path, meta_path: Path, store: Store, bar: Any) -> None:
    have = part.stat().st_size if part.exists() else 0
    saved: dict[str, Any] = {}
    if have and meta_path.exists():
        with contextlib.suppress(OSError, json.JSONDecodeError):
            saved = json.loads(meta_path.read_text(encoding="utf-8"))
    if have and saved.get("url") != url:
        have = 0  # a partial file of another URL: start over
    headers = {"Accept-Encoding": "identity"}  # byte ranges of the file itself, never of a re-encoding
    if have:
        headers["Range"] = f"bytes={have}-"
        validator = saved.get("etag") if not str(saved.get("etag") or "").startswith("W/") else None
        validator = validator or saved.get("last_modified")
        if validator:
            headers["If-Range"] = validator
    with client.stream("GET", url, headers=headers) as r:
        total: int | None
        if r.status_code == 416:
            _start, total = _content_range(r.headers.get("content-range"))
            if total is not None and have == total:
                return  # already complete
            part.unlink(missing_ok=True)
            raise _Retryable("the server refused the resume range; starting over")
        if r.status_code in _RETRY_STATUS:
            raise _Retryable(f"HTTP {r.status_code}")
        if r.status_code >= 400:
            raise FetchError(f"{url}: HTTP {r.status_code} {r.reason_phrase}")
        if r.status_code == 206:
            start, total = _content_range(r.headers.get("content-range"))
            if start != have:
                part.unlink(missing_ok=True)
                raise _Retryable(f"the server resumed at byte {start}, not {have}; starting over")
            mode = "ab"
        else:
            if have:
                logger.info("the server did not resume (HTTP %d): downloading from the start", r.status_code)
            have, mode = 0, "wb"
            length = r.headers.get("content-length")
            total = int(length) if length and length.isdigit() else None
        if total is not None:
            store.require_free(total - have + _unpacked_estimate(total, url) + _MARGIN, f"downloading {url}")
        validators = {"url": url, "etag": r.headers.get("etag"), "last_modified": r.headers.get("last-modified"),
                      "total": total}  # fmt: skip
        meta_path.write_text(json.dumps(validators), encoding="utf-8")
        bar.reset(total=total)
        bar.update(have)
        with open(part, mode) as f:
            try:
                for chunk in r.iter_raw():  # as received: nothing buffered is lost when the connection drops
                    f.write(chunk)
                    bar.update(len(chunk))
            finally:
                f.flush()
                os.fsync(f.fileno())
        size = part.stat().st_size
        if total is not None and size != total:
            raise _Retryable(f"the connection ended at byte {size} of {total}")


def download(
    url: str,
    expected_sha256: str,
    store: Store,
    *,
    retries: int = 5,
    timeout: float = 60.0,
    show_progress: bool = True,
) -> Path:
    """Download ``url`` into ``<store>/.downloads/<sha256>.part`` (resuming a previous partial download) and
    check its sha256. Returns the file.

    Raises:
        DigestMismatch: the file is not the pinned one (the partial file is deleted).
        FetchError: an HTTP error, or still failing after ``retries`` attempts.
        StoreError: not enough disk space for the archive and its unpacked artifact.
    """
    import httpx
    import tenacity
    from tqdm import tqdm

    downloads = store.root / DOWNLOADS
    downloads.mkdir(parents=True, exist_ok=True)
    part = downloads / f"{expected_sha256}.part"
    meta_path = downloads / f"{expected_sha256}.part.json"

    def log_retry(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        done = part.stat().st_size if part.exists() else 0
        logger.warning("download interrupted (%s: %s); retry %d of %d resumes at byte %d",
                       type(exc).__name__, exc, state.attempt_number, retries - 1, done)  # fmt: skip

    transport = httpx.HTTPTransport(retries=2)  # connection-level retries (refused/reset before a response)
    timeouts = httpx.Timeout(timeout, connect=min(timeout, 30.0))
    with (
        httpx.Client(
            transport=transport, timeout=timeouts, follow_redirects=True, headers={"User-Agent": "edgephi-fetch"}
        ) as client,  # fmt: skip
        tqdm(
            desc="download",
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            disable=None if show_progress else True,
            mininterval=0.5,
        ) as bar,  # fmt: skip
    ):
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type((httpx.TransportError, _Retryable)),
            stop=tenacity.stop_after_attempt(max(1, retries)),
            wait=tenacity.wait_exponential(multiplier=0.5, max=10.0),
            before_sleep=log_retry,
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    _download_once(client, url, part, meta_path, store, bar)
        except (httpx.TransportError, _Retryable) as exc:
            raise FetchError(f"{url}: download failed after {retries} attempts ({exc}); run again to resume") from exc
        except httpx.InvalidURL as exc:
            raise FetchError(f"{url}: {exc}") from exc
    got = mf.sha256_file(part)
    if got != expected_sha256:
        part.unlink(missing_ok=True)
        meta_path.unlink(missing_ok=True)
        raise DigestMismatch(f"{url}: sha256 {got}, expected {expected_sha256} (--sha256): refused")
    return part


# -------------------------------------------------------------------------------------------------- archives


def _checked_members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    for m in tar:
        name = m.name
        parts = PurePosixPath(name).parts
        if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
            raise UnsafeArchive(f"archive member {name!r} has an absolute path: refused")
        if ".." in parts or "\\" in name:
            raise UnsafeArchive(f"archive member {name!r} points outside the artifact (path traversal): refused")
        if m.issym() or m.islnk():
            target = PurePosixPath(name).parent / m.linkname if m.issym() else PurePosixPath(m.linkname)
            escapes = m.linkname.startswith("/") or ".." in target.parts
            raise UnsafeArchive(
                f"archive member {name!r} is a {'symbolic' if m.issym() else 'hard'} link to {m.linkname!r}"
                f"{' (escaping the artifact)' if escapes else ''}: artifacts hold regular files only; refused"
            )
        if not (m.isfile() or m.isdir()):
            raise UnsafeArchive(f"archive member {name!r} is not a regular file or directory: refused")
        yield m


def extract_archive(archive: Path, dest: Path) -> Path:
    """Safely extract ``archive`` into ``dest`` (which must be empty); return the directory holding the manifest.

    Raises:
        UnsafeArchive: an absolute path, ``..``, a link or a special file (nothing is used; ``dest`` is the
            caller's temp directory and goes away with it).
        FetchError: not a (complete) tar archive, or no ``manifest.json`` at its top / in its one top directory.
    """
    try:
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(dest, members=_checked_members(tar), filter="data")
    except UnsafeArchive:
        raise
    except tarfile.FilterError as exc:
        raise UnsafeArchive(f"{archive.name}: {exc}: refused") from exc
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None and exc.errno == 28:
            raise FetchError(f"ran out of disk space extracting {archive.name}") from exc
        raise FetchError(f"{archive.name}: not a complete tar archive ({exc})") from exc
    if (dest / mf.MANIFEST).is_file():
        return dest
    entries = list(dest.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / mf.MANIFEST).is_file():
        return entries[0]
    raise FetchError(f"{archive.name}: no {mf.MANIFEST} at the archive's top or in its single top directory")


# ------------------------------------------------------------------------------------------------------ hub


def hub_snapshot(repo_id: str, revision: str, *, cache_dir: Path | None = None, local_files_only: bool = False) -> Path:
    """``huggingface_hub.snapshot_download`` of ``repo_id`` at the pinned commit ``revision``.

    Only runs when the user asked for an ``hf://`` source; ``local_files_only`` (or ``HF_HUB_OFFLINE=1``)
    restricts it to the local hub cache.
    """
    if not _COMMIT.match(revision):
        raise FetchError(f"hub revision {revision!r}: pin a 40-hex commit")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - transformers depends on it
        raise FetchError("huggingface_hub is not installed") from exc
    try:
        path = snapshot_download(repo_id=repo_id, revision=revision, local_files_only=local_files_only,
                                 cache_dir=str(cache_dir) if cache_dir else None)  # fmt: skip
    except Exception as exc:  # huggingface_hub raises many types (offline, not found, HTTP)
        raise FetchError(f"hf://{repo_id}@{revision}: {type(exc).__name__}: {exc}") from exc
    return Path(path)


# ---------------------------------------------------------------------------------------------------- fetch


def _copy_listed(src: Path, dest: Path) -> None:
    """Copy ``manifest.json`` and the files it lists (following the hub cache's symlinks) from ``src``."""
    data = mf.load(src)
    dest.mkdir(parents=True)
    shutil.copyfile(src / mf.MANIFEST, dest / mf.MANIFEST)
    for entry in data["files"]:
        target = dest / entry["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(src / entry["path"], target)
        except FileNotFoundError:
            raise FetchError(f"{src}: {entry['path']} is listed in the manifest but missing") from None


def fetch(
    store: Store,
    source: str,
    sha256: str,
    *,
    name: str | None = None,
    revision: str | None = None,
    make_current: bool = False,
    retries: int = 5,
    timeout: float = 60.0,
    show_progress: bool = True,
    hub_cache_dir: Path | None = None,
    hub_local_only: bool = False,
) -> Path:
    """Fetch ``source`` (see the module docstring) into ``store`` as ``name``; return the promoted directory.

    The name defaults to the manifest's ``name``, else the archive's / directory's / repo's base name.

    Raises:
        DigestMismatch: not the pinned archive / manifest.
        UnsafeArchive: path traversal, absolute path, link or special file in the archive.
        FetchError: download failure, bad archive, files not matching the manifest, name taken.
        StoreError: not enough disk space, bad name.
    """
    expected = normalize_digest(sha256)
    src = parse_source(source, revision)
    if name is not None:
        store.check_name(name)
        if store.exists(name):
            raise FetchError(f"{store.path(name)} already exists: pick a new name or `edgephi models remove {name}`")
    store.root.mkdir(parents=True, exist_ok=True)
    store.clean_stale()

    archive: Path | None = None
    downloaded: Path | None = None
    tree: Path | None = None
    if src.kind == "http":
        logger.info("downloading %s", src.location)
        archive = downloaded = download(src.location, expected, store, retries=retries, timeout=timeout,
                                        show_progress=show_progress)  # fmt: skip
    elif src.kind == "archive":
        archive = Path(src.location)
        store.require_free(_unpacked_estimate(archive.stat().st_size, archive.name) + _MARGIN, f"unpacking {archive}")
        got = mf.sha256_file(archive)
        if got != expected:
            raise DigestMismatch(f"{archive}: sha256 {got}, expected {expected} (--sha256): refused")
    else:
        tree = hub_snapshot(src.location, src.revision or "", cache_dir=hub_cache_dir,
                            local_files_only=hub_local_only) if src.kind == "hub" \
            else Path(src.location)  # fmt: skip
        manifest_path = tree / mf.MANIFEST
        if not manifest_path.is_file():
            raise FetchError(f"{source}: no {mf.MANIFEST}")
        got = hashlib.sha256(manifest_path.read_bytes()).hexdigest()
        if got != expected:
            raise DigestMismatch(f"{source}: manifest.json sha256 {got}, expected {expected} (--sha256): refused")
        listed = mf.load(tree)["files"]
        store.require_free(sum(int(e["size"]) for e in listed) + _MARGIN, f"copying {source}")

    try:
        final = _install(store, source, src, archive, tree, name, make_current, show_progress)
    finally:
        if downloaded is not None:  # installed or refused: either way the archive has served its purpose
            downloaded.unlink(missing_ok=True)
            downloaded.with_name(downloaded.name + ".json").unlink(missing_ok=True)
    logger.info("fetched %s into %s (artifact digest %s)", source, final, mf.artifact_digest(final))
    return final


def _install(store: Store, source: str, src: Source, archive: Path | None, tree: Path | None, name: str | None,
             make_current: bool, show_progress: bool) -> Path:  # fmt: skip
    """Unpack/copy into a staging directory, verify against the manifest, promote."""
    provisional = name or src.default_name()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}", provisional) or provisional == "current":
        provisional = "fetch"
    with store.staging(provisional, must_be_new=False) as staging:
        if archive is not None:
            unpacked = staging.path / "unpacked"
            unpacked.mkdir()
            root = extract_archive(archive, unpacked)
        else:
            assert tree is not None
            root = staging.path / "copy"
            _copy_listed(tree, root)
        try:
            problems = mf.verify(root, show_progress=show_progress)
        except mf.ManifestError as exc:
            raise FetchError(f"{source}: {exc}") from exc
        if problems:
            raise FetchError(f"{source}: the files do not match the manifest: {'; '.join(problems[:5])}: refused")
        _check_chat_format(source, root)
        final_name = name or str(mf.load(root).get("name") or "") or src.default_name()
        try:
            store.check_name(final_name)
        except StoreError as exc:
            raise FetchError(f"{exc} (give --name)") from exc
        if store.exists(final_name):
            raise FetchError(f"{store.path(final_name)} already exists: pick a new --name or "
                             f"`edgephi models remove {final_name}`")  # fmt: skip
        return store.promote(staging, root, name=final_name, make_current=make_current)


def _check_chat_format(source: str, root: Path) -> None:
    """Fix an old generation config / chat template in the verified candidate ``root`` and rewrite its manifest
    (a ``chat_format`` section with the fixes; the files' new digests); leave a correct artifact untouched.

    Raises:
        ChatFormatRefused: no ``<|im_end|>`` token (or unreadable tokenizer files): it cannot be fixed.
    """
    try:
        fixes, section = chat_format.apply(root)
    except chat_format.ChatFormatError as exc:
        raise ChatFormatRefused(f"{source}: refused: " + "; ".join(exc.reasons)) from None
    if not fixes:
        return
    for f in fixes:
        logger.warning("fixed the artifact's chat format: %s", f.line())
    data = mf.load(root)
    section["fixed_from"] = mf.artifact_digest(root)
    data[chat_format.SECTION] = section
    data["files"] = mf.file_entries(root, show_progress=False)
    mf.write_atomic(root / mf.MANIFEST, data)
    problems = mf.verify(root, show_progress=False)
    if problems:  # pragma: no cover - the manifest was just written from these files
        raise FetchError(f"{source}: the fixed artifact does not verify: {'; '.join(problems[:5])}")
    logger.warning("the artifact's manifest now records the fix: digest %s (was %s)", mf.artifact_digest(root),
                   section["fixed_from"])  # fmt: skip
