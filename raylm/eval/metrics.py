"""Metrics as per-example sufficient statistics plus an aggregate.

Each metric turns every example into a small vector of statistics and the corpus score
into a function of their sum. A mean metric stores (score, 1); perplexity stores
(summed NLL, tokens), so it stays token-weighted; BLEU stores sacrebleu's n-gram counts,
so a resample's BLEU is a real corpus BLEU, not a mean of sentence BLEUs. Bootstrap and
the paired test then only need one matrix product per metric, whatever the metric.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_WORD = re.compile(r"\w+", re.UNICODE)


def normalize(text: str) -> str:
    """Lowercase, drop punctuation, collapse whitespace: "Paris." matches "paris"."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def exact_match(prediction: str, references: Sequence[str], norm: bool = True) -> float:
    f = normalize if norm else str.strip
    return float(any(f(prediction) == f(r) for r in references))


def contains(prediction: str, references: Sequence[str], norm: bool = True) -> float:
    """1 if some reference occurs in the answer: for answers wrapped in a sentence."""
    f = normalize if norm else str.strip
    pred = f(prediction)
    if norm:  # whole-word containment, so "2" is not found inside "2048"
        return float(any(f" {f(r)} " in f" {pred} " for r in references if f(r)))
    return float(any(f(r) in pred for r in references if f(r)))


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def tokens_for_rouge(text: str) -> list[str]:
    """Lowercased word tokens, as rouge-score's default tokenizer (without stemming)."""
    return _WORD.findall(text.lower())


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F1 (Lin 2004, beta=1) on word tokens; the best over references."""
    pred = tokens_for_rouge(prediction)
    best = 0.0
    for ref in references:
        gold = tokens_for_rouge(ref)
        lcs = _lcs_length(pred, gold)
        if lcs:
            p, r = lcs / len(pred), lcs / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best


def bleu_stats(prediction: str, references: Sequence[str]) -> list[float]:
    """sacrebleu's sufficient statistics of one segment: [sys_len, ref_len, correct1-4,
    total1-4], read from the public BLEUScore of a one-segment corpus."""
    from sacrebleu.metrics import BLEU

    score = BLEU().corpus_score([prediction], [[r] for r in references])
    return [score.sys_len, score.ref_len, *score.counts, *score.totals]


def bleu_from_stats(stats: np.ndarray) -> float:
    """Corpus BLEU (0-100, sacrebleu defaults: 13a, exp smoothing) from summed stats."""
    from sacrebleu.metrics import BLEU

    s = [int(v) for v in np.rint(stats)]
    return BLEU.compute_bleu(
        correct=s[2:6], total=s[6:10], sys_len=s[0], ref_len=s[1], smooth_method="exp"
    ).score


def within_budget(
    prediction: str, n_tokens: int, max_tokens: int | None, max_chars: int | None
) -> float:
    ok = (max_tokens is None or n_tokens <= max_tokens) and (
        max_chars is None or len(prediction) <= max_chars
    )
    return float(ok)


def _ratio(stats: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return stats[..., 0] / stats[..., 1]


def _perplexity(stats: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        return np.exp(stats[..., 0] / stats[..., 1])


def _bleu(stats: np.ndarray) -> np.ndarray:
    flat = stats.reshape(-1, stats.shape[-1])
    return np.array([bleu_from_stats(row) for row in flat]).reshape(stats.shape[:-1])


@dataclass(frozen=True)
class Metric:
    """How a metric's summed per-example statistics become its score."""

    name: str
    higher_is_better: bool
    aggregate: Callable[[np.ndarray], np.ndarray]
    """Summed stats of shape (..., k) -> score of shape (...)."""

    def score(self, stats: np.ndarray) -> float:
        return float(self.aggregate(np.asarray(stats, dtype=np.float64).sum(axis=0)))


REGISTRY: dict[str, Metric] = {
    "perplexity": Metric("perplexity", False, _perplexity),
    "exact_match": Metric("exact_match", True, _ratio),
    "contains": Metric("contains", True, _ratio),
    "rouge_l": Metric("rouge_l", True, _ratio),
    "bleu": Metric("bleu", True, _bleu),
    "length_compliance": Metric("length_compliance", True, _ratio),
}


def generation_stats(
    names: Sequence[str],
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    budgets: Sequence[tuple[int, int | None, int | None]],
    norm: bool = True,
) -> dict[str, np.ndarray]:
    """Per-example statistics of every requested generation metric.

    ``budgets`` holds (answer tokens, max_tokens, max_chars) per example.
    """
    per_example: dict[str, Callable[[int], list[float]]] = {
        "exact_match": lambda i: [exact_match(predictions[i], references[i], norm), 1.0],
        "contains": lambda i: [contains(predictions[i], references[i], norm), 1.0],
        "rouge_l": lambda i: [rouge_l(predictions[i], references[i]), 1.0],
        "bleu": lambda i: bleu_stats(predictions[i], references[i]),
        "length_compliance": lambda i: [within_budget(predictions[i], *budgets[i]), 1.0],
    }
    return {
        name: np.array([per_example[name](i) for i in range(len(predictions))], dtype=np.float64)
        for name in names
        if name in per_example
    }


def example_scores(name: str, stats: np.ndarray) -> list[float]:
    """Each example's own score, for predictions.jsonl (BLEU: sentence BLEU)."""
    metric = REGISTRY[name]
    return [float(metric.aggregate(row)) for row in np.asarray(stats)]


def safe_float(x: float) -> float | None:
    """JSON has no inf/nan; None says the score is undefined (e.g. no tokens)."""
    return None if x is None or math.isnan(x) or math.isinf(x) else float(x)
