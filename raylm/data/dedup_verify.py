"""Exact-Jaccard verification of LSH candidate pairs, with bounded memory per pair.

Shipping each source document's whole shingle set onto every candidate edge (as the
first version did) costs edges x set size: a 60 KB licence copied 30 times is ~500
candidate pairs of ~10,000 shingles each, held at once by one task. Instead every
document travels as a bottom-k sketch (its ``SKETCH_SIZE`` smallest shingle hashes, or
its whole set when that is no larger), and a pair is decided in two passes:

1. From the sketches. Two whole sets give the exact Jaccard. Otherwise the bottom-k of
   the union is a uniform sample of it, so the share of that sample in both sets
   estimates Jaccard with standard error sqrt(J(1-J)/k) (0.0125 at J = 0.8, k = 1024);
   a pair further than ``MARGIN`` (4 standard errors) from the threshold is decided.
2. The few pairs within ``MARGIN`` are decided exactly from the whole sets of just
   their documents (a second, much smaller round of the same two shuffles).

Each round is two shuffles (``meet``): documents meet their edges at the source id, then
the source's sketch travels to the target's partition once per partition, not once per
edge (a document in a bucket of 32 has 31 edges, and its 8 KB sketch on each was most of
the 3 GB benchmark's peak), and each pair is decided where its target lies.

Short documents (up to ``SKETCH_SIZE`` shingles, ~1,000 words) are always exact in the
first pass. Every step is keyed by document id and deterministic, so the verdicts do
not depend on partitioning.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute

from raylm.data.blocks import (
    combine,
    map_blocks,
    num_rows,
    partition_of,
    partitions,
    shuffle_blocks,
    unique_values,
)

SKETCH_SIZE = 1024
"""Shingle hashes kept per document for the first pass (8 KB)."""

MARGIN = 0.05
"""Estimates this close to the threshold are checked exactly (4 standard errors at 0.8)."""

_DOC, _EDGE, _COPY = 3, 1, 2
_SURE, _UNSURE = 1, 0


def sketch(shingles: np.ndarray, k: int = SKETCH_SIZE) -> np.ndarray:
    """The whole set if it has at most ``k`` hashes; else its ``k`` smallest, sorted,
    followed by the set's size (length ``k + 1`` marks a sketch)."""
    if len(shingles) <= k:
        return shingles
    low = np.sort(np.partition(shingles, k - 1)[:k])
    return np.append(low, np.uint64(len(shingles)))


def sketch_jaccard(a: np.ndarray, b: np.ndarray, k: int = SKETCH_SIZE) -> tuple[float, bool]:
    """(Jaccard, exact?) of two ``sketch`` outputs: exact for two whole sets, else the
    bottom-k estimate, or the exact upper bound min/max size when that is lower."""
    if len(a) <= k and len(b) <= k:
        inter = len(np.intersect1d(a, b, assume_unique=True))
        union = len(a) + len(b) - inter
        return (inter / union if union else 0.0), True
    (sa, na), (sb, nb) = (_parts(x, k) for x in (a, b))
    bound = min(na, nb) / max(na, nb)
    union = np.union1d(sa, sb)[:k]
    both = np.intersect1d(sa, sb, assume_unique=True)
    # every common hash up to the union sample's largest is in the sample
    est = int(np.searchsorted(both, union[-1], side="right")) / len(union)
    return min(est, bound), False


def _parts(x: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    return (x[:k], int(x[k])) if len(x) > k else (x, len(x))


def _sketch_blobs(column: pa.ChunkedArray, k: int) -> pa.Array:
    """Sketches of a column of shingle-set blobs; blobs of up to ``k`` hashes as they are."""
    long = pa.compute.greater(pa.compute.binary_length(column), 8 * k).to_numpy(
        zero_copy_only=False
    )
    if not long.any():
        return column
    blobs = column.to_pylist()
    for i in np.flatnonzero(long):
        blobs[i] = sketch(np.frombuffer(blobs[i], dtype=np.uint64), k).tobytes()
    return pa.array(blobs, pa.binary())


def _doc_rows(k: int | None):
    """Documents as verification rows: id, and their sketch (or whole set if k is None)."""

    def fn(table: pa.Table, wanted: pa.Array | None = None) -> pa.Table:
        if wanted is not None:  # only the documents of candidate or undecided pairs
            wanted = wanted.cast(table["id"].type)
            table = table.filter(pa.compute.is_in(table["id"], value_set=wanted))
        blobs = table["shingles"] if k is None else _sketch_blobs(table["shingles"], k)
        n = table.num_rows
        return pa.table(
            {
                "key": table["id"],
                "kind": pa.array(np.full(n, _DOC, dtype=np.int64)),
                "other": pa.array([""] * n, pa.string()),
                "blob": blobs,
            }
        )

    return fn


def _verify_inputs(kind: int, key: str, other: str | None, blob: str | None):
    """Rows of the two verification shuffles from a block of documents or of edges."""

    def fn(table: pa.Table) -> pa.Table:
        n = table.num_rows
        return pa.table(
            {
                "key": table.column(key),
                "kind": pa.array(np.full(n, kind, dtype=np.int64)),
                "other": table.column(other) if other else pa.array([""] * n, pa.string()),
                "blob": table.column(blob) if blob else pa.array([b""] * n, pa.binary()),
            }
        )

    return fn


def document_rows(key: str, blob: str):
    """A block of documents as :func:`meet`'s document rows: the ``key`` column names
    each one, the ``blob`` column is what ``check`` compares (simhash's fingerprints)."""
    return _verify_inputs(_DOC, key, None, blob)


def _verify_attach(parts: int):
    """At each edge's source: re-key the edge by its target, and send the source's blob
    once to each partition (of ``parts``) its targets lie in, keyed by one of them."""

    def fn(df: pd.DataFrame) -> pd.DataFrame:
        docs = df[df["kind"] == _DOC]
        blobs = dict(zip(docs["key"], docs["blob"], strict=True))
        edges = df[df["kind"] == _EDGE]
        targets, sources = edges["other"].to_numpy(), edges["key"].to_numpy()
        moved = pd.DataFrame({"key": targets, "kind": _EDGE, "other": sources, "blob": b""})
        where = pd.DataFrame({"src": sources, "part": partition_of(targets, parts),
                              "dst": targets}).drop_duplicates(["src", "part"])  # fmt: skip
        copies = pd.DataFrame(
            {
                "key": where["dst"].to_numpy(),
                "kind": _COPY,
                "other": where["src"].to_numpy(),
                "blob": [blobs.get(k, b"") for k in where["src"]],
            }
        )
        return pd.concat([docs, moved, copies], ignore_index=True)

    return fn


def pair_blobs(df: pd.DataFrame) -> tuple[pd.DataFrame, dict, dict]:
    """A target partition's edges (``key`` the target, ``other`` the source), and the
    blobs of its own documents and of the sources sent to it."""
    docs, copies = df[df["kind"] == _DOC], df[df["kind"] == _COPY]
    mine = dict(zip(docs["key"], docs["blob"], strict=True))
    theirs = dict(zip(copies["other"], copies["blob"], strict=False))
    return df.loc[df["kind"] == _EDGE, ["key", "other"]], mine, theirs


def meet(docs: list, edges: list, check: Callable[[pd.DataFrame], pd.DataFrame]) -> list:
    """Two shuffles, no driver: ``docs`` (:func:`document_rows`) meet the ``edges``
    (src, dst) at each source, then ``check`` decides each pair at its target
    (``pair_blobs`` gives it the pair's two blobs)."""
    parts = partitions()
    tagged = map_blocks(edges, _verify_inputs(_EDGE, "src", "dst", None))
    attached = shuffle_blocks(docs + tagged, "key", _verify_attach(parts), parts=parts)
    return shuffle_blocks(attached, "key", check, parts=parts)


def _check(threshold: float, k: int | None):
    """At each edge's target: (src, dst, verdict) of pairs that pass or are undecided."""

    def fn(df: pd.DataFrame) -> pd.DataFrame:
        edges, mine, theirs = pair_blobs(df)
        src, dst, verdict = [], [], []
        for key, other in edges.itertuples(index=False):
            a = np.frombuffer(theirs.get(other, b""), dtype=np.uint64)
            b = np.frombuffer(mine.get(key, b""), dtype=np.uint64)
            sim, exact = sketch_jaccard(a, b, max(len(a), len(b)) if k is None else k)
            if exact or abs(sim - threshold) >= MARGIN:
                if sim < threshold:
                    continue
                verdict.append(_SURE)
            else:
                verdict.append(_UNSURE)
            src.append(other)
            dst.append(key)
        return pd.DataFrame(
            {
                "src": pd.Series(src, dtype=object),
                "dst": pd.Series(dst, dtype=object),
                "verdict": pd.Series(verdict, dtype=np.int64),
            }
        )

    return fn


def _with_verdict(verdict: int):
    def fn(table: pa.Table) -> pa.Table:
        if table.num_rows == 0 or "verdict" not in table.column_names:
            return pa.table({"src": pa.array([], pa.string()), "dst": pa.array([], pa.string())})
        keep = pa.compute.equal(table["verdict"], verdict)
        return table.filter(keep).select(["src", "dst"])

    return fn


def verify_edges(edges: list, refs: list, threshold: float, k: int = SKETCH_SIZE) -> list:
    """Blocks of the candidate pairs (src, dst) whose exact Jaccard reaches ``threshold``."""
    docs = map_blocks(refs, _doc_rows(k), combine(edges, unique_values("src", "dst")))
    checked = meet(docs, edges, _check(threshold, k))
    sure = map_blocks(checked, _with_verdict(_SURE))
    unsure = map_blocks(checked, _with_verdict(_UNSURE))
    if num_rows(unsure) == 0:
        return sure
    docs = map_blocks(refs, _doc_rows(None), combine(unsure, unique_values("src", "dst")))
    exact = meet(docs, unsure, _check(threshold, None))
    return sure + map_blocks(exact, _with_verdict(_SURE))
