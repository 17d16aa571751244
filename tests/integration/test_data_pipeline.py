"""The data pipeline on a real local Ray cluster: accounting, quarantine, dedup, formats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylm.data import dedup, readers, rows, sources
from raylm.data.config import DataJobConfig, DedupConfig, FilterConfig
from raylm.data.corpus import SAMPLE_DIR
from raylm.data.dedup_apply import sort_key
from raylm.data.pipeline import run

LOOSE = FilterConfig(min_words=5, max_top_ngram_fraction=0.3, max_dup_ngram_fraction=0.3)


def _table(path: Path) -> pa.Table:
    files = sorted(path.glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else pa.table({})


def _jsonl(path: Path) -> list[dict]:
    return [
        json.loads(line)
        for f in sorted(path.glob("*.jsonl"))
        for line in f.read_text().splitlines()
    ]


def run_sample(out: Path, **overrides) -> dict:
    cfg = DataJobConfig(
        inputs=[str(SAMPLE_DIR / "pt.jsonl")],
        format="text",
        filters=LOOSE,
        output_dir=str(out),
        **overrides,
    )
    return run(cfg)


@pytest.mark.timeout(420)
def test_sample_corpus_accounting_quarantine_and_dedup(ray_connected, tmp_path: Path) -> None:
    stats = run_sample(tmp_path)
    lines = [line for line in (SAMPLE_DIR / "pt.jsonl").read_bytes().split(b"\n") if line.strip()]
    kept = _table(tmp_path / "shards")
    quarantine = _jsonl(tmp_path / "quarantine")
    removed = _table(tmp_path / "dedup")
    filtered = sum(stats["removed_by_filter"].values())
    # Every input line is in exactly one place: kept, quarantined, filtered or a dup.
    assert stats["documents_in"] == len(lines)
    assert len(lines) == kept.num_rows + len(quarantine) + filtered + removed.num_rows
    assert stats["accounting_ok"] and stats["documents_out"] == kept.num_rows
    # Each step's own counts: what it quarantined, filtered, or passed on to be signed.
    assert stats["steps"]["parse"]["quarantined"] == len(quarantine) == stats["quarantined"]
    assert stats["steps"]["filter"] == stats["removed_by_filter"]
    assert stats["steps"]["sign"]["signed"] == kept.num_rows + removed.num_rows
    ids = (
        kept.column("id").to_pylist()
        + [q["id"] for q in quarantine]
        + removed.column("id").to_pylist()
    )
    assert len(set(ids)) == len(ids)

    reasons = {q["id"]: q["reason"] for q in quarantine}
    assert len(reasons) == 5
    assert any(r.startswith("bad JSON") for r in reasons.values())
    assert any(r.startswith("undecodable bytes") for r in reasons.values())
    assert any("must be a string" in r for r in reasons.values())
    assert any("missing field 'text'" in r for r in reasons.values())
    assert all(q["raw"] for q in quarantine if "undecodable" not in q["reason"])

    # The 10 upper-cased, re-spaced copies (lines 121-130) are exact dups of lines 1-10.
    exact = {r["id"]: r["dup_of"] for r in removed.to_pylist() if r["method"] == "exact"}
    assert exact == {f"pt.jsonl:{120 + i}": f"pt.jsonl:{i}" for i in range(1, 11)}
    assert stats["pii_replacements"] == {
        "email": 2,
        "phone": 2,
        "ip": 2,
        "credit_card": 1,
        "cn_id": 1,
    }
    texts = " ".join(kept.column("text").to_pylist())
    assert "<EMAIL>" in texts and "jane.doe@example.org" not in texts


@pytest.mark.timeout(420)
def test_fuzzy_dedup_matches_exact_jaccard_on_known_pairs(ray_connected, tmp_path: Path) -> None:
    run_sample(tmp_path, dedup=DedupConfig(exact=False, threshold=0.8))
    docs = [
        json.loads(line)["text"]
        for line in (SAMPLE_DIR / "pt.jsonl").read_text(errors="replace").splitlines()[:145]
    ]
    kept = set(_table(tmp_path / "shards").column("id").to_pylist())
    fuzzy = {r["id"]: r["dup_of"] for r in _table(tmp_path / "dedup").to_pylist()}
    shingles = [dedup.shingle_hashes(d, 5) for d in docs]

    def jaccard(i: int, j: int) -> float:
        a, b = shingles[i], shingles[j]
        return len(np.intersect1d(a, b)) / len(np.union1d(a, b))

    checked = far = 0
    for k in range(15):  # lines 131-145 are edits of lines 11-25
        near, base = 130 + k, 10 + k
        j = jaccard(near, base)
        both = {f"pt.jsonl:{near + 1}", f"pt.jsonl:{base + 1}"} - set(fuzzy)
        if j >= 0.95:  # far above the 0.8 threshold: LSH misses it with p < 0.002
            assert len(both & kept) <= 1, (near, base, j)
            checked += 1
        elif j < 0.5:  # far below: a false merge has p < 0.002
            far += 1
            assert (
                f"pt.jsonl:{near + 1}" not in fuzzy
                or fuzzy[f"pt.jsonl:{near + 1}"] != f"pt.jsonl:{base + 1}"
            )
    assert checked >= 3 and far >= 5
    # Every removed doc points at a kept representative with a smaller id.
    assert all(rep in kept and sort_key(rep) < sort_key(dup) for dup, rep in fuzzy.items())


@pytest.mark.timeout(420)
def test_every_input_format(ray_connected, tmp_path: Path) -> None:
    records = [
        {"text": f"Document number {i} talks about {w} in plain words for testing."}
        for i, w in enumerate(["apples", "rivers", "engines", "clouds"])
    ]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records[:2]))
    (tmp_path / "in" / "b.json").write_text(json.dumps(records[2:3]))
    pq.write_table(pa.table({"text": [records[3]["text"]]}), tmp_path / "in" / "c.parquet")
    (tmp_path / "in" / "d.txt").write_text("A plain text line that is its own document here.\n")
    stats = run(
        DataJobConfig(inputs=[str(tmp_path / "in")], format="text", output_dir=str(tmp_path / "pt"))
    )
    assert stats["documents_in"] == stats["documents_out"] == 5
    assert sorted(_table(tmp_path / "pt" / "shards").column("id").to_pylist()) == [
        "a.jsonl:1",
        "a.jsonl:2",
        "b.json:#0",
        "c.parquet:#0",
        "d.txt:1",
    ]

    registry = f"{SAMPLE_DIR / 'dataset_info.json'}#license_alpaca,license_sharegpt"
    open_filters = FilterConfig(
        max_dup_line_fraction=1.0, max_top_ngram_fraction=1.0, max_dup_ngram_fraction=1.0
    )
    sft = run(
        DataJobConfig(inputs=[registry], filters=open_filters, output_dir=str(tmp_path / "sft"))
    )
    rows = _table(tmp_path / "sft" / "shards").to_pylist()
    assert (
        sft["kind"] == "sft" and sft["quarantined"] == 2 and len(rows) == sft["documents_out"] > 40
    )
    assert all(m["role"] in ("user", "assistant") for r in rows for m in r["messages"])

    dpo = run(
        DataJobConfig(
            inputs=[str(SAMPLE_DIR / "preference.jsonl")],
            format="preference",
            filters=open_filters,
            output_dir=str(tmp_path / "dpo"),
        )
    )
    pairs = _table(tmp_path / "dpo" / "shards")
    assert dpo["quarantined"] == 1 and set(pairs.column_names) == {
        "id",
        "prompt",
        "chosen",
        "rejected",
    }
    assert json.loads((tmp_path / "dpo" / "dataset_meta.json").read_text())["kind"] == "text"


@pytest.mark.timeout(300)
def test_read_dataset_splits_a_big_file_and_keeps_order(ray_connected, tmp_path: Path) -> None:
    big = tmp_path / "a_big.jsonl"
    lines = [json.dumps({"text": f"doc {i} " + "w" * (i % 300)}).encode() for i in range(14_000)]
    # CRLF endings, and a whitespace-only line after every fifth: numbered, never read.
    big.write_bytes(
        b"".join(line + (b"\r\n" if i % 5 else b"\n  \n") for i, line in enumerate(lines))
    )
    assert big.stat().st_size > 2 * readers.SPREAD_MIN_BYTES
    small = tmp_path / "b_small.json"
    small.write_text(json.dumps([{"text": "x"}, {"text": "y"}]))
    found = sources.expand_inputs([str(tmp_path)], "auto", {})
    ds = readers.read_dataset(found, "text", "line", 16.0).materialize()
    assert ds.num_blocks() > 2  # the big file alone is split (2 CPUs: >= 4 ranges)
    expected = [
        row
        for path in (big, small)
        for row in rows.read_file(
            {"path": str(path), "name": path.name, "fmt": "auto", "columns": "{}"}, "text", "line"
        )
    ]
    assert ds.take_all() == expected


def test_repeated_ids_in_id_column_fail_naming_them(ray_connected, tmp_path: Path) -> None:
    """Two documents sharing an id would be kept or dropped together by dedup's merge."""
    rows = [{"id": i, "text": f"Distinct document {w} number {i}."} for i, w in enumerate("abcd")]
    rows += [{"id": 2, "text": "Another document that reuses id two."}]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = DataJobConfig(
        inputs=[str(tmp_path / "in.jsonl")],
        format="text",
        id_column="id",
        output_dir=str(tmp_path / "out"),
    )
    with pytest.raises(ValueError, match=r"id_column='id' is not unique: 1 id\(s\) repeat.*'2' x2"):
        run(cfg)
