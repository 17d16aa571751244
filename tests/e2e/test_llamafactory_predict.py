"""LLaMA-Factory's do_predict YAML run as `raylm generate` on the tiny model: the
eval_dataset's prompts are rendered with the named template, completed by vLLM through
ray.data.llm on the 2-CPU cluster, and LLaMA-Factory's two result files are written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raylm.cluster import ClusterInfo

ROOT = Path(__file__).resolve().parents[2]
LF = ROOT / "tests" / "assets" / "llamafactory"


@pytest.mark.timeout(420)
def test_predict_yaml_writes_llamafactory_results(
    ray_cluster: ClusterInfo, tiny_model: Path, tmp_path: Path
) -> None:
    data = yaml.safe_load((LF / "examples/extras/nlg_eval/llama3_lora_predict.yaml").read_text())
    del data["adapter_name_or_path"]  # the tiny model has no trained adapter here
    data |= {"model_name_or_path": str(tiny_model), "dataset_dir": str(LF / "data"),
             "max_samples": 2, "output_dir": str(tmp_path / "predict"),
             "template": "qwen3_nothink",  # llama3's <|eot_id|> is not in the tiny vocab
             "max_new_tokens": 8, "cutoff_len": 248, "do_sample": False}  # fmt: skip
    path = tmp_path / "predict.yaml"
    path.write_text(yaml.safe_dump(data))
    cmd = [sys.executable, "-m", "raylm.cli", "generate", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    out = tmp_path / "predict"
    lines = [json.loads(x) for x in (out / "generated_predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 4  # 2 of identity, 2 of alpaca_en_demo
    first = json.loads((LF / "data" / "identity.json").read_text())[0]
    assert lines[0]["prompt"].startswith("<|im_start|>user\n" + first["instruction"])
    assert lines[0]["label"] == first["output"]
    assert all(isinstance(x["predict"], str) for x in lines)
    results = json.loads((out / "predict_results.json").read_text())
    assert results["predict_samples"] == 4
    for name in ("predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l"):
        assert 0.0 <= results[name] <= 100.0
