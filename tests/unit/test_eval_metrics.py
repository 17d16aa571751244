"""Generation metrics on cases small enough to check by hand, and BLEU against sacrebleu."""

from __future__ import annotations

import numpy as np
import pytest
import sacrebleu

from raylm.eval.metrics import (
    REGISTRY,
    contains,
    exact_match,
    example_scores,
    generation_stats,
    normalize,
    rouge_l,
    within_budget,
)


def test_normalize_and_exact_match() -> None:
    assert normalize("  The  Answer: PARIS! ") == "the answer paris"
    assert exact_match("Paris.", ["paris"]) == 1.0
    assert exact_match("Paris.", ["paris"], norm=False) == 0.0
    assert exact_match("Lyon", ["Paris", "Lyon"]) == 1.0  # any reference counts
    assert exact_match("Paris, France", ["Paris"]) == 0.0


def test_contains_is_whole_word() -> None:
    assert contains("The capital is Paris.", ["paris"]) == 1.0
    assert contains("Version 2.0 of it", ["2.0"]) == 1.0  # punctuation-normalised both sides
    assert contains("2048 tokens", ["2"]) == 0.0  # not a substring match inside a number
    assert contains("nothing here", ["Paris", "Lyon"]) == 0.0
    assert contains("anything", [""]) == 0.0  # an empty reference is never "contained"


def test_rouge_l_by_hand() -> None:
    # pred: the cat sat on mat (5), ref: the cat is on the mat (6); LCS = the cat on mat = 4.
    p, r = 4 / 5, 4 / 6
    assert rouge_l("The cat sat on mat", ["the cat is on the mat"]) == pytest.approx(
        2 * p * r / (p + r)
    )
    assert rouge_l("a b c", ["a b c"]) == 1.0
    assert rouge_l("x y", ["a b"]) == 0.0
    assert rouge_l("", ["a b"]) == 0.0
    # LCS is order-sensitive, unlike bag-of-words overlap: c b a vs a b c has LCS 1.
    assert rouge_l("c b a", ["a b c"]) == pytest.approx(1 / 3)
    assert rouge_l("a b", ["x", "a b"]) == 1.0  # best reference


HYPS = ["the cat sat on the mat", "a quick brown fox jumps", "hello", "", "the the the"]
REFS = ["the cat is on the mat", "the quick brown fox jumped over", "hello world", "x", "the cat"]


def test_bleu_equals_sacrebleu_corpus_bleu() -> None:
    stats = generation_stats(["bleu"], HYPS, [[r] for r in REFS], [(0, None, None)] * 5)["bleu"]
    expected = sacrebleu.corpus_bleu(HYPS, [REFS]).score
    assert REGISTRY["bleu"].score(stats) == pytest.approx(expected)
    # Any subset (a bootstrap resample) is also a real corpus BLEU, not a mean of sentences.
    subset = [0, 1, 1, 4]
    sub = sacrebleu.corpus_bleu([HYPS[i] for i in subset], [[REFS[i] for i in subset]]).score
    assert REGISTRY["bleu"].score(stats[subset]) == pytest.approx(sub)
    sentence = sacrebleu.sentence_bleu(HYPS[0], [REFS[0]]).score
    assert example_scores("bleu", stats)[0] == pytest.approx(sentence)


def test_bleu_with_two_references_matches_sacrebleu() -> None:
    refs = [["the cat is on the mat", "there is a cat on the mat"], ["hi there", "hello there"]]
    hyps = ["there is a cat on the mat", "hello there friend"]
    stats = generation_stats(["bleu"], hyps, refs, [(0, None, None)] * 2)["bleu"]
    streams = [[r[0] for r in refs], [r[1] for r in refs]]
    assert REGISTRY["bleu"].score(stats) == pytest.approx(
        sacrebleu.corpus_bleu(hyps, streams).score
    )


def test_length_compliance_budgets() -> None:
    assert within_budget("abc", 3, max_tokens=3, max_chars=None) == 1.0
    assert within_budget("abc", 4, max_tokens=3, max_chars=None) == 0.0
    assert within_budget("abcdef", 1, max_tokens=None, max_chars=5) == 0.0
    assert within_budget("anything", 10**6, max_tokens=None, max_chars=None) == 1.0
    budgets = [(2, 3, None), (5, 3, None), (1, None, 3), (1, None, 3)]
    preds = ["ab", "abcde", "abc", "abcd"]
    stats = generation_stats(["length_compliance"], preds, [["x"]] * 4, budgets)
    assert REGISTRY["length_compliance"].score(stats["length_compliance"]) == 0.5


def test_mean_metric_stats_shape_and_score() -> None:
    preds, refs = ["paris", "lyon", "nice"], [["Paris"], ["Paris"], ["Nice"]]
    stats = generation_stats(["exact_match", "rouge_l"], preds, refs, [(1, None, None)] * 3)
    assert set(stats) == {"exact_match", "rouge_l"}
    assert stats["exact_match"].shape == (3, 2)
    assert REGISTRY["exact_match"].score(stats["exact_match"]) == pytest.approx(2 / 3)
    assert example_scores("exact_match", stats["exact_match"]) == [1.0, 0.0, 1.0]


def test_perplexity_aggregate_is_token_weighted() -> None:
    # Doc A: 10 tokens at NLL 1 each; doc B: 1 token at NLL 5. Token-weighted mean NLL = 15/11.
    stats = np.array([[10.0, 10.0], [5.0, 1.0]])
    assert REGISTRY["perplexity"].score(stats) == pytest.approx(np.exp(15 / 11))
    assert REGISTRY["perplexity"].higher_is_better is False
