"""Applying dedup's verdicts: the kept documents and one removal record per removed id.

``raylm.data.dedup`` finds duplicates from ids, hashes and signatures only: no text
travels through its shuffles. Applying the verdicts shuffles only the removal records
(one per removed id is kept); each processed block then drops its removed ids where it
lies, so the corpus's text is never moved or held by a reduce task, and the job's peak
memory no longer grows with the text a shuffle partition gathers (docs/data.md,
"Memory"). Ids are made sortable first (``sort_key``), so a cluster's representative,
its smallest id, is its first occurrence in the input (line 9 before line 10).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute

from raylm.data import dedup, simhash
from raylm.data.blocks import combine, map_blocks, shuffle_blocks, unique_values
from raylm.data.config import DataJobConfig

REMOVAL_SCHEMA = pa.schema([("id", pa.string()), ("dup_of", pa.string()), ("method", pa.string())])


def _one_per_id(df: pd.DataFrame) -> pd.DataFrame:
    """A document found by both passes keeps one record: exact before fuzzy."""
    return df.sort_values(["id", "method"]).drop_duplicates("id")


_SEP = "\x00"


def sort_key(ident: str) -> str:
    """``a.jsonl:9`` sorts before ``a.jsonl:10``; the id itself follows, so keys stay unique."""
    return re.sub(r"\d+", lambda m: m.group().zfill(12), ident) + _SEP + ident


def _with_sort_keys(batch: pa.Table) -> pa.Table:
    keys = [sort_key(i) for i in batch.column("id").to_pylist()]
    return batch.set_column(batch.schema.get_field_index("id"), "id", pa.array(keys, pa.string()))


def _strip_sort_keys(batch: pa.Table) -> pa.Table:
    for name in ("id", "dup_of"):
        if name in batch.column_names:
            plain = [k.rpartition(_SEP)[2] for k in batch.column(name).to_pylist()]
            batch = batch.set_column(
                batch.schema.get_field_index(name), name, pa.array(plain, pa.string())
            )
    return batch


def _dedup_input(table: pa.Table) -> pa.Table:
    """Kept rows only, with what dedup needs (never the text) and ids made sortable."""
    kept = table.filter(pa.compute.equal(table.column("status"), ""))
    return _with_sort_keys(kept.select(["id", "exact_hash", "sig", "shingles"]))


def _removal_records(table: pa.Table) -> pa.Table:
    """Resolved removal records with original ids, typed (an empty partition has none)."""
    if table.num_rows == 0:
        return REMOVAL_SCHEMA.empty_table()
    return _strip_sort_keys(table.select(REMOVAL_SCHEMA.names)).cast(REMOVAL_SCHEMA)


def _kept_docs(table: pa.Table, removed: pa.Array | None = None) -> pa.Table:
    """This block's documents that passed every step and whose id is not ``removed``."""
    kept = table.filter(pa.compute.equal(table.column("status"), "")).select(["id", "doc"])
    if removed is not None and len(removed) and kept.num_rows:
        ids = kept.column("id")
        gone = pa.compute.is_in(ids, value_set=removed.cast(ids.type))
        kept = kept.filter(pa.compute.invert(gone))
    return kept


def apply_dedup(
    processed: Any, cfg: DataJobConfig, cache: Any = None
) -> tuple[Any, Any | None, dict[str, Any]]:
    """(kept docs, removal records or None, dedup info) as Datasets.

    The representative of a cluster is its smallest id in natural order (line 9 before
    line 10), so the first occurrence in the input is the one kept. Every step is a
    plain Ray task over block refs: a Ray Data execution costs ~0.5 s of start-up on a
    small cluster, and dedup has a dozen steps. ``cache`` (``raylm.data.resume``) hands
    back the removal records of a killed run of the same job, or saves them. The kept
    documents stay in the processed blocks they were read into, in input order.
    """
    import ray

    blocks = processed.to_arrow_refs()
    removals, info = _cached_removals(map_blocks(blocks, _dedup_input), cfg, cache)
    if not removals:
        return ray.data.from_arrow_refs(map_blocks(blocks, _kept_docs)), None, info
    records = map_blocks(shuffle_blocks(removals, "id", _one_per_id), _removal_records)
    removed = combine(records, unique_values("id"))
    docs = ray.data.from_arrow_refs(map_blocks(blocks, _kept_docs, removed))
    return docs, ray.data.from_arrow_refs(records), info


def _cached_removals(refs: list, cfg: DataJobConfig, cache: Any) -> tuple[list, dict[str, Any]]:
    """The removal records: from ``cache`` if it has them, else found (and saved there)."""
    found = cache.load() if cache is not None else None
    if found is not None:
        return found
    if cfg.id_column:
        _check_unique_ids(refs, cfg.id_column)
    removals, info = _removals(refs, cfg)
    if cache is not None:
        cache.save(removals, info)
    return removals, info


def _repeated(df: pd.DataFrame) -> pd.DataFrame:
    counts = df["id"].value_counts()
    return pd.DataFrame({"id": counts.index[counts > 1], "n": counts[counts > 1].to_numpy()})


def _check_unique_ids(refs: list, id_column: str) -> None:
    """Dedup, the merge and the removal audit key on ids: two documents sharing one would
    be kept or dropped together. Fail naming the ids instead of guessing."""
    import ray

    parts = ray.get(
        map_blocks(shuffle_blocks(refs, "id", _repeated, ["id"]), lambda t: t.to_pylist())
    )
    repeated = [r for part in parts for r in part]
    if repeated:
        examples = sorted(f"{r['id'].rpartition(_SEP)[2]!r} x{r['n']}" for r in repeated)[:5]
        raise ValueError(
            f"id_column={id_column!r} is not unique: {len(repeated)} id(s) repeat "
            f"(e.g. {', '.join(examples)}); fix the data, or set id_column=null to use "
            "file:line ids"
        )


def _removals(refs: list, cfg: DataJobConfig) -> tuple[list, dict[str, Any]]:
    """Blocks of removal records (exact, then fuzzy) and what the fuzzy pass did."""
    info: dict[str, Any] = {}
    removals = dedup.exact_duplicates(refs) if cfg.dedup.exact else []
    if cfg.dedup.fuzzy and cfg.dedup.method == "simhash":
        d = cfg.dedup
        info.update(method="simhash", hamming=d.hamming, simhash_blocks=d.simhash_blocks)
        fuzzy, rounds = simhash.simhash_duplicates(refs, d.hamming, d.simhash_blocks, d.max_rounds)
        info["cc_rounds"] = rounds
        removals += fuzzy
    elif cfg.dedup.fuzzy:
        bands, rows = cfg.dedup.bands, cfg.dedup.rows
        if bands is None or rows is None:
            bands, rows = dedup.optimal_bands_rows(
                cfg.dedup.threshold, cfg.dedup.num_perm, cfg.dedup.false_positive_weight
            )
        info.update(bands=bands, rows=rows, threshold=cfg.dedup.threshold)
        verify = cfg.dedup.threshold if cfg.dedup.verify else None
        fuzzy, rounds = dedup.fuzzy_duplicates(refs, bands, rows, cfg.dedup.max_rounds, verify)
        info["cc_rounds"] = rounds
        removals += fuzzy
    return removals, info


def method_counts(removed: Any) -> dict[str, int]:
    import ray

    def count(table: pa.Table) -> dict[str, int]:
        if "method" not in table.column_names:  # an empty block may carry no schema
            return {}
        return dict(Counter(table.column("method").to_pylist()))

    total: Counter[str] = Counter()
    for part in ray.get([ray.remote(count).remote(r) for r in removed.to_arrow_refs()]):
        total.update(part)
    return dict(total)
