"""Line dedup through the real data job: boilerplate cut, emptied documents counted,
the accounting identity kept, and dedup comparing what is left."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylm.data.config import DataJobConfig, DedupConfig, FilterConfig, LineDedupConfig
from raylm.data.pipeline import run

FOOTER = "Copyright 2024 Example Corp. All rights reserved. Read our cookie policy."
NAV = "Home | News | Sport | Weather | Contact"
TOPICS = ["rivers", "mountains", "bread", "violins", "tides", "bees"]


@pytest.mark.timeout(300)
def test_line_dedup_job(ray_connected, tmp_path: Path) -> None:
    docs = [
        f"{NAV}\nA long article about {t}, how they came to be and why people care.\n{FOOTER}"
        for t in TOPICS
    ]
    docs.append(f"{NAV}\n{FOOTER}")  # nothing but boilerplate: emptied
    # Differs from the first only by boilerplate: after the cut, an exact duplicate.
    docs.append(f"A long article about {TOPICS[0]}, how they came to be and why people care.")
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = DataJobConfig(
        inputs=[str(src)],
        format="text",
        filters=FilterConfig(min_words=3),
        line_dedup=LineDedupConfig(enabled=True, max_docs=3),
        dedup=DedupConfig(fuzzy=False),
        output_dir=str(tmp_path / "out"),
    )
    stats = run(cfg)
    assert stats["accounting_ok"]
    assert stats["removed"]["filter:line_dedup"] == 1
    assert stats["removed"]["exact_dup"] == 1
    assert stats["steps"]["line_dedup"] == {
        "units_frequent": 2,
        "units_removed": 14,
        "documents_changed": 6,
        "documents_emptied": 1,
    }
    files = sorted((tmp_path / "out" / "shards").glob("*.parquet"))
    texts = pa.concat_tables([pq.read_table(f) for f in files]).column("text").to_pylist()
    assert len(texts) == len(TOPICS) == stats["documents_out"]
    assert not any(FOOTER in t or NAV in t for t in texts)
