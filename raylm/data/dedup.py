"""Exact and MinHash-LSH fuzzy dedup over Ray Data, with no step in the driver.

Every cross-document step is a hash shuffle keyed by what must meet (exact hash, LSH
bucket, node id), followed by vectorised work on each partition; the driver only sees
counts. Connected components use min-label propagation: each round one shuffle of the
candidate edges and labels, until no label changes (rounds ~ graph diameter, small
because each bucket contributes a star around its smallest id). The representative of
every cluster is its smallest id, so the kept set does not depend on partitioning,
block order or the number of nodes.
"""

from __future__ import annotations

import hashlib
import re
from functools import cache
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute

_WORD = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]|\w+")
_MIX = np.uint64(0x9E3779B97F4A7C15)


def normalise_for_hash(text: str) -> str:
    """Case and whitespace differences do not make a document new."""
    return " ".join(text.lower().split())


def exact_hash(text: str) -> str:
    return hashlib.blake2b(normalise_for_hash(text).encode(), digest_size=16).hexdigest()


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


def shingle_batch(texts: list[str], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct word n-gram hashes of every text, flat, plus the count per text.

    Words of the whole batch are hashed in one vectorised call (pandas' SipHash with a
    fixed key: equal on every node), and n-grams are rolled over the flat array, keeping
    only windows inside one text: per-text Python work is just the regex split.
    """
    words = [_WORD.findall(t.lower()) for t in texts]
    lengths = np.array([len(w) for w in words], dtype=np.int64)
    flat_words = [w for ws in words for w in ws]
    if not flat_words:
        return np.empty(0, dtype=np.uint64), np.zeros(len(texts), dtype=np.int64)
    wh = pd.util.hash_array(np.asarray(flat_words, dtype=object), categorize=False)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    doc_of = np.repeat(np.arange(len(texts)), lengths)
    pos = np.arange(len(wh)) - starts[doc_of]
    n = max(len(wh) - ngram + 1, 0)
    acc = wh[:n].copy()
    with np.errstate(over="ignore"):
        for k in range(1, ngram):
            acc = acc * _MIX + wh[k : k + n]
        short = lengths < ngram  # a text shorter than n words is one shingle
        short_hash = (
            np.add.reduceat(wh, starts[short & (lengths > 0)])
            if (short & (lengths > 0)).any()
            else np.empty(0, dtype=np.uint64)
        )
    valid = pos[:n] <= (lengths[doc_of[:n]] - ngram)
    hashes = np.concatenate([acc[valid], short_hash.astype(np.uint64)])
    owners = np.concatenate([doc_of[:n][valid], np.flatnonzero(short & (lengths > 0))])
    order = np.lexsort((hashes, owners))
    hashes, owners = hashes[order], owners[order]
    keep = np.ones(len(hashes), dtype=bool)
    keep[1:] = (hashes[1:] != hashes[:-1]) | (owners[1:] != owners[:-1])
    hashes, owners = hashes[keep], owners[keep]
    return hashes, np.bincount(owners, minlength=len(texts)).astype(np.int64)


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """Distinct 64-bit hashes of the word n-grams of ``text`` (lower-cased)."""
    return shingle_batch([text], ngram)[0]


def minhash_flat(flat: np.ndarray, lengths: np.ndarray, num_perm: int, seed: int) -> np.ndarray:
    """(docs, num_perm) uint32 signatures; multiply-shift hashing, vectorised in chunks."""
    a, b = _perm_params(num_perm, seed)
    sigs = np.full((len(lengths), num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    chunk = max(1, (1 << 22) // num_perm)  # shingles per matrix, ~32 MB of uint64
    doc = 0
    while doc < len(lengths):
        stop = doc + 1
        while stop < len(lengths) and ends[stop] - starts[doc] <= chunk:
            stop += 1
        idx = np.arange(doc, stop)[lengths[doc:stop] > 0]
        if len(idx):
            block = flat[starts[doc] : ends[stop - 1]]
            with np.errstate(over="ignore"):
                hv = ((block[:, None] * a[None, :] + b[None, :]) >> np.uint64(32)).astype(np.uint32)
            sigs[idx] = np.minimum.reduceat(hv, starts[idx] - starts[doc], axis=0)
        doc = stop
    return sigs


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


# ---- distributed steps (Ray Data) ------------------------------------------------------


def _partitions() -> int:
    import ray

    return max(2, int(ray.cluster_resources().get("CPU", 2)))


def _split(table: pa.Table, key: str, parts: int, columns: list[str] | None) -> list[pa.Table]:
    """Hash-partition one block; pandas' hash is seeded with a constant, so stable across nodes."""
    if columns is not None and table.num_rows:
        table = table.select(columns)
    if table.num_rows == 0:
        return [table] * parts
    codes = pd.util.hash_array(table.column(key).to_numpy(zero_copy_only=False)) % parts
    return [table.filter(pa.array(codes == p)) for p in range(parts)]


def _reduce(fn: Any, *tables: pa.Table) -> pa.Table:
    frames = [t.to_pandas() for t in tables if t.num_rows] or [tables[0].to_pandas()]
    df = pd.concat(frames, ignore_index=True)  # blocks may differ in string vs large_string
    return pa.Table.from_pandas(fn(df), preserve_index=False)


def _shuffle(refs: list, key: str, fn: Any, columns: list[str] | None = None) -> list:
    """Run ``fn`` on hash partitions of the blocks ``refs``: all rows of a key meet in one call.

    A plain task map-reduce over object refs: the driver holds only refs. Ray Data's
    own hash shuffle does the same but starts aggregator actors per call, ~10 s per
    shuffle on a 2-core machine, and label propagation needs several.
    """
    import ray

    parts = _partitions()
    split = ray.remote(_split).options(num_returns=parts)
    reduce = ray.remote(_reduce)
    pieces = [split.remote(ref, key, parts, columns) for ref in refs]
    return [reduce.remote(fn, *[p[i] for p in pieces]) for i in range(parts)] if pieces else []


def _by_key(ds: Any, key: str, fn: Any) -> Any:
    import ray

    return ray.data.from_arrow_refs(_shuffle(ds.to_arrow_refs(), key, fn) or ds.to_arrow_refs())


def _map(refs: list, fn: Any, *args: Any) -> list:
    """``fn(table, *args)`` on every block as a plain task (no Ray Data executor start-up)."""
    import ray

    task = ray.remote(fn)
    return [task.remote(ref, *args) for ref in refs]


def _apply_pandas(table: pa.Table, fn: Any) -> pa.Table:
    return pa.Table.from_pandas(fn(table.to_pandas()), preserve_index=False)


def _num_rows(refs: list) -> int:
    import ray

    return sum(ray.get(_map(refs, lambda t: t.num_rows)))


def _count_kind(table: pa.Table, kind: int) -> int:
    return int(pa.compute.sum(pa.compute.equal(table.column("kind"), kind)).as_py() or 0)


def _exact_dups(df: pd.DataFrame) -> pd.DataFrame:
    rep = df.groupby("exact_hash")["id"].transform("min")
    dups = df[df["id"] != rep]
    return pd.DataFrame({"id": dups["id"], "dup_of": rep[dups.index], "method": "exact"})


def exact_duplicates(ds: Any) -> Any:
    """Rows (id, dup_of, method='exact') for every non-representative exact duplicate."""
    import ray

    refs = _shuffle(ds.to_arrow_refs(), "exact_hash", _exact_dups, ["id", "exact_hash"])
    return ray.data.from_arrow_refs(refs) if refs else None


def _explode_bands(bands: int, rows: int):
    def fn(batch: pa.Table) -> pa.Table:
        sig_bytes = batch.column("sig").to_pylist()
        sigs = np.frombuffer(b"".join(sig_bytes), dtype=np.uint32).reshape(len(sig_bytes), -1)
        keys = band_keys(sigs, bands, rows)
        ids = np.repeat(np.array(batch.column("id").to_pylist(), dtype=object), bands)
        return pa.table({"bucket": keys.reshape(-1), "id": pa.array(ids, type=pa.string())})

    return fn


def _bucket_edges(df: pd.DataFrame) -> pd.DataFrame:
    rep = df.groupby("bucket")["id"].transform("min")
    edges = pd.DataFrame({"src": rep, "dst": df["id"]})
    return edges[edges["src"] != edges["dst"]].drop_duplicates()


def candidate_edges(refs: list, bands: int, rows: int) -> list:
    """Star edges (smallest id in bucket -> other member) of every LSH bucket with > 1 doc."""
    return _shuffle(_map(refs, _explode_bands(bands, rows)), "bucket", _bucket_edges)


_LABEL, _EDGE, _MSG = 0, 1, 2


def _initial_state(df: pd.DataFrame) -> pd.DataFrame:
    """Every node labelled by itself, having just sent its id to each neighbour."""
    both = pd.concat(
        [
            pd.DataFrame({"node": df["src"], "other": df["dst"]}),
            pd.DataFrame({"node": df["dst"], "other": df["src"]}),
        ],
        ignore_index=True,
    )
    nodes = both["node"].drop_duplicates()
    return pd.concat(
        [
            both.assign(kind=_EDGE, label=both["node"]),
            pd.DataFrame({"node": both["other"], "kind": _MSG, "other": "", "label": both["node"]}),
            pd.DataFrame({"node": nodes, "kind": _LABEL, "other": "", "label": nodes}),
        ],
        ignore_index=True,
    )


def _propagate(df: pd.DataFrame) -> pd.DataFrame:
    """One round at the nodes of this partition: take the smallest label offered, pass it on."""
    labels = df[df["kind"] != _EDGE].groupby("node")["label"].min()
    old = df[df["kind"] == _LABEL].groupby("node")["label"].min().reindex(labels.index)
    changed = labels.index[(labels < old).to_numpy()]
    edges = df[df["kind"] == _EDGE]
    moving = edges[edges["node"].isin(changed)]
    out_labels = pd.DataFrame(
        {"node": labels.index, "kind": _LABEL, "other": "", "label": labels.to_numpy()}
    )
    msgs = pd.DataFrame(
        {
            "node": moving["other"].to_numpy(),
            "kind": _MSG,
            "other": "",
            "label": labels.reindex(moving["node"]).to_numpy(),
        }
    )
    return pd.concat([out_labels, edges, msgs], ignore_index=True)


def _label_dups(table: pa.Table) -> pa.Table:
    df = table.to_pandas()
    df = df[(df["kind"] == _LABEL) & (df["node"] != df["label"])]
    return pa.table(
        {
            "id": pa.array(df["node"].tolist(), pa.string()),
            "dup_of": pa.array(df["label"].tolist(), pa.string()),
            "method": pa.array(["fuzzy"] * len(df), pa.string()),
        }
    )


def connected_components(edges: list, max_rounds: int) -> tuple[list, int]:
    """Blocks of (id, dup_of=smallest id of its component) for non-smallest nodes, and rounds."""
    import ray

    state = _map(edges, _apply_pandas, _initial_state)
    for rounds in range(1, max_rounds + 1):
        state = _shuffle(state, "node", _propagate)
        if sum(ray.get(_map(state, _count_kind, _MSG))) == 0:
            return _map(state, _label_dups), rounds
    raise RuntimeError(
        f"connected components did not converge in dedup.max_rounds={max_rounds} rounds"
    )


_DOC = 3


def _verify_attach(df: pd.DataFrame) -> pd.DataFrame:
    """At each edge's source: copy the source's shingles onto the edge, re-key it by target."""
    docs = df[df["kind"] == _DOC]
    blobs = dict(zip(docs["key"], docs["blob"], strict=True))
    edges = df[df["kind"] == _EDGE]
    moved = pd.DataFrame(
        {
            "key": edges["other"].to_numpy(),
            "kind": _EDGE,
            "other": edges["key"].to_numpy(),
            "blob": [blobs.get(k, b"") for k in edges["key"]],
        }
    )
    return pd.concat([docs, moved], ignore_index=True)


def _verify_check(threshold: float):
    def fn(df: pd.DataFrame) -> pd.DataFrame:
        docs = df[df["kind"] == _DOC]
        blobs = dict(zip(docs["key"], docs["blob"], strict=True))
        src, dst = [], []
        for key, other, blob in df.loc[df["kind"] == _EDGE, ["key", "other", "blob"]].itertuples(
            index=False
        ):
            a = np.frombuffer(blob, dtype=np.uint64)
            b = np.frombuffer(blobs.get(key, b""), dtype=np.uint64)
            inter = len(np.intersect1d(a, b, assume_unique=True))
            union = len(a) + len(b) - inter
            if union and inter / union >= threshold:
                src.append(other)
                dst.append(key)
        return pd.DataFrame(
            {"src": pd.Series(src, dtype=object), "dst": pd.Series(dst, dtype=object)}
        )

    return fn


def _verify_inputs(kind: int, key: str, other: str | None, blob: str | None):
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


def verify_edges(edges: list, refs: list, threshold: float) -> list:
    """Keep candidate pairs whose exact Jaccard of shingle sets reaches the threshold.

    Two shuffles, no driver: docs' shingle sets meet their edges at the source id, then
    travel with the edge to the target id, where the similarity is computed exactly.
    """
    docs = _map(refs, _verify_inputs(_DOC, "id", None, "shingles"))
    tagged = _map(edges, _verify_inputs(_EDGE, "src", "dst", None))
    attached = _shuffle(docs + tagged, "key", _verify_attach)
    return _shuffle(attached, "key", _verify_check(threshold))


def fuzzy_duplicates(
    ds: Any, bands: int, rows: int, max_rounds: int, verify_threshold: float | None = None
) -> tuple[Any, int]:
    """Rows (id, dup_of, method='fuzzy') for every non-representative near-duplicate.

    Runs as plain Ray tasks over the blocks of the (materialised) ``ds``: each Ray Data
    execution costs about a second of start-up, and this path has several steps.
    """
    import ray

    refs = ds.to_arrow_refs()
    edges = candidate_edges(refs, bands, rows)
    if verify_threshold is not None and _num_rows(edges):
        edges = verify_edges(edges, refs, verify_threshold)
    if _num_rows(edges) == 0:
        return None, 0
    dups, rounds = connected_components(edges, max_rounds)
    return ray.data.from_arrow_refs(dups), rounds
