"""``edgephi fetch`` and ``edgephi models`` against a real HTTP server on 127.0.0.1 and a real store.

The server (http.server in a thread) serves artifact archives with ``Range`` support and ``ETag``, and can drop
the connection in the middle of a body, throttle a body, or announce a size larger than any disk. The artifacts
are small synthetic ones (random "weights", a manifest): fetching does not look inside the files, and the
served/quantized path is covered in tests/integration/test_artifacts.py. No mocks: every fault here is produced
for real.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from edgephi.artifacts import manifest as mf
from edgephi.artifacts.fetch import DigestMismatch, FetchError, UnsafeArchive, fetch
from edgephi.artifacts.store import Store, StoreError
from edgephi.cli import main
from edgephi.doctor import verify_manifest_files
from tests._models import write_phi4_chat_files

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------- HTTP server


@dataclass
class Served:
    data: bytes
    etag: str
    drop_after: list[int] = field(default_factory=list)  # one entry per request to cut short (bytes sent)
    throttle_bps: int | None = None
    fake_length: int | None = None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        item = self.server.items.get(self.path)
        self.server.requests.append((self.path, self.headers.get("Range"), self.headers.get("If-Range")))
        if item is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        size = item.fake_length or len(item.data)
        start = 0
        rng = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if rng and (if_range is None or if_range == item.etag):
            m = re.fullmatch(r"bytes=(\d+)-", rng)
            assert m, rng
            start = int(m.group(1))
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(size - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", item.etag)
        self.end_headers()
        body = item.data[start:]
        try:
            if item.drop_after:
                cut = item.drop_after.pop(0)
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)  # a dropped connection, mid-body
                self.close_connection = True
                return
            step = 64 << 10
            for i in range(0, len(body), step):
                self.wfile.write(body[i : i + step])
                if item.throttle_bps:
                    time.sleep(step / item.throttle_bps)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    items: dict[str, Served]
    requests: list[tuple[str, str | None, str | None]]

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # clients that hang up are part of the tests
            super().handle_error(request, client_address)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def http() -> Iterator[_Server]:
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.items, srv.requests = {}, []
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _url(srv: _Server, path: str) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}{path}"


# ------------------------------------------------------------------------------------------------ artifacts


def make_artifact(root: Path, name: str, weights_bytes: int = 256 << 10, seed: int = 0) -> Path:
    """A small artifact directory with a manifest (what `edgephi quantize` writes, minus the real weights)."""
    d = root / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"architectures": ["Phi3ForCausalLM"], "seed": seed}))
    (d / "model.safetensors").write_bytes(os.urandom(weights_bytes))
    (d / "tokenizer.json").write_text('{"model": "tiny"}')
    write_phi4_chat_files(d)
    mf.write_atomic(d / mf.MANIFEST, mf.new_manifest(name, d, show_progress=False))
    return d


def pack(artifact: Path, archive: Path, *, top_dir: bool = True, extra: list[tarfile.TarInfo] | None = None,
         extra_data: dict[str, bytes] | None = None) -> str:  # fmt: skip
    """Archive ``artifact`` (under a top directory named after it, or flat); returns its sha256."""
    mode = "w:gz" if archive.name.endswith("gz") else "w"
    with tarfile.open(archive, mode) as tar:  # type: ignore[call-overload]
        for p in sorted(artifact.iterdir()):
            tar.add(p, arcname=f"{artifact.name}/{p.name}" if top_dir else p.name)
        for info in extra or []:
            data = (extra_data or {}).get(info.name, b"")
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return hashlib.sha256(archive.read_bytes()).hexdigest()


def serve(srv: _Server, path: str, archive: Path, **kw: object) -> str:
    data = archive.read_bytes()
    srv.items[path] = Served(data, f'"{hashlib.sha256(data).hexdigest()[:16]}"', **kw)  # type: ignore[arg-type]
    return _url(srv, path)


def artifact_names(store: Store) -> list[str]:
    return [i.name for i in store.list()]


def visible_dirs(store: Store) -> list[str]:
    """Every directory a daemon or `models list` could pick up (not starting with '.')."""
    return sorted(p.name for p in store.root.iterdir() if not p.name.startswith(".") and p.name != "current")


@pytest.fixture
def store_with_a(tmp_path: Path, http: _Server) -> tuple[Store, Path]:
    """A store whose current artifact is ``a`` (fetched over HTTP, flat archive), and the work dir."""
    store = Store(tmp_path / "store")
    work = tmp_path / "work"
    art = make_artifact(work, "a")
    digest = pack(art, work / "a.tar.gz", top_dir=False)
    url = serve(http, f"/{tmp_path.name}/a.tar.gz", work / "a.tar.gz")
    assert main(["fetch", url, "--sha256", digest, "--name", "a", "--store", str(store.root), "--use"]) == 0
    return store, work


# -------------------------------------------------------------------------------------------------- tests


def test_good_archive_is_verified_and_promoted(store_with_a: tuple[Store, Path], http: _Server,
                                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    store, work = store_with_a
    assert store.current_name() == "a" and os.readlink(store.current_link) == "a"
    # a second artifact (archive with a top directory, name taken from its manifest), not made current
    b = make_artifact(work, "b", seed=1)
    digest = pack(b, work / "b.tar.gz")
    url = serve(http, "/b.tar.gz", work / "b.tar.gz")
    capsys.readouterr()
    assert main(["fetch", url, "--sha256", "sha256:" + digest.upper(), "--store", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(str(store.root / "b"))
    assert store.current_name() == "a"  # fetch alone never switches
    assert artifact_names(store) == ["a", "b"]
    assert verify_manifest_files(store.root / "b") == []  # doctor agrees
    assert (store.root / "b" / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()
    assert not list((store.root / ".downloads").iterdir())  # the archive is gone once installed
    assert [p.name for p in store.root.iterdir() if p.name.startswith(".tmp-")] == []
    # models use / list / remove, and `verify`
    assert main(["models", "use", "b", "--store", str(store.root)]) == 0
    assert store.current_name() == "b"
    assert main(["models", "remove", "b", "--store", str(store.root)]) == 1  # refuses the current one
    assert "is current" in capsys.readouterr().err
    assert main(["models", "list", "--json", "--store", str(store.root)]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [(a["name"], a["current"]) for a in listing["artifacts"]] == [("a", False), ("b", True)]
    assert listing["artifacts"][1]["digest"] == mf.artifact_digest(store.root / "b")
    assert main(["models", "use", "a", "--store", str(store.root)]) == 0
    assert main(["models", "remove", "b", "--store", str(store.root)]) == 0
    assert artifact_names(store) == ["a"] and store.current_name() == "a"
    assert main(["verify", "--store", str(store.root)]) == 0  # current
    # a tampered file: verify fails, and `models use` refuses to switch to it
    c = make_artifact(work, "c", seed=2)
    assert main(["fetch", str(c), "--sha256", hashlib.sha256((c / "manifest.json").read_bytes()).hexdigest(),
                 "--store", str(store.root)]) == 0  # fmt: skip
    with open(store.root / "c" / "model.safetensors", "r+b") as f:
        f.write(b"\0\0\0\0")
    capsys.readouterr()
    assert main(["verify", "c", "--store", str(store.root)]) == 1
    assert "model.safetensors: sha256" in capsys.readouterr().err
    assert main(["models", "use", "c", "--store", str(store.root)]) == 1
    assert store.current_name() == "a"


def test_wrong_digest_is_refused_and_previous_kept(store_with_a: tuple[Store, Path], http: _Server,
                                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    store, work = store_with_a
    b = make_artifact(work, "b")
    pack(b, work / "b.tar.gz")
    url = serve(http, "/wrong.tar.gz", work / "b.tar.gz")
    capsys.readouterr()
    rc = main(["fetch", url, "--sha256", "0123456789abcdef" * 4, "--name", "b", "--store", str(store.root)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "expected 0123456789abcdef" in err and "refused" in err and "'current' still points to a" in err
    assert artifact_names(store) == ["a"] and visible_dirs(store) == ["a"] and store.current_name() == "a"
    assert not list((store.root / ".downloads").glob("*.part"))  # a wrong file is not kept for resuming
    # a local archive and a local directory are pinned the same way
    with pytest.raises(DigestMismatch):
        fetch(store, str(work / "b.tar.gz"), "ab" * 32, name="b")
    with pytest.raises(DigestMismatch, match=r"manifest\.json sha256"):
        fetch(store, str(b), "ab" * 32, name="b")
    assert visible_dirs(store) == ["a"] and store.current_name() == "a"


def test_dropped_connection_is_resumed_with_range(store_with_a: tuple[Store, Path], http: _Server) -> None:
    store, work = store_with_a
    big = make_artifact(work, "big", weights_bytes=3 << 20)
    digest = pack(big, work / "big.tar")
    size = (work / "big.tar").stat().st_size
    # the first two responses are cut after 1 MiB and 0.5 MiB of body
    url = serve(http, "/big.tar", work / "big.tar", drop_after=[1 << 20, 512 << 10])
    http.requests.clear()
    final = fetch(store, url, digest, make_current=True, show_progress=False)
    assert final == store.root / "big" and store.current_name() == "big"
    got = [(r, ir) for p, r, ir in http.requests if p == "/big.tar"]
    assert got[0] == (None, None)
    assert got[1][0] == f"bytes={1 << 20}-" and got[1][1] is not None  # resumed, guarded by If-Range
    assert got[2][0] == f"bytes={(1 << 20) + (512 << 10)}-"
    assert len(got) == 3 and size > (1 << 20) + (512 << 10)
    assert mf.verify(final) == []


def test_unsafe_and_broken_archives_are_refused(store_with_a: tuple[Store, Path]) -> None:
    store, work = store_with_a
    art = make_artifact(work, "evil")

    def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", data: bytes = b"x") -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, link
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        return info

    cases = {
        "traversal": ([member("../../escaped.txt")], "path traversal"),
        "absolute": ([member("/tmp/edgephi-absolute.txt")], "absolute path"),
        "symlink-out": ([member("evil/passwd", tarfile.SYMTYPE, "/etc/passwd")], "escaping the artifact"),
        "symlink-up": ([member("evil/up", tarfile.SYMTYPE, "../../outside")], "escaping the artifact"),
        "hardlink": ([member("evil/hard", tarfile.LNKTYPE, "etc/shadow")], "hard link"),
        "fifo": ([member("evil/pipe", tarfile.FIFOTYPE)], "not a regular file"),
    }
    for label, (extra, message) in cases.items():
        archive = work / f"{label}.tar"
        digest = pack(art, archive, extra=extra, extra_data={m.name: b"x" for m in extra})
        with pytest.raises(UnsafeArchive, match=message):
            fetch(store, str(archive), digest, name=f"evil-{label}", show_progress=False)
    assert not (work.parent / "escaped.txt").exists() and not Path("/tmp/edgephi-absolute.txt").exists()

    # no manifest / a file not listed / a listed file missing / not an archive at all
    bare = work / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    with tarfile.open(work / "bare.tar", "w") as tar:
        tar.add(bare / "config.json", arcname="bare/config.json")
    with pytest.raises(FetchError, match=r"no manifest\.json"):
        fetch(store, str(work / "bare.tar"), hashlib.sha256((work / "bare.tar").read_bytes()).hexdigest())
    digest = pack(art, work / "unlisted.tar", extra=[member("evil/extra.py")], extra_data={"evil/extra.py": b"x"})
    with pytest.raises(FetchError, match=r"extra\.py: not listed"):
        fetch(store, str(work / "unlisted.tar"), digest, name="unlisted")
    (art / "tokenizer.json").unlink()
    digest = pack(art, work / "missing.tar")
    with pytest.raises(FetchError, match=r"tokenizer\.json: missing"):
        fetch(store, str(work / "missing.tar"), digest, name="missing")
    (work / "junk.tar.gz").write_bytes(os.urandom(4096))
    with pytest.raises(FetchError, match="not a complete tar archive"):
        fetch(store, str(work / "junk.tar.gz"), hashlib.sha256((work / "junk.tar.gz").read_bytes()).hexdigest())

    assert visible_dirs(store) == ["a"] and store.current_name() == "a"
    assert [p.name for p in store.root.iterdir() if p.name.startswith(".tmp-")] == []


def test_free_disk_is_checked_before_downloading(store_with_a: tuple[Store, Path], http: _Server) -> None:
    store, work = store_with_a
    pack(make_artifact(work, "huge"), work / "huge.tar")
    url = serve(http, "/huge.tar", work / "huge.tar", fake_length=1 << 55)  # 32 PiB announced
    with pytest.raises(StoreError, match="not enough disk space"):
        fetch(store, url, "cd" * 32, name="huge", show_progress=False)
    part = store.root / ".downloads" / ("cd" * 32 + ".part")
    assert not part.exists() or part.stat().st_size == 0  # refused before the body
    assert visible_dirs(store) == ["a"]


def test_name_rules_and_existing_names(store_with_a: tuple[Store, Path]) -> None:
    store, work = store_with_a
    art = make_artifact(work, "x")
    digest = hashlib.sha256((art / "manifest.json").read_bytes()).hexdigest()
    for bad in ("current", "../x", ".hidden", "a/b", ""):
        with pytest.raises(StoreError, match="bad artifact name"):
            fetch(store, str(art), digest, name=bad)
    with pytest.raises(FetchError, match="already exists"):
        fetch(store, str(art), digest, name="a")
    assert fetch(store, str(art), digest, name="x2").name == "x2"


def test_hub_source_pinned_commit_from_a_local_cache(store_with_a: tuple[Store, Path]) -> None:
    """The hub code path (huggingface_hub.snapshot_download) on a local hub cache: no hub is reachable here."""
    store, work = store_with_a
    art = make_artifact(work, "hubart")
    commit = "0123456789abcdef0123456789abcdef01234567"
    cache = work / "hub"
    repo = cache / "models--edgephi--tiny-w4a16"
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for p in art.iterdir():  # the hub cache's layout: snapshot files are symlinks into blobs/
        blob = repo / "blobs" / hashlib.sha256(p.read_bytes()).hexdigest()
        blob.write_bytes(p.read_bytes())
        (snap / p.name).symlink_to(os.path.relpath(blob, snap))
    (snap / "README.md").write_text("not listed in the manifest: not copied")
    hub = {"hub_cache_dir": cache, "hub_local_only": True}
    digest = hashlib.sha256((art / "manifest.json").read_bytes()).hexdigest()
    with pytest.raises(FetchError, match="pin a 40-hex commit"):
        fetch(store, "hf://edgephi/tiny-w4a16@main", digest, **hub)  # type: ignore[arg-type]
    final = fetch(store, f"hf://edgephi/tiny-w4a16@{commit}", digest, show_progress=False, **hub)  # type: ignore[arg-type]
    assert final.name == "hubart"  # the manifest's name
    assert sorted(p.name for p in final.iterdir()) == sorted(p.name for p in art.iterdir())
    assert not any(p.is_symlink() for p in final.iterdir()) and mf.verify(final) == []
    with pytest.raises(FetchError, match=r"LocalEntryNotFound|[Oo]ffline|not found|cannot"):
        fetch(store, f"hf://edgephi/other@{commit}", digest, name="other", **hub)  # type: ignore[arg-type]


def test_killed_fetch_leaves_current_and_resumes(store_with_a: tuple[Store, Path], http: _Server) -> None:
    """SIGKILL a real `edgephi fetch` while it writes the download: `current` and the store's visible
    directories are unchanged; the next fetch resumes from the partial file (Range) and succeeds."""
    store, work = store_with_a
    slow = make_artifact(work, "slow", weights_bytes=2 << 20)
    digest = pack(slow, work / "slow.tar")
    url = serve(http, "/slow.tar", work / "slow.tar", throttle_bps=1 << 20)  # ~2 s for the body
    part = store.root / ".downloads" / f"{digest}.part"
    argv = ["fetch", url, "--sha256", digest, "--use", "--store", str(store.root)]
    proc = subprocess.Popen([sys.executable, "-m", "edgephi.cli", *argv], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (part.exists() and part.stat().st_size >= 256 << 10):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the download never started"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)  # reaps it and closes its pipes (an unclosed pipe is a ResourceWarning)
    have = part.stat().st_size
    assert 0 < have < (work / "slow.tar").stat().st_size
    assert store.current_name() == "a" and visible_dirs(store) == ["a"] and artifact_names(store) == ["a"]
    http.items["/slow.tar"].throttle_bps = None
    http.requests.clear()
    assert main(["fetch", url, "--sha256", digest, "--use", "--store", str(store.root)]) == 0
    assert http.requests[0][1] is not None and int(http.requests[0][1].removeprefix("bytes=").rstrip("-")) >= have
    assert store.current_name() == "slow" and mf.verify(store.root / "slow") == []


def test_models_list_without_a_store_says_how_to_get_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "list", "--store", str(tmp_path / "absent")]) == 1
    err = capsys.readouterr().err
    assert f"no artifact store at {tmp_path / 'absent'}" in err and "edgephi fetch" in err


def test_old_generation_config_is_fixed_on_fetch_and_the_chat_stops_on_im_end(
    dev_models: tuple[Path, Path], tmp_path: Path, http: _Server, capsys: pytest.CaptureFixture[str]
) -> None:
    """The stand-in artifact with Phi-4's pre-fix generation_config (eos <|endoftext|> only), published with its
    manifest and fetched over HTTP: fetch rewrites eos to [<|im_end|>, <|endoftext|>] and records why, and
    `verify --chat` serves it and sees a greedy chat end on <|im_end|> with FINISH_REASON_STOP."""
    old = tmp_path / "old-config"
    shutil.copytree(dev_models[1], old, ignore=shutil.ignore_patterns(mf.MANIFEST))
    added = {t["content"]: t["id"] for t in json.loads((old / "tokenizer.json").read_text())["added_tokens"]}
    im_end, endoftext = added["<|im_end|>"], added["<|endoftext|>"]
    gen = json.loads((old / "generation_config.json").read_text())
    gen["eos_token_id"] = endoftext  # what public copies quantized before Microsoft's fix carry
    (old / "generation_config.json").write_text(json.dumps(gen))
    mf.write_atomic(old / mf.MANIFEST, mf.new_manifest("old-config", old, show_progress=False))
    digest = pack(old, tmp_path / "old-config.tar")
    url = serve(http, f"/{tmp_path.name}/old-config.tar", tmp_path / "old-config.tar")
    store = tmp_path / "store"
    assert main(["fetch", url, "--sha256", digest, "--store", str(store)]) == 0, capsys.readouterr().err
    art = store / "old-config"
    assert json.loads((art / "generation_config.json").read_text())["eos_token_id"] == [im_end, endoftext]
    fixed = mf.load(art)["chat_format"]["fixed"]
    assert fixed[0]["field"] == "eos_token_id" and fixed[0]["was"] == endoftext and "max_tokens" in fixed[0]["why"]
    capsys.readouterr()
    argv = ["verify", str(art), "--store", str(store), "--chat", "--chat-prompt",
            "Return the absolute value of a number.", "--chat-max-tokens", "400", "--json"]  # fmt: skip
    code = main(argv)
    out = json.loads(capsys.readouterr().out)
    assert code == 0, out
    assert out["chat_format"]["ok"] and out["chat"]["ok"], out
    assert out["chat"]["finish_reason"] == "FINISH_REASON_STOP" and out["chat"]["last_token_id"] == im_end
