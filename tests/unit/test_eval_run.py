"""The eval job's body without Ray: one model scored in-process, summarised and written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from raylm import config
from raylm.eval.run import evaluate_model, prediction_rows, prepare, summarize, write_outputs

ROOT = Path(__file__).resolve().parents[2]


def test_score_summarise_and_write(tiny_model: Path, tmp_path: Path) -> None:
    cfg = config.load(
        "eval",
        [ROOT / "conf/eval/default.yaml"],
        [
            f"model={tiny_model}",
            f"data.eval_path={ROOT / 'raylm/eval/sample/eval.jsonl'}",
            f"data.perplexity_path={ROOT / 'raylm/eval/sample/heldout.jsonl'}",
            "data.max_samples=4",
            "generation.max_new_tokens=6",
            "length_budget.max_tokens=3",
            "bootstrap.resamples=100",
        ],
    )
    inputs = prepare(cfg)
    out = evaluate_model(cfg.model, cfg, inputs.records, inputs.docs, None)
    assert set(out["stats"]) == set(cfg.metrics)
    assert out["stats"]["perplexity"].shape == (4, 2)
    assert len(out["predictions"]) == 4 and all(n <= 6 for n in out["answer_tokens"])
    outs = {"model": out}
    results = summarize(cfg, outs, inputs.records, inputs.docs)
    assert results["comparison"] is None and results["base_metrics"] is None
    compliant = sum(n <= 3 for n in out["answer_tokens"]) / 4
    assert results["metrics"]["length_compliance"]["value"] == compliant
    ppl = out["stats"]["perplexity"]
    assert math.isclose(
        results["metrics"]["perplexity"]["value"], math.exp(ppl[:, 0].sum() / ppl[:, 1].sum())
    )
    paths = write_outputs(results, prediction_rows(cfg, outs, inputs.records), tmp_path)
    on_disk = json.loads(Path(paths["eval"]).read_text(), parse_constant=_no_nan)
    assert on_disk["gate"]["passed"] == all(c["passed"] for c in on_disk["gate"]["checks"])
    rows = Path(paths["predictions"]).read_text().splitlines()
    assert [json.loads(r)["id"] for r in rows] == [
        "apache-00",
        "apache-01",
        "apache-02",
        "apache-03",
    ]
    report = Path(paths["report"]).read_text()
    assert report.count("\n| ") == 2 + len(cfg.metrics)  # header, separator, one row per metric


def _no_nan(name: str) -> float:
    raise AssertionError(f"eval.json must be strict JSON, found {name}")


def test_a_missing_bucket_path_fails_at_setup_naming_key_and_uri(
    s3_bucket: str, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Exit 2 with one line, before any output is written or Ray is reached."""
    from raylm import storage
    from raylm.runner import main

    missing = storage.join(s3_bucket, "no-such", "model")
    out = storage.join(s3_bucket, "no-such", "out")
    argv = [f"model={missing}", "metrics=[perplexity]", "ray.address=127.0.0.1:1"]
    argv += [f"data.perplexity_path={ROOT / 'raylm/eval/sample/heldout.jsonl'}"]
    assert main("eval", [*argv, f"output_dir={out}"]) == 2
    assert f"model={missing} is neither" in capsys.readouterr().err
    data = storage.join(s3_bucket, "no-such", "heldout.jsonl")
    argv = [f"model={tiny_model}", "metrics=[perplexity]", f"data.perplexity_path={data}"]
    assert main("eval", [*argv, f"output_dir={out}", "ray.address=127.0.0.1:1"]) == 2
    assert f"not found: data.perplexity_path={data}" in capsys.readouterr().err
    assert not storage.exists(out)
