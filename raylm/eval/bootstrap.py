"""Percentile bootstrap intervals and the paired bootstrap test, over examples.

A resample is a vector of how often each example was drawn, so a resample's summed
statistics are one matrix product for any metric (see ``metrics``). The paired test
reuses the same draws for both models: the noise of which examples were drawn then
cancels, leaving only the difference between the models.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from raylm.eval.metrics import Metric, safe_float


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile-bootstrap confidence interval."""

    value: float | None
    ci_low: float | None
    ci_high: float | None
    n: int
    """Examples (generation metrics) or documents (perplexity) behind the score."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Comparison:
    """Tuned minus base on one metric, with the paired bootstrap's interval and p-value."""

    metric: str
    tuned: float | None
    base: float | None
    diff: float | None
    """tuned - base (for perplexity a negative diff is an improvement)."""
    ci_low: float | None
    ci_high: float | None
    p_value: float
    """One-sided: how often resampling finds tuned no better than base; small means the
    improvement is unlikely to be an accident of which examples were in the eval set."""
    higher_is_better: bool
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


def resample_counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) draw counts of n examples drawn with replacement."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    counts = np.zeros((resamples, n), dtype=np.float64)
    np.add.at(counts, (np.arange(resamples)[:, None], idx), 1.0)
    return counts


def _percentiles(samples: np.ndarray, confidence: float) -> tuple[float | None, float | None]:
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return None, None
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def confidence_interval(
    metric: Metric,
    stats: np.ndarray,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    stats = np.asarray(stats, dtype=np.float64)
    counts = resample_counts(len(stats), resamples, seed)
    samples = metric.aggregate(counts @ stats)
    low, high = _percentiles(samples, confidence)
    return Interval(safe_float(metric.score(stats)), low, high, len(stats))


def paired_bootstrap(
    metric: Metric,
    tuned: np.ndarray,
    base: np.ndarray,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Comparison:
    """Both models scored on the same resampled examples; rows of the two must pair up."""
    tuned, base = np.asarray(tuned, dtype=np.float64), np.asarray(base, dtype=np.float64)
    if len(tuned) != len(base):
        raise ValueError(f"paired bootstrap needs paired examples: {len(tuned)} != {len(base)}")
    counts = resample_counts(len(tuned), resamples, seed)
    diffs = metric.aggregate(counts @ tuned) - metric.aggregate(counts @ base)
    gain = diffs if metric.higher_is_better else -diffs
    not_better = int(np.sum(~(gain > 0)))  # ties and undefined resamples count against
    low, high = _percentiles(diffs, confidence)
    t, b = metric.score(tuned), metric.score(base)
    return Comparison(
        metric=metric.name,
        tuned=safe_float(t),
        base=safe_float(b),
        diff=safe_float(t - b),
        ci_low=low,
        ci_high=high,
        p_value=(not_better + 1) / (resamples + 1),
        higher_is_better=metric.higher_is_better,
        n=len(tuned),
    )
