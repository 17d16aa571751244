"""Adam-mini (``train.optimizer=adam_mini``, LLaMA-Factory's ``use_adam_mini``), built as
LLaMA-Factory's ``_create_adam_mini_optimizer`` (ff6d4d12) builds it.

Adam-mini keeps one second-moment value per block instead of per weight: per head of the
query and key projections, per output row of the value, output, MLP, embedding and head
weights, per tensor of the rest (norms), full Adam for biases. It finds those blocks by
parameter name and shape, so it is built from the model's named parameters, with the
model's hidden size and head counts, and steps whole tensors: ZeRO stage 0 in raylm
(``raylm.train.config_optim``). Betas and eps are transformers' defaults (0.9, 0.999,
1e-8), which LLaMA-Factory passes; weight decay is ``train.weight_decay`` on all but
norm and bias weights (Adam-mini's rule). ``model_sharding`` (LLaMA-Factory passes
ZeRO-3's flag) is deprecated in adam-mini 1.1.1 and not passed; its printing is off.
"""

from __future__ import annotations

from typing import Any

from raylm.train.config_optim import require


def build_adam_mini(model: Any, cfg: Any) -> Any:
    """adam-mini's ``Adam_mini`` over the trainable named parameters."""
    pkg = require("adam_mini")
    config = getattr(model, "config", None)
    return pkg.Adam_mini(
        named_parameters=model.named_parameters(),
        lr=cfg.train.lr,
        betas=cfg.train.betas,
        eps=cfg.train.adam_epsilon,
        weight_decay=cfg.train.weight_decay,
        dim=getattr(config, "hidden_size", None),
        n_heads=getattr(config, "num_attention_heads", None),
        n_kv_heads=getattr(config, "num_key_value_heads", None),
        verbose=False,
    )
