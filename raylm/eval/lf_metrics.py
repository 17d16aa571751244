"""LLaMA-Factory's prediction metrics: BLEU-4 and ROUGE-1/2/L, computed the way it does.

LLaMA-Factory's ``ComputeSimilarity`` (src/llamafactory/train/sft/metric.py) scores each
prediction against its label and averages over examples, times 100:

- ROUGE: both texts segmented with jieba, re-joined with spaces, scored by
  ``rouge_chinese.Rouge().get_scores``: ROUGE-N F1 over the *sets* of word n-grams,
  ROUGE-L F1 over the longest common subsequence of all words (texts are first cut into
  sentences at ``。！？?``, ``......`` and ``……``, which only matters for empty pieces).
  An empty segmentation scores 0.
- BLEU-4: ``nltk.translate.bleu_score.sentence_bleu([list(label)], list(pred),
  smoothing_function=SmoothingFunction().method3)``: on *characters*, uniform 4-gram
  weights, NIST geometric smoothing (the k-th zero n-gram precision becomes
  1 / (2^k * its n-gram count)).

Both are re-implemented here (``rouge_chinese`` and ``nltk`` are not dependencies of
raylm); tests/unit/test_llamafactory_infer.py checks them on hand-computed examples, and
against the real packages where they are installed. The segmentation is jieba's when
jieba is installed (``pip install jieba``, as LLaMA-Factory requires); without it,
runs of ASCII letters and digits are words and every other non-space character is one
word: the same as jieba for English text, and for Chinese a per-character split, which
gives different ROUGE scores than LLaMA-Factory's (logged once). BLEU never segments.

What is shared with raylm's own metrics (``raylm.eval.text``): the LCS behind ROUGE-L.
What is not, on purpose: LLaMA-Factory keeps case and punctuation (a ``。`` is a word of
its ROUGE and a character of its BLEU) and scores ROUGE-N on n-gram *sets*, so reusing
``text.normalize``/``text.tokenize`` here would give numbers LLaMA-Factory never reports.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Sequence
from functools import cache

from raylm.eval.text import lcs_length

log = logging.getLogger(__name__)

METRICS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")

_WORD = re.compile(r"[A-Za-z0-9]+(?:\.\d+)?%?|\S")
"""The fallback segmentation: jieba's for ASCII (finalseg's ``[a-zA-Z0-9]+(\\.\\d+)?%?``
runs, other characters alone)."""


@cache
def _jieba() -> object | None:
    try:
        import jieba

        jieba.setLogLevel(logging.WARNING)
        return jieba
    except ImportError:
        log.warning(
            "jieba is not installed: ROUGE segments Chinese text per character, which "
            "differs from LLaMA-Factory's scores (pip install jieba for the same numbers)"
        )
        return None


def segment(text: str) -> list[str]:
    """Words as LLaMA-Factory's ROUGE sees them (jieba's, whitespace dropped)."""
    jieba = _jieba()
    if jieba is not None:
        return " ".join(jieba.cut(text)).split()  # type: ignore[attr-defined]
    return _WORD.findall(text)


def _cut_sent(para: str) -> list[str]:
    """rouge_chinese's sentence split."""
    para = re.sub(r"([。！？\?])([^”’])", r"\1\n\2", para)
    para = re.sub(r"(\.{6})([^”’])", r"\1\n\2", para)
    para = re.sub(r"(\…{2})([^”’])", r"\1\n\2", para)
    para = re.sub(r"([。！？\?][”’])([^，。！？\?])", r"\1\n\2", para)
    return para.rstrip().split("\n")


def _words(text: str) -> list[str]:
    """rouge_chinese's words of a space-joined text, across its sentences."""
    sentences = [" ".join(s.split()) for s in _cut_sent(text) if len(s) > 0]
    return [w for s in sentences for w in s.split(" ")]


def _f1(overlap: int, hyp: int, ref: int) -> float:
    p = overlap / hyp if hyp else 0.0
    r = overlap / ref if ref else 0.0
    return 2.0 * ((p * r) / (p + r + 1e-8))


def rouge(hypothesis: str, reference: str) -> dict[str, float]:
    """rouge_chinese's F1 of two space-joined texts: rouge-1, rouge-2, rouge-l."""
    hyp, ref = _words(hypothesis), _words(reference)
    out = {}
    for n in (1, 2):
        h = {tuple(hyp[i : i + n]) for i in range(len(hyp) - n + 1)}
        r = {tuple(ref[i : i + n]) for i in range(len(ref) - n + 1)}
        out[f"rouge-{n}"] = _f1(len(h & r), len(h), len(r))
    lcs = lcs_length(ref, hyp)
    p, r = lcs / len(hyp), lcs / len(ref)
    out["rouge-l"] = 2.0 * ((p * r) / (p + r + 1e-8))
    return out


def sentence_bleu4(reference: Sequence[str], hypothesis: Sequence[str]) -> float:
    """nltk's ``sentence_bleu([reference], hypothesis, smoothing_function=method3)``."""
    numerators, denominators = [], []
    for n in range(1, 5):
        hyp = Counter(tuple(hypothesis[i : i + n]) for i in range(len(hypothesis) - n + 1))
        ref = Counter(tuple(reference[i : i + n]) for i in range(len(reference) - n + 1))
        numerators.append(sum(min(c, ref[g]) for g, c in hyp.items()))
        denominators.append(max(1, sum(hyp.values())))
    if numerators[0] == 0:
        return 0.0
    c, r = len(hypothesis), len(reference)
    bp = 1.0 if c > r else (0.0 if c == 0 else math.exp(1 - r / c))
    precisions, k = [], 1
    for num, den in zip(numerators, denominators, strict=True):
        if num == 0:
            precisions.append(1 / (2**k * den))
            k += 1
        else:
            precisions.append(num / den)
    return bp * math.exp(math.fsum(0.25 * math.log(p) for p in precisions if p > 0))


def example_scores(prediction: str, label: str) -> dict[str, float]:
    """One example's scores, times 100 and rounded to 4 places, as LLaMA-Factory's."""
    hyp, ref = segment(prediction), segment(label)
    if not hyp or not ref:
        scores = dict.fromkeys(("rouge-1", "rouge-2", "rouge-l"), 0.0)
    else:
        scores = rouge(" ".join(hyp), " ".join(ref))
    scores["bleu-4"] = sentence_bleu4(list(label), list(prediction))
    return {k: round(scores[k] * 100, 4) for k in METRICS}


def predict_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """The mean of each metric over examples (``predict_results.json``'s scores)."""
    rows = [example_scores(p, lab) for p, lab in zip(predictions, labels, strict=True)]
    if not rows:
        return dict.fromkeys(METRICS, 0.0)
    return {k: sum(r[k] for r in rows) / len(rows) for k in METRICS}
