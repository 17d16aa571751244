"""A mixing recipe through the real data job (``raylm data``, on the session cluster):
two pt sources curated together, tokenized, one downsampled and one upsampled to a
token budget; realised shares, per-source stats, the rows' source column and the
recipe in the manifest. Seed determinism (whatever the blocks) and capping:
tests/unit/test_data_mix.py, on the same block functions."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from raylm.data.tokenize import tokenize_pt
from raylm.runner import run_job
from raylm.tokenizer import load_tokenizer

VOCABULARY = (
    "river stone bread violin tide honey lantern copper meadow harbor thistle orbit "
    "glacier saddle pepper quartz willow ember falcon marble canyon velvet"
)


def _docs(name: str, n: int, rng: random.Random) -> list[str]:
    words = VOCABULARY.split()
    return [
        f"{name} document {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(20, 60)))
        for i in range(n)
    ]


@pytest.mark.timeout(300)
def test_mix_job_down_and_up_sampling(ray_connected, ray_cluster, tiny_model: Path, tmp_path):
    rng = random.Random(0)
    big, small = _docs("big", 150, rng), _docs("small", 30, rng)
    (tmp_path / "big").mkdir()
    (tmp_path / "small").mkdir()
    lines = {
        "big": [json.dumps({"text": t}) for t in [*big, big[3]]],  # one exact duplicate
        # a copy of a big document (big's is kept: first in id order) and a broken line
        "small": [json.dumps({"text": t}) for t in [*small, big[7]]] + ['{"text": '],
    }
    for name, rows in lines.items():
        (tmp_path / name / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
    tok = load_tokenizer(str(tiny_model))
    tokens = {
        n: [len(tokenize_pt(t, tok, 1024)["input_ids"]) for t in d]
        for n, d in (("big", big), ("small", small))
    }
    budget = sum(tokens["big"])  # half each: big x0.5, small x~2.5
    out = tmp_path / "out"
    cfg = {
        "format": "text",
        "mix": {
            "sources": {"big": [str(tmp_path / "big")], "small": [str(tmp_path / "small")]},
            "weights": {"big": 1, "small": 1},
            "target_tokens": budget,
            "seed": 3,
        },
        "dedup": {"fuzzy": False},
        "tokenize": {"enabled": True, "tokenizer": str(tiny_model), "cutoff_len": 1024},
        "output_dir": str(out),
        "ray": {"address": ray_cluster.gcs_address},
    }
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(cfg))
    assert run_job("data", [str(tmp_path / "mix.yaml")]) == 0

    stats = json.loads((out / "stats.json").read_text())
    assert stats["accounting_ok"] and stats["mix"]["accounting_ok"]
    assert stats["documents_out"] == 150 + 30  # curated, before sampling
    per = stats["mix"]["sources"]
    b, s = per["big"], per["small"]
    assert (b["documents_in"], b["duplicates"], b["quarantined"]) == (151, 1, 0)
    assert (s["documents_in"], s["duplicates"], s["quarantined"]) == (32, 1, 1)
    assert b["tokens_curated"] == sum(tokens["big"])  # tokens in, after curation
    assert s["tokens_curated"] == sum(tokens["small"])
    assert b["passes"] == 0 and b["repeats"] < 0.6  # downsampled
    assert s["passes"] == 2 and 2 < s["repeats"] < 3 and not s["capped"]  # upsampled
    # Realised shares: each source within one document of its half of the budget.
    largest = max(max(t) for t in tokens.values())
    for entry in (b, s):
        assert abs(entry["tokens_out"] - budget / 2) <= largest
        assert abs(entry["share_out"] - 0.5) <= largest / budget + 1e-9
    assert stats["tokens_out"] == b["tokens_out"] + s["tokens_out"]

    table = pa.concat_tables(pq.read_table(f) for f in sorted((out / "shards").glob("*.parquet")))
    assert table.num_rows == stats["rows_out"] == b["documents_out"] + s["documents_out"]
    by_source = Counter(table.column("source").to_pylist())
    assert by_source == {"big": b["documents_out"], "small": s["documents_out"]}
    ids = table.column("id").to_pylist()
    assert len(set(ids)) == len(ids) and any(i.endswith("#2") for i in ids)  # passes 0, 1, 2

    manifest = json.loads((out / "manifest.json").read_text())
    recipe = manifest["metrics"]["mix"]
    assert manifest["status"] == "succeeded" and manifest["output"]["rows"] == table.num_rows
    assert (recipe["unit"], recipe["target"], recipe["seed"]) == ("tokens", budget, 3)
    assert recipe["sources"]["small"]["weight"] == 1 and recipe["sources"]["big"]["share"] == 0.5
    assert recipe["sources"]["big"]["share_out"] == b["share_out"]
    meta = json.loads((out / "dataset_meta.json").read_text())
    assert meta["mix"] == recipe and meta["num_tokens"] == stats["tokens_out"]
