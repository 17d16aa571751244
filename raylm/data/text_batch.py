"""A batch of texts as one array of code points, with Python's own character classes.

The quality filters ask per character questions (is it a letter, a symbol, a space, a
word character) and per word questions (repeated n-grams). Asked one document and one
character at a time in Python they cost about 0.7 s per MB; here they run as numpy
operations over a whole block. The classes come from a table built once per process
from Python's ``unicodedata`` and ``str`` methods over every code point, so a
character is classed exactly as the per-document code (``raylm.data.filters``) classes
it, whatever Unicode version another engine (RE2, utf8proc) ships.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from functools import cache, cached_property

import numpy as np
import pandas as pd
import pyarrow as pa

ALPHA, SPACE, SYMBOL, CONTROL, WORD, CJK, BREAK, UNASSIGNED = (1 << i for i in range(8))
"""Bits of ``classes()``: ``str.isalpha``, ``str.isspace``, category S*, category Cc/Cf
other than tab and newlines, ``re``'s ``\\w`` (``str.isalnum`` or ``_``), one of the
CJK ranges that ``filters.words`` takes one character at a time, a line break of
``str.splitlines``, and category Cn (unassigned in Python's Unicode version)."""

_CJK_RANGES = (
    (0x3040, 0x30FF),
    (0x3400, 0x4DBF),
    (0x4E00, 0x9FFF),
    (0xF900, 0xFAFF),
    (0xAC00, 0xD7AF),
)
_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"


@cache
def classes() -> np.ndarray:
    """One byte of class bits per code point (1.1 M entries, about 0.6 s to build)."""
    chars = list(map(chr, range(0x110000)))
    cats = np.array(list(map(unicodedata.category, chars)))
    table = np.zeros(0x110000, dtype=np.uint8)
    table[np.fromiter(map(str.isalpha, chars), bool, len(chars))] |= ALPHA
    table[np.fromiter(map(str.isspace, chars), bool, len(chars))] |= SPACE
    table[np.char.startswith(cats, "S")] |= SYMBOL
    control = (cats == "Cc") | (cats == "Cf")
    control[[ord(c) for c in "\t\n\r"]] = False
    table[control] |= CONTROL
    table[np.fromiter(map(str.isalnum, chars), bool, len(chars))] |= WORD
    table[ord("_")] |= WORD
    for lo, hi in _CJK_RANGES:
        table[lo : hi + 1] |= CJK
    table[[ord(c) for c in _BREAKS]] |= BREAK
    table[cats == "Cn"] |= UNASSIGNED
    return table


@cache
def _lower_table() -> np.ndarray:
    """Each code point's ``str.lower`` where that is one character, else itself: ``İ``
    alone lowers to two (``i`` and a combining dot) and stays. Built by lowering every
    code point as one string (40 ms), whose neighbours never make a Greek capital
    sigma word-final, so each maps as it does alone."""
    table = np.arange(0x110000, dtype=np.uint32)
    keep = (table < 0xD800) | (table > 0xDFFF)  # surrogates: no UTF-32 of their own
    keep[0x130] = False
    cps = table[keep]
    lowered = cps.tobytes().decode("utf-32-le").lower().encode("utf-32-le")
    table[keep] = np.frombuffer(lowered, dtype=np.uint32)
    return table


def lower_cp(cp: np.ndarray) -> np.ndarray:
    """Code points case-folded one by one: what dedup compares, so ``Hello`` and
    ``hello`` share their words' hashes."""
    return _lower_table()[cp]


def _sums(flags: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Per-segment sums of a 0/1 (or integer) array over [starts, ends)."""
    acc = np.zeros(len(flags) + 1, dtype=np.int32 if len(flags) < 1 << 31 else np.int64)
    np.cumsum(flags, out=acc[1:])
    return acc[ends] - acc[starts]


@dataclass
class Batch:
    """Texts joined by newlines into one code-point array; text ``i`` is
    ``cp[starts[i]:ends[i]]`` (the newline between texts belongs to none)."""

    cp: np.ndarray
    starts: np.ndarray
    ends: np.ndarray

    @classmethod
    def of(cls, texts: list[str]) -> Batch:
        lengths = np.fromiter(map(len, texts), np.int64, len(texts))
        starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]]).astype(np.int64)
        joined = "\n".join(texts) + "\n"  # each text's segment ends in a newline
        cp = np.frombuffer(joined.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
        return cls(cp, starts, starts + lengths)

    @cached_property
    def cls(self) -> np.ndarray:
        return classes()[self.cp]

    def count(self, bits: int) -> np.ndarray:
        """Characters of each text having any of ``bits`` (one pass: every text's segment
        is the text and its newline, never empty, so ``reduceat`` sums exactly it)."""
        if not len(self.starts):
            return np.zeros(0, dtype=np.int64)
        flags = ((self.cls & bits) != 0).view(np.uint8)
        sums = np.add.reduceat(flags, self.starts, dtype=np.int64)
        return sums - bool(classes()[ord("\n")] & bits)

    def count_ranges(self, ranges: tuple[tuple[int, int], ...], among: int) -> np.ndarray:
        """Characters of each text with class ``among`` whose code point is in ``ranges``."""
        hit = np.zeros(len(self.cp), dtype=bool)
        for lo, hi in ranges:
            hit |= (self.cp >= lo) & (self.cp <= hi)
        return _sums(hit & ((self.cls & among) != 0), self.starts, self.ends)


@dataclass
class Words:
    """``filters.words`` of every text of a batch, flat and in order: each CJK character
    is a word, any other run of word characters is one (a run that starts with a CJK
    character gives its leading CJK characters one by one, then one word for the rest,
    as ``re`` scans it)."""

    ids: np.ndarray
    """An id per word: a one-character word's code point, a longer word's 62-bit hash
    (``text_kernels.span_hashes``; equal words, equal ids)."""

    lengths: np.ndarray
    """Characters per word."""

    owner: np.ndarray
    """The text each word belongs to (non-decreasing)."""

    per_text: np.ndarray
    """Words per text."""

    @classmethod
    def of(cls, batch: Batch) -> Words:
        from raylm.data.text_kernels import span_hashes, word_bounds

        starts, ends, long_word, owner = word_bounds(batch.cls, batch.starts, batch.ends, WORD, CJK)
        ids = batch.cp[starts].astype(np.int64)  # one character: its code point
        ids[long_word] = span_hashes(batch.cp, starts[long_word], ends[long_word])
        per_text = np.bincount(owner, minlength=len(batch.starts))
        return cls(ids, ends - starts, owner, per_text)


_MIX = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-spread 64-bit hash of each value."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def ngram_counts(
    words: Words, n: int, texts: np.ndarray, maybe: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Every word n-gram inside one text (of those in ``texts``, a bool mask): the index
    of its first word, and how often the same n-gram occurs in that text. With
    ``maybe`` (a bool per word position), only n-grams starting where it is True are
    counted: the caller knows the others occur once (a repeated 5-gram is four
    repeated 2-grams in a row), and their partners are among those counted.

    An n-gram's key is a 64-bit hash of its text and its exact word ids: two different
    n-grams of one text share a key with probability about 2^-64 per pair."""
    total = len(words.ids)
    if total < n:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    first = np.arange(total - n + 1)
    inside = words.owner[first] == words.owner[first + n - 1]
    keep = inside & texts[words.owner[first]]
    if maybe is not None:
        keep &= maybe[first]
    first = first[keep]
    ids = words.ids.astype(np.uint64)
    with np.errstate(over="ignore"):
        key = words.owner[first].astype(np.uint64) * _MIX
        for k in range(n):
            key = (key + ids[first + k]) * _MIX
    if not len(first):
        return first, np.empty(0, dtype=np.int64)
    codes, _ = pd.factorize(_mix(key))
    return first, np.bincount(codes)[codes]


def nfkc(texts: list[str]) -> list[str]:
    """``unicodedata.normalize("NFKC", t)`` of every text, by utf8proc over the block
    (pyarrow's ``utf8_normalize``, 3-4x faster on CJK text, whose full-width
    punctuation always needs work). A text holding a code point Python's Unicode leaves
    unassigned, or a lone surrogate, goes through Python's own: utf8proc's newer Unicode
    may map such a character, and for all others the stability policy makes both agree."""
    import pyarrow.compute as pc

    out = list(texts)
    # Python's quick check finds most texts already normal (ASCII always is) at C speed
    todo = [i for i, t in enumerate(texts) if not unicodedata.is_normalized("NFKC", t)]
    if not todo:
        return out
    sub = [texts[i] for i in todo]
    try:
        arr = pa.array(sub, pa.large_string())
    except (UnicodeEncodeError, pa.ArrowException):
        safe = np.zeros(len(sub), dtype=bool)
        normal: list[str | None] = [None] * len(sub)
    else:
        safe = Batch.of(sub).count(UNASSIGNED) == 0
        normal = pc.utf8_normalize(arr, form="NFKC").to_pylist()
    for j, i in enumerate(todo):
        value = normal[j]
        out[i] = value if safe[j] and value is not None else unicodedata.normalize("NFKC", sub[j])
    return out
