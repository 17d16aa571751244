"""GRPO's policy loss (every TRL 1.16 ``loss_type``), its KL penalty and metrics, and PPO's
clipped value loss.

The inputs are per-token log-probabilities of the sampled completion tokens, shaped
(batch, tokens) with ``mask`` 1 on tokens that count: ``logps`` from the policy being
trained (with grad), ``old_logps`` from the policy that sampled (None: on-policy, the
detached ``logps``), ``ref_logps`` from the reference model (needed when beta != 0).
Advantages are (batch,) for GRPO or (batch, tokens) for PPO's GAE.

The loss matches ``GRPOTrainer._compute_loss`` term for term on one process; the metrics
are this micro-batch's (a multi-worker stage must all-reduce them as TRL's
``accelerator.reduce`` does).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from raylm.rl.config import CLIPPED_LOSSES, GRPOConfig

LOG_CLAMP = 20.0
"""vespo clamps log-ratios to +-20 (and from below at log(1e-8)) before exponentiating."""


@dataclass
class LossScale:
    """How summed token losses are normalised across micro-batches and workers (TRL's
    gradient accumulation, and dapo/cispo/vespo's global token count)."""

    accumulation_steps: int = 1
    """Micro-batches per optimizer step (TRL's ``current_gradient_accumulation_steps``)."""

    steps_per_generation: int | None = None
    """Micro-batches one generation batch feeds (TRL: ``steps_per_generation``); None:
    accumulation_steps."""

    num_items_in_batch: float | None = None
    """Loss tokens in the whole generation batch on all workers (TRL's
    ``num_items_in_batch``); None: this micro-batch's, the single-worker value."""

    num_processes: int = 1
    """Workers whose gradients are averaged (TRL's ``accelerator.num_processes``)."""

    training: bool = True
    """False in evaluation, where nothing is accumulated."""


@dataclass
class LossOutput:
    """The loss to backpropagate, the unscaled policy loss TRL logs, and the metrics."""

    loss: Tensor
    policy_loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def kl_k3(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token KL(policy || reference) by Schulman's k3 estimator, exp(d) - d - 1 with
    d = ref - logp: unbiased, always >= 0, and low-variance next to log-ratio (k1)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    cfg: GRPOConfig,
    ref_logps: Tensor | None = None,
    is_ratio: Tensor | None = None,
    entropies: Tensor | None = None,
    scale: LossScale | None = None,
) -> LossOutput:
    """TRL 1.16's GRPO loss. ``is_ratio`` is the rollout engine's importance-sampling
    correction (``raylm.rl.rollout.rollout_is_ratio``), or None. With (batch, tokens)
    advantages from GAE and loss_type bnpo it is PPO's clipped policy loss."""
    scale = scale or LossScale()
    mask = mask.to(logps.dtype)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    old = logps.detach() if old_logps is None else old_logps
    log_ratio = logps - old
    coef_1 = torch.exp(_importance_log_weights(log_ratio, mask, cfg.importance_sampling_level))
    per_token, phi_seq = _per_token_loss(cfg, coef_1, adv, logps, log_ratio, mask, is_ratio)
    if is_ratio is not None and cfg.loss_type != "vespo":
        per_token = per_token * is_ratio
    per_token_kl = _kl_term(cfg, logps, ref_logps, coef_1)
    if per_token_kl is not None:
        per_token = per_token + cfg.beta * per_token_kl
    loss, policy_loss = _aggregate(cfg, per_token, mask, scale)
    if cfg.delta is not None and cfg.loss_type in CLIPPED_LOSSES:
        coef_1 = torch.clamp(coef_1, max=cfg.delta)  # TRL's clip metrics see the capped ratio
    metrics = _metrics(cfg, coef_1, adv, mask, per_token_kl, entropies, phi_seq)
    return LossOutput(loss, policy_loss, metrics)


def _kl_term(
    cfg: GRPOConfig, logps: Tensor, ref_logps: Tensor | None, coef_1: Tensor
) -> Tensor | None:
    """k3 KL to the reference per token (None when beta is 0: no reference is needed),
    times the policy ratio when ``use_bias_correction_kl`` makes its gradient unbiased."""
    if cfg.beta == 0.0:
        return None
    if ref_logps is None:
        raise ValueError("grpo.beta != 0 needs the reference model's ref_logps")
    kl = kl_k3(logps, ref_logps)
    return kl * coef_1 if cfg.use_bias_correction_kl else kl


def _importance_log_weights(log_ratio: Tensor, mask: Tensor, level: str) -> Tensor:
    """Per-token log-ratios, or (GSPO) one masked mean per sequence, shaped (batch, 1)."""
    if level == "token":
        return log_ratio
    return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)


def _per_token_loss(
    cfg: GRPOConfig,
    coef_1: Tensor,
    adv: Tensor,
    logps: Tensor,
    log_ratio: Tensor,
    mask: Tensor,
    is_ratio: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """The un-aggregated loss of each loss type (and vespo's sequence weights)."""
    lo, hi = cfg.epsilon_low, cfg.epsilon_upper
    if cfg.loss_type == "cispo":  # clip the weight, not the objective; REINFORCE-style
        return -torch.clamp(coef_1, max=hi).detach() * adv * logps, None
    if cfg.loss_type in CLIPPED_LOSSES:
        coef_2 = torch.clamp(coef_1, 1 - lo, 1 + hi)
        if cfg.delta is not None:
            coef_1 = torch.clamp(coef_1, max=cfg.delta)
        return -torch.min(coef_1 * adv, coef_2 * adv), None
    if cfg.loss_type == "sapo":  # a smooth gate instead of a hard clip
        temp = torch.where(adv > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)
        return -torch.sigmoid(temp * (coef_1 - 1)) * 4 / temp * adv, None
    phi = gamma_weights(cfg, adv, log_ratio, mask, is_ratio)
    return -phi * adv * logps, phi


@torch.no_grad()
def gamma_weights(
    cfg: GRPOConfig, adv: Tensor, log_ratio: Tensor, mask: Tensor, is_ratio: Tensor | None
) -> Tensor:
    """VESPO's (batch, 1) weights phi(w) = e^lam w^k e^(-lam w), w the sequence's ratio;
    detached, so they scale the gradient of -A log p rather than define it."""
    lower = math.log(1e-8)
    seq = torch.sum(torch.clamp(log_ratio, -LOG_CLAMP, LOG_CLAMP) * mask, dim=-1, keepdim=True)
    if is_ratio is not None:
        seq = seq + torch.sum(
            torch.clamp(torch.log(is_ratio), lower, LOG_CLAMP), dim=-1, keepdim=True
        )
    log_w = torch.clamp(seq, lower, LOG_CLAMP)
    nonneg = adv >= 0
    k = torch.where(nonneg, cfg.vespo_k_pos, cfg.vespo_k_neg)
    lam = torch.where(nonneg, cfg.vespo_lambda_pos, cfg.vespo_lambda_neg).clamp(min=1e-4)
    log_phi = lam + k * log_w - lam * torch.exp(log_w)
    return torch.exp(log_phi).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _aggregate(
    cfg: GRPOConfig, per_token: Tensor, mask: Tensor, scale: LossScale
) -> tuple[Tensor, Tensor]:
    """(loss scaled for accumulation, detached policy loss) by the loss type's normaliser."""
    accum = scale.accumulation_steps if scale.training else 1.0
    masked = per_token * mask
    if cfg.loss_type in ("cispo", "dapo", "vespo"):
        return _global_token_mean(masked, mask, scale)
    if cfg.loss_type in ("grpo", "sapo"):  # each sequence's mean, then the batch's
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif cfg.loss_type == "bnpo":  # this micro-batch's token mean
        loss = masked.sum() / mask.sum().clamp(min=1.0)
    elif cfg.loss_type == "dr_grpo":  # a constant: no length bias, no batch dependence
        loss = masked.sum() / (per_token.size(0) * cfg.max_completion_length)
    else:  # luspo: each sequence's sum (its length times its mean)
        loss = masked.sum(-1).mean()
    return loss / accum, loss.detach()


def _global_token_mean(masked: Tensor, mask: Tensor, scale: LossScale) -> tuple[Tensor, Tensor]:
    """dapo / cispo / vespo: divide by the tokens of one accumulation window on every
    worker (per worker, since gradients are averaged), so each token weighs the same."""
    items = mask.sum() if scale.num_items_in_batch is None else scale.num_items_in_batch
    norm = torch.as_tensor(items, dtype=masked.dtype).clamp(min=1.0) / scale.num_processes
    if scale.training:
        spg = scale.steps_per_generation or scale.accumulation_steps
        norm = norm * scale.accumulation_steps / spg
    loss = masked.sum() / norm
    return loss, loss.detach()


def _metrics(
    cfg: GRPOConfig,
    coef_1: Tensor,
    adv: Tensor,
    mask: Tensor,
    per_token_kl: Tensor | None,
    entropies: Tensor | None,
    phi_seq: Tensor | None,
) -> dict[str, float]:
    """What TRL logs from ``_compute_loss``, under its names, for this micro-batch."""
    out: dict[str, float] = {}
    if per_token_kl is not None:
        out["kl"] = _masked_mean(per_token_kl, mask)
    if entropies is not None:
        out["entropy"] = _masked_mean(entropies, mask)
    if cfg.loss_type in CLIPPED_LOSSES:
        low = ((coef_1 < 1 - cfg.epsilon_low) & (adv < 0)).float()
        high = ((coef_1 > 1 + cfg.epsilon_upper) & (adv > 0)).float()
        out["clip_ratio/low_mean"] = _masked_mean(low, mask)
        out["clip_ratio/high_mean"] = _masked_mean(high, mask)
        out["clip_ratio/region_mean"] = _masked_mean(torch.maximum(low, high), mask)
        out["clip_ratio/low_min"] = _nan_extreme(_seq_mean(low, mask), torch.min)
        out["clip_ratio/high_max"] = _nan_extreme(_seq_mean(high, mask), torch.max)
    elif cfg.loss_type == "cispo":
        out["cispo_clip_ratio"] = _masked_mean(
            ((coef_1 > cfg.epsilon_upper) & (adv > 0)).float(), mask
        )
    elif cfg.loss_type == "vespo" and phi_seq is not None:
        out["vespo/phi_seq_mean"] = _masked_mean(phi_seq, mask)
    return out


def _masked_mean(x: Tensor, mask: Tensor) -> float:
    """Token mean over the mask; a (batch, 1) tensor (sequence level) is a plain mean."""
    if x.shape[1] == 1:
        return (x.sum() / max(x.shape[0], 1)).item()
    return ((x * mask).sum() / mask.sum().clamp(min=1.0)).item()


def _seq_mean(x: Tensor, mask: Tensor) -> Tensor:
    return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)


def _nan_extreme(x: Tensor, op: Callable[[Tensor], Tensor]) -> float:
    """min / max ignoring NaN (an empty sequence's mean); NaN when nothing is left."""
    kept = x[~torch.isnan(x)]
    return op(kept).item() if kept.numel() else float("nan")


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float
) -> tuple[Tensor, dict[str, float]]:
    """PPO's clipped value loss, 0.5 * mean(max((V - R)^2, (clip(V) - R)^2)) over the mask,
    where clip keeps V within ``clip`` of the rollout's values, so one batch cannot move
    the critic far; and ``vf_clipfrac``, the share of tokens where the clip was binding."""
    mask = mask.to(values.dtype)
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    loss1 = (values - returns) ** 2
    loss2 = (clipped - returns) ** 2
    count = mask.sum().clamp(min=1.0)
    loss = 0.5 * (torch.maximum(loss1, loss2) * mask).sum() / count
    clipfrac = ((loss2 > loss1).to(values.dtype) * mask).sum() / count
    return loss, {"vf_loss": loss.item(), "vf_clipfrac": clipfrac.item()}


def ppo_policy_loss(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, clip: float
) -> tuple[Tensor, dict[str, float]]:
    """PPO's clipped surrogate, mean(max(-A r, -A clip(r, 1 - clip, 1 + clip))) over the
    masked tokens (earlier TRL's PPO ``masked_mean``), with per-token advantages (GAE);
    ``clip_ratio``, the share of tokens where the clip was binding, and ``approx_kl``,
    0.5 mean((logp - old)^2), the drift from the sampling policy."""
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    count = mask.sum().clamp(min=1.0)
    loss = (torch.maximum(loss1, loss2) * mask).sum() / count
    with torch.no_grad():
        clipfrac = ((loss2 > loss1).to(logps.dtype) * mask).sum() / count
        approx_kl = 0.5 * (((logps - old_logps) ** 2) * mask).sum() / count
    return loss, {"policy_loss": loss.item(), "clip_ratio": clipfrac.item(),
                  "approx_kl": approx_kl.item()}  # fmt: skip
