"""Load the base model and make the right parameters trainable for each finetuning type."""

from __future__ import annotations

from typing import Any

from raylm.config import ConfigError, resolve_model
from raylm.train.config import TrainJobConfig


def torch_dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def load_tokenizer(cfg: TrainJobConfig):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        resolve_model(cfg.model.name_or_path), trust_remote_code=cfg.model.trust_remote_code
    )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


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


def load_model(cfg: TrainJobConfig) -> Any:
    """The model with only the parameters of ``finetuning_type`` trainable."""
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
    model = AutoModelForCausalLM.from_pretrained(resolve_model(cfg.model.name_or_path), **kwargs)
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
        resolve_model(cfg.model.name_or_path),
        dtype=torch_dtype(cfg.train.precision),
        trust_remote_code=cfg.model.trust_remote_code,
    )
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref
