"""``export.pissa_convert`` (LLaMA-Factory's ``pissa_convert``): final/ as a plain LoRA.

A PiSSA (or OLoRA) adapter was trained on top of the base's residual, so it only fits a
base whose top singular directions were moved into the adapter first; PEFT redoes that
when it loads final/, but engines that put the adapter on the original weights (vLLM) do
not. PEFT converts it: with the adapter's initial weights A0, B0, the trained B A on the
residual equals the original base plus ``[B, -B0] [A; A0]``, a LoRA of twice the rank
(``save_pretrained(path_initial_model_for_weight_conversion=...)``).

The initial weights are not kept during training: the decomposition is an exact SVD of
the original base weights (raylm has no randomised PiSSA), so it is redone here on the
original base, as PEFT redoes it when final/ loads. As LLaMA-Factory does, final/ then
holds the converted adapter and ``final/pissa_backup`` the PiSSA one.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

BACKUP = "pissa_backup"


def convert_pissa(cfg: Any, adapter_dir: Path) -> None:
    """Rewrite ``adapter_dir`` (a saved PiSSA/OLoRA adapter) as the equivalent plain LoRA
    of the original base; the PiSSA adapter moves to ``adapter_dir/pissa_backup``."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from peft.utils import load_peft_weights
    from transformers import AutoModelForCausalLM

    from raylm.config import local_model

    backup = adapter_dir / BACKUP
    shutil.rmtree(backup, ignore_errors=True)
    backup.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (adapter_dir / name).rename(backup / name)
    base = AutoModelForCausalLM.from_pretrained(
        local_model(cfg.model.name_or_path), trust_remote_code=cfg.model.trust_remote_code
    )
    model = get_peft_model(base, LoraConfig.from_pretrained(str(backup)))  # A0, B0, residual
    init = adapter_dir / "pissa_init"  # PEFT names the adapter after the dir
    model.save_pretrained(str(init))
    set_peft_model_state_dict(model, load_peft_weights(str(backup)))  # the trained A, B
    model.save_pretrained(str(adapter_dir), path_initial_model_for_weight_conversion=str(init))
    shutil.rmtree(init)
