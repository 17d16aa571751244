"""Which runs the RL stages can serve, checked when the train config loads. Split from
``raylm.train.config`` (as ``config_optim`` is); the stages themselves are
``raylm.train.grpo`` and ``raylm.train.ppo``."""

from __future__ import annotations

from typing import Any

from raylm.config import ConfigError

RL_STAGES = ("grpo", "ppo")
"""Stages whose data are prompts and whose completions a rollout engine samples."""

RL_TYPES = ("full", "lora", "freeze")
"""Fine-tuning types whose weights reach the engine: a full state dict or a LoRA adapter."""


def rollout_config(cfg: Any) -> Any:
    """The stage's group (``grpo`` or ``ppo``): both are ``raylm.rl.config.RolloutConfig``."""
    return cfg.ppo if cfg.stage == "ppo" else cfg.grpo


def check_rl_stage(cfg: Any) -> None:
    """Refuse what the RL stages do not build, at load time, by name."""
    if cfg.stage not in RL_STAGES:
        return
    where = f"stage {cfg.stage}"
    if cfg.finetuning_type not in RL_TYPES:
        raise ConfigError(
            f"{where} with finetuning_type={cfg.finetuning_type}: the rollout engine takes "
            f"full weights or a LoRA adapter; use one of {list(RL_TYPES)}"
        )
    if cfg.stage == "grpo" and cfg.grpo.num_iterations != 1:
        raise ConfigError(
            f"grpo.num_iterations={cfg.grpo.num_iterations}: raylm generates once per step "
            "and trains on it once (on-policy); reusing a batch is not built yet, use 1"
        )
    if cfg.stage == "ppo":
        _check_ppo(cfg)
    if cfg.data.val_size or cfg.data.eval_datasets:
        raise ConfigError(
            f"{where}: data.val_size / data.eval_datasets hold prompts out for a held-out "
            f"loss, which {cfg.stage} has none of; unset them and score final/ with the eval job"
        )
    if cfg.data.tokenized_path:
        raise ConfigError(f"{where}: data.tokenized_path saves token shards; use data.path")
    if cfg.model.mixture_of_depths is not None:
        raise ConfigError(f"{where}: model.mixture_of_depths is for stage pt or sft")
    kl = cfg.grpo.beta if cfg.stage == "grpo" else cfg.ppo.kl_coef
    pissa = cfg.finetuning_type == "lora" and cfg.lora.init in ("pissa", "olora")
    if kl > 0 and pissa:
        knob = "grpo.beta" if cfg.stage == "grpo" else "ppo.kl_coef"
        raise ConfigError(
            f"{where} with {knob} > 0 and lora.init={cfg.lora.init}: the base under the "
            f"disabled adapter is not the reference; use lora.init=default or {knob}=0"
        )
    if cfg.finetuning_type == "lora" and cfg.lora.rank > 512:
        raise ConfigError(f"{where}: lora.rank={cfg.lora.rank} is above vLLM's 512")


def _check_ppo(cfg: Any) -> None:
    """PPO needs something to score completions, and a loss scale its value head sees."""
    if cfg.ppo.reward_model is None and not cfg.ppo.rewards:
        raise ConfigError(
            "stage ppo needs a reward: ppo.reward_model (an rm run's directory or model) "
            "and / or ppo.rewards (verifiers such as {function: math})"
        )
    if cfg.train.precision == "fp16":
        raise ConfigError(
            "stage ppo with train.precision=fp16: the value head trains outside DeepSpeed's "
            "loss scaler; use bf16 or fp32"
        )
