"""Exact and MinHash-LSH fuzzy dedup as plain Ray tasks over blocks, with no step in the driver.

Every cross-document step is a hash shuffle keyed by what must meet (exact hash, LSH
bucket, node id), followed by vectorised work on each partition; the driver only sees
counts. Candidate pairs are verified by exact Jaccard of the shingle sets
(``raylm.data.dedup_verify``: bottom-k sketches first, whole sets only for the few pairs
a sketch cannot decide), then connected components use min-label propagation: each
round one shuffle of the edges and labels, until no label changes (rounds ~ graph diameter, small in practice). The
representative of every cluster is its smallest id, so the kept set does not depend on
partitioning, block order or the number of nodes. None of it is Ray Data: see
``raylm.data.blocks`` for why.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute

from raylm.data.blocks import combine, map_blocks, num_rows, shuffle_blocks, unique_values
from raylm.data.components import connected_components
from raylm.data.dedup_verify import verify_edges

_MIX = np.uint64(0x9E3779B97F4A7C15)


_KEYS = ("raylm-exact-dup1", "raylm-exact-dup2")  # two SipHash keys: a 128-bit digest


def exact_hashes(texts: list[str] | pa.Array) -> list[str]:
    """Hex digest of each text after lower-casing and collapsing whitespace runs.

    Case and spacing differences do not make a document new. Normalising runs in Arrow's
    kernels over the whole batch; the digest is two 64-bit SipHashes with fixed keys
    (pandas), equal on every node.
    """
    arr = texts if isinstance(texts, pa.Array) else pa.array(texts, pa.large_string())
    trimmed = pa.compute.utf8_trim_whitespace(pa.compute.utf8_lower(arr))
    words = pa.compute.utf8_split_whitespace(trimmed)
    norm = pa.compute.binary_join(words, pa.scalar(" ", pa.large_string()))
    norm = norm.to_numpy(zero_copy_only=False)
    high, low = (pd.util.hash_array(norm, hash_key=k, categorize=False) for k in _KEYS)
    return [f"{a:016x}{b:016x}" for a, b in zip(high.tolist(), low.tolist(), strict=True)]


def exact_hash(text: str) -> str:
    return exact_hashes([text])[0]


def optimal_bands_rows(threshold: float, num_perm: int, fp_weight: float = 0.5) -> tuple[int, int]:
    """Bands and rows minimising weighted false-positive + false-negative area (datasketch's rule)."""
    best, best_err = (1, 1), float("inf")
    lo, hi = np.linspace(0.0, threshold, 257)[:, None], np.linspace(threshold, 1.0, 257)[:, None]
    for b in range(1, num_perm + 1):
        r = np.arange(1, num_perm // b + 1)[None, :]
        fp = np.trapezoid(1 - (1 - lo**r) ** b, lo[:, 0], axis=0)
        fn = np.trapezoid((1 - hi**r) ** b, hi[:, 0], axis=0)
        err = fp * fp_weight + fn * (1 - fp_weight)
        i = int(np.argmin(err))
        if err[i] < best_err:
            best, best_err = (b, i + 1), float(err[i])
    return best


@cache
def _perm_params(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, num_perm, dtype=np.uint64) | np.uint64(1)  # odd multipliers
    b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
    return a, b


def word_hashes(texts: list[str] | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of every word of every text, flat, plus the word count per text.

    A word is a run of letters, digits and ``_`` (``re``'s ``\\w``), and each CJK/kana/
    hangul character is a word of its own (those scripts do not separate words with
    spaces); case is folded code point by code point (``text_batch.lower_cp``). One
    compiled pass finds the words of the whole batch (``text_kernels``), one more hashes
    their code points: the same words, the same hashes, on every node and in every batch.
    """
    from raylm.data.text_batch import CJK, WORD, Batch, lower_cp
    from raylm.data.text_kernels import dedup_word_bounds, span_hashes

    if isinstance(texts, pa.Array | pa.ChunkedArray):
        texts = texts.to_pylist()
    batch = Batch.of(texts)
    starts, ends, owner = dedup_word_bounds(batch.cls, batch.starts, batch.ends, WORD, CJK)
    flat = span_hashes(lower_cp(batch.cp), starts, ends).view(np.uint64)
    return flat, np.bincount(owner, minlength=len(texts))


def shingle_batch(texts: list[str] | pa.Array, ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct word n-gram hashes of every text, flat, plus the count per text.

    n-grams are rolled over the batch's flat word array, keeping only windows inside one
    text; a text shorter than n words is one shingle. No per-text Python.
    """
    wh, lengths = word_hashes(texts)
    if len(wh) == 0:
        return wh, lengths
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    doc_of = np.repeat(np.arange(len(lengths)), lengths)
    n = max(len(wh) - ngram + 1, 0)
    acc = wh[:n].copy()
    with np.errstate(over="ignore"):
        for k in range(1, ngram):
            acc *= _MIX
            acc += wh[k : k + n]
        nonempty = lengths > 0
        short = (lengths < ngram) & nonempty
        # reduceat over every non-empty text's start: segment i is exactly text i's words
        sums = np.add.reduceat(wh, starts[nonempty])
        short_hash = sums[short[nonempty]]
    valid = (np.arange(n) - starts[doc_of[:n]]) <= (lengths[doc_of[:n]] - ngram)
    hashes = np.concatenate([acc[valid], short_hash])
    owners = np.concatenate([doc_of[:n][valid], np.flatnonzero(short)])
    # Sort by (text, top 40 bits of hash) packed in one uint64: 8x faster than lexsort;
    # equal shingles of a text still end up adjacent.
    assert len(lengths) < 1 << 24, "shingle_batch packs the text index into 24 bits"
    order = np.argsort((owners.astype(np.uint64) << np.uint64(40)) | (hashes >> np.uint64(24)))
    hashes, owners = hashes[order], owners[order]
    keep = np.ones(len(hashes), dtype=bool)
    keep[1:] = (hashes[1:] != hashes[:-1]) | (owners[1:] != owners[:-1])
    return hashes[keep], np.bincount(owners[keep], minlength=len(lengths)).astype(np.int64)


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """Distinct 64-bit hashes of the word n-grams of ``text`` (lower-cased)."""
    return shingle_batch([text], ngram)[0]


def minhash_flat(flat: np.ndarray, lengths: np.ndarray, num_perm: int, seed: int) -> np.ndarray:
    """(docs, num_perm) uint32 signatures by multiply-shift hashing.

    One compiled pass (``text_kernels.minhash_min``: 2.3x numpy's chunked multiply, add
    and ``minimum.reduceat``, measured on 0.5 M shingles) keeps the minimum over the full
    64-bit products; only then is it shifted to the top 32 bits (the top bits of the
    minimum are the minimum of the top bits). On long documents this is most of the
    signing time.
    """
    from raylm.data.text_kernels import minhash_min

    a, b = _perm_params(num_perm, seed)
    low = minhash_min(flat.astype(np.uint64), lengths.astype(np.int64), a, b)
    return (low >> np.uint64(32)).astype(np.uint32)


def minhash(shingle_sets: list[np.ndarray], num_perm: int, seed: int) -> np.ndarray:
    lengths = np.array([len(s) for s in shingle_sets], dtype=np.int64)
    flat = np.concatenate(shingle_sets) if len(shingle_sets) else np.empty(0, dtype=np.uint64)
    return minhash_flat(flat.astype(np.uint64), lengths, num_perm, seed)


def signatures(texts: list[str], num_perm: int, ngram: int, seed: int) -> np.ndarray:
    flat, lengths = shingle_batch(texts, ngram)
    return minhash_flat(flat, lengths, num_perm, seed)


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(docs, bands) int64 bucket keys: a hash of each band's rows, salted by the band."""
    out = np.empty((sigs.shape[0], bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for band in range(bands):
            acc = np.full(sigs.shape[0], np.uint64(band + 1) * _MIX, dtype=np.uint64)
            for col in sigs[:, band * rows : (band + 1) * rows].T:
                acc = (acc ^ col.astype(np.uint64)) * np.uint64(0x100000001B3)
                acc ^= acc >> np.uint64(29)
            out[:, band] = acc
    return out.view(np.int64)


# ---- distributed steps (plain Ray tasks over blocks, see raylm.data.blocks) ----------


def _exact_dups(df: pd.DataFrame) -> pd.DataFrame:
    rep = df.groupby("exact_hash")["id"].transform("min")
    dups = df[df["id"] != rep]
    return pd.DataFrame({"id": dups["id"], "dup_of": rep[dups.index], "method": "exact"})


def exact_duplicates(refs: list) -> list:
    """Blocks of (id, dup_of, method='exact') for every non-representative exact duplicate."""
    return shuffle_blocks(refs, "exact_hash", _exact_dups, ["id", "exact_hash"])


def id_hashes(ids: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """uint64 hashes of ids (pandas' hash, seeded with a constant: the same on every node).

    The LSH bucket shuffle carries these instead of the id strings: its rows are bands x
    documents, and at 8 bytes a row instead of a string's ~100 in a pandas frame, its
    reduce tasks no longer hold gigabytes at a few GB of text (docs/data.md, "Memory").
    """
    return pd.util.hash_array(np.asarray(ids.to_numpy(zero_copy_only=False), dtype=object))


def _explode_bands(bands: int, rows: int):
    def fn(batch: pa.Table) -> pa.Table:
        sig_bytes = batch.column("sig").to_pylist()
        sigs = np.frombuffer(b"".join(sig_bytes), dtype=np.uint32).reshape(len(sig_bytes), -1)
        keys = band_keys(sigs, bands, rows)
        ids = np.repeat(id_hashes(batch.column("id")), bands)
        return pa.table({"bucket": keys.reshape(-1), "id": pa.array(ids, pa.uint64())})

    return fn


PAIRS_MAX_BUCKET = 32
"""Buckets up to this size propose every pair; larger ones a star around their smallest id
(its smallest id hash, in the MinHash pass)."""


def bucket_edges(df: pd.DataFrame) -> pd.DataFrame:
    """Candidate pairs (src < dst) of every bucket with more than one document.

    With exact verification a star is not enough: the bucket's smallest id may be below
    the threshold with both a and b while a and b are near-duplicates, and the pair
    (a, b) would never be checked. Small buckets (nearly all of them) propose every
    pair; a huge bucket (boilerplate) falls back to the star to bound the work.
    """
    df = df.drop_duplicates()
    size = df.groupby("bucket")["id"].transform("size")
    small = df[(size > 1) & (size <= PAIRS_MAX_BUCKET)]
    pairs = small.merge(small, on="bucket", suffixes=("_a", "_b"))
    pairs = pairs[pairs["id_a"] < pairs["id_b"]]
    big = df[size > PAIRS_MAX_BUCKET]
    rep = big.groupby("bucket")["id"].transform("min")
    edges = pd.concat(
        [
            pd.DataFrame({"src": pairs["id_a"], "dst": pairs["id_b"]}),
            pd.DataFrame({"src": rep, "dst": big["id"]})[lambda e: e["src"] != e["dst"]],
        ],
        ignore_index=True,
    )
    return edges.drop_duplicates()


def candidate_edges(refs: list, bands: int, rows: int) -> list:
    """Candidate pairs (ids) from every LSH bucket with > 1 document (see
    ``bucket_edges``), found on id hashes (``id_hashes``) and named afterwards."""
    hashed = shuffle_blocks(map_blocks(refs, _explode_bands(bands, rows)), "bucket", bucket_edges)
    names = map_blocks(refs, _named_ends, combine(hashed, unique_values("src", "dst")))
    return map_blocks(hashed, _named_edges, *names)


def _named_ends(docs: pa.Table, ends: pa.Array) -> pa.Table:
    """(hash, id) of this block's documents whose hash ends a candidate edge: only
    candidates travel back, so this scales with the duplicates, not the corpus."""
    hashes = pa.array(id_hashes(docs["id"]), pa.uint64())
    keep = pa.compute.is_in(hashes, value_set=ends.cast(pa.uint64()))
    return pa.table({"hash": hashes.filter(keep), "id": docs["id"].filter(keep)})


def _named_edges(edges: pa.Table, *names: pa.Table) -> pa.Table:
    """Hash edges as id edges. Two ids sharing a 64-bit hash (about 1 in 10^7 pairs at a
    billion documents) each get the edge: a candidate more, which verification (or the
    LSH false-positive rate it is part of) accounts for; no candidate is lost."""
    empty = pa.table({"src": pa.array([], pa.string()), "dst": pa.array([], pa.string())})
    if edges.num_rows == 0:
        return empty
    lookup = pa.concat_tables(names, promote_options="permissive").to_pandas()
    df = edges.to_pandas().astype("uint64")
    for end in ("src", "dst"):
        df = df.merge(lookup.rename(columns={"hash": end, "id": f"{end}_id"}), on=end)
    df = df[df["src_id"] != df["dst_id"]]
    out = pd.DataFrame({"src": df["src_id"], "dst": df["dst_id"]}).drop_duplicates()
    return pa.Table.from_pandas(out, preserve_index=False).cast(empty.schema) if len(out) else empty


def fuzzy_duplicates(
    refs: list, bands: int, rows: int, max_rounds: int, verify_threshold: float | None = None
) -> tuple[list, int]:
    """Blocks of (id, dup_of, method='fuzzy') for every non-representative near-duplicate,
    and the connected-component rounds it took; from the blocks ``refs`` of documents."""
    edges = candidate_edges(refs, bands, rows)
    if verify_threshold is not None and num_rows(edges):
        edges = verify_edges(edges, refs, verify_threshold)
    n_edges = num_rows(edges)
    if n_edges == 0:
        return [], 0
    return connected_components(edges, max_rounds, n_edges)
