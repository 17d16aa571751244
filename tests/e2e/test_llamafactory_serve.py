"""LLaMA-Factory's inference YAML (examples/inference/qwen3_lora_sft.yaml, model and adapter
paths changed) served by `raylm serve` on the session cluster: the adapter answers as
``raylm:NAME``, chats render with the YAML's named template, the YAML's generating
arguments are the server's defaults, and `raylm chat`'s loop talks to it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import yaml

from raylm.cluster import ClusterInfo
from raylm.serve import deploy

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "tests/assets/llamafactory/examples/inference/qwen3_lora_sft.yaml"
APP = "raylm-lf-e2e"
KEY = "sk-lf-e2e-5b2c"  # test-only


@pytest.mark.timeout(600)
def test_inference_yaml_serves_adapter_template_and_defaults(
    ray_cluster: ClusterInfo, tiny_model: Path, tmp_path: Path
) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from raylm.serve.chat import chat_loop, openai_complete
    from raylm.tokenizer import load_tokenizer

    adapter = tmp_path / "saves" / "sft"
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), lora).save_pretrained(adapter)
    data = yaml.safe_load(EXAMPLE.read_text())
    data |= {"model_name_or_path": str(tiny_model), "adapter_name_or_path": str(adapter),
             "infer_dtype": "float32", "vllm_maxlen": 256, "vllm_max_lora_rank": 8,
             "do_sample": False, "max_new_tokens": 5}  # fmt: skip
    path = tmp_path / "infer.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "raylm.cli", "serve", str(path), f"app_name={APP}",
           "route_prefix=/lf", "http.port=0", f"output_dir={out}", "wait_ready_s=420"]  # fmt: skip
    try:
        proc = subprocess.run(cmd, env=os.environ | {"RAYLM_API_KEY": KEY},
                              capture_output=True, text=True, timeout=480)  # fmt: skip
        said = proc.stdout + proc.stderr
        assert proc.returncode == 0, said[-4000:]
        assert "clients pass model='raylm:sft'" in said
        url = json.loads((out / "manifest.json").read_text())["outputs"]["url"]
        client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=120)
        ids = {m.id for m in client.models.list().data}
        assert {"raylm", "raylm:sft"} <= ids

        messages = [{"role": "user", "content": "hello there"}]
        chat = client.chat.completions.create(model="raylm:sft", messages=messages)
        tok = load_tokenizer(str(tiny_model), "qwen3_nothink")
        rendered = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        rendered = rendered["input_ids"] if hasattr(rendered, "keys") else rendered
        assert chat.usage.prompt_tokens == len(rendered)  # the YAML's template, not the model's
        assert 0 < chat.usage.completion_tokens <= 5  # max_new_tokens is the server default

        turns = iter(["hi", "and again", "exit"])
        history = chat_loop(openai_complete(url, "raylm:sft", KEY, {"max_tokens": 3}),
                            read=lambda _: next(turns), write=lambda _: None)  # fmt: skip
        assert [m["role"] for m in history] == ["user", "assistant"] * 2
    finally:
        deploy.down(APP)
