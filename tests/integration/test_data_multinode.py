"""A 2-node Ray cluster keeps exactly the documents a single node keeps."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raylm.data.config import DataJobConfig, FilterConfig
from raylm.data.corpus import SAMPLE_DIR
from raylm.data.pipeline import run


def _cfg(out: Path) -> DataJobConfig:
    return DataJobConfig(
        inputs=[str(SAMPLE_DIR / "pt.jsonl")],
        format="text",
        filters=FilterConfig(min_words=5, max_top_ngram_fraction=0.3, max_dup_ngram_fraction=0.3),
        output_dir=str(out),
    )


def _result(out: Path) -> tuple[set[str], set[tuple[str, str, str]]]:
    kept = set(pq.read_table(out / "shards").column("id").to_pylist())
    removed = {
        (r["id"], r["dup_of"], r["method"]) for r in pq.read_table(out / "dedup").to_pylist()
    }
    return kept, removed


@pytest.mark.timeout(420)
def test_two_nodes_keep_the_same_set_as_one(ray_cluster, tmp_path: Path, monkeypatch) -> None:
    import ray
    from ray.cluster_utils import Cluster

    ray.init(address=ray_cluster.gcs_address)
    try:
        single = run(_cfg(tmp_path / "one"))
    finally:
        ray.shutdown()

    monkeypatch.delenv(
        "RAY_ADDRESS", raising=False
    )  # the new cluster must not join the session one
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        assert sum(1 for n in ray.nodes() if n["Alive"]) == 2
        multi = run(_cfg(tmp_path / "two"))
    finally:
        ray.shutdown()
        cluster.shutdown()

    assert _result(tmp_path / "one") == _result(tmp_path / "two")
    assert single["fuzzy_dups"] > 0 and single["exact_dups"] > 0
    drop = ("filter_examples", "seconds")  # wall times differ run to run
    assert {k: v for k, v in single.items() if k not in drop} == {
        k: v for k, v in multi.items() if k not in drop
    }
