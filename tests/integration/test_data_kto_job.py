"""LLaMA-Factory's kto_en_demo through the data job (its dataset_info.json registry, kind
kto), then a short stage-kto run on those shards: nothing quarantined, every record
accounted for, and the shards' KL pairs let KTO train at micro batch size 1."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylm.config import load
from raylm.runner import run_job
from raylm.train.report import read_metrics
from raylm.train.trainer import run_training

ROOT = Path(__file__).resolve().parents[2]
CUTOFF = 1024  # the tiny BPE tokenizer needs ~4 tokens a word: longer prompts are cut


def _answer(ids: list[int], mask: list[int]) -> list[int]:
    start = next((t for t, m in enumerate(mask) if m), len(mask))
    return ids[start:]


@pytest.mark.timeout(300)
def test_kto_demo_shards_then_kto_training(ray_connected, ray_cluster, tiny_model: Path, tmp_path):
    out = tmp_path / "kto_data"
    argv = [str(ROOT / "conf/data/sample_kto.yaml"), f"output_dir={out}",
            "tokenize.enabled=true", f"tokenize.tokenizer={tiny_model}",
            "tokenize.template=qwen3_nothink", f"tokenize.cutoff_len={CUTOFF}",
            "dedup.fuzzy=false",  # the label-aware fuzzy keys: tests/unit/test_data_kto_tools.py
            f"ray.address={ray_cluster.gcs_address}"]  # fmt: skip
    assert run_job("data", argv) == 0

    stats = json.loads((out / "stats.json").read_text())
    records = json.loads((ROOT / "tests/assets/llamafactory/data/kto_en_demo.json").read_text())
    assert stats["kind"] == "kto" and stats["quarantined"] == 0
    assert stats["documents_in"] == len(records) == 300
    assert stats["accounting_ok"] and stats["documents_in"] == (
        stats["documents_out"] + sum(stats["removed"].values()) + stats["quarantined"]
    )
    # Removed only for control characters (3 records), or where the cutoff left no answer.
    assert stats["removed"]["filter:control_ratio"] == 3 and stats["documents_out"] >= 230
    assert set(stats["removed"]) == {"filter:control_ratio", "exact_dup", "fuzzy_dup",
                                     "no_trainable_tokens"}, stats["removed"]  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "succeeded" and manifest["output"]["task"] == "kto"
    meta = json.loads((out / "dataset_meta.json").read_text())
    assert meta["task"] == "kto" and not meta["packed"]

    table = pa.concat_tables(
        pq.read_table(f) for f in sorted((out / "shards").glob("part-*.parquet"))
    )
    assert table.num_rows == stats["rows_out"] == stats["documents_out"]
    assert table.schema.field("kto_label").type == pa.bool_()
    assert table.schema.field("kl_input_ids").type == pa.list_(pa.int32())
    rows = table.to_pylist()
    labels = [r["kto_label"] for r in rows]
    assert 0.4 < sum(labels) / len(labels) < 0.6  # the demo is half good, half bad
    answers = {tuple(_answer(r["input_ids"], r["loss_mask"])) for r in rows}
    for r in rows:  # each KL row: the row's own prompt, then another row's answer
        start = len(r["input_ids"]) - len(_answer(r["input_ids"], r["loss_mask"]))
        assert r["kl_input_ids"][:start] == r["input_ids"][:start]
        assert tuple(r["kl_input_ids"][start:]) in answers or len(r["kl_input_ids"]) == CUTOFF

    where = [f"model.name_or_path={tiny_model}", f"storage_path={tmp_path}", "run_name=kto"]
    cfg = load("train", [ROOT / "conf/train/dpo_lora.yaml"], [*where, "stage=kto",
               f"data.path={out}", "model.template=qwen3_nothink", f"data.cutoff_len={CUTOFF}",
               "scaling.num_workers=1", "train.max_steps=2", "train.micro_batch_size=1",
               "checkpoint.save_steps=2"])  # fmt: skip
    run = Path(run_training(cfg)["run_dir"])
    metrics = read_metrics(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    # Policy == reference at step 1: every log-ratio and the KL estimate are 0.
    assert metrics[0]["loss"] == pytest.approx(0.5, abs=1e-5)
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert (run / "final/adapter_model.safetensors").exists()
