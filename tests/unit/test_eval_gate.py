"""The gate's verdicts and the reasons a person reads when a model is held back."""

from __future__ import annotations

from typing import Any

import pytest

from raylm import config
from raylm.config import ConfigError
from raylm.eval.config import GateConfig, ImprovementConfig
from raylm.eval.gate import gate


def _results(comparison: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "metrics": {
            "perplexity": {"value": 12.5, "ci_low": 11.0, "ci_high": 14.0, "n": 10},
            "rouge_l": {"value": 0.31, "ci_low": 0.18, "ci_high": 0.44, "n": 40},
            "exact_match": {"value": 0.1, "ci_low": 0.0, "ci_high": 0.2, "n": 40},
        },
        "comparison": comparison,
    }


COMPARISON = {
    "rouge_l": {
        "metric": "rouge_l",
        "tuned": 0.31,
        "base": 0.20,
        "diff": 0.11,
        "ci_low": 0.04,
        "ci_high": 0.18,
        "p_value": 0.004,
        "higher_is_better": True,
        "n": 40,
    },
    "perplexity": {
        "metric": "perplexity",
        "tuned": 12.5,
        "base": 11.0,
        "diff": 1.5,
        "ci_low": 0.5,
        "ci_high": 2.5,
        "p_value": 0.98,
        "higher_is_better": False,
        "n": 10,
    },
}


def test_passes_when_every_threshold_holds() -> None:
    cfg = GateConfig(
        max_perplexity=20,
        min_metric={"rouge_l": 0.2},
        require_improvement_over_base=ImprovementConfig("rouge_l", 0.05),
    )
    verdict = gate(_results(COMPARISON), cfg)
    assert verdict.passed
    assert len(verdict.reasons) == 3 and all(r.startswith("ok ") for r in verdict.reasons)
    assert "perplexity = 12.5 <= max 20" in " ".join(verdict.reasons)


def test_failures_name_metric_value_and_threshold_first() -> None:
    cfg = GateConfig(max_perplexity=10, min_metric={"rouge_l": 0.2, "exact_match": 0.5})
    verdict = gate(_results(), cfg)
    assert not verdict.passed
    assert verdict.reasons[:2] == [
        "FAILED min_metric: exact_match = 0.1 < min 0.5",
        "FAILED max_perplexity: perplexity = 12.5 > max 10",
    ]
    assert verdict.reasons[2] == "ok min_metric: rouge_l = 0.31 >= min 0.2"
    assert [c.passed for c in verdict.checks] == [False, False, True]
    assert verdict.to_dict()["checks"][0]["threshold"] == 0.5


def test_ci_bound_is_the_pessimistic_end() -> None:
    cfg = GateConfig(min_metric={"rouge_l": 0.2}, max_metric={"perplexity": 13}, use_ci_bound=True)
    verdict = gate(_results(), cfg)
    assert not verdict.passed
    assert "rouge_l lower CI bound = 0.18 < min 0.2" in verdict.reasons[0]
    assert "perplexity upper CI bound = 14 > max 13" in verdict.reasons[1]


def test_improvement_needs_significance_and_direction() -> None:
    strict = GateConfig(require_improvement_over_base=ImprovementConfig("rouge_l", 0.001))
    verdict = gate(_results(COMPARISON), strict)
    assert not verdict.passed
    assert "one-sided p = 0.004 >= 0.001" in verdict.reasons[0]
    # Perplexity went up (worse): fails even with a lax p threshold.
    ppl = GateConfig(require_improvement_over_base=ImprovementConfig("perplexity", 1.0))
    verdict = gate(_results(COMPARISON), ppl)
    assert not verdict.passed
    assert "lower is better" in verdict.reasons[0]
    # A real improvement smaller than min_diff does not count.
    big = GateConfig(require_improvement_over_base=ImprovementConfig("rouge_l", 0.05, 0.2))
    assert not gate(_results(COMPARISON), big).passed


def test_missing_results_fail_with_a_reason() -> None:
    cfg = GateConfig(
        min_metric={"bleu": 10}, require_improvement_over_base=ImprovementConfig("rouge_l")
    )
    verdict = gate(_results(None), cfg)
    assert not verdict.passed
    assert "bleu was not computed" in verdict.reasons[0]
    assert "no comparison with a base model on rouge_l" in verdict.reasons[1]


def test_no_thresholds_pass_and_say_so() -> None:
    verdict = gate(_results(), GateConfig())
    assert verdict.passed
    assert "no gate thresholds" in verdict.reasons[0]


def test_gate_config_loads_from_yaml_overrides(tmp_path) -> None:
    conf = tmp_path / "eval.yaml"
    conf.write_text(
        "model: m\nbase_model: b\ndata: {eval_path: e.jsonl, perplexity_path: p.jsonl}\n"
        "gate:\n  max_perplexity: 50\n  min_metric: {rouge_l: 0.2}\n"
        "  require_improvement_over_base: {metric: rouge_l, p_value: 0.05}\n"
    )
    cfg = config.load("eval", [conf])
    assert cfg.gate.min_metric == {"rouge_l": 0.2}
    assert cfg.gate.require_improvement_over_base == ImprovementConfig("rouge_l", 0.05)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["gate.min_metric.rogue_l=0.2"], "did you mean 'rouge_l'"),
        (["metrics=[rouge_l]", "gate.max_perplexity=5"], "gate checks ['perplexity']"),
        (["base_model=null", "gate.require_improvement_over_base.metric=bleu"], "needs base_model"),
        (["gate.require_improvement_over_base.p_value=0"], "must be in (0, 1]"),
        (["gate.max_perplexity=-1"], "must be > 0"),
        (
            ["base_model=null", "gate.non_inferior_to_base.margin=0.1"],
            "non_inferior_to_base needs base_model",
        ),
        (["gate.non_inferior_to_base.metric=perplexit"], "did you mean 'perplexity'"),
    ],
)
def test_bad_gate_config_is_explained(overrides: list[str], message: str) -> None:
    base = ["model=m", "base_model=b", "data.eval_path=e", "data.perplexity_path=p"]
    with pytest.raises(ConfigError) as err:
        config.load("eval", [], base + overrides)
    assert message in str(err.value)


def test_non_inferiority_bounds_the_worst_case_loss() -> None:
    from raylm.eval.config import NonInferiorityConfig

    # perplexity 12.5 vs base 11.0, diff CI [0.5, 2.5]: worst case +2.5 = 22.7 % of base
    loose = GateConfig(non_inferior_to_base=NonInferiorityConfig("perplexity", margin=0.25))
    tight = GateConfig(non_inferior_to_base=NonInferiorityConfig("perplexity", margin=0.2))
    assert gate(_results(COMPARISON), loose).passed
    verdict = gate(_results(COMPARISON), tight)
    assert not verdict.passed and "worst-case loss 2.5" in verdict.reasons[0]
    # rouge_l higher is better, diff CI [0.04, 0.18]: never worse, passes even a zero margin
    zero = NonInferiorityConfig("rouge_l", margin=0.0, relative=False)
    assert gate(_results(COMPARISON), GateConfig(non_inferior_to_base=zero)).passed
    absolute = NonInferiorityConfig("perplexity", margin=2.0, relative=False)
    assert not gate(_results(COMPARISON), GateConfig(non_inferior_to_base=absolute)).passed
    assert not gate(_results(None), loose).passed  # no base compared: fails, saying so
