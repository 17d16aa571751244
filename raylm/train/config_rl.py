"""Which runs the RL stages can serve, checked when the train config loads. Split from
``raylm.train.config`` (as ``config_optim`` is); the stage itself is ``raylm.train.grpo``."""

from __future__ import annotations

from typing import Any

from raylm.config import ConfigError

GRPO_TYPES = ("full", "lora", "freeze")
"""Fine-tuning types whose weights reach the engine: a full state dict or a LoRA adapter."""


def check_rl_stage(cfg: Any) -> None:
    """Refuse what the RL stages do not build yet, at load time, by name."""
    if cfg.stage == "ppo":
        raise ConfigError(
            "stage ppo is not built yet (issue 19: its GAE and value loss exist in "
            "raylm.rl, the value head, critic and rollout loop do not); use stage grpo"
        )
    if cfg.stage != "grpo":
        return
    g, where = cfg.grpo, "stage grpo"
    if cfg.finetuning_type not in GRPO_TYPES:
        raise ConfigError(
            f"{where} with finetuning_type={cfg.finetuning_type}: the rollout engine takes "
            f"full weights or a LoRA adapter; use one of {list(GRPO_TYPES)}"
        )
    if g.num_iterations != 1:
        raise ConfigError(
            f"grpo.num_iterations={g.num_iterations}: raylm generates once per step and "
            "trains on it once (on-policy); reusing a batch is not built yet, use 1"
        )
    if cfg.data.val_size or cfg.data.eval_datasets:
        raise ConfigError(
            f"{where}: data.val_size / data.eval_datasets hold prompts out for a held-out "
            "loss, which GRPO has none of; unset them and score final/ with the eval job"
        )
    if cfg.data.tokenized_path:
        raise ConfigError(f"{where}: data.tokenized_path saves token shards; use data.path")
    if cfg.model.mixture_of_depths is not None:
        raise ConfigError(f"{where}: model.mixture_of_depths is for stage pt or sft")
    pissa = cfg.finetuning_type == "lora" and cfg.lora.init in ("pissa", "olora")
    if g.beta > 0 and pissa:
        raise ConfigError(
            f"{where} with grpo.beta > 0 and lora.init={cfg.lora.init}: the base under the "
            "disabled adapter is not the reference; use lora.init=default or beta 0"
        )
    if cfg.finetuning_type == "lora" and cfg.lora.rank > 512:
        raise ConfigError(f"{where}: lora.rank={cfg.lora.rank} is above vLLM's 512")
