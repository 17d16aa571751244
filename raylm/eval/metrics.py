"""Metrics as per-example sufficient statistics plus an aggregate.

Each metric turns every example into a small vector of statistics and the corpus score
into a function of their sum. A mean metric stores (score, 1); perplexity stores
(summed NLL, tokens), so it stays token-weighted; BLEU stores sacrebleu's n-gram counts,
so a resample's BLEU is a real corpus BLEU, not a mean of sentence BLEUs. Bootstrap and
the paired test then only need one matrix product per metric, whatever the metric.
"""

from __future__ import annotations

import logging
import math
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np

from raylm.eval.text import cjk_split, contains_tokens, lcs_length, normalize, script_of, tokenize

log = logging.getLogger(__name__)


def exact_match(prediction: str, references: Sequence[str], norm: bool = True) -> float:
    """1 if the answer equals a reference; with ``norm``, after ``text.normalize`` (case,
    punctuation of any script, full width, spacing): "北京。" equals "北京"."""
    f = normalize if norm else str.strip
    return float(any(f(prediction) == f(r) for r in references))


def contains(prediction: str, references: Sequence[str], norm: bool = True) -> float:
    """1 if some reference occurs in the answer: for answers wrapped in a sentence.

    With ``norm``, whole-token containment on ``text.tokenize``: "2" is not found inside
    "2048", and 北京 is found in 答案是北京。 (CJK characters are tokens of their own)."""
    if norm:
        pred = tokenize(prediction)
        return float(any(contains_tokens(pred, tokenize(r)) for r in references))
    p = prediction.strip()
    return float(any(r.strip() in p for r in references if r.strip()))


def tokens_for_rouge(text: str) -> list[str]:
    """ROUGE-L's tokens: ``text.tokenize`` (lowercased words; one token per CJK character)."""
    return tokenize(text)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F1 (Lin 2004, beta=1) on ``tokens_for_rouge``; the best over references.
    我爱北京天安门 vs 我爱北京: LCS 4 of 7 and 4 characters, F1 = 8/11 = 0.727."""
    pred = tokens_for_rouge(prediction)
    best = 0.0
    for ref in references:
        gold = tokens_for_rouge(ref)
        lcs = lcs_length(pred, gold)
        if lcs:
            p, r = lcs / len(pred), lcs / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best


def bleu_tokenizer(setting: str, references: Sequence[Sequence[str]]) -> str:
    """The BLEU tokenizer for an eval set: ``setting`` unless it is ``auto``, which reads the
    references: kana (Japanese) or Hangul (Korean) -> ``cjk`` (13a, then one token per CJK
    character), Han only -> sacrebleu's ``zh``, otherwise sacrebleu's default ``13a``.

    auto never picks ``ja-mecab``/``ko-mecab``: they need optional packages
    (mecab-python3, ipadic / mecab-ko), and a gate's BLEU must not change with what happens
    to be installed; set ``bleu_tokenize`` to them explicitly where they are."""
    if setting != "auto":
        return setting
    script = script_of(r for refs in references for r in refs)
    return {"ja": "cjk", "ko": "cjk", "zh": "zh"}.get(script, "13a")


@cache
def _bleu_scorer(tokenize: str) -> tuple[object, Callable[[str], str]]:
    """(sacrebleu BLEU, how a text is prepared for it) for a tokenizer name."""
    from sacrebleu.metrics import BLEU
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    if tokenize == "cjk":
        t13a = Tokenizer13a()
        return BLEU(tokenize="none"), lambda s: cjk_split(t13a(_nfkc(s)))
    return BLEU(tokenize=tokenize), _nfkc


def _nfkc(text: str) -> str:
    return unicodedata.normalize("NFKC", text)


def bleu_stats(prediction: str, references: Sequence[str], tokenize: str = "13a") -> list[float]:
    """sacrebleu's sufficient statistics of one segment: [sys_len, ref_len, correct1-4,
    total1-4], read from the public BLEUScore of a one-segment corpus. Texts are NFKC'd
    first (full-width digits and letters count as ASCII); ``tokenize`` is a sacrebleu
    tokenizer name or ``cjk`` (see ``bleu_tokenizer``)."""
    bleu, prep = _bleu_scorer(tokenize)
    score = bleu.corpus_score([prep(prediction)], [[prep(r)] for r in references])  # type: ignore[attr-defined]
    return [score.sys_len, score.ref_len, *score.counts, *score.totals]


def bleu_from_stats(stats: np.ndarray) -> float:
    """Corpus BLEU (0-100, exp smoothing) from summed stats (any tokenizer: counts only)."""
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


def ratio(stats: np.ndarray) -> np.ndarray:
    """Summed (score, count) -> mean score: the aggregate of every mean metric."""
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
    "exact_match": Metric("exact_match", True, ratio),
    "contains": Metric("contains", True, ratio),
    "rouge_l": Metric("rouge_l", True, ratio),
    "bleu": Metric("bleu", True, _bleu),
    "length_compliance": Metric("length_compliance", True, ratio),
}


def generation_stats(
    names: Sequence[str],
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    budgets: Sequence[tuple[int, int | None, int | None]],
    norm: bool = True,
    bleu_tokenize: str = "auto",
) -> dict[str, np.ndarray]:
    """Per-example statistics of every requested generation metric.

    ``budgets`` holds (answer tokens, max_tokens, max_chars) per example; BLEU's tokenizer
    is ``bleu_tokenizer(bleu_tokenize, references)``, one for the whole set, so a
    resample's BLEU is a corpus BLEU under one tokenization.
    """
    tok = bleu_tokenizer(bleu_tokenize, references) if "bleu" in names else "13a"
    if "bleu" in names:
        log.info("BLEU tokenizer: %s (bleu_tokenize=%s)", tok, bleu_tokenize)
    per_example: dict[str, Callable[[int], list[float]]] = {
        "exact_match": lambda i: [exact_match(predictions[i], references[i], norm), 1.0],
        "contains": lambda i: [contains(predictions[i], references[i], norm), 1.0],
        "rouge_l": lambda i: [rouge_l(predictions[i], references[i]), 1.0],
        "bleu": lambda i: bleu_stats(predictions[i], references[i], tok),
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
