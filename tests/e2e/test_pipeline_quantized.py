"""A pipeline whose served model is a quantized export (issue 17's last link):
train -> eval -> gate -> export (merge, merge check, GPTQ 4-bit) -> export_eval (the
quantized copy non-inferior to the merged model on perplexity) -> gate -> serve, the
quantized copy, in bfloat16 on this CPU. The real `openai` client talks to it, and the
lineage names every link from the served model back to the train run.
"""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from raylm import cli
from raylm.cluster import ClusterInfo

APP = "quantized-e2e"


@pytest.mark.timeout(1500)
def test_pipeline_serves_the_gated_gptq_export(
    ray_cluster: ClusterInfo, tiny_model: Path, tmp_path: Path
) -> None:
    from raylm.pipeline.lineage import describe
    from raylm.serve import deploy

    args = ["pipeline", "conf/pipeline/quantized.yaml", f"workspace={tmp_path}",
            f"train.overrides=[model.name_or_path={tiny_model},export.merge_lora=false,"
            "train.max_steps=2]",
            f"serve.overrides=[app_name={APP},route_prefix=/{APP},auth.required=false,"
            "http.port=0]"]  # fmt: skip
    run_dir = tmp_path / "quantized"
    try:
        assert cli.main(args) == 0
        summary = json.loads((run_dir / "manifest.json").read_text())["metrics"]
        assert summary["stages"] == dict.fromkeys(
            ["train", "eval", "export", "export_eval", "serve"], "ran"
        )
        check = json.loads((run_dir / "export" / "export_check.json").read_text())
        q = check["quantize"]
        assert check["check"]["prompts"] and q["hf_model_dir"]  # merge checked, then GPTQ
        assert q["perplexity"] <= q["merged_perplexity"] * 1.05

        verdict = json.loads((run_dir / "export_eval" / "eval.json").read_text())["gate"]
        assert verdict["passed"], verdict
        served = json.loads((run_dir / "serve" / "manifest.json").read_text())
        quantized = str(run_dir / "export" / "quantized")
        assert quantized in served["inputs"]  # the quantized copy is what serves
        assert (
            json.loads((Path(quantized) / "config.json").read_text())["quantization_config"][
                "format"
            ]
            == "pack-quantized"
        )

        client = openai.OpenAI(base_url=served["outputs"]["url"], api_key="none", max_retries=0)
        reply = client.completions.create(
            model="tiny", prompt="The capital of France is", max_tokens=4, temperature=0
        )
        assert reply.usage.completion_tokens >= 1

        lineage = json.loads((run_dir / "lineage.json").read_text())
        assert quantized in lineage["served"]["inputs"]
        assert str(run_dir / "export") in lineage["export_evaluation"]["inputs"]
        assert lineage["training"]["checkpoint"] in lineage["export"]["inputs"]
        text = describe(str(run_dir))
        assert "exported:" in text and "export gate: passed" in text
    finally:
        deploy.down(APP)
