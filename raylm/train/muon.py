"""Muon (``train.optimizer=muon``, LLaMA-Factory's ``use_muon``) as LLaMA-Factory sets it up.

LLaMA-Factory (``train/trainer_utils.py:_create_muon_optimizer`` and
``third_party/muon`` at ff6d4d12) runs Muon, momentum SGD whose update is orthogonalised
by Newton-Schulz iterations, on every trainable 2-D weight whose name holds neither
``embed`` nor ``lm_head``, and AdamW on the rest, at one learning rate. A Muon update of
an A x B matrix is scaled by ``0.2 * sqrt(max(A, B))`` (matching AdamW's update RMS) and
weight decay is ``lr * weight_decay`` unscaled.

raylm builds DeepSpeed's ``MuonWithAuxAdam`` instead of that class, as the client
optimizer: ZeRO-1/2/3 and DeepSpeed's bf16 optimizer recognise it and orthogonalise each
whole matrix even though they partition the flat parameters (LLaMA-Factory's class works
only unpartitioned). Its Muon step is the same momentum and quintic Newton-Schulz
(``ns_method=standard``) but scales by ``sqrt(max(1, A / B))``, so each shape gets its
own group whose lr makes the two agree, and whose weight decay keeps ``lr *
weight_decay`` as LLaMA-Factory applies it. The lr schedule scales every group alike.

Two DeepSpeed facts (checked on the tiny model, one rank, stages 0-3): ZeRO-3 refuses
Muon unless ``zero_optimization.reduce_scatter`` is false. ZeRO-1 (fp32), 2 and 3
orthogonalise before gradient clipping, so ``train.max_grad_norm`` clips the Muon
update's norm, not the gradient's as LLaMA-Factory (and DeepSpeed's stage 0 and bf16
ZeRO-1) do; with ``max_grad_norm=0`` every stage takes the same steps.
"""

from __future__ import annotations

import math
from typing import Any

from raylm.config import ConfigError

MOMENTUM = 0.95


def shape_of(p: Any) -> tuple[int, ...]:
    """The full shape, also of a weight ZeRO-3 already partitioned."""
    return tuple(getattr(p, "ds_shape", p.shape))


def is_muon(name: str, p: Any) -> bool:
    """LLaMA-Factory's rule: 2-D, and not an embedding or the head."""
    return len(shape_of(p)) == 2 and "embed" not in name and "lm_head" not in name


def lr_factor(rows: int, cols: int) -> float:
    """LLaMA-Factory's lr scale over DeepSpeed's aspect-ratio scale, for one shape."""
    deepspeed_scale = math.sqrt(rows / cols) if rows > cols else 1.0
    return 0.2 * math.sqrt(max(rows, cols)) / deepspeed_scale


def muon_param_groups(
    model: Any,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> list[dict[str, Any]]:
    """AdamW's group first (its lr is ``train.lr``, the logged one), then one Muon group
    per weight shape; every parameter tagged ``use_muon`` as DeepSpeed's ZeRO reads it."""
    adam, muon = [], {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        p.use_muon = is_muon(name, p)
        if p.use_muon:
            muon.setdefault(shape_of(p), []).append(p)
        else:
            adam.append(p)
    groups: list[dict[str, Any]] = []
    if adam:
        adam_half = dict(betas=betas, eps=eps, use_muon=False)
        groups.append(dict(params=adam, lr=lr, weight_decay=weight_decay, **adam_half))
    for (rows, cols), params in sorted(muon.items()):
        f = lr_factor(rows, cols)
        muon_half = dict(momentum=MOMENTUM, use_muon=True, ns_method="standard")
        groups.append(dict(params=params, lr=lr * f, weight_decay=weight_decay / f, **muon_half))
    if not any(g["use_muon"] for g in groups):
        raise ConfigError("train.optimizer=muon: no trainable 2-D weight to apply Muon to")
    return groups


def build_muon(model: Any, cfg: Any) -> Any:
    """DeepSpeed's ``MuonWithAuxAdam`` over :func:`muon_param_groups`, torch AdamW
    stepping the non-Muon groups."""
    import torch
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    if cfg.lora.loraplus_lr_ratio and cfg.finetuning_type in ("lora", "qlora"):
        raise ConfigError(
            "train.optimizer=muon and lora.loraplus_lr_ratio both set the learning rates: pick one"
        )
    t = cfg.train
    groups = muon_param_groups(model, t.lr, t.weight_decay, t.betas, t.adam_epsilon)
    return MuonWithAuxAdam(groups, adam_optimizer=torch.optim.AdamW, adam_w_mode=True)
