"""LLaMA-Factory's optimizer extras in a training YAML: ``use_galore``, ``use_apollo``,
``use_adam_mini``, ``use_badam`` and their ``galore_*`` / ``apollo_*`` / ``badam_*`` keys,
and ``optim``'s bitsandbytes names (``BNB_OPTIM``).

The tables here join ``raylm.train.llamafactory_keys``' (every key maps onto the typed
``galore`` / ``apollo`` / ``badam`` groups, ``raylm.train.config_optim``) and
:func:`optimizer_extras` is one of ``raylm.train.llamafactory``'s value-dependent checks:
which optimizer, and the run settings LLaMA-Factory implies with it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from raylm.train.config_optim import BNB
from raylm.train.llamafactory_values import as_bool, csv_list, set_key

log = logging.getLogger(__name__)

EXTRAS = {"use_galore": "galore", "use_apollo": "apollo", "use_adam_mini": "adam_mini",
          "use_badam": "badam"}  # fmt: skip
"""LLaMA-Factory's switch -> ``train.optimizer``."""

BNB_OPTIM = {"adamw_bnb_8bit": "adamw_8bit", **{name: name for name in BNB}}
"""``optim``'s bitsandbytes names (transformers' ``OptimizerNames``; ``adamw_8bit`` is its
alias of ``adamw_bnb_8bit``) -> ``train.optimizer`` (``raylm.train.bnb_optim``). Not
built: ademamix_8bit, paged_ademamix_* and rmsprop_bnb*, which read ``optim_args``."""

_GALORE = "target rank update_interval scale proj_type layerwise"
_APOLLO = f"{_GALORE} proj scale_type scale_front"
_BADAM = "mode start_block switch_mode switch_interval update_ratio mask_mode verbose"

MAPPED: dict[str, str] = {
    **{f"galore_{k}": f"galore.{k}" for k in _GALORE.split()},
    **{f"apollo_{k}": f"apollo.{k}" for k in _APOLLO.split()},
    **{f"badam_{k}": f"badam.{k}" for k in _BADAM.split()},
}
"""Each extra's keys onto its typed group (honoured only with that optimizer, as in
LLaMA-Factory, and checked either way)."""


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


CONVERT: dict[str, Callable[[Any], Any]] = {
    "galore_target": csv_list,
    "apollo_target": csv_list,
    **{f"{o}_{k}": int for o in ("galore", "apollo") for k in ("rank", "update_interval")},
    "galore_scale": float,
    "apollo_scale": float,
    "galore_layerwise": as_bool,
    "apollo_layerwise": as_bool,
    "apollo_scale_front": as_bool,
    "badam_start_block": _optional_int,
    "badam_switch_interval": int,
    "badam_update_ratio": float,
    "badam_verbose": int,
}

_STAGE0 = (
    "; ZeRO stage 0 (LLaMA-Factory without a deepspeed: file runs plain DDP, and ZeRO "
    "partitions would split the tensors it needs whole); a deepspeed: file must say stage 0"
)
SPECIAL: dict[str, str] = {
    "use_galore": "true: train.optimizer=galore (galore-torch's GaLoreAdamW, the galore_* "
    f"keys; galore_layerwise: max_grad_norm 0, as LLaMA-Factory's layerwise never clips){_STAGE0}",
    "use_apollo": "true: train.optimizer=apollo (apollo-torch's APOLLOAdamW, the apollo_* "
    f"keys; apollo_layerwise as galore_layerwise){_STAGE0}",
    "use_adam_mini": f"true: train.optimizer=adam_mini (adam-mini's Adam_mini){_STAGE0}",
    "use_badam": "true: train.optimizer=badam (badam's BlockOptimizer, badam_mode layer; "
    f"ratio refused){_STAGE0}",
}


def optimizer_extras(data: dict[str, Any], out: dict[str, Any]) -> list[str]:
    """``train.optimizer`` from the ``use_*`` switches (or ``optim``'s bitsandbytes name),
    ZeRO stage 0 where no DeepSpeed file is named, and no clipping for the layerwise
    modes; returns the refusals."""
    on = [key for key in EXTRAS if as_bool(data.get(key))]
    if as_bool(data.get("use_muon")):
        on.append("use_muon")
    bnb = BNB_OPTIM.get(str(data.get("optim")))
    if bnb and on:
        # LLaMA-Factory then builds GaLore's 8-bit AdamW, BAdam over bitsandbytes' AdamW,
        # or ignores optim (Muon, Adam-mini); raylm builds one of them and names the choice
        return [f"optim={data['optim']} and {on[0]}: each picks the optimizer; set one"]
    if bnb:  # any ZeRO stage (raylm.train.config_optim)
        set_key(out, "train.optimizer", bnb)
        return []
    if len(on) > 1:
        # LLaMA-Factory refuses galore/apollo/badam together and picks the first of the
        # rest by its own order; raylm names the choice instead
        return [f"{', '.join(on)}: each picks the optimizer; set one"]
    if not on or on[0] == "use_muon":
        return []
    name = EXTRAS[on[0]]
    set_key(out, "train.optimizer", name)
    if data.get("deepspeed") is None:
        set_key(out, "deepspeed.stage", 0)
    if name in ("galore", "apollo") and as_bool(data.get(f"{name}_layerwise")):
        norm = data.get("max_grad_norm")
        if norm not in (None, 0, 0.0):
            log.warning(
                "%s_layerwise: max_grad_norm=%s is not applied (LLaMA-Factory's layerwise "
                "steps each weight before a global norm exists): train.max_grad_norm=0",
                name,
                norm,
            )
        set_key(out, "train.max_grad_norm", 0.0)
    return []
