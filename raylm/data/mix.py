"""Mixing recipes: several weighted sources sampled to a token (or byte) budget.

Every source is read and curated with the others in the one pipeline (one reader, the
same steps and dedup; a document duplicated across sources is kept once, in the source
of its first occurrence, as dedup keeps any duplicate). Then each source's curated
documents are sampled to ``share * budget`` units, ``share`` being its weight over the
weights' sum:

- the source's ratio ``r = share * budget / curated units`` (capped at
  ``mix.max_repeats``; a capped source is reported and falls short of its share);
- ``floor(r)`` whole passes over its documents (epochs: every document once per pass),
  then one partial pass taking documents in the order of a seeded hash of (source, id),
  a seeded random order, until ``(r - floor(r)) * curated units`` are taken: drawing
  without replacement to a budget. Downsampling is the partial pass alone.

Where the partial pass stops is found without collecting anything on the driver: each
block sends a histogram of units over the top 12 bits of the hash (4096 buckets), the
bucket that crosses the budget is split the same way on the next 12 bits, and the pass
takes every document whose hash is below the boundary closest to the budget. The
realised partial pass is within half of one 24-bit bucket's units of the budget: a
single document or none until a source has millions of them. Passes are written one
after the other (repeats of a document never sit side by side), each output row keeps
its id (``id#k`` for the k-th repeat) and names its ``source``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raylm.config import ConfigError
from raylm.data.config import MixConfig
from raylm.data.sources import Source, expand_inputs
from raylm.data.steps import strings_of

log = logging.getLogger(__name__)

BITS = 12
"""Bits of the hash per histogram level (4096 buckets)."""

_TOP = 64 - BITS
_NEXT = 64 - 2 * BITS
_ALL = 1 << 64
_LABELLED = pa.schema([("id", pa.string()), ("doc", pa.string()), ("source", pa.string())])


def mix_sources(
    mix: MixConfig, fmt: str, columns: dict[str, str]
) -> tuple[list[Source], dict[str, str]]:
    """Every mix source's files as one list of ``Source`` (short names unique across
    sources) and file short name -> mix source; a file in two sources is refused."""
    pairs: list[tuple[str, Source]] = []
    owner_of: dict[str, str] = {}
    for name, inputs in mix.sources.items():
        for src in expand_inputs(inputs, fmt, columns):
            if src.path in owner_of:
                raise ConfigError(
                    f"{src.path} is in mix.sources.{owner_of[src.path]} and "
                    f"mix.sources.{name}; a file belongs to one source"
                )
            owner_of[src.path] = name
            pairs.append((name, src))
    names = [s.name for _, s in pairs]
    if len(set(names)) != len(names):  # ids must stay unique across inputs
        pairs = [(n, Source(s.path, s.path, s.fmt, s.columns, s.dataset)) for n, s in pairs]
    return [s for _, s in pairs], {s.name: n for n, s in pairs}


# ---- per block (plain Ray tasks; also callable in-process) -----------------------------


def curation_block(table: pa.Table, owner: dict[str, str]) -> tuple[pa.Table, dict]:
    """A processed block -> (kept rows' ``id`` and ``source``, per-source counts of
    documents and bytes in, quarantined, filtered and kept). The ``source`` column of a
    processed row is its file:line; the file names the mix source."""
    sources = [owner[s.rpartition(":")[0]] for s in table.column("source").to_pylist()]
    counts: dict[str, Counter[str]] = {}
    statuses = table.column("status").to_pylist()
    for name, status, nbytes in zip(
        sources, statuses, table.column("nbytes").to_pylist(), strict=True
    ):
        c = counts.setdefault(name, Counter())
        c.update(documents_in=1, bytes_in=nbytes)
        c[status.partition(":")[0] or "passed"] += 1
    kept = pa.array([i for i, status in enumerate(statuses) if not status], pa.int64())
    labels = pa.table(
        {
            "id": table.column("id").take(kept),
            "source": pa.array([sources[i] for i in kept.to_pylist()], pa.string()),
        }
    )
    return labels, {k: dict(v) for k, v in counts.items()}


def join_source(df: Any) -> Any:
    """Shuffle reduce: the kept documents (id, doc) with their source from the labels."""
    for name in ("doc", "source"):  # all pieces empty: only the first's columns
        if name not in df:
            df[name] = None
    docs = df[df["doc"].notna()][["id", "doc"]]
    labels = df[df["source"].notna()][["id", "source"]]
    joined = docs.merge(labels, on="id", how="left")
    if joined["source"].isna().any():
        raise RuntimeError(f"documents without a source: {joined[joined.source.isna()].id[:3]}")
    return joined


def doc_hashes(ids: list[str], sources: list[str], seed: int) -> np.ndarray:
    """A uint64 per document from (seed, source, id): the seeded order of the partial pass."""
    key = str(seed).encode()[:64]
    out = np.empty(len(ids), dtype=np.uint64)
    for i, (ident, src) in enumerate(zip(ids, sources, strict=True)):
        digest = hashlib.blake2b(f"{src}\0{ident}".encode(), digest_size=8, key=key).digest()
        out[i] = int.from_bytes(digest, "little")
    return out


def text_bytes(docs: list[str]) -> list[int]:
    """UTF-8 bytes of each document's text (conversations: every content, joined)."""
    return [len(strings_of(json.loads(d)).encode()) for d in docs]


def measure_block(
    table: pa.Table, tokenize: Any, unit: str, seed: int, min_loss: int
) -> tuple[pa.Table, dict]:
    """Labelled documents -> (the kept ones with ``units`` and ``hash`` columns, tokenized
    when ``tokenize`` is given; per-source documents / units / no_trainable_tokens).
    Examples with fewer than ``min_loss`` trainable tokens are dropped and counted, as
    the writer does for a job without a mix."""
    table = table.select(["id", "doc", "source"]).cast(_LABELLED)  # an empty block: nulls
    sources = table.column("source")
    units = text_bytes(table.column("doc").to_pylist()) if unit == "bytes" else None
    out = tokenize(table.select(["id", "doc"])) if tokenize else table.select(["id", "doc"])
    if units is None:
        units = out.column("n_tokens").to_pylist()
    hashes = doc_hashes(out.column("id").to_pylist(), sources.to_pylist(), seed)
    out = out.append_column("source", sources)
    out = out.append_column("units", pa.array(units, pa.int64()))
    out = out.append_column("hash", pa.array(hashes, pa.uint64()))
    counts: dict[str, Counter[str]] = {}
    if tokenize:
        good = pc.greater_equal(out.column("n_loss"), min_loss)
        for name, ok in zip(sources.to_pylist(), good.to_pylist(), strict=True):
            counts.setdefault(name, Counter())["no_trainable_tokens"] += not ok
        out = out.filter(good)
    for name, n in zip(
        out.column("source").to_pylist(), out.column("units").to_pylist(), strict=True
    ):
        c = counts.setdefault(name, Counter())
        c.update(documents=1, units=n)
    return out, {k: dict(v) for k, v in counts.items()}


def hist_block(table: pa.Table, buckets: dict[str, int | None]) -> dict[str, np.ndarray]:
    """Units per hash bucket for each source in ``buckets``: over the top ``BITS`` bits
    of the hash (value None), or over the next ``BITS`` bits inside that top bucket."""
    hashes = table.column("hash").to_numpy()
    units = table.column("units").to_numpy()
    sources = np.asarray(table.column("source").to_pylist(), dtype=object)
    out = {}
    for name, top in buckets.items():
        h, u = hashes[sources == name], units[sources == name]
        keys = h >> np.uint64(_TOP)
        if top is not None:
            inside = keys == np.uint64(top)
            keys, u = (h[inside] >> np.uint64(_NEXT)) & np.uint64((1 << BITS) - 1), u[inside]
        out[name] = np.bincount(keys.astype(np.int64), u, minlength=1 << BITS).astype(np.int64)
    return out


def below(hashes: np.ndarray, threshold: int) -> np.ndarray:
    """Which hashes are below ``threshold`` (0 .. 2**64)."""
    if threshold >= _ALL:
        return np.ones(len(hashes), dtype=bool)
    return hashes < np.uint64(threshold)


def select_block(
    table: pa.Table, k: int, plans: dict[str, tuple[int, int]]
) -> tuple[pa.Table, dict]:
    """Pass ``k`` over a block: a source's documents if ``k`` < its whole passes, those
    hashed below its threshold if ``k`` is its partial pass; ids get ``#k`` from the
    second pass on. Returns the rows and per-source documents / units taken."""
    hashes = table.column("hash").to_numpy()
    sources = np.asarray(table.column("source").to_pylist(), dtype=object)
    take = np.zeros(table.num_rows, dtype=bool)
    for name, (passes, threshold) in plans.items():
        mine = sources == name
        if k < passes:
            take |= mine
        elif k == passes and threshold:
            take |= mine & below(hashes, threshold)
    out = table.filter(pa.array(take))
    if k:
        ids = pa.array([f"{i}#{k}" for i in out.column("id").to_pylist()], pa.string())
        out = out.set_column(out.schema.get_field_index("id"), "id", ids)
    counts: dict[str, Counter[str]] = {}
    for name, n in zip(
        out.column("source").to_pylist(), out.column("units").to_pylist(), strict=True
    ):
        counts.setdefault(name, Counter()).update(documents=1, units=n)
    return out, {name: dict(c) for name, c in counts.items()}


# ---- the plan (driver: per-source totals and histograms only) --------------------------


@dataclass
class SourcePlan:
    """How one source is sampled."""

    share: float
    """Its weight over the weights' sum."""

    target: int
    """share * budget, in units."""

    documents: int
    """Curated documents (after filters, dedup and the trainable-token check)."""

    units: int
    """Their units (tokens or bytes)."""

    want: int
    """Units to write: the target, or max_repeats * units when that is less."""

    capped: bool
    """The target needs more than max_repeats passes (or the source has nothing left)."""

    passes: int
    """Whole passes over the documents."""

    partial: int
    """Units wanted from the partial pass (want - passes * units)."""

    threshold: int = 0
    """The partial pass takes documents whose hash is below this (0: no partial pass)."""


def plan_sources(mix: MixConfig, totals: dict[str, dict[str, int]]) -> dict[str, SourcePlan]:
    """Whole passes and the partial pass's units of every source, in integers."""
    plans = {}
    for name, share in mix.shares().items():
        docs, units = (totals.get(name, {}).get(k, 0) for k in ("documents", "units"))
        target = round(share * mix.target)
        want = target
        if mix.max_repeats is not None:
            want = min(want, math.floor(mix.max_repeats * units))
        want = want if units else 0
        passes = want // units if units else 0
        plans[name] = SourcePlan(
            share, target, docs, units, want, want < target, passes, want - passes * units
        )
    return plans


def boundary(hist: np.ndarray, want: int) -> tuple[int, int]:
    """(first bucket whose cumulative units reach ``want``, units in the buckets before)."""
    cum = np.cumsum(hist)
    bucket = min(int(np.searchsorted(cum, want, side="left")), len(hist) - 1)
    return bucket, int(cum[bucket - 1]) if bucket else 0


def closest_cut(hist: np.ndarray, want: int) -> int:
    """How many of the buckets to take so their units are closest to ``want``."""
    cum = np.concatenate([[0], np.cumsum(hist)])
    return int(np.argmin(np.abs(cum - want)))


def set_thresholds(plans: dict[str, SourcePlan], histograms: Any) -> None:
    """Each partial pass's hash threshold; ``histograms(buckets)`` sums ``hist_block``
    over all blocks (two calls, each small: 4096 counts per source)."""
    partial = {n: p for n, p in plans.items() if p.partial}
    if not partial:
        return
    top = histograms(dict.fromkeys(partial))
    cut = {n: boundary(top[n], p.partial) for n, p in partial.items()}
    inner = histograms({n: b for n, (b, _) in cut.items()})
    for name, plan in partial.items():
        bucket, before = cut[name]
        plan.threshold = (bucket << _TOP) + (
            closest_cut(inner[name], plan.partial - before) << _NEXT
        )


def sum_counts(parts: list[dict[str, dict[str, int]]]) -> dict[str, dict[str, int]]:
    total: dict[str, Counter[str]] = {}
    for part in parts:
        for name, counts in part.items():
            total.setdefault(name, Counter()).update(counts)
    return {name: dict(c) for name, c in total.items()}


def sum_hists(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    total: dict[str, np.ndarray] = {}
    for part in parts:
        for name, hist in part.items():
            total[name] = total[name] + hist if name in total else hist
    return total


# ---- on the cluster ----------------------------------------------------------------------


@dataclass
class Sampled:
    """What ``sample`` returns: the rows to write and the counts stats.json reports."""

    rows: Any
    """The mixed rows (a Ray Dataset; None when nothing is taken)."""

    curation: dict[str, dict[str, int]]
    """Per source: documents/bytes in, quarantined, filtered, passed (the filters)."""

    curated: dict[str, dict[str, int]]
    """Per source after dedup: documents, units, no_trainable_tokens."""

    plans: dict[str, SourcePlan]
    """How each source was sampled."""

    passes: list[dict[str, dict[str, int]]]
    """Per pass, per source: documents and units taken."""


def sample(docs: Any, processed: Any, cfg: Any, owner: dict[str, str]) -> Sampled:
    """Label the deduplicated ``docs`` with their source (one shuffle by id against the
    processed rows), measure and hash them, plan every source and take its passes. The
    driver sees per-source counts and 4096-bucket histograms, never documents."""
    import ray

    from raylm.data import shards
    from raylm.data.blocks import map_blocks, shuffle_blocks

    owner_ref = ray.put(owner)
    pairs = map_blocks(processed.to_arrow_refs(), curation_block, owner_ref, num_returns=2)
    labels = [labels for labels, _ in pairs]
    curation = sum_counts(ray.get([counts for _, counts in pairs]))
    joined = shuffle_blocks(docs.to_arrow_refs() + labels, "id", join_source)
    tok = cfg.tokenize
    tokenize = shards.tokenize_batch(cfg) if tok.enabled else None
    args = (tokenize, cfg.mix.unit, cfg.mix.seed, tok.min_loss_tokens)
    measured = map_blocks(joined, measure_block, *args, num_returns=2)
    kept = [block for block, _ in measured]
    curated = sum_counts(ray.get([counts for _, counts in measured]))
    plans = plan_sources(cfg.mix, curated)

    def histograms(buckets: dict[str, int | None]) -> dict[str, np.ndarray]:
        return sum_hists(ray.get(map_blocks(kept, hist_block, buckets)))

    set_thresholds(plans, histograms)
    spec = {name: (p.passes, p.threshold) for name, p in plans.items()}
    n_passes = max((p.passes + bool(p.threshold) for p in plans.values()), default=0)
    blocks, passes = [], []
    for k in range(n_passes):
        taken = map_blocks(kept, select_block, k, spec, num_returns=2)
        counts = ray.get([counts for _, counts in taken])
        blocks += [block for (block, _), c in zip(taken, counts, strict=True) if c]
        passes.append(sum_counts(counts))
    rows = ray.data.from_arrow_refs(blocks) if blocks else None
    return Sampled(rows, curation, curated, plans, passes)


def _with_source(fn: Any) -> Any:
    """A ``raylm.data.shards`` batch function whose rows keep the batch's ``source``
    (one row per input row), or, packed, get ``sources`` aligned with ``source_ids``."""

    def wrapped(batch: pa.Table) -> pa.Table:
        result = fn(batch)
        if "source_ids" in result.column_names:
            ids, names = batch.column("id").to_pylist(), batch.column("source").to_pylist()
            owner = dict(zip(ids, names, strict=True))
            packed = [[owner[i] for i in row] for row in result.column("source_ids").to_pylist()]
            return result.append_column("sources", pa.array(packed, pa.list_(pa.string())))
        if "source" not in result.column_names:
            result = result.append_column("source", batch.column("source"))
        return result

    return wrapped


def write_mixed(rows: Any, cfg: Any, kind: str, out: str, recipe: dict) -> dict[str, int]:
    """shards/ and dataset_meta.json through ``raylm.data.shards``' writers (its layout
    and keys, plus ``mix``: the recipe) from the mixed rows; returns rows and tokens."""
    from raylm.data import shards

    num_rows = num_tokens = 0
    if rows is not None:
        if cfg.tokenize.enabled:
            rows = shards.shaped(rows, cfg, kind, wrap=_with_source)
        else:
            records = _with_source(shards.records_batch(kind))
            rows = rows.map_batches(records, batch_format="pyarrow")
        rows = rows.materialize()
        num_rows = rows.count()
        if cfg.tokenize.enabled and num_rows:
            num_tokens = int(rows.sum("n_tokens") or 0)
        helpers = ("n_loss", "n_tokens", "units", "hash")
        rows = rows.drop_columns([c for c in helpers if c in rows.columns()])
    shards.write_rows(rows, num_rows, out)
    shards.write_meta(cfg, kind, out, num_rows, num_tokens, mix=recipe)
    return {"rows_out": num_rows, "tokens_out": num_tokens}
