"""The eval job end to end on the session Ray cluster: two tiny models, paired, gated."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raylm.cluster import ClusterInfo
from raylm.manifest import hash_path
from raylm.models.tiny import TinySpec, build

ROOT = Path(__file__).resolve().parents[2]
METRICS = ["perplexity", "exact_match", "contains", "rouge_l", "bleu", "length_compliance"]


def _run_job(
    args: list[str], cluster: ClusterInfo, conf: Path = ROOT / "conf/eval/default.yaml"
) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_ADDRESS=cluster.gcs_address)
    cmd = [sys.executable, str(ROOT / "jobs/eval.py"), str(conf), *args]
    try:
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=360)
    except subprocess.TimeoutExpired as err:
        tail = (err.stderr or b"")[-3000:]
        pytest.fail(f"eval job still running after 360 s; its log ends with:\n{tail!r}")


@pytest.mark.timeout(480)
def test_eval_job_compares_two_models(
    ray_cluster: ClusterInfo, tiny_model: Path, tmp_path: Path
) -> None:
    other = build(tmp_path / "tiny-seed1", TinySpec(seed=1))
    out = tmp_path / "eval"
    proc = _run_job(
        [
            f"model={tiny_model}",
            f"base_model={other}",
            f"output_dir={out}",
            "generation.max_new_tokens=12",
            "length_budget.max_tokens=8",
            "bootstrap.resamples=500",
            "gate.max_perplexity=1e6",
            "gate.min_metric={rouge_l: 0.5}",
            "gate.require_improvement_over_base.metric=perplexity",
        ],
        ray_cluster,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "eval.json").read_text())

    assert res["model"] == {"path": str(tiny_model), "kind": "full", "base": None}
    assert res["base_model"]["path"] == str(other)
    assert (res["n_examples"], res["n_perplexity_docs"]) == (16, 10)
    assert list(res["metrics"]) == METRICS == list(res["base_metrics"]) == list(res["comparison"])
    for scores in (res["metrics"], res["base_metrics"]):
        for name, m in scores.items():
            assert m["ci_low"] <= m["value"] <= m["ci_high"], name
            assert m["n"] == (10 if name == "perplexity" else 16)
    # A random 2k-vocabulary model is close to uniform: perplexity near the vocabulary size.
    assert 500 < res["metrics"]["perplexity"]["value"] < 10_000
    assert res["metrics"]["perplexity"]["value"] != res["base_metrics"]["perplexity"]["value"]
    for name, c in res["comparison"].items():
        assert c["diff"] == pytest.approx(c["tuned"] - c["base"]), name
        assert c["tuned"] == res["metrics"][name]["value"]
        assert c["ci_low"] <= c["ci_high"] and 0 < c["p_value"] <= 1
    # The one-sided p-value points the same way as the observed difference, and the gate's
    # improvement check follows the p-value.
    ppl = res["comparison"]["perplexity"]
    assert (ppl["p_value"] < 0.5) == (ppl["diff"] < 0)
    improved = ppl["diff"] < 0 and ppl["p_value"] < 0.05
    check = next(c for c in res["gate"]["checks"] if c["name"] == "require_improvement_over_base")
    assert check["passed"] == improved and check["value"] == ppl["p_value"]

    gate = res["gate"]
    assert gate["passed"] is False  # an untrained model cannot reach ROUGE-L 0.5
    assert any(r.startswith("FAILED min_metric: rouge_l = ") for r in gate["reasons"])
    failed_first = [r.startswith("FAILED") for r in gate["reasons"]]
    assert failed_first == sorted(failed_first, reverse=True)
    assert len(gate["reasons"]) == len(gate["checks"]) == 3
    names = {c["name"] for c in gate["checks"]}
    assert names == {"min_metric", "max_perplexity", "require_improvement_over_base"}
    assert any(r.startswith("ok max_perplexity") for r in gate["reasons"])

    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and rows[0]["id"] == "apache-00"
    assert {"prediction", "base_prediction", "scores", "base_scores"} <= set(rows[0])
    share = sum(r["answer_tokens"] <= 8 for r in rows) / 16
    assert res["metrics"]["length_compliance"]["value"] == pytest.approx(share)
    assert all(r["answer_tokens"] <= 12 for r in rows)

    report = (out / "report.md").read_text()
    assert "| rouge_l |" in report and "**Gate: FAILED**" in report

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["job"] == "eval" and manifest["status"] == "succeeded"
    eval_set = str(ROOT / "raylm/eval/sample/eval.jsonl")
    assert manifest["inputs"][str(tiny_model)] == hash_path(tiny_model)
    assert manifest["inputs"][str(other)] == hash_path(other)
    assert manifest["inputs"][eval_set] == hash_path(eval_set)
    assert manifest["metrics"]["gate_passed"] is False
    assert manifest["outputs"]["eval"] == str(out / "eval.json")
    assert (out / "config.resolved.yaml").exists()


@pytest.mark.timeout(420)
def test_eval_job_on_a_bucket_fails_its_gate_with_exit_code_3(
    ray_cluster: ClusterInfo, tiny_model: Path, s3_bucket: str, tmp_path: Path
) -> None:
    """Model, eval set, held-out text and output_dir all on s3://: the Ray task loads its
    node's copy of the model (storage.local_dir), results and manifest go to the bucket;
    ``fail_on_gate`` turns the failed gate into exit code 3."""
    from raylm import storage

    base = storage.join(s3_bucket, "eval-job")
    model = storage.join(base, "models", "tiny")
    storage.copy_dir(str(tiny_model), model)
    data = {}
    for name in ("eval.jsonl", "heldout.jsonl"):
        data[name] = storage.join(base, "data", name)
        storage.write_text(data[name], (ROOT / "raylm/eval/sample" / name).read_text())
    out = storage.join(base, "out")
    conf = tmp_path / "bucket.yaml"
    conf.write_text(
        f"model: {model}\nmetrics: [perplexity, exact_match]\n"
        f"data: {{perplexity_path: {data['heldout.jsonl']}, eval_path: {data['eval.jsonl']}, "
        f"max_samples: 3}}\ngeneration: {{engine: hf, max_new_tokens: 4}}\nbootstrap: {{resamples: 100}}\n"
        f"gate: {{max_perplexity: 2}}\nfail_on_gate: true\noutput_dir: {out}\n"
    )
    proc = _run_job([], ray_cluster, conf)
    assert proc.returncode == 3, proc.stderr[-3000:]
    res = json.loads(storage.read_text(storage.join(out, "eval.json")))
    assert res["model"] == {"path": model, "kind": "full", "base": None}
    assert list(res["metrics"]) == ["perplexity", "exact_match"] and res["comparison"] is None
    assert (res["n_examples"], res["n_perplexity_docs"]) == (3, 3)
    assert res["gate"]["reasons"][0].startswith("FAILED max_perplexity: perplexity = ")
    assert storage.read_text(storage.join(out, "report.md")).startswith(
        f"# Evaluation of `{model}`"
    )
    assert len(storage.read_text(storage.join(out, "predictions.jsonl")).splitlines()) == 3
    manifest = json.loads(storage.read_text(storage.join(out, "manifest.json")))
    assert manifest["status"] == "succeeded" and manifest["outputs"]["eval"] == f"{out}/eval.json"
    assert manifest["inputs"][model].startswith("listing:")
    assert storage.exists(storage.join(out, "config.resolved.yaml"))
