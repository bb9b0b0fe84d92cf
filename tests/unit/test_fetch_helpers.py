"""``edgephi fetch``'s pure pieces: source classification, digest parsing, Content-Range parsing, safe archive
extraction, and fetching from a local archive or directory (no network; the HTTP paths are in
tests/integration/test_fetch.py against a real server on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from edgephi.artifacts import fetch as ft
from edgephi.artifacts import manifest as mf
from edgephi.artifacts.store import Store
from tests._models import write_phi4_chat_files

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _artifact(root: Path, name: str = "art") -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"architectures": ["Phi3ForCausalLM"]}))
    (d / "model.safetensors").write_bytes(b"\x01" * 4096)
    write_phi4_chat_files(d)
    mf.write_atomic(d / mf.MANIFEST, mf.new_manifest(name, d, show_progress=False))
    return d


def _tar(archive: Path, files: dict[str, bytes], *, links: dict[str, tuple[bytes, str]] | None = None) -> str:
    """A tar of ``files`` (name → data) plus link/special members (name → (tar type, link target))."""
    with tarfile.open(archive, "w:gz" if archive.name.endswith("gz") else "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tar.addfile(info)
    return hashlib.sha256(archive.read_bytes()).hexdigest()


def _files_of(artifact: Path, prefix: str = "") -> dict[str, bytes]:
    return {prefix + p.name: p.read_bytes() for p in sorted(artifact.iterdir())}


# ------------------------------------------------------------------------------------------------- sources


def test_parse_source_kinds(tmp_path: Path) -> None:
    assert ft.parse_source("https://example.org/a.tar.gz") == ft.Source("http", "https://example.org/a.tar.gz")
    assert ft.parse_source("http://h/x") == ft.Source("http", "http://h/x")
    assert ft.parse_source(f"hf://org/repo.name@{COMMIT}") == ft.Source("hub", "org/repo.name", COMMIT)
    assert ft.parse_source("hf://org/repo", COMMIT) == ft.Source("hub", "org/repo", COMMIT)  # --revision
    (tmp_path / "a.tar").write_bytes(b"")
    assert ft.parse_source(str(tmp_path)) == ft.Source("dir", str(tmp_path))
    assert ft.parse_source(str(tmp_path / "a.tar")) == ft.Source("archive", str(tmp_path / "a.tar"))


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("hf://org/repo@main", "pin a 40-hex commit"),
        ("hf://org/repo", "pin a 40-hex commit"),
        (f"hf://org/repo@{COMMIT.upper()}", "pin a 40-hex commit"),
        (f"hf://just-a-name@{COMMIT}", "bad hub repo"),
        (f"hf://a/b/c@{COMMIT}", "bad hub repo"),
        ("/no/such/path", "not an http(s) URL"),
        ("ftp://h/a.tar", "not an http(s) URL"),
    ],
)
def test_parse_source_refusals(source: str, message: str) -> None:
    with pytest.raises(ft.FetchError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ft.parse_source(source)


@pytest.mark.parametrize(
    ("location", "name"),
    [
        ("https://h/dir/phi4-w4a16.tar.gz", "phi4-w4a16"),
        ("https://h/dir/phi4.tgz?token=x", "phi4"),
        ("/srv/a/model.tar", "model"),
        ("/srv/a/model-dir/", "model-dir"),
        ("org/repo", "repo"),
    ],
)
def test_default_name(location: str, name: str) -> None:
    assert ft.Source("http", location).default_name() == name


def test_normalize_digest() -> None:
    d = "ab" * 32
    assert ft.normalize_digest(d) == d
    assert ft.normalize_digest(f"  sha256:{d.upper()}\n") == d
    for bad in ("ab" * 31, "zz" * 32, "sha1:" + d, ""):
        with pytest.raises(ft.FetchError, match="expected 64 hex digits"):
            ft.normalize_digest(bad)


@pytest.mark.parametrize(
    ("header", "parsed"),
    [
        ("bytes 100-199/1000", (100, 1000)),
        ("bytes */1000", (None, 1000)),
        ("bytes 0-9/*", (0, None)),
        (" bytes  5-9/10 ", (5, 10)),
        ("items 0-9/10", (None, None)),
        ("", (None, None)),
        (None, (None, None)),
    ],
)
def test_content_range(header: str | None, parsed: tuple[int | None, int | None]) -> None:
    assert ft._content_range(header) == parsed


# ------------------------------------------------------------------------------------------------ archives


def test_extract_archive_with_a_top_directory_and_flat(tmp_path: Path) -> None:
    art = _artifact(tmp_path / "src")
    _tar(tmp_path / "top.tar.gz", _files_of(art, "art/"))
    (tmp_path / "x").mkdir()
    root = ft.extract_archive(tmp_path / "top.tar.gz", tmp_path / "x")
    assert root == tmp_path / "x" / "art" and mf.verify(root, show_progress=False) == []
    _tar(tmp_path / "flat.tar", _files_of(art))
    (tmp_path / "y").mkdir()
    assert ft.extract_archive(tmp_path / "flat.tar", tmp_path / "y") == tmp_path / "y"


@pytest.mark.parametrize(
    ("member", "message"),
    [
        ({"../../escaped.txt": b"x"}, "path traversal"),
        ({"art/../../escaped.txt": b"x"}, "path traversal"),
        ({"/tmp/absolute.txt": b"x"}, "absolute path"),
        ({"C:/windows.txt": b"x"}, "absolute path"),
        ({"art\\evil.txt": b"x"}, "path traversal"),
    ],
)
def test_extract_archive_refuses_paths_outside(tmp_path: Path, member: dict[str, bytes], message: str) -> None:
    art = _artifact(tmp_path / "src")
    _tar(tmp_path / "evil.tar", {**_files_of(art, "art/"), **member})
    (tmp_path / "x").mkdir()
    with pytest.raises(ft.UnsafeArchive, match=message):
        ft.extract_archive(tmp_path / "evil.tar", tmp_path / "x")
    assert not (tmp_path / "escaped.txt").exists()


@pytest.mark.parametrize(
    ("kind", "target", "message"),
    [
        (tarfile.SYMTYPE, "/etc/passwd", "symbolic link to '/etc/passwd' (escaping the artifact)"),
        (tarfile.SYMTYPE, "config.json", "symbolic link to 'config.json': artifacts hold regular files only"),
        (tarfile.LNKTYPE, "art/config.json", "hard link"),
        (tarfile.FIFOTYPE, "", "not a regular file or directory"),
        (tarfile.CHRTYPE, "", "not a regular file or directory"),
    ],
)
def test_extract_archive_refuses_links_and_special_files(tmp_path: Path, kind: bytes, target: str,
                                                         message: str) -> None:  # fmt: skip
    art = _artifact(tmp_path / "src")
    _tar(tmp_path / "evil.tar", _files_of(art, "art/"), links={"art/odd": (kind, target)})
    (tmp_path / "x").mkdir()
    with pytest.raises(ft.UnsafeArchive, match=message.replace("(", r"\(").replace(")", r"\)")):
        ft.extract_archive(tmp_path / "evil.tar", tmp_path / "x")


def test_extract_archive_needs_a_manifest_and_a_tar(tmp_path: Path) -> None:
    _tar(tmp_path / "bare.tar", {"a/config.json": b"{}", "b/config.json": b"{}"})
    (tmp_path / "x").mkdir()
    with pytest.raises(ft.FetchError, match=r"no manifest\.json at the archive's top"):
        ft.extract_archive(tmp_path / "bare.tar", tmp_path / "x")
    (tmp_path / "junk.tar.gz").write_bytes(b"\x1f\x8b" + b"\x00" * 100)
    (tmp_path / "y").mkdir()
    with pytest.raises(ft.FetchError, match="not a complete tar archive"):
        ft.extract_archive(tmp_path / "junk.tar.gz", tmp_path / "y")


# ---------------------------------------------------------------------------------- local fetch, no network


def test_fetch_local_archive_pinned_by_its_sha256(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    art = _artifact(tmp_path / "src", "tiny")
    digest = _tar(tmp_path / "tiny.tar.gz", _files_of(art, "tiny/"))
    with pytest.raises(ft.DigestMismatch, match="expected " + "cd" * 32):
        ft.fetch(store, str(tmp_path / "tiny.tar.gz"), "cd" * 32, show_progress=False)
    assert [i.name for i in store.list()] == []
    final = ft.fetch(store, str(tmp_path / "tiny.tar.gz"), "SHA256:" + digest.upper(), make_current=True,
                     show_progress=False)  # fmt: skip
    assert final == store.root / "tiny" and store.current_name() == "tiny"  # the manifest's name
    assert (final / mf.MANIFEST).read_bytes() == (art / mf.MANIFEST).read_bytes()
    with pytest.raises(ft.FetchError, match="already exists"):
        ft.fetch(store, str(tmp_path / "tiny.tar.gz"), digest, name="tiny")


def test_fetch_local_directory_pinned_by_its_manifest_and_copies_listed_files_only(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    art = _artifact(tmp_path / "src", "tiny")
    (art / "README.md").write_text("not listed")
    digest = hashlib.sha256((art / mf.MANIFEST).read_bytes()).hexdigest()
    with pytest.raises(ft.DigestMismatch, match=r"manifest\.json sha256"):
        ft.fetch(store, str(art), "ab" * 32)
    final = ft.fetch(store, str(art), digest, name="copy", show_progress=False)
    assert sorted(p.name for p in final.iterdir()) == [
        "config.json", "generation_config.json", mf.MANIFEST, "model.safetensors", "tokenizer_config.json"]  # fmt: skip
    # a listed file missing from the source directory: refused, nothing promoted
    (art / "config.json").unlink()
    with pytest.raises(ft.FetchError, match="listed in the manifest but missing"):
        ft.fetch(store, str(art), digest, name="broken", show_progress=False)
    assert [i.name for i in store.list()] == ["copy"]
    assert not [p for p in store.root.iterdir() if p.name.startswith(".tmp-")]


def test_hub_snapshot_insists_on_a_pinned_commit(tmp_path: Path) -> None:
    with pytest.raises(ft.FetchError, match="pin a 40-hex commit"):
        ft.hub_snapshot("org/repo", "main", cache_dir=tmp_path, local_files_only=True)
