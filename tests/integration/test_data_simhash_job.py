"""dedup.method: simhash through the real data job: a near-identical copy is removed as
a fuzzy duplicate of the first occurrence, distinct documents are kept."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylm.data.config import DataJobConfig, DedupConfig, FilterConfig
from raylm.data.pipeline import run


@pytest.mark.timeout(300)
def test_simhash_job(ray_connected, tmp_path: Path) -> None:
    rng = random.Random(0)
    vocab = [f"word{i}" for i in range(3000)]
    docs = [" ".join(rng.choice(vocab) for _ in range(600)) for _ in range(6)]
    edited = docs[2].split()
    edited[300] = "changed"
    docs.append(" ".join(edited))
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = DataJobConfig(
        inputs=[str(src)],
        format="text",
        filters=FilterConfig(enabled=False),
        dedup=DedupConfig(method="simhash"),
        output_dir=str(tmp_path / "out"),
    )
    stats = run(cfg)
    assert stats["accounting_ok"]
    assert stats["fuzzy_dups"] == 1 and stats["dedup"]["method"] == "simhash"
    removed = pq.read_table(next((tmp_path / "out" / "dedup").glob("*.parquet"))).to_pylist()
    assert [(r["id"], r["dup_of"]) for r in removed] == [("in.jsonl:7", "in.jsonl:3")]
    files = sorted((tmp_path / "out" / "shards").glob("*.parquet"))
    assert pa.concat_tables([pq.read_table(f) for f in files]).num_rows == 6
