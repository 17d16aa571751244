"""What raylm does with every LLaMA-Factory training argument, in four tables.

LLaMA-Factory's arguments (``src/llamafactory/hparams/*.py`` at ff6d4d12, plus the
Hugging Face ``Seq2SeqTrainingArguments`` it extends, and the Ray keys of earlier
releases) each land in exactly one of:

- ``MAPPED``: onto a raylm key (``raylm.train.llamafactory`` converts the value).
- ``NOOP``: accepted with no effect, with the reason logged: raylm already does that
  thing, the key only acts with a feature refused elsewhere, or it only concerns
  LLaMA-Factory's own launcher, evaluation or inference.
- ``REFUSED``: a feature raylm does not have; the reason says what would make it work.
  Set to LLaMA-Factory's default (``DEFAULTS``) it changes nothing and is accepted.
- ``SPECIAL``: keys whose fate depends on the value (``raylm.train.llamafactory._special``).

docs/llamafactory.md prints these tables; a test keeps them complete.
"""

from __future__ import annotations

from typing import Any

from raylm.train import llamafactory_optim as optim

MAPPED: dict[str, str] = {
    "model_name_or_path": "model.name_or_path",
    "trust_remote_code": "model.trust_remote_code",
    "template": "model.template",
    "stage": "stage",
    "finetuning_type": "finetuning_type",
    "lora_rank": "lora.rank",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target": "lora.target",
    "freeze_trainable_layers": "freeze.trainable_layers",  # negative: the first -N
    "mixture_of_depths": "model.mixture_of_depths",  # convert / load (raylm.train.mod)
    "oft_rank": "oft.rank",  # alone (no oft_block_size): oft.block_size=0 (llamafactory._oft)
    "oft_block_size": "oft.block_size",
    "module_dropout": "oft.module_dropout",
    # Unset, eval_strategy is transformers' no: held out and counted, not scored (warned).
    "eval_strategy": "eval.strategy",
    "evaluation_strategy": "eval.strategy",  # transformers' older name
    "eval_steps": "eval.steps",  # a share of the run's steps (< 1) is refused
    "per_device_eval_batch_size": "eval.batch_size",
    "freeze_trainable_modules": "freeze.trainable_modules",
    "freeze_extra_modules": "freeze.extra_modules",
    "additional_target": "lora.additional_target",
    "use_dora": "lora.use_dora",
    "use_rslora": "lora.use_rslora",
    "loraplus_lr_ratio": "lora.loraplus_lr_ratio",
    "loraplus_lr_embedding": "lora.loraplus_lr_embedding",
    "pref_beta": "dpo.beta",  # kto.beta with stage kto (llamafactory._stage)
    "pref_loss": "dpo.loss_type",
    "pref_ftx": "dpo.sft_weight",  # kto.sft_weight with stage kto
    "kto_chosen_weight": "kto.desirable_weight",
    "kto_rejected_weight": "kto.undesirable_weight",
    "simpo_gamma": "dpo.simpo_gamma",
    "dpo_label_smoothing": "dpo.label_smoothing",
    "cutoff_len": "data.cutoff_len",
    "max_samples": "data.max_samples",
    "val_size": "data.val_size",
    "eval_dataset": "data.eval_datasets",
    "mix_strategy": "data.mix_strategy",
    "interleave_probs": "data.interleave_probs",
    "per_device_train_batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "learning_rate": "train.lr",
    "num_train_epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "lr_scheduler_type": "train.lr_scheduler",
    "warmup_ratio": "train.warmup_ratio",
    "weight_decay": "train.weight_decay",
    "adam_beta1": "train.adam_beta1",
    "adam_beta2": "train.adam_beta2",
    "adam_epsilon": "train.adam_epsilon",
    "max_grad_norm": "train.max_grad_norm",
    "seed": "train.seed",
    "logging_steps": "train.logging_steps",
    "save_steps": "checkpoint.save_steps",
    "save_total_limit": "checkpoint.keep",
    "deepspeed": "deepspeed.config_file",
    "report_to": "report_to",
    "ray_num_workers": "scaling.num_workers",
    "placement_strategy": "scaling.placement_strategy",
    "ray_storage_path": "storage_path",
    "ray_run_name": "run_name",
    "run_name": "run_name",
    "asft_alpha": "loss.asft_alpha",
    "eaft_alpha": "loss.eaft_alpha",
    "use_muon": "train.optimizer",  # true: muon
    "pissa_convert": "export.pissa_convert",
    "train_on_prompt": "loss.train_on_prompt",  # sft masks: raw data (raylm.data.tokenize)
    "mask_history": "loss.mask_history",
    "label_smoothing_factor": "loss.label_smoothing",  # stage pt/sft, loss.type ce
    "neftune_noise_alpha": "train.neftune_noise_alpha",  # raylm.train.neftune
    "default_system": "model.default_system",  # raw data; final/'s template carries it
    **optim.MAPPED,  # galore_*, apollo_*, badam_*
}

SPECIAL: dict[str, str] = {
    "dataset": "data.datasets (names in dataset_dir's dataset_info.json)",
    "dataset_dir": "data.path (the registry's directory; REMOTE:org/name: the Hub dataset "
    "repo hf://datasets/org/name, fetched through huggingface_hub)",
    "tokenized_path": "data.tokenized_path (made on the first run, trained on later; "
    "without dataset: data.path)",
    "output_dir": "storage_path + run_name (the run dir is output_dir)",
    "bf16": "train.precision=bf16",
    "fp16": "train.precision=fp16",
    "pure_bf16": "train.precision=bf16 (raylm's bf16 keeps bf16 weights)",
    "quantization_bit": "4 with bnb: finetuning_type=qlora; other bit widths refused",
    "quantization_method": "bnb: the qlora path; gptq/awq/aqlm/hqq/eetq refused",
    "resources_per_worker": "CPU -> scaling.cpus_per_worker, GPU: 1 -> scaling.use_gpu",
    "flash_attn": "model.attn_implementation: auto, sdpa, disabled -> eager, fa2 -> "
    "flash_attention_2 (CUDA with flash-attn, bf16/fp16: checked at start); fa3 refused",
    "disable_gradient_checkpointing": "model.gradient_checkpointing = not this (LLaMA-Factory "
    "checkpoints by default, so a YAML without it checkpoints)",
    "gradient_checkpointing": "true: model.gradient_checkpointing=true; false alone keeps "
    "LLaMA-Factory's default (on): disable_gradient_checkpointing turns it off",
    "pissa_init": "true: lora.init=pissa (the exact SVD)",
    "adapter_name_or_path": "one adapter: lora.adapter_name_or_path (continued); a list of "
    "several refused",
    "warmup_steps": "train.warmup_steps; a fraction in (0, 1) is transformers' ratio: "
    "train.warmup_ratio",
    "optim": "adamw_torch(_fused)/adamw_hf: raylm's torch AdamW; adamw_8bit/adamw_bnb_8bit, "
    "paged_adamw_8bit, paged_adamw_32bit, lion_8bit, lion_32bit, paged_lion_8bit, "
    "paged_lion_32bit: train.optimizer of that name (bitsandbytes, any ZeRO stage; not "
    "with use_galore/apollo/adam_mini/badam/muon); others refused",
    "use_dft_loss": "true (stage sft): loss.type=dft",
    "use_eaft_loss": "true (stage sft): loss.type=eaft",
    "use_asft_loss": "true (stage sft): loss.type=asft (the reference model loads too)",
    "resume_from_checkpoint": "null/true: raylm resumes by itself; a path refused",
    "packing": "pt: LLaMA-Factory packs by default, raylm's raw path does not (warned)",
    **optim.SPECIAL,  # use_galore, use_apollo, use_adam_mini, use_badam
    "oft_target": "oft.target with finetuning_type oft (LLaMA-Factory builds OFT on "
    "lora_target and reads oft_target unused: raylm takes oft_target, else lora_target; "
    "the two differing is refused)",
    "use_llama_pro": "true with finetuning_type freeze: freeze.llama_pro=true (train the "
    "blocks `raylm llama-pro` inserted, evenly spaced); with lora/oft (adapters on those "
    "blocks only) or full refused",
}

_EVAL = (
    "raylm's held-out loss (eval.strategy, eval.steps, eval.batch_size) has no such "
    "setting; score final/ with the eval job for more"
)
_LOG = "raylm writes metrics.jsonl, loss.png and Ray's logs on its own schedule"
_DIST = "Ray Train and DeepSpeed set up the process group and collectives"
_MM = "vision/audio input: raylm trains text models"
_GEN = "generation settings: the train job generates nothing (see raylm generate / eval)"
_HUB = "only used with push_to_hub, which raylm refuses"
_DATALOADER = "raylm's stream feeds the workers (raylm.train.stream), no torch DataLoader"


def _only(feature: str) -> str:
    return f"only acts with {feature}, which raylm refuses"


def _same(reason: str, keys: str) -> dict[str, str]:
    """One reason for several keys (named in one whitespace-separated string)."""
    return dict.fromkeys(keys.split(), reason)


NOOP: dict[str, str] = {
    "do_train": "a train job always trains",
    "do_eval": "raylm scores the held-out examples whenever eval.strategy is not no "
    "(transformers derives do_eval from eval_strategy too)",
    "overwrite_cache": "raw data is tokenized afresh each run; the data job writes fresh shards",
    "overwrite_output_dir": "runs are keyed by run_name; re-running resumes",
    "save_only_model": "raylm checkpoints always hold what exact resume needs",
    "plot_loss": "raylm always writes loss.png",
    "low_cpu_mem_usage": "transformers maps safetensors lazily already",
    "double_quantization": "raylm's QLoRA always double-quantizes (about 0.4 bit/param less)",
    "ignore_pad_token_for_loss": "padding is never trained on",
    "use_cache": "training never uses the KV cache",
    "use_cpu": "raylm trains on CPU unless scaling.use_gpu=true",
    "ignore_data_skip": "a resumed run computes its data position; nothing is skipped through",
    "full_determinism": "raylm's runs are seeded and resume exactly",
    "cache_dir": "models come from the Hugging Face cache (HF_HOME) or a local path",
    "offload_folder": "raylm loads no model with device_map offload",
    "data_shared_file_system": "the driver reads the data once; workers get tokenized rows",
    "average_tokens_across_devices": "raylm's objectives normalise the loss themselves",
    "enable_jit_checkpoint": "raylm checkpoints every save_steps and resumes from the newest",
    "buffer_size": _only("streaming"),
    **_same(
        "raylm's gradient checkpointing (model.gradient_checkpointing) is always "
        "non-reentrant, every layer, activations kept on the device (same results)",
        "use_reentrant_gc gradient_checkpointing_kwargs",
    ),
    "pissa_iter": "raylm's PiSSA (lora.init=pissa) is the exact SVD, LLaMA-Factory's "
    "pissa_iter: -1: a fast SVD's residual cannot be redone when final/ loads",
    "length_column_name": _only("train_sampling_strategy=group_by_length"),
    "metric_for_best_model": _only("load_best_model_at_end"),
    "greater_is_better": _only("load_best_model_at_end"),
    **_same(
        "raylm tokenizes in the driver (small sets) or in the data job (Ray Data)",
        "preprocessing_num_workers preprocessing_batch_size",
    ),
    **_same(
        _DATALOADER,
        "dataloader_num_workers dataloader_pin_memory dataloader_persistent_workers "
        "dataloader_prefetch_factor dataloader_multiprocessing_context "
        "dataloader_in_order dataloader_drop_last remove_unused_columns label_names",
    ),
    **_same(
        _DIST,
        "ddp_timeout ddp_find_unused_parameters ddp_bucket_cap_mb "
        "ddp_broadcast_buffers ddp_static_graph ddp_backend local_rank master_addr "
        "master_port",
    ),
    **_same(
        _EVAL,
        "eval_delay prediction_loss_only eval_on_start "
        "eval_do_concat_batches eval_use_gather_object eval_accumulation_steps "
        "include_for_metrics batch_eval_metrics bf16_full_eval fp16_full_eval "
        "eval_num_beams eval_on_each_dataset compute_accuracy",
    ),
    **_same(
        _LOG,
        "logging_first_step log_on_each_node logging_nan_inf_filter "
        "include_num_input_tokens_seen include_tokens_per_second "
        "include_effective_tokens_per_second log_level log_level_replica disable_tqdm "
        "skip_memory_metrics logging_dir print_param_status debug project "
        "torch_empty_cache_steps save_safetensors save_on_each_node "
        "restore_callback_states_from_checkpoint",
    ),
    **_same(
        "hub tokens: raylm reads local or bucket paths; huggingface_hub uses HF_TOKEN",
        "hf_hub_token ms_hub_token om_hub_token",
    ),
    **_same(
        _HUB,
        "hub_token hub_private_repo hub_model_id hub_strategy hub_always_push hub_revision",
    ),
    **_same(
        _MM,
        "media_dir image_max_pixels image_min_pixels image_do_pan_and_scan "
        "crop_to_patches video_max_pixels video_min_pixels video_fps video_maxlen "
        "use_audio_in_video audio_sampling_rate freeze_vision_tower "
        "freeze_multi_modal_projector freeze_language_model",
    ),
    **_same(
        _GEN,
        "do_sample temperature top_p top_k num_beams max_length max_new_tokens "
        "repetition_penalty length_penalty skip_special_tokens generation_max_length "
        "generation_num_beams generation_config",
    ),
    **_same(
        "only acts with LLaMA-Factory's stage ppo, whose YAML raylm does not translate "
        "(raylm's own stage ppo: docs/rl.md)",
        "ppo_buffer_size ppo_epochs ppo_score_norm ppo_target ppo_whiten_rewards "
        "reward_model reward_model_adapters reward_model_quantization_bit "
        "reward_model_type",
    ),
    **_same(
        _only("use_swanlab"),
        "swanlab_project swanlab_workspace swanlab_run_name swanlab_mode "
        "swanlab_api_key swanlab_logdir swanlab_lark_webhook_url swanlab_lark_secret",
    ),
    **_same(
        _only("use_kt"),
        "kt_cpu_activation kt_weight_path kt_non_expert_weight_path "
        "kt_expert_checkpoint_path kt_use_lora_experts kt_lora_expert_num "
        "kt_lora_expert_intermediate_size",
    ),
    **_same(
        _only("fp8"),
        "fp8_backend fp8_enable_fsdp_float8_all_gather",
    ),
    **_same(
        _only("torch_compile"),
        "torch_compile_backend torch_compile_mode",
    ),
    **_same(
        _only("enable_torch_profiler"),
        "profiler_output_dir profiler_wait_steps profiler_warmup_steps "
        "profiler_active_steps profiler_repeat profiler_record_shapes "
        "profiler_profile_memory profiler_with_stack profile_modules",
    ),
    **_same(
        _only("use_megatron_bridge / use_hyper_parallel"),
        "megatron_bridge_args hyper_parallel_args hyper_parallel_cp_size",
    ),
    **_same(
        "trackio is not a raylm sink (report_to: tensorboard, mlflow, wandb)",
        "trackio_space_id trackio_bucket_id trackio_static_space_id",
    ),
    **_same(
        "legacy precision knobs: train.precision decides",
        "half_precision_backend fp16_opt_level",
    ),
}

_INFER = (
    "an inference YAML (llamafactory-cli api/chat): run it with `raylm serve FILE` "
    "(vLLM, OpenAI API), not raylm train"
)
_PREDICT = "a do_predict YAML: run it with `raylm generate FILE` (predictions and BLEU/ROUGE)"
_EXPORT = (
    "an export YAML (llamafactory-cli export): run it with `raylm export FILE` (adapters "
    "merged shard by shard and checked), not raylm train"
)
_OPTIM = (
    "raylm builds torch AdamW, Muon (use_muon) or LLaMA-Factory's extras (use_galore, "
    "use_apollo, use_adam_mini, use_badam); needs another optimizer in raylm"
)
_KERNEL = "needs a kernel integration raylm does not have; train without it"

REFUSED: dict[str, str] = {
    # what the run starts from
    "create_new_adapter": "a new adapter on top of adapter_name_or_path: merge the adapters "
    "into the base first",
    "adapter_folder": "name the one adapter to continue with adapter_name_or_path (merge "
    "any others into the base first)",
    "model_revision": "download that revision to a local dir and point model_name_or_path at it",
    "use_fast_tokenizer": "raylm's loss masks need a fast tokenizer's offsets",
    "train_from_scratch": "raylm starts from a checkpoint's weights; save a random-init model first",
    "rope_scaling": "set rope_scaling in the model's config.json; raylm has no key for it",
    "quantization_type": "raylm's QLoRA quantizes to nf4",
    "quantization_device_map": "device_map=auto: raylm places one model copy per worker",
    # vocabulary
    **_same(
        "raylm never resizes the vocabulary (raylm.tokenizer): add tokens to the model "
        "and tokenizer first",
        "resize_vocab add_tokens add_special_tokens new_special_tokens_config "
        "init_special_tokens split_special_tokens",
    ),
    # kernels and memory savers
    **_same(
        _KERNEL,
        "use_unsloth use_unsloth_gc enable_liger_kernel use_liger_kernel "
        "liger_kernel_config use_v1_kernels shift_attn upcast_layernorm "
        "upcast_lmhead_output torch_compile",
    ),
    "moe_aux_loss_coef": "raylm adds no MoE router loss",
    "tf32": "raylm leaves torch's TF32 setting alone",
    "auto_find_batch_size": "set per_device_train_batch_size yourself",
    "fp8": "FP8 training needs Hopper GPUs and an FP8 backend raylm does not integrate",
    # methods
    "pref_bco_weight": "the BCO term: not implemented",
    "ld_alpha": "LD-DPO: not implemented",
    "ref_model": "DPO's reference is the base model (or the adapter disabled) in raylm",
    "ref_model_adapters": "DPO's reference is the base model (or the adapter disabled) in raylm",
    "ref_model_quantization_bit": "the reference model is never quantized in raylm",
    **_same(_OPTIM, "optim_args optim_target_modules lr_scheduler_kwargs"),
    "data_seed": "raylm seeds data order with train.seed",
    # data
    "streaming": "raw data is tokenized in memory: for large corpora run the data job and "
    "point data.path at its shards, which stream",
    "neat_packing": "raylm packs with position_ids through the data job (tokenize.pack)",
    "tool_format": "tool calls render through the chat template (model.template)",
    "enable_thinking": "raylm renders training data with thinking on; use a *_nothink template",
    "preserve_thinking": "raylm renders every turn the same way",
    "disable_shuffling": "raylm's stream always shuffles, seeded by train.seed",
    "train_sampling_strategy": "raylm's stream shuffles per epoch (raylm.train.stream)",
    "group_by_length": "raylm's stream shuffles per epoch (raylm.train.stream)",
    "sortish_sampler": "raylm's stream shuffles per epoch (raylm.train.stream)",
    # schedule, checkpoints, outputs
    "logging_strategy": "raylm logs every train.logging_steps steps",
    "save_strategy": "raylm checkpoints every checkpoint.save_steps steps and at the end",
    "load_best_model_at_end": "final/ is the last step's model: pick another checkpoint "
    "by eval.jsonl's eval_loss and export it",
    "early_stopping_steps": "raylm runs max_steps / epochs: watch eval_loss live "
    "(report_to) and stop the job",
    "push_to_hub": "raylm does not push to the hub: upload final/ yourself",
    "use_swanlab": "report_to takes tensorboard, mlflow or wandb",
    "enable_torch_profiler": "profile with Ray's tools; raylm has no profiler hook",
    "do_predict": _PREDICT,
    "predict_with_generate": _PREDICT,
    # distribution and launchers
    "fsdp": "raylm shards with DeepSpeed ZeRO: deepspeed.stage=3",
    "fsdp_config": "raylm shards with DeepSpeed ZeRO: deepspeed.stage=3",
    "fsdp_transformer_layer_cls_to_wrap": "raylm shards with DeepSpeed ZeRO: deepspeed.stage=3",
    "accelerator_config": "Ray Train and DeepSpeed own the distributed setup",
    "parallelism_config": "Ray Train and DeepSpeed own the distributed setup",
    "ray_init_kwargs": "raylm connects with its own ray.* settings (address, runtime env)",
    "ray_storage_filesystem": "storage_path takes s3:// or gs:// URIs itself",
    **_same(
        "Megatron / hyper-parallel / KTransformers backends: raylm trains with DeepSpeed",
        "use_mca use_megatron_bridge use_hyper_parallel use_kt",
    ),
    # not training at all
    **_same(
        _INFER,
        "infer_backend infer_dtype use_kv_cache vllm_maxlen vllm_gpu_util "
        "vllm_enforce_eager vllm_max_lora_rank vllm_config sglang_maxlen "
        "sglang_mem_fraction sglang_tp_size sglang_config sglang_lora_backend",
    ),
    **_same(
        _EXPORT,
        "export_dir export_size export_device export_quantization_bit "
        "export_quantization_dataset export_quantization_nsamples "
        "export_quantization_maxlen export_legacy_format export_hub_model_id",
    ),
}

DEFAULTS: dict[str, Any] = {
    "model_revision": "main",
    "use_fast_tokenizer": True,
    "quantization_type": "nf4",
    "init_special_tokens": "noise_init",
    "pref_bco_weight": 0.0,
    "enable_thinking": True,
    "logging_strategy": "steps",
    "save_strategy": "steps",
    "train_sampling_strategy": "random",
}
"""LLaMA-Factory's (or transformers') default of a refused key where it is neither
None nor False: set to it, the key changes nothing and is accepted. Inference and
export keys have no entry: a YAML that names them is not a training recipe."""

_NOT_TRAINING = {*(k for k, v in REFUSED.items() if v in (_INFER, _EXPORT))}


def at_default(key: str, value: Any) -> bool:
    """A refused key whose value asks for nothing raylm lacks."""
    if key in _NOT_TRAINING:
        return False
    if key in DEFAULTS:
        return value == DEFAULTS[key] or value is None
    return value in (None, False, "", [], {})


def known() -> list[str]:
    """Every key of the tables (for did-you-mean hints)."""
    return [*MAPPED, *SPECIAL, *NOOP, *REFUSED]
