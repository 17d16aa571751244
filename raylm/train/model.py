"""Load the base model and make the right parameters trainable for each finetuning type."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from raylm import tokenizer
from raylm.config import ConfigError, local_model
from raylm.train.config import TrainJobConfig


def torch_dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def load_tokenizer(cfg: TrainJobConfig) -> Any:
    """The run's tokenizer (with ``model.template`` applied): what the workers render and
    save into ``final/`` (``raylm.tokenizer.load_tokenizer``)."""
    return tokenizer.load_tokenizer(
        cfg.model.name_or_path, cfg.model.template, trust_remote_code=cfg.model.trust_remote_code
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
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype(cfg.train.precision),
        "trust_remote_code": cfg.model.trust_remote_code,
    }
    if cfg.finetuning_type == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype(cfg.train.precision),
        )
    partition = None if cfg.finetuning_type == "qlora" else ds_config
    with zero3_partitioned_load(partition):
        model = AutoModelForCausalLM.from_pretrained(local_model(cfg.model.name_or_path), **kwargs)
    if cfg.finetuning_type in ("lora", "qlora"):
        return add_lora(model, cfg)
    if cfg.finetuning_type == "freeze":
        freeze_all_but_last(model, cfg.freeze.trainable_layers)
    return model


def add_lora(model: Any, cfg: TrainJobConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    if cfg.finetuning_type == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    target = cfg.lora.target
    peft_cfg = LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        # peft's "all-linear" is every linear layer except the output head.
        target_modules="all-linear" if target == ["all"] else list(target),
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as err:
        names = sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n})
        raise ConfigError(
            f"lora.target={target}: {err}. Module names in this model: {names}"
        ) from None


def freeze_all_but_last(model: Any, n: int) -> None:
    """Train the last ``n`` decoder layers (LLaMA-Factory's freeze tuning); all else is frozen."""
    layers = _decoder_layers(model)
    if not 0 < n <= len(layers):
        raise ConfigError(
            f"freeze.trainable_layers={n} must be between 1 and the model's {len(layers)} layers"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers[-n:]:
        for p in layer.parameters():
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
        local_model(cfg.model.name_or_path),
        dtype=torch_dtype(cfg.train.precision),
        trust_remote_code=cfg.model.trust_remote_code,
    )
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref
