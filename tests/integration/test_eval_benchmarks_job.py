"""`raylm eval` on the shipped MMLU, C-Eval, GSM8K and HumanEval samples: every benchmark's
score with a bootstrap CI in eval.json, per-subject accuracy, the gate on ``mmlu/acc``, and
lm-eval's results on the same MMLU sample beside raylm's, pick for pick."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raylm.cluster import ClusterInfo

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "tests/assets/benchmarks"


@pytest.mark.timeout(240)
def test_eval_job_runs_benchmarks(
    ray_cluster: ClusterInfo, tiny_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "eval"
    conf = {
        "model": str(tiny_model),
        "metrics": [],
        "generation": {"engine": "hf"},  # the tiny model on CPU: vLLM's start-up would dominate
        "benchmarks": [
            {"name": "mmlu", "format": "mmlu", "path": str(ASSETS / "mmlu"), "shots": 1},
            {"name": "ceval", "format": "ceval", "path": str(ASSETS / "ceval"), "split": "val"},
            {
                "name": "gsm8k",
                "format": "gsm8k",
                "path": str(ASSETS / "gsm8k"),
                "shots": 1,
                "max_new_tokens": 16,
            },
            {
                "name": "humaneval",
                "format": "humaneval",
                "path": str(ASSETS / "humaneval/HumanEval.jsonl"),
                "max_new_tokens": 16,
            },
        ],
        "lm_eval": {"benchmarks": ["mmlu"]},
        "bootstrap": {"resamples": 200},
        "gate": {"min_metric": {"mmlu/acc": 0.0, "humaneval/pass@1": 0.5}},
        "output_dir": str(out),
    }
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(conf))
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.gcs_address, HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, str(ROOT / "jobs/eval.py"), str(path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "eval.json").read_text())

    keys = ["mmlu/acc", "mmlu/acc_norm", "ceval/acc", "ceval/acc_norm"]
    keys += ["gsm8k/exact_match", "humaneval/pass@1"]
    assert list(res["metrics"]) == keys
    sizes = {"mmlu": 12, "ceval": 12, "gsm8k": 10, "humaneval": 10}
    for name, m in res["metrics"].items():
        assert m["ci_low"] <= m["value"] <= m["ci_high"], name
        assert m["n"] == sizes[name.split("/")[0]]
    bench = res["benchmarks"]
    assert set(bench["mmlu"]["subjects"]) == {
        "abstract_algebra",
        "college_biology",
        "high_school_geography",
    }
    assert bench["ceval"]["subjects"]["computer_network"]["acc"]["n"] == 6
    assert len(bench["gsm8k"]["rows"]) == 10 and "extracted" in bench["gsm8k"]["rows"][0]
    assert "audit hook" in bench["humaneval"]["sandbox"]
    # an untrained model writes no working code: the gate names the benchmark key
    assert res["metrics"]["humaneval/pass@1"]["value"] == 0.0
    assert res["gate"]["passed"] is False
    assert any("humaneval/pass@1" in r and "FAILED" in r for r in res["gate"]["reasons"])
    # lm-eval on the same MMLU sample: the same accuracy and the same pick for every question
    lm = res["lm_eval"]["benchmarks"]["mmlu"]
    assert res["lm_eval"]["model"] == "hf"
    assert lm["acc"] == pytest.approx(res["metrics"]["mmlu/acc"]["value"])
    assert lm["same_prediction_as_raylm"] == 1.0 and lm["differs_from_raylm"] == []
