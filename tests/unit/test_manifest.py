"""manifest.json: entries, digests, the shape check (``load``) and verification (``verify``), on temp dirs."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from edgephi.artifacts import manifest as mf


def _artifact(root: Path) -> Path:
    """Three files, one in a subdirectory, and a manifest listing them."""
    root.mkdir()
    (root / "config.json").write_text('{"a": 1}')
    (root / "model.safetensors").write_bytes(b"\x00\x01" * 1000)
    (root / "sub").mkdir()
    (root / "sub" / "tokenizer.json").write_text("{}")
    mf.write_atomic(root / mf.MANIFEST, mf.new_manifest("tiny", root, show_progress=False))
    return root


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_utc_now_is_iso8601_utc() -> None:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", mf.utc_now())


def test_sha256_file_matches_hashlib_and_reports_progress(tmp_path: Path) -> None:
    data = os.urandom((1 << 20) + 123)  # more than one 1 MiB chunk
    (tmp_path / "f").write_bytes(data)
    seen: list[int] = []
    assert mf.sha256_file(tmp_path / "f", seen.append) == _sha(data)
    assert seen == [1 << 20, 123]


def test_new_manifest_lists_every_file_but_itself_sorted(tmp_path: Path) -> None:
    root = _artifact(tmp_path / "a")
    data = json.loads((root / mf.MANIFEST).read_text())
    assert data["format"] == mf.FORMAT and data["name"] == "tiny" and data["created"].endswith("Z")
    assert [e["path"] for e in data["files"]] == ["config.json", "model.safetensors", "sub/tokenizer.json"]
    entry = data["files"][1]
    assert entry == {"path": "model.safetensors", "size": 2000, "sha256": _sha(b"\x00\x01" * 1000)}
    # sections: None is left out, others kept in order before "files"
    again = mf.new_manifest("tiny", root, show_progress=False, source={"model": "m"}, gate=None)
    assert list(again) == ["format", "name", "created", "source", "files"]


def test_file_entries_refuse_symlinks(tmp_path: Path) -> None:
    root = _artifact(tmp_path / "a")
    (root / "link").symlink_to(root / "config.json")
    with pytest.raises(mf.ManifestError, match="not a regular file"):
        mf.file_entries(root, show_progress=False)


def test_write_atomic_replaces_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    mf.write_atomic(path, {"x": 1})
    mf.write_atomic(path, {"x": 2, "ü": "ö"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"x": 2, "ü": "ö"}
    assert path.read_text().endswith("\n")
    assert path.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_write_atomic_keeps_the_old_file_when_serialization_fails(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    mf.write_atomic(path, {"x": 1})
    with pytest.raises(TypeError):
        mf.write_atomic(path, {"x": object()})
    assert json.loads(path.read_text()) == {"x": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_load_accepts_the_minimal_fetched_manifest(tmp_path: Path) -> None:
    (tmp_path / mf.MANIFEST).write_text(json.dumps({"files": [], "extra": {"kept": True}}))
    assert mf.load(tmp_path) == {"files": [], "extra": {"kept": True}}


def _write(root: Path, data: Any) -> None:
    (root / mf.MANIFEST).write_text(json.dumps(data))


GOOD = {"path": "a.bin", "size": 1, "sha256": "0" * 64}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "no 'files' list"),
        ({"files": {}}, "no 'files' list"),
        ({"files": ["a.bin"]}, "not an object"),
        ({"files": [{**GOOD, "path": "../a.bin"}]}, "unsafe"),
        ({"files": [{**GOOD, "path": "/etc/passwd"}]}, "unsafe"),
        ({"files": [{**GOOD, "path": "a//b"}]}, "unsafe"),
        ({"files": [{**GOOD, "path": "./a.bin"}]}, "unsafe"),
        ({"files": [{**GOOD, "path": "a\\b"}]}, "unsafe"),
        ({"files": [{**GOOD, "path": ""}]}, "unsafe"),
        ({"files": [{**GOOD, "path": 3}]}, "unsafe"),
        ({"files": [GOOD, GOOD]}, "listed twice"),
        ({"files": [{**GOOD, "path": mf.MANIFEST}]}, "lists the manifest itself"),
        ({"files": [{**GOOD, "size": -1}]}, "bad size"),
        ({"files": [{**GOOD, "size": True}]}, "bad size"),
        ({"files": [{**GOOD, "size": "1"}]}, "bad size"),
        ({"files": [{**GOOD, "sha256": "A" * 64}]}, "bad sha256"),
        ({"files": [{**GOOD, "sha256": "0" * 63}]}, "bad sha256"),
    ],
)
def test_load_refuses_malformed_manifests(tmp_path: Path, data: Any, message: str) -> None:
    _write(tmp_path, data)
    with pytest.raises(mf.ManifestError, match=re.escape(message)):
        mf.load(tmp_path)


def test_load_refuses_missing_and_unreadable(tmp_path: Path) -> None:
    with pytest.raises(mf.ManifestError, match=r"no manifest\.json"):
        mf.load(tmp_path)
    (tmp_path / mf.MANIFEST).write_text("{not json")
    with pytest.raises(mf.ManifestError, match="unreadable"):
        mf.load(tmp_path)
    (tmp_path / mf.MANIFEST).write_bytes(b"\xff\xfe")
    with pytest.raises(mf.ManifestError, match="unreadable"):
        mf.load(tmp_path)


def test_verify_clean_artifact(tmp_path: Path) -> None:
    assert mf.verify(_artifact(tmp_path / "a"), show_progress=False) == []


def test_verify_reports_every_kind_of_mismatch(tmp_path: Path) -> None:
    root = _artifact(tmp_path / "a")
    (root / "config.json").write_text('{"a": 2}')  # same size, other content
    (root / "model.safetensors").write_bytes(b"short")  # other size
    (root / "sub" / "tokenizer.json").unlink()  # missing
    (root / "extra.py").write_text("x")  # not listed
    problems = mf.verify(root, show_progress=False)
    assert len(problems) == 4, problems
    assert any(p.startswith("config.json: sha256 ") for p in problems)
    assert "model.safetensors: size 5, manifest says 2000" in problems
    assert "sub/tokenizer.json: missing" in problems
    assert "extra.py: not listed in the manifest" in problems
    # non-strict: an unlisted file is tolerated, the rest still reported
    assert len(mf.verify(root, strict=False, show_progress=False)) == 3


def test_verify_treats_a_symlinked_listed_file_as_missing(tmp_path: Path) -> None:
    root = _artifact(tmp_path / "a")
    outside = tmp_path / "outside.json"
    outside.write_bytes((root / "config.json").read_bytes())
    (root / "config.json").unlink()
    (root / "config.json").symlink_to(outside)
    problems = mf.verify(root, show_progress=False)
    assert "config.json: missing" in problems and "config.json: not a regular file" in problems


def test_artifact_digest_is_the_manifest_bytes_digest(tmp_path: Path) -> None:
    root = _artifact(tmp_path / "a")
    assert mf.artifact_digest(root) == "sha256:" + _sha((root / mf.MANIFEST).read_bytes())


def test_files_digest_is_order_independent_and_content_sensitive() -> None:
    a = {"path": "a", "size": 1, "sha256": "1" * 64}
    b = {"path": "b", "size": 2, "sha256": "2" * 64}
    assert mf.files_digest([a, b]) == mf.files_digest([b, a])
    assert mf.files_digest([a, b]) != mf.files_digest([a, {**b, "size": 3}])
    assert mf.files_digest([a, b]) != mf.files_digest([a])
    assert re.fullmatch(r"[0-9a-f]{64}", mf.files_digest([]))
