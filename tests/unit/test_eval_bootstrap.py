"""Bootstrap intervals and the paired test behave as statistics say they should."""

from __future__ import annotations

import numpy as np
import pytest

from raylm.eval.bootstrap import confidence_interval, paired_bootstrap, resample_counts
from raylm.eval.metrics import REGISTRY


def _mean_stats(scores: np.ndarray) -> np.ndarray:
    return np.stack([scores, np.ones_like(scores)], axis=1)


def test_resample_counts_draw_n_with_replacement() -> None:
    counts = resample_counts(7, 50, seed=3)
    assert counts.shape == (50, 7)
    assert np.all(counts.sum(axis=1) == 7)
    assert np.array_equal(counts, resample_counts(7, 50, seed=3))  # seeded
    assert not np.array_equal(counts, resample_counts(7, 50, seed=4))


def test_ci_contains_point_estimate_and_narrows_with_n() -> None:
    rng = np.random.default_rng(0)
    widths = []
    for n in (20, 200, 2000):
        scores = rng.binomial(1, 0.6, size=n).astype(float)
        ci = confidence_interval(REGISTRY["exact_match"], _mean_stats(scores), 1000, 0.95, seed=1)
        assert ci.n == n
        assert ci.ci_low <= ci.value <= ci.ci_high
        assert ci.value == pytest.approx(scores.mean())
        widths.append(ci.ci_high - ci.ci_low)
    assert widths[0] > widths[1] > widths[2]
    # sqrt(n) law: 100x the data gives about a tenth of the width.
    assert 0.05 < widths[2] / widths[0] < 0.2


def test_ci_coverage_of_a_known_mean() -> None:
    """Over many independent eval sets the 95% interval should cover the true mean ~95%."""
    rng = np.random.default_rng(11)
    covered = 0
    for trial in range(100):
        scores = rng.binomial(1, 0.3, size=100).astype(float)
        ci = confidence_interval(REGISTRY["contains"], _mean_stats(scores), 400, 0.95, trial)
        covered += ci.ci_low <= 0.3 <= ci.ci_high
    assert 85 <= covered <= 100


def test_ci_of_constant_scores_is_a_point() -> None:
    ci = confidence_interval(REGISTRY["exact_match"], _mean_stats(np.ones(10)), 200)
    assert (ci.value, ci.ci_low, ci.ci_high) == (1.0, 1.0, 1.0)


def test_perplexity_ci_is_token_weighted() -> None:
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 50, size=40).astype(float)
    nll = tokens * rng.uniform(2.0, 3.0, size=40)
    ci = confidence_interval(REGISTRY["perplexity"], np.stack([nll, tokens], 1), 500)
    assert ci.value == pytest.approx(np.exp(nll.sum() / tokens.sum()))
    assert ci.ci_low < ci.value < ci.ci_high


def test_paired_bootstrap_detects_a_real_difference() -> None:
    rng = np.random.default_rng(5)
    base = rng.uniform(0, 1, size=60)
    tuned = np.clip(base + 0.1 + rng.normal(0, 0.05, size=60), 0, None)
    comp = paired_bootstrap(REGISTRY["rouge_l"], _mean_stats(tuned), _mean_stats(base), 1000)
    assert comp.diff == pytest.approx(tuned.mean() - base.mean())
    assert comp.ci_low > 0  # the whole interval is an improvement
    assert comp.p_value < 0.01
    # The same difference the other way round is not an improvement.
    rev = paired_bootstrap(REGISTRY["rouge_l"], _mean_stats(base), _mean_stats(tuned), 1000)
    assert rev.p_value > 0.99


def test_paired_bootstrap_is_calm_under_the_null() -> None:
    """Two models of equal quality: p < 0.05 should be rare (about 5% of eval sets)."""
    rng = np.random.default_rng(7)
    significant = 0
    for trial in range(40):
        a, b = rng.uniform(0, 1, size=(2, 50))
        comp = paired_bootstrap(
            REGISTRY["rouge_l"], _mean_stats(a), _mean_stats(b), 300, seed=trial
        )
        significant += comp.p_value < 0.05
    assert significant <= 6
    same = paired_bootstrap(REGISTRY["rouge_l"], _mean_stats(a), _mean_stats(a), 300)
    assert same.p_value == 1.0  # identical answers never count as an improvement
    assert same.diff == 0.0


def test_paired_bootstrap_lower_is_better_for_perplexity() -> None:
    tokens = np.full(30, 20.0)
    base = np.stack([tokens * 3.0, tokens], 1)
    tuned = np.stack([tokens * 2.5 + np.linspace(-1, 1, 30), tokens], 1)
    comp = paired_bootstrap(REGISTRY["perplexity"], tuned, base, 500)
    assert comp.higher_is_better is False
    assert comp.diff < 0
    assert comp.p_value < 0.01


def test_paired_bootstrap_needs_pairs() -> None:
    with pytest.raises(ValueError, match="paired examples"):
        paired_bootstrap(REGISTRY["rouge_l"], _mean_stats(np.ones(3)), _mean_stats(np.ones(4)))
