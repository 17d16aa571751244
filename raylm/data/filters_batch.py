"""``filters.first_failure`` for a whole block at once: the same decisions, in numpy.

Each filter's measure is computed for every text of the block from one code-point
array (``raylm.data.text_batch``) instead of one Python loop per character; the
n-gram filters, the costliest, only look at texts that every earlier filter kept. The
fractions are the same integer counts divided the same way, so a threshold compares
exactly as it does per document (``tests/unit/test_data_filters_batch.py`` checks the
two agree on tricky text, and ``bench/data_throughput.py`` on a whole corpus).
"""

from __future__ import annotations

import numpy as np

from raylm.data import guide_filters
from raylm.data.config import FilterConfig
from raylm.data.scripts import SCRIPT_RANGES
from raylm.data.text_batch import ALPHA, BREAK, CONTROL, SPACE, SYMBOL, Batch, Words, ngram_counts

ORDER = (
    "min_chars",
    "max_chars",
    "min_words",
    "max_words",
    "script_ratio",
    "symbol_ratio",
    "control_ratio",
    "dup_lines",
    "top_ngram",
    "dup_ngrams",
    "min_mean_word_length",
    "max_mean_word_length",
)
"""The filters in ``filters.first_failure``'s order: a text's reason is its first failure."""


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den per text, 0.0 where den is 0 (what the per-document code returns)."""
    out = np.zeros(len(num), dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def dup_line_fractions(batch: Batch) -> np.ndarray:
    """``filters.dup_line_fraction`` per text: lines split as ``str.splitlines`` does,
    stripped, blank ones dropped, compared by their hashes (``text_kernels``)."""
    from raylm.data.text_kernels import line_bounds, span_hashes

    lo, hi, owner = line_bounds(batch.cls, batch.starts, batch.ends, BREAK, SPACE)
    lines = np.bincount(owner, minlength=len(batch.starts))
    if not len(lo):
        return np.zeros(len(batch.starts))
    ids = span_hashes(batch.cp, lo, hi)
    order = np.lexsort((ids, owner))  # by text, then by line: equal lines adjacent
    o, h = owner[order], ids[order]
    new = np.ones(len(o), dtype=bool)
    new[1:] = (o[1:] != o[:-1]) | (h[1:] != h[:-1])
    distinct = np.bincount(o[new], minlength=len(lines))
    return np.where(lines >= 2, _ratio(lines - distinct, lines), 0.0)


def _top_ngram(words: Words, chars: np.ndarray, texts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``filters.top_ngram_fraction`` (word 2-grams): the most frequent 2-gram, the one
    seen first among equally frequent ones (``Counter.most_common``), times its length.
    Also returns which word positions start a repeated 2-gram (``_dup_ngrams`` uses it)."""
    out = np.zeros(len(texts))
    repeated = np.zeros(len(words.ids) + 4, dtype=bool)
    first, count = ngram_counts(words, 2, texts & (words.per_text >= 3))
    if not len(first):
        return out, repeated
    repeated[first[count > 1]] = True
    owner = words.owner[first]  # non-decreasing: one group of positions per text
    group = np.flatnonzero(np.concatenate([[True], owner[1:] != owner[:-1]]))
    best = np.repeat(np.maximum.reduceat(count, group), np.diff(np.append(group, len(owner))))
    at_best = np.flatnonzero(count == best)
    lead = at_best[np.concatenate([[True], owner[at_best][1:] != owner[at_best][:-1]])]
    winners, who = first[lead], owner[lead]
    gram_chars = words.lengths[winners] + words.lengths[winners + 1]
    out[who] = np.where(best[lead] >= 2, _ratio(best[lead] * gram_chars, chars[who]), 0.0)
    return out, repeated


def _dup_ngrams(
    words: Words, chars: np.ndarray, texts: np.ndarray, repeated2: np.ndarray, n: int = 5
) -> np.ndarray:
    """``filters.dup_ngram_fraction``: characters of words inside a repeated n-gram.
    Only n-grams made of repeated 2-grams can repeat, so only those are counted."""
    maybe = repeated2[: len(words.ids)].copy()
    for k in range(1, n - 1):
        maybe &= repeated2[k : k + len(words.ids)]
    first, count = ngram_counts(words, n, texts & (words.per_text >= n + 1), maybe)
    dup = first[count > 1]
    size = len(words.ids) + 1
    edge = np.bincount(dup, minlength=size) - np.bincount(dup + n, minlength=size)
    covered = np.cumsum(edge[:-1]) > 0
    dup_chars = np.bincount(
        words.owner, weights=np.where(covered, words.lengths, 0), minlength=len(texts)
    ).astype(np.int64)
    return _ratio(dup_chars, chars)


def first_failures(texts: list[str], cfg: FilterConfig) -> list[str | None]:
    """``filters.first_failure`` of each text, computed over the batch."""
    if not cfg.enabled or not texts:
        return [None] * len(texts)
    batch = Batch.of(texts)
    n = batch.ends - batch.starts
    failed = np.full(len(texts), -1, dtype=np.int64)

    def fail(rule: str, mask: np.ndarray) -> None:
        failed[(failed < 0) & mask] = ORDER.index(rule)

    fail("min_chars", n < cfg.min_chars)
    if cfg.max_chars is not None:
        fail("max_chars", n > cfg.max_chars)
    words = Words.of(batch)
    nw = words.per_text
    fail("min_words", nw < cfg.min_words)
    if cfg.max_words is not None:
        fail("max_words", nw > cfg.max_words)
    if cfg.script is not None:
        letters = batch.count(ALPHA)
        hits = batch.count_ranges(SCRIPT_RANGES[cfg.script], ALPHA)
        fail("script_ratio", _ratio(hits, letters) < cfg.min_script_ratio)
    solid = n - batch.count(SPACE)
    fail("symbol_ratio", _ratio(batch.count(SYMBOL), solid) > cfg.max_symbol_ratio)
    fail("control_ratio", _ratio(batch.count(CONTROL), n) > cfg.max_control_ratio)
    fail("dup_lines", dup_line_fractions(batch) > cfg.max_dup_line_fraction)
    chars = np.bincount(words.owner, weights=words.lengths, minlength=len(texts)).astype(np.int64)
    top, repeated2 = _top_ngram(words, chars, failed < 0)
    fail("top_ngram", top > cfg.max_top_ngram_fraction)
    dup = _dup_ngrams(words, chars, failed < 0, repeated2)
    fail("dup_ngrams", dup > cfg.max_dup_ngram_fraction)
    mean = _ratio(chars, nw)
    fail("min_mean_word_length", (nw > 0) & (mean < cfg.min_mean_word_length))
    fail("max_mean_word_length", (nw > 0) & (mean > cfg.max_mean_word_length))
    out: list[str | None] = [ORDER[i] if i >= 0 else None for i in failed.tolist()]
    if guide_filters.any_enabled(cfg):  # off by default; per document, on survivors only
        for i, text in enumerate(texts):
            if out[i] is None:
                out[i] = guide_filters.failure(text, cfg)
    return out
