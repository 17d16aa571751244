"""NEFTune (Jain et al. 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning"):
uniform noise on the input embeddings while training, ``train.neftune_noise_alpha``
(LLaMA-Factory's and transformers' ``neftune_noise_alpha``).

transformers' Trainer hooks the model's input embeddings for the whole of ``train()``
(``integrations.neftune``); raylm hooks them when the worker builds the model, with the
same hook: in training mode each embedding output of shape [batch, seq, hidden] gets
uniform(-1, 1) x alpha / sqrt(seq x hidden) added (seq counts padding, as there). In
eval mode (the held-out loss) nothing is added, and a hook is never saved, so ``final/``
and every export are the plain model.
"""

from __future__ import annotations

from typing import Any

import torch


def _noise(module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    """transformers' ``neftune_post_forward_hook``."""
    if not module.training:
        return output
    mag = module.neftune_noise_alpha / torch.sqrt(torch.tensor(output.size(1) * output.size(2)))
    return output + torch.zeros_like(output).uniform_(-mag.item(), mag.item())


def input_embeddings(model: Any) -> Any:
    """The module whose output is the token embeddings, under a PEFT wrapper too (an
    embedding LoRA or ``modules_to_save`` copy is what the forward calls)."""
    base = model.base_model.model if hasattr(model, "peft_config") else model
    return base.get_input_embeddings()


def add_neftune(model: Any, alpha: float | None) -> Any:
    """Hook NEFTune's noise onto ``model``'s input embeddings (None: nothing); returns it."""
    if alpha is not None:
        embeddings = input_embeddings(model)
        embeddings.neftune_noise_alpha = alpha
        embeddings.register_forward_hook(_noise)
    return model
