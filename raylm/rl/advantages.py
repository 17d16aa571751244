"""Advantages: GRPO's group-normalised rewards (as TRL 1.16 computes them) and PPO's GAE.

GRPO needs no value model: each completion's advantage is its reward minus the mean
reward of the ``num_generations`` completions of the same prompt, optionally divided by
a std. The batch is laid out as TRL's ``RepeatSampler`` lays it out: the completions of
one prompt are adjacent, ``num_generations`` at a time.

A reward function may return None for a completion it does not apply to (NaN here). A
completion that every function skipped is unscorable: it is left out of its group's
mean and std and its advantage is 0, so it neither moves the policy nor the baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from raylm.config import choice
from raylm.rl.config import AGGREGATIONS, SCALE_REWARDS

STD_EPS = 1e-4
"""Added to the std before dividing (TRL hard-codes 1e-4), so a group whose rewards are
all equal gets advantages of 0 rather than 0 / 0."""

WHITEN_EPS = 1e-8
"""Added to the variance when PPO's advantages are whitened."""


@dataclass
class GroupAdvantages:
    """What :func:`group_advantages` returns: one advantage per completion and the
    reward statistics TRL logs (``reward``, ``reward_std``, ``frac_reward_zero_std``,
    ``rewards/NAME/mean`` and ``/std``)."""

    advantages: Tensor
    rewards: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def nanstd(x: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """Bessel-corrected std ignoring NaNs; NaN where fewer than 2 values remain (TRL's)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(x), dim=dim, keepdim=True)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(var, float("nan")))
    std = torch.sqrt(var * correction)
    if keepdim:
        return std
    return std.reshape(()) if dim is None else std.squeeze(dim)


def group_advantages(
    rewards_per_func: Tensor,
    num_generations: int,
    weights: Sequence[float] | None = None,
    scale_rewards: str = "group",
    aggregation: str = "sum_then_normalize",
    names: Sequence[str] | None = None,
) -> GroupAdvantages:
    """GRPO advantages of a (completions, functions) reward matrix, NaN where a function
    did not apply. ``weights`` default to 1.0 each (TRL's ``reward_weights``)."""
    choice("grpo.scale_rewards", scale_rewards, SCALE_REWARDS)
    choice("grpo.multi_objective_aggregation", aggregation, AGGREGATIONS)
    n, k = rewards_per_func.shape
    if n % num_generations:
        raise ValueError(f"{n} completions do not split into groups of {num_generations}")
    w = torch.ones(k) if weights is None else torch.tensor(list(weights), dtype=torch.float32)
    if w.numel() != k:
        raise ValueError(f"{w.numel()} reward weights for {k} reward functions")
    w = w.to(rewards_per_func)
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    if aggregation == "sum_then_normalize":
        adv, std = _sum_then_normalize(
            rewards_per_func, w, unscorable, num_generations, scale_rewards
        )
    else:
        adv, std = _normalize_then_sum(rewards_per_func, w, unscorable, num_generations)
    rewards = (rewards_per_func * w.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable] = torch.nan
    metrics = _reward_metrics(rewards_per_func, rewards, std, names)
    return GroupAdvantages(torch.nan_to_num(adv, nan=0.0), rewards, metrics)


def _sum_then_normalize(
    per_func: Tensor, w: Tensor, unscorable: Tensor, g: int, scale: str
) -> tuple[Tensor, Tensor]:
    """Weighted sum first, then minus the group mean, over the group or batch std."""
    rewards = (per_func * w.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable] = torch.nan
    mean = torch.nanmean(rewards.view(-1, g), dim=1).repeat_interleave(g)
    if scale == "batch":
        std = (
            nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        )
    elif g > 1:  # group, and none (whose std is only logged)
        std = nanstd(rewards.view(-1, g), dim=1).repeat_interleave(g)
    else:
        std = torch.zeros_like(rewards)
    adv = rewards - mean
    return (adv if scale == "none" else adv / (std + STD_EPS)), std


def _normalize_then_sum(
    per_func: Tensor, w: Tensor, unscorable: Tensor, g: int
) -> tuple[Tensor, Tensor]:
    """GDPO: normalise each function within its group, sum with weights, then normalise
    the sum over the batch (``scale_rewards`` does not apply, as in TRL)."""
    grouped = per_func.view(-1, g, per_func.shape[1])
    mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
    std_k = nanstd(grouped, dim=1, keepdim=True) if g > 1 else torch.zeros_like(mean_k)
    normed = ((grouped - mean_k) / (std_k + STD_EPS)).view(-1, per_func.shape[1])
    rewards = (normed * w.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable] = torch.nan
    std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    return (rewards - torch.nanmean(rewards)) / (std + STD_EPS), std


def _reward_metrics(
    per_func: Tensor, rewards: Tensor, std: Tensor, names: Sequence[str] | None
) -> dict[str, float]:
    """The reward statistics TRL logs, under TRL's names."""
    names = list(names) if names is not None else [f"reward_{i}" for i in range(per_func.shape[1])]
    out: dict[str, float] = {}
    for i, name in enumerate(names):
        out[f"rewards/{name}/mean"] = torch.nanmean(per_func[:, i]).item()
        out[f"rewards/{name}/std"] = nanstd(per_func[:, i]).item()
    out["reward"] = torch.nanmean(rewards).item()
    out["reward_std"] = nanstd(rewards).item()
    zero = torch.isclose(std, torch.zeros_like(std))
    out["frac_reward_zero_std"] = zero.float().mean().item()
    return out


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """(advantages, returns) by generalised advantage estimation over (batch, tokens).

    A_t = delta_t + gamma * lam * A_{t+1}, delta_t = r_t + gamma * V_{t+1} - V_t, with
    V after the last token 0. Masked tokens (padding, tool output) are not steps: they
    get 0 and the recursion links the valid tokens on either side of them. The returns
    A + V are the value targets.
    """
    valid = mask.bool()
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    adv = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a_t = delta + gamma * lam * next_adv
        ok = valid[:, t]
        adv[:, t] = torch.where(ok, a_t, torch.zeros_like(a_t))
        next_adv = torch.where(ok, a_t, next_adv)
        next_value = torch.where(ok, values[:, t], next_value)
    returns = (adv + values) * mask
    return adv, returns


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Zero mean (unless ``shift_mean`` is False), unit variance over the masked entries
    (unbiased variance); masked-out entries come back as 0."""
    m = mask.to(x.dtype)
    count = m.sum()
    mean = (x * m).sum() / count
    var = (((x - mean) * m) ** 2).sum() / (count - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    return (out if shift_mean else out + mean) * m


def kl_shaped_rewards(
    scores: Tensor, logps: Tensor, ref_logps: Tensor, mask: Tensor, kl_coef: float
) -> Tensor:
    """PPO's per-token rewards: -kl_coef * (logp - ref_logp) on every valid token, plus the
    sequence's score on its last valid token (a reward model or verifier scores whole
    completions)."""
    rewards = -kl_coef * (logps - ref_logps) * mask
    last = _last_valid(mask)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    has_token = mask.sum(dim=1) > 0
    rewards[rows[has_token], last[has_token]] += scores[has_token].to(rewards.dtype)
    return rewards


def _last_valid(mask: Tensor) -> Tensor:
    """Index of each row's last nonzero mask entry (0 for an empty row)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).max(dim=1).values
