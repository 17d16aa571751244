"""Quality filters (Gopher-style heuristics), pure functions over one document's text.

``first_failure`` returns the name of the first filter a document fails, so every
removed document is counted under exactly one reason and the accounting adds up.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

from raylm.data import guide_filters
from raylm.data.config import FilterConfig
from raylm.data.scripts import SCRIPT_RANGES

_WORD = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]|\w+")


def nfkc(text: str) -> str:
    return unicodedata.normalize("NFKC", text)


def nfkc_batch(texts: list[str]) -> list[str]:
    """``nfkc`` of every text of a block (``raylm.data.text_batch.nfkc``: utf8proc over
    the block where it provably agrees with Python's ``unicodedata``)."""
    from raylm.data.text_batch import nfkc as batch

    return batch(texts)


def words(text: str) -> list[str]:
    """Whitespace-free word units; each CJK character is one word, as CJK has no spaces."""
    return _WORD.findall(text)


def script_ratio(text: str, script: str) -> float:
    """Share of letters that belong to ``script`` (digits, spaces, punctuation ignored)."""
    letters = [ord(c) for c in text if c.isalpha()]
    if not letters:
        return 0.0
    ranges = SCRIPT_RANGES[script]
    hits = sum(1 for c in letters if any(lo <= c <= hi for lo, hi in ranges))
    return hits / len(letters)


def symbol_ratio(text: str) -> float:
    """Share of non-space characters that are symbols or emoji (Unicode category S*)."""
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return 0.0
    return sum(1 for c in chars if unicodedata.category(c).startswith("S")) / len(chars)


def control_ratio(text: str) -> float:
    """Share of characters that are control/format codes other than tab and newlines."""
    if not text:
        return 0.0
    bad = sum(1 for c in text if c not in "\t\n\r" and unicodedata.category(c) in ("Cc", "Cf"))
    return bad / len(text)


def dup_line_fraction(text: str) -> float:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) < 2:
        return 0.0
    return (len(lines) - len(set(lines))) / len(lines)


def top_ngram_fraction(ws: list[str], n: int = 2) -> float:
    """Characters covered by the most frequent n-gram, over all word characters (Gopher)."""
    if len(ws) < n + 1:
        return 0.0
    grams = Counter(tuple(ws[i : i + n]) for i in range(len(ws) - n + 1))
    gram, count = grams.most_common(1)[0]
    if count < 2:
        return 0.0
    total = sum(len(w) for w in ws)
    return count * sum(len(w) for w in gram) / total if total else 0.0


def dup_ngram_fraction(ws: list[str], n: int = 5) -> float:
    """Characters of words inside n-grams that occur more than once (Gopher)."""
    if len(ws) < n + 1:
        return 0.0
    grams = Counter(tuple(ws[i : i + n]) for i in range(len(ws) - n + 1))
    covered = [False] * len(ws)
    for i in range(len(ws) - n + 1):
        if grams[tuple(ws[i : i + n])] > 1:
            covered[i : i + n] = [True] * n
    total = sum(len(w) for w in ws)
    dup = sum(len(w) for w, c in zip(ws, covered, strict=True) if c)
    return dup / total if total else 0.0


def first_failure(text: str, cfg: FilterConfig) -> str | None:
    """Name of the first filter ``text`` fails, or None if it passes them all."""
    if not cfg.enabled:
        return None
    n = len(text)
    if n < cfg.min_chars:
        return "min_chars"
    if cfg.max_chars is not None and n > cfg.max_chars:
        return "max_chars"
    ws = words(text)
    if len(ws) < cfg.min_words:
        return "min_words"
    if cfg.max_words is not None and len(ws) > cfg.max_words:
        return "max_words"
    if cfg.script is not None and script_ratio(text, cfg.script) < cfg.min_script_ratio:
        return "script_ratio"
    if symbol_ratio(text) > cfg.max_symbol_ratio:
        return "symbol_ratio"
    if control_ratio(text) > cfg.max_control_ratio:
        return "control_ratio"
    if dup_line_fraction(text) > cfg.max_dup_line_fraction:
        return "dup_lines"
    if top_ngram_fraction(ws) > cfg.max_top_ngram_fraction:
        return "top_ngram"
    if dup_ngram_fraction(ws) > cfg.max_dup_ngram_fraction:
        return "dup_ngrams"
    if ws:
        mean = sum(len(w) for w in ws) / len(ws)
        if mean < cfg.min_mean_word_length:
            return "min_mean_word_length"
        if mean > cfg.max_mean_word_length:
            return "max_mean_word_length"
    return guide_filters.failure(text, cfg)  # the guides' filters: each off by default


def first_failures(texts: list[str], cfg: FilterConfig) -> list[str | None]:
    """``first_failure`` of every text of a block, computed over the block at once
    (``raylm.data.filters_batch``): the same decisions at a fraction of the cost."""
    from raylm.data.filters_batch import first_failures as batch

    return batch(texts, cfg)
