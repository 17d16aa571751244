"""The filters' per-character scans as compiled loops (numba, which vLLM already brings).

``raylm.data.text_batch`` asks its questions as whole-array numpy operations; where an
answer needs a scan that numpy can only express as a dozen passes over the batch (word
boundaries: runs, their leading CJK characters, the long word that follows; lines and
their stripped ends), one loop over the class bytes does it in a single pass. The loops
are compiled once per machine (``cache=True`` keeps the machine code next to this file,
or in numba's user cache where that is read-only); ``tests/unit/
test_data_filters_batch.py`` holds their words and lines to the per-document filters'.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _spans(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover
    """Room for up to ``n`` spans (a batch has at most one per character): start, end,
    owner; the kernels return the filled prefix."""
    return np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64)


@njit(cache=True, nogil=True)
def word_bounds(
    cls: np.ndarray, text_starts: np.ndarray, text_ends: np.ndarray, word: int, cjk: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """Every word of every text as ``filters.words`` finds them: (start, end, is_long,
    owner) per word, in order. A run of word characters gives its leading CJK
    characters one by one, then one long word from its first other word character to
    the run's end (CJK characters inside it included), as ``re`` scans it; a CJK
    character outside word characters (``・``) is a word of its own."""
    starts, ends, owner = _spans(len(cls))
    is_long = np.empty(len(cls), np.bool_)
    k = 0
    for t in range(len(text_starts)):
        i, stop = text_starts[t], text_ends[t]
        while i < stop:
            if cls[i] & word == 0:  # not in a run; a CJK one (``・``) is still a word
                if cls[i] & cjk:
                    starts[k], ends[k], is_long[k], owner[k] = i, i + 1, False, t
                    k += 1
                i += 1
                continue
            while i < stop and cls[i] & word and cls[i] & cjk:  # the run's CJK lead
                starts[k], ends[k], is_long[k], owner[k] = i, i + 1, False, t
                k += 1
                i += 1
            if i < stop and cls[i] & word:  # the long word: to the end of the run
                j = i + 1
                while j < stop and cls[j] & word:
                    j += 1
                starts[k], ends[k], is_long[k], owner[k] = i, j, True, t
                k += 1
                i = j
    return starts[:k], ends[:k], is_long[:k], owner[:k]


@njit(cache=True, nogil=True)
def line_bounds(
    cls: np.ndarray, text_starts: np.ndarray, text_ends: np.ndarray, brk: int, space: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """Every non-blank line of every text, stripped, as ``str.splitlines`` and
    ``str.strip`` cut them: (start, end, owner) per line. Every break character is
    also a space, so the empty line inside ``\\r\\n`` is blank like any other."""
    starts, ends, owner = _spans(len(cls))
    k = 0
    for t in range(len(text_starts)):
        i, stop = text_starts[t], text_ends[t]
        while i < stop:
            lo = i
            while i < stop and cls[i] & brk == 0:
                i += 1
            hi = i
            while lo < hi and cls[lo] & space:
                lo += 1
            while hi > lo and cls[hi - 1] & space:
                hi -= 1
            if hi > lo:
                starts[k], ends[k], owner[k] = lo, hi, t
                k += 1
            i += 1  # past the break
    return starts[:k], ends[:k], owner[:k]


@njit(cache=True, nogil=True)
def span_hashes(
    cp: np.ndarray, starts: np.ndarray, ends: np.ndarray
) -> np.ndarray:  # pragma: no cover - compiled
    """A 62-bit hash of each span of code points, its length included (splitmix64's
    finaliser over each code point in turn): equal spans get equal hashes, different ones
    collide with probability about 2^-62 per pair, the footing ``ngram_counts`` already
    stands on. Bit 62 is set, so a hash never equals a code point."""
    out = np.empty(len(starts), np.int64)
    for s in range(len(starts)):
        h = np.uint64(ends[s] - starts[s]) * np.uint64(0x9E3779B97F4A7C15)
        for i in range(starts[s], ends[s]):
            h = (h ^ np.uint64(cp[i])) * np.uint64(0xBF58476D1CE4E5B9)
            h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            h ^= h >> np.uint64(31)
        out[s] = np.int64(h & np.uint64(0x3FFFFFFFFFFFFFFF)) | np.int64(1 << 62)
    return out


@njit(cache=True, nogil=True)
def dedup_word_bounds(
    cls: np.ndarray, text_starts: np.ndarray, text_ends: np.ndarray, word: int, cjk: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """The words dedup shingles: (start, end, owner) per word, in order. Each CJK word
    character is a word (those scripts put no spaces between words); any other run of
    word characters is one; everything else separates."""
    starts, ends, owner = _spans(len(cls))
    k = 0
    for t in range(len(text_starts)):
        i, stop = text_starts[t], text_ends[t]
        while i < stop:
            if cls[i] & word == 0:
                i += 1
                continue
            j = i + 1
            if cls[i] & cjk == 0:
                while j < stop and cls[j] & word and cls[j] & cjk == 0:
                    j += 1
            starts[k], ends[k], owner[k] = i, j, t
            k += 1
            i = j
    return starts[:k], ends[:k], owner[:k]


@njit(cache=True, nogil=True)
def minhash_min(
    flat: np.ndarray, lengths: np.ndarray, a: np.ndarray, b: np.ndarray
) -> np.ndarray:  # pragma: no cover - compiled
    """Per document and permutation, the smallest ``a * shingle + b`` (mod 2^64) over its
    shingles (all ones with none): MinHash's minimum in one pass, each product compared
    as it is made instead of stored."""
    low = np.full((len(lengths), len(a)), np.uint64(0xFFFFFFFFFFFFFFFF), np.uint64)
    at = 0
    for d in range(len(lengths)):
        row = low[d]
        for s in range(at, at + lengths[d]):
            x = flat[s]
            for p in range(len(a)):  # min, not a branch: 1.35x on random shingles
                row[p] = min(row[p], x * a[p] + b[p])
        at += lengths[d]
    return low
