"""The artifact store: one directory per artifact and a ``current`` symlink the daemon serves.

Layout (default root ``/var/lib/edgephi/models``; ``--store`` or ``$EDGEPHI_STORE_DIR``)::

    current -> phi4-w4a16-2026-11        relative symlink, switched atomically (temp link + rename)
    phi4-w4a16-2026-11/                  a complete, verified artifact: manifest.json + its files
    phi4-w4a16-2026-10/                  the previous one (roll back with `edgephi models use`)
    .tmp-phi4-w4a16-2026-12-k3j9x/       a fetch/quantize in progress (never a name the daemon or `list` uses)
    .tmp-phi4-w4a16-2026-12-k3j9x.lock   held (flock) by the process writing it; stale when nobody holds it
    .downloads/<sha256>.part             a partial download, resumed by the next `edgephi fetch` of it
    .lock                                serializes store metadata changes (promote, use, remove, clean)

New artifacts are written under ``.tmp-NAME-*`` and appear under ``NAME`` only through one ``rename`` once they
are complete and verified, so a killed writer leaves the previous artifact serving and no directory the daemon
could pick up; the next writer removes the stale temp directory (its lock is free once the writer died).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgephi.artifacts import manifest as mf

__all__ = [
    "CURRENT",
    "DEFAULT_STORE",
    "STORE_ENV",
    "ArtifactInfo",
    "Staging",
    "Store",
    "StoreError",
]

DEFAULT_STORE = Path("/var/lib/edgephi/models")
STORE_ENV = "EDGEPHI_STORE_DIR"
CURRENT = "current"
TMP_PREFIX = ".tmp-"
DOWNLOADS = ".downloads"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


class StoreError(Exception):
    """A store operation that was refused (bad name, exists, is current, not verified...)."""


@dataclass
class ArtifactInfo:
    """One artifact directory of the store, as ``models list`` shows it."""

    name: str
    path: Path
    current: bool
    size: int
    manifest: dict[str, Any] | None
    digest: str
    problem: str | None = None

    def summary(self) -> dict[str, Any]:
        """What ``edgephi models list --json`` prints for it (name, current, size in bytes, created, source
        model, the gate's verdict and figures, artifact digest, problem)."""
        m = self.manifest or {}
        gate = m.get("gate") or {}
        return {
            "name": self.name,
            "current": self.current,
            "size": self.size,
            "created": m.get("created"),
            "source": (m.get("source") or {}).get("model"),
            "gate": None if not gate else {k: gate.get(k) for k in ("passed", "ppl_ratio", "top1_agreement")},
            "digest": self.digest,
            "problem": self.problem,
        }


@dataclass
class Staging:
    """A private temp directory in the store (``.tmp-NAME-*``) held by this process through a flock."""

    store: Store
    name: str
    path: Path
    lock_path: Path
    _lock_fd: int = field(repr=False, default=-1)
    promoted: Path | None = None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (so a promoted artifact survives a power cut)."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _make_readable(root: Path) -> None:
    """0755 directories, 0644 files: the service user must read what root (or another user) wrote."""
    os.chmod(root, 0o755)
    for p in root.rglob("*"):
        if not p.is_symlink():
            os.chmod(p, 0o755 if p.is_dir() else 0o644)


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


class Store:
    """An artifact store rooted at ``root`` (created on first write)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @classmethod
    def from_arg(cls, store: Path | str | None) -> Store:
        """``store``, else ``$EDGEPHI_STORE_DIR``, else :data:`DEFAULT_STORE`."""
        if store:
            return cls(Path(store))
        env = os.environ.get(STORE_ENV)
        return cls(Path(env) if env else DEFAULT_STORE)

    # ------------------------------------------------------------------------------------------ naming

    @staticmethod
    def check_name(name: str) -> str:
        """Return ``name`` if it can name an artifact directory, else raise :class:`StoreError`."""
        if not _NAME_RE.match(name) or name == CURRENT:
            raise StoreError(
                f"bad artifact name {name!r}: 1-128 characters of letters, digits, '.', '_', '+', '-', starting with "
                f"a letter or digit, and not {CURRENT!r}"
            )
        return name

    def path(self, name: str) -> Path:
        """The directory artifact ``name`` has (or would have). Raises StoreError for a bad name."""
        return self.root / self.check_name(name)

    def exists(self, name: str) -> bool:
        """Whether anything (even a dangling link) is at :meth:`path`. Raises StoreError for a bad name."""
        return os.path.lexists(self.path(name))

    # ---------------------------------------------------------------------------------------- current

    @property
    def current_link(self) -> Path:
        """The ``current`` symlink's path (whether or not it exists)."""
        return self.root / CURRENT

    def current_target(self) -> str | None:
        """Where ``current`` points (the link text), or None when there is no ``current`` symlink."""
        try:
            return os.readlink(self.current_link)
        except (FileNotFoundError, OSError):
            return None

    def current_name(self) -> str | None:
        """The artifact name ``current`` points at, when it points at a directory of this store."""
        target = self.current_target()
        if target is None:
            return None
        resolved = (self.root / target).resolve() if not os.path.isabs(target) else Path(target).resolve()
        if resolved.parent == self.root.resolve() and _NAME_RE.match(resolved.name):
            return resolved.name
        return None

    def resolve(self, name_or_path: str | None) -> Path:
        """An artifact directory from a store name, a path, or None (= ``current``)."""
        if not name_or_path:
            return self.current_link
        in_store = name_or_path == CURRENT or (_NAME_RE.match(name_or_path) and (self.root / name_or_path).exists())
        if "/" not in name_or_path and in_store:
            return self.root / name_or_path
        return Path(name_or_path)

    # ------------------------------------------------------------------------------------------ locking

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's metadata lock (``.lock``), creating the store if needed."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def clean_stale(self) -> list[str]:
        """Remove temp directories (and their lock files) no live process holds; return their names."""
        if not self.root.is_dir():
            return []
        removed = []
        with self.locked():
            for entry in sorted(self.root.iterdir()):
                if not entry.name.startswith(TMP_PREFIX) or entry.name.endswith(".lock"):
                    continue
                lock = entry.with_name(entry.name + ".lock")
                if lock.exists():
                    fd = os.open(lock, os.O_RDWR)
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # a live writer
                    finally:
                        os.close(fd)
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                lock.unlink(missing_ok=True)
                removed.append(entry.name)
            for lock in self.root.glob(f"{TMP_PREFIX}*.lock"):  # locks whose directory is gone
                if not lock.with_name(lock.name.removesuffix(".lock")).exists():
                    fd = os.open(lock, os.O_RDWR)
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        lock.unlink(missing_ok=True)
                    except BlockingIOError:
                        pass
                    finally:
                        os.close(fd)
        return removed

    # -------------------------------------------------------------------------------------- staging

    @contextlib.contextmanager
    def staging(self, name: str, *, must_be_new: bool = True) -> Iterator[Staging]:
        """A temp directory ``.tmp-NAME-*`` for a new artifact; removed on exit unless promoted.

        Stale temp directories of dead writers are removed first. With ``must_be_new`` a name that already
        exists is refused, so no work starts for an artifact that could not be promoted.
        """
        self.check_name(name)
        self.clean_stale()
        with self.locked():
            if must_be_new and self.exists(name):
                raise StoreError(
                    f"{self.path(name)} already exists: pick a new name (a new artifact gets a new name, so the "
                    f"current one keeps serving), or `edgephi models remove {name}` first"
                )
            path = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{name}-", dir=self.root))
            lock_path = path.with_name(path.name + ".lock")
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
        st = Staging(self, name, path, lock_path, fd)
        try:
            yield st
        finally:
            shutil.rmtree(path, ignore_errors=True)
            lock_path.unlink(missing_ok=True)
            os.close(fd)

    def promote(
        self, staging: Staging, artifact_dir: Path, *, name: str | None = None, make_current: bool = False
    ) -> Path:
        """Move the complete, verified ``artifact_dir`` (inside ``staging``) to ``name`` (default: the staging's
        name) with one rename; with ``make_current``, then switch ``current`` to it.

        Raises:
            StoreError: the name exists, or ``artifact_dir`` is not inside the staging directory.
        """
        if name is not None:
            staging.name = self.check_name(name)
        artifact_dir = Path(artifact_dir)
        if staging.path.resolve() not in (artifact_dir.resolve(), *artifact_dir.resolve().parents):
            raise StoreError(f"{artifact_dir} is not inside {staging.path}")
        _make_readable(artifact_dir)
        _fsync_tree(artifact_dir)
        final = self.path(staging.name)
        with self.locked():
            if os.path.lexists(final):
                raise StoreError(
                    f"{final} already exists: it was not replaced (a new artifact needs a new name; "
                    f"`edgephi models remove {staging.name}` first to reuse it)"
                )
            if artifact_dir.resolve() == staging.path.resolve():
                os.rename(artifact_dir, final)
                os.mkdir(staging.path)  # the staging context removes it
            else:
                os.rename(artifact_dir, final)
            _fsync_dir(self.root)
            staging.promoted = final
            if make_current:
                self._switch(staging.name)
        return final

    # ------------------------------------------------------------------------------------ operations

    def _switch(self, name: str) -> None:
        link = self.current_link
        if link.exists() and not link.is_symlink():
            raise StoreError(f"{link} is a real directory, not a symlink: move it into the store under a name first")
        tmp = self.root / f"{TMP_PREFIX}{CURRENT}-{secrets.token_hex(4)}"
        os.symlink(name, tmp)
        try:
            os.replace(tmp, link)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.root)

    def use(self, name: str, *, verify: bool = True) -> list[str]:
        """Make ``name`` current (atomic symlink switch); with ``verify``, only if its manifest verifies.

        Returns the problems found (empty on success; nothing switched otherwise).

        Raises:
            StoreError: no such artifact.
        """
        path = self.path(name)
        if not path.is_dir() or path.is_symlink():
            raise StoreError(f"no artifact {name!r} in {self.root}")
        if verify:
            try:
                problems = mf.verify(path)
            except mf.ManifestError as exc:
                problems = [str(exc)]
            if problems:
                return problems
        with self.locked():
            self._switch(name)
        return []

    def remove(self, name: str) -> None:
        """Remove artifact ``name`` (renamed away first, so it disappears at once); refuses the current one."""
        path = self.path(name)
        with self.locked():
            if not os.path.lexists(path):
                raise StoreError(f"no artifact {name!r} in {self.root}")
            if self.current_name() == name:
                raise StoreError(
                    f"{name!r} is current (it is being served): `edgephi models use OTHER` first, then remove it"
                )
            doomed = self.root / f"{TMP_PREFIX}remove-{name}-{secrets.token_hex(4)}"
            os.rename(path, doomed)
            _fsync_dir(self.root)
        shutil.rmtree(doomed, ignore_errors=True)

    def list(self) -> list[ArtifactInfo]:
        """The store's artifacts (directories not starting with '.'), by name."""
        if not self.root.is_dir():
            return []
        current = self.current_name()
        out = []
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(".") or entry.name == CURRENT or entry.is_symlink() or not entry.is_dir():
                continue
            data: dict[str, Any] | None = None
            problem = None
            digest = ""
            try:
                data = mf.load(entry)
                digest = mf.artifact_digest(entry)
            except mf.ManifestError as exc:
                problem = str(exc)
            out.append(ArtifactInfo(entry.name, entry, entry.name == current, _dir_size(entry), data, digest, problem))
        return out

    def free_bytes(self) -> int:
        """Free space (bytes) for an unprivileged writer on the store's filesystem."""
        probe = self.root
        while not probe.exists():
            probe = probe.parent
        st = os.statvfs(probe)
        return st.f_bavail * st.f_frsize

    def require_free(self, needed: int, what: str) -> None:
        """Raise :class:`StoreError` when the store's filesystem has less than ``needed`` bytes free."""
        free = self.free_bytes()
        if free < needed:
            raise StoreError(
                f"not enough disk space in {self.root} for {what}: needs {needed / 2**30:.2f} GiB, "
                f"{free / 2**30:.2f} GiB free (remove old artifacts with `edgephi models remove NAME`)"
            )


def is_enospc(exc: BaseException) -> bool:
    """Whether ``exc`` is an OSError for a full disk."""
    return isinstance(exc, OSError) and exc.errno == errno.ENOSPC
