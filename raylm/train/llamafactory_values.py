"""How LLaMA-Factory's values read: its list, bool and step-count conventions, the
did-you-mean for unknown keys, and each mapped key's converter (``CONVERT``). Shared by
the train, serve and export translations of its YAMLs."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from raylm.config import ConfigError


def hint(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.7)
    return f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key)


def set_key(out: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = out
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def same(value: Any) -> Any:
    return value


def as_bool(value: Any) -> bool:
    """A YAML bool, or the string LLaMA-Factory's argument parser also reads as one."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes", "on")
    return bool(value)


def csv_list(value: Any) -> list[str]:
    """LLaMA-Factory writes lists as comma-separated strings (``q_proj,v_proj``)."""
    if isinstance(value, list):
        return [str(v) for v in value]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def report_to(value: Any) -> list[str]:
    return [v for v in csv_list(value) if v != "none"]


def step_count(key: str, value: Any) -> int:
    """A step count; transformers also reads a float below 1 as a share of the run."""
    if float(value) < 1:
        raise ConfigError(
            f"{key}={value}: a share of the run's steps; raylm takes a step count (>= 1)"
        )
    return int(value)


def max_steps(value: Any) -> int | None:
    """transformers' ``max_steps: -1`` means no limit."""
    return None if int(value) <= 0 else int(value)


CONVERT: dict[str, Callable[[Any], Any]] = {
    "lora_target": csv_list,
    "additional_target": csv_list,
    "freeze_trainable_modules": csv_list,
    "freeze_extra_modules": csv_list,
    "freeze_trainable_layers": int,
    "oft_rank": int,
    "oft_block_size": int,
    "module_dropout": float,
    "use_dora": as_bool,
    "use_rslora": as_bool,
    "loraplus_lr_ratio": float,
    "loraplus_lr_embedding": float,
    "report_to": report_to,
    "eval_dataset": csv_list,
    "interleave_probs": lambda v: [float(p) for p in csv_list(v)],
    "max_steps": max_steps,
    "learning_rate": float,
    "num_train_epochs": float,
    "val_size": float,
    "eval_steps": lambda v: step_count("eval_steps", v),
    "eval_strategy": lambda v: "no" if v is False else str(v),  # YAML reads no as false
    "evaluation_strategy": lambda v: "no" if v is False else str(v),
    "per_device_eval_batch_size": int,
    # YAML reads ``1e-3`` (no dot) as a string; LLaMA-Factory's parser coerces it.
    "pref_beta": float,
    "pref_ftx": float,
    "kto_chosen_weight": float,
    "kto_rejected_weight": float,
    "simpo_gamma": float,
    "dpo_label_smoothing": float,
    "warmup_ratio": float,
    "weight_decay": float,
    "asft_alpha": float,
    "eaft_alpha": float,
    "use_muon": lambda v: "muon" if as_bool(v) else "adamw",
    "pissa_convert": as_bool,
    "train_on_prompt": as_bool,
    "mask_history": as_bool,
    "label_smoothing_factor": float,
    "neftune_noise_alpha": float,
}
