"""The calibration and held-out text: deterministic stdlib splits that never overlap, user calibration files,
and the pipeline's calibration description (what the manifest records)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from edgephi.artifacts import corpus
from edgephi.artifacts.build import Refused, calibration_texts


def test_stdlib_documents_are_deterministic_and_split() -> None:
    train = corpus.stdlib_documents("train", max_chars=200_000)
    heldout = corpus.stdlib_documents("heldout", max_chars=200_000)
    assert train == corpus.stdlib_documents("train", max_chars=200_000)
    assert len(heldout) > 10 and len(train) > 15 * len(heldout)
    assert not set(train) & set(heldout)
    everything = corpus.stdlib_documents("all", max_chars=200_000)
    assert set(train) | set(heldout) <= set(everything)
    assert all(len(d) >= corpus.MIN_DOC_CHARS and d == d.strip() for d in everything)
    assert sum(map(len, everything[:-1])) < 200_000  # stops once max_chars is reached


def test_stdlib_documents_refuses_an_unknown_split() -> None:
    with pytest.raises(ValueError, match="split must be"):
        corpus.stdlib_documents("validation")


def test_heldout_texts_drop_documents_found_in_calibration_text() -> None:
    heldout = corpus.heldout_texts()
    assert heldout == corpus.stdlib_documents("heldout") and len(heldout) > 100
    user = ["notes\n\n" + heldout[0] + "\n\n" + heldout[5]]
    kept = corpus.heldout_texts(user)
    assert heldout[0] not in kept and heldout[5] not in kept and len(kept) == len(heldout) - 2


def test_join_texts() -> None:
    sep = corpus.DOC_SEPARATOR
    assert corpus.join_texts(["aaaa", "bb", "cccccc", "d"], n=5, min_chars=6) == ["aaaa" + sep + "bb", "cccccc"]
    assert corpus.join_texts(["aaaa", "bb", "cccccc"], n=1, min_chars=6) == ["aaaa" + sep + "bb"]
    assert corpus.join_texts(["a"], n=3, min_chars=6) == []


def test_local_calibration_texts_are_deterministic_and_long_enough() -> None:
    a = corpus.local_calibration_texts(8, min_chars=4000)
    assert a == corpus.local_calibration_texts(8, min_chars=4000)
    assert len(a) == 8 and len(set(a)) == 8
    assert all(len(t) >= 4000 for t in a)
    train = corpus.stdlib_documents("train")
    assert a[0].startswith(train[0]) and a[-1] in corpus.DOC_SEPARATOR.join(train)  # the train split, in order
    with pytest.raises(ValueError):
        corpus.local_calibration_texts(0)


def test_load_calibration_files(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("plain text file\nwith two lines", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(
        '{"text": "first"}\nnot json\n{"other": 1}\n["text"]\n{"text": "  "}\n{"text": "zweite Zeile ü"}\n',
        encoding="utf-8",
    )
    assert corpus.load_calibration_files([tmp_path / "a.txt", str(tmp_path / "b.jsonl")]) == [
        "plain text file\nwith two lines",
        "first",
        "zweite Zeile ü",
    ]
    (tmp_path / "empty.txt").write_text("   \n", encoding="utf-8")
    with pytest.raises(ValueError, match="no calibration text"):
        corpus.load_calibration_files([tmp_path / "empty.txt"])
    with pytest.raises(FileNotFoundError):
        corpus.load_calibration_files([tmp_path / "missing.txt"])


def test_pipeline_calibration_is_files_first_then_the_train_split(tmp_path: Path) -> None:
    heldout = corpus.heldout_texts()
    local, desc = calibration_texts()
    assert local == corpus.stdlib_documents("train")
    assert desc["local_corpus"] == corpus.TRAIN_SOURCE and "train" in desc["local_corpus"]
    assert not set(heldout) & set(local)
    assert desc["texts_sha256"] == hashlib.sha256(json.dumps(local).encode()).hexdigest()

    (tmp_path / "mine.txt").write_text("my domain text", encoding="utf-8")
    texts, desc = calibration_texts([tmp_path / "mine.txt"])
    assert texts[0] == "my domain text" and texts[1:] == local
    assert desc["files"] == [{"path": str(tmp_path / "mine.txt"),
                              "sha256": hashlib.sha256(b"my domain text").hexdigest()}]  # fmt: skip
    only, desc = calibration_texts([tmp_path / "mine.txt"], local_corpus=False)
    assert only == ["my domain text"] and "local_corpus" not in desc


def test_pipeline_calibration_refusals(tmp_path: Path) -> None:
    with pytest.raises(Refused, match="no calibration text"):
        calibration_texts(local_corpus=False)
    with pytest.raises(Refused, match="calibration files"):
        calibration_texts([tmp_path / "missing.txt"])
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(Refused, match="calibration files"):
        calibration_texts([tmp_path / "latin1.txt"])
