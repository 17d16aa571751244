"""SimHash near-duplicate detection (Charikar; Manku et al. for the tables), the
alternative to MinHash-LSH selected by ``dedup.method: simhash``.

A document's fingerprint is 64 bits: each bit is the majority vote of that bit over its
distinct shingle hashes (the same shingles MinHash uses). Near-duplicates differ in at
most ``dedup.hamming`` bits. To find them without comparing all pairs the 64 bits are
cut into ``dedup.simhash_blocks`` blocks: two fingerprints within ``hamming`` bits agree
exactly on at least ``blocks - hamming`` of them (pigeonhole), so each combination of
that many blocks is one table and documents sharing a table key are candidates (more
blocks: more tables, longer keys, fewer chance candidates). Every candidate pair is then
checked on its exact Hamming distance (8 bytes a document travel, not shingle sets), and
the pairs within ``hamming`` go through the same connected components as MinHash.

One fingerprint is 8 bytes against MinHash's 512 (128 permutations), and the tables
are few; it is the cheaper method, but coarser: tuned for near-identical pages (a few
words changed), not for Jaccard 0.8.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pandas as pd
import pyarrow as pa

from raylm.data.blocks import map_blocks, num_rows, shuffle_blocks
from raylm.data.components import connected_components
from raylm.data.dedup import bucket_edges
from raylm.data.dedup_verify import document_rows, meet, pair_blobs

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit moves every output bit (the shingle hashes
    are rolling sums whose low bits are weaker)."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * _M1
        x ^= x >> np.uint64(27)
        x *= _M2
        x ^= x >> np.uint64(31)
    return x


def fingerprints(flat: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """One 64-bit SimHash per document from its flat shingle hashes (0 with none);
    vectorised in chunks of ~1M shingles (64 bytes of votes each)."""
    out = np.zeros(len(lengths), dtype=np.uint64)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    doc = 0
    while doc < len(lengths):
        stop = max(int(np.searchsorted(ends, starts[doc] + (1 << 20), side="right")), doc + 1)
        idx = np.arange(doc, stop)[lengths[doc:stop] > 0]
        if len(idx):
            lo = starts[doc]
            chunk = _mix(flat[lo : ends[stop - 1]].astype(np.uint64))
            bits = np.unpackbits(chunk.view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
            ones = np.add.reduceat(bits, starts[idx] - lo, axis=0, dtype=np.int64)
            major = ones * 2 > lengths[idx, None]
            out[idx] = np.packbits(major, axis=1, bitorder="little").view(np.uint64)[:, 0]
        doc = stop
    return out


def table_keys(fps: np.ndarray, hamming: int, blocks: int) -> np.ndarray:
    """(docs, tables) int64 keys: for each combination of ``blocks - hamming`` blocks, a
    hash of those blocks' bits salted by the table."""
    widths = [64 // blocks + (1 if i < 64 % blocks else 0) for i in range(blocks)]
    offsets = np.cumsum([0, *widths[:-1]])
    masks = [np.uint64((1 << w) - 1) for w in widths]
    tables = list(combinations(range(blocks), blocks - hamming))
    out = np.empty((len(fps), len(tables)), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for t, chosen in enumerate(tables):
            key = np.full(len(fps), np.uint64(t + 1), dtype=np.uint64)
            for b in chosen:
                part = (fps >> np.uint64(offsets[b])) & masks[b]
                key = _mix(key * np.uint64(0x100000001B3) ^ part)
            out[:, t] = key
    return out.view(np.int64)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def near_pairs(fps: np.ndarray, max_distance: int, blocks: int) -> set[tuple[int, int]]:
    """Index pairs (i < j) within ``max_distance`` bits, found through the tables: the
    distributed method's result on one machine, for tests and small inputs."""
    keys = table_keys(fps, max_distance, blocks)
    df = pd.DataFrame({"key": keys.reshape(-1), "i": np.repeat(np.arange(len(fps)), keys.shape[1])})
    pairs = df.merge(df, on="key")
    pairs = pairs[pairs["i_x"] < pairs["i_y"]]
    vals = fps.tolist()
    return {
        (i, j)
        for i, j in set(zip(pairs["i_x"].tolist(), pairs["i_y"].tolist(), strict=True))
        if hamming(vals[i], vals[j]) <= max_distance
    }


# ---- distributed (plain Ray tasks over blocks, as raylm.data.dedup) ---------------------


def _explode(max_distance: int, blocks: int):
    def fn(batch: pa.Table) -> pa.Table:
        fps = np.frombuffer(b"".join(batch.column("sig").to_pylist()), dtype=np.uint64)
        keys = table_keys(fps, max_distance, blocks)
        ids = np.repeat(np.array(batch.column("id").to_pylist(), dtype=object), keys.shape[1])
        return pa.table({"bucket": keys.reshape(-1), "id": pa.array(ids, type=pa.string())})

    return fn


def _hamming_check(max_distance: int):
    """At each edge's target: keep the edge if the fingerprints are close enough."""

    def fn(df: pd.DataFrame) -> pd.DataFrame:
        edges, mine, theirs = pair_blobs(df)
        src, dst = [], []
        for key, other in edges.itertuples(index=False):
            blob, own = theirs.get(other, b""), mine.get(key, b"")
            if len(blob) == 8 and len(own) == 8:
                a, b = int.from_bytes(blob, "little"), int.from_bytes(own, "little")
                if hamming(a, b) <= max_distance:
                    src.append(other)
                    dst.append(key)
        return pd.DataFrame(
            {"src": pd.Series(src, dtype=object), "dst": pd.Series(dst, dtype=object)}
        )

    return fn


def simhash_duplicates(
    refs: list, max_distance: int, blocks: int, max_rounds: int
) -> tuple[list, int]:
    """Blocks of (id, dup_of, method='fuzzy') for every non-representative near-duplicate
    and the connected-component rounds, from document blocks whose ``sig`` is the
    fingerprint: candidates from the tables, checked on Hamming distance, then merged."""
    edges = shuffle_blocks(map_blocks(refs, _explode(max_distance, blocks)), "bucket",
                           bucket_edges)  # fmt: skip
    if num_rows(edges):
        docs = map_blocks(refs, document_rows("id", "sig"))
        edges = meet(docs, edges, _hamming_check(max_distance))
    if num_rows(edges) == 0:
        return [], 0
    return connected_components(edges, max_rounds)
