"""Contamination: which eval examples the model may have seen in training, by n-gram overlap.

What is scanned. Every eval set the job scores: the eval records (prompt or chat turns,
then every reference), each benchmark's items (question and choices; question and worked
solution; code prompt and canonical solution) and the perplexity documents. Each example
is one token sequence (``raylm.eval.text.tokenize``: a word per token, one per CJK
character, after the metrics' normalisation), so an English example is matched on words
and a Chinese one on characters.

Against what. The training data the lineage names (``lineage_sources``): the train run
whose output is the evaluated model (its ``manifest.json`` in the model dir or above it,
as ``final/`` sits in the run dir), its data input (raw files; a LLaMA-Factory registry's
trained datasets; a data job's output dir), and, through a data job's manifest, the raw
files it read when its shards are tokenized (untokenized shards are read as they are).
A base model that is itself a train run's output is followed too: the model saw that data.
``contamination.train_data`` replaces the lineage with explicit paths.

How. The index is built on the eval side, which is small: every n-gram of every example
(its 64-bit polynomial hash over token ids, with the tokens kept to confirm a hit), in
memory proportional to the eval sets. The training text is then streamed once (jsonl line
by line, parquet by record batch through pyarrow, local or in a bucket) in batches of
about a million tokens; a token that occurs in no eval example maps to 0, so only windows
of eval vocabulary can match, and every hash hit is confirmed token by token. Memory is
bounded by the eval sets and one batch, never by the corpus, and the result is exact (no
Bloom-filter false positives). Each matched n-gram remembers the first training record
it was found in (``file:line``), which the report names.

When is an example contaminated. Its overlap is the share of its n-gram positions found
in training; it is contaminated when the overlap is at least ``min_overlap`` (default
0.5) and above 0, so ``min_overlap: 0`` is GPT-3's rule (any shared n-gram). An example
shorter than ``ngram`` tokens is one n-gram of its own length (it must occur whole in one
training record); one shorter than ``min_tokens`` is not checked and counted as
``unchecked``.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raylm.eval.text import tokenize
from raylm.eval.train_text import TrainSource, iter_documents, strings

BATCH_TOKENS = 1 << 20
"""Training tokens hashed per numpy batch (bounds the scan's working memory)."""

SNIPPET_CHARS = 80
"""Characters of an example kept in the report."""

_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier of the polynomial hash (mod 2**64)


@dataclass
class Example:
    """One eval example: its id, a snippet, and its n-grams (length, hash) by position."""

    id: str
    snippet: str
    grams: list[tuple[int, int]] = field(default_factory=list)


# ---- the training data: from the lineage or from explicit paths --------------------------


def eval_sets(records: list[Any], docs: list[Any], benchmarks: dict[str, Any] | None) -> dict:
    """{set name: [(id, text)]}: ``eval`` (the records), each benchmark, ``perplexity``."""
    sets: dict[str, list[tuple[str, str]]] = {}
    if records:
        sets["eval"] = [(r.id, _record_example(r)) for r in records]
    for name, data in (benchmarks or {}).items():
        sets[name] = [
            (str(getattr(it, "id", i)), _item_text(it)) for i, it in enumerate(data.items)
        ]
    if docs:
        sets["perplexity"] = [(f"doc {i}", "\n".join(strings(d))) for i, d in enumerate(docs)]
    return sets


def _record_example(r: Any) -> str:
    prompt = r.prompt if r.prompt is not None else "\n".join(strings(list(r.messages or [])))
    return "\n".join([prompt, *r.references])


def _item_text(item: Any) -> str:
    """A benchmark item as it would appear in a training file."""
    parts = [getattr(item, k, None) for k in ("question", "prompt")]
    parts += list(getattr(item, "choices", ()) or ())
    parts += [getattr(item, k, None) for k in ("solution", "canonical_solution")]
    return "\n".join(p for p in parts if isinstance(p, str) and p)


# ---- the index and the scan --------------------------------------------------------------


def _hashes(ids: np.ndarray, k: int) -> np.ndarray:
    """Polynomial hash (mod 2**64) of every window of ``k`` ids."""
    n = len(ids) - k + 1
    h = np.zeros(max(n, 0), dtype=np.uint64)
    for j in range(k):
        h = h * _BASE + ids[j : j + n]
    return h


class NgramIndex:
    """Every n-gram of the eval examples, to look training text up against."""

    def __init__(self, ngram: int, min_tokens: int) -> None:
        self.ngram, self.min_tokens = ngram, min_tokens
        self.vocab: dict[str, int] = {}
        self.grams: dict[int, dict[int, tuple[int, ...]]] = {}  # length -> hash -> ids
        self.found: dict[tuple[int, int], str] = {}  # (length, hash) -> first training record
        self._sorted: dict[int, np.ndarray] = {}

    def add(self, example_id: str, text: str) -> Example | None:
        """Index one example; None when it is shorter than ``min_tokens``."""
        ex = Example(example_id, " ".join(text.split())[:SNIPPET_CHARS])
        toks = tokenize(text)
        if len(toks) < self.min_tokens:
            return None
        ids = np.array([self.vocab.setdefault(t, len(self.vocab) + 1) for t in toks], np.uint64)
        k = min(self.ngram, len(ids))
        table = self.grams.setdefault(k, {})
        for i, h in enumerate(_hashes(ids, k).tolist()):
            table.setdefault(h, tuple(ids[i : i + k].tolist()))
            ex.grams.append((k, h))
        self._sorted.pop(k, None)
        return ex

    def scan(self, docs: Iterable[tuple[str, str]]) -> int:
        """Look every training document up; returns how many were read."""
        for k, table in self.grams.items():
            self._sorted[k] = np.array(sorted(table), dtype=np.uint64)
        n_docs, buf, starts, locs, size = 0, [], [], [], 0
        get, zeros = self.vocab.get, itertools.repeat(0)
        for loc, text in docs:
            n_docs += 1
            ids = list(map(get, tokenize(text), zeros))
            if not any(ids):
                continue
            starts.append(size)
            locs.append(loc)
            buf += [*ids, 0]  # a 0 between documents: no n-gram spans two
            size += len(ids) + 1
            if size >= BATCH_TOKENS:
                self._lookup(np.array(buf, np.uint64), np.array(starts), locs)
                buf, starts, locs, size = [], [], [], 0
        if buf:
            self._lookup(np.array(buf, np.uint64), np.array(starts), locs)
        return n_docs

    def _lookup(self, ids: np.ndarray, starts: np.ndarray, locs: list[str]) -> None:
        for k, keys in self._sorted.items():
            if len(ids) < k:
                continue
            h = _hashes(ids, k)
            for i in np.flatnonzero(np.isin(h, keys)).tolist():
                key = (k, int(h[i]))
                if key in self.found or tuple(ids[i : i + k].tolist()) != self.grams[k][key[1]]:
                    continue
                self.found[key] = locs[int(np.searchsorted(starts, i, side="right")) - 1]

    def verdict(self, ex: Example) -> tuple[float, str | None]:
        """(share of the example's n-grams found in training, the record most of them came from)."""
        hits = [self.found[g] for g in ex.grams if g in self.found]
        if not hits:
            return 0.0, None
        return len(hits) / len(ex.grams), Counter(hits).most_common(1)[0][0]


def scan(
    sets: dict[str, list[tuple[str, str]]],
    sources: list[TrainSource],
    ngram: int = 13,
    min_overlap: float = 0.5,
    min_tokens: int = 8,
) -> dict[str, Any]:
    """eval.json's ``contamination``: per set its rate and contaminated examples."""
    t0 = time.perf_counter()
    index = NgramIndex(ngram, min_tokens)
    examples = {
        name: [(i, index.add(i, text)) for i, text in items] for name, items in sets.items()
    }
    n_docs = index.scan(d for src in sources for d in iter_documents(src))
    out: dict[str, Any] = {}
    for name, items in examples.items():
        bad, unchecked = [], 0
        for ex_id, ex in items:
            if ex is None:
                unchecked += 1
                continue
            share, where = index.verdict(ex)
            if share > 0 and share >= min_overlap:
                bad.append({"id": ex_id, "overlap": round(share, 4), "snippet": ex.snippet,
                            "source": where})  # fmt: skip
        bad.sort(key=lambda b: -b["overlap"])
        n = len(items)
        out[name] = {"rate": len(bad) / n if n else 0.0, "n": n,
                     "n_contaminated": len(bad), "unchecked": unchecked, "contaminated": bad}  # fmt: skip
    return {
        "sets": out,
        "ngram": ngram,
        "min_overlap": min_overlap,
        "min_tokens": min_tokens,
        "train_sources": sorted({s.path for s in sources}),
        "train_documents": n_docs,
        "seconds": round(time.perf_counter() - t0, 3),
    }
