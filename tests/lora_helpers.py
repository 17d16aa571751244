"""A LoRA adapter to export, and the perplexity an export's figures are checked against;
shared by the unit and integration tiers (importable by name: pytest puts tests/, the
conftest's dir, on sys.path)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

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


def reference_perplexity(model: Any, tokenizer: Any, docs: list[str], max_length: int) -> float:
    """Perplexity from the model's own shifted loss, one window at a time (no batching,
    no padding): the figure raylm's batched ``perplexity`` must reproduce."""
    from raylm.eval.model import doc_token_ids

    nll, scored = 0.0, 0
    for doc in docs:
        ids = doc_token_ids(tokenizer, doc)
        for i in range(0, len(ids), max_length):
            window = torch.tensor([ids[i : i + max_length]])
            if window.shape[1] < 2:
                continue  # a lone token has nothing to predict
            with torch.inference_mode():
                loss = model(input_ids=window, labels=window).loss
            nll += float(loss) * (window.shape[1] - 1)
            scored += window.shape[1] - 1
    return math.exp(nll / scored)
