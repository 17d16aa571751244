"""What the serve and generate jobs do with every LLaMA-Factory inference argument.

``llamafactory-cli api|chat X.yaml`` reads LLaMA-Factory's model, data, finetuning and
generating arguments; ``llamafactory-cli train X.yaml`` with ``do_predict: true`` adds the
training arguments. raylm reads the first as its serve job (``raylm serve X.yaml``) and
the second as its generate job (``raylm generate X.yaml``). Every model and generating
argument, and the data arguments inference reads, lands in one table here:

- ``MAPPED``: onto a raylm key (``raylm.serve.llamafactory`` converts the value).
- ``NOOP``: accepted with no effect, the reason logged.
- ``REFUSED``: a feature the job does not have; the reason says what would make it work.
  Set to LLaMA-Factory's default (``DEFAULTS``), or null/false, it changes nothing and is
  accepted.

Every other key LLaMA-Factory knows (``raylm.train.llamafactory_keys``: training, data and
finetuning arguments) is logged as having no effect: neither job trains. A key neither
knows is refused with a did-you-mean. docs/llamafactory.md prints these tables.
"""

from __future__ import annotations

from typing import Any

GENERATION = ("temperature", "top_p", "top_k", "max_new_tokens", "repetition_penalty")
"""Generating arguments that become vLLM's default sampling parameters (serve:
``engine.extra.override_generation_config``; generate: ``sampling.*``)."""

MAPPED: dict[str, str] = {
    "model_name_or_path": "serve: model.path; generate: model",
    "adapter_name_or_path": "one adapter. serve: lora.adapters {NAME: path}, NAME the "
    "directory's name, requested as model 'raylm:NAME' (logged); generate: lora_path. "
    "Several adapters are refused (merge them first)",
    "template": "the named template (raylm.templates) rendered by the server: serve: "
    "engine.extra.chat_template; generate: input.template",
    "infer_backend": "vllm and huggingface: raylm's vLLM engine (huggingface logged); "
    "sglang and ktransformers refused",
    "infer_dtype": "engine.dtype",
    "vllm_maxlen": "engine.max_model_len (LLaMA-Factory's default 4096 when absent)",
    "vllm_gpu_util": "engine.gpu_memory_utilization",
    "vllm_enforce_eager": "engine.enforce_eager (absent: raylm's default, true)",
    "vllm_max_lora_rank": "serve: lora.max_lora_rank (LLaMA-Factory's default 32 when an "
    "adapter is served); generate reserves rank 64 for its one adapter",
    "vllm_config": "engine.extra (more vLLM engine arguments, a mapping or JSON string)",
    "trust_remote_code": "engine.extra.trust_remote_code",
    "do_sample": "false: temperature 0 (greedy)",
    "temperature": "serve: engine.extra.override_generation_config.temperature; "
    "generate: sampling.temperature",
    "top_p": "serve: override_generation_config.top_p; generate: sampling.top_p",
    "top_k": "serve: override_generation_config.top_k; generate: sampling.top_k",
    "max_new_tokens": "serve: override_generation_config.max_new_tokens; generate: "
    "sampling.max_tokens",
    "repetition_penalty": "serve: override_generation_config.repetition_penalty; "
    "generate: sampling.repetition_penalty",
    # do_predict (generate only)
    "eval_dataset": "generate: input.datasets (names in dataset_dir's dataset_info.json)",
    "dataset_dir": "generate: input.path (the registry's directory)",
    "max_samples": "generate: input.limit (per dataset, as LLaMA-Factory)",
    "cutoff_len": "generate: engine.max_model_len = cutoff_len + the completion budget "
    "(LLaMA-Factory truncates a longer prompt; raylm's engine fails that row to quarantine/)",
    "output_dir": "generate: output_dir (generated_predictions.jsonl, predict_results.json)",
    "do_predict": "true: the generate job (raylm generate); the train job refuses it",
    "predict_with_generate": "true: predictions are generated and scored (BLEU-4, "
    "ROUGE-1/2/L as LLaMA-Factory computes them); false refused",
}


def _same(reason: str, keys: str) -> dict[str, str]:
    """One reason for several keys (named in one whitespace-separated string)."""
    return dict.fromkeys(keys.split(), reason)


_SERVER = "vLLM loads and runs the model itself"
_MM = "vision/audio input: raylm serves text models"
_TOKENS = (
    "raylm never changes the vocabulary: serve a model whose tokenizer has the tokens "
    "(raylm's train job never adds any)"
)

NOOP: dict[str, str] = {
    "use_kv_cache": "vLLM always uses its paged KV cache",
    "flash_attn": "vLLM picks its own attention backend",
    "max_length": "LLaMA-Factory uses it only when max_new_tokens <= 0 (refused)",
    "cache_dir": "models come from the Hugging Face cache (HF_HOME) or a local path",
    "print_param_status": "no training: no parameters to report",
    "double_quantization": "only acts with quantization_bit, which is refused",
    "finetuning_type": "an adapter is served as a LoRA; a full model is served as it is",
    "stage": "serve: any model is served; generate: sft is what do_predict scores "
    "(other stages refused)",
    "per_device_eval_batch_size": "the generate job batches by batch_size (vLLM batches "
    "continuously anyway)",
    **_same(
        _SERVER,
        "low_cpu_mem_usage offload_folder use_unsloth_gc disable_gradient_checkpointing "
        "use_reentrant_gc moe_aux_loss_coef",
    ),
    **_same(
        "hub tokens: huggingface_hub reads HF_TOKEN from the environment",
        "hf_hub_token ms_hub_token om_hub_token",
    ),
    **_same(
        _MM,
        "image_max_pixels image_min_pixels image_do_pan_and_scan crop_to_patches "
        "video_max_pixels video_min_pixels video_fps video_maxlen use_audio_in_video "
        "audio_sampling_rate",
    ),
    **_same(
        "only acts with infer_backend: sglang, which is refused",
        "sglang_maxlen sglang_mem_fraction sglang_tp_size sglang_config sglang_lora_backend",
    ),
    **_same(
        "only acts with use_kt / infer_backend: ktransformers, which are refused",
        "kt_cpu_activation kt_weight_path kt_non_expert_weight_path "
        "kt_expert_checkpoint_path kt_use_lora_experts kt_lora_expert_num "
        "kt_lora_expert_intermediate_size",
    ),
    **_same(
        "export arguments: only llamafactory-cli export reads them",
        "export_dir export_size export_device export_quantization_bit "
        "export_quantization_dataset export_quantization_nsamples "
        "export_quantization_maxlen export_legacy_format export_hub_model_id",
    ),
}

REFUSED: dict[str, str] = {
    "adapter_folder": "name the one adapter with adapter_name_or_path",
    "model_revision": "download that revision to a local dir and point model_name_or_path at it",
    "use_fast_tokenizer": "vLLM loads the model's fast tokenizer",
    "rope_scaling": "set rope_scaling in the model's config.json (or vllm_config: "
    "{hf_overrides: {rope_scaling: ...}})",
    "shift_attn": "S^2-Attn is a training-time attention: serve without it",
    "mixture_of_depths": "mixture-of-depths models: not supported by vLLM",
    "use_unsloth": "unsloth's inference kernels: raylm serves with vLLM; drop the key",
    "enable_liger_kernel": "liger kernels are for training: drop the key",
    "use_v1_kernels": "LLaMA-Factory's v1 kernels are for training: drop the key",
    "upcast_layernorm": "vLLM computes in engine.dtype: use infer_dtype: float32",
    "upcast_lmhead_output": "vLLM computes in engine.dtype: use infer_dtype: float32",
    "train_from_scratch": "a randomly initialised model: save one and serve its directory",
    "quantization_bit": "on-the-fly quantization: serve an already-quantized checkpoint "
    "(vLLM reads its config.json), or on a GPU add vllm_config: {quantization: bitsandbytes}",
    "quantization_method": "on-the-fly quantization: serve an already-quantized checkpoint",
    "quantization_type": "on-the-fly quantization: serve an already-quantized checkpoint",
    "quantization_device_map": "vLLM places the model itself (engine.tensor_parallel_size)",
    **_same(
        _TOKENS,
        "resize_vocab split_special_tokens add_tokens add_special_tokens "
        "new_special_tokens_config init_special_tokens",
    ),
    "skip_special_tokens": "false: not a server default in vLLM; send "
    "skip_special_tokens: false in each request (true is vLLM's default)",
    "use_kt": "KTransformers is not one of raylm's engines: infer_backend vllm",
    "num_beams": "beam search is not a default vLLM server parameter: use num_beams: 1 "
    "(sampling or greedy)",
    "length_penalty": "only acts with beam search (num_beams > 1), which is refused",
    "default_system": "send the system prompt as the first message of each request "
    "(generate: put a system column or turn in the data)",
    "enable_thinking": "false: use the template's *_nothink variant (e.g. qwen3_nothink)",
    "tool_format": "tool calls render through the named template; a per-model tool format "
    "is not supported",
    "do_train": "train first (raylm train X.yaml), then predict with raylm generate",
    "dataset": "generate: name the prediction sets with eval_dataset (LLaMA-Factory "
    "predicts on it); serve reads no dataset: drop the key",
}

DEFAULTS: dict[str, Any] = {
    "model_revision": "main",
    "use_fast_tokenizer": True,
    "quantization_method": "bnb",
    "quantization_type": "nf4",
    "init_special_tokens": "noise_init",
    "num_beams": 1,
    "skip_special_tokens": True,
    "length_penalty": 1.0,
    "enable_thinking": True,
}
"""LLaMA-Factory's default of a refused key where it is neither None nor False."""

BACKENDS: dict[str, str | None] = {
    "vllm": None,
    "huggingface": "infer_backend=huggingface: served by raylm's vLLM engine (same model "
    "and template; vLLM's sampling and batching)",
    "sglang": "infer_backend='sglang': raylm serves with vLLM only (infer_backend: vllm)",
    "ktransformers": "infer_backend='ktransformers': raylm serves with vLLM only "
    "(infer_backend: vllm)",
}
"""infer_backend values: vllm maps silently, huggingface maps with this note logged,
the others are refused for the reason given."""


def at_default(key: str, value: Any) -> bool:
    """A refused key whose value asks for nothing the job lacks."""
    if key in DEFAULTS:
        return value == DEFAULTS[key] or value is None
    return value in (None, False, "", [], {})


def known() -> list[str]:
    return [*MAPPED, *NOOP, *REFUSED]
