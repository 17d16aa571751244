"""The DeepSpeed JSON, generated from the typed train config in exactly one place.

Keeping the whole mapping in ``deepspeed_config`` means a setting can never be set
twice with different values (the classic LLaMA-Factory failure: ``gradient_accumulation_steps``
in the YAML and in ``ds_z3_config.json`` disagreeing). A user JSON (LLaMA-Factory's
``deepspeed:`` key) is merged on top, with ``"auto"`` values filled from the typed config.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from raylm.config import ConfigError, resolve_path
from raylm.train.config import TrainJobConfig
from raylm.train.config_optim import check_optimizer

# Keys whose value must come from the typed config: a user JSON may only repeat them
# (or say "auto"), so the batch size DeepSpeed sees is the one the data loader feeds.
_OWNED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def deepspeed_config(cfg: TrainJobConfig, world_size: int) -> dict[str, Any]:
    """The complete DeepSpeed config for ``world_size`` ranks (user JSON merged in)."""
    t, ds = cfg.train, cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.stage}
    if ds.stage >= 2:
        zero |= {"overlap_comm": False, "contiguous_gradients": True}
    if ds.stage == 3:
        # Full weights can be gathered for final/ without a separate conversion script.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if t.optimizer == "muon":  # DeepSpeed's ZeRO-3 refuses Muon with reduce-scatter
        zero["reduce_scatter"] = False
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
    generated: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
        # BAdam keeps fp32 copies of its active block itself (raylm.train.badam_optim)
        "bf16": {"enabled": t.precision == "bf16" and t.optimizer != "badam"},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # raylm builds a torch AdamW (exactly resumable, no C++ build); DeepSpeed wraps it.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.config_file:
        merged = merge_user_config(generated, load_user_config(ds.config_file))
        # a user JSON's own ZeRO stage must suit the optimizer too (GaLore needs stage 0)
        check_optimizer(cfg, int(merged.get("zero_optimization", {}).get("stage", 0)))
        return merged
    return generated


def load_user_config(path: str) -> dict[str, Any]:
    file = Path(resolve_path(path))
    if not file.is_file():
        raise ConfigError(f"deepspeed.config_file={path!r}: no such file ({file})")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"deepspeed.config_file={path!r} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"deepspeed.config_file={path!r} must hold a JSON object")
    return data


def merge_user_config(generated: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    """User values win, except ``"auto"`` (keep ours) and batch sizes (must agree).

    Optimizer/scheduler sections are rejected: raylm owns them so that resume is exact
    and the learning rate comes from ``train.lr``.
    """
    for key in ("optimizer", "scheduler"):
        if key in user:
            raise ConfigError(
                f"deepspeed.config_file: remove the '{key}' section; raylm builds the "
                "optimizer and schedule from train.lr / train.lr_scheduler"
            )
    for key in _OWNED:
        if key in user and user[key] != "auto" and user[key] != generated[key]:
            raise ConfigError(
                f"deepspeed.config_file: {key}={user[key]!r} disagrees with the train config "
                f'({generated[key]!r}); set it to "auto" or change train.micro_batch_size / '
                "train.grad_accum"
            )
    return _merge(copy.deepcopy(generated), user)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    for key, value in over.items():
        if value == "auto":
            continue
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = _merge(base[key], value)
        else:
            base[key] = value
    return base
