"""MinHash signatures, LSH parameters, exact hashing and LSH candidate pairs."""

from __future__ import annotations

import random

import numpy as np

from raylm.data import dedup
from raylm.data.blocks import unique_values
from raylm.data.corpus import edit, paragraphs


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return len(np.intersect1d(a, b)) / len(np.union1d(a, b))


def test_signature_agreement_estimates_jaccard() -> None:
    rng = random.Random(0)
    docs = paragraphs(min_words=80)[:20]
    pairs = [(d, edit(d, rng, rate)) for d in docs for rate in (0.02, 0.1, 0.3)]
    errors = []
    for a, b in pairs:
        sa, sb = dedup.shingle_hashes(a, 5), dedup.shingle_hashes(b, 5)
        sig = dedup.signatures([a, b], 256, 5, seed=3)
        errors.append(abs(float(np.mean(sig[0] == sig[1])) - _jaccard(sa, sb)))
    # MinHash's standard error with 256 permutations is at most 1/(2*16) = 0.031.
    assert float(np.mean(errors)) < 0.04
    assert max(errors) < 0.15


def test_signatures_are_deterministic_and_seeded() -> None:
    text = paragraphs()[0]
    a = dedup.signatures([text], 64, 5, seed=1)
    assert np.array_equal(a, dedup.signatures([text], 64, 5, seed=1))
    assert not np.array_equal(a, dedup.signatures([text], 64, 5, seed=2))
    assert dedup.signatures([""], 16, 5, seed=1).shape == (1, 16)


def test_optimal_bands_rows_matches_datasketch() -> None:
    from datasketch.lsh import _optimal_param

    for threshold, num_perm in ((0.8, 128), (0.5, 64)):
        assert dedup.optimal_bands_rows(threshold, num_perm) == _optimal_param(
            threshold, num_perm, 0.5, 0.5
        )


def test_band_keys_collide_only_on_equal_bands() -> None:
    sigs = np.array([[1, 2, 3, 4], [1, 2, 9, 9], [7, 2, 3, 4]], dtype=np.uint32)
    keys = dedup.band_keys(sigs, bands=2, rows=2)
    assert keys[0, 0] == keys[1, 0] and keys[0, 1] != keys[1, 1]
    assert keys[0, 1] == keys[2, 1] and keys[0, 0] != keys[2, 0]
    same_rows_other_band = dedup.band_keys(np.array([[5, 5, 5, 5]], dtype=np.uint32), 2, 2)
    assert same_rows_other_band[0, 0] != same_rows_other_band[0, 1]


def test_exact_hash_ignores_case_and_spacing_only() -> None:
    assert dedup.exact_hash("Hello   World\n") == dedup.exact_hash("hello world")
    assert dedup.exact_hash("hello world") != dedup.exact_hash("hello world!")
    assert dedup.exact_hash(" \tA\n\n b ") == dedup.exact_hash("a b")
    batch = dedup.exact_hashes(["x", " X ", "y", "x y"])
    assert batch[0] == batch[1] and len(set(batch)) == 3


def test_small_buckets_propose_every_pair_not_just_a_star() -> None:
    """With exact verification, a star around "a" would lose the near-duplicate pair
    (b, c) whenever "a" itself is below the threshold with both."""
    import pandas as pd

    df = pd.DataFrame({"bucket": [7, 7, 7, 9], "id": ["a", "b", "c", "d"]})
    edges = set(map(tuple, dedup.bucket_edges(df)[["src", "dst"]].to_numpy().tolist()))
    assert edges == {("a", "b"), ("a", "c"), ("b", "c")}


def test_huge_buckets_fall_back_to_a_star() -> None:
    import pandas as pd

    n = dedup.PAIRS_MAX_BUCKET + 5
    ids = [f"{i:03d}" for i in range(n)]
    edges = dedup.bucket_edges(pd.DataFrame({"bucket": [1] * n, "id": ids}))
    assert len(edges) == n - 1 and set(edges["src"]) == {"000"}


def test_hash_edges_are_named_back_to_ids_and_a_collision_loses_none() -> None:
    import pyarrow as pa

    docs = pa.table({"id": ["f:1", "f:2", "f:3", "f:4", "f:5"]})
    h = dict(zip(docs["id"].to_pylist(), dedup.id_hashes(docs["id"]).tolist(), strict=True))
    assert len(set(h.values())) == 5  # distinct ids, distinct hashes
    edges = pa.table({"src": pa.array([h["f:1"], h["f:4"]], pa.uint64()),
                      "dst": pa.array([h["f:2"], h["f:3"]], pa.uint64())})  # fmt: skip
    names = dedup._named_ends(docs, unique_values("src", "dst")(edges, edges.slice(0, 0)))
    assert sorted(names["id"].to_pylist()) == ["f:1", "f:2", "f:3", "f:4"]  # f:5: no edge
    named = dedup._named_edges(edges, names).to_pylist()
    assert sorted((e["src"], e["dst"]) for e in named) == [("f:1", "f:2"), ("f:4", "f:3")]
    # another document with f:1's hash (a 64-bit collision) gets f:1's edges as well
    twin = pa.table({"hash": pa.array([h["f:1"]], pa.uint64()), "id": ["g:9"]})
    named = dedup._named_edges(edges, names, twin).to_pylist()
    assert {(e["src"], e["dst"]) for e in named} >= {("f:1", "f:2"), ("g:9", "f:2")}
    assert dedup._named_edges(edges.slice(0, 0), names).schema.field("src").type == pa.string()
