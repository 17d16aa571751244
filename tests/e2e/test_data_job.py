"""The data job as users run it: `jobs/data.py` on the cluster and `raylm submit`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _env(ray_cluster) -> dict[str, str]:
    return {**os.environ, "RAY_ADDRESS": ray_cluster.gcs_address}


@pytest.mark.timeout(420)
def test_pt_job_writes_packed_shards_the_train_job_can_read(
    ray_cluster, tiny_model, tmp_path: Path
) -> None:
    out = tmp_path / "pt"
    cmd = [
        sys.executable, "jobs/data.py", "conf/data/sample_pt.yaml", f"output_dir={out}",
        "tokenize.enabled=true", f"tokenize.tokenizer={tiny_model}", "tokenize.cutoff_len=128",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=ROOT, env=_env(ray_cluster), capture_output=True, text=True, timeout=280
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((out / "dataset_meta.json").read_text())
    assert meta | {"num_rows": 0, "num_tokens": 0} == {
        "kind": "pt", "task": "pt", "tokenized": True, "packed": True, "tokenizer": str(tiny_model),
        "template": None, "cutoff_len": 128, "num_rows": 0, "num_tokens": 0,
    }  # fmt: skip
    table = pa.concat_tables(
        pq.read_table(f) for f in sorted((out / "shards").glob("part-*.parquet"))
    )
    assert table.schema.field("input_ids").type == pa.list_(pa.int32())
    assert table.schema.field("loss_mask").type == pa.list_(pa.int8())
    assert table.schema.field("position_ids").type == pa.list_(pa.int32())
    assert table.schema.field("source_ids").type == pa.list_(pa.string())
    rows = table.to_pylist()
    assert (
        len(rows) == meta["num_rows"]
        and sum(len(r["input_ids"]) for r in rows) == meta["num_tokens"]
    )
    assert all(len(r["input_ids"]) <= 128 for r in rows)
    stats = json.loads((out / "stats.json").read_text())
    assert sum(len(r["source_ids"]) for r in rows) == stats["documents_out"]
    assert stats["accounting_ok"] and stats["tokens_out"] == meta["num_tokens"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "succeeded" and manifest["job"] == "data"
    assert all(h.startswith("sha256:") for h in manifest["inputs"].values())
    assert (out / "config.resolved.yaml").exists() and list((out / "quarantine").glob("*.jsonl"))
    assert manifest["output"]["tokenizer"] == str(tiny_model)
    assert manifest["output"]["cutoff_len"] == 128 and manifest["output"]["task"] == "pt"

    # A train job that believes another cutoff stops before it starts, naming both sides.
    train = [
        sys.executable, "jobs/train.py", "conf/train/pt_full.yaml", f"data.path={out}",
        f"model.name_or_path={tiny_model}", "data.cutoff_len=64",
        f"storage_path={tmp_path / 'train'}",
    ]  # fmt: skip
    proc = subprocess.run(
        train, cwd=ROOT, env=_env(ray_cluster), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"was tokenized with {tiny_model} (cutoff_len 128)" in proc.stderr
    assert "data.cutoff_len=64; re-run the data job with tokenize.cutoff_len=64" in proc.stderr


@pytest.mark.timeout(420)
def test_sft_job_via_raylm_submit(ray_cluster, tiny_model, tmp_path: Path) -> None:
    out = tmp_path / "sft"
    cmd = [
        sys.executable, "-m", "raylm.cli", "submit", "data", "conf/data/sample_sft.yaml",
        f"output_dir={out}", "tokenize.enabled=true", f"tokenize.tokenizer={tiny_model}",
        "--address", ray_cluster.dashboard_url,
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=ROOT, env=_env(ray_cluster), capture_output=True, text=True, timeout=280
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    table = pa.concat_tables(
        pq.read_table(f) for f in sorted((out / "shards").glob("part-*.parquet"))
    )
    assert {"id", "input_ids", "loss_mask", "position_ids"} <= set(table.column_names)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    row = table.slice(0, 1).to_pylist()[0]
    trained = tok.decode([i for i, m in zip(row["input_ids"], row["loss_mask"], strict=True) if m])
    assert trained.endswith("<|im_end|>") and "<|im_start|>" not in trained
    assert json.loads((out / "stats.json").read_text())["quarantined"] == 2


def test_bad_config_key_exits_2_naming_the_key(tmp_path: Path) -> None:
    cmd = [sys.executable, "jobs/data.py", "conf/data/sample_pt.yaml", "dedup.treshold=0.5"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "dedup.treshold" in proc.stderr and "threshold" in proc.stderr


@pytest.mark.timeout(600)
def test_pt_job_reads_and_writes_a_bucket(ray_cluster, tiny_model, s3_bucket: str) -> None:
    """Inputs (a glob) and output_dir on a real S3-compatible server: shards, stats,
    quarantine and manifest land in the bucket. A train job reading its data from a
    bucket, killed and resumed there, is tests/integration/test_train_resume.py's
    ``test_killed_job_resubmitted_with_same_run_name_continues_exactly``; that a bucket's
    path is read as shards or a raw file, tests/unit/test_train_data_stream.py."""
    from raylm import storage
    from raylm.data.corpus import SAMPLE_DIR
    from raylm.data.shards import ROW_GROUP_ROWS

    corpus, out = storage.join(s3_bucket, "e2e/corpus"), storage.join(s3_bucket, "e2e/pt")
    storage.write_bytes(f"{corpus}/pt.jsonl", (SAMPLE_DIR / "pt.jsonl").read_bytes())
    cmd = [
        sys.executable, "jobs/data.py", "conf/data/sample_pt.yaml", f"inputs=[{corpus}/*.jsonl]",
        f"output_dir={out}", "tokenize.enabled=true", f"tokenize.tokenizer={tiny_model}",
        "tokenize.cutoff_len=64",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=ROOT, env=_env(ray_cluster), capture_output=True, text=True, timeout=280
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads(storage.read_text(f"{out}/manifest.json"))
    assert manifest["status"] == "succeeded" and manifest["output"]["path"] == out
    assert manifest["inputs"][f"{corpus}/pt.jsonl"].startswith("listing:")
    stats = json.loads(storage.read_text(f"{out}/stats.json"))
    lines = [ln for ln in (SAMPLE_DIR / "pt.jsonl").read_bytes().split(b"\n") if ln.strip()]
    assert stats["accounting_ok"] and stats["documents_in"] == len(lines)
    removed = sum(stats["removed"].values())
    assert stats["documents_in"] == stats["documents_out"] + removed + stats["quarantined"]
    assert storage.listdir(f"{out}/quarantine") and storage.listdir(f"{out}/dedup")
    fs, root = storage.filesystem(f"{out}/shards")
    files = [pq.ParquetFile(f"{root}/{n}", filesystem=fs) for n in storage.listdir(f"{out}/shards")]
    assert (
        sum(f.metadata.num_rows for f in files) == stats["rows_out"] == manifest["output"]["rows"]
    )
    assert all(
        f.metadata.row_group(g).num_rows <= ROW_GROUP_ROWS
        for f in files
        for g in range(f.metadata.num_row_groups)
    )
