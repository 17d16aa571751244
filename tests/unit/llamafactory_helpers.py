"""What the LLaMA-Factory tests share: the copied assets and YAML builders.
(The assets make relative paths resolve as in a LLaMA-Factory checkout.)
(Imported by name: pytest puts tests/unit on sys.path for its test modules; the
integration tier loads it by path. The ``workspace`` fixture is in tests/unit/conftest.py.)"""

from __future__ import annotations

from pathlib import Path

import yaml

ASSETS = Path(__file__).resolve().parents[1] / "assets"
LF = ASSETS / "llamafactory"

# Example YAML (under examples/) -> None if it loads, else the keys it is refused for.
# (tests/unit/test_llamafactory.py loads each; tests/integration/test_llamafactory_train.py
# trains each that loads.) "serve" / "generate" / "export": an inference, do_predict or
# merge YAML, which loads as that job (tests/unit/test_llamafactory_infer.py,
# test_llamafactory_export.py) and which train refuses naming the job.
PARTITION: dict[str, tuple[str, ...] | str | None] = {
    "extras/adam_mini/qwen2_full_sft.yaml": ("use_adam_mini",),
    "extras/apollo/llama3_full_sft.yaml": ("use_apollo",),
    "extras/asft/llama2_full_asft.yaml": None,
    "extras/asft/qwen2_full_asft.yaml": None,
    "extras/badam/llama3_full_sft.yaml": ("use_badam",),
    "extras/dft/qwen2_full_sft.yaml": None,
    "extras/eaft/qwen25_05b_eaft_full.yaml": None,
    "extras/fp8/llama3_fp8_deepspeed_sft.yaml": ("fp8",),
    "extras/fp8/llama3_fp8_fsdp_sft.yaml": ("fp8", "fsdp", "fsdp_transformer_layer_cls_to_wrap"),
    "extras/fsdp_qlora/llama3_lora_sft.yaml": None,
    "extras/galore/llama3_full_sft.yaml": ("use_galore",),
    "extras/llama_pro/llama3_freeze_sft.yaml": None,
    "extras/loraplus/llama3_lora_sft.yaml": None,
    "extras/mod/llama3_full_sft.yaml": ("mixture_of_depths", "optim"),
    "extras/muon/qwen2_full_sft.yaml": None,
    "extras/nlg_eval/llama3_lora_predict.yaml": "generate",  # raylm generate FILE
    "extras/oft/llama3_oft_sft.yaml": None,
    "extras/pissa/llama3_lora_sft.yaml": None,
    # Plain OFT on pre-quantized hub checkpoints, as train_qlora's gptq/awq below; bnb_npu
    # quantizes the base with bitsandbytes (CUDA kernels, Ascend NPU builds) for OFT.
    "extras/qoft/llama3_oft_sft_awq.yaml": None,
    "extras/qoft/llama3_oft_sft_bnb_npu.yaml": ("quantization_bit",),
    "extras/qoft/llama3_oft_sft_gptq.yaml": None,
    "inference/qwen3.yaml": "serve",  # raylm serve FILE
    "inference/qwen3_full_sft.yaml": "serve",
    "inference/qwen3_lora_sft.yaml": "serve",
    "merge_lora/qwen3_full_sft.yaml": "export",  # raylm export FILE
    "merge_lora/qwen3_gptq.yaml": "export",  # quantize.method=gptq (llmcompressor)
    "merge_lora/qwen3_lora_sft.yaml": "export",
    "train_full/qwen3_full_sft.yaml": None,
    "train_lora/qwen3_lora_dpo.yaml": None,
    "train_lora/qwen3_lora_kto.yaml": None,
    "train_lora/qwen3_lora_pretrain.yaml": None,
    "train_lora/qwen3_lora_reward.yaml": None,
    "train_lora/qwen3_lora_sft.yaml": None,
    "train_lora/qwen3_lora_sft_ds3.yaml": None,
    "train_lora/qwen3_lora_sft_ray.yaml": ("dataset_dir",),
    "train_lora/qwen3_preprocess.yaml": ("tokenized_path",),
    # Pre-quantized hub checkpoints: the YAML is plain LoRA; a local checkpoint whose
    # config.json declares gptq/awq/aqlm is refused (test_prequantized_checkpoint_...).
    "train_qlora/llama3_lora_sft_aqlm.yaml": None,
    "train_qlora/llama3_lora_sft_awq.yaml": None,
    "train_qlora/llama3_lora_sft_gptq.yaml": None,
    "train_qlora/qwen3_lora_sft_bnb_npu.yaml": None,
    "train_qlora/qwen3_lora_sft_otfq.yaml": None,
}
QLORA = {
    "extras/fsdp_qlora/llama3_lora_sft.yaml",
    "train_qlora/qwen3_lora_sft_bnb_npu.yaml",
    "train_qlora/qwen3_lora_sft_otfq.yaml",
}


USER_DATA = {
    "extras/asft/llama2_full_asft.yaml": "alpaca_en_demo",  # names med, the user's own
    "extras/asft/qwen2_full_asft.yaml": "alpaca_en_demo",  # names math, the user's own
}
"""Examples that name datasets LLaMA-Factory's registry lacks (the user registers
them), and the demo dataset they are loaded with here instead."""


def example(rel: str, tmp_path: Path, model: Path | str, **extra: object) -> Path:
    """The example with the model replaced by ``model`` and output_dir by a tmp dir."""
    data = yaml.safe_load((LF / "examples" / rel).read_text())
    data["model_name_or_path"] = str(model)
    if rel in USER_DATA:  # a dataset LLaMA-Factory's dataset_info.json does not register
        data["dataset"] = USER_DATA[rel]
    if "output_dir" in data:
        data["output_dir"] = str(tmp_path / "saves" / "run")
    path = tmp_path / Path(rel).name
    path.write_text(yaml.safe_dump(data | extra))
    return path


def lf(tmp_path: Path, **extra: object) -> Path:
    base: dict[str, object] = {"model_name_or_path": "/m", "stage": "sft", "dataset": "d"}
    path = tmp_path / "lf.yaml"
    path.write_text(yaml.safe_dump(base | extra))
    return path


TOOLS_TEMPLATE = (  # a Qwen2.5-style template that renders tools, tool calls and results
    "{%- if tools %}<|im_start|>system\n<tools>{% for t in tools %}\n{{ t | tojson }}"
    "{% endfor %}\n</tools><|im_end|>\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls is defined and m.tool_calls %}"
    "<|im_start|>assistant\n{{ m.content }}{% for c in m.tool_calls %}<tool_call>\n"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}\n"
    "</tool_call>{% endfor %}<|im_end|>\n"
    "{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n"
    "</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
