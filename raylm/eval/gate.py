"""The deployment gate: thresholds checked against eval results, with reasons a human reads.

``gate`` takes the eval job's results (the dict in ``eval.json``), so the pipeline can
re-check a finished evaluation against new thresholds without re-running it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from raylm.eval.config import GateConfig


@dataclass(frozen=True)
class Check:
    """One threshold and how the model fared against it."""

    name: str
    """min_metric, max_metric, max_perplexity, require_improvement_over_base,
    non_inferior_to_base, min_judge_win_rate or max_contamination_rate."""
    metric: str
    value: float | None
    threshold: float
    passed: bool
    message: str


@dataclass(frozen=True)
class Verdict:
    """Whether the model may be deployed, and why (one reason per check, failures first)."""

    passed: bool
    reasons: list[str]
    checks: list[Check] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gate(results: dict[str, Any], cfg: GateConfig) -> Verdict:
    """Check ``results`` (eval.json's content) against every threshold in ``cfg``."""
    metrics = results.get("metrics", {})
    checks = [
        *(_bound(metrics, m, t, "min_metric", cfg.use_ci_bound) for m, t in cfg.min_metric.items()),
        *(_bound(metrics, m, t, "max_metric", cfg.use_ci_bound) for m, t in cfg.max_metric.items()),
    ]
    if cfg.max_perplexity is not None:
        checks.append(
            _bound(metrics, "perplexity", cfg.max_perplexity, "max_perplexity", cfg.use_ci_bound)
        )
    if cfg.require_improvement_over_base is not None:
        checks.append(_improvement(results, cfg))
    if cfg.non_inferior_to_base is not None:
        checks.append(_non_inferior(results, cfg))
    if cfg.min_judge_win_rate is not None:
        checks.append(_judge(results, cfg.min_judge_win_rate, cfg.use_ci_bound))
    if cfg.max_contamination_rate is not None:
        checks += _contamination(results, cfg.max_contamination_rate)
    if not checks:
        return Verdict(True, ["no gate thresholds configured: passed by default"], [])
    ordered = sorted(checks, key=lambda c: c.passed)
    return Verdict(all(c.passed for c in checks), [c.message for c in ordered], ordered)


def _fmt(x: float | None) -> str:
    return "undefined" if x is None else f"{x:.4g}"


def _bound(metrics: dict, metric: str, threshold: float, name: str, use_ci: bool) -> Check:
    is_min = name == "min_metric"
    entry = metrics.get(metric)
    if not entry:
        msg = f"FAILED {name}: {metric} was not computed, so it cannot be checked against {threshold:g}"
        return Check(name, metric, None, threshold, False, msg)
    value = entry.get("value")
    label = metric
    if use_ci:
        value = entry.get("ci_low" if is_min else "ci_high")
        label = f"{metric} {'lower' if is_min else 'upper'} CI bound"
    ok = value is not None and (value >= threshold if is_min else value <= threshold)
    op = (">=" if ok else "<") if is_min else ("<=" if ok else ">")
    kind = "min" if is_min else "max"
    status = "ok" if ok else "FAILED"
    msg = f"{status} {name}: {label} = {_fmt(value)} {op} {kind} {threshold:g}"
    return Check(name, metric, value, threshold, ok, msg)


def _improvement(results: dict, cfg: GateConfig) -> Check:
    req = cfg.require_improvement_over_base
    assert req is not None
    name, metric = "require_improvement_over_base", req.metric
    comp = (results.get("comparison") or {}).get(metric)
    if not comp:
        msg = f"FAILED {name}: no comparison with a base model on {metric} in the results"
        return Check(name, metric, None, req.p_value, False, msg)
    diff, p = comp.get("diff"), comp["p_value"]
    gain = None if diff is None else (diff if comp["higher_is_better"] else -diff)
    better = gain is not None and gain > req.min_diff
    ok = better and p < req.p_value
    direction = "higher" if comp["higher_is_better"] else "lower"
    detail = (
        f"tuned {_fmt(comp['tuned'])} vs base {_fmt(comp['base'])} "
        f"(diff {_fmt(diff)}, {direction} is better, min improvement {req.min_diff:g}), "
        f"one-sided p = {p:.4g} {'<' if p < req.p_value else '>='} {req.p_value:g}"
    )
    msg = f"{'ok' if ok else 'FAILED'} {name}: {metric} {detail}"
    return Check(name, metric, p, req.p_value, ok, msg)


def _non_inferior(results: dict, cfg: GateConfig) -> Check:
    """Worse than base by at most the margin: the interval's pessimistic end of
    tuned - base (its low end when higher is better, its high end when lower is)."""
    req = cfg.non_inferior_to_base
    assert req is not None
    name, metric = "non_inferior_to_base", req.metric
    comp = (results.get("comparison") or {}).get(metric)
    if not comp or comp.get("base") is None:
        msg = f"FAILED {name}: no comparison with a base model on {metric} in the results"
        return Check(name, metric, None, req.margin, False, msg)
    margin = req.margin * abs(comp["base"]) if req.relative else req.margin
    up = comp["higher_is_better"]
    worst = comp.get("ci_low") if up else comp.get("ci_high")
    loss = None if worst is None else (-worst if up else worst)
    ok = loss is not None and loss <= margin
    share = f" ({req.margin:.1%} of base)" if req.relative else ""
    detail = (
        f"{_fmt(comp['tuned'])} vs base {_fmt(comp['base'])}: worst-case loss "
        f"{_fmt(loss)} by the paired bootstrap {'<=' if ok else '>'} margin {margin:.4g}{share}"
    )
    return Check(
        name, metric, loss, margin, ok, f"{'ok' if ok else 'FAILED'} {name}: {metric} {detail}"
    )


def _judge(results: dict, threshold: float, use_ci: bool) -> Check:
    """The LLM judge's win rate over the base model (``results["judge"]``, raylm.eval.judge)."""
    name, metric = "min_judge_win_rate", "judge_win_rate"
    win = ((results.get("judge") or {}).get("win_rate")) or {}
    if not win:
        msg = (
            f"FAILED {name}: no LLM-judge win rate in the results (judge.base_url and "
            f"base_model must be set), so it cannot be checked against {threshold:g}"
        )
        return Check(name, metric, None, threshold, False, msg)
    value = win.get("ci_low") if use_ci else win.get("value")
    label = "judge win rate lower CI bound" if use_ci else "judge win rate"
    ok = value is not None and value >= threshold
    j = results["judge"]
    detail = (
        f"(over base: {j.get('wins')} wins, {j.get('ties')} ties incl. "
        f"{j.get('inconsistent')} inconsistent across the swap, {j.get('losses')} losses; "
        f"judge {j.get('model')} at {j.get('base_url')})"
    )
    msg = f"{'ok' if ok else 'FAILED'} {name}: {label} = {_fmt(value)} {'>=' if ok else '<'} min {threshold:g} {detail}"
    return Check(name, metric, value, threshold, ok, msg)


SHOWN_EXAMPLES = 3
"""Overlapping examples a failed contamination check names."""


def _contamination(results: dict, threshold: float) -> list[Check]:
    """One check per eval set: its share of examples overlapping the training data
    (``results["contamination"]``, raylm.eval.contamination) at most ``threshold``."""
    name = "max_contamination_rate"
    sets = (results.get("contamination") or {}).get("sets")
    if sets is None:
        msg = (
            f"FAILED {name}: no contamination scan in the results (contamination.enabled), "
            f"so it cannot be checked against {threshold:g}"
        )
        return [Check(name, "contamination", None, threshold, False, msg)]
    checks = []
    for set_name, s in sets.items():
        rate = s["rate"]
        ok = rate <= threshold
        head = (
            f"{'ok' if ok else 'FAILED'} {name}: eval set {set_name!r} has "
            f"{s['n_contaminated']}/{s['n']} examples overlapping the training data "
            f"(rate {rate:.4g} {'<=' if ok else '>'} max {threshold:g})"
        )
        shown = [
            f"{b['id']} ({b['overlap']:.0%} of its n-grams, from {b['source']}): {b['snippet']!r}"
            for b in s["contaminated"][:SHOWN_EXAMPLES]
        ]
        more = s["n_contaminated"] - len(shown)
        tail = f"; {'; '.join(shown)}" + (f"; and {more} more" if more > 0 else "") if shown else ""
        checks.append(Check(name, f"contamination/{set_name}", rate, threshold, ok, head + tail))
    return checks
