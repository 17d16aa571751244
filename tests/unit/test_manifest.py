"""Lineage hashes must change exactly when content changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raylm.manifest import Manifest, hash_path


def test_file_and_directory_hashes_track_content(tmp_path: Path) -> None:
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("alpha")
    (d / "sub" / "b.txt").write_text("beta")
    first = hash_path(d)
    assert hash_path(d) == first
    assert hash_path(d / "a.txt") != hash_path(d / "sub" / "b.txt")
    (d / "sub" / "b.txt").write_text("beta!")
    assert hash_path(d) != first
    (d / "sub" / "b.txt").write_text("beta")
    (d / "sub" / "b.txt").rename(d / "sub" / "c.txt")  # same bytes, other name
    assert hash_path(d) != first


def test_manifest_of_a_directory_is_not_part_of_its_hash(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("x")
    before = hash_path(tmp_path)
    Manifest(job="data", config={}).write(tmp_path)
    assert hash_path(tmp_path) == before


def test_missing_input_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        hash_path(tmp_path / "nope")


def test_manifest_round_trip_and_fingerprint(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a"}\n')
    m = Manifest.start("data", {"threshold": 0.8}, inputs=[str(src)])
    m.finish({"shards": "out/shards"}, {"docs_out": 1}).write(tmp_path / "out")
    record = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert record["status"] == "succeeded" and record["fingerprint"] == m.fingerprint()
    again = Manifest.read(tmp_path / "out")
    assert again is not None and again.fingerprint() == m.fingerprint()
    assert Manifest.start("data", {"threshold": 0.9}, [str(src)]).fingerprint() != m.fingerprint()
    src.write_text('{"text": "b"}\n')
    assert Manifest.start("data", {"threshold": 0.8}, [str(src)]).fingerprint() != m.fingerprint()
