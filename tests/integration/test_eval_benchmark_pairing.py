"""Benchmarks through the eval job's body without Ray: two models scored in-process, their
benchmark statistics paired by the job's own bootstrap and checked by the gate."""

from __future__ import annotations

from pathlib import Path

import pytest

from raylm.eval.config import (
    BenchmarkConfig,
    EvalJobConfig,
    GateConfig,
    GenerationConfig,
    ImprovementConfig,
)
from raylm.eval.run import evaluate_model, prepare, summarize

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "benchmarks"


@pytest.mark.timeout(180)
def test_benchmarks_are_paired_and_gated(tiny_model: Path, tmp_path: Path) -> None:
    import torch

    from raylm.models.tiny import TinySpec, build

    torch.set_num_threads(1)
    other = build(tmp_path / "tiny-seed1", TinySpec(seed=1))
    cfg = EvalJobConfig(
        model=str(tiny_model),
        base_model=str(other),
        metrics=[],
        generation=GenerationConfig(engine="hf"),
        benchmarks=[
            BenchmarkConfig(name="cmmlu", format="cmmlu", path=str(ASSETS / "cmmlu"), shots=1),
            BenchmarkConfig(
                name="gsm8k",
                format="gsm8k",
                path=str(ASSETS / "gsm8k"),
                max_samples=3,
                max_new_tokens=8,
            ),
            BenchmarkConfig(
                name="mbpp",
                format="mbpp",
                path=str(ASSETS / "mbpp"),
                max_samples=2,
                n_samples=2,
                k=[1, 2],
                max_new_tokens=8,
            ),
        ],
        gate=GateConfig(
            min_metric={"cmmlu/acc": 0.0},
            require_improvement_over_base=ImprovementConfig(metric="cmmlu/acc"),
        ),
    )
    cfg.bootstrap.resamples = 100
    inputs = prepare(cfg)
    outs = {
        role: evaluate_model(info.path, cfg, [], [], None, inputs.benchmarks)
        for role, info in inputs.models.items()
    }
    keys = ["cmmlu/acc", "cmmlu/acc_norm", "gsm8k/exact_match", "mbpp/pass@1", "mbpp/pass@2"]
    assert sorted(outs["model"]["stats"]) == sorted(keys)
    assert outs["model"]["stats"]["cmmlu/acc"].shape == (12, 2)
    results = summarize(cfg, outs, [], [])
    assert list(results["metrics"]) == keys == list(results["comparison"])
    c = results["comparison"]["cmmlu/acc"]
    assert c["n"] == 12 and c["diff"] == pytest.approx(c["tuned"] - c["base"])
    assert c["tuned"] == results["metrics"]["cmmlu/acc"]["value"]
    subjects = results["benchmarks"]["cmmlu"]["subjects"]
    assert set(subjects) == {"chinese_history", "elementary_mathematics"}
    assert set(results["benchmarks"]["cmmlu"]["base_subjects"]) == set(subjects)
    assert len(results["benchmarks"]["mbpp"]["rows"]) == 2
    assert results["benchmarks"]["mbpp"]["rows"][0]["n"] == 2
    names = [ch["metric"] for ch in results["gate"]["checks"]]
    assert sorted(names) == ["cmmlu/acc", "cmmlu/acc"]
    improvement = next(
        ch for ch in results["gate"]["checks"] if ch["name"] == "require_improvement_over_base"
    )
    assert improvement["value"] == c["p_value"]
