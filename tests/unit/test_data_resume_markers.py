"""The data job's completion markers without Ray: which blocks a rerun may reuse.

A block is reused only when its marker exists and its fingerprint matches: the same
config, file bytes (size and mtime) and byte range. A block written without its marker
(a job killed between the two writes) is redone, and a changed config or input makes
every marker stale rather than silently mixing old rows into the new run.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pyarrow as pa

from raylm.data import resume
from raylm.data.config import DataJobConfig, FilterConfig
from raylm.data.readers import ReadSpec
from raylm.data.sources import Source
from raylm.data.steps import PROCESSED_SCHEMA


def _corpus(tmp_path: Path) -> Path:
    path = tmp_path / "a.jsonl"
    docs = [{"text": f"document {i} about rivers and hills"} for i in range(6)]
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def _specs(path: Path) -> list[ReadSpec]:
    src = Source(str(path), path.name, "text").for_task()
    data = path.read_bytes()
    cut = len(b"".join(data.splitlines(keepends=True)[:3]))  # lines 1-3, then 4-6
    return [ReadSpec(src, 0, cut, 1), ReadSpec(src, cut, path.stat().st_size, 4)]


def _blocks(path: Path, cfg: DataJobConfig) -> list[resume.Block]:
    return resume.plan_blocks(_specs(path), resume.config_fingerprint(cfg, "pt"))


def test_fingerprint_follows_config_bytes_and_range_but_not_output_dir(tmp_path: Path) -> None:
    path = _corpus(tmp_path)
    cfg = DataJobConfig(inputs=[str(path)], format="text", output_dir=str(tmp_path / "o1"))
    first = _blocks(path, cfg)
    assert len({b.id for b in first}) == 2 and len({b.fingerprint for b in first}) == 2
    moved = dataclasses.replace(cfg, output_dir=str(tmp_path / "o2"))
    assert _blocks(path, moved) == first
    stricter = dataclasses.replace(cfg, filters=FilterConfig(min_words=3))
    assert [b.id for b in _blocks(path, stricter)] == [b.id for b in first]
    assert not {b.fingerprint for b in _blocks(path, stricter)} & {b.fingerprint for b in first}
    assert resume.config_fingerprint(cfg, "sft") != resume.config_fingerprint(cfg, "pt")
    other = dataclasses.replace(_specs(path)[0], src={**_specs(path)[0].src, "columns": "{}x"})
    assert resume.plan_blocks([other], "c")[0].id != first[0].id  # same bytes, read otherwise
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten, same size
    assert not {b.fingerprint for b in _blocks(path, cfg)} & {b.fingerprint for b in first}
    assert resume.file_identity(str(tmp_path / "gone.jsonl")) == "missing"


def test_markers_decide_reuse_and_stale_ones_are_reported(tmp_path: Path) -> None:
    path = _corpus(tmp_path)
    out = str(tmp_path / "out")
    cfg = DataJobConfig(inputs=[str(path)], format="text", output_dir=out)
    blocks = _blocks(path, cfg)
    store = resume.Store(out)
    table, counts = resume.run_block(blocks[0], cfg, "pt", store, pause=0)
    assert table.schema == PROCESSED_SCHEMA and counts["parse"]["documents"] == 3
    assert store.load(blocks[0].id) == table
    # Block 1 killed after writing its rows, before its marker: not complete.
    store.save(blocks[1], table, counts)
    os.remove(store.marker(blocks[1].id))
    done, stale = store.completed(blocks)
    assert set(done) == {blocks[0].id} and stale == []
    assert done[blocks[0].id]["counts"] == counts and done[blocks[0].id]["rows"] == 3

    changed = _blocks(path, dataclasses.replace(cfg, filters=FilterConfig(min_words=3)))
    done, stale = store.completed(changed)
    assert done == {} and stale == [blocks[0].id]
    store.clear()
    assert not (tmp_path / "out" / resume.RESUME_DIR).exists()


def test_the_read_plan_spread_is_fixed_by_the_first_run(tmp_path: Path) -> None:
    store = resume.Store(str(tmp_path))
    assert store.spread(lambda: 4) == 4
    assert store.spread(lambda: 16) == 4  # the cluster grew; the blocks stay the same


def test_an_empty_table_round_trips(tmp_path: Path) -> None:
    path = _corpus(tmp_path)
    cfg = DataJobConfig(inputs=[str(path)], format="text", output_dir=str(tmp_path))
    block = _blocks(path, cfg)[0]
    store = resume.Store(str(tmp_path))
    empty = pa.Table.from_pylist([], schema=PROCESSED_SCHEMA)
    store.save(block, empty, {})
    assert store.load(block.id) == empty
    assert store.completed([block])[0][block.id]["rows"] == 0


def test_markers_and_blocks_in_a_bucket(s3_bucket: str) -> None:
    """An output dir on object storage keeps its markers there: written whole (one PUT),
    found by listing, loaded, cleared; an input in the bucket is identified by its
    listing's size and mtime."""
    from raylm import storage

    corpus = storage.join(s3_bucket, "resume/in/a.jsonl")
    storage.write_text(corpus, '{"text": "one two three"}\n{"text": "four five six"}\n')
    src = Source(corpus, "a.jsonl", "text").for_task()
    out = storage.join(s3_bucket, "resume/out")
    cfg = DataJobConfig(inputs=[corpus], format="text", output_dir=out)
    block = resume.plan_blocks([ReadSpec(src)], resume.config_fingerprint(cfg, "pt"))[0]
    assert resume.file_identity(corpus).startswith("52:")
    store = resume.Store(out)
    table, counts = resume.run_block(block, cfg, "pt", store, pause=0)
    done, stale = store.completed([block])
    assert list(done) == [block.id] and stale == [] and store.load(block.id) == table
    assert done[block.id]["counts"] == counts and table.num_rows == 2
    store.clear()
    assert storage.listdir(out) == []
