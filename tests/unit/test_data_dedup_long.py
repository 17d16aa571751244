"""What makes fuzzy dedup fast on long documents without changing its answers: the
compiled word splitter, MinHash's minimum before the shift, bottom-k verification sketches and
connected components in one task."""

from __future__ import annotations

import random
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from raylm.data import components, dedup, dedup_verify
from raylm.data.blocks import partition_of
from raylm.data.corpus import edit, paragraphs

TRICKY = [
    "",
    "a",
    "  Hello, World!! __init__ x_y 3.14 ",
    "end_",
    "!!",
    "MiXeD-case\twords\nand lines",
    "trailing word",
    "x",
]


_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"


def _reference_words(text: str) -> list[str]:
    """Dedup's words by ``re``, one text at a time: runs of word characters other than
    CJK ones, and each CJK word character alone, case-folded code point by code point."""
    low = "".join(c.lower() if len(c.lower()) == 1 else c for c in text)
    return re.findall(rf"[^\W{_CJK}]+|\w", low)


def test_batch_words_are_the_reference_words() -> None:
    texts = [*TRICKY, *paragraphs()[:5], "", "Straße İstanbul ΣΊΣΥΦΟΣ café", "中文abc中def",
             "日本語・カナ ｶﾅ x_y 中", "한국어 텍스트", "_中_ a中b 中中a ١٢٣"]  # fmt: skip
    flat, lengths = dedup.word_hashes(texts)
    ends = np.cumsum(lengths)
    for text, end, n in zip(texts, ends, lengths, strict=True):
        want = _reference_words(text)
        assert n == len(want), (text, want)
        ids = flat[end - n : end].tolist()  # equal hashes exactly where the words are equal
        assert [ids.index(x) for x in ids] == [want.index(w) for w in want], text
    # a word never runs across the boundary between two texts
    assert dedup.word_hashes(["ab", "cd"])[1].tolist() == [1, 1]
    assert dedup.word_hashes(["Hello"])[0][0] == dedup.word_hashes(["hello"])[0][0]


def test_word_hashes_do_not_depend_on_the_batch() -> None:
    """A text's hashes alone equal its hashes in a batch; a near-copy with one accented
    word still shares its other words' hashes."""
    texts = ["Héllo wörld, 你好 ok done", *TRICKY, "hello world ok done"]
    flat, lengths = dedup.word_hashes(texts)
    per_text = [dedup.word_hashes([t]) for t in texts]
    assert lengths.tolist() == [int(n[0]) for _, n in per_text]
    assert np.array_equal(flat, np.concatenate([h for h, _ in per_text]))
    starts = np.concatenate([[0], np.cumsum(lengths)])
    first, last = flat[starts[0] : starts[1]], flat[starts[-2] : starts[-1]]
    assert first[-1] == last[-1] and first[-2] == last[-2]  # "ok", "done"


def test_minhash_matches_the_textbook_definition() -> None:
    rng = np.random.default_rng(0)
    sets = [rng.integers(0, 2**63, n, dtype=np.uint64) for n in (1, 5, 300, 0, 2000)]
    sigs = dedup.minhash(sets, 16, seed=4)
    a, b = dedup._perm_params(16, 4)
    for s, sig in zip(sets, sigs, strict=True):
        if len(s) == 0:
            assert (sig == np.iinfo(np.uint32).max).all()
            continue
        with np.errstate(over="ignore"):
            want = (((s[None, :] * a[:, None]) + b[:, None]) >> np.uint64(32)).min(axis=1)
        assert np.array_equal(sig, want.astype(np.uint32))


def test_sketch_keeps_small_sets_whole_and_bounds_large_ones() -> None:
    small = np.array([5, 1, 3], dtype=np.uint64)
    assert np.array_equal(dedup_verify.sketch(small, k=4), small)
    big = np.random.default_rng(1).permutation(np.arange(100, dtype=np.uint64))
    sk = dedup_verify.sketch(big, k=10)
    assert len(sk) == 11 and sk[:10].tolist() == list(range(10)) and sk[10] == 100


def _shingles(text: str) -> np.ndarray:
    return dedup.shingle_hashes(text, 5)


def test_sketch_jaccard_is_exact_for_small_sets_and_close_for_large_ones() -> None:
    rng = random.Random(0)
    text = " ".join(paragraphs(min_words=30)[:40])  # a long document: thousands of shingles
    a = _shingles(text)
    assert len(a) > 2000
    for rate in (0.01, 0.03, 0.1):
        b = _shingles(edit(text, rng, rate))
        truth = len(np.intersect1d(a, b)) / len(np.union1d(a, b))
        est, exact = dedup_verify.sketch_jaccard(
            dedup_verify.sketch(a, 1024), dedup_verify.sketch(b, 1024), 1024
        )
        assert not exact and abs(est - truth) < dedup_verify.MARGIN
        whole, exact = dedup_verify.sketch_jaccard(a, b, k=len(a) + len(b))
        assert exact and whole == pytest.approx(truth)
    # sizes alone bound Jaccard: a set four times larger is at most 0.25 similar
    est, _ = dedup_verify.sketch_jaccard(
        dedup_verify.sketch(a, 64), dedup_verify.sketch(a[: len(a) // 4], 64), 64
    )
    assert est <= 0.25 + 1e-9


def _verdicts(a: np.ndarray, b: np.ndarray, threshold: float, k: int | None) -> list[int]:
    df = pd.DataFrame(
        {
            "key": ["y", "y", "y"],
            "kind": [dedup_verify._DOC, dedup_verify._EDGE, dedup_verify._COPY],
            "other": ["", "x", "x"],
            "blob": [b.tobytes(), b"", a.tobytes()],
        }
    )
    return dedup_verify._check(threshold, k)(df)["verdict"].tolist()


def test_a_source_sketch_travels_once_to_each_partition_of_its_targets() -> None:
    """Not once per edge: the copies are what verification's memory grows with."""
    targets = [f"t{i}" for i in range(9)]
    df = pd.DataFrame(
        {
            "key": ["s"] * 10,
            "kind": [dedup_verify._DOC] + [dedup_verify._EDGE] * 9,
            "other": ["", *targets],
            "blob": [b"sketch"] + [b""] * 9,
        }
    )
    out = dedup_verify._verify_attach(parts=3)(df)
    parts = dict(zip(targets, partition_of(np.array(targets, dtype=object), 3), strict=True))
    copies = out[out["kind"] == dedup_verify._COPY]
    assert sorted(parts[k] for k in copies["key"]) == sorted(set(parts.values()))
    assert set(copies["other"]) == {"s"} and set(copies["blob"]) == {b"sketch"}
    edges = out[out["kind"] == dedup_verify._EDGE]
    assert sorted(edges["key"]) == targets and set(edges["blob"]) == {b""}
    # each target's partition receives the source's sketch
    for t in targets:
        assert parts[t] in {parts[k] for k in copies["key"]}


def test_check_decides_far_pairs_and_defers_close_ones() -> None:
    base = np.arange(4000, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    near = np.concatenate([base[:3600], base[:400] + np.uint64(1)])  # J = 3600/4400 = 0.818
    sk = [dedup_verify.sketch(x, 256) for x in (base, near)]
    assert _verdicts(*sk, threshold=0.5, k=256) == [dedup_verify._SURE]
    assert _verdicts(*sk, threshold=0.95, k=256) == []  # clearly below: dropped
    assert _verdicts(*sk, threshold=0.82, k=256) == [dedup_verify._UNSURE]
    assert _verdicts(base, near, threshold=0.81, k=None) == [dedup_verify._SURE]
    assert _verdicts(base, near, threshold=0.82, k=None) == []


def _reference_components(edges: list[tuple[str, str]]) -> dict[str, str]:
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {x: find(x) for x in parent if find(x) != x}


def test_local_components_label_every_node_with_its_components_smallest_id() -> None:
    rng = random.Random(3)
    nodes = [f"n{i:03d}" for i in range(200)]
    edges = [tuple(rng.sample(nodes, 2)) for _ in range(150)]
    edges += [(nodes[i + 1], nodes[i]) for i in range(150, 199)]  # a long chain, reversed
    halves = [
        pa.table({"src": [a for a, _ in part], "dst": [b for _, b in part]})
        for part in (edges[:100], edges[100:])
    ]
    table, rounds = components._local_components(*halves)
    got = dict(zip(table["id"].to_pylist(), table["dup_of"].to_pylist(), strict=True))
    assert got == _reference_components(edges)
    assert set(table["method"].to_pylist()) == {"fuzzy"} and rounds >= 1
    again, _ = components._local_components(*halves[::-1])  # block order does not matter
    assert again.sort_by("id").equals(table.sort_by("id"))
