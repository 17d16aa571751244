"""The LLM judge's pieces that need no server: the verdict parser, the swap rule, the win
rate, its gate check and its config."""

from __future__ import annotations

import pytest

from raylm.config import ConfigError
from raylm.eval.config import (
    BootstrapConfig,
    EvalDataConfig,
    EvalJobConfig,
    GateConfig,
    JudgeConfig,
)
from raylm.eval.gate import gate
from raylm.eval.judge import Pair, combine, judge_messages, parse_verdict, summarize_verdicts


@pytest.mark.parametrize(
    ("reply", "want"),
    [
        ("[[A]]", "A"),
        ("[[B]]", "B"),
        ("[[C]]", "tie"),
        ("[[tie]]", "tie"),
        ("[[ Tie ]]", "tie"),
        ("Assistant A is accurate, B is not. [[A]]", "A"),
        ('Output "[[A]]" if A is better... Having compared them: [[B]]', "B"),  # last wins
        ("A", "A"),
        ("b.", "B"),
        ("**A**", "A"),
        ("Tie", "tie"),
        ("tie.", "tie"),
        ("(B)", "B"),
        ("Assistant B", "B"),
        ("Verdict: B", "B"),
        ("Final verdict: [A]", "A"),
        ("My final verdict is tie.", "tie"),
        ("The winner is Assistant A.", "A"),
        ("Both are fine, but Assistant B is better.", "B"),
        ("Assistant A's answer is better.", "A"),
        ("", None),
        ("   ", None),
        (None, None),
        ("I like turtles.", None),
        ("The better answer is a short one.", None),  # "a" is an article, not a vote
        ("A and B are both answers", None),
    ],
)
def test_parse_verdict(reply: str | None, want: str | None) -> None:
    assert parse_verdict(reply) == want


@pytest.mark.parametrize(
    ("first", "second", "want"),
    [
        ("A", "B", "tuned"),  # tuned as A wins, then tuned as B wins: consistent
        ("B", "A", "base"),
        ("tie", "tie", "tie"),
        ("A", "A", "tie"),  # always the first position: position bias, not a preference
        ("B", "B", "tie"),
        ("A", "tie", "tie"),  # inconsistent across the swap
        ("tie", "B", "tie"),
    ],
)
def test_swap_consistency(first: str, second: str, want: str) -> None:
    assert combine(first, second) == want


def test_messages_put_each_answer_in_each_position() -> None:
    pair = Pair("Capital of China?", "Beijing", "Shanghai", "北京")
    first = judge_messages(pair, tuned_is_a=True, use_reference=True)[1]["content"]
    second = judge_messages(pair, tuned_is_a=False, use_reference=False)[1]["content"]
    assert first.index("Beijing") < first.index("Shanghai") and "北京" in first
    assert second.index("Shanghai") < second.index("Beijing") and "Reference" not in second


def test_win_rate_counts_ties_half_with_a_bootstrap_interval() -> None:
    verdicts = [("A", "B")] * 6 + [("B", "A")] * 2 + [("A", "A")] + [("tie", "tie")]
    out = summarize_verdicts(verdicts, BootstrapConfig(resamples=500))
    assert (out["wins"], out["losses"], out["ties"], out["inconsistent"]) == (6, 2, 2, 1)
    assert out["win_rate"]["value"] == pytest.approx((6 + 0.5 * 2) / 10)
    assert out["win_rate"]["ci_low"] < 0.7 < out["win_rate"]["ci_high"]
    assert out["win_rate"]["n"] == 10
    # decisive verdicts: A in 6 + 2 + 2 (A,A counts twice) of 18 -> position A 10/18
    assert out["first_position_rate"] == pytest.approx(10 / 18)
    assert out["outcomes"][:1] == ["tuned"] and out["outcomes"][-2:] == ["tie", "tie"]
    empty = summarize_verdicts([])
    assert empty["n"] == 0 and empty["win_rate"]["value"] is None


def _results(value: float | None, low: float | None) -> dict:
    judge = {"win_rate": {"value": value, "ci_low": low, "ci_high": 0.9, "n": 10}, "wins": 6,
             "losses": 2, "ties": 2, "inconsistent": 1, "model": "judge", "base_url": "http://j/v1"}  # fmt: skip
    return {"metrics": {}, "judge": judge}


def test_gate_judge_rule() -> None:
    ok = gate(_results(0.7, 0.45), GateConfig(min_judge_win_rate=0.6))
    assert ok.passed and ok.reasons[0].startswith("ok min_judge_win_rate: judge win rate = 0.7")
    assert "6 wins" in ok.reasons[0] and "http://j/v1" in ok.reasons[0]
    low = gate(_results(0.7, 0.45), GateConfig(min_judge_win_rate=0.6, use_ci_bound=True))
    assert not low.passed and "lower CI bound = 0.45 < min 0.6" in low.reasons[0]
    missing = gate({"metrics": {}, "judge": None}, GateConfig(min_judge_win_rate=0.5))
    assert not missing.passed and "no LLM-judge win rate" in missing.reasons[0]


def _job(**kw: object) -> EvalJobConfig:
    return EvalJobConfig(
        model="m", metrics=["exact_match"], data=EvalDataConfig(eval_path="x"), **kw
    )  # type: ignore[arg-type]


def test_judge_config_checks() -> None:
    judge = JudgeConfig(base_url="http://127.0.0.1:8000/v1", api_key_env="JUDGE_KEY")
    assert _job(base_model="b", judge=judge, gate=GateConfig(min_judge_win_rate=0.5))
    with pytest.raises(ConfigError, match="not hold the key itself"):
        JudgeConfig(base_url="http://x/v1", api_key_env="sk-abc123")
    with pytest.raises(ConfigError, match=r"needs judge\.base_url"):
        _job(base_model="b", gate=GateConfig(min_judge_win_rate=0.5))
    with pytest.raises(ConfigError, match="base_model"):
        _job(judge=judge)
    with pytest.raises(ConfigError, match=r"must be in \[0, 1\]"):
        GateConfig(min_judge_win_rate=1.5)
    with pytest.raises(ConfigError, match="max_concurrency"):
        JudgeConfig(max_concurrency=0)
