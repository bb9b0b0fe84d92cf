"""The artifact store on temp dirs: names, staging and promotion, the ``current`` symlink, listing, removal,
stale temp directories, the free-disk check."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from edgephi.artifacts import manifest as mf
from edgephi.artifacts.store import CURRENT, DEFAULT_STORE, STORE_ENV, Store, StoreError, is_enospc


def _put(store: Store, name: str, *, current: bool = False, payload: bytes = b"weights") -> Path:
    """Stage, manifest and promote a one-file artifact, as quantize/fetch do."""
    with store.staging(name) as staging:
        art = staging.path / name
        art.mkdir()
        (art / "model.safetensors").write_bytes(payload)
        mf.write_atomic(art / mf.MANIFEST, mf.new_manifest(name, art, show_progress=False))
        return store.promote(staging, art, make_current=current)


def _entries(store: Store) -> list[str]:
    return sorted(p.name for p in store.root.iterdir())


@pytest.mark.parametrize("name", ["a", "phi4-w4a16_2026.11+rc1", "9" * 128])
def test_good_names(name: str) -> None:
    assert Store.check_name(name) == name


@pytest.mark.parametrize("name", ["", CURRENT, ".hidden", "-x", "a/b", "../x", "x y", "ü", "9" * 129])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(StoreError, match="bad artifact name"):
        Store.check_name(name)


def test_from_arg_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(STORE_ENV, raising=False)
    assert Store.from_arg(None).root == DEFAULT_STORE
    monkeypatch.setenv(STORE_ENV, str(tmp_path / "env"))
    assert Store.from_arg(None).root == tmp_path / "env"
    assert Store.from_arg(tmp_path / "arg").root == tmp_path / "arg"


def test_promote_then_current_switch_and_listing(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    assert store.list() == [] and store.current_target() is None and store.current_name() is None
    a = _put(store, "a", current=True)
    assert a == store.root / "a" and os.readlink(store.current_link) == "a"  # relative link
    _put(store, "b", payload=b"other weights")
    assert store.current_name() == "a"  # promotion alone never switches
    assert _entries(store) == [".lock", "a", "b", CURRENT]  # no staging directory or lock left
    infos = store.list()
    sizes = [sum(p.stat().st_size for p in (store.root / n).iterdir()) for n in ("a", "b")]
    assert [(i.name, i.current, i.size, i.problem) for i in infos] == [("a", True, sizes[0], None),
                                                                       ("b", False, sizes[1], None)]  # fmt: skip
    assert infos[0].digest == mf.artifact_digest(a)
    summary = infos[0].summary()
    assert summary["name"] == "a" and summary["current"] and summary["gate"] is None and summary["created"]
    assert store.use("b") == [] and store.current_name() == "b"
    assert (a / "model.safetensors").stat().st_mode & 0o777 == 0o644 and a.stat().st_mode & 0o777 == 0o755


def test_staging_refuses_an_existing_name_and_promote_never_replaces(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    _put(store, "a")
    with pytest.raises(StoreError, match="already exists"), store.staging("a"):
        pass
    with store.staging("a", must_be_new=False) as staging:
        (staging.path / "x").mkdir()
        with pytest.raises(StoreError, match="already exists"):
            store.promote(staging, staging.path / "x")
        with pytest.raises(StoreError, match="is not inside"):
            store.promote(staging, tmp_path)
        promoted = store.promote(staging, staging.path / "x", name="a2")
    assert promoted == store.root / "a2" and _entries(store) == [".lock", "a", "a2"]


def test_staging_is_removed_when_not_promoted(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    with pytest.raises(RuntimeError), store.staging("a") as staging:
        (staging.path / "partial").write_bytes(b"x")
        raise RuntimeError("the writer failed")
    assert _entries(store) == [".lock"] and not store.exists("a")


def test_use_refuses_an_artifact_that_does_not_verify(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    _put(store, "a", current=True)
    b = _put(store, "b")
    (b / "model.safetensors").write_bytes(b"tampered")
    problems = store.use("b")
    assert problems and "model.safetensors" in problems[0]
    assert store.current_name() == "a"
    assert store.use("b", verify=False) == [] and store.current_name() == "b"
    (b / mf.MANIFEST).unlink()
    assert "no manifest.json" in store.use("b")[0]
    with pytest.raises(StoreError, match="no artifact"):
        store.use("nothing")


def test_switch_refuses_a_real_current_directory(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    _put(store, "a")
    store.current_link.mkdir()
    with pytest.raises(StoreError, match="real directory"):
        store.use("a", verify=False)


def test_remove_refuses_current_and_unknown(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    _put(store, "a", current=True)
    _put(store, "b")
    with pytest.raises(StoreError, match="is current"):
        store.remove("a")
    with pytest.raises(StoreError, match="no artifact"):
        store.remove("zzz")
    store.remove("b")
    assert _entries(store) == [".lock", "a", CURRENT]


def test_list_reports_a_broken_manifest_and_skips_hidden_entries(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    _put(store, "a")
    (store.root / "broken").mkdir()
    (store.root / ".tmp-x-123").mkdir()
    (store.root / "file").write_text("not a directory")
    (store.root / "alias").symlink_to("a")
    infos = {i.name: i for i in store.list()}
    assert sorted(infos) == ["a", "broken"]
    assert infos["broken"].problem is not None and "no manifest.json" in infos["broken"].problem
    assert infos["broken"].digest == "" and infos["a"].problem is None


def test_current_name_only_for_targets_inside_the_store(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    _put(store, "a")
    (tmp_path / "elsewhere").mkdir()
    store.current_link.symlink_to(tmp_path / "elsewhere")
    assert store.current_target() == str(tmp_path / "elsewhere") and store.current_name() is None
    store.current_link.unlink()
    store.current_link.symlink_to("a")
    assert store.current_name() == "a"


def test_resolve_names_paths_and_current(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    _put(store, "a")
    assert store.resolve(None) == store.current_link
    assert store.resolve("a") == store.root / "a"
    assert store.resolve(CURRENT) == store.root / CURRENT
    assert store.resolve("missing") == Path("missing")  # not in the store: a path
    assert store.resolve(str(tmp_path / "x")) == tmp_path / "x"


def test_stale_temp_directories_are_cleaned_but_live_ones_kept(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    with store.staging("live") as live:
        (live.path / "partial.bin").write_bytes(b"x" * 10)
        # a writer that died: a temp dir whose lock nobody holds
        dead = store.root / ".tmp-dead-abc123"
        dead.mkdir()
        (dead / "partial.bin").write_bytes(b"x")
        (store.root / ".tmp-dead-abc123.lock").write_text("")
        (store.root / ".tmp-orphan-1.lock").write_text("")  # a lock whose directory is gone
        removed = store.clean_stale()
        assert removed == [".tmp-dead-abc123"]
        assert live.path.is_dir()  # a live writer's directory survives
        assert not (store.root / ".tmp-orphan-1.lock").exists()
    assert not live.path.exists() and _entries(store) == [".lock"]
    assert Store(tmp_path / "absent").clean_stale() == []


def test_free_space_check(tmp_path: Path) -> None:
    store = Store(tmp_path / "not" / "yet")  # measured on the nearest existing parent
    free = store.free_bytes()
    assert free > 0
    store.require_free(1, "a test")
    with pytest.raises(StoreError, match=r"not enough disk space .* for a test: needs"):
        store.require_free(free + (1 << 50), "a test")


def test_is_enospc() -> None:
    assert is_enospc(OSError(errno.ENOSPC, "full"))
    assert not is_enospc(OSError(errno.EACCES, "denied"))
    assert not is_enospc(ValueError("x"))
