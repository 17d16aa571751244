"""Boilerplate lines (or paragraphs) cut across documents, as C4 and RefinedWeb do.

Two passes of plain Ray tasks over the processed blocks (see ``raylm.data.blocks``):

1. every kept document's distinct units (stripped lines or paragraphs) are hashed to
   64 bits, and a shuffle by hash counts the documents holding each one; only hashes
   travel, never text, and only the frequent ones (more than ``max_docs`` documents)
   come back, as one sorted array;
2. each block cuts those units from its documents and signs the changed documents
   again (exact hash, MinHash), so dedup compares what is kept. A document left
   shorter than ``min_doc_chars`` gets status ``filter:line_dedup``: counted among the
   filters' removals, so the job's accounting identity still holds.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute

from raylm.data import steps
from raylm.data.blocks import map_blocks, shuffle_blocks
from raylm.data.config import DataJobConfig, LineDedupConfig

REASON = "line_dedup"
_PARAGRAPH = re.compile(r"\n[ \t\r\f\v]*\n")


def split_units(text: str, unit: str) -> list[str]:
    """The text's lines or paragraphs, unstripped (joining them back gives the text)."""
    return text.split("\n") if unit == "line" else _PARAGRAPH.split(text)


def _join(pieces: list[str], unit: str) -> str:
    return "\n".join(pieces) if unit == "line" else "\n\n".join(pieces)


def unit_hashes(units: list[str], min_chars: int) -> np.ndarray:
    """64-bit hashes of the stripped units; 0 for those too short to cut (never counted).
    pandas' SipHash with its fixed key: equal on every node."""
    keys = np.array([u.strip() for u in units], dtype=object)
    hashes = pd.util.hash_array(keys, categorize=False) if len(keys) else np.empty(0, np.uint64)
    short = np.array([len(k) < max(min_chars, 1) for k in keys], dtype=bool)
    hashes[short] = 0
    return hashes


def _text(doc: str) -> str:
    return json.loads(doc)["text"]


def _kept(table: pa.Table) -> pa.Table:
    return table.filter(pa.compute.equal(table.column("status"), ""))


def _block_units(docs: list[str | None], cfg: LineDedupConfig):
    """Every given document's units and their hashes, hashed in one call for the block
    (per-document numpy calls would cost more than the hashing); None docs are skipped."""
    units = [split_units(_text(d), cfg.unit) if d is not None else [] for d in docs]
    counts = np.array([len(u) for u in units], dtype=np.int64)
    hashes = unit_hashes([u for us in units for u in us], cfg.min_chars)
    return units, np.split(hashes, np.cumsum(counts)[:-1]) if len(counts) else []


def _doc_keys(cfg: LineDedupConfig):
    """Each kept document's distinct unit hashes, one row each (a document counts once)."""

    def fn(table: pa.Table) -> pa.Table:
        _, per_doc = _block_units(_kept(table).column("doc").to_pylist(), cfg)
        parts = [np.unique(h) for h in per_doc]
        flat = np.concatenate(parts) if parts else np.empty(0, np.uint64)
        return pa.table({"key": flat[flat != 0].view(np.int64)})

    return fn


def _frequent(max_docs: int):
    def fn(df: pd.DataFrame) -> pd.DataFrame:
        counts = df["key"].value_counts()
        return pd.DataFrame({"key": counts.index[counts > max_docs].to_numpy(np.int64)})

    return fn


def frequent_units(refs: list, cfg: LineDedupConfig) -> np.ndarray:
    """Sorted uint64 hashes of the units in more than ``max_docs`` documents."""
    import ray

    parts = shuffle_blocks(map_blocks(refs, _doc_keys(cfg)), "key", _frequent(cfg.max_docs))
    tables = [t for t in ray.get(parts) if t.num_rows]
    if not tables:
        return np.empty(0, np.uint64)
    return np.sort(pa.concat_tables(tables).column("key").to_numpy().view(np.uint64))


_CHANGED = ("status", "doc", "exact_hash", "sig", "shingles")
"""The columns ``cut_block`` may change; the others (raw text above all) stay Arrow."""


def cut_block(
    table: pa.Table, frequent: np.ndarray, cfg: DataJobConfig
) -> tuple[pa.Table, dict[str, int]]:
    """Cut the frequent units from the block's kept documents and re-sign the changed
    ones; documents left too short are marked ``filter:line_dedup``."""
    opts = cfg.line_dedup
    stats: Counter[str] = Counter()
    if not len(frequent) or not table.num_rows:
        return table, dict(stats)
    cols = {name: table.column(name).to_pylist() for name in _CHANGED}
    changed: list[dict[str, Any]] = []
    docs = [None if st else d for st, d in zip(cols["status"], cols["doc"], strict=True)]
    all_units, all_hashes = _block_units(docs, opts)
    flat = np.concatenate(all_hashes) if all_hashes else np.empty(0, np.uint64)
    all_drops = np.split(
        np.isin(flat, frequent) & (flat != 0), np.cumsum([len(h) for h in all_hashes])[:-1]
    )
    for i, (units, drop) in enumerate(zip(all_units, all_drops, strict=True)):
        if not drop.any():
            continue
        payload = json.loads(cols["doc"][i])
        stats["units_removed"] += int(drop.sum())
        text = _join([u for u, d in zip(units, drop, strict=True) if not d], opts.unit)
        if len(text.strip()) < opts.min_doc_chars:
            cols["status"][i] = f"{steps.FILTER}:{REASON}"
            stats["documents_emptied"] += 1
            continue
        stats["documents_changed"] += 1
        payload = {**payload, "text": text}
        cols["doc"][i] = json.dumps(payload, ensure_ascii=False)
        changed.append({"i": i, steps._PAYLOAD: payload, steps._TEXT: steps.dedup_text(payload)})
    steps.Sign(cfg).run(changed)
    for row in changed:
        for name in ("exact_hash", "sig", "shingles"):
            cols[name][row["i"]] = row.get(name, cols[name][row["i"]])
    for name, values in cols.items():
        index = table.schema.get_field_index(name)
        table = table.set_column(index, name, pa.array(values, table.schema.field(name).type))
    return table, dict(stats)


def apply(processed: Any, cfg: DataJobConfig, counts: dict[str, Counter[str]]) -> Any:
    """The processed Dataset with boilerplate cut; ``counts`` gains ``line_dedup`` (units
    removed, documents changed or emptied) and the emptied ones under ``filter``."""
    import ray

    refs = processed.to_arrow_refs()
    found = frequent_units(refs, cfg.line_dedup)
    frequent = ray.put(found)
    pairs = map_blocks(refs, cut_block, frequent, cfg, num_returns=2)
    total: Counter[str] = Counter(units_frequent=0, units_removed=0, documents_emptied=0)
    for part in ray.get([s for _, s in pairs]):
        total.update(part)
    total["units_frequent"] = len(found)
    counts["line_dedup"] = total
    counts["filter"][REASON] += total["documents_emptied"]
    return ray.data.from_arrow_refs([block for block, _ in pairs])


def frequent_units_local(table: pa.Table, max_docs: int) -> np.ndarray:
    """``frequent_units`` of one block without Ray: for tests and small inputs."""
    cfg = LineDedupConfig(max_docs=max_docs)
    keys = _doc_keys(cfg)(table).to_pandas()
    return np.sort(_frequent(max_docs)(keys)["key"].to_numpy().view(np.uint64))
