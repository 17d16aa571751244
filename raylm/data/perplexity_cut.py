"""The perplexity filter's cut: the highest-perplexity share of the corpus removed.

A percentile needs every document's score, so this runs on the driver once every block
is processed (scores are computed in the blocks, ``raylm.data.perplexity``): each block
sends back its kept documents' perplexities (8 bytes a document), the driver takes the
``max_percentile``-th percentile, and each block marks the documents above it
``filter:perplexity``. A removed document thus leaves through the filters' count, and
the job's accounting identity holds. The threshold is a function of the blocks, so a
resumed job, which reloads the same blocks, cuts at the same place.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raylm.data.blocks import map_blocks
from raylm.data.config import DataJobConfig
from raylm.data.steps import FILTER

REASON = "perplexity"
STATUS = f"{FILTER}:{REASON}"
RECORDS = "perplexity"
"""``<output_dir>/perplexity/``: one record (id, source, perplexity) per removed document."""


def threshold(scores: np.ndarray, max_percentile: float) -> float | None:
    """The ``max_percentile``-th percentile of the scores (linear interpolation, numpy's
    default), or None for no scores. 100 is the largest score (nothing above it); 0 the
    smallest (only the documents tied at it stay)."""
    if scores.size == 0:
        return None
    return float(np.percentile(scores, max_percentile))


def above(scores: np.ndarray, cut: float | None) -> np.ndarray:
    """Which scores are removed: strictly above the cut, so ties at it are all kept
    (never split by an arbitrary order); NaN (unscored) never is."""
    if cut is None:
        return np.zeros(scores.shape, dtype=bool)
    return scores > cut


def kept_scores(table: pa.Table) -> np.ndarray:
    """The scored perplexities of a block's kept documents (a block task's body)."""
    scored = pc.and_(pc.equal(table.column("status"), ""), pc.is_valid(table.column("perplexity")))
    return table.column("perplexity").filter(scored).to_numpy(zero_copy_only=False)


def mark_block(table: pa.Table, cut: float | None) -> tuple[pa.Table, int]:
    """The block with its kept documents above ``cut`` marked ``filter:perplexity``,
    and how many were."""
    status = table.column("status").to_pylist()
    values = table.column("perplexity").to_numpy(zero_copy_only=False).astype(np.float64)
    drop = above(np.nan_to_num(values, nan=-np.inf), cut)
    hits = [i for i, (s, d) in enumerate(zip(status, drop, strict=True)) if d and not s]
    for i in hits:
        status[i] = STATUS
    index = table.schema.get_field_index("status")
    return table.set_column(index, "status", pa.array(status, pa.string())), len(hits)


def apply(processed: Any, cfg: DataJobConfig, counts: dict[str, Any]) -> tuple[Any, dict]:
    """The processed Dataset with the cut applied; ``counts['filter']`` gains the removed
    documents; returns stats.json's ``perplexity`` (threshold, counts, spread)."""
    import ray

    opts = cfg.filters.perplexity
    refs = processed.to_arrow_refs()
    parts = ray.get(map_blocks(refs, kept_scores))
    scores = np.concatenate(parts) if parts else np.empty(0)
    cut = threshold(scores, opts.max_percentile)
    pairs = map_blocks(refs, mark_block, cut, num_returns=2)
    removed = int(sum(ray.get([n for _, n in pairs])))
    counts["filter"][REASON] += removed
    info = {
        "model": opts.model,
        "max_percentile": opts.max_percentile,
        "max_tokens": opts.max_tokens,
        "threshold": cut,
        "scored": int(scores.size),
        "unscored": int(counts["perplexity"].get("unscored", 0)),
        "removed": removed,
        "percentiles": _spread(scores),
    }
    return ray.data.from_arrow_refs([block for block, _ in pairs]), info


def _spread(scores: np.ndarray) -> dict[str, float]:
    """A few percentiles of the scores, to choose ``max_percentile`` by."""
    if not scores.size:
        return {}
    qs = (1, 10, 25, 50, 75, 90, 99)
    return {f"p{q}": round(float(v), 3) for q, v in zip(qs, np.percentile(scores, qs), strict=True)}


def write_records(processed: Any, out: str) -> None:
    """``perplexity/``: each removed document's id, source and perplexity (the dedup
    audit's counterpart), to judge the cut by."""
    from ray.data.expressions import col

    from raylm.data.shards import PartNames, _target

    removed = processed.filter(expr=col("status") == STATUS)
    removed.select_columns(["id", "source", "perplexity"]).write_parquet(
        **_target(out, RECORDS), filename_provider=PartNames("parquet")
    )
