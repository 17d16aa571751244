"""A LoRA adapter to export, shared by the unit and integration tiers (importable by
name: pytest puts tests/, the conftest's dir, on sys.path)."""

from __future__ import annotations

from pathlib import Path

import torch


def lora_adapter(base: Path, out: Path, seed: int, zero: bool = False, **kw: object) -> Path:
    """A LoRA adapter on ``base`` with random (or zero) B, so it moves the logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=zero, **kw)
    peft = get_peft_model(model, lora)
    if not zero:
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    peft.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)  # as a raylm train run saves it
    return out
