"""Line/paragraph dedup's block work (no Ray): which units are cut, what is re-signed,
and which documents are left too short."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from raylm.config import ConfigError
from raylm.data import dedup, line_dedup, steps
from raylm.data.config import DataJobConfig, FilterConfig, LineDedupConfig

FOOTER = "Copyright 2024 Example Corp. All rights reserved. Cookie policy."


def _cfg(**line) -> DataJobConfig:
    return DataJobConfig(
        inputs=["x.jsonl"],
        format="text",
        filters=FilterConfig(enabled=False),
        line_dedup=LineDedupConfig(enabled=True, **line),
    )


def _block(texts: list[str], cfg: DataJobConfig) -> pa.Table:
    raw = [
        {
            "id": f"x.jsonl:{i}",
            "source": "x.jsonl",
            "raw": json.dumps({"text": t}),
            "nbytes": len(t),
            "fmt": "text",
            "columns": "{}",
            "error": "",
        }
        for i, t in enumerate(texts, 1)
    ]
    table, _ = steps.process_block(pa.Table.from_pylist(raw), cfg, "pt")
    return table


def test_units_split_and_join_back() -> None:
    text = "a\n\nb  \n \nc\nd"
    assert line_dedup.split_units(text, "line") == ["a", "", "b  ", " ", "c", "d"]
    assert line_dedup.split_units(text, "paragraph") == ["a", "b  ", "c\nd"]
    hashes = line_dedup.unit_hashes(["same ", " same", "x", ""], min_chars=2)
    assert hashes[0] == hashes[1] != 0 and hashes[2] == hashes[3] == 0


def test_cut_block_removes_frequent_lines_and_resigns() -> None:
    cfg = _cfg()
    body = "An article about rivers and the fish that live in them, long enough."
    texts = [f"{body} {i}\n{FOOTER}" for i in range(3)] + [FOOTER, f"{body} only"]
    block = _block(texts, cfg)
    frequent = line_dedup.frequent_units_local(block, cfg.line_dedup.max_docs - 1)
    out, stats = line_dedup.cut_block(block, frequent, cfg)
    rows = out.to_pylist()
    assert stats == {"units_removed": 4, "documents_changed": 3, "documents_emptied": 1}
    assert [json.loads(r["doc"])["text"] for r in rows[:3]] == [f"{body} {i}" for i in range(3)]
    assert rows[3]["status"] == "filter:line_dedup"
    assert rows[4] == block.to_pylist()[4]  # untouched: no frequent line
    assert rows[0]["exact_hash"] == dedup.exact_hash(f"{body} 0")
    want = dedup.signatures([f"{body} 0"], cfg.dedup.num_perm, cfg.dedup.ngram, cfg.dedup.seed)
    assert np.frombuffer(rows[0]["sig"], np.uint32).tolist() == want[0].tolist()


def test_paragraph_unit_and_min_chars() -> None:
    cfg = _cfg(unit="paragraph", min_chars=100)
    texts = [f"Story {i} about a long walk by the sea.\n\n{FOOTER}" for i in range(5)]
    block = _block(texts, cfg)
    frequent = line_dedup.frequent_units_local(block, 3)
    out, stats = line_dedup.cut_block(block, frequent, cfg)
    assert stats == {}  # the footer is shorter than min_chars: never cut
    cfg = _cfg(unit="paragraph")
    out, stats = line_dedup.cut_block(block, line_dedup.frequent_units_local(block, 3), cfg)
    assert stats["units_removed"] == 5
    assert json.loads(out.to_pylist()[0]["doc"])["text"] == "Story 0 about a long walk by the sea."


def test_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="paragraph"):
        LineDedupConfig(unit="paragraphs")
    with pytest.raises(ConfigError, match="max_docs"):
        LineDedupConfig(max_docs=0)
