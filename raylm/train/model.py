"""Load the base model and make the right parameters trainable for each finetuning type."""

from __future__ import annotations

import contextlib
import importlib.util
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from raylm import tokenizer
from raylm.config import ConfigError, local_model, resolve_model
from raylm.train.config import TrainJobConfig
from raylm.train.config_optim import BNB

NON_REENTRANT = {"use_reentrant": False}
"""Gradient checkpointing's kwargs: PyTorch's recommended variant, which (unlike the
reentrant one) computes weight gradients even when a block's input needs none (frozen
embeddings under LoRA or freeze) and runs under DeepSpeed ZeRO-3."""


def torch_dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def load_tokenizer(cfg: TrainJobConfig) -> Any:
    """The run's tokenizer (with ``model.template`` applied): what the workers render and
    save into ``final/`` (``raylm.tokenizer.load_tokenizer``)."""
    m = cfg.model
    return tokenizer.load_tokenizer(
        m.name_or_path, m.template, m.default_system, trust_remote_code=m.trust_remote_code
    )


def check_qlora_device(cfg: TrainJobConfig, cuda_available: bool) -> None:
    """QLoRA's 4-bit matmuls exist only as CUDA kernels (bitsandbytes): say so up front."""
    if cfg.finetuning_type != "qlora":
        return
    if not cuda_available or not cfg.scaling.use_gpu:
        raise ConfigError(
            "finetuning_type=qlora needs CUDA GPUs (bitsandbytes 4-bit kernels) and "
            "scaling.use_gpu=true; on CPU use finetuning_type=lora"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(
            "finetuning_type=qlora needs bitsandbytes: pip install 'raylm[gpu]'"
        ) from None


def check_knobs(cfg: TrainJobConfig) -> None:
    """Combinations of keys from different groups that cannot work, named before any
    weights load (each group's own values are checked when the config is built)."""
    lora, init = cfg.finetuning_type in ("lora", "qlora"), cfg.lora.init
    if cfg.model.attn_implementation == "flash_attention_2":
        if not cfg.scaling.use_gpu:
            raise ConfigError(
                "model.attn_implementation=flash_attention_2 needs a CUDA GPU with flash-attn "
                "installed (scaling.use_gpu=true); on CPU use sdpa or eager"
            )
        if cfg.train.precision == "fp32":
            raise ConfigError(
                "model.attn_implementation=flash_attention_2 runs in bf16 or fp16 only: "
                "set train.precision=bf16"
            )
    if cfg.lora.adapter_name_or_path and not lora:
        raise ConfigError(
            "lora.adapter_name_or_path continues a LoRA adapter: it needs finetuning_type "
            f"lora or qlora, not {cfg.finetuning_type}"
        )
    if not lora or init in ("default", "gaussian") or cfg.lora.adapter_name_or_path:
        return
    if cfg.finetuning_type == "qlora":
        raise ConfigError(
            f"lora.init={init} decomposes the base weights, which 4-bit weights cannot hold "
            "exactly: use finetuning_type=lora"
        )
    if (cfg.stage == "dpo" and cfg.dpo.needs_reference) or cfg.stage == "kto":
        raise ConfigError(
            f"lora.init={init} changes the base weights, so the base under the disabled "
            f"adapter is no longer the reference model {cfg.stage} needs: use lora.init="
            "default, or (dpo) a reference-free dpo.loss_type (simpo, orpo)"
        )


def check_attention_device(cfg: TrainJobConfig, cuda_available: bool) -> None:
    """flash_attention_2 exists only as CUDA kernels from the flash-attn package: say so
    on the worker that would load it, before transformers fails deeper down."""
    if cfg.model.attn_implementation != "flash_attention_2":
        return
    if not cuda_available:
        raise ConfigError(
            "model.attn_implementation=flash_attention_2 needs a CUDA GPU with flash-attn "
            "installed; this worker has no CUDA device (use sdpa or eager)"
        )
    if importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(
            "model.attn_implementation=flash_attention_2 needs a CUDA GPU with flash-attn "
            "installed: pip install flash-attn on every worker (or use sdpa)"
        )


@contextlib.contextmanager
def zero3_partitioned_load(ds_config: dict[str, Any] | None) -> Iterator[bool]:
    """Under ZeRO-3, build and load the model already partitioned across ranks.

    transformers sees DeepSpeed's config while it is registered, builds the model inside
    ``deepspeed.zero.Init`` and loads the checkpoint shard by shard into each rank's
    partition, so a rank's peak host memory during load is about its share, not the whole
    model. The registration ends with the load: a reference model or the export's merge
    loaded later must come whole. QLoRA's 4-bit layers load whole (bitsandbytes).
    """
    stage = ((ds_config or {}).get("zero_optimization") or {}).get("stage")
    if stage != 3:
        yield False
        return
    import deepspeed
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    # zero.Init sizes partitions by DeepSpeed's view of the process group: hand it the
    # one Ray Train (or torchrun) already made, as deepspeed.initialize would later.
    deepspeed.init_distributed(dist_backend=_backend(), auto_mpi_discovery=False)
    registered = HfDeepSpeedConfig(ds_config)  # transformers holds only a weak reference
    try:
        yield True
    finally:
        del registered
        unset_hf_deepspeed_config()


def _backend() -> str:
    import torch.distributed as dist

    return dist.get_backend() if dist.is_initialized() else "gloo"


def load_model(cfg: TrainJobConfig, ds_config: dict[str, Any] | None = None) -> Any:
    """The model with only the parameters of ``finetuning_type`` trainable; partitioned at
    load under ZeRO-3 when the DeepSpeed config is given (``deepspeed.zero3_init``)."""
    import torch
    from transformers import AutoModelForCausalLM

    check_qlora_device(cfg, torch.cuda.is_available())
    check_knobs(cfg)
    check_attention_device(cfg, torch.cuda.is_available())
    kwargs = _load_kwargs(cfg)
    if cfg.finetuning_type == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype(cfg.train.precision),
        )
    partition = None if cfg.finetuning_type == "qlora" else ds_config
    path, mod = local_model(cfg.model.name_or_path), cfg.model.mixture_of_depths
    if mod == "load":  # a routed layer's weights sit under .block (raylm.train.mod)
        from raylm.train.mod import BLOCK_KEYS

        kwargs["key_mapping"] = BLOCK_KEYS
    with zero3_partitioned_load(partition):
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    from raylm.train.mod import prepare

    model = prepare(model, mod, path)  # mixture-of-depths: routers around odd layers
    # transformers hands the model back in eval mode, where dropout and gradient
    # checkpointing do nothing; the policy trains.
    model.train()
    if cfg.model.gradient_checkpointing and cfg.finetuning_type != "qlora":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=NON_REENTRANT)
        if cfg.finetuning_type != "full":  # frozen embeddings: as PEFT and LLaMA-Factory do
            model.enable_input_require_grads()
    from raylm.train.neftune import add_neftune

    return add_neftune(_trainable(model, cfg), cfg.train.neftune_noise_alpha)


def _trainable(model: Any, cfg: TrainJobConfig) -> Any:
    """The loaded model with only the parameters of ``finetuning_type`` trainable."""
    if cfg.finetuning_type in ("lora", "qlora"):
        return add_lora(model, cfg)
    if cfg.finetuning_type == "oft":
        from raylm.train.oft import add_oft

        return add_oft(model, cfg)
    if cfg.finetuning_type == "freeze":
        f = cfg.freeze
        freeze_all_but(model, f.trainable_layers, f.trainable_modules, f.extra_modules, f.llama_pro)
    return model


def _load_kwargs(cfg: TrainJobConfig) -> dict[str, Any]:
    """``from_pretrained``'s arguments shared by the policy and a DPO reference model."""
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype(cfg.train.precision),
        "trust_remote_code": cfg.model.trust_remote_code,
    }
    if cfg.model.attn_implementation != "auto":
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    return kwargs


def add_lora(model: Any, cfg: TrainJobConfig, task_type: str = "CAUSAL_LM") -> Any:
    """The model under a fresh LoRA adapter, or under ``lora.adapter_name_or_path``'s,
    trainable; PiSSA/OLoRA rewrite the adapted base weights to their residual here.
    ``task_type`` SEQ_CLS (the reward model) has PEFT train and save the score head whole."""
    from peft import LoraConfig, get_peft_model

    if cfg.finetuning_type == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.model.gradient_checkpointing,
            gradient_checkpointing_kwargs=NON_REENTRANT,
        )
    if cfg.lora.adapter_name_or_path:
        return continue_adapter(model, cfg.lora.adapter_name_or_path)
    lora, target = cfg.lora, cfg.lora.target
    peft_cfg = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        # peft's "all-linear" is every linear layer except the output head.
        target_modules="all-linear" if target == ["all"] else list(target),
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        init_lora_weights=True if lora.init == "default" else lora.init,
        modules_to_save=list(lora.additional_target) or None,
        task_type=task_type,
    )
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as err:
        names = sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n})
        raise ConfigError(
            f"lora.target={target}, lora.additional_target={lora.additional_target}: {err}. "
            f"Module names in this model: {names}"
        ) from None


def continue_adapter(model: Any, name_or_path: str) -> Any:
    """``model`` under an existing LoRA adapter, trainable: a local dir, a bucket URI (this
    node's copy, as ``local_model`` does for models) or a hub id."""
    from peft import PeftModel

    from raylm import storage

    key = "lora.adapter_name_or_path"
    try:
        resolved = resolve_model(name_or_path)
    except ConfigError as err:
        raise ConfigError(f"{key}={name_or_path!r}: {err}") from None
    path = storage.local_dir(resolved, key=key) if storage.is_remote(resolved) else resolved
    config = Path(path, "adapter_config.json")
    if Path(path).exists():
        if not config.is_file():
            raise ConfigError(f"{key}={name_or_path!r} holds no adapter_config.json")
        kind = json.loads(config.read_text()).get("peft_type")
        if kind != "LORA":
            raise ConfigError(f"{key}={name_or_path!r} is a {kind} adapter; LoRA is continued")
    peft_model = PeftModel.from_pretrained(model, path, is_trainable=True)
    # final/ names the base it was trained on now (filled in at save, as for a new adapter)
    peft_model.peft_config["default"].base_model_name_or_path = None
    return peft_model


def freeze_all_but(
    model: Any,
    n: int,
    modules: Sequence[str] = ("all",),
    extra: Sequence[str] = (),
    llama_pro: bool = False,
) -> None:
    """LLaMA-Factory's freeze tuning: the last ``n`` decoder layers train (the first -n
    when negative; with ``llama_pro``, n evenly spaced ones: ``llama_pro.layer_ids``),
    only their ``modules`` unless ``all``, plus the ``extra`` modules outside the layers
    (embed_tokens, norm, lm_head); all else is frozen."""
    from raylm.train.llama_pro import layer_ids

    layers = _decoder_layers(model)
    chosen = layer_ids(len(layers), n, llama_pro)
    for p in model.parameters():
        p.requires_grad_(False)
    inner = sorted({name for layer in layers for name, _ in layer.named_modules() if name})
    for m in modules:
        if m != "all" and m not in inner:
            raise ConfigError(f"freeze.trainable_modules: no {m!r} in a decoder layer; {inner}")
    for layer in (layers[i] for i in chosen):
        for name, p in layer.named_parameters():
            if "all" in modules or any(name.startswith(m + ".") for m in modules):
                p.requires_grad_(True)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    outer = {
        name.rsplit(".", 1)[-1]: module
        for name, module in model.named_modules()
        if any(id(p) not in in_layers for p in module.parameters(recurse=False))
    }
    for m in extra:
        if m not in outer:
            raise ConfigError(f"freeze.extra_modules: no {m!r} outside the layers; {sorted(outer)}")
        for p in outer[m].parameters():
            p.requires_grad_(True)


def _decoder_layers(model: Any) -> Any:
    for path in ("model.layers", "transformer.h", "gpt_neox.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    raise ConfigError("finetuning_type=freeze: cannot find this model's decoder layers")


def load_reference(cfg: TrainJobConfig) -> Any:
    """A frozen copy of the base model for DPO (full/freeze); LoRA uses the base under the
    adapter instead (adapter disabled), which costs no extra memory."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(
        local_model(cfg.model.name_or_path), **_load_kwargs(cfg)
    )
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def param_groups(model: Any, cfg: TrainJobConfig) -> list[dict[str, Any]]:
    """The trainable parameters as optimizer groups, each with its learning rate.

    LoRA+ (``lora.loraplus_lr_ratio``) splits them as PEFT's ``create_loraplus_optimizer``
    and LLaMA-Factory do: B matrices and 1-D adapter weights (DoRA magnitudes) at lr x
    ratio, B of adapted embeddings at ``loraplus_lr_embedding``, the rest (A matrices,
    ``additional_target`` modules) at ``train.lr``, which stays the first group (the
    logged lr). Shapes come from ``ds_shape`` where ZeRO-3 already partitioned a weight.
    """
    lr, ratio = cfg.train.lr, cfg.lora.loraplus_lr_ratio
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not ratio or cfg.finetuning_type not in ("lora", "qlora"):
        return [{"params": [p for _, p in trainable], "lr": lr}]
    a, b, emb = [], [], []
    for name, p in trainable:
        if "lora_embedding_B" in name:
            emb.append(p)
        elif "lora_B" in name or len(getattr(p, "ds_shape", p.shape)) == 1:
            b.append(p)
        else:
            a.append(p)
    groups = [
        {"params": a, "lr": lr},
        {"params": b, "lr": lr * ratio},
        {"params": emb, "lr": cfg.lora.loraplus_lr_embedding},
    ]
    return [g for g in groups if g["params"]]


EXTRA_OPTIMIZERS = {
    "galore": "raylm.train.projected:build_galore",
    "apollo": "raylm.train.projected:build_apollo",
    "adam_mini": "raylm.train.adam_mini_optim:build_adam_mini",
    "badam": "raylm.train.badam_optim:build_badam",
    **dict.fromkeys(BNB, "raylm.train.bnb_optim:build_bnb"),  # bitsandbytes' (any stage)
}
"""``train.optimizer`` -> its builder (stage-0 client optimizers; raylm.train.config_optim)."""


def build_optimizer(model: Any, cfg: TrainJobConfig, total_steps: int) -> tuple[Any, Any]:
    """AdamW over :func:`param_groups` (or ``train.optimizer=muon``: Muon and AdamW,
    ``raylm.train.muon``; galore, apollo, adam_mini, badam: ``EXTRA_OPTIMIZERS``) and the
    lr schedule over ``total_steps``.

    This torch optimizer is the client optimizer DeepSpeed wraps at every stage (the
    DeepSpeed JSON may hold no optimizer section, see ``ds_config``): ZeRO-1..3 flatten
    and partition each param group on its own and stage 0 steps it as is, so every
    group keeps its lr, which the schedule scales by the same factor.
    """
    import torch
    import transformers

    t = cfg.train
    if t.optimizer == "muon":  # LLaMA-Factory's use_muon (raylm.train.muon)
        from raylm.train.muon import build_muon

        optim = build_muon(model, cfg)
    elif t.optimizer in EXTRA_OPTIMIZERS:  # LLaMA-Factory's extras, each from its package
        module, fn = EXTRA_OPTIMIZERS[t.optimizer].split(":")
        optim = getattr(importlib.import_module(module), fn)(model, cfg)
    else:
        optim = torch.optim.AdamW(
            param_groups(model, cfg), lr=t.lr, weight_decay=t.weight_decay,
            betas=t.betas, eps=t.adam_epsilon,
        )  # fmt: skip
    sched = transformers.get_scheduler(
        t.lr_scheduler,
        optim,
        num_warmup_steps=t.warmup(total_steps),
        num_training_steps=total_steps,
    )
    return optim, sched
