"""Stage rm: a reward model trained on preference pairs (LLaMA-Factory's stage rm).

The model is the LM with a one-output linear head, ``AutoModelForSequenceClassification``
with ``num_labels=1``, as TRL's ``RewardTrainer`` builds it, rather than LLaMA-Factory's
value head (trl's ``AutoModelForCausalLMWithValueHead``, gone from TRL 1.x, saved as a
causal LM plus a ``value_head.safetensors`` only that wrapper reads). So ``final/`` (full
and freeze) or ``final/merged`` (LoRA) is a plain transformers directory
(``LlamaForSequenceClassification``, ``score.weight``) that transformers, TRL's RL
trainers and vLLM's reward/classify tasks load as it is.

A sequence's score is that model's own output: the head applied at the rightmost token
that is not the pad id, which is what transformers computes when the exported model
scores a sequence, so training and inference agree by construction (LLaMA-Factory reads
the token at ``attention_mask.sum() - 1``: the same one unless a sequence ends in the
pad id). The loss is TRL's and LLaMA-Factory's, -log sigmoid(chosen - rejected) in
float32, averaged over the pairs (``tests/unit/test_train_rm_kto.py`` runs TRL's code).

LoRA trains adapters on the backbone and the head whole (PEFT's ``modules_to_save``,
which ``task_type=SEQ_CLS`` adds); freeze trains the last layers and the head.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from raylm.config import ConfigError, local_model
from raylm.train.config import RMConfig, TrainJobConfig
from raylm.train.objectives import pair_batch


def load_reward_model(
    cfg: TrainJobConfig, ds_config: dict[str, Any] | None, pad_token_id: int | None
) -> Any:
    """The base model with a fresh one-output score head (seeded by train.seed), the
    parameters of ``finetuning_type`` trainable, as ``raylm.train.model.load_model``
    prepares a causal LM. ``pad_token_id`` is the run tokenizer's: the head reads the last
    token that is not it, so the config must name the id batches are padded with."""
    from transformers import AutoModelForSequenceClassification

    from raylm.train import model as m

    cuda = torch.cuda.is_available()
    m.check_qlora_device(cfg, cuda)
    m.check_knobs(cfg)
    m.check_attention_device(cfg, cuda)
    lora = cfg.finetuning_type in ("lora", "qlora")
    if lora and cfg.lora.adapter_name_or_path:
        raise ConfigError(
            "stage rm: lora.adapter_name_or_path continues a causal-LM adapter, which has no "
            "score head; merge it into the base model (export.merge_lora) and start from that"
        )
    kwargs = m._load_kwargs(cfg) | {"num_labels": 1, "pad_token_id": pad_token_id}
    if cfg.finetuning_type == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=m.torch_dtype(cfg.train.precision),
        )  # fmt: skip
    partition = None if cfg.finetuning_type == "qlora" else ds_config
    with m.zero3_partitioned_load(partition):
        model = AutoModelForSequenceClassification.from_pretrained(
            local_model(cfg.model.name_or_path), **kwargs
        )
    # A causal LM's config names its LM class; final/ must name this one (vLLM reads it).
    model.config.architectures = [type(model).__name__]
    model.train()
    if cfg.model.gradient_checkpointing and cfg.finetuning_type != "qlora":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=m.NON_REENTRANT)
        if cfg.finetuning_type != "full":
            model.enable_input_require_grads()
    if lora:
        model = m.add_lora(model, cfg, task_type="SEQ_CLS")
    elif cfg.finetuning_type == "freeze":
        f = cfg.freeze
        m.freeze_all_but(
            model, f.trainable_layers, f.trainable_modules, f.extra_modules, f.llama_pro
        )
        _head(model).requires_grad_(True)
    from raylm.train.neftune import add_neftune

    return add_neftune(model, cfg.train.neftune_noise_alpha)


def _head(model: Any) -> Any:
    return getattr(model, "score", None) or model.classifier


def pair_scores(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of a ``pair_batch`` (chosen rows, then rejected rows), in float32."""
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    )
    chosen, rejected = out.logits.squeeze(-1).float().chunk(2)
    return chosen, rejected


def reward_loss(
    cfg: RMConfig, chosen: torch.Tensor, rejected: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """The pairwise loss (plus TRL's centering term when set) and its metrics: TRL's
    ``accuracy`` (chosen scored above rejected), ``margin`` and ``mean_reward``, and the
    mean score of each side."""
    loss = -F.logsigmoid(chosen - rejected).mean()
    if cfg.center_rewards_coefficient:
        loss = loss + cfg.center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
    with torch.no_grad():
        values = {
            "accuracy": (chosen > rejected).float().mean(),
            "margin": (chosen - rejected).mean(),
            "mean_reward": torch.cat((chosen, rejected)).mean(),
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
        }
        floats = torch.stack([v.detach().float().cpu() for v in values.values()]).tolist()
    return loss, dict(zip(values, floats, strict=True))


def rm_step(
    cfg: RMConfig, model: Any, rows: list[dict[str, Any]], pad: int
) -> tuple[torch.Tensor, dict[str, float], int]:
    """One micro batch of pairs: loss, metrics and its token count (one forward)."""
    batch = pair_batch(rows, pad)
    loss, metrics = reward_loss(cfg, *pair_scores(model, batch))
    return loss, metrics, int(batch["attention_mask"].sum())


def merge_reward(cfg: Any, adapter_dir: Path, out: Path, tok: Any) -> None:
    """Base + reward adapter (LoRA and the trained head) as one full reward model at
    ``out``: what vLLM serves (its LoRA support does not cover a trained head) and what
    ``AutoModelForSequenceClassification.from_pretrained`` loads without PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(
        local_model(cfg.model.name_or_path), num_labels=1, pad_token_id=tok.pad_token_id,
        trust_remote_code=cfg.model.trust_remote_code,
    )  # fmt: skip
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.config.architectures = [type(merged).__name__]
    merged.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
