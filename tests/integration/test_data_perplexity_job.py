"""The perplexity filter through the real data job on the shared Ray cluster.

The tiny model is random, so which text it finds likely is not known in advance: the
test scores every document itself (one unpadded forward pass each, outside Ray), takes
the percentile over the documents that pass the other filters, and checks the job
removed exactly those above it, across two input files (two blocks: a per-block cut
would differ), kept the near misses just below it, recorded each removal with its
perplexity, and kept the accounting identity with a quarantined line, a filtered
document and a duplicate in the corpus.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylm.data.config import DataJobConfig, DedupConfig, FilterConfig, PerplexityConfig
from raylm.data.pipeline import run

TOPICS = ["rivers", "mountains", "bread", "violins", "tides", "bees", "maps", "clocks"]
PERCENTILE = 70.0


def _corpus() -> list[dict]:
    rng = random.Random(7)
    docs = [
        {"id": f"prose-{i}", "text": f"A short note about {t}, where they are found and why."}
        for i, t in enumerate(TOPICS)
    ]
    for i in range(8):  # letter soup that passes the heuristic filters
        words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=5)) for _ in range(9)]
        docs.append({"id": f"soup-{i}", "text": " ".join(words)})
    docs.append({"id": "dup-0", "text": docs[0]["text"]})  # an exact duplicate of prose-0
    docs.append({"id": "short-0", "text": "two words"})  # filtered by min_words first
    return docs


def _hand_perplexity(model_dir: Path, texts: list[str]) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for text in texts:
        ids = torch.tensor([[tok.bos_token_id, *tok(text, add_special_tokens=False).input_ids]])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].double()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="mean")
        out.append(math.exp(nll.item()))
    return out


def _parquet(path: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in sorted(path.glob("*.parquet"))])


@pytest.mark.timeout(300)
def test_perplexity_filter_cuts_at_the_corpus_percentile(
    ray_connected, tiny_model: Path, tmp_path: Path
) -> None:
    docs = _corpus()
    half = len(docs) // 2
    for name, part in (("a.jsonl", docs[:half]), ("b.jsonl", docs[half:])):
        lines = [json.dumps(d) for d in part] + (["{not json"] if name == "b.jsonl" else [])
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    filters = FilterConfig(
        min_words=3,
        perplexity=PerplexityConfig(model=str(tiny_model), max_percentile=PERCENTILE, batch_size=4),
    )
    cfg = DataJobConfig(
        inputs=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")],
        format="text",
        id_column="id",
        filters=filters,
        dedup=DedupConfig(fuzzy=False),
        output_dir=str(tmp_path / "out"),
    )
    stats = run(cfg)

    judged = [d for d in docs if d["id"] != "short-0"]  # what passes the other filters
    scores = _hand_perplexity(tiny_model, [d["text"] for d in judged])
    hand = {d["id"]: v for d, v in zip(judged, scores, strict=True)}
    cut = float(np.percentile(list(hand.values()), PERCENTILE))
    assert min(abs(v - cut) for v in hand.values()) > 1e-4 * cut  # no score on the edge
    expected = {i for i, v in hand.items() if v > cut}
    near_miss = max((v, i) for i, v in hand.items() if v <= cut)[1]
    assert 3 <= len(expected) <= 7

    info = stats["perplexity"]
    assert info["threshold"] == pytest.approx(cut, rel=1e-5)
    assert info["scored"] == len(judged) and info["removed"] == len(expected)
    assert stats["removed"]["filter:perplexity"] == len(expected)
    records = _parquet(tmp_path / "out" / "perplexity").to_pylist()
    assert {r["id"] for r in records} == expected
    for r in records:
        assert r["perplexity"] == pytest.approx(hand[r["id"]], rel=1e-5)
    examples = stats["filter_examples"]["perplexity"]
    assert examples and all(e["perplexity"] > cut for e in examples)

    kept = set(_parquet(tmp_path / "out" / "shards").column("text").to_pylist())
    text = {d["id"]: d["text"] for d in docs}
    assert all(text[e["id"]][:20] in e["text"] for e in examples)  # shown, though not raw
    assert near_miss not in expected and text[near_miss] in kept
    assert not {text[i] for i in expected} & kept
    assert stats["removed"]["filter:min_words"] == 1 and stats["quarantined"] == 1
    assert stats["documents_in"] == len(docs) + 1 and stats["accounting_ok"]
    dups = stats["removed"]["exact_dup"]
    assert dups == (0 if "prose-0" in expected else 1)
    assert stats["documents_out"] == len(judged) - len(expected) - dups == len(kept)
